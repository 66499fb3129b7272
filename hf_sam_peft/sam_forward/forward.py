"""SAM's forward, split as interactive use needs it: the image encoder once, the prompt decoder per prompt.

Any ``SamModel`` / ``Sam2Model`` or ``PeftModel`` wrapping one works (also under DDP / DataParallel:
:func:`unwrap_sam`): prompts and masks go through the model's normal ``forward(image_embeddings=...)``; only
the image encoder is reached directly (``get_image_embeddings`` runs under ``no_grad`` in both and cannot be
trained). Training (``hf_sam_peft.training.interactive``) and inference (``hf_sam_peft.evaluation.predictor``)
both call :func:`encode_images` and :func:`decode`, so evaluation sees exactly what training saw.

Deliberate deviation (mechanics, not science): objects are flattened into the batch axis of the mask
decoder (one "image" per object) instead of passing them as SAM's point batch: transformers' mask decoders
add the dense (mask) embedding per image, so only this layout gives each object its own mask input. Images
with and without mask input go through separate decoder calls. The arithmetic per object is unchanged.

SAM-HQ (``SamHQModel``): the embeddings carry the early ViT features its mask decoder fuses into the HQ
output (:func:`hf_sam_peft.sam_forward.kinds.decoder_inputs`), and the masks are transformers' default
``hq_token_only=False``: SAM's mask token(s) plus the HQ token's mask, the official SAM-HQ predictor's default
output (SysCV/sam-hq, ``segment_anything/predictor.py``, ``hq_token_only=False``), in training and evaluation
alike; the IoU head is SAM's. SAM 3 tracker (``Sam3TrackerModel``) and EdgeTAM (``EdgeTamModel``) take SAM 2's
path below (their mask decoders are SAM 2's).

SAM 2 (``Sam2Model``, image model only), where it differs from SAM:

- **Embeddings** are three maps (:mod:`hf_sam_peft.sam_forward.kinds`). :func:`encode_images` computes them as
  ``Sam2Model.get_image_embeddings`` does, with the graph: the vision encoder (:func:`vision_features`), then
  :func:`embeddings_from_features`: the mask decoder's ``conv_s0`` / ``conv_s1`` on the two high-resolution
  FPN levels and ``no_memory_embedding`` added to the last. The split lets a frozen encoder run without a
  graph while those decoder-owned convolutions (trained with the mask decoder) still get gradients.
  :func:`decode` repeats every level per object.
- **Single-mask output.** transformers' ``Sam2MaskDecoder`` (as the official ``sam2/modeling/sam/mask_decoder.py``)
  with ``multimask_output=False`` returns output token 0, except in eval mode with
  ``dynamic_multimask_via_stability`` (on in every released SAM 2 config): there, when token 0's stability
  score (IoU of the mask thresholded at +-0.05) is below 0.98, it returns the multimask token (1-3) with the
  highest predicted IoU instead — an inference heuristic "to ensure a valid mask for both clicking and
  tracking". We return token 0 in training *and* evaluation by default (``dynamic_multimask=False``): µSAM's
  protocol (its objective and its evaluation take the single-mask token), the output the objective trains
  (the heuristic never runs in training mode, in transformers nor in the official training code), and the
  same output for validation (which runs in eval mode) as for the training step. ``dynamic_multimask=True``
  gives the SAM 2 predictor's semantics.
- **Object score.** ``Sam2MaskDecoder`` also predicts an object score. The official video/training path
  (``SAM2Base._forward_sam_heads``, ``sam2/modeling/sam2_base.py``) sets masks to ``NO_OBJ_SCORE`` = -1024
  where the score is <= 0 (and the official training adds an object-score loss); the official image predictor
  (``SAM2ImagePredictor._predict``, ``sam2/sam2_image_predictor.py``, which calls the mask decoder directly
  and drops the score) and transformers' ``Sam2Model.forward`` (returns ``object_score_logits``) do not gate.
  We do not gate, in training nor in evaluation: µSAM's objective has no object-score term (every training
  prompt points at an object, so gating could only cut the mask loss's gradient for objects the score
  head misjudges on the new data, with nothing in the objective to correct the head), and for evaluation
  we follow the image predictor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from hf_sam_peft.sam_forward.frames import Prompts
from hf_sam_peft.sam_forward.kinds import (
    SAM_HQ,
    ImageEmbeddings,
    decoder_inputs,
    embedding_levels,
    is_sam2,
    main_embedding,
    map_embeddings,
    model_kind,
    unwrap_sam,
)

__all__ = [
    "decode", "embeddings_from_features", "encode_images", "frozen_batch_norms_in_eval", "single_mask_token",
    "unwrap_sam", "vision_features",
]


def vision_features(model: nn.Module, pixel_values: torch.Tensor) -> ImageEmbeddings:
    """The vision encoder's output, with its graph: SAM's image embedding ``(B, C, h, w)``, SAM-HQ's
    ``[early ViT features, image embedding]``, SAM 2's FPN maps (high resolution first, before the mask decoder's
    projections; SAM 3's first three). Only the vision encoder's parameters act.

    Frozen BatchNorms (EdgeTAM's RepViT) run on their running statistics in training mode too
    (:func:`frozen_batch_norms_in_eval`)."""
    sam = unwrap_sam(model)
    with frozen_batch_norms_in_eval(sam.vision_encoder):
        output = sam.vision_encoder(pixel_values)
    if is_sam2(sam):
        # SAM 3's neck has a fourth, stride-28 level that only its detector reads (Sam3TrackerVideoModel drops it)
        return list(output.fpn_hidden_states)[:3]
    if model_kind(sam) == SAM_HQ:
        # the first global-attention block's output only: SamHQModel's mask decoder reads intermediate_embeddings[0]
        # alone (transformers' models/sam_hq/modeling_sam_hq.py)
        return [output.intermediate_embeddings[0], output.last_hidden_state]
    return output.last_hidden_state


@contextlib.contextmanager
def frozen_batch_norms_in_eval(encoder: nn.Module) -> Iterator[None]:
    """Within the block, every BatchNorm of ``encoder`` whose parameters are all frozen is in eval mode.

    Why: a BatchNorm in training mode normalises with the batch's statistics and overwrites its running ones,
    which are buffers no adapter saves: a "frozen" convolutional encoder (EdgeTAM's RepViT) would drift in
    training and differ between the trained model and its reloaded adapter. Trained BatchNorms (Full FT) keep
    the mode they are in. A no-op for encoders without BatchNorm (the ViTs, Hiera)."""
    norms = [
        m for m in encoder.modules()
        # only norms in training mode now, so that exactly these are switched back; a norm without parameters
        # (affine=False) counts as frozen, as nothing of it can train
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
        and not any(p.requires_grad for p in m.parameters(recurse=False))
    ]
    for norm in norms:
        norm.train(False)
    try:
        yield
    finally:
        for norm in norms:
            norm.train(True)


def embeddings_from_features(model: nn.Module, features: ImageEmbeddings) -> ImageEmbeddings:
    """:func:`vision_features` -> the image embeddings the mask decoder takes (identity for SAM and SAM-HQ).

    SAM 2 (and SAM 3 tracker, EdgeTAM): ``Sam2Model.get_image_features`` + ``get_image_embeddings`` without their
    flatten / reshape round trip: ``conv_s0`` / ``conv_s1`` (the mask decoder's; peft's ``modules_to_save``
    wrapper hands out the active copy) on the first two levels, ``no_memory_embedding`` added to the last.

    SAM 3, deliberately unlike transformers' ``Sam3TrackerModel.get_image_embeddings``: with SAM 3's four-level
    neck (the released ``facebook/sam3``) that method adds ``no_memory_embedding`` to the fourth level and then
    drops it (``zip`` with three ``backbone_feature_sizes``), so its stride-14 map never gets it; we add it to the
    stride-14 map, as ``Sam3TrackerVideoModel.get_image_features`` (``fpn_hidden_states[:-1]``) and the official
    tracker (facebookresearch/sam3, the SAM 2 ``directly_add_no_mem_embed`` path) do. With a three-level neck
    (our tiny config) both agree.
    """
    sam = unwrap_sam(model)
    if not is_sam2(sam):
        return features
    levels = embedding_levels(features)
    if len(levels) != 3:
        raise ValueError(f"SAM 2 features must be three FPN levels, got {len(levels)}")
    decoder = sam.mask_decoder
    # (1, 1, C) in transformers -> (1, C, 1, 1) to broadcast over the (B, C, h, w) map; cast to the map's dtype,
    # since under autocast the map may be bf16 and adding the float32 parameter would promote it to float32
    memory = sam.no_memory_embedding.reshape(1, -1, 1, 1)
    return [decoder.conv_s0(levels[0]), decoder.conv_s1(levels[1]), levels[2] + memory.to(levels[2].dtype)]


def encode_images(model: nn.Module, pixel_values: torch.Tensor) -> ImageEmbeddings:
    """Image embeddings with the autograd graph (unlike ``get_image_embeddings``): a tensor ``(B, C, h, w)``
    for SAM, two for SAM-HQ, SAM 2's three maps (see the module docstring)."""
    return embeddings_from_features(model, vision_features(model, pixel_values))


@contextlib.contextmanager
def single_mask_token(model: nn.Module, dynamic_multimask: bool) -> Iterator[None]:
    """Within the block, SAM 2's single-mask output is token 0 (``dynamic_multimask=False``) or the decoder's
    own choice (see the module docstring); a no-op for SAM. Every mask decoder in the model (peft's
    ``modules_to_save`` copies too) is switched and restored (a model-level switch: not meant for one model
    decoded from several threads at once with different choices)."""
    sam = unwrap_sam(model)
    # Sam2MaskDecoder and its copies in the SAM 3 tracker and EdgeTAM: the decoders with this switch
    decoders = [] if dynamic_multimask or not is_sam2(sam) else [
        m for m in sam.mask_decoder.modules() if getattr(m, "dynamic_multimask_via_stability", False) is True
    ]
    for decoder in decoders:
        decoder.dynamic_multimask_via_stability = False
    try:
        yield
    finally:
        for decoder in decoders:
            # True is right for every one: only decoders that had it on were collected
            decoder.dynamic_multimask_via_stability = True


def decode(
    model: nn.Module,
    embeddings: ImageEmbeddings,
    prompts: Prompts,
    multimask: bool,
    mask_inputs: torch.Tensor | None = None,
    use_mask: torch.Tensor | None = None,
    dynamic_multimask: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-res mask logits ``(B, N, K, h', w')`` and IoU predictions ``(B, N, K)`` from the model's forward.

    ``embeddings``: :func:`encode_images`'s. ``mask_inputs`` ``(B, N, 1, h', w')`` are used for the images where
    ``use_mask`` ``(B,)`` is true. ``dynamic_multimask``: SAM 2 only, see the module docstring (default:
    token 0, µSAM's single mask).
    """
    source = prompts.boxes if prompts.boxes is not None else prompts.points
    if source is None:
        raise ValueError("prompts must hold points and/or boxes")
    batch, n_obj = source.shape[:2]  # (B, N): boxes and points share them
    device = main_embedding(embeddings).device
    # one decoder 'image' per object, image-major (b0o0, b0o1, ..., b1o0): the order flatten(0, 1) gives the
    # prompts. transformers' SamMaskDecoder adds the dense (mask) embedding per image and only then repeats it
    # over the point batch (models/sam/modeling_sam.py), so a point batch could not carry one mask per object
    flat_emb = map_embeddings(lambda t: t.repeat_interleave(n_obj, dim=0), embeddings)
    flat = {
        # [:, None]: a point batch of one per row: points (B*N, 1, P, 2), labels (B*N, 1, P), boxes (B*N, 1, 4)
        "input_points": None if prompts.points is None else prompts.points.flatten(0, 1)[:, None],
        "input_labels": None if prompts.labels is None else prompts.labels.flatten(0, 1)[:, None],
        "input_boxes": None if prompts.boxes is None else prompts.boxes.flatten(0, 1)[:, None],
    }
    if mask_inputs is None or use_mask is None or not bool(use_mask.any()):
        groups = [(torch.arange(batch * n_obj, device=device), None)]
    else:
        # separate calls: input_masks applies to every row of one call (rows without one need the no-mask embedding)
        flat_use = use_mask.to(device).repeat_interleave(n_obj)
        flat_masks = mask_inputs.flatten(0, 1)
        groups = [(torch.nonzero(~flat_use).flatten(), None), (torch.nonzero(flat_use).flatten(), flat_masks)]
    groups = [(index, masks) for index, masks in groups if index.numel() > 0]
    lows, ious, order = [], [], []
    # with multimask the decoders return tokens 1-3 and never consult the switch: left untouched
    with single_mask_token(model, dynamic_multimask or multimask):
        for index, masks in groups:
            # one group of all rows (no mask input, or all images with one): no gather, no scatter in backward
            pick = (lambda t: t) if len(groups) == 1 else (lambda t: t[index])
            kwargs = {k: (None if v is None else pick(v)) for k, v in flat.items()}
            out = model(
                **decoder_inputs(model, map_embeddings(pick, flat_emb)),
                input_masks=None if masks is None else pick(masks),
                multimask_output=multimask,
                **kwargs,
            )
            lows.append(out.pred_masks[:, 0])  # [:, 0]: the one point batch -> (rows, K, h', w')
            ious.append(out.iou_scores[:, 0])
            order.append(index)
    if len(groups) == 1:
        low, iou = lows[0], ious[0]
    else:
        # the groups' rows concatenated in group order; argsort of their indices restores image / object order
        inverse = torch.argsort(torch.cat(order))
        low = torch.cat(lows)[inverse]
        iou = torch.cat(ious)[inverse]
    return low.reshape(batch, n_obj, *low.shape[1:]), iou.reshape(batch, n_obj, -1)
