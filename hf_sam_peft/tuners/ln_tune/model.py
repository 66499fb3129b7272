"""LNTune tuner model."""

from ..selective import SelectiveModel
from .layer import LNTuneLayer


class LNTuneModel(SelectiveModel):
    """LN Tune: trains weight and bias of both LayerNorms of every image-encoder block (not the neck)."""

    prefix: str = "ln_tune_"
    tuner_layer_cls = LNTuneLayer
