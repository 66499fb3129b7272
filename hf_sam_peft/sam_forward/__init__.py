"""SAM's forward as training and inference share it: preprocessing, frames and prompts, encode / decode, seeding.

This package sits beneath ``hf_sam_peft.training`` and ``hf_sam_peft.evaluation`` (and the app and hub):
both import it, it imports neither (``tests/test_import_graph.py`` checks this), so changing the trainer
cannot change what evaluation computes. It serves SAM (``SamModel``, ``LiteSamModel``, ``SamHQModel``) and
SAM 2 (``Sam2Model``, ``Sam3TrackerModel``, ``EdgeTamModel``) through the same functions.

- :mod:`.kinds`: which model it is (:func:`model_kind`) and the few things that differ between SAM and SAM 2
  (input frame, input size, one embedding or three: :data:`ImageEmbeddings`).
- :mod:`.preprocess`: image -> ``pixel_values`` (SAM's, LiteMedSAM's for ``LiteSamModel``, SAM 2's square for
  ``Sam2Model``), prompt coordinates into the model frame, low-res mask logits back to the input size.
- :mod:`.frames`: :class:`Frames` (each image's sizes in the model frame) and :class:`Prompts`.
- :mod:`.forward`: :func:`unwrap_sam`, :func:`encode_images` (once per image, with its graph) and
  :func:`decode` (per prompt round, through the model's own ``forward``).
- :mod:`.seeding`: :func:`prompt_generator` and its streams.
"""

from .forward import decode, embeddings_from_features, encode_images, unwrap_sam, vision_features
from .frames import Frames, Prompts
from .kinds import (
    EDGETAM,
    FRAME_PAD,
    FRAME_SQUARE,
    SAM,
    SAM2,
    SAM3_TRACKER,
    SAM_HQ,
    ImageEmbeddings,
    decoder_inputs,
    frame_of,
    input_size_of,
    is_sam2,
    main_embedding,
    map_embeddings,
    model_kind,
)
from .preprocess import (
    PIXEL_MEAN,
    PIXEL_STD,
    Preprocess,
    image_preprocessor,
    postprocess_masks,
    preprocess_image,
    preprocess_shape,
    sam2_preprocess,
    sam3_preprocess,
    transform_boxes,
    transform_coords,
)
from .seeding import EVAL_STREAM, TRAIN_STREAM, prompt_generator

__all__ = [
    "EDGETAM", "SAM3_TRACKER", "SAM_HQ", "decoder_inputs", "sam3_preprocess",
    "EVAL_STREAM", "FRAME_PAD", "FRAME_SQUARE", "Frames", "ImageEmbeddings", "PIXEL_MEAN", "PIXEL_STD", "Preprocess",
    "Prompts", "SAM", "SAM2", "TRAIN_STREAM", "decode", "embeddings_from_features", "encode_images", "frame_of",
    "image_preprocessor", "input_size_of", "is_sam2", "main_embedding", "map_embeddings", "model_kind",
    "postprocess_masks", "preprocess_image", "preprocess_shape", "prompt_generator", "sam2_preprocess",
    "transform_boxes", "transform_coords", "unwrap_sam", "vision_features",
]
