"""BiasTune layer: a trainable copy of the selected parameters of one encoder module."""

from ..selective import SelectiveLayer


class BiasTuneLayer(SelectiveLayer):
    adapter_layer_names = ("bias_tune_params",)
