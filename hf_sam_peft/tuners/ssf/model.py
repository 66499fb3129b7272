"""SSF tuner model."""

from ..base import SamTunerModel
from .layer import SSFLayer


class SSFModel(SamTunerModel):
    """Scale-and-shift every op of each image-encoder block."""

    prefix: str = "ssf_"
    tuner_layer_cls = SSFLayer
