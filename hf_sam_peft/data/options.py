"""One object for how a data folder becomes rows: :class:`DataOptions`, built once from a dataset recipe plus
overrides (a training recipe's ``data:`` section, ``--set data.KEY=VALUE``, the demo's patch side) and handed to
every builder (:func:`~hf_sam_peft.data.build_dataset`, :func:`~hf_sam_peft.data.train_val_datasets`,
:func:`~hf_sam_peft.data.training_dataset`, :func:`~hf_sam_peft.data.iter_rows`) instead of a dozen keyword
arguments. Why one object: the options are checked once, where they are made, and `train` and the demo serve
a folder the same way because they build the same object from the same recipe.

Defaults are the reference's (see :mod:`hf_sam_peft.data.sampling` for the sampler and the augmentation):

- ``val_fraction`` 0.1: a tenth of the training images, at least one, is held out for validation when a
  folder has no ``val/`` split, as micro-sam's training CLI does (``micro_sam/training/training.py``,
  ``main()``: "Use 10% of the dataset for validation - at least one image", commit 010fbdb0; it splits
  with ``torch.utils.data.random_split``, we by source file with a seeded permutation, :func:`holdout_split`).
  peft-sam's own loaders use each dataset's fixed splits (``peft_sam/dataset/get_data_loaders.py``).
- ``augment`` ``"flips"``: torch_em's default 2D augmentation (``torch_em/transform/augmentation.py``:
  ``DEFAULT_2D_AUGMENTATIONS = ["RandomHorizontalFlip", "RandomVerticalFlip"]``, no 90° turns), which
  ``default_segmentation_dataset`` installs when a loader passes no ``transform`` (peft-sam's microscopy
  loaders, micro-sam's ``default_sam_dataset``); ``"none"`` is peft-sam's ``_transform_identity`` for
  medical sets.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from .sampling import AUGMENTATIONS, MAX_SAMPLING_ATTEMPTS

LABEL_MODES = ("instances", "semantic")
VAL_FRACTION = 0.1
"""Of the training images, held out for validation without a ``val/`` split (micro-sam's training CLI)."""
TRAINING_MIN_NUM_INSTANCES = 2
"""torch_em ``MinInstanceSampler()``'s default (background + one object), for training when none is set."""

# options that change no fixed row (the split, the sampler's patience, the training augmentation): left out of
# the key of a cached table, so that e.g. another augmentation reuses the validation table
_NOT_IN_ROWS = ("augment", "max_attempts", "random_train", "max_images", "val_fraction", "val_split")


def _check_int(name: str, value: Any, low: int, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}: expected {'None or ' if optional else ''}an int >= {low}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class DataOptions:
    """How image / label files become rows: patches or resized whole images, labels, the object filter of
    fixed rows, the training sampler and augmentation, the validation split. Frozen: one object is shared by
    the training and validation split of a run; derive variants with :meth:`replace`.

    - ``patch_shape``: ``(h, w)`` patches (None: whole images, one row each); with ``resize_inputs`` the
      square each whole image is resized to (longest side scaled, centred zero padding; peft-sam's medical
      loaders, see :mod:`hf_sam_peft.data.resize`).
    - ``label_mode``: ``instances`` (each connected region an object) or ``semantic`` (label values are
      classes, kept in a ``semantic`` column). ``min_size``: objects below it are removed (peft-sam's label
      transform ``min_size``). ``label_transform``: runs on the (cropped / resized) labels first.
    - Fixed rows (validation, :func:`build_dataset`): ``with_objects_only`` drops rows with fewer than
      ``min_objects`` objects and, when ``min_num_instances`` is set, rows failing torch_em's
      MinInstanceSampler rule (background counted; ``sampler_min_size``: only values covering that many px).
      ``n_patches_per_image``: that many seeded random positions per slice instead of the covering grid.
    - Training (:class:`~hf_sam_peft.data.sampling.RandomPatchDataset`): a new patch per fetch, redrawn up to
      ``max_attempts`` times until it passes the rule (``min_num_instances``, default 2) and holds
      ``min_objects`` (1 without ``with_objects_only``); then ``augment``. ``random_train=False``: fixed
      training rows like the validation rows.
    - ``seed``: patch positions, the training draws and the holdout. ``max_images``: the first files of each
      split. ``val_split``: the folder validation comes from when it exists, else (or with None) a
      ``val_fraction`` holdout of the training files.
    """

    patch_shape: tuple[int, int] | None = None
    resize_inputs: bool = False
    label_mode: str = "instances"
    min_size: int = 25
    label_transform: Callable[[np.ndarray], np.ndarray] | None = None
    with_objects_only: bool = True
    min_objects: int = 1
    min_num_instances: int | None = None
    sampler_min_size: int | None = None
    n_patches_per_image: int | None = None
    augment: str = "flips"
    max_attempts: int = MAX_SAMPLING_ATTEMPTS
    random_train: bool = True
    seed: int = 0
    max_images: int | None = None
    val_fraction: float = VAL_FRACTION
    val_split: str | None = "val"

    def __post_init__(self) -> None:
        # frozen: checked values are written back through object.__setattr__ (the dataclasses idiom in __post_init__)
        def store(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        shape = self.patch_shape
        if shape is not None:
            # str / bytes refused first: b'@@' iterates as two ints and would pass as the shape (64, 64)
            if (isinstance(shape, (str, bytes)) or not hasattr(shape, "__len__") or len(shape) != 2
                    or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in shape)):
                raise ValueError(f"patch_shape: expected None or two positive ints (h, w), got {shape!r}")
            # one canonical form: a YAML list and a tuple of numpy ints must give the same, hashable cache key (row_key)
            store("patch_shape", (int(shape[0]), int(shape[1])))
        for name, low in (("min_size", 0), ("min_objects", 1), ("seed", 0), ("max_attempts", 1)):
            store(name, _check_int(name, getattr(self, name), low))
        for name, low in (("n_patches_per_image", 1), ("max_images", 1), ("min_num_instances", 1),
                          ("sampler_min_size", 0)):
            store(name, _check_int(name, getattr(self, name), low, optional=True))
        for name in ("resize_inputs", "with_objects_only", "random_train"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"{name}: expected True or False, got {getattr(self, name)!r}")
            store(name, bool(getattr(self, name)))
        if self.augment is None:  # the training default, as train_val_datasets(augment=None) always meant
            store("augment", "flips")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment: expected one of {AUGMENTATIONS} (or None), got {self.augment!r}")
        if self.label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode: expected one of {LABEL_MODES}, got {self.label_mode!r}")
        if self.label_transform is not None and not callable(self.label_transform):
            raise TypeError(f"label_transform: expected a callable or None, got {type(self.label_transform).__name__}")
        fraction = self.val_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating)) or not 0.0 < fraction < 1.0:
            raise ValueError(f"val_fraction: expected a float in (0, 1), got {fraction!r}")
        store("val_fraction", float(fraction))
        if self.val_split is not None and (not isinstance(self.val_split, str) or not self.val_split):
            raise ValueError(f"val_split: expected a split folder name or None, got {self.val_split!r}")
        if self.n_patches_per_image is not None and self.patch_shape is None:
            raise ValueError("n_patches_per_image: needs a patch_shape (whole images are one row each)")
        if self.resize_inputs:
            if self.patch_shape is None or self.patch_shape[0] != self.patch_shape[1]:
                raise ValueError(
                    f"resize_inputs: needs a square patch_shape (the side each image's longest side is resized to), "
                    f"got {self.patch_shape!r}"
                )
            if self.n_patches_per_image is not None:
                raise ValueError("n_patches_per_image: not used with resize_inputs (each image is one whole row)")

    # ---- construction ----------------------------------------------------------------------------------

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names (the keys a recipe's ``data:`` section and ``--set data.KEY`` may set)."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any], what: str = "data option") -> "DataOptions":
        """Options from a mapping of names; an unknown name is a one-line ValueError listing the known ones."""
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            raise ValueError(f"unknown {what} {unknown[0]!r} (known: {', '.join(cls.names())})")
        return cls(**options)

    @classmethod
    def from_recipe(cls, recipe: Mapping[str, Any], **overrides: Any) -> "DataOptions":
        """The options a dataset recipe fixes (:func:`~hf_sam_peft.data.recipes.load_dataset_recipe`'s
        result; ``root`` and the descriptive keys are not options), then ``overrides`` (a training recipe's
        ``data:`` section, command-line settings, the run's ``seed``), each checked."""
        from .recipes import dataset_kwargs

        merged = {k: v for k, v in dataset_kwargs(dict(recipe)).items() if k != "root"}
        # a recipe key but no build keyword (dataset_kwargs leaves it out), so taken over here
        if "val_fraction" in recipe:
            merged["val_fraction"] = recipe["val_fraction"]
        # root says where the data lives, not how it becomes rows: the builders take it as their own argument
        merged.update({k: v for k, v in overrides.items() if k != "root"})
        return cls.from_mapping(merged)

    def replace(self, **changes: Any) -> "DataOptions":
        """A copy with ``changes`` applied (and checked); an unknown name is a one-line ValueError."""
        unknown = sorted(set(changes) - set(self.names()))
        if unknown:
            raise ValueError(f"unknown data option {unknown[0]!r} (known: {', '.join(self.names())})")
        return dataclasses.replace(self, **changes)

    # ---- what the builders read ------------------------------------------------------------------------

    @property
    def resize_to(self) -> int | None:
        """The square side whole images are resized to (``resize_inputs``), else None."""
        return self.patch_shape[0] if self.resize_inputs else None

    @property
    def training_min_num_instances(self) -> int:
        """The sampler's rule for training patches: ``min_num_instances``, else torch_em's default 2."""
        return TRAINING_MIN_NUM_INSTANCES if self.min_num_instances is None else self.min_num_instances

    @property
    def training_min_objects(self) -> int:
        """Objects every training patch holds: ``min_objects`` (with ``with_objects_only``), else 1 (a patch
        without objects cannot be prompted)."""
        return self.min_objects if self.with_objects_only else 1

    def row_key(self) -> "DataOptions":
        """These options with those that change no fixed row reset to their defaults: the part of a cached
        table's key that comes from the options."""
        # still a DataOptions (so label_transform stays in the key): datasets fingerprints it inside gen_kwargs
        return dataclasses.replace(self, **{name: _DEFAULTS[name] for name in _NOT_IN_ROWS})

    def to_dict(self) -> dict[str, Any]:
        """The options as plain values (for a model card or a log; ``label_transform`` by name)."""
        out = dataclasses.asdict(self)
        if self.label_transform is not None:
            out["label_transform"] = getattr(self.label_transform, "__qualname__", repr(self.label_transform))
        if self.patch_shape is not None:
            out["patch_shape"] = list(self.patch_shape)
        return out


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DataOptions)}


def resolve_options(options: DataOptions | None, fields: Mapping[str, Any], caller: str) -> DataOptions:
    """``options`` with ``fields`` applied, or ``DataOptions(**fields)``: what every builder accepts, so
    that callers passing the options one by one keep working. Unknown names are a one-line TypeError naming
    ``caller`` (as a misspelt keyword argument would be)."""
    if options is not None and not isinstance(options, DataOptions):
        raise TypeError(f"options: expected a DataOptions or None, got {type(options).__name__}")
    unknown = sorted(set(fields) - set(DataOptions.names()))
    if unknown:
        raise TypeError(f"{caller}: unexpected options {unknown}")
    if options is None:
        return DataOptions(**fields)
    # replace() runs __post_init__ again, so overrides are checked (and normalised) like a fresh object
    return dataclasses.replace(options, **fields) if fields else options
