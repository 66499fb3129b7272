"""AdaptFormer tuner model."""

from ..base import SamTunerModel
from .layer import AdaptFormerLayer


class AdaptFormerModel(SamTunerModel):
    """A bottleneck adapter parallel to each image-encoder MLP. Not mergeable (the branch is non-linear)."""

    prefix: str = "adaptformer_"
    tuner_layer_cls = AdaptFormerLayer
    mergeable = False
