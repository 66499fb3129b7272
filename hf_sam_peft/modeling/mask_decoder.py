"""SAM's mask decoder where our arithmetic differs from transformers': the one module that overrides it.

transformers' ``SamMaskDecoder`` / ``SamTwoWayTransformer`` / ``SamAttention`` stay the model (parameters,
state dict, LayerNorms, MLPs, self-attention, kernels); the functions here re-run parts of their forwards in
another order, with the same modules. Two paths use them:

- **training** (:class:`SamFusedTwoWayTransformer`, switched on by ``hf_sam_peft.speed``'s
  ``fuse_decoder_projections`` through :func:`set_decoder_projections`; :func:`shared_position_shifts` around a
  training step, ``training.interactive``): gradients flow as through transformers' forward;
- **evaluation** (``hf_sam_peft.evaluation.fast_decoder``, no gradients): its per-image cache
  (``ImageTokens``), object grouping and precision policy are evaluation's; every piece of decoder arithmetic
  it runs is one of the public functions below.

Where an override cannot apply (:func:`overrides_apply`: an adapter wraps an attention projection, e.g. LoRA
on the decoder, or transformers' modules lack an attribute read here) both paths take transformers' forward.
``tests/modeling/test_mask_decoder.py`` checks each path against transformers' ``SamModel`` forward (points,
boxes, mask inputs; single- and multimask) to float32 rounding; the overrides were checked against
transformers :data:`CHECKED_TRANSFORMERS` (:func:`transformers_checked` warns once on another version).

Training: the image stream projected once per layer
---------------------------------------------------
In the mask decoder every image token (4096 per object at 1024²) flows through two cross attentions per layer.
transformers' ``SamTwoWayTransformer`` forms ``keys + positional_embedding`` twice per layer (once per cross
attention) and then runs three separate 256 → 128 projections over the image tokens (key and value of the
token→image attention, query of the image→token attention). Under autocast each projection also casts its
float32 input to bf16 on its own. On a CPU these full-width adds and casts, not the matmuls, are what the
decoder spends its time on (memory bandwidth), and the prompt rounds repeat them 8 times per step.

Projections are linear, so ``W(keys + pos) + b = (W keys + b) + W pos``. :func:`two_way_layer` projects
``keys`` once per layer with the three weights stacked (one cast, one matmul) and adds the projected positional
embedding (half as wide, and the same for every round's prompts) to the key and query parts. The token side, the
attention kernels, the residuals and the LayerNorms are transformers' own modules, called as before.

The projected positional embedding depends only on the projection weights and SAM's image-wide positional
encoding (a fixed Fourier basis: a buffer in SAM, a parameter our methods freeze in transformers), so it is the
same for every object and every prompt round of a training step. Within :func:`shared_position_shifts` (the
training step) it is projected once, for one image, and broadcast over objects and rounds: per ViT-B step with
4 objects and 8 rounds that drops 24 projections of 16,384 tokens (forward and weight gradient) and the 24
copies of the positions they saved for backward (decoder rounds alone, ViT-B LoRA decoder, float32: 5.02 / 5.15 s
shared vs 5.39 / 5.64 s per call, ``benchmarks/RESULTS.md``).

Evaluation: nothing per image token that a few prompt tokens can carry
----------------------------------------------------------------------
An attention between T prompt tokens and N image tokens needs ``W x`` only inside ``q . W x`` and ``P W x``, so
the projection moves onto the tokens (``(q W) . x``, ``(P x) W^T``; :func:`folded_scores`, :func:`attend_image`),
and the image->token output projection onto the tokens' values (:func:`attend_few_keys_output`). With T <= 16
tokens (SAM's 8 heads of 16) that is fewer multiply-adds and no ``(N, c)`` tensors written and read back. The
mask head (:func:`mask_head`) runs the hypernetwork MLPs and the mask product only for the mask tokens that are
returned (1 of 4 for single-mask output), with the upscaling in the convolutions' channels-last layout. The order
of the arithmetic differs from transformers' (float32 results agree to rounding).

Every override of transformers' behaviour, and why (:data:`OVERRIDES`, in code order):

- :class:`SamFusedTwoWayTransformer` ``.forward`` (``SamTwoWayTransformer.forward``), with :func:`two_way_layer`
  (``SamTwoWayAttentionBlock.forward``) and :func:`final_token_to_image` (the final token->image attention):
  speed, one stacked projection and one autocast cast of the image tokens per layer instead of three, positions
  projected instead of added at full width; image tokens made contiguous once;
- :func:`shared_position_shifts` / :class:`PositionShifts` (the per-call ``keys + positions`` projections):
  speed and memory, the positional projections once per training step (numbers above);
- :func:`attend_projected` (``SamAttention.forward`` after its projections): lets the callers above pass
  operands projected together; the same ``ALL_ATTENTION_FUNCTIONS`` kernel as transformers;
- :func:`folded_scores`, :func:`attend_image` (evaluation's token->image attentions, and the image->token
  scores): speed, image-side projections folded into the few tokens; scores in float32 under autocast;
- :func:`attend_few_keys`, :func:`attend_few_keys_output` (evaluation's image->token attention): speed, the
  softmax along an axis the CPU kernel vectorises, the output projection folded into the values;
- :func:`folded_two_way_layer`, :func:`folded_final_token_to_image` (``SamTwoWayAttentionBlock.forward`` and the
  final attention without projecting image tokens): speed, the two above composed as transformers' steps;
- :func:`mask_head` (``SamMaskDecoder.forward`` after the transformer): speed, returned masks only, channels-last;
- :func:`channels_last_call` (the training layout hook on ``upscale_conv2``, in evaluation): speed, measured on
  LiteMedSAM (demo tile, 16 boxes, 1 thread): 0.30 s per decode without the hook, 0.58 s with it.
"""

