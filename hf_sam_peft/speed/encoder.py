"""The image encoder's part of a training step: no graph where it is frozen, and an embedding cache."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from hf_sam_peft.sam_forward.forward import embeddings_from_features, encode_images, unwrap_sam, vision_features
from hf_sam_peft.sam_forward.kinds import ImageEmbeddings, map_embeddings, stack_embeddings, unstack_embeddings
from hf_sam_peft.speed.options import EfficiencyOptions
from hf_sam_peft.speed.prepare import encoder_is_trainable


class EmbeddingCache:
    """Outputs of a *frozen* vision encoder (:func:`~hf_sam_peft.sam_forward.vision_features`: SAM's image
    embedding, SAM 2's FPN maps), keyed by a hash of each image's pixel values (LRU, bounded)."""

    def __init__(self, max_items: int = 4096) -> None:
        if not isinstance(max_items, int) or max_items < 1:
            raise ValueError(f"max_items must be a positive int, got {max_items!r}")
        self.max_items = max_items
        self._store: OrderedDict[str, ImageEmbeddings] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    @staticmethod
    def key(image: torch.Tensor) -> str:
        # the pixel bytes, not the tensor's identity: a flipped or cropped copy of an image is another key
        data = image.detach().contiguous().cpu()
        digest = hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=16)
        # equal bytes under another shape or dtype are another image
        digest.update(f"{tuple(data.shape)}{data.dtype}".encode())
        return digest.hexdigest()

    def get_or_compute(
        self, pixel_values: torch.Tensor, encode: Callable[[torch.Tensor], ImageEmbeddings]
    ) -> ImageEmbeddings:
        """``encode``'s output for the batch (``(B, C, h, w)``, or a list of such maps); images not seen before
        go through ``encode`` in one call."""
        keys = [self.key(image) for image in pixel_values]
        missing = [i for i, k in enumerate(keys) if k not in self._store]
        if missing:
            fresh = unstack_embeddings(encode(pixel_values[missing]))
            for i, emb in zip(missing, fresh):
                self._store[keys[i]] = map_embeddings(torch.Tensor.detach, emb)
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        out = []
        # least recently used first: every key of this batch moves to the end, the front is evicted
        for k in keys:
            self._store.move_to_end(k)
            out.append(self._store[k])
        while len(self._store) > self.max_items:
            self._store.popitem(last=False)
        return stack_embeddings(out)


def encoder_embeddings(
    model: nn.Module,
    pixel_values: torch.Tensor,
    options: EfficiencyOptions | None = None,
    cache: EmbeddingCache | None = None,
) -> ImageEmbeddings:
    """The image embeddings of a batch (``encode_images``'s), with a graph only where the encoder trains.

    A frozen vision encoder runs under ``no_grad`` (and its outputs may be cached); what follows it in
    ``encode_images`` (SAM 2's ``conv_s0`` / ``conv_s1`` of the mask decoder and ``no_memory_embedding``,
    trained) always runs with its graph.
    """
    if options is None or not options.frozen_encoder_no_grad or encoder_is_trainable(unwrap_sam(model)):
        return encode_images(model, pixel_values)

    def encode(values: torch.Tensor) -> ImageEmbeddings:
        with torch.no_grad():
            return vision_features(model, values)

    if options.cache_embeddings and cache is not None:
        return embeddings_from_features(model, cache.get_or_compute(pixel_values, encode))
    return embeddings_from_features(model, encode(pixel_values))


def maybe_checkpoint(enabled: bool, fn: Callable[..., Any], *args: torch.Tensor) -> Any:
    """``fn(*args)``, recomputed in backward instead of kept when ``enabled`` and a graph is being built."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


