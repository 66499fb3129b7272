"""LN Tune config (paper: L·4d trainable encoder parameters, 36,864 on ViT-B)."""

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.utils import PeftType

from ..base import BLOCK_NORMS, encoder_regex
from ..selective import SelectiveConfig


@dataclass
class LNTuneConfig(SelectiveConfig):
    """Train the two LayerNorms of each image-encoder block (ViT, SAM 2's Hiera: layer_norm1/2; TinyViT: attn.norm,
    mlp.norm). In Hiera's first block of a stage layer_norm1 has the previous stage's width, layer_norm2 its own."""

    # micro-sam's LayerNormSurgery selects names containing "norm1"/"norm2": the original SAM's names for
    # transformers' layer_norm1/layer_norm2 (the neck's norms are outside the blocks and stay frozen)
    target_modules: Optional[Union[list[str], str]] = field(default=encoder_regex(*BLOCK_NORMS))
    trainable_parameters: list[str] = field(default_factory=lambda: ["weight", "bias"])

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.LN_TUNE
