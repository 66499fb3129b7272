"""µSAM's per-round loss: Dice loss on the best of the predicted masks + MSE of the predicted IoU.

As in ``micro_sam/training/sam_trainer.py``: the Dice loss is torch_em's ``1 - 2Σpt / (Σp² + Σt²)`` on
``sigmoid(logits)`` at the input resolution, per object and mask; with several masks per object (multimask)
the minimum over the masks is taken, then the mean over objects. The IoU regression target is the IoU of
``sigmoid > 0.5`` with the target, without gradient; the MSE is the mean over objects and masks. Both terms
are weighted 1:1.

Deliberate deviation: µSAM sums the per-image terms over the batch; we average them over the images of the
batch (DESIGN §3), so the loss scale does not depend on the batch size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

EPS = 1e-7


def dice_loss(probs: torch.Tensor, target: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``1 - 2Σpt / (Σp² + Σt²)`` over the last two dims (one value per leading index)."""
    if probs.shape[-2:] != target.shape[-2:]:
        raise ValueError(f"probs and target must share (H, W), got {tuple(probs.shape)} and {tuple(target.shape)}")
    target = target.to(probs.dtype)
    numerator = (probs * target).sum((-2, -1))
    denominator = (probs * probs).sum((-2, -1)) + (target * target).sum((-2, -1))
    return 1.0 - 2.0 * numerator / denominator.clamp(min=eps)


@torch.no_grad()
def mask_iou(probs: torch.Tensor, target: torch.Tensor, threshold: float = 0.5, eps: float = EPS) -> torch.Tensor:
    """IoU of ``probs > threshold`` with the boolean ``target`` over the last two dims (no gradient)."""
    pred = probs > threshold
    target = target.bool()
    overlap = (pred & target).sum((-2, -1)).float()
    union = (pred | target).sum((-2, -1)).float()
    return overlap / (union + eps)


def mask_and_iou_loss(
    mask_logits: torch.Tensor, iou_predictions: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dice loss (min over masks, mean over objects) and IoU MSE for one image.

    ``mask_logits`` ``(N, K, H, W)``, ``iou_predictions`` ``(N, K)``, ``targets`` ``(N, H, W)`` (bool).
    """
    if mask_logits.ndim != 4 or targets.ndim != 3 or mask_logits.shape[0] != targets.shape[0]:
        raise ValueError(
            f"mask_logits must be (N, K, H, W) and targets (N, H, W), got {tuple(mask_logits.shape)} and {tuple(targets.shape)}"
        )
    if iou_predictions.shape != mask_logits.shape[:2]:
        raise ValueError(f"iou_predictions must be (N, K) = {tuple(mask_logits.shape[:2])}, got {tuple(iou_predictions.shape)}")
    probs = torch.sigmoid(mask_logits.float())  # float32 sums also under bf16/fp16 autocast
    target = targets[:, None]
    dice = dice_loss(probs, target).min(dim=1).values.mean()
    true_iou = mask_iou(probs, target)
    return dice, F.mse_loss(iou_predictions.float(), true_iou)


def batch_round_loss(
    mask_logits: Sequence[torch.Tensor], iou_predictions: torch.Tensor, targets: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the images of a batch of :func:`mask_and_iou_loss`: ``(dice loss, iou mse)``.

    ``mask_logits`` and ``targets`` are per-image sequences (input sizes may differ); ``iou_predictions``
    is ``(B, N, K)``.
    """
    if len(mask_logits) != len(targets) or len(targets) != iou_predictions.shape[0]:
        raise ValueError("mask_logits, iou_predictions and targets must have one entry per image")
    parts = [mask_and_iou_loss(m, iou, t) for m, iou, t in zip(mask_logits, iou_predictions, targets)]
    dice = torch.stack([p[0] for p in parts]).mean()
    mse = torch.stack([p[1] for p in parts]).mean()
    return dice, mse
