from .config import LNTuneConfig
from .layer import LNTuneLayer
from .model import LNTuneModel

__all__ = ["LNTuneConfig", "LNTuneLayer", "LNTuneModel"]
