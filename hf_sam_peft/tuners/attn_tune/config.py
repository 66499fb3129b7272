"""Attn Tune config (paper: 28,441,088 trainable encoder parameters on ViT-B)."""

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.utils import PeftType

from ..base import encoder_regex
from ..selective import SelectiveConfig


@dataclass
class AttnTuneConfig(SelectiveConfig):
    """Train qkv and proj (weights and biases) and the relative position tables of every encoder attention.

    SAM 2's Hiera attention has qkv and proj only: no relative position tables (its absolute position embeddings,
    `pos_embed` and `pos_embed_window`, sit at the encoder's input, outside the blocks, and stay frozen), and the
    residual `proj` of a stage's first block is not part of the attention.
    """

    # `attention`: SAM 3's ViT, whose q, k, v and output projections are four Linears (rotary positions: no table)
    target_modules: Optional[Union[list[str], str]] = field(default=encoder_regex("attn", "attention"))
    # micro-sam's AttentionSurgery trains every parameter under a block's `attn` (micro_sam/models/peft_sam.py);
    # on SAM's ViT these names are exactly those parameters
    trainable_parameters: list[str] = field(
        # rel_pos_h/w: ViT's relative position tables; attention_biases: TinyViT's
        default_factory=lambda: [
            "qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "rel_pos_h", "rel_pos_w", "attention_biases",
            *(f"{p}_proj.{t}" for p in "qkvo" for t in ("weight", "bias")),
        ]
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.ATTN_TUNE
