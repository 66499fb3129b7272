"""AdaptFormer config: a bottleneck branch parallel to each encoder MLP (L·(2dp+p+d+1) = 1,189,644 on ViT-B)."""

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.utils import PeftType

from ..base import SamTunerConfig, encoder_regex


@dataclass
class AdaptFormerConfig(SamTunerConfig):
    """out = mlp(x) + α·up(drop(ReLU(down(x)))) as in the AdaptFormer paper (Chen et al. 2022).

    `alpha=None` (default) makes α a learnable scalar initialised at 1; a number fixes it. `up` starts at zero,
    so the adapted model starts as the pretrained one. micro-sam's implementation also adds the MLP input `x`
    to the output (a residual SAM's block already adds); we do not copy that.
    """

    # the whole MLP module: the branch reads the MLP's input and adds to its output
    target_modules: Optional[Union[list[str], str]] = field(default=encoder_regex("mlp"))
    # p = 64, a learnable α and no dropout: micro-sam's defaults (micro_sam/models/peft_sam.py, AdaptFormer.__init__)
    projection_size: int = 64
    alpha: Optional[float] = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.ADAPTFORMER
        if not isinstance(self.projection_size, int) or self.projection_size < 1:
            raise ValueError(f"projection_size must be a positive int, got {self.projection_size!r}")
        if self.alpha is not None and not isinstance(self.alpha, (int, float)):
            raise TypeError(f"alpha must be None (learnable) or a number, got {type(self.alpha).__name__}")
        # bool is an int subclass: dropout=True would silently mean p = 1.0
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
