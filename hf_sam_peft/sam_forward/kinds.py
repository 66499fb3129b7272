"""Which SAM a model is, and the few things that differ between SAM and SAM 2 beneath one forward.

Training and evaluation run one code path for every base model (:mod:`hf_sam_peft.sam_forward.forward`);
the differences are asked here, by model kind, instead of being branched on everywhere:

========================  ===========================================  ==============================================
                          SAM (``SamModel``, ``LiteSamModel``)        SAM 2 (``Sam2Model``, the image model)
========================  ===========================================  ==============================================
input frame               longest side resized to ``S``, zero-padded   stretched to ``S x S`` (no aspect ratio kept,
                          at the bottom / right (``"pad"``)            no padding, ``"square"``)
image embeddings          one tensor ``(B, C, S/16, S/16)``             a list of three maps: ``s0`` ``(B, C/8, S/4)``,
                                                                       ``s1`` ``(B, C/4, S/8)`` (both already through
                                                                       the mask decoder's ``conv_s0`` / ``conv_s1``)
                                                                       and the stride-16 map ``(B, C, S/16)`` with
                                                                       ``no_memory_embedding`` added
input size ``S``          ``config.vision_config.image_size``          ``config.prompt_encoder_config.image_size``
========================  ===========================================  ==============================================

The newer families of transformers take one of these two forms (:data:`KIND_BY_MODEL_TYPE`):

- **SAM-HQ** (``SamHQModel``, :data:`SAM_HQ`): SAM's ViT, frame and input size; its mask decoder also reads the
  output of the encoder's first global-attention block (``intermediate_embeddings[0]``, ``(B, S/16, S/16, D)``,
  channels last as the encoder gives it). Its embeddings are two tensors, early ViT features first and the
  image embedding last, so :func:`main_embedding` is SAM's embedding and every level is indexed, repeated and
  cached per image like SAM 2's (:func:`decoder_inputs` hands them to ``SamHQModel.forward``).
- **SAM 3 tracker** (``Sam3TrackerModel``, :data:`SAM3_TRACKER`) and **EdgeTAM** (``EdgeTamModel``,
  :data:`EDGETAM`): SAM 2's prompt encoder, mask decoder, square frame and three maps, behind another image
  encoder (SAM 3's ViT with rotary attention and a simple FPN; RepViT through timm). SAM 3's frame is
  normalised with mean = std = 0.5 (``Sam3ImageProcessor``), not ImageNet's (:mod:`.preprocess`).

:data:`ImageEmbeddings` is either form; :func:`map_embeddings`, :func:`embedding_levels` and
:func:`main_embedding` let code that selects images, repeats them per object, detaches or caches them treat
both alike. The stride-16 map (:func:`main_embedding`) has the shape of SAM's image embedding and is what
the UNETR head decodes (:mod:`hf_sam_peft.modeling.unetr`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Union

import torch
from torch import nn

__all__ = [
    "EDGETAM", "FRAME_PAD", "FRAME_SQUARE", "ImageEmbeddings", "KIND_BY_MODEL_TYPE", "SAM", "SAM2", "SAM2_FORM",
    "SAM3_TRACKER", "SAM_HQ", "decoder_inputs", "embedding_levels", "frame_of", "from_levels", "input_size_of",
    "is_sam2", "main_embedding", "map_embeddings", "model_kind", "stack_embeddings", "unstack_embeddings",
    "unwrap_sam",
]

SAM, SAM2, SAM_HQ, SAM3_TRACKER, EDGETAM = "sam", "sam2", "sam_hq", "sam3_tracker", "edgetam"
# config.model_type -> kind; anything else (SamModel, LiteSamModel) is SAM
KIND_BY_MODEL_TYPE: dict[str, str] = {
    "sam2": SAM2, "sam_hq": SAM_HQ, "sam3_tracker": SAM3_TRACKER, "edgetam": EDGETAM,
}
# kinds with SAM 2's prompt encoder, mask decoder, square frame and three embedding maps
SAM2_FORM = frozenset({SAM2, SAM3_TRACKER, EDGETAM})
# how an image sits in the model's square input (see the module docstring)
FRAME_PAD, FRAME_SQUARE = "pad", "square"

# one tensor (SAM) or SAM 2's three maps, high resolution first
ImageEmbeddings = Union[torch.Tensor, list[torch.Tensor]]


def unwrap_sam(model: nn.Module) -> nn.Module:
    """The ``SamModel`` / ``Sam2Model`` inside ``model`` (through DDP / DataParallel ``.module`` and peft's
    ``get_base_model``)."""
    inner = model
    while isinstance(inner, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        inner = inner.module
    # peft's get_base_model is the transformers model with the tuner layers injected (not a clean copy), so the
    # adapters act in everything reached through it
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    if not hasattr(inner, "vision_encoder") or not hasattr(inner, "mask_decoder"):
        raise TypeError(
            f"model must be a SamModel, Sam2Model or a peft model wrapping one, got {type(model).__name__}"
        )
    return inner


def _config(model: nn.Module):
    # a PeftModel forwards .config to the base model; DDP / DataParallel do not, hence the fallback
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        config = getattr(unwrap_sam(model), "config", None)
    return config


def model_kind(model: nn.Module) -> str:
    """The kind of ``model`` (or of the model a wrapper holds): :data:`SAM2`, :data:`SAM_HQ`,
    :data:`SAM3_TRACKER`, :data:`EDGETAM`, else :data:`SAM` (``SamModel``, ``LiteSamModel``: the same prompt
    encoder, mask decoder and forward)."""
    return KIND_BY_MODEL_TYPE.get(getattr(_config(model), "model_type", None), SAM)


def is_sam2(model: nn.Module) -> bool:
    """Whether ``model`` has SAM 2's decoder side and three embedding maps (SAM 2, SAM 3 tracker, EdgeTAM)."""
    return model_kind(model) in SAM2_FORM


