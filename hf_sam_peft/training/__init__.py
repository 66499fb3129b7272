"""Training: µSAM's interactive objective in a transformers Trainer, AIS targets and loss.

SAM's forward itself (preprocessing, encode / decode, prompt seeding) is :mod:`hf_sam_peft.sam_forward`, shared with
evaluation; the names below that come from there stay importable from here.
"""

from .collate import (
    SamInteractiveCollator,
    postprocess_masks,
    transform_boxes,
    transform_coords,
)
from .interactive import (
    BOX_MODE,
    POINT_MODE,
    PromptMode,
    initial_prompts,
    interactive_loss,
    interactive_rounds,
    prompt_generator,
)
from .losses import dice_loss, mask_and_iou_loss
from .trainer import (
    InteractiveTrainingArguments,
    LossCurveCallback,
    SamInteractiveTrainer,
)

__all__ = [
    "BOX_MODE", "InteractiveTrainingArguments", "LossCurveCallback", "POINT_MODE", "PromptMode",
    "SamInteractiveCollator", "SamInteractiveTrainer", "dice_loss", "initial_prompts", "interactive_loss",
    "interactive_rounds", "mask_and_iou_loss", "postprocess_masks", "prompt_generator", "transform_boxes",
    "transform_coords",
]
