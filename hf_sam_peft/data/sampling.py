"""Training data as torch_em serves it to micro-sam / peft-sam: a new random patch for every sample,
rejected until it holds enough instances, with torch_em's default 2D augmentation for microscopy.

References (read for this module; line numbers are approximate where the file moved between versions):

- peft-sam ``peft_sam/dataset/get_data_loaders.py`` (computational-cell-analytics/peft-sam, e.g. commit
  02653a84): per dataset a ``MinInstanceSampler(min_num_instances=...)`` and a label transform with
  ``min_size`` (LIVECell 25/25, OrgaSegment 5/25, HPA 5/5, GoNuclear 5/5, MitoLab 5/5, Platynereis cilia 3/3,
  Covid-IF ``MinInstanceSampler()`` without min_size); the medical loaders pass ``transform=_transform_identity``
  (no augmentation) and ``MinInstanceSampler()`` (MOTUM ``min_size=50``, AMD-SD ``min_size=10``, Mice TumSeg
  ``min_size=25`` on the sampler); the microscopy loaders pass no ``transform``, so torch_em's
  ``default_segmentation_dataset`` installs ``get_augmentations(ndim=2)``.
- torch_em ``torch_em/data/sampler.py``, ``MinInstanceSampler.__call__`` (class ~l. 118, check ~l. 152-161):
  ``uniques, sizes = np.unique(y, return_counts=True)``; with ``min_size`` only ids with ``sizes >= min_size``
  are kept; accept when ``len(uniques) >= min_num_instances``. **The background id 0 is one of the
  uniques**: ``min_num_instances=25`` accepts 24 objects + background, and the default ``2`` means one object.
  :func:`min_instance_ok` is this rule exactly (``p_reject`` is always 1 in peft-sam: never accept a failing
  patch).
- torch_em ``torch_em/data/image_collection_dataset.py``: ``max_sampling_attempts = 500`` and
  ``max_sampling_attempts_image = 50`` (l. 12-13); ``_sample_bounding_box`` draws each start with
  ``np.random.randint(0, sh - psh)`` (~l. 101); ``_get_sample`` (~l. 163) redraws while the sampler rejects,
  switches to a random other image every 50 failed attempts and raises after 500; ``__getitem__`` (~l. 197)
  then applies ``raw_transform``, ``label_transform`` and ``transform`` (the augmentation) in that order.
- torch_em ``torch_em/transform/augmentation.py``: ``DEFAULT_2D_AUGMENTATIONS = ["RandomHorizontalFlip",
  "RandomVerticalFlip"]`` and ``get_augmentations(ndim=2)`` builds those two kornia augmentations with their
  defaults (``AUGMENTATIONS[...] = {}``), i.e. each with ``p=0.5``, independently, the same parameters applied
  to raw and labels (``KorniaAugmentationPipeline.forward`` reuses the raw's params).

Deliberate deviations (all small, all stated):

- Reproducible randomness: torch_em draws from numpy's global state; we draw from a generator seeded by
  ``np.random.SeedSequence([seed, epoch, index])``, so a patch is a deterministic function of (seed, epoch,
  sample index, attempt) (attempt k = the k-th draw of that generator) and a resumed run replays the data.
- Start positions are uniform over ``0 .. size - patch`` inclusive (torch_em's ``randint(0, sh - psh)``
  never reaches the last position).
- The instance rule runs on the labels as served (after ``label_transform``, connected components and
  ``min_size``), not on the raw label patch before the label transform as in torch_em: a served patch then
  always holds what the rule promises, and an object cut in two by the patch border counts twice.
- Samples per epoch: ``n_patches_per_image`` per image / slice when set, else ``prod(max(1, size // patch))``
  per slice (torch_em's ``SegmentationDataset.compute_len`` for volumes; its ``ImageCollectionDataset``
  serves one patch per 2D image, which this equals whenever the image is smaller than two patches).
- Intensities are normalised per served patch by :func:`normalize_image` (peft-sam's ``RawTrafo`` also
  normalises per patch, by min-max; uint8 inputs are kept as they are here, as micro-sam does).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from .labels import count_objects
from .patches import random_position

AUGMENTATIONS = ("flips", "none")
"""``flips``: torch_em's default 2D augmentation (random horizontal and vertical flip, p = 0.5 each);
``none``: identity (peft-sam's ``_transform_identity`` for medical sets)."""

MAX_SAMPLING_ATTEMPTS = 500  # torch_em ImageCollectionDataset.max_sampling_attempts
ATTEMPTS_PER_IMAGE = 50  # torch_em ImageCollectionDataset.max_sampling_attempts_image
FLIP_PROBABILITY = 0.5  # kornia RandomHorizontalFlip / RandomVerticalFlip default p


def default_augment(modality: str) -> str:
    """``"flips"`` for microscopy (any modality naming microscopy), ``"none"`` otherwise (medical imaging),
    as peft-sam serves its microscopy and medical sets."""
    return "flips" if "microscopy" in str(modality).lower() else "none"


def min_instance_ok(labels: np.ndarray, min_num_instances: int, min_size: int | None = None) -> bool:
    """torch_em's ``MinInstanceSampler`` rule (``p_reject=1``): the number of distinct label values,
    **background 0 included**, that cover at least ``min_size`` pixels (all values when None) is at least
    ``min_num_instances``. So ``min_num_instances=2`` asks for one object besides the background."""
    # np.unique as torch_em's MinInstanceSampler.__call__ has it: background 0 is one of the uniques
    uniques, sizes = np.unique(labels, return_counts=True)
    if min_size is not None:
        uniques = uniques[sizes >= min_size]
    return len(uniques) >= min_num_instances


def random_flips(arrays: Sequence[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """Flip all ``arrays`` (H x W[...]) together: left-right with p = 0.5, then up-down with p = 0.5
    (kornia's RandomHorizontalFlip then RandomVerticalFlip, as torch_em's default 2D augmentation)."""
    # both draws before any flip, in this order: the stream (and any later draw) never depends on the outcome
    horizontal = rng.random() < FLIP_PROBABILITY
    vertical = rng.random() < FLIP_PROBABILITY
    out = []
    for array in arrays:
        if horizontal:
            array = array[:, ::-1]  # axis 1 (W): left-right, kornia's horizontal flip
        if vertical:
            array = array[::-1]
        # flipped views have negative strides, which torch.from_numpy refuses: copied
        out.append(np.ascontiguousarray(array))
    return out


def samples_per_slice(shape: Sequence[int], patch_shape: Sequence[int] | None, n_patches: int | None) -> int:
    """How many samples one image / slice contributes to an epoch (see the module notes)."""
    if n_patches is not None:
        return int(n_patches)
    if patch_shape is None:
        return 1
    return int(np.prod([max(1, s // p) for s, p in zip(shape, patch_shape)]))


class RandomPatchDataset(torch.utils.data.Dataset):
    """Training rows drawn anew on every fetch: a random patch of one image / slice, redrawn until it passes
    :func:`min_instance_ok`, then flipped at random (``augment="flips"``) or not (``"none"``).

    A ``torch.utils.data.Dataset`` that ``transformers.Trainer`` takes as ``train_dataset``: rows are dicts
    with ``image`` (uint8 H x W x 3), ``labels`` (int32 instances 1..N), ``semantic`` (``label_mode=
    "semantic"``), ``id`` (``<slice id>_y<row>_x<col>``) and ``source``, the same row format as
    :func:`hf_sam_peft.data.build_dataset`. ``slices`` is the cached HF table of whole raw slices
    (see ``builder._build_slices``); each fetch cuts from it.

    Sample ``index`` belongs to slice ``k`` where the cumulative :func:`samples_per_slice` counts cover it.
    Draws come from ``np.random.default_rng(np.random.SeedSequence([seed, epoch, index]))``: the k-th position
    tried is a deterministic function of (seed, epoch, index, k), so the same seed gives the same rows, a new
    epoch gives new patches, and a resumed run replays the same data. After every ``attempts_per_image``
    rejections (at once when the patch covers the whole slice, so only one position exists) the sampler moves
    to a random slice, as torch_em does; after ``max_attempts`` it raises a one-line ``ValueError`` naming
    the dataset and the slices tried.

    **Epochs.** ``set_epoch(epoch)`` changes the draws. How it is reached (checked in transformers 5.24 /
    accelerate 1.15): ``Trainer._run_epoch`` calls ``train_dataloader.set_epoch(epoch)``, i.e. accelerate's
    ``DataLoaderShard.set_epoch``, which calls ``dataset.set_epoch`` only in an ``elif`` after the sampler
    checks: with one process (``BatchSampler`` over a ``SeedableRandomSampler``) it is reached; with several
    processes (``BatchSamplerShard`` wrapping that sampler) the sampler branch is taken and the dataset is
    **not** reached. :class:`hf_sam_peft.data.epoch.SetEpochCallback` closes that gap (``on_epoch_begin``,
    before the epoch's iterator and its worker processes are created). DataLoader workers hold copies of the
    dataset made when the epoch's iterator starts, so do not use ``dataloader_persistent_workers=True`` (the
    copies would keep the first epoch). Without any ``set_epoch`` call the epoch stays 0: patches still
    differ between samples, but repeat every epoch.
    """

    def __init__(
        self,
        slices: Any,
        *,
        patch_shape: tuple[int, int] | None,
        make_row: Callable[..., dict[str, Any]],
        n_patches_per_image: int | None = None,
        min_num_instances: int = 2,
        sampler_min_size: int | None = None,
        min_objects: int = 1,
        augment: str = "flips",
        seed: int = 0,
        max_attempts: int = MAX_SAMPLING_ATTEMPTS,
        attempts_per_image: int = ATTEMPTS_PER_IMAGE,
        name: str = "dataset",
    ):
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment: expected one of {AUGMENTATIONS}, got {augment!r}")
        for key, value, low in (("max_attempts", max_attempts, 1), ("attempts_per_image", attempts_per_image, 1),
                                ("min_num_instances", min_num_instances, 1), ("seed", seed, 0)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                raise ValueError(f"{key}: expected an int >= {low}, got {value!r}")
        if len(slices) == 0:
            raise ValueError(f"{name}: no images to draw training patches from")
        self.slices = slices
        self.patch_shape = patch_shape
        self.make_row = make_row
        self.n_patches_per_image = n_patches_per_image
        self.min_num_instances = int(min_num_instances)
        self.sampler_min_size = sampler_min_size
        self.min_objects = int(min_objects)
        self.augment = augment
        self.seed = int(seed)
        self.max_attempts = int(max_attempts)
        self.attempts_per_image = int(attempts_per_image)
        self.name = name
        # whole columns are read once here; a fetch then reads one row of the table (_load)
        self.slice_ids = [str(i) for i in slices["id"]]
        self._shapes = [tuple(int(s) for s in shape) for shape in slices["shape"]]
        counts = [samples_per_slice(s, patch_shape, n_patches_per_image) for s in self._shapes]
        self._ends = np.cumsum(counts)  # exclusive ends: sample -> slice by searchsorted
        self._epoch = 0

    def __len__(self) -> int:
        return int(self._ends[-1])

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the draws of ``epoch`` (called by accelerate's DataLoaderShard or SetEpochCallback)."""
        if not isinstance(epoch, (int, np.integer)) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch: expected an int >= 0, got {epoch!r}")
        self._epoch = int(epoch)

    def slice_of(self, index: int) -> int:
        """Which slice sample ``index`` starts from."""
        # side='right': an index equal to ends[k] is the first sample of slice k + 1
        return int(np.searchsorted(self._ends, index, side="right"))

    def _load(self, k: int) -> tuple[np.ndarray, np.ndarray, str, str]:
        row = self.slices[k]
        shape = self._shapes[k]
        # the table holds flat arrays (slices differ in shape); image_shape may carry the RGB axis
        image = np.asarray(row["image"]).reshape(tuple(int(s) for s in row["image_shape"]))
        labels = np.asarray(row["labels"]).reshape(shape)
        return image, labels, str(row["id"]), str(row["source"])

    def _accept(self, labels: np.ndarray) -> bool:
        return count_objects(labels) >= self.min_objects and min_instance_ok(
            labels, self.min_num_instances, self.sampler_min_size
        )

    def _n_positions(self, shape: tuple[int, int]) -> int:
        if self.patch_shape is None:
            return 1
        return int(np.prod([max(s - p, 0) + 1 for s, p in zip(shape, self.patch_shape)]))

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        # never numpy's global state: a sample draws the same stream in any DataLoader worker and in a resumed run.
        # The order of draws (positions, slice switches, then the two flips) is part of the data: keep it
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self._epoch, index]))
        k = self.slice_of(index)
        image, labels, slice_id, source = self._load(k)
        tried = [slice_id]
        on_this_slice = 0
        for _ in range(self.max_attempts):
            # a slice with one possible position cannot improve by redrawing: move on after its first rejection
            if on_this_slice >= self.attempts_per_image or (on_this_slice and self._n_positions(labels.shape) == 1):
                k = int(rng.integers(len(self._shapes)))  # torch_em: move on to a random image
                image, labels, slice_id, source = self._load(k)
                tried.append(slice_id)
                on_this_slice = 0
            position = None if self.patch_shape is None else random_position(labels.shape, self.patch_shape, rng)
            # judged on the served labels (after label_transform, components, min_size): see the module's deviations
            row = self.make_row(image, labels, position, source)
            on_this_slice += 1
            if self._accept(row["labels"]):
                break
        else:
            shown = ", ".join(dict.fromkeys(tried[:3])) + (f" and {len(set(tried)) - 3} more" if len(set(tried)) > 3 else "")
            raise ValueError(
                f"{self.name}: no training patch {self.patch_shape or 'whole image'} with >= {self.min_num_instances} "
                f"label values (torch_em MinInstanceSampler: background included"
                f"{'' if self.sampler_min_size is None else f', each >= {self.sampler_min_size} px'}) and >= "
                f"{self.min_objects} object(s) in {self.max_attempts} attempts for sample {index} (images tried: {shown})"
            )
        if self.augment == "flips":
            # image, labels and semantic flipped together by one pair of draws, as kornia reuses the raw's params
            keys = [key for key in ("image", "labels", "semantic") if key in row]
            for key, array in zip(keys, random_flips([row[key] for key in keys], rng)):
                row[key] = array
        row["id"] = slice_id if position is None else f"{slice_id}_y{position[0]}_x{position[1]}"
        row["source"] = source
        return row

    def __repr__(self) -> str:
        return (
            f"RandomPatchDataset({self.name}: {len(self)} samples from {len(self._shapes)} images, patch_shape="
            f"{self.patch_shape}, min_num_instances={self.min_num_instances}, augment={self.augment!r}, "
            f"seed={self.seed}, epoch={self._epoch})"
        )