def frame_of(model: nn.Module) -> str:
    """How ``model``'s preprocessing places an image in its square input: :data:`FRAME_PAD` or :data:`FRAME_SQUARE`."""
    return FRAME_SQUARE if is_sam2(model) else FRAME_PAD


def input_size_of(model: nn.Module) -> int:
    """Side ``S`` of the model's square input (the frame prompts are given in)."""
    config = _config(model)
    size = getattr(getattr(config, "vision_config", None), "image_size", None)
    if isinstance(size, int):
        return size
    return int(config.prompt_encoder_config.image_size)  # SAM 2: the vision config has no image_size


def decoder_inputs(model: nn.Module, embeddings: ImageEmbeddings) -> dict[str, object]:
    """The keyword arguments that hand ``embeddings`` to ``model``'s forward: ``image_embeddings`` (one tensor
    or SAM 2's list) and, for SAM-HQ, ``intermediate_embeddings`` (the early ViT features, a one-item list)."""
    if model_kind(model) == SAM_HQ:
        levels = embedding_levels(embeddings)
        return {"image_embeddings": levels[-1], "intermediate_embeddings": levels[:-1]}
    return {"image_embeddings": embeddings}


def embedding_levels(embeddings: ImageEmbeddings) -> list[torch.Tensor]:
    """The tensors of ``embeddings`` as a list (one for SAM, two for SAM-HQ, three for SAM 2)."""
    return list(embeddings) if isinstance(embeddings, (list, tuple)) else [embeddings]


def from_levels(levels: Sequence[torch.Tensor], like: ImageEmbeddings) -> ImageEmbeddings:
    """``levels`` in the form of ``like`` (inverse of :func:`embedding_levels`)."""
    return list(levels) if isinstance(like, (list, tuple)) else levels[0]


def map_embeddings(fn: Callable[[torch.Tensor], torch.Tensor], embeddings: ImageEmbeddings) -> ImageEmbeddings:
    """``fn`` applied to every level (index images, repeat per object, detach, move)."""
    return from_levels([fn(level) for level in embedding_levels(embeddings)], embeddings)


def main_embedding(embeddings: ImageEmbeddings) -> torch.Tensor:
    """The stride-16 image embedding ``(B, C, S/16, S/16)``: SAM's only one, SAM-HQ's and SAM 2's last (SAM 3's
    is at stride 14, its ViT's patch size)."""
    return embedding_levels(embeddings)[-1]


def unstack_embeddings(embeddings: ImageEmbeddings) -> list[ImageEmbeddings]:
    """Per image of the batch (for caches)."""
    levels = embedding_levels(embeddings)
    # level[i] drops the batch axis; stack_embeddings puts it back
    return [from_levels([level[i] for level in levels], embeddings) for i in range(levels[0].shape[0])]


def stack_embeddings(items: Sequence[ImageEmbeddings]) -> ImageEmbeddings:
    """Inverse of :func:`unstack_embeddings`."""
    per_level = zip(*(embedding_levels(item) for item in items))
    return from_levels([torch.stack(level) for level in per_level], items[0])
