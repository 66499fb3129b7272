"""SSF config: scale and shift the output of every op of each encoder block (L·2·(7d+m) = 202,752 on ViT-B)."""

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.utils import PeftType

from ..base import BLOCK_LINEARS, BLOCK_NORMS, SamTunerConfig, encoder_regex


@dataclass
class SSFConfig(SamTunerConfig):
    """Scale-and-shift features (Lian et al. 2022) after qkv, proj, lin1, lin2, layer_norm1 and layer_norm2.

    On SAM 2's Hiera: after attn.qkv (3·d_out), attn.proj, mlp.proj_in, mlp.proj_out, layer_norm1 (d) and
    layer_norm2 (d_out), and after the residual `proj` of a stage's first block (d → d_out): SAM's list is every
    Linear and LayerNorm of a block, and that one is the block's only other.

    `init="identity"` (default) starts at γ=1, β=0, i.e. exactly the pretrained model. `init="reference"`
    reproduces micro-sam's random start γ~N(1, 0.2²), β~N(0, 0.2²), which does not start from the pretrained model.
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=encoder_regex(*BLOCK_LINEARS, *BLOCK_NORMS)
    )
    # micro-sam's PEFT_Sam also hands the patch embedding to SSFSurgery, but that module has no `patch_embed`
    # attribute, so its `elif hasattr(block, "patch_embed")` branch adds nothing: the block ops are the whole of it
    init: Literal["identity", "reference"] = "identity"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.SSF
        if self.init not in ("identity", "reference"):
            raise ValueError(f"init must be 'identity' or 'reference', got {self.init!r}")
