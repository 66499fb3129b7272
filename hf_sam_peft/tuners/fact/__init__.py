from .config import FactConfig
from .layer import FactLayer
from .model import FactModel

__all__ = ["FactConfig", "FactLayer", "FactModel"]
