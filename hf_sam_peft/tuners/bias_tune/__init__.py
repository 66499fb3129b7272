from .config import BiasTuneConfig
from .layer import BiasTuneLayer
from .model import BiasTuneModel

__all__ = ["BiasTuneConfig", "BiasTuneLayer", "BiasTuneModel"]
