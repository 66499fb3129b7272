"""Freeze Encoder tuner model."""

from ..base import SamTunerModel
from .layer import FreezeEncoderLayer


class FreezeEncoderModel(SamTunerModel):
    """Freezes the whole image encoder; prompt encoder and mask decoder train as `modules_to_save`."""

    prefix: str = "freeze_encoder_"
    tuner_layer_cls = FreezeEncoderLayer
