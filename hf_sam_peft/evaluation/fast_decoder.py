"""SAM's prompt decoder for inference: what every object of an image shares is computed once per image, and
nothing is computed per image token that a handful of prompt tokens can carry instead.

Interactive evaluation decodes each object 8 times (initial prompt + 7 corrections) against the same image
embedding, and never passes a mask input. transformers' ``SamModel.forward`` (what
:func:`hf_sam_peft.sam_forward.forward.decode` calls, training's path) redoes per call and per object what
only depends on the image, and projects the 4,096 image tokens of every object three times per layer:

- per image (:class:`ImageTokens`): the dense positional encoding and the image embedding + the no-mask
  dense embedding in token layout; layer 0's projections of the image tokens (token->image key and value,
  image->token query: without a mask input its image tokens are the same for every object, so every
  object's queries attend to the same keys, folded into the query axis of one attention call: rows of an
  attention are independent, so this is exact); and every later projection's bias + projected positional
  encoding, head-major;
- per object, later layers and the final attention never project the image tokens: an attention between T
  prompt tokens and N image tokens needs ``W x`` only inside ``q . W x`` and ``P W x``, so the projection
  moves onto the tokens (``(q W) . x``, ``(P x) W^T``; :func:`_folded_scores`, :func:`_attend_image`), and
  the image->token output projection onto the tokens' values (:func:`_attend_few_keys_output`). With T <= 16
  tokens (SAM's 8 heads of 16) that is fewer multiply-adds and no ``(N, c)`` tensors written and read back;
- the mask head: the hypernetwork MLPs and the mask product run only for the mask tokens that are returned
  (1 of 4 for single-mask output), and the upscaling stays in the convolutions' channels-last layout;
- objects go through in small groups (:func:`objects_per_pass`) whose maps stay in cache.

The order of the arithmetic differs from transformers' (float32 results agree to rounding,
``tests/evaluation/test_fast_eval.py``); the modules are the model's own (LayerNorms, MLPs, self-attention,
projection weights, upscaling convolutions, IoU head), so fine-tuned decoders (peft ``modules_to_save``
copies) run through it too. With a mask input (``dense``) the image tokens differ per object and layer 0
runs per object like the later layers.

Precision: with ``autocast_dtype`` (:class:`~hf_sam_peft.evaluation.predictor.SamPredictor` passes bf16
where the device runs it natively and faster, :func:`hf_sam_peft.sam_forward.precision.fast_autocast_dtype`) the
matmuls run in bf16 with float32 accumulation, as the trainer's forward does; attention scores, LayerNorms,
softmax and the residual stream stay float32, and the low-res logits are returned as float32. The image
encoder is not touched (its embedding is float32). A mask differs from the float32 one only where the
logit is within bf16 rounding of 0 (boundary pixels): ``benchmarks/EVALUATION.md`` gives the measured
agreement.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import ContextManager

import torch
from torch import nn
from transformers.models.sam.modeling_sam import SamMaskDecoder, SamTwoWayTransformer

from hf_sam_peft.modeling.layout import _contiguous_output
from hf_sam_peft.modeling.mask_decoder import (
    _attend,
    _attentions,
    _plain_linears,
    _project,
    token_layout,
    token_self_attention,
)
from hf_sam_peft.sam_forward.forward import unwrap_sam

__all__ = [
    "ImageTokens", "active_module", "autocast_to", "decode_objects", "fast_decoder_supported", "image_tokens",
    "objects_per_pass",
]


def active_module(module: nn.Module) -> nn.Module:
    """The module peft's ``ModulesToSaveWrapper`` would run (the active adapter's copy), else ``module``."""
    copies = getattr(module, "modules_to_save", None)
    if isinstance(copies, nn.ModuleDict) and hasattr(module, "original_module"):
        active = [a for a in getattr(module, "active_adapters", []) if a in copies]
        if getattr(module, "disable_adapters", False) or not active:
            return module.original_module
        return copies[active[0]]
    return module


def _decoder(sam: nn.Module) -> SamMaskDecoder:
    return active_module(sam.mask_decoder)


def fast_decoder_supported(model: nn.Module) -> bool:
    """Whether :func:`decode_objects` reproduces ``model``'s decoder: transformers' ``SamMaskDecoder`` and
    two-way transformer (or our fused one) with plain ``nn.Linear`` attention projections (an adapter
    wrapping them, e.g. LoRA on the decoder, is decoded through the model's forward instead).

    SAM 2's ``Sam2MaskDecoder`` is not: it adds an object-score token to the output tokens, its upscaling adds
    the two high-resolution maps, and its single-mask choice differs (``sam_forward.forward``); reproducing
    those here would be a second copy of that decoder to keep in step with transformers. SAM 2 models decode
    through the model's forward (the plain path), which training uses too."""
    decoder = _decoder(unwrap_sam(model))
    if type(decoder) is not SamMaskDecoder or not isinstance(decoder.transformer, SamTwoWayTransformer):
        return False
    return _plain_linears(*_attentions(decoder.transformer))


@dataclass
class ImageTokens:
    """What every object of one image shares in the mask decoder (:func:`image_tokens`), token layout ``(1, 1, h*w, C)``."""

    embeddings: torch.Tensor  # (1, C, h, w) image embedding, for mask inputs
    keys: torch.Tensor  # image embedding + no-mask dense embedding
    first_key: torch.Tensor  # layer 0 token->image key (positions included) and value, image->token query
    first_value: torch.Tensor
    first_query: torch.Tensor  # head-major (1, heads, d, h*w), the layout attend_few_keys reads
    key_addends: list[torch.Tensor]  # per layer, head-major (heads, d, h*w): token->image key bias + projected positions
    query_addends: list[torch.Tensor]  # per layer, the same for the image->token query
    final_key_addend: torch.Tensor
    autocast_dtype: torch.dtype | None

    @property
    def size(self) -> tuple[int, int]:
        return int(self.embeddings.shape[-2]), int(self.embeddings.shape[-1])


def autocast_to(device: torch.device, dtype: torch.dtype | None) -> ContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or a no-op context for None."""
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


def _tokens(grid: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, 1, h*w, C)`` contiguous (the two-way transformer's token layout)."""
    return token_layout(grid).contiguous()


@torch.no_grad()
def image_tokens(model: nn.Module, embeddings: torch.Tensor, autocast_dtype: torch.dtype | None = None) -> ImageTokens:
    """Per-image decoder inputs of one image embedding ``(1, C, h, w)``; recompute them for every new image."""
    sam = unwrap_sam(model)
    if embeddings.ndim != 4 or embeddings.shape[0] != 1:
        raise ValueError(f"embeddings must be one image's (1, C, h, w), got {tuple(embeddings.shape)}")
    transformer = _decoder(sam).transformer
    with autocast_to(embeddings.device, autocast_dtype):
        positions = _tokens(sam.get_image_wide_positional_embeddings())
        box = torch.zeros(1, 1, 4, device=embeddings.device, dtype=embeddings.dtype)  # any prompt: only dense is used
        _, dense = sam.prompt_encoder(input_points=None, input_labels=None, input_boxes=box, input_masks=None)
        keys = _tokens(embeddings + dense)
        layers = transformer.layers
        key_addends = [_head_addend(layer.cross_attn_token_to_image, "k_proj", positions) for layer in layers]
        query_addends = [_head_addend(layer.cross_attn_image_to_token, "q_proj", positions) for layer in layers]
        final_key_addend = _head_addend(transformer.final_attn_token_to_image, "k_proj", positions)
        to_image, to_token = layers[0].cross_attn_token_to_image, layers[0].cross_attn_image_to_token
        key, query = _project(keys + positions, (to_image.k_proj, to_token.q_proj))
        value = to_image.v_proj(keys)
        query = _head_split(query, to_token.num_attention_heads).transpose(-1, -2).contiguous()  # (1, heads, d, N)
    return ImageTokens(embeddings, keys, key.contiguous(), value.contiguous(), query,
                       key_addends, query_addends, final_key_addend, autocast_dtype)


def _head_addend(attention: nn.Module, name: str, positions: torch.Tensor) -> torch.Tensor:
    """``attention.<name>`` of the positional encoding (bias included), head-major ``(heads, d, h*w)``
    contiguous: what the folded scores (:func:`_folded_scores`) add per head."""
    projected = getattr(attention, name)(positions)[0, 0]  # (h*w, c)
    heads = attention.num_attention_heads
    return projected.reshape(projected.shape[0], heads, -1).permute(1, 2, 0).contiguous()


def _head_split(hidden: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, 1, L, c)`` -> ``(B, heads, L, c / heads)`` (a view), as ``SamAttention._separate_heads``."""
    b, _, length, channels = hidden.shape
    return hidden.reshape(b, length, heads, channels // heads).transpose(1, 2)


def _folded_scores(linear: nn.Linear, head_queries: torch.Tensor, image_t: torch.Tensor, addend: torch.Tensor) -> torch.Tensor:
    """Attention scores ``(B, heads, T, N)`` of a few (already scaled) queries ``(B, heads, T, d)`` against image
    tokens ``image_t`` ``(B, C, N)`` (:func:`_image_operands`) that ``linear`` would project (``addend``: its bias and projected positions,
    :func:`_head_addend`), without projecting them: ``q_h . (W_h x + a_h) = (q_h W_h) . x + q_h . a_h``.

    ``(B, heads * T, C) @ (C, N)`` multiply-adds instead of a ``(N, C) @ (C, c)`` projection per object (fewer
    while ``heads * T < c``: T < 16 for SAM's decoder; interactive evaluation's prompts give T = 7 to 21), and
    no projected ``(N, c)`` tensor is written or read back.
    """
    b, heads, n_queries, head_dim = head_queries.shape
    # scores in float32 whatever the autocast: bf16 scores (8 bits) move the softmax by percents (the fused
    # attention kernels accumulate scores in float32 too); the operands may be bf16, products are exact in float32
    with torch.autocast(device_type=image_t.device.type, enabled=False):
        folded = torch.matmul(head_queries.float(), linear.weight.reshape(heads, head_dim, -1).float())  # (B, heads, T, C)
        scores = torch.matmul(folded.reshape(b, heads * n_queries, -1), image_t.float())
        scores = scores.view(b, heads, n_queries, -1)
        for i in range(b):
            scores[i].baddbmm_(head_queries[i].float(), addend.float())
    return scores


def _image_operands(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The image tokens ``(B, 1, N, C)`` as the folded attentions read them: ``(B, N, C)`` and its transposed
    view ``(B, C, N)``, cast to the autocast dtype once per layer (autocast would cast them at every matmul)."""
    image = keys[:, 0]
    if torch.is_autocast_enabled(image.device.type):
        image = image.to(torch.get_autocast_dtype(image.device.type))
    return image, image.transpose(1, 2)


def _attend_image(module: nn.Module, query: torch.Tensor, image: tuple[torch.Tensor, torch.Tensor],
                  key_addend: torch.Tensor) -> torch.Tensor:
    """A token->image attention (``SamAttention`` with ``query`` ``(B, 1, T, c)`` already projected) over the raw
    image tokens ``image`` (:func:`_image_operands`), with its key and value projections folded into the few queries:
    scores by :func:`_folded_scores`, and ``P_h (W_h x + b_h) = (P_h x) W_h^T + b_h`` for the values (rows of
    ``P_h`` sum to 1). Returns ``out_proj`` of the attention, ``(B, 1, T, c_out)``."""
    heads = module.num_attention_heads
    head_queries = _head_split(query * module.scaling, heads)
    b, _, n_queries, head_dim = head_queries.shape
    tokens, tokens_t = image
    probs = _folded_scores(module.k_proj, head_queries, tokens_t, key_addend).softmax(dim=-1, dtype=torch.float32)
    mixed = torch.matmul(probs.view(b, heads * n_queries, -1).to(tokens.dtype), tokens)  # (B, heads * T, C)
    value_weights = module.v_proj.weight.reshape(heads, head_dim, -1).transpose(1, 2)  # (heads, C, d)
    out = torch.matmul(mixed.view(b, heads, n_queries, -1), value_weights) + module.v_proj.bias.view(heads, 1, head_dim)
    return module.out_proj(out.transpose(1, 2).reshape(b, 1, n_queries, heads * head_dim))


def attend_few_keys(module: nn.Module, head_queries: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The image->token attention of layer 0 with its output projection, arranged for few keys (inference only;
    ``SamAttention.forward``'s arithmetic with eager attention, in another order). ``head_queries``: the
    projected image queries head-major ``(1 or B, heads, d, N)`` (:attr:`ImageTokens.first_query`), ``key`` and
    ``value`` the objects' few projected tokens ``(B, 1, T, c)``. The scores ``(B, heads, T, N)`` are one
    ``(T, d) @ (d, N)`` matmul per head and object, then :func:`_attend_few_keys_output`.
    """
    heads = module.num_attention_heads
    head_keys = _head_split(key * module.scaling, heads)  # (B, heads, T, d)
    objects, _, n_keys, _ = head_keys.shape
    scores = head_keys.new_empty(objects, heads, n_keys, head_queries.shape[-1], dtype=torch.float32)
    with torch.autocast(device_type=scores.device.type, enabled=False):  # float32 scores, as _folded_scores
        for i in range(objects):
            torch.matmul(head_keys[i].float(), head_queries[min(i, head_queries.shape[0] - 1)].float(), out=scores[i])
    return _attend_few_keys_output(module, scores, value)


def _attend_few_keys_output(module: nn.Module, scores: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
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
    probs = scores.softmax(dim=-2, dtype=torch.float32)
    out_proj = module.out_proj
    head_values = _head_split(value, heads)
    head_weights = out_proj.weight.reshape(-1, heads, head_values.shape[-1]).permute(1, 2, 0)  # (heads, d, c_out)
    projected = torch.matmul(head_values, head_weights) + out_proj.bias / heads  # (B, heads, T, c_out)
    out = torch.matmul(probs.reshape(objects, heads * n_keys, n_queries).transpose(1, 2),
                       projected.reshape(objects, heads * n_keys, -1).to(probs.dtype))
    return out.reshape(objects, 1, n_queries, -1)


def _later_layer(layer: nn.Module, queries: torch.Tensor, keys: torch.Tensor, query_pos: torch.Tensor,
                 key_addend: torch.Tensor, query_addend: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A two-way layer (``two_way_layer``: same steps, same modules) for image tokens ``keys`` ``(B, 1, N, C)``
    that differ per object, with no projection of them: both cross attentions fold their image-side
    projections into the object's few tokens (:func:`_attend_image`, :func:`_folded_scores`)."""
    queries = token_self_attention(layer, queries, query_pos)
    to_image, to_token = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
    image = _image_operands(keys)
    queries = layer.layer_norm2(queries + _attend_image(to_image, to_image.q_proj(queries + query_pos), image, key_addend))
    queries = layer.layer_norm3(queries + layer.mlp(queries))

    head_keys = _head_split(to_token.k_proj(queries + query_pos) * to_token.scaling, to_token.num_attention_heads)
    scores = _folded_scores(to_token.q_proj, head_keys, image[1], query_addend)  # (B, heads, T, N)
    keys = layer.layer_norm4(keys + _attend_few_keys_output(to_token, scores, to_token.v_proj(queries)))
    return queries, keys


def _first_layer_shared(layer: nn.Module, queries: torch.Tensor, query_pos: torch.Tensor,
                        tokens: ImageTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer 0 of the two-way transformer (``two_way_layer``) for N objects whose image tokens are shared.

    ``queries`` ``(N, 1, T, C)``. The token->image attention runs once with all objects' queries stacked
    (``(1, 1, N*T, .)``) against the cached keys / values; the image->token attention uses the cached image
    queries against each object's own tokens.
    """
    n, _, n_tokens, _ = queries.shape
    queries = token_self_attention(layer, queries, query_pos)

    to_image, to_token = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
    query = to_image.q_proj(queries + query_pos).reshape(1, 1, n * n_tokens, -1)
    attn_out = _attend(to_image, query, tokens.first_key, tokens.first_value, None).reshape(n, 1, n_tokens, -1)
    queries = layer.layer_norm2(queries + attn_out)
    queries = layer.layer_norm3(queries + layer.mlp(queries))

    token_key = to_token.k_proj(queries + query_pos)
    attn_out = attend_few_keys(to_token, tokens.first_query, token_key, to_token.v_proj(queries))
    keys = layer.layer_norm4(tokens.keys + attn_out)
    return queries, keys


def _channels_last_call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` without the training layout hook (:func:`hf_sam_peft.modeling.layout.set_contiguous_layout`,
    which the trainer's ``prepare_model`` leaves on a trained model): that hook only copies the output into
    contiguous (N, C, H, W) memory, same values, which the mask head below would copy back to channels-last.
    Measured on LiteMedSAM (demo tile, 16 boxes, 1 thread): 0.30 s per decode without it, 0.58 s with it,
    so a fine-tuned model was evaluated slower than its base. Any other hook runs as usual (``module(x)``)."""
    hooks = list(module._forward_hooks.values())
    if (hooks and all(hook is _contiguous_output for hook in hooks) and not module._forward_pre_hooks
            and not nn.modules.module._global_forward_hooks and not nn.modules.module._global_forward_pre_hooks):
        return module.forward(x)
    return module(x)


def _mask_head(decoder: SamMaskDecoder, queries: torch.Tensor, keys: torch.Tensor, size: tuple[int, int],
               multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``SamMaskDecoder.forward`` after the transformer, for the returned mask tokens only.

    ``keys`` ``(N, 1, h*w, C)`` are channels-last already: the upscaling convolutions take them as a
    channels-last view (no transpose copy) and the mask product runs over that layout (also for a model
    trained with the contiguous-layout hook: :func:`_channels_last_call`).
    """
    n = keys.shape[0]
    height, width = size
    grid = keys.reshape(n, height, width, -1).permute(0, 3, 1, 2)  # (N, C, h, w), channels-last memory
    upscaled = decoder.upscale_conv1(grid)
    upscaled = decoder.activation(decoder.upscale_layer_norm(upscaled))
    upscaled = decoder.activation(_channels_last_call(decoder.upscale_conv2, upscaled))  # (N, c, 4h, 4w)
    picked = range(1, decoder.num_mask_tokens) if multimask else range(1)
    hyper_in = torch.stack([decoder.output_hypernetworks_mlps[i](queries[:, 0, 1 + i]) for i in picked], dim=1)
    pixels = upscaled.permute(0, 2, 3, 1).reshape(n, -1, upscaled.shape[1])  # (N, 16hw, c): free when channels-last
    masks = (pixels @ hyper_in.transpose(1, 2).to(pixels.dtype)).transpose(1, 2)
    masks = masks.reshape(n, len(picked), *upscaled.shape[-2:])
    iou = decoder.iou_prediction_head(queries[:, 0, 0])[:, list(picked)]
    return masks, iou


# Objects decoded together per pass through the transformer and mask head. Each object carries ~8 MiB
# float32 maps (its 256 x 256 x 32 upscaled features; 4,096 x 256 image tokens per layer); in small groups
# these stay in cache and below glibc's largest mmap threshold (32 MiB), above which every allocation is
# mapped and page-faulted afresh. Measured on the demo tile (LiteMedSAM, one core): 16 objects per pass
# 23.2 s, 4: 18.2 s, 2: 16.9 s, 1: 16.4 s for the box start's 8 rounds (benchmarks/EVALUATION.md).
_GROUP_BYTES = 16 << 20


def objects_per_pass(size: tuple[int, int], channels: int) -> int:
    """How many objects :func:`decode_objects` runs through the decoder at once for an ``size`` embedding
    grid whose upscaled features (16x the grid, ``channels`` wide) are the largest per-object float32 map."""
    per_object = 16 * size[0] * size[1] * channels * 4
    return max(1, _GROUP_BYTES // per_object)


@torch.no_grad()
def decode_objects(
    model: nn.Module,
    tokens: ImageTokens,
    input_points: torch.Tensor | None,
    input_labels: torch.Tensor | None,
    input_boxes: torch.Tensor | None,
    multimask: bool,
    dense: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-res mask logits ``(N, K, 4h, 4w)`` (float32) and IoU predictions ``(N, K)`` for N objects of one image.

    Prompts in the model frame as ``SamModel.forward`` takes them with one object per batch entry:
    ``input_points`` ``(N, 1, P, 2)``, ``input_labels`` ``(N, 1, P)``, ``input_boxes`` ``(N, 1, 4)``.
    ``dense``: per-object mask-input embeddings ``(N, C, h, w)`` (``prompt_encoder.mask_embed``), which
    disable the shared layer-0 projections. Needs :func:`fast_decoder_supported`. The objects run through
    the decoder a few at a time (:func:`objects_per_pass`); rows are independent, so grouping does not
    change what each object gets.
    """
    sam = unwrap_sam(model)
    decoder = _decoder(sam)
    device = tokens.keys.device
    # one autocast region for all groups: autocast caches its bf16 copies of the weights until the region
    # closes, so the decoder's weights are cast once per call instead of once per group
    with autocast_to(device, tokens.autocast_dtype):
        sparse, _ = sam.prompt_encoder(input_points=input_points, input_labels=input_labels,
                                       input_boxes=input_boxes, input_masks=None)
        sparse = sparse[:, 0]
        n = sparse.shape[0]
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        point_embeddings = torch.cat([output_tokens.expand(n, -1, -1), sparse.to(output_tokens.dtype)], dim=1)
        point_embeddings = point_embeddings.to(decoder.iou_token.weight.dtype)[:, None]
        group = objects_per_pass(tokens.size, decoder.upscale_conv2.out_channels)
        outputs = [
            _decode_group(decoder, tokens, point_embeddings[i : i + group], None if dense is None else dense[i : i + group], multimask)
            for i in range(0, n, group)
        ]
    masks, iou = (torch.cat(parts) for parts in zip(*outputs))
    return masks, iou


def _decode_group(decoder: SamMaskDecoder, tokens: ImageTokens, point_embeddings: torch.Tensor,
                  dense: torch.Tensor | None, multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`decode_objects` after the prompt encoder, for one group of objects ``(n, 1, T, C)``, inside its
    autocast region (if any)."""
    transformer = decoder.transformer
    queries = point_embeddings
    layers = list(transformer.layers)
    if dense is None:
        queries, keys = _first_layer_shared(layers[0], queries, point_embeddings, tokens)
    else:
        keys = _tokens(tokens.embeddings + dense)
        queries, keys = _later_layer(layers[0], queries, keys, point_embeddings, tokens.key_addends[0], tokens.query_addends[0])
    for layer, key_addend, query_addend in zip(layers[1:], tokens.key_addends[1:], tokens.query_addends[1:]):
        queries, keys = _later_layer(layer, queries, keys, point_embeddings, key_addend, query_addend)
    final = transformer.final_attn_token_to_image
    attn_out = _attend_image(final, final.q_proj(queries + point_embeddings), _image_operands(keys), tokens.final_key_addend)
    queries = transformer.layer_norm_final_attn(queries + attn_out)
    # the mask head in float32: its logits are thresholded at 0 on small objects' boundaries, where bf16
    # upscaling moved masks by a pixel (LiteMedSAM demo tile, box round 0: mean IoU 0.95 vs 0.99+)
    with torch.autocast(device_type=tokens.keys.device.type, enabled=False):
        masks, iou = _mask_head(decoder, queries.float(), keys.float(), tokens.size, multimask)
    return masks.float(), iou.float()
