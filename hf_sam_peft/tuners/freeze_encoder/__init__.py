from .config import FreezeEncoderConfig
from .layer import FreezeEncoderLayer
from .model import FreezeEncoderModel

__all__ = ["FreezeEncoderConfig", "FreezeEncoderLayer", "FreezeEncoderModel"]
