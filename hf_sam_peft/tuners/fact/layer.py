"""FacT layer on a fused qkv Linear: d → [q | k | v], each of width d_out (d_out = d but where SAM 2's Hiera widens),
or on one of SAM 3's separate q / v projections (`role`), whose block shares U and V between the two."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..base import SamTunerLayer
from .config import FactConfig

# Shared factors: {(adapter_name, "u" | "v", width): factor}; U (d→r) is shared by the layers that read width d,
# V (r→d_out) by those that write width d_out. Each is owned (registered) by the first layer that creates it.
SharedFactors = dict[tuple[str, str, int], nn.Parameter]


def _linear_init(weight: torch.Tensor) -> torch.Tensor:
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # PyTorch's default nn.Linear weight init
    return weight


class FactLayer(SamTunerLayer):
    adapter_layer_names = ("fact_u", "fact_v", "fact_s_q", "fact_s_v")
    other_param_names = ("fact_dropout",)

    def update_layer(
        self, adapter_name: str, config: FactConfig, shared: Optional[SharedFactors] = None,
        role: Optional[str] = None, **kwargs: Any,
    ) -> None:
        """`role` None: a fused qkv Linear; "q" / "v": a separate q or v projection (only that S is created here)."""
        if not hasattr(self, "fact_u"):
            self.fact_u, self.fact_v = nn.ParameterDict(), nn.ParameterDict()
            self.fact_s_q, self.fact_s_v = nn.ParameterDict(), nn.ParameterDict()
            self.fact_dropout = nn.ModuleDict()
            # plain dicts, not module state: `_factors` references U and V without registering them, so a factor
            # shared by several layers is saved, loaded and counted once, under the layer that owns it
            self._factors: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
            self._roles: dict[str, Optional[str]] = {}
        base = self.get_base_layer()
        if role is None and (not isinstance(base, nn.Linear) or base.out_features % 3):
            raise TypeError(f"FacT targets fused qkv Linear layers (out = 3·d_out), got {base}")
        if role is not None and not isinstance(base, nn.Linear):
            raise TypeError(f"FacT targets q / v projection Linear layers, got {base}")
        d, d_out, r = base.in_features, base.out_features // (3 if role is None else 1), config.r
        ref = base.weight

        def new(rows: int, cols: int, zero: bool = False) -> nn.Parameter:
            w = torch.empty(rows, cols, device=ref.device, dtype=ref.dtype)
            return nn.Parameter(w.zero_() if zero else _linear_init(w))

        def factor(store: nn.ParameterDict, kind: str, width: int, rows: int, cols: int, zero: bool) -> nn.Parameter:
            key = (adapter_name, kind, width)
            if shared is not None and key in shared:
                return shared[key]  # referenced, owned by another layer
            store[adapter_name] = param = new(rows, cols, zero)
            if shared is not None:
                shared[key] = param
            return param

        # keyed by width, so that Hiera's stage-changing blocks (d -> d_out) get factors of their own widths;
        # V = 0 ("identity") makes Δq = Δv = 0 at the start, LoRA's B = 0
        u = factor(self.fact_u, "u", d, r, d, zero=False)
        v = factor(self.fact_v, "v", d_out, d_out, r, zero=config.init == "identity")
        self._factors[adapter_name] = (u, v)
        self._roles[adapter_name] = role
        # S_q, S_v with nn.Linear's default init, as micro-sam's q_FacTs / v_FacTs (FacTSurgery.__init__)
        if role in (None, "q"):
            self.fact_s_q[adapter_name] = new(r, r)
        if role in (None, "v"):
            self.fact_s_v[adapter_name] = new(r, r)
        self.fact_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def _scale(self, adapter_name: str) -> nn.Parameter:
        """S of a separate projection (its role's)."""
        return (self.fact_s_q if self._roles[adapter_name] == "q" else self.fact_s_v)[adapter_name]

    def _deltas(self, adapter_name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, v = self._factors[adapter_name]
        drop = self.fact_dropout[adapter_name]
        hidden = F.linear(x, u)  # U x computed once, shared by both branches
        # one Dropout module called twice: independent masks for q and v, like micro-sam's dp_q / dp_v
        dq = F.linear(drop(F.linear(hidden, self.fact_s_q[adapter_name])), v)
        dv = F.linear(drop(F.linear(hidden, self.fact_s_v[adapter_name])), v)
        return dq, dv

    def adapted_forward(self, adapter_name: str, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        qkv = self.base_layer(x, *args, **kwargs)
        if self._roles[adapter_name] is not None:  # one separate projection: out + V·drop(S·U x)
            u, v = self._factors[adapter_name]
            hidden = F.linear(x.to(qkv.dtype), u)
            return qkv + F.linear(self.fact_dropout[adapter_name](F.linear(hidden, self._scale(adapter_name))), v)
        dq, dv = self._deltas(adapter_name, x.to(qkv.dtype))
        # the fused output is [q | k | v] along the last dim (SAM reshapes it to (..., 3, heads, head_dim))
        q, k, v = qkv.chunk(3, dim=-1)
        return torch.cat([q + dq, k, v + dv], dim=-1)

    def merged_values(self, adapter_name: str, current: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        u, v = (p.detach() for p in self._factors[adapter_name])
        if self._roles[adapter_name] is not None:
            return {"weight": current["weight"] + v @ self._scale(adapter_name).detach() @ u}
        # V S U is (d_out, d), the layout of a block of weight rows (out, in); the k rows stay unchanged
        delta_q = v @ self.fact_s_q[adapter_name].detach() @ u
        delta_v = v @ self.fact_s_v[adapter_name].detach() @ u
        zero = torch.zeros_like(delta_q)
        return {"weight": current["weight"] + torch.cat([delta_q, zero, delta_v], dim=0)}
