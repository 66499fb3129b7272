"""How a training step runs cheaper without changing what it computes: the speed options, in one package.

Where each part lives: :mod:`.options` declares the options once (:class:`EfficiencyOptions`, its presets and
the training arguments generated from it); :mod:`.resolve` turns the device-dependent "auto" choices into
values; :func:`prepare_model` (:mod:`.prepare`) is the one function that applies the model-side options;
:mod:`.encoder` runs the image encoder (no graph when frozen, an embedding cache); :mod:`.rounds` says how
the prompt rounds of the interactive objective are executed (graphs kept, recomputed, or differentiated per
round; the loop itself is :func:`hf_sam_peft.training.interactive.iterative_rounds`); :mod:`.cpu_runtime`
holds the process-wide CPU settings; :func:`optimizer_kwargs` the fused AdamW choice. The kernels sit with the
modules they replace, one module each: :mod:`hf_sam_peft.modeling.attention` (fused encoder attention),
:mod:`hf_sam_peft.modeling.mlp` (MLP recomputation), :mod:`hf_sam_peft.modeling.layout` (contiguous layout),
:mod:`hf_sam_peft.modeling.mask_decoder` (fused decoder projections), :mod:`hf_sam_peft.modeling.private_ops`
(torch's private flash operators) and :mod:`hf_sam_peft.training.losses` (the row-wise Dice sums).

The options. Each option is a switch with a documented default, declared once in :class:`EfficiencyOptions` (the training
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
  :func:`hf_sam_peft.speed.cpu_runtime.retain_freed_memory`).
- ``flush_denormals``: (CPU) denormal floats (below 1.2e-38, e.g. tails of softmax and GELU derivatives)
  are flushed to zero on every thread torch computes with, instead of taking the CPU's slow microcode path
  (process-wide, see :func:`hf_sam_peft.speed.cpu_runtime.flush_denormals`).
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
every method's ``layers`` option (``apply_method(model, "lora", layers=[-2, -1])``, ``methods --last-k K``);
backward then stops at block ``L - k``: nothing below it requires grad, so autograd records no graph and keeps no activation there. :func:`prepare_model` removes the one thing that
would force a graph through the frozen blocks, an input-requires-grad hook on the patch embedding.
"""

from __future__ import annotations

from hf_sam_peft.speed.encoder import EmbeddingCache, encoder_embeddings, maybe_checkpoint
from hf_sam_peft.speed.optimizer import optimizer_kwargs
from hf_sam_peft.speed.options import (
    AUTOCAST_DTYPES,
    PRESETS,
    EfficiencyOptions,
    argument_fields,
    arguments_class,
    checkpoint_option,
    none_option,
    option,
    options_from_arguments,
)
from hf_sam_peft.speed.prepare import (
    drop_input_require_grads,
    encoder_is_trainable,
    prepare_model,
    set_decoder_attention,
    set_encoder_attention,
)
from hf_sam_peft.speed.resolve import (
    autocast_context,
    resolve_autocast_dtype,
    resolve_checkpoint_encoder,
    resolve_mlp_recompute,
)
from hf_sam_peft.speed.rounds import (
    BackwardPerRound,
    CheckpointedRounds,
    KeptGraphs,
    RoundExecution,
    accumulate_gradients,
    round_execution,
)

__all__ = [
    "AUTOCAST_DTYPES", "PRESETS", "BackwardPerRound", "CheckpointedRounds", "EfficiencyOptions", "EmbeddingCache",
    "KeptGraphs", "RoundExecution", "accumulate_gradients", "argument_fields", "arguments_class", "autocast_context",
    "checkpoint_option", "drop_input_require_grads", "encoder_embeddings", "encoder_is_trainable", "maybe_checkpoint",
    "none_option", "option", "options_from_arguments", "optimizer_kwargs", "prepare_model", "resolve_autocast_dtype",
    "resolve_checkpoint_encoder", "resolve_mlp_recompute", "round_execution", "set_decoder_attention",
    "set_encoder_attention",
]
