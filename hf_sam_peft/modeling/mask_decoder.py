"""SAM's two-way transformer with the image stream projected once per layer (same parameters, same result).

In the mask decoder every image token (4096 per object at 1024²) flows through two cross attentions per layer.
transformers' ``SamTwoWayTransformer`` forms ``keys + positional_embedding`` twice per layer (once per cross
attention) and then runs three separate 256 → 128 projections over the image tokens (key and value of the
token→image attention, query of the image→token attention). Under autocast each projection also casts its
float32 input to bf16 on its own. On a CPU these full-width adds and casts, not the matmuls, are what the
decoder spends its time on (memory bandwidth), and the prompt rounds repeat them 8 times per step.

Projections are linear, so ``W(keys + pos) + b = (W keys + b) + W pos``. This module projects ``keys`` once per
layer with the three weights stacked (one cast, one matmul) and adds the projected positional embedding
(half as wide, and the same for every round's prompts) to the key and query parts. The token side, the
attention kernels, the residuals and the LayerNorms are transformers' own modules, called as before.

The projected positional embedding depends only on the projection weights and SAM's image-wide positional
encoding (a fixed Fourier basis: a buffer in SAM, a parameter our methods freeze in transformers), so it is the
same for every object and every prompt round of a training step. Within
:func:`shared_position_shifts` (the training step) it is projected once, for one image, and broadcast over
objects and rounds: per ViT-B step with 4 objects and 8 rounds that drops 24 projections of 16,384 tokens
(forward and weight gradient) and the 24 copies of the positions they saved for backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.sam.modeling_sam import (
    SamAttention,
    SamTwoWayTransformer,
    eager_attention_forward,
)


def _project(hidden: torch.Tensor, linears: Sequence[nn.Linear], bias: bool = True) -> tuple[torch.Tensor, ...]:
    """``linear(hidden)`` for each of ``linears`` as one matmul over their stacked weights (views of one output)."""
    weight = torch.cat([linear.weight for linear in linears])
    stacked_bias = torch.cat([linear.bias for linear in linears]) if bias else None
    out = F.linear(hidden, weight, stacked_bias)
    return out.split([linear.out_features for linear in linears], dim=-1)


def _attend(module: SamAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            attention_similarity: torch.Tensor | None, **kwargs: Any) -> torch.Tensor:
    """``SamAttention.forward`` from already projected ``(B, P, tokens, internal_dim)`` query, key and value."""
    point_batch_size = query.shape[1]
    heads = module.num_attention_heads
    query, key, value = (module._separate_heads(t, heads) for t in (query, key, value))
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager_attention_forward)
    out, _ = interface(module, query, key, value, attention_mask=attention_similarity, dropout=0.0,
                       scaling=module.scaling, is_causal=module.is_causal, **kwargs)
    return module.out_proj(module._recombine_heads(out, point_batch_size))


def _attentions(transformer: SamTwoWayTransformer) -> list[SamAttention]:
    """The cross attentions of ``transformer`` that see the image tokens (those the fused forward projects)."""
    attentions = [transformer.final_attn_token_to_image]
    for layer in transformer.layers:
        attentions += [layer.cross_attn_token_to_image, layer.cross_attn_image_to_token]
    return attentions


def _plain_linears(*modules: SamAttention) -> bool:
    """True when every projection is a plain ``nn.Linear`` (not an adapter wrapper whose ``weight`` is not all)."""
    return all(type(getattr(m, name)) is nn.Linear for m in modules for name in ("q_proj", "k_proj", "v_proj"))


class SamFusedTwoWayTransformer(SamTwoWayTransformer):
    """``SamTwoWayTransformer`` that projects the image tokens once per layer; see the module docstring.

    Switch an existing module with ``module.__class__ = SamFusedTwoWayTransformer`` (see
    ``hf_sam_peft.training.efficiency.set_decoder_transformer``). Falls back to transformers' forward when
    an attention projection is wrapped (e.g. a LoRA layer targeting the decoder).
    """

    def forward(self, point_embeddings: torch.Tensor, image_embeddings: torch.Tensor,
                image_positional_embeddings: torch.Tensor, attention_similarity: torch.Tensor | None,
                target_embedding: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if image_embeddings is None or not _plain_linears(*_attentions(self)):
            return super().forward(point_embeddings, image_embeddings, image_positional_embeddings,
                                   attention_similarity, target_embedding, **kwargs)
        # contiguous once: a transposed view would be copied by the first projection and again by layer 0's
        # LayerNorm (the residual add keeps the transposed layout)
        keys = token_layout(image_embeddings).contiguous()
        positions = token_layout(image_positional_embeddings)
        shared: SharedPositions | None = getattr(self, "_shared_positions", None)
        shifts = shared.shifts if shared is not None and shared.matches(positions) else None
        queries = point_embeddings
        for index, layer in enumerate(self.layers):
            if target_embedding is not None:
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
        layers = [_project(positions, pair, bias=False) for pair in projections]
        (final,) = _project(positions, (transformer.final_attn_token_to_image.k_proj,), bias=False)
        return cls(layers, final)

    def tensors(self) -> list[torch.Tensor]:
        return [t for pair in self.layers for t in pair] + [self.final]

    @classmethod
    def from_tensors(cls, tensors: Sequence[torch.Tensor]) -> PositionShifts:
        """Inverse of :meth:`tensors`."""
        *pairs, final = tensors
        return cls([(pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2)], final)


@dataclass
class SharedPositions:
    """Position shifts computed once and used by every decoder call whose positional encoding equals ``source``.

    ``graph``: the shifts with their autograd graph (into the projection weights). ``shifts``: what the decoder
    adds, ``graph`` itself or, for round-wise backward, detached leaves whose gradients the caller collects and
    sends into ``graph`` once (as ``backward_round_losses`` does for the image embeddings).
    """

    source: torch.Tensor  # (1, 1, h*w, C) token layout, no graph
    graph: PositionShifts
    shifts: PositionShifts

    def matches(self, positions: torch.Tensor) -> bool:
        """Whether ``positions`` ``(B, 1, h*w, C)`` is ``source`` in every row (else the call projects its own)."""
        return (positions.dtype == self.source.dtype and positions.shape[1:] == self.source.shape[1:]
                and torch.equal(positions, self.source.expand_as(positions)))

    def leaves(self) -> list[torch.Tensor]:
        """The detached shifts (``detach=True``) paired with :meth:`PositionShifts.tensors` of ``graph``."""
        return self.shifts.tensors()


@contextlib.contextmanager
def shared_position_shifts(sam: nn.Module, detach: bool = False) -> Iterator[SharedPositions | None]:
    """Within the block, ``sam``'s fused two-way transformer projects SAM's image-wide positional encoding once
    and reuses it for every object and call (yields the :class:`SharedPositions`, or None where ``sam``'s
    decoder is not a :class:`SamFusedTwoWayTransformer` with plain projections: nothing changes then).

    Enter it where autocast and grad mode are as for the decoder calls inside (the shifts are computed on
    entry). ``detach``: the decoder adds detached leaves (``SharedPositions.leaves``), for callers that
    differentiate each call separately and free its graph. Same values as per-call projection (rows of a matmul
    are independent; float summation order may differ), same gradients up to summation order.
    """
    transformer = sam.mask_decoder.transformer
    if not isinstance(transformer, SamFusedTwoWayTransformer) or not _plain_linears(*_attentions(transformer)):
        yield None
        return
    # with its graph: transformers' Fourier basis is a parameter (frozen by our methods, trainable if unfrozen)
    positions = token_layout(sam.get_image_wide_positional_embeddings())
    graph = PositionShifts.project(transformer, positions)
    shifts = graph
    if detach:
        shifts = PositionShifts.from_tensors([t.detach().requires_grad_(t.requires_grad) for t in graph.tensors()])
    transformer._shared_positions = SharedPositions(positions.detach(), graph, shifts)
    try:
        yield transformer._shared_positions
    finally:
        del transformer._shared_positions


def token_self_attention(layer: nn.Module, queries: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
    """The first step of ``SamTwoWayAttentionBlock.forward``: the prompt tokens' self-attention and LayerNorm."""
    if layer.skip_first_layer_pe:
        queries, _ = layer.self_attn(query=queries, key=queries, value=queries)
    else:
        query = queries + query_pos
        queries = queries + layer.self_attn(query=query, key=query, value=queries)[0]
    return layer.layer_norm1(queries)


