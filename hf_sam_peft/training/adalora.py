"""What peft's AdaLoRA needs from a training loop that is not its own: a schedule length, a rank update after
every optimizer step, and its orthogonality regulariser in the loss.

peft leaves all three to the caller (``AdaLoraModel.update_and_allocate``'s docstring; the regulariser is added
by ``AdaLoraModel.forward`` only to an ``outputs.loss`` the model computes itself, and SAM's forward computes
none: the interactive loss is the trainer's). :class:`SamInteractiveTrainer` adds
:class:`AdaLoraAllocation` and :func:`adalora_regularizer` when the model carries an AdaLoRA adapter; any other
model is untouched.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from transformers import TrainerCallback
from peft.tuners.adalora import AdaLoraModel


def adalora_model(model: nn.Module) -> Optional[nn.Module]:
    """The ``AdaLoraModel`` inside a PeftModel (also under DDP / accelerate wrappers), or None."""
    inner = getattr(model, "module", model)  # DistributedDataParallel
    tuner = getattr(inner, "base_model", None)
    return tuner if isinstance(tuner, AdaLoraModel) else None


def adalora_regularizer(model: nn.Module) -> Optional[torch.Tensor]:
    """``orth_reg_weight`` × the orthogonality penalty of AdaLoRA's ``lora_A`` / ``lora_B`` as
    ``AdaLoraModel.forward`` computes it (peft/tuners/adalora/model.py: the mean over those matrices P of
    ‖PPᵀ − I‖_F for A, ‖PᵀP − I‖_F for B), or None when the model has no AdaLoRA adapter or the weight is 0."""
    tuner = adalora_model(model)
    if tuner is None:
        return None
    config = tuner.peft_config[tuner.trainable_adapter_name]
    if not config.orth_reg_weight:
        return None
    total, count = None, 0
    for name, parameter in tuner.model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and tuner.trainable_adapter_name in name:
            if parameter.shape == torch.Size([0]):  # a DeepSpeed ZeRO-3 shard placeholder: not gathered here
                continue
            # A is (r, in): A Aᵀ is r×r; B is (out, r): Bᵀ B is r×r. The identity in the matrix's dtype and
            # device, as AdaLoraModel.forward builds it
            matrix = parameter @ parameter.T if "lora_A" in name else parameter.T @ parameter
            identity = torch.eye(*matrix.size(), out=torch.empty_like(matrix))
            penalty = torch.norm(matrix - identity, p="fro")
            total = penalty if total is None else total + penalty
            count += 1
    if total is None:
        return None
    return config.orth_reg_weight * total / count


class AdaLoraAllocation(TrainerCallback):
    """Runs AdaLoRA's rank schedule: ``total_step`` set to the run's ``max_steps`` when training begins (a
    config built before the run cannot know it), then ``update_and_allocate(step)`` after each optimizer step,
    while the gradients it scores are still there (the loop zeroes them after ``on_optimizer_step``)."""

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
        tuner = adalora_model(model) if model is not None else None
        if tuner is not None:
            config = tuner.peft_config[tuner.trainable_adapter_name]
            # peft's RankAllocator.budget_schedule divides by total_step - tfinal - tinit
            if config.tinit >= state.max_steps - config.tfinal:
                raise ValueError(
                    f"AdaLoRA: tinit ({config.tinit}) + tfinal ({config.tfinal}) leave no budgeting phase in "
                    f"{state.max_steps} steps; lower them or train longer"
                )
            config.total_step = state.max_steps
            # the allocator schedules from the config object it holds: make sure it is this one
            tuner.rankallocator.peft_config = config
        return control

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
        tuner = adalora_model(model) if model is not None else None
        if tuner is not None:
            # the Trainer increments global_step only after this callback and zero_grad: here it counts the steps
            # completed before this one (0 at the first)
            tuner.update_and_allocate(state.global_step)
        return control


__all__ = ["AdaLoraAllocation", "adalora_model", "adalora_regularizer"]
