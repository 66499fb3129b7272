"""LNTune layer: a trainable copy of the selected parameters of one encoder module."""

from ..selective import SelectiveLayer


class LNTuneLayer(SelectiveLayer):
    adapter_layer_names = ("ln_tune_params",)
