from .config import SSFConfig
from .layer import SSFLayer
from .model import SSFModel

__all__ = ["SSFConfig", "SSFLayer", "SSFModel"]
