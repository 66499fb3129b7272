"""FacT config: factor-tuning of the q and v projections (FacT-TT; Jie & Deng 2023), as in micro-sam."""

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.utils import PeftType

from ..base import SamTunerConfig, encoder_regex


@dataclass
class FactConfig(SamTunerConfig):
    """Δq = V·drop(S_q·U x), Δv = V·drop(S_v·U x) on the q and v slices of each block's fused `attn.qkv`.

    `shared_factors=False` (default) keeps U (d→r) and V (r→d) per block, as the reference implementation does
    (this gives the paper's Table 5 count, L·(2dr+2r²) = 301,056 on ViT-B). `shared_factors=True` shares U and V
    across layers, as the paper's text describes (2dr + L·2r² for one width). Encoders whose width changes
    (TinyViT, SAM 2's Hiera) cannot share one U, V: U is shared by all blocks that read width d and V by all that
    write width d (a Hiera stage's first block reads the previous stage's width and writes its own), i.e.
    Σ_widths 2dr + L·2r².
    `init="identity"` (default) zero-initialises V so training starts from the pretrained model;
    `init="reference"` uses PyTorch's default Linear init for every factor as micro-sam does.
    """

    # SAM 3's ViT: its separate q and v projections (one block's two share U and V, each has its S)
    target_modules: Optional[Union[list[str], str]] = field(
        default=encoder_regex("attn.qkv", "attention.q_proj", "attention.v_proj")
    )
    r: int = 16
    # micro-sam's FacTSurgery default (micro_sam/models/peft_sam.py); its dropout acts on the r-dim S·U x
    dropout: float = 0.1
    shared_factors: bool = False
    init: Literal["identity", "reference"] = "identity"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.FACT
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a positive int, got {self.r!r}")
        # bool is an int subclass: dropout=True would silently mean p = 1.0
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if self.init not in ("identity", "reference"):
            raise ValueError(f"init must be 'identity' or 'reference', got {self.init!r}")
