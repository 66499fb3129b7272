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
- per object, later layers and the final attention never project the image tokens (their projections fold
  into the few prompt tokens), and the mask head runs only for the mask tokens that are returned: that
  arithmetic, shared with training's decoder path, lives in :mod:`hf_sam_peft.modeling.mask_decoder` (the one
  module that overrides transformers' decoder; its docstring lists every override and why);
- objects go through in small groups (:func:`objects_per_pass`) whose maps stay in cache.

The order of the arithmetic differs from transformers' (float32 results agree to rounding,
``tests/modeling/test_mask_decoder.py``, ``tests/evaluation/test_fast_eval.py``); the modules are the model's
own (LayerNorms, MLPs, self-attention, projection weights, upscaling convolutions, IoU head), so fine-tuned
decoders (peft ``modules_to_save`` copies) run through it too. With a mask input (``dense``) the image tokens
differ per object and layer 0 runs per object like the later layers.

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
from transformers.models.sam.modeling_sam import SamMaskDecoder

from hf_sam_peft.modeling.mask_decoder import (
    attend_few_keys,
    attend_projected,
    decoder_overrides_apply,
    folded_final_token_to_image,
    folded_two_way_layer,
    head_addend,
    head_split,
    mask_head,
    project,
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
        # as ModulesToSaveWrapper.forward: the original module under disable_adapter() or without an active copy,
        # else the first active adapter's copy
        if getattr(module, "disable_adapters", False) or not active:
            return module.original_module
        return copies[active[0]]
    return module


def _decoder(sam: nn.Module) -> SamMaskDecoder:
    return active_module(sam.mask_decoder)


def fast_decoder_supported(model: nn.Module) -> bool:
    """Whether :func:`decode_objects` reproduces ``model``'s decoder
    (:func:`~hf_sam_peft.modeling.mask_decoder.decoder_overrides_apply`): transformers' ``SamMaskDecoder`` and
    two-way transformer (or our fused one) with plain ``nn.Linear`` attention projections (an adapter
    wrapping them, e.g. LoRA on the decoder, is decoded through the model's forward instead).

    SAM 2's ``Sam2MaskDecoder`` is not: it adds an object-score token to the output tokens, its upscaling adds
    the two high-resolution maps, and its single-mask choice differs (``sam_forward.forward``); reproducing
    those here would be a second copy of that decoder to keep in step with transformers. SAM 2 models decode
    through the model's forward (the plain path), which training uses too."""
    return decoder_overrides_apply(_decoder(unwrap_sam(model)))


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
        # the image tokens SamMaskDecoder starts from: the embedding plus the (no-mask) dense prompt embedding
        keys = _tokens(embeddings + dense)
        layers = transformer.layers
        key_addends = [head_addend(layer.cross_attn_token_to_image, "k_proj", positions) for layer in layers]
        query_addends = [head_addend(layer.cross_attn_image_to_token, "q_proj", positions) for layer in layers]
        final_key_addend = head_addend(transformer.final_attn_token_to_image, "k_proj", positions)
        to_image, to_token = layers[0].cross_attn_token_to_image, layers[0].cross_attn_image_to_token
        # both read tokens + positions, so one matmul over the two stacked weights; the value reads the tokens alone
        key, query = project(keys + positions, (to_image.k_proj, to_token.q_proj))
        value = to_image.v_proj(keys)
        query = head_split(query, to_token.num_attention_heads).transpose(-1, -2).contiguous()  # (1, heads, d, N)
    return ImageTokens(embeddings, keys, key.contiguous(), value.contiguous(), query,
                       key_addends, query_addends, final_key_addend, autocast_dtype)


def _first_layer_shared(layer: nn.Module, queries: torch.Tensor, query_pos: torch.Tensor,
                        tokens: ImageTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer 0 of the two-way transformer (:func:`~hf_sam_peft.modeling.mask_decoder.two_way_layer`) for N
    objects whose image tokens are shared (the evaluation cache's part of the decoder).

    ``queries`` ``(N, 1, T, C)``. The token->image attention runs once with all objects' queries stacked
    (``(1, 1, N*T, .)``) against the cached keys / values; the image->token attention uses the cached image
    queries against each object's own tokens.
    """
    n, _, n_tokens, _ = queries.shape
    queries = token_self_attention(layer, queries, query_pos)

    to_image, to_token = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
    query = to_image.q_proj(queries + query_pos).reshape(1, 1, n * n_tokens, -1)
    attn_out = attend_projected(to_image, query, tokens.first_key, tokens.first_value, None).reshape(n, 1, n_tokens, -1)
    queries = layer.layer_norm2(queries + attn_out)
    queries = layer.layer_norm3(queries + layer.mlp(queries))

    token_key = to_token.k_proj(queries + query_pos)
    attn_out = attend_few_keys(to_token, tokens.first_query, token_key, to_token.v_proj(queries))
    keys = layer.layer_norm4(tokens.keys + attn_out)
    return queries, keys


# Objects decoded together per pass through the transformer and mask head. Each object carries ~8 MiB
# float32 maps (its 256 x 256 x 32 upscaled features; 4,096 x 256 image tokens per layer); in small groups
# these stay in cache and below glibc's largest mmap threshold (32 MiB), above which every allocation is
# mapped and page-faulted afresh. Measured on the demo tile (LiteMedSAM, one core): 16 objects per pass
# 23.2 s, 4: 18.2 s, 2: 16.9 s, 1: 16.4 s for the box start's 8 rounds (benchmarks/EVALUATION.md).
_GROUP_BYTES = 16 << 20


def objects_per_pass(size: tuple[int, int], channels: int) -> int:
    """How many objects :func:`decode_objects` runs through the decoder at once for an ``size`` embedding
    grid whose upscaled features (16x the grid, ``channels`` wide) are the largest per-object float32 map."""
    # 16: the mask head upscales the grid 4x per side; 4 bytes per float32
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
        # (N, 1, T, C) -> (N, T, C): one point batch per object
        sparse = sparse[:, 0]
        n = sparse.shape[0]
        # SamMaskDecoder's token order: the IoU token, the mask tokens, then the prompt tokens
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        point_embeddings = torch.cat([output_tokens.expand(n, -1, -1), sparse.to(output_tokens.dtype)], dim=1)
        # [:, None]: back to (N, 1, T, C), the point-batch axis the two-way transformer works in
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
    # the initial tokens (output + prompt) double as every layer's query positional encoding (query_point_embedding)
    queries = point_embeddings
    layers = list(transformer.layers)
    # no mask input: layer 0 from the per-image cache; with one the image tokens differ per object and layer 0
    # is folded like the later ones
    if dense is None:
        queries, keys = _first_layer_shared(layers[0], queries, point_embeddings, tokens)
    else:
        keys = _tokens(tokens.embeddings + dense)
        queries, keys = folded_two_way_layer(layers[0], queries, keys, point_embeddings, tokens.key_addends[0],
                                             tokens.query_addends[0])
    for layer, key_addend, query_addend in zip(layers[1:], tokens.key_addends[1:], tokens.query_addends[1:]):
        queries, keys = folded_two_way_layer(layer, queries, keys, point_embeddings, key_addend, query_addend)
    queries = folded_final_token_to_image(transformer, queries, keys, point_embeddings, tokens.final_key_addend)
    # the mask head in float32: its logits are thresholded at 0 on small objects' boundaries, where bf16
    # upscaling moved masks by a pixel (LiteMedSAM demo tile, box round 0: mean IoU 0.95 vs 0.99+)
    with torch.autocast(device_type=tokens.keys.device.type, enabled=False):
        masks, iou = mask_head(decoder, queries.float(), keys.float(), tokens.size, multimask)
    return masks.float(), iou.float()
