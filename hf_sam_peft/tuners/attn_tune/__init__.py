from .config import AttnTuneConfig
from .layer import AttnTuneLayer
from .model import AttnTuneModel

__all__ = ["AttnTuneConfig", "AttnTuneLayer", "AttnTuneModel"]
