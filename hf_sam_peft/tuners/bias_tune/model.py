"""BiasTune tuner model."""

from ..selective import SelectiveModel
from .layer import BiasTuneLayer


class BiasTuneModel(SelectiveModel):
    """Bias Tune: trains the biases of qkv, proj, lin1, lin2 and both LayerNorms of every encoder block."""

    prefix: str = "bias_tune_"
    tuner_layer_cls = BiasTuneLayer
