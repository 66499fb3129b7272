"""A prompt predictor that sees whole images resized to a square, and answers at the original size.

The medical evaluation of the reference resizes each test image whole (longest side to the patch shape,
centred padding; peft-sam ``experiments/evaluation/preprocess_datasets.py``), the same transform its
loaders apply in training (:mod:`hf_sam_peft.data.resize`). :class:`ResizedPredictor` applies exactly that
transform in ``set_image``, maps prompts given in the original frame into the square, and maps the masks
back (padding cropped, logits resized bilinearly, then thresholded), so that scores, overlays and written
segmentations are at the original resolution. The reference scores its resized copies instead; ours is the
stricter choice (a mask must also be right after the way back) and what a user's files need.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hf_sam_peft.data.resize import LongestSideResize, check_resize_target

__all__ = ["ResizedPredictor"]


class ResizedPredictor:
    """Wrap a prompt predictor (e.g. :class:`~hf_sam_peft.evaluation.predictor.SamPredictor`): images are
    resized to ``target x target`` before the wrapped predictor embeds them; prompts and masks stay in the
    original frame."""

    def __init__(self, predictor: Any, target: int) -> None:
        if not callable(getattr(predictor, "set_image", None)) or not callable(getattr(predictor, "predict", None)):
            raise TypeError(f"predictor: expected a prompt predictor (set_image + predict), got {type(predictor).__name__}")
        self.predictor = predictor
        self.target = check_resize_target(target, "target")
        self.resize: LongestSideResize | None = None

    def __getattr__(self, name: str) -> Any:
        # point_multimask, uses_multimask, model, ...: what the wrapped predictor says
        # our own attributes never delegate: before __init__ has set them (copy / pickle build the object without
        # it) looking up self.predictor here would recurse forever
        if name in ("predictor", "target", "resize"):
            raise AttributeError(name)
        return getattr(self.predictor, name)

    def set_image(self, image: Any) -> None:
        """Resize ``image`` (H x W or H x W x C) to the square and embed it."""
        array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        if array.ndim not in (2, 3):
            raise ValueError(f"image: expected H x W or H x W x C, got shape {array.shape}")
        # one transform per image: its scale and padding depend on this image's shape
        self.resize = LongestSideResize(array.shape[:2], self.target)
        self.predictor.set_image(self.resize.image(array))

    @property
    def original_size(self) -> tuple[int, int]:
        return self._resize().original_shape

    def _resize(self) -> LongestSideResize:
        if self.resize is None:
            raise RuntimeError("call set_image(image) before predicting")
        return self.resize

    def _prompts(self, points: Any, boxes: Any) -> tuple[Any, Any]:
        resize = self._resize()
        if points is not None:
            # float32: the scale is fractional, and LongestSideResize.points keeps the input's dtype (ints truncate)
            points = resize.points(torch.as_tensor(points, dtype=torch.float32))
        if boxes is not None:
            boxes = resize.boxes(torch.as_tensor(boxes, dtype=torch.float32))
        return points, boxes

    def predict(
        self, points: Any = None, labels: Any = None, boxes: Any = None, multimask: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(N, K, H, W)`` at the original size and IoU predictions ``(N, K)``."""
        points, boxes = self._prompts(points, boxes)
        logits, iou = self.predictor.predict(points=points, labels=labels, boxes=boxes, multimask=multimask)
        # the IoU predictions describe the masks, not a frame: they need no mapping
        return self._resize().restore_logits(logits), iou

    def predict_best(
        self, points: Any = None, labels: Any = None, boxes: Any = None, multimask: bool = False
    ) -> torch.Tensor:
        """Boolean masks ``(N, H, W)`` at the original size: the best mask's logits are picked in the square,
        resized back bilinearly, then thresholded at 0 (smoother than resizing a binary mask)."""
        points, boxes = self._prompts(points, boxes)
        logits, iou = self.predictor.predict(points=points, labels=labels, boxes=boxes, multimask=multimask)
        # picked in the square, so only the chosen mask per object is cropped and resized back
        best = logits[torch.arange(logits.shape[0], device=logits.device), iou.argmax(-1).to(logits.device)]
        return self._resize().restore_logits(best) > 0

    def predict_masks(self, points: Any = None, labels: Any = None, boxes: Any = None, multimask: bool = False) -> np.ndarray:
        """:meth:`predict_best` as a NumPy array."""
        return self.predict_best(points, labels, boxes, multimask).cpu().numpy()


def resized_if(predictor: Any, resize: int | None, model_input_size: int) -> Any:
    """``predictor`` itself (``resize`` None), or wrapped in a :class:`ResizedPredictor` to ``resize`` px
    (``resize`` 0: the model's own input size, e.g. 1024 for SAM, 256 for LiteMedSAM). The command-line
    ``--resize [SIZE]`` of ``evaluate`` and ``segment``."""
    if resize is None:
        return predictor
    # bool is an int subclass: True must not pass as a 1 px target
    if isinstance(resize, bool) or not isinstance(resize, int) or resize < 0:
        raise ValueError(f"resize: expected None, 0 (the model's input size) or a positive int, got {resize!r}")
    return ResizedPredictor(predictor, resize or model_input_size)

