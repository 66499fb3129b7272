"""AttnTune layer: a trainable copy of the selected parameters of one encoder module."""

from ..selective import SelectiveLayer


class AttnTuneLayer(SelectiveLayer):
    adapter_layer_names = ("attn_tune_params",)