from __future__ import annotations

import contextlib
import functools
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.sam.modeling_sam import (
    SamAttention,
    SamMaskDecoder,
    SamTwoWayTransformer,
    eager_attention_forward,
)

from hf_sam_peft.modeling.layout import contiguous_output

__all__ = [
    "CHECKED_TRANSFORMERS", "OVERRIDES", "Override", "PositionShifts", "SamFusedTwoWayTransformer", "SharedPositions",
    "attend_few_keys", "attend_few_keys_output", "attend_image", "attend_projected", "channels_last_call",
    "decoder_overrides_apply", "final_token_to_image", "folded_final_token_to_image", "folded_scores",
    "folded_two_way_layer", "head_addend", "head_split", "image_attentions", "image_operands", "mask_head",
    "overrides_apply", "plain_projections", "project", "set_decoder_projections", "shared_position_shifts",
    "token_layout", "token_self_attention", "transformers_checked", "two_way_layer",
]

# transformers releases whose SAM decoder modules these overrides were checked against (the equality tests of
# tests/modeling/test_mask_decoder.py and tests/evaluation/test_fast_eval.py pass); compared by major.minor
CHECKED_TRANSFORMERS = ("5.25.0",)


class Override(NamedTuple):
    """One override: our function or class, the transformers behaviour it replaces, and why."""

    name: str
    replaces: str
    reason: str


OVERRIDES: tuple[Override, ...] = (
    Override("SamFusedTwoWayTransformer", "SamTwoWayTransformer.forward",
             "speed: image tokens projected once per layer (stacked weights, one autocast cast), contiguous once"),
    Override("two_way_layer", "SamTwoWayAttentionBlock.forward",
             "speed: one projection of the image tokens for both cross attentions, positions added projected"),
    Override("final_token_to_image", "SamTwoWayTransformer.forward (final token->image attention)",
             "speed: key and value of the image tokens in one projection"),
    Override("shared_position_shifts", "per-call projection of keys + positional encoding",
             "speed and memory: positions projected once per training step, broadcast over objects and rounds"),
    Override("attend_projected", "SamAttention.forward after its q/k/v projections",
             "lets callers pass operands projected together; transformers' attention kernel"),
    Override("folded_scores", "SamAttention.forward scores over image-side keys",
             "speed: image-side projection folded into the few token queries; float32 scores under autocast"),
    Override("attend_image", "SamAttention.forward (token->image, evaluation)",
             "speed: key and value projections folded into the few token queries"),
    Override("attend_few_keys", "SamAttention.forward (image->token, evaluation, layer 0)",
             "speed: scores of few keys per head, then attend_few_keys_output"),
    Override("attend_few_keys_output", "SamAttention.forward softmax, P V and out_proj (image->token)",
             "speed: softmax on a vectorised axis, out_proj folded into the few values"),
    Override("folded_two_way_layer", "SamTwoWayAttentionBlock.forward (evaluation)",
             "speed: no projection of the image tokens (folded attentions)"),
    Override("folded_final_token_to_image", "SamTwoWayTransformer.forward (final attention, evaluation)",
             "speed: no projection of the image tokens (attend_image)"),
    Override("mask_head", "SamMaskDecoder.forward after the transformer (evaluation)",
             "speed: hypernetwork MLPs and mask product for the returned mask tokens only, channels-last upscaling"),
    Override("channels_last_call", "the contiguous-layout hook on upscale_conv2 (evaluation)",
             "speed: LiteMedSAM demo tile, 16 boxes, 1 thread: 0.30 s per decode without the hook, 0.58 s with it"),
)

# transformers' attributes (besides parameters) that the overrides read; where one is missing, overrides_apply
# is False and the callers take transformers' forward
_ATTENTION_ATTRS = ("q_proj", "k_proj", "v_proj", "out_proj", "num_attention_heads", "scaling", "is_causal",
                    "config", "_separate_heads", "_recombine_heads")
_LAYER_ATTRS = ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token", "mlp", "skip_first_layer_pe",
                "layer_norm1", "layer_norm2", "layer_norm3", "layer_norm4")
