"""Where each image of a batch sits in the model's frame (SAM's padded one or SAM 2's square), and prompts in it.

:class:`Frames` maps prompts sampled at input resolution into the model frame and upscales the decoder's
low-res logits back to each image's input size (:mod:`hf_sam_peft.sam_forward.preprocess`);
:class:`Prompts` holds a batch's points / labels / boxes in the model frame, in the layout
:func:`hf_sam_peft.sam_forward.forward.decode` takes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from hf_sam_peft.sam_forward.preprocess import postprocess_masks, transform_boxes, transform_coords

__all__ = ["Frames", "Prompts"]


@dataclass(frozen=True)
class Frames:
    """Where each image of a batch sits in the model's frame: input sizes, resized sizes, square input size,
    and how the image was placed there (``frame``: "pad" for SAM, "square" for SAM 2,
    :func:`hf_sam_peft.sam_forward.kinds.frame_of`), which decides how low-res masks go back."""

    original_sizes: torch.Tensor  # (B, 2)
    reshaped_sizes: torch.Tensor  # (B, 2)
    image_size: int
    frame: str = "pad"

    def select(self, index: torch.Tensor) -> "Frames":
        # index selects images (rows of B); image_size and frame belong to the model and stay
        return replace(self, original_sizes=self.original_sizes[index], reshaped_sizes=self.reshaped_sizes[index])

    def coords(self, b: int, points: torch.Tensor) -> torch.Tensor:
        return transform_coords(points, self.original_sizes[b].tolist(), self.reshaped_sizes[b].tolist())

    def boxes(self, b: int, boxes: torch.Tensor) -> torch.Tensor:
        return transform_boxes(boxes, self.original_sizes[b].tolist(), self.reshaped_sizes[b].tolist())

    def upscale(self, b: int, low_res: torch.Tensor) -> torch.Tensor:
        return postprocess_masks(
            low_res, self.image_size, self.reshaped_sizes[b].tolist(), self.original_sizes[b].tolist(), self.frame
        )


@dataclass
class Prompts:
    """Prompts in the model frame: points ``(B, N, P, 2)`` (x, y), labels ``(B, N, P)``, boxes ``(B, N, 4)``."""

    points: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    boxes: torch.Tensor | None = None

    def add_points(self, points: torch.Tensor, labels: torch.Tensor) -> "Prompts":
        if self.points is None:
            return replace(self, points=points, labels=labels)
        # dim 2 is P: a correction click joins each object's earlier points (prompts accumulate over the rounds)
        return replace(self, points=torch.cat([self.points, points], 2), labels=torch.cat([self.labels, labels], 2))
