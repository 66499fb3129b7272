"""Options that make a training step cheaper without changing what it computes.

Each option is a switch with a documented default, declared once in :class:`EfficiencyOptions` (the training
arguments' speed fields are generated from it); named presets: :meth:`EfficiencyOptions.plain` turns them all off
(the reference path), :meth:`~EfficiencyOptions.default` (the defaults) and :meth:`~EfficiencyOptions.low_memory`
(the memory-saving side of each trade below). Measured on ViT-B, 1024², 2 CPU cores in ``benchmarks/RESULTS.md``; each has a CPU
correctness test (loss and gradients within tolerance of the plain path) in
``tests/training/test_efficiency.py``.

- ``autocast_dtype``: bf16 autocast around the forward ("auto": where the device runs bf16 natively and
  faster than float32: a CUDA GPU with bf16, a CPU with AMX, or an AVX512-BF16 CPU where a one-off GEMM
  timing says so, :func:`hf_sam_peft.sam_forward.precision.fast_autocast_dtype`). Losses stay float32 (``losses.py`` casts).
- ``encoder_attention``: the encoder's attention kernel: "fused" (default; SAM's relative-position bias
  folded into queries and keys so that one maskless SDPA call, the flash kernel, does forward and backward:
  :mod:`hf_sam_peft.modeling.attention`; on CPU its backward keeps the unwidened operands, 0.57 GiB fewer saved
  activations for ViT-B in float32), "eager" (materialises the ``N x N`` bias and weights) or "sdpa"
  (transformers': the bias as a mask, which sends training to the slow math kernel); None: the model's.
- ``encoder_key_tile``: (fused attention, CPU) the side of the square key tiles a global block's
  attention is cut into: each tile needs only its own rows' and columns' bias terms, so its flash call runs at
  head size 64 + 2 x side instead of 64 + 64 + 64, and the tiles' outputs are merged by their log-sum-exps
  (default 32; None: one call over all keys).
- ``decoder_attention``: the mask decoder's attention kernel; "auto" (default): eager on CPU, where its
  attentions (4096 image tokens x a few prompt tokens) run faster as two small matmuls than as the flash
  kernel, and the model's own (sdpa) elsewhere.
- ``fuse_decoder_projections``: the mask decoder's two-way transformer projects the image tokens once per
  layer (key and value of the token→image attention and query of the image→token attention as one matmul)
  and adds the projected positional embedding after the projection (linearity) instead of forming
  ``keys + positions`` twice per layer at full width: :mod:`hf_sam_peft.modeling.mask_decoder`. The projected
  positional embedding (the same for every object and round) is computed once per training step
  (``shared_position_shifts``; not with ``checkpoint_rounds``, whose recomputation runs after the step's forward).
- ``contiguous_layout``: the encoder's patch embedding (a permuted view whose channel is the slowest
  dimension, inherited by the whole residual stream) and the decoder-side convolutions (channels-last under
  CPU bf16 autocast) hand on contiguous outputs, so the elementwise ops after them stay vectorised:
  :mod:`hf_sam_peft.modeling.layout`.
- ``retain_freed_memory``: (CPU, glibc) freed activations stay in the process's heap for the next step
  instead of being returned to the OS and page-faulted in again (process-wide, see
  :func:`hf_sam_peft.training.cpu_runtime.retain_freed_memory`).
- ``flush_denormals``: (CPU) denormal floats (below 1.2e-38, e.g. tails of softmax and GELU derivatives)
  are flushed to zero on every thread torch computes with, instead of taking the CPU's slow microcode path
  (process-wide, see :func:`hf_sam_peft.training.cpu_runtime.flush_denormals`).
- ``checkpoint_encoder``: activation checkpointing of the encoder blocks (recomputed in backward; only when
  the encoder has trainable parameters). "auto" (default): on where the step's activations can only be float32,
  a CPU without native bf16 (AVX2; :func:`resolve_checkpoint_encoder`), off elsewhere.
- ``encoder_mlp_recompute``: (SAM's ViT, encoder not checkpointed) the MLPs' 4x-wide activations are rebuilt in
  backward instead of kept: "activation" the GELU output from its input, "hidden" also that input from the
  block's (one more matmul per block). "auto" (default): "hidden" for float32 CPU steps (no AMX), where the
  activations are float32, off elsewhere (:func:`resolve_mlp_recompute`; :mod:`hf_sam_peft.modeling.mlp`).
- ``backward_per_round``: each prompt round's loss is differentiated as soon as the round is done (into
  the decoder-side parameters and the image embeddings) and its graph freed; the encoder's backward runs
  once, from the summed embedding gradient, when the training loop calls ``loss.backward()``. One round's
  graph is alive at a time and nothing is recomputed. Needs no loss scaling, so fp16 autocast falls back
  to ``checkpoint_rounds``.
- ``checkpoint_rounds``: (when ``backward_per_round`` is off or cannot apply) each prompt round's decoder
  call, upsampling to input size and loss are recomputed in backward instead of kept: the 8 rounds'
  decoder graphs and full-size masks otherwise stay alive until backward.
- ``frozen_encoder_no_grad``: an encoder without trainable parameters runs under ``no_grad`` (no graph).
- ``cache_embeddings``: with a frozen encoder, embeddings are reused for identical pixel values (keyed by
  a hash of the image tensor, so augmented images are never confused).

SAM 2 (``Sam2Model``): the options that act on SAM's own modules leave SAM 2's alone and change nothing there:
``encoder_attention`` and ``encoder_mlp_recompute`` (SAM's ViT modules; Hiera's stay transformers'), ``fuse_decoder_projections``
(``SamTwoWayTransformer`` only) and ``checkpoint_encoder`` (transformers 5.24's ``Sam2VisionModel`` declares no
gradient-checkpointing support: a warning, and the encoder runs without it). The others apply as for SAM;
with a frozen vision encoder the mask decoder's ``conv_s0`` / ``conv_s1`` (and ``no_memory_embedding``) still
run with their graph (:func:`encoder_embeddings`).

Not options here because they are already what we do: the encoder runs once per batch and its embedding is
shared by all rounds. Adapters in the last ``k`` blocks only are a *method* change (the paper's suggestion),
every encoder tuner's ``layers`` option (``apply_method(model, "lora", layers=[-2, -1])``, or
:func:`last_blocks_overrides`); backward then stops at block ``L - k``: nothing below it requires grad, so
autograd records no graph and keeps no activation there. :func:`prepare_model` removes the one thing that
would force a graph through the frozen blocks, an input-requires-grad hook on the patch embedding.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections import OrderedDict
from contextlib import nullcontext
import typing
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, Callable, ContextManager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.models.sam.modeling_sam import (
    SAM_VISION_ATTENTION_CLASSES,
    SamVisionAttention,
)

from hf_sam_peft.modeling.attention import DEFAULT_KEY_TILE, SamVisionFusedAttention
from hf_sam_peft.sam_forward.forward import embeddings_from_features, encode_images, unwrap_sam, vision_features
from hf_sam_peft.sam_forward.kinds import ImageEmbeddings, map_embeddings, stack_embeddings, unstack_embeddings
from hf_sam_peft.sam_forward.precision import fast_autocast_dtype, native_autocast_dtype
from hf_sam_peft.methods import get_method
from hf_sam_peft.modeling.layout import set_contiguous_layout
from hf_sam_peft.modeling.mask_decoder import set_decoder_projections
from hf_sam_peft.modeling.mlp import set_mlp_recompute
from hf_sam_peft.training import cpu_runtime  # called as cpu_runtime.<name>: patchable, as the demo's tests do
from hf_sam_peft.tuners import FreezeEncoderConfig

logger = logging.getLogger(__name__)
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
ATTENTION_KINDS = ("fused", "sdpa", "eager")
DECODER_ATTENTION_KINDS = ("auto", "sdpa", "eager")
MLP_RECOMPUTE_KINDS = ("auto", "activation", "hidden")


def checkpoint_option(value: bool | str) -> bool | str:
    """``checkpoint_encoder`` from a bool or a command-line string ("true" / "false" / "auto", any case)."""
    if isinstance(value, bool):
        return value
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False, "auto": "auto"}
    if not isinstance(value, str) or value.lower() not in words:
        raise ValueError(f"checkpoint_encoder must be true, false or 'auto', got {value!r}")
    return words[value.lower()]


def none_option(value: str | None) -> str | None:
    """A ``str | None`` option from the command line, where None can only be spelt: "none" / "off" (any case) -> None."""
    return None if isinstance(value, str) and value.lower() in ("none", "off") else value


def _key_tile_argument(value: int | None) -> int | None:
    """``encoder_key_tile`` from the command line: HfArgumentParser parses ``int | None`` as an int, so 0 spells None."""
    return None if value == 0 else value


def option(default: Any, plain: Any, help: str, argument_type: Any = None,
           parse: Callable[[Any], Any] | None = None) -> Any:
    """An :class:`EfficiencyOptions` field, declared once: its default, its value in :meth:`EfficiencyOptions.plain`,
    the one-line ``help`` the training arguments show, and (optional) how a training argument spells it:
    ``argument_type`` (the field's type there, where HfArgumentParser cannot parse the option's own) and
    ``parse`` (argument value -> option value, e.g. "none" -> None)."""
    return field(default=default, metadata={"plain": plain, "help": help, "argument_type": argument_type, "parse": parse})


@dataclass(frozen=True)
class EfficiencyOptions:
    """How a training step is executed (never what it computes). Defaults: the fast, lean path.

    Each option is declared here once (:func:`option`); ``InteractiveTrainingArguments`` gets one field per
    option from these declarations (:func:`argument_fields`) and turns them back into options with
    :func:`options_from_arguments`, so a new option is one field here plus its use. Named presets:
    :data:`PRESETS` (:meth:`plain`, :meth:`default`, :meth:`low_memory`).
    """

    autocast_dtype: str | None = option(
        "auto", None, "bf16/fp16 autocast of the forward; 'auto': bf16 where native; None: off.", parse=none_option)
    # fused: the rel-pos bias folded into q/k, one maskless SDPA call (modeling/attention.py); a ViT-B global
    # block's forward + backward on 2 CPU cores: 0.72 s vs 2.13 s eager; "sdpa" takes the bias as a mask that
    # needs gradients and falls back to the math kernel (LoRA step 96 s vs 24 s eager, benchmarks/RESULTS.md)
    encoder_attention: str | None = option(
        "fused", None, "Encoder attention: fused (rel-pos bias inside one SDPA call), eager or sdpa.", parse=none_option)
    # a ViT-B global block's attention forward + backward, 2 CPU cores: float32 3.08 -> 2.17 s, bf16 without AMX
    # 2.74 -> 2.12 s, with AMX 1.02 -> 0.90 s (modeling/attention.py, DEFAULT_KEY_TILE)
    encoder_key_tile: int | None = option(
        DEFAULT_KEY_TILE, None, "Fused encoder attention on CPU: side of the key tiles (narrower flash calls); 0 or "
        "None: one call over all keys (0 is how the command line spells None).", parse=_key_tile_argument)
    # "auto": off where bf16 is native (with fused attention and per-round backward the trainable encoder's
    # activations fit: ViT-B LoRA on 2 CPU cores, AMX, 11.1 s / 4.4 GiB without, 13.1 s / 2.8 GiB with); on
    # where it is not (AVX2): the activations are float32, twice bf16's bytes (ViT-B, AVX2 cap, one run each:
    # Full FT peak 5.90 -> 3.51 GiB at CPU time 70.0 -> 70.4 s per step, LoRA 4.86 -> 2.93 GiB at 58.4 -> 64.4 s;
    # benchmarks/RESULTS.md). Not on AVX512-BF16 CPUs that train in float32 because it is faster
    # there: without AMX it cost LoRA 31% (26.9 -> 35.2 s). Turn it on for ViT-L/H or large batches.
    # (argument type str, not bool | str: HfArgumentParser would parse the field as a bool and reject "auto")
    checkpoint_encoder: bool | str = option(
        "auto", False, "Recompute the trainable encoder blocks in backward (less memory, slower): true, false, "
        "or auto (on for CPUs without native bf16).", argument_type=str, parse=checkpoint_option)
    # "auto": "hidden" for a float32 CPU step whose encoder is not checkpointed (no AMX: bf16 is not faster
    # there), else off. ViT-B encoder on 2 CPU cores without AMX, float32, graph / backward (one run
    # each): LoRA 1.68 -> 1.26 GiB at 10.0 -> 11.4 s; Full FT 2.38 -> 1.82 GiB ("activation", 13.3 ->
    # 14.0 s) or -> 1.26 GiB ("hidden", -> 14.5 s)
    encoder_mlp_recompute: str | None = option(
        "auto", None, "Rebuild the encoder MLPs' wide activations in backward (less memory): activation, hidden, "
        "or auto (hidden for float32 CPU steps without encoder checkpointing); None: keep them.", parse=none_option)
    checkpoint_rounds: bool = option(True, False, "Without backward_per_round: recompute rounds in backward.")
    backward_per_round: bool = option(
        True, False, "Differentiate each round's loss at once and free its graph (no recompute).")
    # eager on CPU: the decoder's attentions are 4096 image tokens x a handful of prompt tokens, where the
    # flash kernel's backward is 2-4x slower than two small matmuls; on GPUs the model's (sdpa) stays
    decoder_attention: str | None = option(
        "auto", None, "Mask decoder attention: auto (eager on CPU, else the model's), eager or sdpa.", parse=none_option)
    frozen_encoder_no_grad: bool = option(True, False, "Run a frozen encoder without a graph.")
    cache_embeddings: bool = option(False, False, "Frozen encoder: reuse embeddings of equal images.")
    # one decode round (ViT-B decoder, 4 objects, bf16 CPU) forward + backward: 390 -> 340 ms for the layout,
    # -> 320 ms with the fused projections; ViT-B encoder forward + backward 7.2 -> 6.0 s for the layout
    fuse_decoder_projections: bool = option(
        True, False, "Mask decoder: project the image tokens once per layer (exact, fewer passes).")
    contiguous_layout: bool = option(
        True, False, "Keep patch-embedding and decoder conv outputs contiguous (no slow mixed layouts).")
    # a ViT-B CPU step page-faults ~0.3-0.9 million pages (1-2 s) without it; the price is heap fragmentation:
    # peak RSS 0.2-0.5 GiB higher (LoRA, no AMX, float32; a lower mmap threshold trades time back for memory,
    # benchmarks/RESULTS.md)
    retain_freed_memory: bool = option(
        True, False, "CPU: let glibc keep freed memory for the next step (no page faults; process-wide).")
    # ViT-B Full FT CPU step, mean of 6: 11.78 -> 11.36 s (CPU time 22.7 -> 22.1 s); removes slow-backward spikes
    flush_denormals: bool = option(
        True, False, "CPU: flush denormal floats (< 1.2e-38) to zero on torch's threads (process-wide).")

    def __post_init__(self) -> None:
        if self.autocast_dtype not in (None, "auto", *AUTOCAST_DTYPES):
            raise ValueError(f"autocast_dtype must be None, 'auto' or one of {sorted(AUTOCAST_DTYPES)}, got {self.autocast_dtype!r}")
        if self.encoder_attention not in (None, *ATTENTION_KINDS):
            raise ValueError(f"encoder_attention must be None or one of {ATTENTION_KINDS}, got {self.encoder_attention!r}")
        if self.decoder_attention not in (None, *DECODER_ATTENTION_KINDS):
            raise ValueError(f"decoder_attention must be None or one of {DECODER_ATTENTION_KINDS}, got {self.decoder_attention!r}")
        if self.encoder_mlp_recompute not in (None, *MLP_RECOMPUTE_KINDS):
            raise ValueError(f"encoder_mlp_recompute must be None or one of {MLP_RECOMPUTE_KINDS}, got {self.encoder_mlp_recompute!r}")
        if self.checkpoint_encoder not in (True, False, "auto"):
            raise ValueError(f"checkpoint_encoder must be True, False or 'auto', got {self.checkpoint_encoder!r}")
        tile = self.encoder_key_tile
        if tile is not None and (not isinstance(tile, int) or isinstance(tile, bool) or tile < 1):
            raise ValueError(f"encoder_key_tile must be None or a positive int, got {tile!r}")
        hints = _option_types(type(self))
        for f in fields(self):
            if hints[f.name] is bool and not isinstance(getattr(self, f.name), bool):
                raise TypeError(f"{f.name} must be a bool, got {getattr(self, f.name)!r}")

    @classmethod
    def plain(cls, **changes: Any) -> "EfficiencyOptions":
        """Every option off (float32, no checkpointing, no caching): the reference's arithmetic and memory, plus
        ``changes`` (each field's ``plain`` value, :func:`option`)."""
        return cls(**{**{f.name: f.metadata["plain"] for f in fields(cls) if "plain" in f.metadata}, **changes})

    @classmethod
    def default(cls, **changes: Any) -> "EfficiencyOptions":
        """The defaults (the fast, lean path; some choices follow the device: "auto"), plus ``changes``."""
        return cls(**changes)

    @classmethod
    def low_memory(cls, **changes: Any) -> "EfficiencyOptions":
        """The defaults, but the memory-saving side of each documented time-for-memory trade: the trainable
        encoder checkpointed everywhere (``checkpoint_encoder``, "turn it on for ViT-L/H or large batches":
        ViT-B peak 5.90 -> 3.51 GiB on AVX2 for under 10% more CPU time, 4.4 -> 2.8 GiB with AMX for 18% more)
        and freed memory given back to the OS (``retain_freed_memory`` off: peak RSS 0.2-0.5 GiB lower, 1-2 s
        of page faults per ViT-B step). The defaults already take the memory-saving side where it costs no
        time: per-round backward (one round's graph alive), round checkpointing where that cannot apply, a
        frozen encoder without graph, fused attention (fewer saved activations), MLP recomputation for float32
        CPU steps whose encoder is not checkpointed, and no embedding cache (which would hold embeddings)."""
        return cls(**{"checkpoint_encoder": True, "retain_freed_memory": False, **changes})

    @classmethod
    def preset(cls, name: str, **changes: Any) -> "EfficiencyOptions":
        """The options of the preset called ``name`` (:data:`PRESETS`), plus ``changes``."""
        if name not in PRESETS:
            raise ValueError(f"speed_preset must be one of {PRESETS}, got {name!r}")
        return getattr(cls, name)(**changes)


PRESETS = ("plain", "default", "low_memory")
"""The named presets of :class:`EfficiencyOptions` (its classmethods of these names; ``speed_preset`` in the
training arguments)."""


@functools.cache
def _option_types(options_cls: type) -> dict[str, Any]:
    """The options' field types, resolved (this module's annotations are strings)."""
    return typing.get_type_hints(options_cls)


def argument_fields(options_cls: type = EfficiencyOptions) -> list[tuple[str, Any, Any]]:
    """``(name, type, field)`` of one training-argument field per option, for ``dataclasses.make_dataclass``.

    The type is the option's (or its ``argument_type``), the default the option's, the metadata only ``help``
    (HfArgumentParser passes a field's metadata on to argparse). Plus ``speed_preset``.
    """
    hints = _option_types(options_cls)
    out: list[tuple[str, Any, Any]] = [("speed_preset", str, field(default="default", metadata={
        "help": f"Speed options preset: {', '.join(PRESETS)}; a speed option set to other than its default wins."}))]
    for f in fields(options_cls):
        kind = f.metadata.get("argument_type") or hints[f.name]
        out.append((f.name, kind, field(default=f.default, metadata={"help": f.metadata.get("help", "")})))
    return out


def arguments_class(options_cls: type = EfficiencyOptions) -> type:
    """A dataclass with the fields of :func:`argument_fields`: the speed part of ``InteractiveTrainingArguments``
    (a base placed before ``TrainingArguments``, so its fields follow the Trainer's)."""
    return make_dataclass("SpeedArguments", argument_fields(options_cls))


def options_from_arguments(arguments: Any, options_cls: type = EfficiencyOptions) -> EfficiencyOptions:
    """The options of a training-arguments object (or any object with an attribute per option, and
    ``speed_preset``): each value as the argument spells it (``parse``), over the preset's, where it differs
    from the option's default (a value left at its default takes the preset's)."""
    preset = getattr(arguments, "speed_preset", "default")
    chosen = {}
    for f in fields(options_cls):
        parse = f.metadata.get("parse")
        value = getattr(arguments, f.name)
        value = parse(value) if parse is not None else value
        if value != f.default or isinstance(value, bool) is not isinstance(f.default, bool):
            chosen[f.name] = value
    return options_cls.preset(preset, **chosen)


def resolve_autocast_dtype(option: str | None, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for ``device`` (``"auto"``: bf16 where the hardware runs it natively and faster than
    float32, else None: :func:`hf_sam_peft.sam_forward.precision.fast_autocast_dtype`)."""
    device = torch.device(device)
    if option is None:
        return None
    if option != "auto":
        return AUTOCAST_DTYPES[option]
    return fast_autocast_dtype(device)


def resolve_checkpoint_encoder(option: bool | str, device: torch.device | str) -> bool:
    """``checkpoint_encoder`` for a step on ``device``: "auto" is on for a CPU without native bf16.

    There the step cannot use bf16 autocast (emulated bf16 is slower than float32), so the encoder's saved
    activations are float32; recomputing them in backward cut a ViT-B step's peak memory by 40% for at most a
    tenth more CPU time (``benchmarks/RESULTS.md``).
    """
    if option != "auto":
        return bool(option)
    device = torch.device(device)
    return device.type == "cpu" and native_autocast_dtype(device) is None


def resolve_mlp_recompute(options: EfficiencyOptions, device: torch.device | str) -> str | None:
    """``encoder_mlp_recompute`` for a step on ``device``: None wherever the encoder is checkpointed (that
    recomputes whole blocks); else "auto" is "hidden" where the step trains in float32 on a CPU (no native or
    no faster bf16)."""
    device = torch.device(device)
    if resolve_checkpoint_encoder(options.checkpoint_encoder, device):
        return None
    option = options.encoder_mlp_recompute
    if option != "auto":
        return option
    float32 = resolve_autocast_dtype(options.autocast_dtype, device) is None
    return "hidden" if device.type == "cpu" and float32 else None


def autocast_context(options: EfficiencyOptions | None, device: torch.device | str) -> ContextManager:
    """``torch.autocast`` for the step's forward, or a no-op context."""
    dtype = resolve_autocast_dtype(options.autocast_dtype, device) if options is not None else None
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


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
    are process-wide: :mod:`hf_sam_peft.training.cpu_runtime`).
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


class EmbeddingCache:
    """Outputs of a *frozen* vision encoder (:func:`~hf_sam_peft.sam_forward.vision_features`: SAM's image
    embedding, SAM 2's FPN maps), keyed by a hash of each image's pixel values (LRU, bounded)."""

    def __init__(self, max_items: int = 4096) -> None:
        if not isinstance(max_items, int) or max_items < 1:
            raise ValueError(f"max_items must be a positive int, got {max_items!r}")
        self.max_items = max_items
        self._store: OrderedDict[str, ImageEmbeddings] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    @staticmethod
    def key(image: torch.Tensor) -> str:
        data = image.detach().contiguous().cpu()
        digest = hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=16)
        digest.update(f"{tuple(data.shape)}{data.dtype}".encode())
        return digest.hexdigest()

    def get_or_compute(
        self, pixel_values: torch.Tensor, encode: Callable[[torch.Tensor], ImageEmbeddings]
    ) -> ImageEmbeddings:
        """``encode``'s output for the batch (``(B, C, h, w)``, or a list of such maps); images not seen before
        go through ``encode`` in one call."""
        keys = [self.key(image) for image in pixel_values]
        missing = [i for i, k in enumerate(keys) if k not in self._store]
        if missing:
            fresh = unstack_embeddings(encode(pixel_values[missing]))
            for i, emb in zip(missing, fresh):
                self._store[keys[i]] = map_embeddings(torch.Tensor.detach, emb)
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        out = []
        for k in keys:
            self._store.move_to_end(k)
            out.append(self._store[k])
        while len(self._store) > self.max_items:
            self._store.popitem(last=False)
        return stack_embeddings(out)