_TRANSFORMER_ATTRS = ("layers", "final_attn_token_to_image", "layer_norm_final_attn")
_DECODER_ATTRS = ("transformer", "iou_token", "mask_tokens", "num_mask_tokens", "upscale_conv1", "upscale_conv2",
                  "upscale_layer_norm", "activation", "output_hypernetworks_mlps", "iou_prediction_head")


def _major_minor(version: str) -> tuple[int, ...]:
    # digits only, so "5.25.0.dev0" and "5.25.1" compare as (5, 25): patch and dev releases of a checked minor pass
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


@functools.cache
def transformers_checked() -> bool:
    """Whether the installed transformers is a :data:`CHECKED_TRANSFORMERS` release (major.minor); warns once if
    not. Only a warning: the attribute check of :func:`overrides_apply` is the fallback, the equality tests the
    proof."""
    installed = transformers.__version__
    if _major_minor(installed) in {_major_minor(v) for v in CHECKED_TRANSFORMERS}:
        return True
    warnings.warn(
        f"transformers {installed}: hf_sam_peft.modeling.mask_decoder's decoder overrides were checked against "
        f"{', '.join(CHECKED_TRANSFORMERS)}; run tests/modeling/test_mask_decoder.py to check this release",
        RuntimeWarning, stacklevel=2,
    )
    return False


def _has(module: nn.Module, names: Sequence[str]) -> bool:
    return all(hasattr(module, name) for name in names)


def image_attentions(transformer: SamTwoWayTransformer) -> list[SamAttention]:
    """The cross attentions of ``transformer`` that see the image tokens (those the overrides project or fold)."""
    attentions = [transformer.final_attn_token_to_image]
    for layer in transformer.layers:
        attentions += [layer.cross_attn_token_to_image, layer.cross_attn_image_to_token]
    return attentions


def plain_projections(*modules: SamAttention) -> bool:
    """True when every projection is a plain ``nn.Linear`` (not an adapter wrapper whose ``weight`` is not all)."""
    # `type(...) is`, not isinstance: project() reads `.weight` directly, which is not the layer's map for a wrapper
    # (peft's LoRA layer) nor for an nn.Linear subclass holding quantised weights (bitsandbytes' Linear8bitLt)
    return all(type(getattr(m, name)) is nn.Linear for m in modules for name in ("q_proj", "k_proj", "v_proj"))


def overrides_apply(transformer: nn.Module) -> bool:
    """Whether the overrides reproduce ``transformer``: a ``SamTwoWayTransformer`` (ours included) with every
    attribute they read and plain ``nn.Linear`` image-side projections. Else callers use transformers' forward."""
    transformers_checked()
    if not isinstance(transformer, SamTwoWayTransformer) or not _has(transformer, _TRANSFORMER_ATTRS):
        return False
    layers = list(transformer.layers)
    attentions = [transformer.final_attn_token_to_image] + [
        # getattr with a default: this list is built before the per-layer attribute check below has run
        getattr(layer, name, None) for layer in layers for name in ("self_attn", "cross_attn_token_to_image",
                                                                     "cross_attn_image_to_token")]
    if not all(_has(layer, _LAYER_ATTRS) for layer in layers) or not all(
            a is not None and _has(a, _ATTENTION_ATTRS) for a in attentions):
        return False
    return plain_projections(*image_attentions(transformer))


def decoder_overrides_apply(decoder: nn.Module) -> bool:
    """:func:`overrides_apply` for a whole mask decoder, mask head included: transformers' ``SamMaskDecoder``
    itself (not a subclass such as SAM-HQ's, nor SAM 2's decoder: their heads differ)."""
    return type(decoder) is SamMaskDecoder and _has(decoder, _DECODER_ATTRS) and overrides_apply(decoder.transformer)


def project(hidden: torch.Tensor, linears: Sequence[nn.Linear], bias: bool = True) -> tuple[torch.Tensor, ...]:
    """``linear(hidden)`` for each of ``linears`` as one matmul over their stacked weights (views of one output)."""
    # cat per call (weights are small: 3 x 128 x 256 in SAM's decoder), so gradients reach each Linear's own weight and
    # bias through the cat; the split outputs are views of one tensor, which callers only read (no in-place ops)
    weight = torch.cat([linear.weight for linear in linears])
    stacked_bias = torch.cat([linear.bias for linear in linears]) if bias else None
    out = F.linear(hidden, weight, stacked_bias)
    return out.split([linear.out_features for linear in linears], dim=-1)


def attend_projected(module: SamAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_similarity: torch.Tensor | None, **kwargs: Any) -> torch.Tensor:
    """``SamAttention.forward`` from already projected ``(B, P, tokens, internal_dim)`` query, key and value."""
    # read before _separate_heads folds the point batch into the batch axis, as SamAttention.forward does
    point_batch_size = query.shape[1]
    heads = module.num_attention_heads
    query, key, value = (module._separate_heads(t, heads) for t in (query, key, value))
    # the kernel transformers' own forward would pick (eager / sdpa / flash by config), so only the projections differ
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager_attention_forward)
    out, _ = interface(module, query, key, value, attention_mask=attention_similarity, dropout=0.0,
                       scaling=module.scaling, is_causal=module.is_causal, **kwargs)
    return module.out_proj(module._recombine_heads(out, point_batch_size))


