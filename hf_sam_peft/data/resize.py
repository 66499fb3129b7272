"""Whole images resized to a square input: the reference's ``resize_inputs`` mode for medical data.

peft-sam builds every medical loader (papila, motum, psfhs, jsrt, amd_sd, mice_tumseg, sega) with
``resize_inputs=True`` (``peft_sam/dataset/get_data_loaders.py``, ``_fetch_medical_loaders``, e.g. commit
02653a84 l. 330-450), and prepares the medical test images the same way
(``experiments/evaluation/preprocess_datasets.py``). torch_em then loads each image whole (``patch_shape=None``,
``torch_em/data/datasets/util.py`` ``update_kwargs_for_resize_trafo``) and applies
``ResizeLongestSideInputs`` (``torch_em/transform/generic.py``, class ``ResizeLongestSideInputs``):

- the longest side becomes ``target`` (SAM's ``get_preprocess_shape``: ``int(side * target / longest + 0.5)``);
- images are resized with ``skimage.transform.resize(..., preserve_range=True)`` (bilinear, anti-aliased when
  shrinking) and cast back to their dtype; labels with ``order=0, anti_aliasing=False`` (nearest neighbour);
- the rest is padded with zeros, **centred**: ``ceil`` of half the missing rows on top, ``floor`` at the
  bottom (likewise left / right).

:class:`LongestSideResize` is that transform for one image, plus what the reference does not need but a
library does: prompts mapped into the resized frame and predictions mapped back to the original size, so
that scores and every file a user keeps are at the original resolution.

Deliberate deviation: our rows are normalised (:func:`~hf_sam_peft.data.normalize_image`) before the resize,
torch_em's ``raw_transform`` runs after it. For 8-bit images (the usual medical PNGs, where normalisation is
the identity) the two orders are the same; for other dtypes the min-max range differs by the zero padding only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["LongestSideResize", "check_resize_target"]


def check_resize_target(target: object, name: str = "resize_to") -> int:
    """``target`` as a positive int, or a one-line ValueError naming ``name``."""
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)) or target < 1:
        raise ValueError(f"{name}: expected a positive int (the square input side), got {target!r}")
    return int(target)


@dataclass(frozen=True)
class LongestSideResize:
    """Original ``(H, W)`` -> ``target x target``: longest side scaled to ``target``, the rest padded (centred)."""

    original_shape: tuple[int, int]
    target: int

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.original_shape)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"original_shape: expected (H, W) with positive sides, got {self.original_shape!r}")
        object.__setattr__(self, "original_shape", shape)
        object.__setattr__(self, "target", check_resize_target(self.target, "target"))

    @property
    def resized_shape(self) -> tuple[int, int]:
        """The image's shape inside the square (SAM's / torch_em's ``get_preprocess_shape`` rounding)."""
        height, width = self.original_shape
        scale = self.target * 1.0 / max(height, width)
        # int(x + 0.5), not round(): halves go up, as in SAM's get_preprocess_shape and torch_em's copy of it; round()
        # would send them to even and change the shape
        return int(height * scale + 0.5), int(width * scale + 0.5)

    @property
    def padding(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """``((top, bottom), (left, right))``: torch_em pads ``ceil`` of half before, ``floor`` after."""
        out = []
        for missing in (self.target - side for side in self.resized_shape):
            # an odd gap puts the extra row / column top / left (torch_em ResizeLongestSideInputs, transform/generic.py)
            out.append((math.ceil(missing / 2), math.floor(missing / 2)))
        return out[0], out[1]

    @property
    def scale(self) -> tuple[float, float]:
        """Per-axis ``(y, x)`` scale of the resized image (the two differ slightly by rounding)."""
        return tuple(new / old for new, old in zip(self.resized_shape, self.original_shape))  # type: ignore[return-value]

    # ---- forward: original -> square ---------------------------------------------------------------------

    def _pad(self, array: np.ndarray) -> np.ndarray:
        pad = list(self.padding) + [(0, 0)] * (array.ndim - 2)
        return np.pad(array, pad, mode="constant")

    def _check(self, array: np.ndarray, name: str) -> np.ndarray:
        array = np.asarray(array)
        if array.shape[:2] != self.original_shape:
            raise ValueError(f"{name}: expected shape {self.original_shape} (+ channels), got {array.shape}")
        return array

    def image(self, image: np.ndarray) -> np.ndarray:
        """``image`` (H x W or H x W x C) resized bilinearly with anti-aliasing, cast back to its dtype, padded."""
        from skimage.transform import resize

        image = self._check(image, "image")
        # H x W x C: the channel axis keeps its length; torch_em resizes channel-first, the same per-channel result
        shape = self.resized_shape + image.shape[2:]
        # skimage's defaults, as torch_em passes none for images: order 1, anti-aliasing when shrinking; astype
        # truncates (no rounding), as the reference's cast does
        resized = resize(image, shape, preserve_range=True).astype(image.dtype)
        return self._pad(resized)

    def labels(self, labels: np.ndarray) -> np.ndarray:
        """Label map resized nearest-neighbour (values kept), padded with background 0."""
        from skimage.transform import resize

        labels = self._check(labels, "labels")
        # nearest neighbour without smoothing: no id is blended into a value that names no object
        resized = resize(labels, self.resized_shape, order=0, anti_aliasing=False, preserve_range=True)
        return self._pad(resized.astype(labels.dtype))

    def points(self, points: torch.Tensor) -> torch.Tensor:
        """``(..., 2)`` ``(x, y)`` pixel coordinates in the original frame -> the square's frame (SAM's rule:
        coordinates times the scale, plus the padding offset)."""
        (top, _), (left, _) = self.padding
        scale_y, scale_x = self.scale
        # points are (x, y), sizes and scales (y, x): hence the swap. new_tensor takes points' dtype, so float
        # points are expected (an int tensor would truncate the scale)
        factor = points.new_tensor([scale_x, scale_y])
        offset = points.new_tensor([left, top])
        return points * factor + offset

    def boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """``(..., 4)`` ``(x0, y0, x1, y1)`` boxes in the original frame -> the square's frame."""
        corners = self.points(boxes.reshape(*boxes.shape[:-1], 2, 2))
        return corners.reshape(boxes.shape)

    # ---- back: square -> original --------------------------------------------------------------------------

    def _crop(self, square: torch.Tensor) -> torch.Tensor:
        if tuple(square.shape[-2:]) != (self.target, self.target):
            raise ValueError(f"expected maps of {self.target} x {self.target}, got {tuple(square.shape[-2:])}")
        (top, _), (left, _) = self.padding
        height, width = self.resized_shape
        return square[..., top : top + height, left : left + width]

    def restore_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``(..., target, target)`` mask logits -> ``(..., H, W)``: padding cropped, bilinear resize back
        (as SAM's own postprocessing maps its logits to the original size)."""
        cropped = self._crop(logits)
        lead = cropped.shape[:-2]
        # leading axes folded into the batch, one channel: interpolate takes (N, C, H, W)
        flat = cropped.reshape(-1, 1, *cropped.shape[-2:]).float()
        restored = F.interpolate(flat, size=self.original_shape, mode="bilinear", align_corners=False)
        return restored.reshape(*lead, *self.original_shape)

    def restore_labels(self, labels: np.ndarray | torch.Tensor) -> np.ndarray:
        """A ``target x target`` label map (or boolean mask) -> ``(H, W)``: padding cropped, nearest neighbour.

        Exact inverse of :meth:`labels` whenever the resize enlarged the image (every original pixel is the
        nearest sample of its own enlarged block) or shrank it by an integer factor of a map constant on
        those blocks; otherwise as exact as the resolution allows.
        """
        from skimage.transform import resize

        array = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        cropped = self._crop(torch.from_numpy(np.ascontiguousarray(array))).numpy()
        dtype = cropped.dtype
        restored = resize(
            cropped.astype(np.uint8) if dtype == bool else cropped, self.original_shape, order=0,
            anti_aliasing=False, preserve_range=True,
        )
        return restored.astype(dtype)
