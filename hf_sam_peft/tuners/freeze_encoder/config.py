"""Freeze Encoder config: nothing in the image encoder trains, only the prompt encoder and mask decoder."""

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.utils import PeftType
from peft.utils.constants import DUMMY_TARGET_MODULES

from ..base import SamTunerConfig


@dataclass
class FreezeEncoderConfig(SamTunerConfig):
    """The image encoder stays frozen; the adapter is the trained prompt encoder + mask decoder (`modules_to_save`).

    peft's `DUMMY_TARGET_MODULES` marks an adapter that wraps no layer, so no module of the encoder is touched.
    `layers` is rejected rather than ignored: no block is adapted, so a value would silently mean nothing.
    """

    target_modules: Optional[Union[list[str], str]] = field(default=DUMMY_TARGET_MODULES)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.FREEZE_ENCODER
        if self.layers is not None:
            raise ValueError(
                f"layers must stay None for FreezeEncoderConfig: it adapts no encoder block, got {self.layers!r}"
            )
        if self.target_modules != DUMMY_TARGET_MODULES:
            raise ValueError(
                f"FreezeEncoderConfig adapts no encoder module; target_modules must stay {DUMMY_TARGET_MODULES!r}"
            )
