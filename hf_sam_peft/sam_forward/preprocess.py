"""SAM's and SAM 2's input frames: image preprocessing, prompt coordinate mapping and mask postprocessing.

One implementation of SAM's preprocessing in torch (it matches ``transformers.SamImageProcessor`` up to
that processor's uint8 rounding of the resized image): intensities to uint8 [0, 255] by the package's one
normalisation (:func:`hf_sam_peft.data.normalize_image`: uint8 kept, other dtypes min-max per image, grey
copied to three channels), longest side resized to ``image_size`` (bilinear, antialiased as µSAM's
``apply_image_torch``), ImageNet mean/std, zero padding at the bottom/right to a square.

Training (``hf_sam_peft.training.collate.SamInteractiveCollator``) and inference
(``hf_sam_peft.evaluation.predictor.SamPredictor``, AIS) both preprocess through here, so evaluation sees
exactly what training saw. Prompts are sampled at input resolution and mapped into the model frame with
:func:`transform_coords` / :func:`transform_boxes`; predicted low-res masks go back to the input size with
:func:`postprocess_masks` (µSAM computes the loss there too).

SAM 2 (:func:`sam2_preprocess`, picked by :func:`image_preprocessor` for a ``Sam2Model``) stretches the image
to the ``S x S`` square without keeping its aspect ratio and without padding, as the official
``sam2/utils/transforms.py`` (``SAM2Transforms``: ``ToTensor``, ``Resize((S, S))``, ``Normalize``) and
transformers' ``Sam2ImageProcessor`` / ``Sam2Processor`` do. Its "resized size" is ``(S, S)``, so the
same per-axis mapping of :func:`transform_coords` (x by ``S / W``, y by ``S / H``) is ``Sam2Processor``'s
coordinate normalisation, and :func:`postprocess_masks` with ``frame="square"`` resizes the low-res logits
straight to the input size (``SAM2Transforms.postprocess_masks``, ``Sam2ImageProcessor.post_process_masks``).
Same ImageNet mean / std as SAM (SAM 2's processor applies them on the [0, 1] scale after a 1/255 rescale:
the same numbers as :data:`PIXEL_MEAN` / :data:`PIXEL_STD` on the [0, 255] scale). The resize runs in float,
as ``SAM2Transforms`` does (transformers' processor rounds the resized image to uint8 first).

The SAM 3 tracker (:func:`sam3_preprocess`) takes SAM 2's square frame with SAM 3's statistics, mean = std =
0.5 on the [0, 1] scale (transformers' ``Sam3ImageProcessor``: ``IMAGENET_STANDARD_MEAN`` / ``_STD``):
:data:`SAM3_PIXEL_MEAN` / :data:`SAM3_PIXEL_STD` on the [0, 255] scale. SAM-HQ takes SAM's, EdgeTAM SAM 2's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hf_sam_peft.data.normalize import normalize_image

__all__ = [
    "PIXEL_MEAN", "PIXEL_STD", "Preprocess", "SAM3_PIXEL_MEAN", "SAM3_PIXEL_STD", "image_preprocessor",
    "postprocess_masks", "preprocess_image", "preprocess_shape", "sam2_preprocess", "sam3_preprocess",
    "transform_boxes", "transform_coords",
]

# ImageNet statistics on the [0, 255] scale (SAM's pixel_mean / pixel_std).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
# SAM 3's (0.5 on the [0, 1] scale)
SAM3_PIXEL_MEAN = (127.5, 127.5, 127.5)
SAM3_PIXEL_STD = (127.5, 127.5, 127.5)


def preprocess_shape(height: int, width: int, image_size: int) -> tuple[int, int]:
    """Size ``(h, w)`` after resizing the longest side to ``image_size`` (SAM's rounding)."""
    scale = image_size * 1.0 / max(height, width)
    # int(x + 0.5): halves up, as SAM's ResizeLongestSide.get_preprocess_shape (round() would go to even); the
    # same rule as hf_sam_peft.data.resize.LongestSideResize.resized_shape
    return int(height * scale + 0.5), int(width * scale + 0.5)


def _resized(
    image: Any, size: tuple[int, int] | None, image_size: int,
    mean: tuple[float, ...] = PIXEL_MEAN, std: tuple[float, ...] = PIXEL_STD,
) -> torch.Tensor:
    """``image`` as float ``(3, h, w)`` on the [0, 255] scale, resized (bilinear, antialiased) to ``size``
    (None: SAM's longest side ``image_size``), normalised by ``mean`` / ``std`` (ImageNet's by default)."""
    # through the package's one normalisation, which is numpy: a tensor comes back to the host first
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    tensor = torch.from_numpy(normalize_image(np.asarray(image))).to(torch.float32).permute(2, 0, 1)
    height, width = tensor.shape[-2:]
    new_h, new_w = preprocess_shape(height, width, image_size) if size is None else size
    # already at size: bilinear at scale 1 is the identity, so the resize is skipped
    if (new_h, new_w) != (height, width):
        tensor = F.interpolate(tensor[None], (new_h, new_w), mode="bilinear", align_corners=False, antialias=True)[0]
    return (tensor - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def preprocess_image(image: Any, image_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """One image -> SAM ``pixel_values`` ``(3, S, S)`` and its resized size ``(h, w)`` inside the padded frame.

    ``image``: ``H x W``, ``H x W x 1`` or ``H x W x 3`` array or tensor; intensities go through
    :func:`hf_sam_peft.data.normalize_image` (uint8 kept, other dtypes min-max scaled to [0, 255]).
    """
    tensor = _resized(image, None, image_size)
    new_h, new_w = tensor.shape[-2:]
    # padded after normalising, so the padding is 0 in normalised units, as segment_anything's Sam.preprocess
    # (modeling/sam.py: normalise, then F.pad bottom / right)
    return F.pad(tensor, (0, image_size - new_w, 0, image_size - new_h)), (int(new_h), int(new_w))


def sam2_preprocess(image: Any, image_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """One image -> SAM 2 ``pixel_values`` ``(3, S, S)``: stretched to the square (module docstring); the
    "resized size" is ``(S, S)``. Same contract and intensity handling as :func:`preprocess_image`."""
    return _resized(image, (image_size, image_size), image_size), (image_size, image_size)


def sam3_preprocess(image: Any, image_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """One image -> SAM 3 tracker ``pixel_values`` ``(3, S, S)``: SAM 2's square frame, SAM 3's mean / std."""
    return _resized(image, (image_size, image_size), image_size, SAM3_PIXEL_MEAN, SAM3_PIXEL_STD), (image_size, image_size)


Preprocess = Callable[[Any, int], "tuple[torch.Tensor, tuple[int, int]]"]


def image_preprocessor(model: Any) -> Preprocess:
    """The preprocessing a model was trained with: SAM's (also SAM-HQ's), LiteMedSAM's for `LiteSamModel`s,
    SAM 2's for `Sam2Model`s and EdgeTAM, SAM 3's for the SAM 3 tracker (same contract)."""
    config = getattr(model, "config", model)
    model_type = getattr(config, "model_type", None)
    if model_type == "lite_sam":
        from hf_sam_peft.modeling.lite_medsam import lite_medsam_preprocess

        return lite_medsam_preprocess
    if model_type in ("sam2", "edgetam"):
        return sam2_preprocess
    if model_type == "sam3_tracker":
        return sam3_preprocess
    return preprocess_image


def transform_coords(coords: torch.Tensor, original_size: Sequence[int], reshaped_size: Sequence[int]) -> torch.Tensor:
    """Map ``(..., 2)`` (x, y) pixel coordinates of the input image into the resized model frame."""
    scale = torch.tensor(
        # coordinates are (x, y), sizes (h, w): x scales with the widths, y with the heights
        [reshaped_size[1] / original_size[1], reshaped_size[0] / original_size[0]], device=coords.device
    )
    return coords.float() * scale


def transform_boxes(boxes: torch.Tensor, original_size: Sequence[int], reshaped_size: Sequence[int]) -> torch.Tensor:
    """Map ``(..., 4)`` (x0, y0, x1, y1) boxes of the input image into the resized model frame."""
    corners = transform_coords(boxes.reshape(*boxes.shape[:-1], 2, 2), original_size, reshaped_size)
    return corners.reshape(boxes.shape)


def postprocess_masks(
    low_res_masks: torch.Tensor,
    image_size: int,
    reshaped_size: Sequence[int],
    original_size: Sequence[int],
    frame: str = "pad",
) -> torch.Tensor:
    """Low-res mask logits ``(..., h', w')`` -> logits at the input resolution ``(..., H, W)``.

    ``frame="pad"`` (SAM's postprocessing): upsample to the padded ``image_size`` frame, crop the padding,
    resize to the input size (bilinear). ``frame="square"`` (SAM 2's): one bilinear resize to the input size.
    """
    if frame not in ("pad", "square"):
        raise ValueError(f"frame must be 'pad' or 'square', got {frame!r}")
    lead = low_res_masks.shape[:-2]
    masks = low_res_masks.reshape(-1, 1, *low_res_masks.shape[-2:])
    if frame == "pad":
        masks = F.interpolate(masks, (image_size, image_size), mode="bilinear", align_corners=False)
        # the padding lies bottom / right in the image_size frame: cropped before the resize to the input size, as
        # segment_anything's Sam.postprocess_masks does
        masks = masks[..., : int(reshaped_size[0]), : int(reshaped_size[1])]
    target = (int(original_size[0]), int(original_size[1]))
    if tuple(masks.shape[-2:]) != target:  # same size: bilinear resize is the identity, skip its time and memory
        masks = F.interpolate(masks, target, mode="bilinear", align_corners=False)
    return masks.reshape(*lead, *masks.shape[-2:])