def two_way_layer(layer: nn.Module, queries: torch.Tensor, keys: torch.Tensor, query_pos: torch.Tensor,
                  key_pos: torch.Tensor | None, attention_similarity: torch.Tensor | None,
                  shifts: tuple[torch.Tensor, torch.Tensor] | None = None,
                  attend_image_queries: Callable[..., torch.Tensor] | None = None,
                  **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``SamTwoWayAttentionBlock.forward`` with one projection of ``keys`` for both cross attentions.

    ``shifts``: the bias-free projections of ``key_pos`` by the token->image key and the image->token query
    (``key_pos`` is then unused): inference computes them once per image
    (:mod:`hf_sam_peft.evaluation.fast_decoder`), training per call. ``attend_image_queries``: the kernel of
    the image->token attention (default :func:`_attend`, the model's kernel; inference passes its own).
    """
    queries = token_self_attention(layer, queries, query_pos)
    to_image, to_token = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
    image_key, image_value, image_query = _project(keys, (to_image.k_proj, to_image.v_proj, to_token.q_proj))
    if shifts is None:
        shifts = _project(key_pos, (to_image.k_proj, to_token.q_proj), bias=False)
    key_shift, query_shift = shifts

    query = to_image.q_proj(queries + query_pos)
    attn_out = _attend(to_image, query, image_key + key_shift, image_value, attention_similarity, **kwargs)
    queries = layer.layer_norm2(queries + attn_out)
    queries = layer.layer_norm3(queries + layer.mlp(queries))

    token_key = to_token.k_proj(queries + query_pos)
    attend = _attend if attend_image_queries is None else attend_image_queries
    attn_out = attend(to_token, image_query + query_shift, token_key, to_token.v_proj(queries), None, **kwargs)
    keys = layer.layer_norm4(keys + attn_out)
    return queries, keys


def final_token_to_image(transformer: SamTwoWayTransformer, queries: torch.Tensor, keys: torch.Tensor,
                         query_pos: torch.Tensor, key_pos: torch.Tensor | None,
                         key_shift: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
    """The transformer's last token->image attention and LayerNorm with ``keys`` projected once.

    ``key_shift``: ``final_attn_token_to_image.k_proj`` of ``key_pos`` without bias (``key_pos`` then unused),
    precomputed once per image by inference.
    """
    final = transformer.final_attn_token_to_image
    key, value = _project(keys, (final.k_proj, final.v_proj))
    if key_shift is None:
        (key_shift,) = _project(key_pos, (final.k_proj,), bias=False)
    query = final.q_proj(queries + query_pos)
    queries = queries + _attend(final, query, key + key_shift, value, None, **kwargs)
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


__all__ = [
    "PositionShifts", "SamFusedTwoWayTransformer", "SharedPositions", "final_token_to_image", "set_decoder_projections",
    "shared_position_shifts", "token_layout", "two_way_layer",
]
