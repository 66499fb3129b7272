"""SSF layer: y = f(x)·γ + β on the output channels of a Linear or LayerNorm."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..base import SamTunerLayer
from .config import SSFConfig


def _out_features(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return layer.out_features
    if isinstance(layer, nn.LayerNorm):
        return layer.normalized_shape[-1]
    raise TypeError(f"SSF targets nn.Linear or nn.LayerNorm modules, got {type(layer).__name__}")


class SSFLayer(SamTunerLayer):
    adapter_layer_names = ("ssf_scale", "ssf_shift")

    def update_layer(self, adapter_name: str, config: SSFConfig, **kwargs: Any) -> None:
        if not hasattr(self, "ssf_scale"):
            self.ssf_scale = nn.ParameterDict()
            self.ssf_shift = nn.ParameterDict()
        base = self.get_base_layer()
        n = _out_features(base)
        ref = base.weight
        scale = torch.ones(n, dtype=ref.dtype, device=ref.device)
        shift = torch.zeros(n, dtype=ref.dtype, device=ref.device)
        # micro-sam's ScaleShiftLayer draws γ ~ N(1, 0.2²), β ~ N(0, 0.2²)
        if config.init == "reference":
            nn.init.normal_(scale, mean=1.0, std=0.2)
            nn.init.normal_(shift, std=0.2)
        self.ssf_scale[adapter_name] = nn.Parameter(scale)
        self.ssf_shift[adapter_name] = nn.Parameter(shift)

    def adapted_forward(self, adapter_name: str, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        # channels last for every target (Linear outputs, LayerNorm over the last dim, also SAM's (B, H, W, C)),
        # so γ and β broadcast; micro-sam's ScaleShiftLayer also handles channels-first convs, never targeted here
        return out * self.ssf_scale[adapter_name] + self.ssf_shift[adapter_name]

    def merged_values(self, adapter_name: str, current: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # (W x + b)·γ + β = (γ W) x + (γ b + β); the same for LayerNorm's affine weight and bias
        if current.get("bias") is None:
            raise ValueError("SSF can only be merged into layers that have a bias")
        scale = self.ssf_scale[adapter_name].detach()
        shift = self.ssf_shift[adapter_name].detach()
        weight = current["weight"]
        new_weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
        return {"weight": new_weight, "bias": current["bias"] * scale + shift}
