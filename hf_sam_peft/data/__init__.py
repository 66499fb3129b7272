"""Data: image/label folders -> HF ``datasets`` of normalised 2D patches, SAM input normalisation, dataset
recipes (the package's ``recipes/datasets/*.yaml``) and :class:`DataOptions`, the one object saying how a folder
becomes rows (built once from a recipe plus overrides, passed to every builder). See
:mod:`hf_sam_peft.data.builder` for the row format and
:mod:`hf_sam_peft.data.sampling` for training data served as torch_em serves it (random patches per fetch,
MinInstanceSampler, flips). ``hf_sam_peft.data.epoch.SetEpochCallback`` (imports transformers) passes the
Trainer's epoch to the training dataset."""

from .builder import (
    LABEL_MODES,
    build_dataset,
    holdout_split,
    iter_rows,
    train_val_datasets,
    training_dataset,
)
from .folders import FilePair, find_pairs, iter_slices, load_pair
from .io import DataError, load_image, load_labels
from .labels import count_objects, to_instances
from .normalize import normalize_image
from .options import VAL_FRACTION, DataOptions
from .patches import grid_positions, grid_starts
from .recipes import dataset_kwargs, load_dataset_recipe
from .sampling import AUGMENTATIONS, RandomPatchDataset, default_augment, min_instance_ok, random_flips

__all__ = [
    "AUGMENTATIONS",
    "DataOptions",
    "VAL_FRACTION",
    "LABEL_MODES",
    "RandomPatchDataset",
    "default_augment",
    "min_instance_ok",
    "random_flips",
    "training_dataset",
    "DataError",
    "FilePair",
    "build_dataset",
    "count_objects",
    "dataset_kwargs",
    "find_pairs",
    "grid_positions",
    "grid_starts",
    "holdout_split",
    "iter_rows",
    "iter_slices",
    "load_dataset_recipe",
    "load_image",
    "load_labels",
    "load_pair",
    "normalize_image",
    "to_instances",
    "train_val_datasets",
]
