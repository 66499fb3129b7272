"""The interactive step's plumbing: the batched forms a GPU takes (row_loops)."""

from __future__ import annotations

import pytest
import torch
from transformers import SamModel

from hf_sam_peft import apply_method
from hf_sam_peft.row_loops import force_row_by_row
from hf_sam_peft.training.collate import SamInteractiveCollator
from hf_sam_peft.speed import EfficiencyOptions, prepare_model
from hf_sam_peft.training.interactive import (
    interactive_loss,
    prompt_generator,
    training_prompt_mode,
)
from tests.training.corrections import decisive_tiny_sam_config


def step_losses_and_grads(step: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = apply_method(SamModel(decisive_tiny_sam_config(image_size=128)), "lora").train()
    options = EfficiencyOptions(autocast_dtype=None)
    prepare_model(model, options, device="cpu")
    gen = torch.Generator().manual_seed(1)
    labels = torch.zeros(128, 128, dtype=torch.int64)
    for i in range(6):  # six rectangles
        y, x = divmod(i, 3)
        labels[10 + 40 * y: 40 + 40 * y, 8 + 40 * x: 30 + 40 * x + i] = i + 1
    image = (torch.rand(128, 128, 3, generator=gen) * 60 + (labels > 0)[..., None] * 120).to(torch.uint8)
    batch = SamInteractiveCollator.from_model(model)([{"image": image.numpy(), "labels": labels.numpy()}])
    loss, _ = interactive_loss(model, batch, training_prompt_mode(step), n_objects=4, n_rounds=3,
                               generator=prompt_generator(0, 0, step), options=options)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return [float(loss.detach())], grads


@pytest.mark.parametrize("step", [0, 1], ids=["point start", "box start"])
def test_the_gpu_forms_of_the_row_loops_give_the_same_step(step, corrections):
    """A training step with the CPU's row loops and with the batched forms a GPU takes: given the same
    correction prompts (``corrections.py``: float32 rounding may move a sampled point on some CPUs), the same
    loss and gradients up to float32 summation order."""
    with force_row_by_row(True), corrections.record():
        loss_rows, grads_rows = step_losses_and_grads(step)
    with force_row_by_row(False), corrections.replay():
        loss_batched, grads_batched = step_losses_and_grads(step)
    assert corrections.replayed == 2  # three rounds: two sets of corrections
    assert loss_rows == pytest.approx(loss_batched, rel=1e-5)
    assert grads_rows.keys() == grads_batched.keys() and grads_rows
    # some gradients are float noise around zero (~1e-15: a bias ahead of a norm): an absolute floor from the
    # largest gradient of the step, a relative bound from each tensor's own
    floor = max(grad.abs().max() for grad in grads_rows.values())
    for name, grad in grads_rows.items():
        bound = 1e-4 * grad.abs().max() + 1e-6 * floor
        assert (grad - grads_batched[name]).abs().max() <= bound, name
