"""The training collator: dataset rows -> SAM (or SAM 2) pixel values + labels at input size.

SAM's preprocessing, prompt coordinate mapping and mask postprocessing live in
:mod:`hf_sam_peft.sam_forward.preprocess` (shared with evaluation); they are re-exported here for the
import paths that named them in this module before (``from hf_sam_peft.training.collate import
preprocess_image`` keeps working).

Design decisions:

- Rows should come numpy-formatted (``hf_sam_peft.data.build_dataset`` does): plain nested lists lose the
  uint8 dtype and would be min-max stretched.
- Labels stay at the input (patch) resolution, zero-padded to the largest image of the batch, with
  ``original_sizes`` to crop them back. µSAM computes the loss there too: its predicted masks are upsampled
  to the padded frame, cropped and resized back to the input size (:func:`postprocess_masks`).
- The collator samples no prompts: which prompts a batch gets depends on the training step and, from the
  second round on, on the predictions. Prompts are sampled at input resolution and mapped into the model
  frame with :func:`transform_coords` / :func:`transform_boxes` (see ``hf_sam_peft.sam_forward.frames``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hf_sam_peft.sam_forward.kinds import input_size_of
from hf_sam_peft.sam_forward.preprocess import (  # noqa: F401  (re-exported: the old import paths)
    PIXEL_MEAN,
    PIXEL_STD,
    Preprocess,
    image_preprocessor,
    postprocess_masks,
    preprocess_image,
    preprocess_shape,
    transform_boxes,
    transform_coords,
)


@dataclass
class SamInteractiveCollator:
    """``data_collator`` for rows ``{"image": HxWxC, "labels": HxW}``: SAM pixel values + labels at input size.

    Returns ``pixel_values`` ``(B, 3, S, S)``, ``labels`` ``(B, H_max, W_max)`` (int64, zero padded),
    ``original_sizes`` and ``reshaped_input_sizes`` ``(B, 2)`` (names as ``SamProcessor`` uses them).
    ``preprocess`` decides the frame: SAM's longest side + pad by default; :meth:`from_model` picks the
    model's, e.g. SAM 2's stretched square, whose ``reshaped_input_sizes`` are ``(S, S)``.
    """

    image_size: int = 1024
    image_key: str = "image"
    label_key: str = "labels"
    preprocess: Preprocess = preprocess_image

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {self.image_size!r}")

    @classmethod
    def from_model(cls, model: torch.nn.Module, **kwargs: Any) -> "SamInteractiveCollator":
        """A collator for the input size and preprocessing of ``model`` (a ``SamModel``, ``Sam2Model`` or a
        peft model wrapping one)."""
        config = getattr(model, "config", None)
        vision = getattr(config, "vision_config", None)
        if vision is None:
            raise TypeError(
                "model must be a SamModel or Sam2Model (or wrap one) with config.vision_config, "
                f"got {type(model).__name__}"
            )
        kwargs.setdefault("preprocess", image_preprocessor(model))
        return cls(image_size=input_size_of(model), **kwargs)

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("rows must be a non-empty sequence of dataset rows")
        pixel_values, reshaped, originals = [], [], []
        for row in rows:
            if self.image_key not in row:
                raise ValueError(f"each row needs an {self.image_key!r} column, got keys {sorted(row)}")
            image = row[self.image_key]
            # `size`: (h, w) of the resized image inside the model's square input frame (SAM 2's: the whole square)
            values, size = self.preprocess(image, self.image_size)
            pixel_values.append(values)
            reshaped.append(size)
            originals.append(tuple(np.shape(image)[:2]))  # (rows, cols) of the input, HxWxC
        batch = {
            "pixel_values": torch.stack(pixel_values),
            "original_sizes": torch.tensor(originals, dtype=torch.long),
            "reshaped_input_sizes": torch.tensor(reshaped, dtype=torch.long),
        }
        # all or nothing: a batch with labels on some rows only would have no label tensor to pad into
        if all(self.label_key in row for row in rows):
            batch["labels"] = self._stack_labels([row[self.label_key] for row in rows], originals)
        return batch

    @staticmethod
    def _stack_labels(labels: list[Any], sizes: list[tuple[int, int]]) -> torch.Tensor:
        height = max(size[0] for size in sizes)
        width = max(size[1] for size in sizes)
        # each map at the top left, padded at the bottom and right with 0 (background); original_sizes crops it back
        out = torch.zeros(len(labels), height, width, dtype=torch.long)
        for i, (lab, size) in enumerate(zip(labels, sizes)):
            lab = lab if isinstance(lab, torch.Tensor) else torch.from_numpy(np.asarray(lab).astype(np.int64))
            if tuple(lab.shape) != tuple(size):
                raise ValueError(f"labels must have the image's (H, W) = {tuple(size)}, got {tuple(lab.shape)}")
            out[i, : size[0], : size[1]] = lab.long()
        return out
