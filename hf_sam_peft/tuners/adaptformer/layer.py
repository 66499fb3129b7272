"""AdaptFormer layer: wraps an encoder block's MLP (SAM's `SamMLPBlock`, TinyViT's, Hiera's `Sam2FeedForward`)
with a parallel bottleneck branch."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..base import SamTunerLayer
from .config import AdaptFormerConfig


class AdaptFormerLayer(SamTunerLayer):
    # a fixed α is a float, not a tensor: it is no adapter weight and is rebuilt from the config on load
    adapter_layer_names = ("adaptformer_down", "adaptformer_up", "adaptformer_alpha")
    other_param_names = ("adaptformer_dropout", "adaptformer_fixed_alpha")

    def update_layer(self, adapter_name: str, config: AdaptFormerConfig, **kwargs: Any) -> None:
        if not hasattr(self, "adaptformer_down"):
            self.adaptformer_down = nn.ModuleDict()
            self.adaptformer_up = nn.ModuleDict()
            self.adaptformer_alpha = nn.ParameterDict()
            self.adaptformer_dropout = nn.ModuleDict()
            self.adaptformer_fixed_alpha: dict[str, float] = {}
        base = self.get_base_layer()
        # first and last Linear of the MLP: SAM ViT | TinyViT | SAM 2 Hiera (its input and output width)
        first = next((getattr(base, n) for n in ("lin1", "fc1", "proj_in") if hasattr(base, n)), None)
        last = next((getattr(base, n) for n in ("lin2", "fc2", "proj_out") if hasattr(base, n)), None)
        if not isinstance(first, nn.Linear) or not isinstance(last, nn.Linear):
            raise TypeError(
                f"AdaptFormer targets SAM MLP blocks (with .lin1/.lin2, .fc1/.fc2 or .proj_in/.proj_out), "
                f"got {type(base).__name__}"
            )
        d, d_out, p = first.in_features, last.out_features, config.projection_size
        ref = first.weight
        down = nn.Linear(d, p, device=ref.device, dtype=ref.dtype)
        up = nn.Linear(p, d_out, device=ref.device, dtype=ref.dtype)
        # micro-sam's init (AdaptFormer.__init__ in micro_sam/models/peft_sam.py); `up` = 0 makes the branch 0 at start
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        nn.init.zeros_(down.bias)
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        self.adaptformer_down[adapter_name] = down
        self.adaptformer_up[adapter_name] = up
        self.adaptformer_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        if config.alpha is None:
            self.adaptformer_alpha[adapter_name] = nn.Parameter(torch.ones(1, device=ref.device, dtype=ref.dtype))
        else:
            self.adaptformer_fixed_alpha[adapter_name] = float(config.alpha)

    def adapted_forward(self, adapter_name: str, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        # dropout after the ReLU, as in micro-sam's AdaptFormer.forward; unlike it, `x` itself is not added again
        # (the encoder block already adds the residual around its MLP)
        branch = self.adaptformer_up[adapter_name](
            self.adaptformer_dropout[adapter_name](torch.relu(self.adaptformer_down[adapter_name](x)))
        )
        if adapter_name in self.adaptformer_alpha:
            alpha = self.adaptformer_alpha[adapter_name]
        else:
            alpha = self.adaptformer_fixed_alpha[adapter_name]
        return out + alpha * branch
