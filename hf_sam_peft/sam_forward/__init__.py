"""SAM's forward as training and inference share it: preprocessing, frames and prompts, encode / decode, seeding.

This package sits beneath ``hf_sam_peft.training`` and ``hf_sam_peft.evaluation`` (and the app and hub):
both import it, it imports neither (``tests/test_import_graph.py`` checks this), so changing the trainer
cannot change what evaluation computes.

- :mod:`.preprocess`: image -> ``pixel_values`` (SAM's, or LiteMedSAM's for ``LiteSamModel``), prompt
  coordinates into the model frame, low-res mask logits back to the input size.
- :mod:`.frames`: :class:`Frames` (each image's sizes in the model frame) and :class:`Prompts`.
- :mod:`.forward`: :func:`unwrap_sam`, :func:`encode_images` (once per image, with its graph) and
  :func:`decode` (per prompt round, through the model's own ``forward``).
- :mod:`.seeding`: :func:`prompt_generator` and its streams.
"""

from .forward import decode, encode_images, unwrap_sam
from .frames import Frames, Prompts
from .preprocess import (
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
from .seeding import EVAL_STREAM, TRAIN_STREAM, prompt_generator

__all__ = [
    "EVAL_STREAM", "Frames", "PIXEL_MEAN", "PIXEL_STD", "Preprocess", "Prompts", "TRAIN_STREAM", "decode",
    "encode_images", "image_preprocessor", "postprocess_masks", "preprocess_image", "preprocess_shape",
    "prompt_generator", "transform_boxes", "transform_coords", "unwrap_sam",
]
