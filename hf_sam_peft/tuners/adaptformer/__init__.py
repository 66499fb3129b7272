from .config import AdaptFormerConfig
from .layer import AdaptFormerLayer
from .model import AdaptFormerModel

__all__ = ["AdaptFormerConfig", "AdaptFormerLayer", "AdaptFormerModel"]
