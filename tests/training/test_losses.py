"""µSAM's per-round loss on hand-made cases."""

from __future__ import annotations

import pytest
import torch

from hf_sam_peft.row_loops import force_row_by_row
from hf_sam_peft.training.losses import batch_round_loss, dice_loss, mask_and_iou_loss, mask_iou

BIG = 30.0  # a logit whose sigmoid is 1 to float precision


def test_dice_loss_hand_values():
    target = torch.tensor([[1.0, 1.0, 0.0, 0.0]])[None]
    assert dice_loss(target.clone(), target).item() == pytest.approx(0.0, abs=1e-7)
    assert dice_loss(1 - target, target).item() == pytest.approx(1.0)
    probs = torch.tensor([[1.0, 0.5, 0.0, 0.0]])[None]
    # 1 - 2 * 1.5 / (1.25 + 2): squares in the denominator (torch_em's form), not plain sums
    assert dice_loss(probs, target).item() == pytest.approx(1 - 3 / 3.25)
    empty = torch.zeros(1, 1, 4)
    assert dice_loss(empty, empty).item() == pytest.approx(1.0)  # eps-clamped denominator, no NaN
    with pytest.raises(ValueError, match="share"):
        dice_loss(torch.zeros(1, 2, 2), torch.zeros(1, 3, 3))


def test_mask_iou_thresholds_at_half():
    target = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)[None]
    probs = torch.tensor([[0.9, 0.6, 0.4, 0.7]])[None]  # > 0.5: pixels 0, 1, 3
    assert mask_iou(probs, target).item() == pytest.approx(2 / 4)


def test_mask_and_iou_loss_takes_best_mask_and_regresses_iou():
    target = torch.zeros(2, 4, 4, dtype=torch.bool)
    target[0, :2], target[1, :, :2] = True, True
    logits = torch.full((2, 3, 4, 4), -BIG)
    logits[0, 1][target[0]] = BIG  # object 0: mask 1 is perfect, masks 0 and 2 are empty
    logits[1, 2] = BIG  # object 1: mask 2 covers everything (Dice 2*8/(16+8)), the rest are empty
    true_iou = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.5]])
    dice, mse = mask_and_iou_loss(logits, true_iou.clone(), target)
    assert dice.item() == pytest.approx((0.0 + (1 - 16 / 24)) / 2, abs=1e-6)  # min over masks, mean over objects
    assert mse.item() == pytest.approx(0.0, abs=1e-10)
    _, mse = mask_and_iou_loss(logits, torch.full((2, 3), 0.5), target)
    assert mse.item() == pytest.approx(((true_iou - 0.5) ** 2).mean().item())


def test_iou_target_carries_no_gradient():
    target = torch.zeros(1, 4, 4, dtype=torch.bool)
    target[0, 1:3, 1:3] = True
    logits = torch.randn(1, 1, 4, 4, requires_grad=True)
    iou_pred = torch.tensor([[0.3]], requires_grad=True)
    _, mse = mask_and_iou_loss(logits, iou_pred, target)
    mse.backward()
    assert (logits.grad is None or not logits.grad.any()) and iou_pred.grad is not None and iou_pred.grad.abs().item() > 0


def test_batch_round_loss_is_mean_over_images_of_any_size():
    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(2, 1, 5, 6, generator=gen), torch.randn(2, 1, 8, 3, generator=gen)]
    targets = [torch.rand(2, 5, 6, generator=gen) > 0.5, torch.rand(2, 8, 3, generator=gen) > 0.5]
    ious = torch.rand(2, 2, 1, generator=gen)
    dice, mse = batch_round_loss(logits, ious, targets)
    parts = [mask_and_iou_loss(m, i, t) for m, i, t in zip(logits, ious, targets)]
    assert dice.item() == pytest.approx((parts[0][0] + parts[1][0]).item() / 2)
    assert mse.item() == pytest.approx((parts[0][1] + parts[1][1]).item() / 2)
    with pytest.raises(ValueError, match="one entry per image"):
        batch_round_loss(logits[:1], ious, targets)


@pytest.mark.parametrize("per_mask", [True, False], ids=["mask-by-mask (CPU)", "batched (GPU)"])
def test_fused_sums_match_the_reference_formulas_and_their_gradients(per_mask):
    """mask_and_iou_loss's one-pass sums give dice_loss(σ(x), t) / mask_iou(σ(x), t) and the same gradient,
    in both forms (hf_sam_peft.row_loops)."""
    with force_row_by_row(per_mask):
        check_fused_sums()


def check_fused_sums():
    from hf_sam_peft.training.losses import _SigmoidDiceSums

    gen = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(3, 2, 9, 7, generator=gen, dtype=torch.float64)).requires_grad_(True)
    target = torch.rand(3, 9, 7, generator=gen) > 0.6
    ious = torch.rand(3, 2, generator=gen, dtype=torch.float64)
    dice, mse = mask_and_iou_loss(logits, ious, target)
    (dice + mse).backward()
    fused_grad = logits.grad.clone()

    ref = logits.detach().clone().requires_grad_(True)
    probs = torch.sigmoid(ref)
    ref_dice = dice_loss(probs, target[:, None]).min(dim=1).values.mean()
    ref_mse = torch.nn.functional.mse_loss(ious, mask_iou(probs, target[:, None]).double())
    (ref_dice + ref_mse).backward()
    # the loss runs in float32 (as under autocast), the reference here in float64
    assert dice.item() == pytest.approx(ref_dice.item(), abs=1e-6)
    assert mse.item() == pytest.approx(ref_mse.item(), abs=1e-6)
    assert torch.allclose(fused_grad, ref.grad, atol=1e-6)
    # and the hand-written backward is the true derivative
    small = logits.detach()[:1, :, :3, :3].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: _SigmoidDiceSums.apply(x, target[:1, :3, :3].double())[:2], (small,))


def test_fused_sums_keep_float32_under_bf16_autocast():
    """Both forms give float32 sums inside a bf16 autocast region (as the training step runs them): the same
    numbers as without autocast, to float32 summation order."""
    from hf_sam_peft.training.losses import _SigmoidDiceSums

    gen = torch.Generator().manual_seed(2)
    logits = 3 * torch.randn(5, 3, 64, 48, generator=gen)
    target = (torch.rand(5, 64, 48, generator=gen) > 0.5).float()
    for per_mask in (True, False):
        with force_row_by_row(per_mask):
            plain = _SigmoidDiceSums.apply(logits, target)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                under = _SigmoidDiceSums.apply(logits, target)
        for a, b in zip(plain, under):
            assert b.dtype == torch.float32 and torch.allclose(a, b, rtol=1e-5), per_mask
