"""Freeze Encoder wraps no layer; the class exists because peft's tuner API names one."""

from ..selective import SelectiveLayer


class FreezeEncoderLayer(SelectiveLayer):
    adapter_layer_names = ("freeze_encoder_params",)
