"""Dataset recipes: one YAML per dataset naming its local layout and how to cut training data from it.

Training-data keys (peft-sam ``peft_sam/dataset/get_data_loaders.py``; see :mod:`hf_sam_peft.data.sampling`):

- ``min_size``: objects smaller than this (pixels, after connected components) are removed from the labels
  (peft-sam's ``PerObjectDistanceTransform`` / ``ResizeLabelTrafo`` ``min_size``; 0 where it passes none).
- ``min_num_instances``: torch_em ``MinInstanceSampler(min_num_instances=...)``, counted as torch_em does:
  distinct label values **including background**, so 2 (torch_em's default) = one object. Default 2.
- ``sampler_min_size``: ``MinInstanceSampler(min_size=...)``: only label values covering that many pixels
  count (MOTUM 50, AMD-SD 10, Mice TumSeg 25 in peft-sam). Default: none.
- ``augment``: ``flips`` (torch_em's default 2D augmentation, peft-sam's microscopy loaders) or ``none``
  (peft-sam's ``_transform_identity`` for medical sets). Default from ``modality``: flips for microscopy.
- ``resize_inputs``: serve each image whole, longest side resized to the square ``patch_shape`` and padded,
  labels nearest neighbour (:mod:`hf_sam_peft.data.resize`), as peft-sam's medical loaders do
  (``resize_inputs=True`` in ``_fetch_medical_loaders``); microscopy sets sample patches. Default false.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .builder import LABEL_MODES
from .sampling import AUGMENTATIONS, default_augment

RECIPE_DIR = Path(__file__).resolve().parents[2] / "recipes" / "datasets"
"""Where recipes live in a source checkout; pass a path for recipes elsewhere."""

_REQUIRED = {
    "name": str,
    "root": str,
    "modality": str,
    "patch_shape": list,
    "label_mode": str,
    "min_size": int,
    "ais": bool,
}
_OPTIONAL = {
    "description": str,
    "dimensions": int,
    "metric": str,
    "obtain": str,
    "source": str,
    "citation": str,
    "license": str,
    "val_fraction": float,
    "n_patches_per_image": int,
    "min_num_instances": int,
    "sampler_min_size": int,
    "augment": str,
    "resize_inputs": bool,
}
_METRICS = ("msa", "dice")
_BUILD_KEYS = (
    "root", "patch_shape", "label_mode", "min_size", "n_patches_per_image", "min_num_instances", "sampler_min_size",
    "augment", "resize_inputs",
)


def _recipe_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"dataset recipe file {path} does not exist")
        return path
    path = RECIPE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")) if RECIPE_DIR.is_dir() else []
        raise ValueError(f"name_or_path: unknown dataset recipe {str(name_or_path)!r} (known: {known})")
    return path


def _resolve_root(root: str, recipe_path: Path) -> str:
    """Relative roots are relative to the project holding ``recipes/datasets/`` (else to the recipe's folder)."""
    root_path = Path(root).expanduser()
    if root_path.is_absolute():
        return str(root_path)
    folder = recipe_path.resolve().parent
    base = folder.parents[1] if folder.name == "datasets" and folder.parent.name == "recipes" else folder
    return str((base / root_path).resolve())


def load_dataset_recipe(name_or_path: str | Path) -> dict[str, Any]:
    """Read and validate a recipe by name (``recipes/datasets/<name>.yaml``) or path.

    Unknown or missing keys, wrong types and out-of-range values raise a one-line ``ValueError`` naming the
    file and key. ``root`` is returned absolute; ``patch_shape`` as a tuple; ``recipe_path`` is added;
    ``min_num_instances`` (2) and ``augment`` (from ``modality``) are filled in when absent.
    """
    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"name_or_path: expected a recipe name or path, got {type(name_or_path).__name__}")
    path = _recipe_path(name_or_path)
    with open(path, encoding="utf-8") as handle:
        recipe = yaml.safe_load(handle)
    if not isinstance(recipe, dict):
        raise ValueError(f"dataset recipe {path}: expected a mapping of keys, got {type(recipe).__name__}")
    unknown = sorted(set(recipe) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        allowed = sorted({**_REQUIRED, **_OPTIONAL})
        raise ValueError(f"dataset recipe {path}: unknown keys {unknown} (allowed: {allowed})")
    missing = sorted(set(_REQUIRED) - set(recipe))
    if missing:
        raise ValueError(f"dataset recipe {path}: missing keys {missing}")
    for key, value in recipe.items():
        expected = {**_REQUIRED, **_OPTIONAL}[key]
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if expected is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise ValueError(f"dataset recipe {path}: {key} must be {expected.__name__}, got {value!r}")
    shape = recipe["patch_shape"]
    if len(shape) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(f"dataset recipe {path}: patch_shape must be two positive ints, got {shape!r}")
    if recipe["label_mode"] not in LABEL_MODES:
        mode = recipe["label_mode"]
        raise ValueError(f"dataset recipe {path}: label_mode must be one of {LABEL_MODES}, got {mode!r}")
    for key, low in (("min_size", 0), ("min_num_instances", 1), ("sampler_min_size", 0), ("n_patches_per_image", 1)):
        if key in recipe and recipe[key] < low:
            raise ValueError(f"dataset recipe {path}: {key} must be >= {low}, got {recipe[key]}")
    recipe.setdefault("min_num_instances", 2)
    recipe.setdefault("augment", default_augment(recipe["modality"]))
    if recipe["augment"] not in AUGMENTATIONS:
        raise ValueError(f"dataset recipe {path}: augment must be one of {AUGMENTATIONS}, got {recipe['augment']!r}")
    if recipe.get("metric", "msa") not in _METRICS:
        raise ValueError(f"dataset recipe {path}: metric must be one of {_METRICS}, got {recipe['metric']!r}")
    if recipe.get("dimensions", 2) not in (2, 3):
        raise ValueError(f"dataset recipe {path}: dimensions must be 2 or 3, got {recipe['dimensions']!r}")
    recipe["patch_shape"] = tuple(shape)
    recipe["root"] = _resolve_root(recipe["root"], path)
    recipe["recipe_path"] = str(path)
    return recipe


def dataset_kwargs(recipe: dict[str, Any]) -> dict[str, Any]:
    """The :func:`build_dataset` / :func:`train_val_datasets` options a recipe fixes (root included)."""
    return {key: recipe[key] for key in _BUILD_KEYS if key in recipe}
