"""µSAM's per-round loss: Dice loss on the best of the predicted masks + MSE of the predicted IoU.

As in ``micro_sam/training/sam_trainer.py``: the Dice loss is torch_em's ``1 - 2Σpt / (Σp² + Σt²)`` on
``sigmoid(logits)`` at the input resolution, per object and mask; with several masks per object (multimask)
the minimum over the masks is taken, then the mean over objects. The IoU regression target is the IoU of
``sigmoid > 0.5`` with the target, without gradient; the MSE is the mean over objects and masks. Both terms
are weighted 1:1.

Deliberate deviation: µSAM sums the per-image terms over the batch; we average them over the images of the
batch (``SamTrainer._compute_loss`` adds them up image by image), so the loss scale does not depend on the batch size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from hf_sam_peft.row_loops import row_by_row

EPS = 1e-7


def dice_loss(probs: torch.Tensor, target: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``1 - 2Σpt / (Σp² + Σt²)`` over the last two dims (one value per leading index)."""
    if probs.shape[-2:] != target.shape[-2:]:
        raise ValueError(f"probs and target must share (H, W), got {tuple(probs.shape)} and {tuple(target.shape)}")
    target = target.to(probs.dtype)
    numerator = (probs * target).sum((-2, -1))
    denominator = (probs * probs).sum((-2, -1)) + (target * target).sum((-2, -1))
    # clamped, not eps-added, as torch_em's dice_score (loss/dice.py): an empty pair scores 1 - 0 = 1
    return 1.0 - 2.0 * numerator / denominator.clamp(min=eps)


@torch.no_grad()
def mask_iou(probs: torch.Tensor, target: torch.Tensor, threshold: float = 0.5, eps: float = EPS) -> torch.Tensor:
    """IoU of ``probs > threshold`` with the boolean ``target`` over the last two dims (no gradient)."""
    pred = probs > threshold
    target = target.bool()
    overlap = (pred & target).sum((-2, -1)).float()
    union = (pred | target).sum((-2, -1)).float()
    return overlap / (union + eps)


class _SigmoidDiceSums(torch.autograd.Function):
    """``(Σ σ(x)·t, Σ σ(x)², Σ [σ(x) > 0.5]·t, Σ [σ(x) > 0.5])`` over the last two dims of ``x`` ``(N, K, H, W)``.

    Without saving probability maps: backward recomputes ``σ`` from the logits. The counts carry no gradient.
    On a CPU mask by mask, so that each full-resolution map is read while it sits in cache (memory bandwidth,
    not arithmetic, bounds these sums there); elsewhere in one batched pass, since on a GPU the loop would
    dispatch ~43 ops per mask, forward and backward (:mod:`hf_sam_peft.row_loops`).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor):  # target: (N, H, W) float 0/1
        # the path is fixed at forward time, so backward recomputes σ the same way
        ctx.row_by_row = row_by_row(logits)
        ctx.save_for_backward(logits, target)  # the logits, not σ: backward recomputes it rather than keep a copy
        if not ctx.row_by_row:
            # batched, one full-size temporary at a time; elementwise products and sums in the logits' dtype
            # (float32), not bmm, which autocast would run in bf16 and a GPU may run in TF32
            n_obj, n_masks, pixels = logits.shape[0], logits.shape[1], logits[0, 0].numel()
            with torch.autocast(logits.device.type, enabled=False):
                probs = torch.sigmoid(logits.reshape(n_obj, n_masks, pixels))
                t = target.reshape(n_obj, 1, pixels)
                inter, squares = (probs * t).sum(-1), probs.square().sum(-1)
                predicted = probs > 0.5
                overlap = torch.count_nonzero(predicted & (t > 0.5), dim=-1).to(probs.dtype)
                counts = torch.count_nonzero(predicted, dim=-1).to(probs.dtype)
            ctx.mark_non_differentiable(overlap, counts)
            return inter, squares, overlap, counts
        n_obj, n_masks = logits.shape[:2]
        sums = logits.new_empty(4, n_obj, n_masks)
        for n in range(n_obj):
            t = target[n].flatten()
            for k in range(n_masks):
                probs = torch.sigmoid(logits[n, k].flatten())
                predicted = (probs > 0.5).to(probs.dtype)
                sums[0, n, k] = torch.dot(probs, t)
                sums[1, n, k] = torch.dot(probs, probs)
                sums[2, n, k] = torch.dot(predicted, t)
                sums[3, n, k] = predicted.sum()
        inter, squares, overlap, counts = sums.unbind(0)
        ctx.mark_non_differentiable(overlap, counts)
        return inter, squares, overlap, counts

    @staticmethod
    def backward(ctx, grad_inter, grad_squares, _grad_overlap, _grad_counts):
        logits, target = ctx.saved_tensors
        if not ctx.row_by_row:  # (g_inter·t + 2·g_squares·σ)·σ·(1 - σ), in place on two full-size tensors
            probs = torch.sigmoid(logits)
            grad = probs * (2.0 * grad_squares[..., None, None])
            grad.addcmul_(grad_inter[..., None, None], target[:, None]).mul_(probs)
            # `probs` becomes 1 - σ in place only here, after its last use as σ
            return grad.mul_(probs.neg_().add_(1.0)), None
        grad = torch.empty_like(logits)
        for n in range(logits.shape[0]):
            for k in range(logits.shape[1]):
                probs = torch.sigmoid(logits[n, k])
                slope = probs * (1.0 - probs)
                grad[n, k] = (grad_inter[n, k] * target[n] + 2.0 * grad_squares[n, k] * probs) * slope
        return grad, None


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
    # the same numbers as dice_loss(σ(x), t) and mask_iou(σ(x), t), from one fused pass (_SigmoidDiceSums)
    target = targets.float()  # float32 sums also under bf16/fp16 autocast
    inter, squares, overlap, predicted = _SigmoidDiceSums.apply(mask_logits.float(), target)
    target_sum = target.sum((-2, -1))[:, None]  # Σt² = Σt for a 0/1 target
    dice = 1.0 - 2.0 * inter / (squares + target_sum).clamp(min=EPS)
    # |P ∪ T| = |P| + |T| - |P ∩ T|: mask_iou's value; without gradient, since the counts are non-differentiable
    true_iou = overlap / (predicted + target_sum - overlap + EPS)
    # min over the K masks: with multimask output only the best of SAM's masks for each object is trained
    return dice.min(dim=1).values.mean(), F.mse_loss(iou_predictions.float(), true_iou)


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
