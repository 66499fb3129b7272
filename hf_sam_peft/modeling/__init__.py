"""SAM model construction, checkpoint conversion, LiteMedSAM's TinyViT encoder and the UNETR head.

Importing this package registers `LiteSamConfig` / `LiteSamModel` with transformers' Auto classes.
"""

from .base_models import BASE_MODELS, load_base_model
from .lite_medsam import (
    LiteSamConfig,
    LiteSamModel,
    convert_lite_medsam,
    lite_medsam_preprocess,
    lite_medsam_processor,
    load_lite_medsam,
    tiny_lite_sam_config,
)
from .sam import sam_config, tiny_sam_config
from .tiny_vit import LiteSamVisionConfig, TinyViTVisionEncoder

__all__ = [
    "BASE_MODELS", "LiteSamConfig", "LiteSamModel", "LiteSamVisionConfig", "TinyViTVisionEncoder",
    "convert_lite_medsam", "lite_medsam_preprocess", "lite_medsam_processor", "load_base_model", "load_lite_medsam",
    "sam_config", "tiny_lite_sam_config", "tiny_sam_config",
]