def encoder_embeddings(
    model: nn.Module,
    pixel_values: torch.Tensor,
    options: EfficiencyOptions | None = None,
    cache: EmbeddingCache | None = None,
) -> ImageEmbeddings:
    """The image embeddings of a batch (``encode_images``'s), with a graph only where the encoder trains.

    A frozen vision encoder runs under ``no_grad`` (and its outputs may be cached); what follows it in
    ``encode_images`` (SAM 2's ``conv_s0`` / ``conv_s1`` of the mask decoder and ``no_memory_embedding``,
    trained) always runs with its graph.
    """
    if options is None or not options.frozen_encoder_no_grad or encoder_is_trainable(unwrap_sam(model)):
        return encode_images(model, pixel_values)

    def encode(values: torch.Tensor) -> ImageEmbeddings:
        with torch.no_grad():
            return vision_features(model, values)

    if options.cache_embeddings and cache is not None:
        return embeddings_from_features(model, cache.get_or_compute(pixel_values, encode))
    return embeddings_from_features(model, encode(pixel_values))


def maybe_checkpoint(enabled: bool, fn: Callable[..., Any], *args: torch.Tensor) -> Any:
    """``fn(*args)``, recomputed in backward instead of kept when ``enabled`` and a graph is being built."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def last_blocks_overrides(method: str, n_layers: int, k: int) -> dict[str, Any]:
    """``apply_method`` overrides that put ``method``'s adapters in the last ``k`` of ``n_layers`` encoder blocks.

    The earlier blocks then hold no trainable parameter, so autograd keeps no graph for them and backward
    stops at block ``n_layers - k``. This changes the method (fewer adapted blocks): an opt-in, not a default.
    Example: ``apply_method(model, "lora", **last_blocks_overrides("lora", 12, 4))``, the same as
    ``apply_method(model, "lora", layers=[8, 9, 10, 11])``.
    """
    if not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
    if not isinstance(k, int) or not 1 <= k <= n_layers:
        raise ValueError(f"k must be an int in [1, {n_layers}], got {k!r}")
    if get_method(method).build in (None, FreezeEncoderConfig):
        raise ValueError(f"method {method!r} has no per-block encoder adapters to restrict")
    return {"layers": list(range(n_layers - k, n_layers))}


def optimizer_kwargs(device: torch.device | str, fused: bool = True) -> dict[str, Any]:
    """AdamW keyword arguments: the fused kernel where torch has it for ``device`` (CPU and CUDA)."""
    device = torch.device(device)
    return {"fused": True} if fused and device.type in ("cpu", "cuda") else {"foreach": False}


__all__ = [
    "PRESETS", "EfficiencyOptions", "EmbeddingCache", "argument_fields", "arguments_class", "autocast_context",
    "checkpoint_option", "drop_input_require_grads", "encoder_embeddings", "last_blocks_overrides", "maybe_checkpoint",
    "none_option", "option", "options_from_arguments", "optimizer_kwargs", "prepare_model",
    "resolve_autocast_dtype", "resolve_checkpoint_encoder", "resolve_mlp_recompute", "set_decoder_attention", "set_encoder_attention",
]
