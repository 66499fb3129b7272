"""SAM's forward, split as interactive use needs it: the image encoder once, the prompt decoder per prompt.

Any ``SamModel`` or ``PeftModel`` wrapping one works (also under DDP / DataParallel: :func:`unwrap_sam`):
prompts and masks go through the model's normal ``forward(image_embeddings=...)``; only the image encoder
is reached directly (``SamModel.get_image_embeddings`` runs under ``no_grad`` and cannot be trained).
Training (``hf_sam_peft.training.interactive``) and inference (``hf_sam_peft.evaluation.predictor``) both
call :func:`encode_images` and :func:`decode`, so evaluation sees exactly what training saw.

Deliberate deviation (mechanics, not science): objects are flattened into the batch axis of the mask
decoder (one "image" per object) instead of passing them as SAM's point batch: transformers'
``SamMaskDecoder`` adds the dense (mask) embedding per image, so only this layout gives each object its
own mask input. Images with and without mask input go through separate decoder calls. The arithmetic per
object is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from hf_sam_peft.sam_forward.frames import Prompts

__all__ = ["decode", "encode_images", "unwrap_sam"]


def unwrap_sam(model: nn.Module) -> nn.Module:
    """The ``SamModel`` inside ``model`` (through DDP / DataParallel ``.module`` and peft's ``get_base_model``)."""
    inner = model
    while isinstance(inner, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        inner = inner.module
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    if not hasattr(inner, "vision_encoder") or not hasattr(inner, "mask_decoder"):
        raise TypeError(f"model must be a SamModel or a peft model wrapping one, got {type(model).__name__}")
    return inner


def encode_images(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Image embeddings ``(B, C, h, w)`` with the autograd graph (unlike ``SamModel.get_image_embeddings``)."""
    return unwrap_sam(model).vision_encoder(pixel_values).last_hidden_state


def decode(
    model: nn.Module,
    embeddings: torch.Tensor,
    prompts: Prompts,
    multimask: bool,
    mask_inputs: torch.Tensor | None = None,
    use_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-res mask logits ``(B, N, K, h', w')`` and IoU predictions ``(B, N, K)`` from the model's forward.

    ``mask_inputs`` ``(B, N, 1, h', w')`` are used for the images where ``use_mask`` ``(B,)`` is true.
    """
    source = prompts.boxes if prompts.boxes is not None else prompts.points
    if source is None:
        raise ValueError("prompts must hold points and/or boxes")
    batch, n_obj = source.shape[:2]
    flat_emb = embeddings.repeat_interleave(n_obj, dim=0)
    flat = {
        "input_points": None if prompts.points is None else prompts.points.flatten(0, 1)[:, None],
        "input_labels": None if prompts.labels is None else prompts.labels.flatten(0, 1)[:, None],
        "input_boxes": None if prompts.boxes is None else prompts.boxes.flatten(0, 1)[:, None],
    }
    if mask_inputs is None or use_mask is None or not bool(use_mask.any()):
        groups = [(torch.arange(batch * n_obj, device=embeddings.device), None)]
    else:
        flat_use = use_mask.to(embeddings.device).repeat_interleave(n_obj)
        flat_masks = mask_inputs.flatten(0, 1)
        groups = [(torch.nonzero(~flat_use).flatten(), None), (torch.nonzero(flat_use).flatten(), flat_masks)]
    groups = [(index, masks) for index, masks in groups if index.numel() > 0]
    lows, ious, order = [], [], []
    for index, masks in groups:
        # one group of all rows (no mask input, or all images with one): no gather, no scatter in backward
        pick = (lambda t: t) if len(groups) == 1 else (lambda t: t[index])
        kwargs = {k: (None if v is None else pick(v)) for k, v in flat.items()}
        out = model(
            image_embeddings=pick(flat_emb),
            input_masks=None if masks is None else pick(masks),
            multimask_output=multimask,
            **kwargs,
        )
        lows.append(out.pred_masks[:, 0])
        ious.append(out.iou_scores[:, 0])
        order.append(index)
    if len(groups) == 1:
        low, iou = lows[0], ious[0]
    else:
        inverse = torch.argsort(torch.cat(order))
        low = torch.cat(lows)[inverse]
        iou = torch.cat(ious)[inverse]
    return low.reshape(batch, n_obj, *low.shape[1:]), iou.reshape(batch, n_obj, -1)
