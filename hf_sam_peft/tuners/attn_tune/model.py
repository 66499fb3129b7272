"""AttnTune tuner model."""

from ..selective import SelectiveModel
from .layer import AttnTuneLayer


class AttnTuneModel(SelectiveModel):
    """Attn Tune: trains the attention's qkv and proj weights and biases and its relative position tables."""

    prefix: str = "attn_tune_"
    tuner_layer_cls = AttnTuneLayer
