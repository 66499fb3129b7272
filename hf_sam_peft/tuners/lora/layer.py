"""q/v-only LoRA for SAM's fused `attn.qkv` Linear, as peft custom LoRA layers.

SAM's image encoder computes q, k and v with one Linear (d → 3d). The paper (and micro-sam) adapts q and v
only, each with its own A (d→r) and B (r→d). peft's plain LoRA on `attn.qkv` would adapt q, k and v with one
shared A; these layers keep peft's LoRA machinery (config, scaling, dropout, adapters, merge, save/load) and
change only the shapes: `lora_A` is d→2r (rows [A_q; A_v]) and `lora_B` holds B_q and B_v as a (2, d_out, r)
tensor. d_out = d in SAM's ViT; SAM 2's Hiera widens at the first block of a stage (qkv: d → 3·d_out, d_out = 2d),
so there A reads the block's input width and B writes the q and v width d_out.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn


class QVLoraB(nn.Module):
    """B_q and B_v of q/v LoRA, stored as one (2, d_out, r) tensor."""

    def __init__(self, r: int, d_out: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2, d_out, r, device=device, dtype=dtype))
        self.bias = None

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """a = [a_q | a_v] (…, 2r) → [Δq | Δv] (…, 2·d_out)."""
        a_q, a_v = a.chunk(2, dim=-1)
        return torch.cat([a_q @ self.weight[0].T, a_v @ self.weight[1].T], dim=-1)


class QVLoraMixin:
    """Overrides of peft's LoRA Linear for a fused qkv base layer."""

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: Any, **kwargs: Any) -> None:
        # peft's own update_layer first (r, scaling, dropout, the adapter's entries); then A and B get q/v shapes
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        base = self.get_base_layer()
        d, d_out = base.in_features, base.out_features // 3
        if base.out_features != 3 * d_out:
            raise TypeError(
                f"q/v LoRA targets fused qkv Linear layers (out = 3·d_out), got in={d}, out={base.out_features}"
            )
        # peft's code for these reads lora_A / lora_B as plain (r, in) / (out, r) Linears of the whole qkv
        if config.use_dora or config.lora_bias or config.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError("q/v LoRA supports init_lora_weights True/False/'gaussian' without DoRA or lora_bias")
        ref = self.lora_A[adapter_name].weight
        self.lora_A[adapter_name] = nn.Linear(d, 2 * r, bias=False, device=ref.device, dtype=ref.dtype)
        self.lora_B[adapter_name] = QVLoraB(r, d_out, device=ref.device, dtype=ref.dtype)
        # True: A kaiming-uniform, B zero (QVLoraB's init), as micro-sam's LoRASurgery.reset_parameters;
        # "gaussian": peft's std 1/r for A (LoraLayer.reset_lora_parameters)
        if config.init_lora_weights is True:
            nn.init.kaiming_uniform_(self.lora_A[adapter_name].weight, a=math.sqrt(5))
        elif config.init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A[adapter_name].weight, std=1 / r)
        else:  # False: random B as well, i.e. not an identity start (peft's meaning of False)
            nn.init.kaiming_uniform_(self.lora_A[adapter_name].weight, a=math.sqrt(5))
            nn.init.normal_(self.lora_B[adapter_name].weight, std=1 / r)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        # the new A and B are fresh Parameters (requires_grad=True): re-apply which adapters train
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        # in float32 (bf16 / fp16 adapters too), cast back at the end; rows of the (3·d_out, d) qkv weight: [q; k; v]
        a = self.lora_A[adapter].weight.float()
        b = self.lora_B[adapter].weight.float()
        a_q, a_v = a.chunk(2, dim=0)
        delta_q, delta_v = b[0] @ a_q, b[1] @ a_v
        delta = torch.cat([delta_q, torch.zeros_like(delta_q), delta_v], dim=0) * self.scaling[adapter]
        return delta.to(self.lora_A[adapter].weight.dtype)

    def _qv_delta(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        # x in A's dtype, as peft's LoRA Linear casts its input; dropout on x, before A, as in peft
        a = self.lora_A[adapter](self.lora_dropout[adapter](x.to(self.lora_A[adapter].weight.dtype)))
        dq, dv = self.lora_B[adapter](a).chunk(2, dim=-1)
        return torch.cat([dq, torch.zeros_like(dq), dv], dim=-1) * self.scaling[adapter]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("q/v LoRA does not support mixed-adapter batches (adapter_names)")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for adapter in self.active_adapters:
            if adapter in self.lora_A:
                result = result + self._qv_delta(adapter, x).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "qv_lora." + super().__repr__()


class QVLoraLinear(QVLoraMixin, LoraLinear):
    """q/v LoRA on a full-precision fused qkv `nn.Linear`."""


@functools.lru_cache(maxsize=None)
def qv_lora_4bit_class() -> type:
    """q/v LoRA on a bitsandbytes `Linear4bit` qkv (QLoRA); imported lazily because bitsandbytes is optional."""
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    class QVLoraLinear4bit(QVLoraMixin, LoraLinear4bit):
        def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
            # what peft's dispatch_bnb_4bit passes its Linear4bit; the custom-module dispatch passes none of it
            kwargs.setdefault("compute_dtype", base_layer.compute_dtype)
            kwargs.setdefault("compress_statistics", base_layer.weight.compress_statistics)
            kwargs.setdefault("quant_type", base_layer.weight.quant_type)
            super().__init__(base_layer, adapter_name, **kwargs)

    return QVLoraLinear4bit
