"""The speed options, declared once: :class:`EfficiencyOptions`, its named presets, and the training arguments
generated from it (what each option does: :mod:`hf_sam_peft.speed`)."""

from __future__ import annotations

import functools
import typing
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, Callable

import torch

from hf_sam_peft.modeling.attention import DEFAULT_KEY_TILE

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


