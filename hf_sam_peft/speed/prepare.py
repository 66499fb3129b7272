"""The one function that applies the model-side speed options to a model (:func:`prepare_model`), and the
switches it is made of."""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.models.sam.modeling_sam import (
    SAM_VISION_ATTENTION_CLASSES,
    SamVisionAttention,
)

from hf_sam_peft.modeling.attention import DEFAULT_KEY_TILE, SamVisionFusedAttention
from hf_sam_peft.modeling.layout import set_contiguous_layout
from hf_sam_peft.modeling.mask_decoder import set_decoder_projections
from hf_sam_peft.modeling.mlp import set_mlp_recompute
from hf_sam_peft.sam_forward.forward import unwrap_sam
from hf_sam_peft.speed import cpu_runtime  # called as cpu_runtime.<name>: patchable, as the demo's tests do
from hf_sam_peft.speed.options import ATTENTION_KINDS, DECODER_ATTENTION_KINDS, EfficiencyOptions
from hf_sam_peft.speed.resolve import resolve_checkpoint_encoder, resolve_mlp_recompute

logger = logging.getLogger(__name__)


def encoder_is_trainable(sam: nn.Module) -> bool:
    return any(p.requires_grad for p in sam.vision_encoder.parameters())


def set_encoder_attention(sam: nn.Module, kind: str, key_tile: int | None = DEFAULT_KEY_TILE) -> int:
    """Switch every encoder attention module to ``kind`` ("fused", "sdpa" or "eager"); returns how many were switched.

    transformers picks the class at construction; the SDPA class only overrides ``forward`` (same
    parameters), so switching the class of the existing modules is exact. ``key_tile``: the fused modules'
    key tile side (``SamVisionFusedAttention.key_tile``).
    """
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"kind must be one of {ATTENTION_KINDS}, got {kind!r}")
    target = SamVisionFusedAttention if kind == "fused" else SAM_VISION_ATTENTION_CLASSES[kind]
    switched = 0
    for module in sam.vision_encoder.modules():
        if isinstance(module, SamVisionAttention) and type(module) is not target:
            # the class is swapped in place: parameters, buffers and submodules (peft's injected qkv layers) stay
            module.__class__ = target
            switched += 1
        if isinstance(module, SamVisionFusedAttention):
            module.key_tile = key_tile
    return switched


def set_decoder_attention(sam: nn.Module, kind: str, device: torch.device | str | None = None) -> None:
    """Switch the mask decoder's attention: "sdpa", "eager", or "auto" (eager on CPU, else unchanged).

    ``device``: where the model will run (default: where the decoder's parameters are now). The decoder's
    ``SamAttention`` modules look their kernel up in their (shared) config at every call.
    """
    if kind not in DECODER_ATTENTION_KINDS:
        raise ValueError(f"kind must be one of {DECODER_ATTENTION_KINDS}, got {kind!r}")
    if kind == "auto":
        device = torch.device(device) if device is not None else next(sam.mask_decoder.parameters()).device
        if device.type != "cpu":
            return
        kind = "eager"
    sam.mask_decoder.config._attn_implementation = kind


def prepare_model(model: nn.Module, options: EfficiencyOptions, device: torch.device | str | None = None) -> nn.Module:
    """Apply the model-side options (kernels, decoder fusion, encoder checkpointing) in place; returns ``model``.

    ``device``: where the model will run, for the "auto" choices (default: where its parameters are now).
    ``retain_freed_memory`` and ``flush_denormals`` are applied here too when that device is a CPU (they
    are process-wide: :mod:`hf_sam_peft.speed.cpu_runtime`).
    """
    sam = unwrap_sam(model)
    run_on = torch.device(device) if device is not None else next(sam.parameters()).device
    if options.encoder_attention is not None:
        set_encoder_attention(sam, options.encoder_attention, options.encoder_key_tile)
    if options.decoder_attention is not None:
        set_decoder_attention(sam, options.decoder_attention, run_on)
    set_decoder_projections(sam, fused=options.fuse_decoder_projections)
    set_contiguous_layout(sam, enabled=options.contiguous_layout)
    if options.retain_freed_memory and run_on.type == "cpu":
        cpu_runtime.retain_freed_memory()
    if options.flush_denormals and run_on.type == "cpu":
        cpu_runtime.flush_denormals()
    encoder = sam.vision_encoder
    checkpointable = getattr(encoder, "supports_gradient_checkpointing", False)
    checkpoint_encoder = resolve_checkpoint_encoder(options.checkpoint_encoder, run_on)
    if checkpoint_encoder and encoder_is_trainable(sam) and not checkpointable:
        # transformers' Sam2VisionModel declares no gradient-checkpointing support (transformers 5.24)
        logger.warning("checkpoint_encoder: %s does not support gradient checkpointing; the encoder runs without it",
                       type(encoder).__name__)
    elif checkpoint_encoder and encoder_is_trainable(sam):
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # frozen blocks below the adapted ones (`layers`) build no graph: nothing to recompute, and the
        # checkpoint wrapper would only hold their inputs for the length of the call
        for block in encoder.layers:
            if not any(p.requires_grad for p in block.parameters()):
                for module in block.modules():
                    if hasattr(module, "gradient_checkpointing"):
                        module.gradient_checkpointing = False
    elif getattr(encoder, "gradient_checkpointing", False):
        encoder.gradient_checkpointing_disable()
    recompute = resolve_mlp_recompute(options, run_on)
    set_mlp_recompute(encoder, enabled=recompute is not None, recompute_hidden=recompute == "hidden")
    drop_input_require_grads(sam)  # last: enabling checkpointing may add such hooks
    return model


def drop_input_require_grads(sam: nn.Module) -> int:
    """Remove transformers' ``enable_input_require_grads`` hooks from SAM; returns how many were removed.

    peft's ``PeftModel`` adds them when the model already has gradient checkpointing on (and transformers
    when checkpointing a model with a peft config loaded): they make the patch embedding's output require
    grad, for LLMs whose frozen embeddings would otherwise cut the graph of reentrant checkpointing. SAM's
    input is pixels, our checkpointing is non-reentrant, and with such a hook autograd would keep a graph and
    the activations of every frozen block below the first adapted one (``layers``).
    """
    removed = 0
    for module in sam.modules():
        for hook in getattr(module, "_require_grads_hooks", None) or []:
            hook.remove()
            removed += 1
        if hasattr(module, "_require_grads_hooks"):
            module._require_grads_hooks = []
            if hasattr(module, "_require_grads_hook"):
                del module._require_grads_hook
    return removed


