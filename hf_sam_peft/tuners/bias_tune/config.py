"""Bias Tune config (paper: L·(7d+m) trainable encoder parameters, 101,376 on ViT-B).

peft's `beft` trains Linear biases only; the paper's Bias Tune also trains the LayerNorm biases, hence this type.
"""

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.utils import PeftType

from ..base import BLOCK_LINEARS, BLOCK_NORMS, encoder_regex
from ..selective import SelectiveConfig


@dataclass
class BiasTuneConfig(SelectiveConfig):
    """Train the biases of qkv, proj, lin1, lin2, layer_norm1 and layer_norm2 in each image-encoder block.

    The same rule on SAM 2's Hiera: attn.qkv, attn.proj, mlp.proj_in, mlp.proj_out, layer_norm1/2, and the residual
    `proj` of a stage's first block (every bias of a block, as micro-sam's BiasSurgery trains).
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=encoder_regex(*BLOCK_LINEARS, *BLOCK_NORMS)
    )
    # in a ViT block the targeted Linears and LayerNorms are the only modules with a bias, so this is the rule
    # of micro-sam's BiasSurgery (every parameter whose name ends in "bias")
    trainable_parameters: list[str] = field(default_factory=lambda: ["bias"])

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.BIAS_TUNE