# -- training: the fused two-way transformer ----------------------------------------------------------------


class SamFusedTwoWayTransformer(SamTwoWayTransformer):
    """``SamTwoWayTransformer`` that projects the image tokens once per layer; see the module docstring.

    Switch an existing module with :func:`set_decoder_projections` (``module.__class__`` is swapped; used by
    ``hf_sam_peft.speed``). Falls back to transformers' forward where :func:`overrides_apply` is
    False (e.g. a LoRA layer wrapping a decoder attention projection).
    """

    def forward(self, point_embeddings: torch.Tensor, image_embeddings: torch.Tensor,
                image_positional_embeddings: torch.Tensor, attention_similarity: torch.Tensor | None,
                target_embedding: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        # image_embeddings None: transformers' forward raises its own ValueError for it
        if image_embeddings is None or not overrides_apply(self):
            return super().forward(point_embeddings, image_embeddings, image_positional_embeddings,
                                   attention_similarity, target_embedding, **kwargs)
        # contiguous once: a transposed view would be copied by the first projection and again by layer 0's
        # LayerNorm (the residual add keeps the transposed layout)
        keys = token_layout(image_embeddings).contiguous()
        positions = token_layout(image_positional_embeddings)
        shared: SharedPositions | None = getattr(self, "_shared_positions", None)
        # positions arrive repeated per object (SamMaskDecoder.forward's repeat_interleave), hence the row-wise match;
        # a call whose encoding differs (another image size, a changed basis) projects its own shifts
        shifts = shared.shifts if shared is not None and shared.matches(positions) else None
        queries = point_embeddings
        for index, layer in enumerate(self.layers):
            if target_embedding is not None:
                # in place, as transformers: on layer 0 `queries` is `point_embeddings`, so query positions change too
                queries += target_embedding
            queries, keys = two_way_layer(layer, queries, keys, point_embeddings, positions, attention_similarity,
                                          shifts=None if shifts is None else shifts.layers[index], **kwargs)
        final_shift = None if shifts is None else shifts.final
        return final_token_to_image(self, queries, keys, point_embeddings, positions, final_shift, **kwargs), keys


def token_layout(grid: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, 1, h*w, C)`` (a view): the two-way transformer's token layout."""
    return grid.flatten(2).transpose(1, 2).unsqueeze(1)


@dataclass
class PositionShifts:
    """The bias-free projections of the positional encoding that the cross attentions add to their image-side
    operands: per layer (token->image key, image->token query), then the final token->image key; each
    ``(B, 1, h*w, c)``, ``B`` = 1 broadcasting over objects."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    final: torch.Tensor

    @classmethod
    def project(cls, transformer: SamTwoWayTransformer, positions: torch.Tensor) -> PositionShifts:
        """The shifts of ``positions`` (token layout ``(B, 1, h*w, C)``) through ``transformer``'s weights."""
        projections = [(layer.cross_attn_token_to_image.k_proj, layer.cross_attn_image_to_token.q_proj)
                       for layer in transformer.layers]
        # bias-free: each bias is added once, with the image tokens' projection (two_way_layer), not twice
        layers = [project(positions, pair, bias=False) for pair in projections]
        (final,) = project(positions, (transformer.final_attn_token_to_image.k_proj,), bias=False)
        return cls(layers, final)

    def tensors(self) -> list[torch.Tensor]:
        return [t for pair in self.layers for t in pair] + [self.final]

    @classmethod
    def from_tensors(cls, tensors: Sequence[torch.Tensor]) -> PositionShifts:
        """Inverse of :meth:`tensors`."""
        # order of tensors(): (token->image key, image->token query) per layer, then the final key
        *pairs, final = tensors
        return cls([(pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2)], final)


@dataclass
class SharedPositions:
    """Position shifts computed once and used by every decoder call whose positional encoding equals ``source``.

    ``graph``: the shifts with their autograd graph (into the projection weights). ``shifts``: what the decoder
    adds, ``graph`` itself or, for round-wise backward, detached leaves whose gradients the caller collects and
    sends into ``graph`` once (as ``hf_sam_peft.speed.rounds.BackwardPerRound`` does for the image embeddings).
    """

    source: torch.Tensor  # (1, 1, h*w, C) token layout, no graph
    graph: PositionShifts
    shifts: PositionShifts

    def matches(self, positions: torch.Tensor) -> bool:
        """Whether ``positions`` ``(B, 1, h*w, C)`` is ``source`` in every row (else the call projects its own)."""
        # cheap checks first; torch.equal then compares every object's row against the one image's encoding
        return (positions.dtype == self.source.dtype and positions.shape[1:] == self.source.shape[1:]
                and torch.equal(positions, self.source.expand_as(positions)))

    def leaves(self) -> list[torch.Tensor]:
        """The detached shifts (``detach=True``) paired with :meth:`PositionShifts.tensors` of ``graph``."""
        return self.shifts.tensors()


@contextlib.contextmanager
def shared_position_shifts(sam: nn.Module, detach: bool = False) -> Iterator[SharedPositions | None]:
    """Within the block, ``sam``'s fused two-way transformer projects SAM's image-wide positional encoding once
    and reuses it for every object and call (yields the :class:`SharedPositions`, or None where ``sam``'s
    decoder is not a :class:`SamFusedTwoWayTransformer` that :func:`overrides_apply` to: nothing changes then).

    Enter it where autocast and grad mode are as for the decoder calls inside (the shifts are computed on
    entry). ``detach``: the decoder adds detached leaves (``SharedPositions.leaves``), for callers that
    differentiate each call separately and free its graph. Same values as per-call projection (rows of a matmul
    are independent; float summation order may differ), same gradients up to summation order.
    """
    transformer = sam.mask_decoder.transformer
    if not isinstance(transformer, SamFusedTwoWayTransformer) or not overrides_apply(transformer):
        yield None
        return
    # with its graph: transformers' Fourier basis is a parameter (frozen by our methods, trainable if unfrozen)
    positions = token_layout(sam.get_image_wide_positional_embeddings())
    graph = PositionShifts.project(transformer, positions)
    shifts = graph
    if detach:
        # a leaf needs a gradient only where its graph does (frozen decoder projections and basis: nothing to collect)
        shifts = PositionShifts.from_tensors([t.detach().requires_grad_(t.requires_grad) for t in graph.tensors()])
    # source detached: only compared against (the shifts' graph holds what backward needs)
    transformer._shared_positions = SharedPositions(positions.detach(), graph, shifts)
    try:
        yield transformer._shared_positions
    finally:
        # removed even on error: after an optimizer step the projection weights change, and shifts left on the module
        # would be added to every later call whose positions still match
        del transformer._shared_positions


def token_self_attention(layer: nn.Module, queries: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
    """The first step of ``SamTwoWayAttentionBlock.forward``: the prompt tokens' self-attention and LayerNorm."""
    # layer 0 (skip_first_layer_pe): no positions and no residual, the attention output replaces the tokens, as
    # transformers' SamTwoWayAttentionBlock
    if layer.skip_first_layer_pe:
        queries, _ = layer.self_attn(query=queries, key=queries, value=queries)
    else:
        query = queries + query_pos
        queries = queries + layer.self_attn(query=query, key=query, value=queries)[0]
    return layer.layer_norm1(queries)


def two_way_layer(layer: nn.Module, queries: torch.Tensor, keys: torch.Tensor, query_pos: torch.Tensor,
                  key_pos: torch.Tensor | None, attention_similarity: torch.Tensor | None,
                  shifts: tuple[torch.Tensor, torch.Tensor] | None = None,
                  **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``SamTwoWayAttentionBlock.forward`` with one projection of ``keys`` for both cross attentions.

    ``shifts``: the bias-free projections of ``key_pos`` by the token->image key and the image->token query
    (``key_pos`` is then unused), e.g. once per training step (:func:`shared_position_shifts`); else computed
    per call. Both cross attentions run the model's kernel (:func:`attend_projected`).
    """
    queries = token_self_attention(layer, queries, query_pos)
    to_image, to_token = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
    # one projection serves both cross attentions: `keys` only change at the end of the layer (layer_norm4), so the
    # image->token query sees the same image tokens as the token->image key and value
    image_key, image_value, image_query = project(keys, (to_image.k_proj, to_image.v_proj, to_token.q_proj))
    if shifts is None:
        shifts = project(key_pos, (to_image.k_proj, to_token.q_proj), bias=False)
    key_shift, query_shift = shifts

    query = to_image.q_proj(queries + query_pos)
    # the value is the image tokens without positions, as transformers' value=keys
    attn_out = attend_projected(to_image, query, image_key + key_shift, image_value, attention_similarity, **kwargs)
    queries = layer.layer_norm2(queries + attn_out)
    queries = layer.layer_norm3(queries + layer.mlp(queries))

    # image->token: the image tokens are the queries, the prompt tokens keys and values; no attention_similarity (as
    # transformers, which passes it to the token->image attention only)
    token_key = to_token.k_proj(queries + query_pos)
    attn_out = attend_projected(to_token, image_query + query_shift, token_key, to_token.v_proj(queries), None, **kwargs)
    keys = layer.layer_norm4(keys + attn_out)
    return queries, keys


def final_token_to_image(transformer: SamTwoWayTransformer, queries: torch.Tensor, keys: torch.Tensor,
                         query_pos: torch.Tensor, key_pos: torch.Tensor | None,
                         key_shift: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
    """The transformer's last token->image attention and LayerNorm with ``keys`` projected once.

    ``key_shift``: ``final_attn_token_to_image.k_proj`` of ``key_pos`` without bias (``key_pos`` then unused).
    """
    final = transformer.final_attn_token_to_image
    key, value = project(keys, (final.k_proj, final.v_proj))
    if key_shift is None:
        (key_shift,) = project(key_pos, (final.k_proj,), bias=False)
    query = final.q_proj(queries + query_pos)
    queries = queries + attend_projected(final, query, key + key_shift, value, None, **kwargs)
    return transformer.layer_norm_final_attn(queries)


def set_decoder_projections(sam: nn.Module, fused: bool) -> bool:
    """Switch ``sam.mask_decoder.transformer`` to (``fused``) or back from :class:`SamFusedTwoWayTransformer`.

    Returns whether the class changed. The switch is exact: same parameters and state dict, same result.
    Other transformer classes (subclasses someone else made) are left alone.
    """
    transformer = sam.mask_decoder.transformer
    source, target = (SamTwoWayTransformer, SamFusedTwoWayTransformer)[:: 1 if fused else -1]
    if type(transformer) is not source:
        return False
    transformer.__class__ = target
    return True


# -- evaluation: attentions folded into the prompt tokens, the returned masks only (no gradients) -----------


def head_addend(attention: nn.Module, name: str, positions: torch.Tensor) -> torch.Tensor:
    """``attention.<name>`` of the positional encoding ``(1, 1, h*w, C)`` (bias included), head-major
    ``(heads, d, h*w)`` contiguous: what the folded scores (:func:`folded_scores`) add per head."""
    # through the module, so the bias is included (unlike PositionShifts): the folded scores add it nowhere else;
    # [0, 0]: evaluation passes one image's encoding, shared by all objects
    projected = getattr(attention, name)(positions)[0, 0]  # (h*w, c)
    heads = attention.num_attention_heads
    # output channels are head-major (h0's d channels first), the split SamAttention._separate_heads makes
    return projected.reshape(projected.shape[0], heads, -1).permute(1, 2, 0).contiguous()


def head_split(hidden: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, 1, L, c)`` -> ``(B, heads, L, c / heads)`` (a view), as ``SamAttention._separate_heads``."""
    b, _, length, channels = hidden.shape
    return hidden.reshape(b, length, heads, channels // heads).transpose(1, 2)


def folded_scores(linear: nn.Linear, head_queries: torch.Tensor, image_t: torch.Tensor, addend: torch.Tensor) -> torch.Tensor:
    """Attention scores ``(B, heads, T, N)`` of a few (already scaled) queries ``(B, heads, T, d)`` against image
    tokens ``image_t`` ``(B, C, N)`` (:func:`image_operands`) that ``linear`` would project (``addend``: its bias
    and projected positions, :func:`head_addend`), without projecting them:
    ``q_h . (W_h x + a_h) = (q_h W_h) . x + q_h . a_h``.

    ``(B, heads * T, C) @ (C, N)`` multiply-adds instead of a ``(N, C) @ (C, c)`` projection per object (fewer
    while ``heads * T < c``: T < 16 for SAM's decoder; interactive evaluation's prompts give T = 7 to 21), and
    no projected ``(N, c)`` tensor is written or read back.
    """
    b, heads, n_queries, head_dim = head_queries.shape
    # scores in float32 whatever the autocast: bf16 scores (8 bits) move the softmax by percents (the fused
    # attention kernels accumulate scores in float32 too); the operands may be bf16, products are exact in float32
    with torch.autocast(device_type=image_t.device.type, enabled=False):
        # weight (c, C) -> (heads, d, C): rows grouped per head as _separate_heads splits the projected channels
        folded = torch.matmul(head_queries.float(), linear.weight.reshape(heads, head_dim, -1).float())  # (B, heads, T, C)
        scores = torch.matmul(folded.reshape(b, heads * n_queries, -1), image_t.float())
        scores = scores.view(b, heads, n_queries, -1)
        # per object, in place: the addend (heads, d, N) is shared by all objects, and one batched baddbmm over
        # B * heads would need it expanded into a copy
        for i in range(b):
            scores[i].baddbmm_(head_queries[i].float(), addend.float())
    return scores


def image_operands(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The image tokens ``(B, 1, N, C)`` as the folded attentions read them: ``(B, N, C)`` and its transposed
    view ``(B, C, N)``, cast to the autocast dtype once per layer (autocast would cast them at every matmul)."""
    image = keys[:, 0]
    if torch.is_autocast_enabled(image.device.type):
        image = image.to(torch.get_autocast_dtype(image.device.type))
    return image, image.transpose(1, 2)


def attend_image(module: nn.Module, query: torch.Tensor, image: tuple[torch.Tensor, torch.Tensor],
                 key_addend: torch.Tensor) -> torch.Tensor:
    """A token->image attention (``SamAttention`` with ``query`` ``(B, 1, T, c)`` already projected) over the raw
    image tokens ``image`` (:func:`image_operands`), with its key and value projections folded into the few
    queries: scores by :func:`folded_scores`, and ``P_h (W_h x + b_h) = (P_h x) W_h^T + b_h`` for the values
    (rows of ``P_h`` sum to 1). Returns ``out_proj`` of the attention, ``(B, 1, T, c_out)``."""
    heads = module.num_attention_heads
    head_queries = head_split(query * module.scaling, heads)
    b, _, n_queries, head_dim = head_queries.shape
    tokens, tokens_t = image
    probs = folded_scores(module.k_proj, head_queries, tokens_t, key_addend).softmax(dim=-1, dtype=torch.float32)
    # probs in the tokens' dtype (bf16 under autocast, cast once by image_operands): one dtype for the (N, C) operand
    mixed = torch.matmul(probs.view(b, heads * n_queries, -1).to(tokens.dtype), tokens)  # (B, heads * T, C)
    value_weights = module.v_proj.weight.reshape(heads, head_dim, -1).transpose(1, 2)  # (heads, C, d)
    # the bias after the mixing: rows of P sum to 1, so P (W x + b) = P W x + b
    out = torch.matmul(mixed.view(b, heads, n_queries, -1), value_weights) + module.v_proj.bias.view(heads, 1, head_dim)
    # (B, heads, T, d) -> (B, 1, T, heads * d), head-major channels as _recombine_heads
    return module.out_proj(out.transpose(1, 2).reshape(b, 1, n_queries, heads * head_dim))


def attend_few_keys(module: nn.Module, head_queries: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """An image->token attention with its output projection, arranged for few keys (``SamAttention.forward``'s
    arithmetic with eager attention, in another order). ``head_queries``: the projected image queries
    head-major ``(1 or B, heads, d, N)`` (evaluation caches layer 0's per image), ``key`` and ``value`` the
    objects' few projected tokens ``(B, 1, T, c)``. The scores ``(B, heads, T, N)`` are one
    ``(T, d) @ (d, N)`` matmul per head and object, then :func:`attend_few_keys_output`.
    """
    heads = module.num_attention_heads
    # scaling on the few keys instead of the 4,096 queries: the same scores (q . k s = q s . k), T * d multiplies
    head_keys = head_split(key * module.scaling, heads)  # (B, heads, T, d)
    objects, _, n_keys, _ = head_keys.shape
    scores = head_keys.new_empty(objects, heads, n_keys, head_queries.shape[-1], dtype=torch.float32)
    with torch.autocast(device_type=scores.device.type, enabled=False):  # float32 scores, as folded_scores
        for i in range(objects):
            # min(): layer 0's image queries are cached once per image (leading dim 1) and shared by every object
            torch.matmul(head_keys[i].float(), head_queries[min(i, head_queries.shape[0] - 1)].float(), out=scores[i])
    return attend_few_keys_output(module, scores, value)


def attend_few_keys_output(module: nn.Module, scores: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """An image->token attention (4,096 image queries, a handful of token keys) from its scores
    ``(B, heads, T, N)`` and the tokens' projected values ``(B, 1, T, c)``, with its output projection.
    Returns ``(B, 1, N, c_out)``.

    - the softmax over the keys is taken along a non-last axis, where the CPU kernel vectorises over the
      4,096 queries instead of over rows of ~10 keys;
    - the output projection is folded into the values: ``out_proj(concat_h P_h V_h) = sum_h P_h (V_h W_h^T) + b``
      is one ``(N, heads*T) @ (heads*T, c_out)`` matmul per object instead of ``P V`` and a
      ``(N, c) @ (c, c_out)`` projection over all image tokens (fewer multiply-adds while
      ``heads * T < c + T``: T <= 18 for SAM's decoder), and since each row of ``P_h`` sums to 1 the
      bias rides on the values (``b / heads`` per head) instead of a pass over the output.
    """
    objects, heads, n_keys, n_queries = scores.shape
    # dim=-2 is the key axis of (B, heads, T, N): the softmax over keys, as eager's dim=-1 over (..., N, T)
    probs = scores.softmax(dim=-2, dtype=torch.float32)
    out_proj = module.out_proj
    head_values = head_split(value, heads)
    # out_proj.weight (c_out, c): its input channels split head-major, as the heads were recombined
    head_weights = out_proj.weight.reshape(-1, heads, head_values.shape[-1]).permute(1, 2, 0)  # (heads, d, c_out)
    projected = torch.matmul(head_values, head_weights) + out_proj.bias / heads  # (B, heads, T, c_out)
    # (B, N, heads * T) @ (B, heads * T, c_out): the sum over heads and keys in one matmul, in probs' dtype (float32)
    out = torch.matmul(probs.reshape(objects, heads * n_keys, n_queries).transpose(1, 2),
                       projected.reshape(objects, heads * n_keys, -1).to(probs.dtype))
    return out.reshape(objects, 1, n_queries, -1)


def folded_two_way_layer(layer: nn.Module, queries: torch.Tensor, keys: torch.Tensor, query_pos: torch.Tensor,
                         key_addend: torch.Tensor, query_addend: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A two-way layer (:func:`two_way_layer`: same steps, same modules) for image tokens ``keys`` ``(B, 1, N, C)``
    with no projection of them: both cross attentions fold their image-side projections into the object's few
    tokens (:func:`attend_image`, :func:`folded_scores`). ``key_addend`` / ``query_addend``: :func:`head_addend`
    of the token->image key and the image->token query."""
    queries = token_self_attention(layer, queries, query_pos)
    to_image, to_token = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
    image = image_operands(keys)
    queries = layer.layer_norm2(queries + attend_image(to_image, to_image.q_proj(queries + query_pos), image, key_addend))
    queries = layer.layer_norm3(queries + layer.mlp(queries))

    # roles swapped for folded_scores: the few token keys stand in for its queries and the image-side q_proj is the one
    # folded, giving the scores transposed, (B, heads, T, N), the layout attend_few_keys_output takes
    head_keys = head_split(to_token.k_proj(queries + query_pos) * to_token.scaling, to_token.num_attention_heads)
    scores = folded_scores(to_token.q_proj, head_keys, image[1], query_addend)  # (B, heads, T, N)
    keys = layer.layer_norm4(keys + attend_few_keys_output(to_token, scores, to_token.v_proj(queries)))
    return queries, keys


def folded_final_token_to_image(transformer: SamTwoWayTransformer, queries: torch.Tensor, keys: torch.Tensor,
                                query_pos: torch.Tensor, key_addend: torch.Tensor) -> torch.Tensor:
    """:func:`final_token_to_image` without projecting ``keys`` (:func:`attend_image`); ``key_addend``:
    :func:`head_addend` of ``final_attn_token_to_image.k_proj``."""
    final = transformer.final_attn_token_to_image
    attn_out = attend_image(final, final.q_proj(queries + query_pos), image_operands(keys), key_addend)
    return transformer.layer_norm_final_attn(queries + attn_out)


def channels_last_call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` without the training layout hook (:func:`hf_sam_peft.modeling.layout.set_contiguous_layout`,
    which the trainer's ``prepare_model`` leaves on a trained model): that hook only copies the output into
    contiguous (N, C, H, W) memory, same values, which :func:`mask_head` would copy back to channels-last.
    Measured on LiteMedSAM (demo tile, 16 boxes, 1 thread): 0.30 s per decode without it, 0.58 s with it,
    so a fine-tuned model was evaluated slower than its base. Any other hook runs as usual (``module(x)``)."""
    hooks = list(module._forward_hooks.values())
    # module.forward bypasses every hook, so only where the layout hook is the only one (global hooks included)
    if (hooks and all(hook is contiguous_output for hook in hooks) and not module._forward_pre_hooks
            and not nn.modules.module._global_forward_hooks and not nn.modules.module._global_forward_pre_hooks):
        return module.forward(x)
    return module(x)


def mask_head(decoder: SamMaskDecoder, queries: torch.Tensor, keys: torch.Tensor, size: tuple[int, int],
              multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``SamMaskDecoder.forward`` after the transformer, for the returned mask tokens only: masks
    ``(N, K, 4h, 4w)`` and IoU predictions ``(N, K)`` (K = 1, or the 3 multimask tokens).

    ``keys`` ``(N, 1, h*w, C)`` are channels-last already: the upscaling convolutions take them as a
    channels-last view (no transpose copy) and the mask product runs over that layout (also for a model
    trained with the contiguous-layout hook: :func:`channels_last_call`).
    """
    n = keys.shape[0]
    height, width = size
    # tokens are row-major over the grid (token_layout flattens (h, w)), so token y * w + x is pixel (y, x)
    grid = keys.reshape(n, height, width, -1).permute(0, 3, 1, 2)  # (N, C, h, w), channels-last memory
    upscaled = decoder.upscale_conv1(grid)
    upscaled = decoder.activation(decoder.upscale_layer_norm(upscaled))
    upscaled = decoder.activation(channels_last_call(decoder.upscale_conv2, upscaled))  # (N, c, 4h, 4w)
    # transformers' mask_slice: mask token 0 is the single-mask output, tokens 1-3 the multimask ones
    picked = range(1, decoder.num_mask_tokens) if multimask else range(1)
    # token 0 of the transformer output is the IoU token, mask token i is at 1 + i
    hyper_in = torch.stack([decoder.output_hypernetworks_mlps[i](queries[:, 0, 1 + i]) for i in picked], dim=1)
    pixels = upscaled.permute(0, 2, 3, 1).reshape(n, -1, upscaled.shape[1])  # (N, 16hw, c): free when channels-last
    masks = (pixels @ hyper_in.transpose(1, 2).to(pixels.dtype)).transpose(1, 2)
    masks = masks.reshape(n, len(picked), *upscaled.shape[-2:])
    # the head predicts all four IoUs in one small MLP; the pick matches the returned masks
    iou = decoder.iou_prediction_head(queries[:, 0, 0])[:, list(picked)]
    return masks, iou
