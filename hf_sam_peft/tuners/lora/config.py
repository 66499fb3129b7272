"""peft `LoraConfig`s for SAM: q/v-only LoRA on the image encoder's fused qkv (paper: r 32, scale 1, no dropout).

peft does not serialise custom LoRA layer registrations, so an adapter saved from q/v LoRA is recognised on
load from its tensor shapes (`lora_A` has 2r rows) and re-registered by `hf_sam_peft.load_adapter`.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from peft import LoraConfig
from torch import nn

from ..base import LAYERS_PATTERN, check_layers, default_modules_to_save, encoder_regex
from .layer import QVLoraLinear, qv_lora_4bit_class

# SAM 3's ViT: q and v are Linears of their own, so q/v LoRA is peft's plain LoRA on these two
SPLIT_QV: tuple[str, ...] = ("attention.q_proj", "attention.v_proj")


def register_qv_lora(config: LoraConfig) -> LoraConfig:
    """Make `config` create q/v-only LoRA layers on fused qkv Linears (also on bitsandbytes 4-bit ones)."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a peft LoraConfig, got {type(config).__name__}")
    mapping: dict[type[nn.Module], type[nn.Module]] = {}
    try:
        import bitsandbytes as bnb

        mapping[bnb.nn.Linear4bit] = qv_lora_4bit_class()  # before nn.Linear: Linear4bit subclasses it
    except ImportError:
        pass
    mapping[nn.Linear] = QVLoraLinear
    # peft's LoRA dispatch tries custom modules first, in dict order, and takes the first isinstance match
    config._register_custom_module(mapping)
    return config


def qv_lora_config(
    r: int = 32,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    layers: int | list[int] | None = None,
    fused_qkv: bool = True,
    **kwargs: Any,
) -> LoraConfig:
    """LoRA on the q and v slices of every encoder block's `attn.qkv`; `lora_alpha` defaults to `r` (scale 1).

    `layers`: only the `attn.qkv` of `vision_encoder.layers.<i>` for i in `layers` (a ViT block; a TinyViT stage;
    SAM 2: `vision_encoder.backbone.blocks.<i>`), as peft's `layers_to_transform` with `layers_pattern` matching
    either. peft ignores (and rejects) those with a regex `target_modules`, so the target becomes the name suffix
    `attn.qkv` (only SAM's image encoder has one; the decoders are `modules_to_save`, which peft never targets).
    Negative indices (from the end) need the model: `apply_method` resolves them; a plain `get_peft_model` would
    match no block for them.

    `modules_to_save` defaults to SAM's layout. peft's own LoRA tuner cannot translate it to SAM 2's prompt
    encoder (one `point_embed` Embedding), so for a SAM 2 pass `modules_to_save=default_modules_to_save(sam2)`
    (`apply_method` does), otherwise SAM 2's point embeddings would neither train nor be saved.

    `fused_qkv=False` (SAM 3's ViT, whose q, k and v are separate `attention.q_proj` / `k_proj` / `v_proj`
    Linears; `apply_method` sets it from the model): peft's plain LoRA on `attention.q_proj` and
    `attention.v_proj`, the same arithmetic (one A and one B per q and per v), saved and loaded as plain peft LoRA.
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be a positive int, got {r!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be a number in [0, 1), got {lora_dropout!r}")
    if not isinstance(fused_qkv, bool):
        raise TypeError(f"fused_qkv must be a bool, got {type(fused_qkv).__name__}")
    targets = ["attn.qkv"] if fused_qkv else list(SPLIT_QV)
    # no model here: negative indices stay as given (see the docstring)
    layers = check_layers(layers)
    if layers is not None:
        if "target_modules" in kwargs or "layers_to_transform" in kwargs:
            raise ValueError(
                "layers picks blocks of the default q/v target; with your own target_modules use peft's layers_to_transform"
            )
        kwargs.update(target_modules=targets, layers_to_transform=layers, layers_pattern=LAYERS_PATTERN)
    kwargs.setdefault("target_modules", encoder_regex(*targets))
    kwargs.setdefault("modules_to_save", default_modules_to_save())
    # alpha = r: peft's scale alpha / r is 1, as micro-sam's LoRASurgery, which adds B A x unscaled
    config = LoraConfig(r=r, lora_alpha=r if lora_alpha is None else lora_alpha, lora_dropout=lora_dropout, **kwargs)
    return register_qv_lora(config) if fused_qkv else config


def is_qv_lora_state(config: LoraConfig, shapes: Mapping[str, tuple[int, ...] | torch.Size]) -> bool:
    """Whether saved LoRA tensors (name → shape) come from q/v LoRA: `lora_A` of a qkv layer has 2r rows."""
    for name, shape in shapes.items():
        if ".qkv.lora_A" in name and name.endswith("weight"):
            # plain LoRA on attn.qkv has r rows here; the first qkv tensor decides for the whole adapter
            return int(shape[0]) == 2 * config.r
    return False
