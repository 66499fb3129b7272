"""Recipes shipped inside the package (``hf_sam_peft/recipes/``), and dataset recipes: one YAML per dataset
naming its local layout and how to cut training data from it.

The package's recipe folder holds training recipes (``<name>.yaml``), dataset recipes (``datasets/``), studies
(``studies/``) and accelerate configs (``accelerate/``); :func:`find_recipe` finds one by name the same way in a
wheel and in a checkout, :func:`list_recipes` lists them (``hf-sam-peft recipes``). A relative ``root`` in a
packaged dataset recipe is relative to the working directory (the package is no place for data); in a recipe file
of one's own it is relative to that file (or to the project holding its ``recipes/datasets/`` folder).

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
from typing import Any, Sequence

import yaml

from .options import LABEL_MODES
from .io import DataError
from .sampling import AUGMENTATIONS, default_augment

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
"""The recipes shipped in the package (package data: the same place in a wheel and in a checkout)."""
RECIPE_DIR = RECIPES_DIR / "datasets"
"""The packaged dataset recipes; pass a path for recipes elsewhere."""
RECIPE_KINDS: dict[str, str] = {
    "training": "",  # <name>.yaml at the top of RECIPES_DIR: hf-sam-peft train NAME
    "datasets": "datasets",  # dataset: NAME in a training recipe or a study
    "studies": "studies",  # hf-sam-peft study NAME
    "accelerate": "accelerate",  # accelerate launch --config_file "$(hf-sam-peft recipes path accelerate/NAME)"
}
_KIND_WORDS = {
    "training": "training recipe", "datasets": "dataset recipe", "studies": "study", "accelerate": "accelerate config",
}
FOLDER_RECIPE = "folder_{layout}"
"""The packaged training and dataset recipe ``train --data DIR`` uses for a folder served as ``tiles`` or
``resize`` (:func:`hf_sam_peft.demo.choose_layout`)."""


def _kind_dir(kind: str) -> Path:
    if kind not in RECIPE_KINDS:
        raise ValueError(f"kind: expected one of {sorted(RECIPE_KINDS)}, got {kind!r}")
    return RECIPES_DIR / RECIPE_KINDS[kind] if RECIPE_KINDS[kind] else RECIPES_DIR


def list_recipes() -> dict[str, list[str]]:
    """The packaged recipe names by kind; names outside ``training`` carry their folder (``datasets/livecell``)."""
    out: dict[str, list[str]] = {}
    for kind, folder in RECIPE_KINDS.items():
        directory = _kind_dir(kind)
        stems = sorted(p.stem for p in directory.glob("*.yaml")) if directory.is_dir() else []
        out[kind] = [f"{folder}/{stem}" if folder else stem for stem in stems]
    return out


def is_packaged(path: str | Path) -> bool:
    """Whether ``path`` is one of the package's own recipe files."""
    return Path(path).resolve().is_relative_to(RECIPES_DIR.resolve())


def find_recipe(name_or_path: str | Path, kind: str = "training") -> Path:
    """A recipe file: a path (``.yaml`` / ``.yml`` or an existing file) as given, else a packaged recipe by
    name: ``NAME`` of ``kind``, also written ``FOLDER/NAME`` (``datasets/livecell`` for ``kind="datasets"``).

    Why names: from a wheel the recipes live inside site-packages, where no one types paths to. A missing
    ``.yaml`` path is a ``FileNotFoundError`` (naming the packaged recipe of that name, if any); an unknown name
    a ``ValueError`` listing the known ones.
    """
    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"name_or_path: expected a recipe name or path, got {type(name_or_path).__name__}")
    directory, word = _kind_dir(kind), _KIND_WORDS[kind]
    path = Path(name_or_path)
    # a YAML suffix always means a path: a missing livecell.yaml is an error (the hint names the packaged
    # recipe), never a silent fallback to the package's own
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if path.is_file():
            return path
        packaged = directory / f"{path.stem}.yaml"
        hint = f" (the package ships a {word} of that name: pass {path.stem!r})" if packaged.is_file() else ""
        raise FileNotFoundError(f"{word} file {path} does not exist{hint}")
    name = str(name_or_path)
    prefix = f"{RECIPE_KINDS[kind]}/"
    # the FOLDER/NAME form list_recipes prints is accepted too
    if RECIPE_KINDS[kind] and name.startswith(prefix):
        name = name[len(prefix):]
    candidate = directory / f"{name}.yaml"
    if not candidate.is_file() or candidate.resolve().parent != directory.resolve():  # no ../ out of it
        known = [n.rpartition("/")[2] for n in list_recipes()[kind]]
        raise ValueError(
            f"name_or_path: unknown {word} {name!r} (known: {known}); pass a YAML path, or see 'hf-sam-peft recipes'"
        )
    return candidate


def find_any_recipe(name: str) -> Path:
    """A packaged recipe of any kind by its listed name: training recipes bare (``livecell``), the others as
    ``FOLDER/NAME`` (``datasets/livecell``, ``studies/smoke_tiny``, ``accelerate/cpu_ddp``)."""
    folder, _, _ = name.rpartition("/")
    kinds = [k for k, f in RECIPE_KINDS.items() if f == folder]
    try:
        if not kinds:
            raise ValueError(name)  # replaced below: one message for any unknown name
        return find_recipe(name, kinds[0])
    except (ValueError, FileNotFoundError):
        known = [n for names in list_recipes().values() for n in names]
        raise ValueError(f"NAME: unknown recipe {name!r}; the package ships: {', '.join(known)}") from None


def recipe_summary(path: Path) -> str:
    """A recipe's one-line description: its ``description`` key, else its first comment line."""
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    # a broken recipe still gets a line in the listing (its first comment) instead of failing it
    except yaml.YAMLError:
        raw = None
    if isinstance(raw, dict) and isinstance(raw.get("description"), str) and raw["description"].strip():
        return " ".join(raw["description"].split())
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def describe_folder(root: Path, limit: int = 8) -> str:
    """What a data folder holds, two levels deep, for an error line: ``train/{images}, notes.txt``."""
    if not root.is_dir():
        return "no such folder" if not root.exists() else "a file, not a folder"
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    parts = []
    for entry in entries[:limit]:
        if entry.is_dir():
            inside = sorted(c.name for c in entry.iterdir() if c.is_dir() and not c.name.startswith("."))
            parts.append(f"{entry.name}/{{{','.join(inside)}}}" if inside else f"{entry.name}/")
        else:
            parts.append(entry.name)
    if len(entries) > limit:
        parts.append(f"... ({len(entries) - limit} more)")
    return ", ".join(parts) if parts else "nothing"


def data_splits(root: str | Path) -> list[str]:
    """The splits of a data folder: subfolders holding both ``images/`` and ``labels/``."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "images").is_dir() and (p / "labels").is_dir())


def check_data_folder(root: str | Path, needed: Sequence[str] = ("train",), what: str = "--data") -> list[str]:
    """The splits of ``root`` (:func:`data_splits`), or a one-line :class:`DataError` saying what layout was
    expected (``<split>/images`` + ``<split>/labels``, with each split in ``needed``) and what was found."""
    root = Path(root)
    splits = data_splits(root)
    missing = [split for split in needed if split not in splits]
    if missing:
        wanted = " and ".join(f"the split folder {s}/ ({s}/images + {s}/labels)" for s in needed)
        hint = ""
        if (root / "images").is_dir() and (root / "labels").is_dir():
            hint = f" (this looks like one split: pass {root.parent} if it is {root.name}/ of a dataset)"
        raise DataError(
            f"{what} {root}: expected the layout <split>/images + <split>/labels with {wanted}; "
            f"found {describe_folder(root)}{hint}"
        )
    return splits


def folder_dataset_recipe(root: str | Path, layout: str) -> dict[str, Any]:
    """The packaged ``datasets/folder_<layout>`` recipe pointed at ``root`` and named after it: what
    ``train --data DIR`` trains on."""
    root = Path(root).expanduser().resolve()
    spec = load_dataset_recipe(FOLDER_RECIPE.format(layout=layout))
    spec.update(root=str(root), name=root.name)
    return spec


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


def _resolve_root(root: str, recipe_path: Path) -> str:
    """Relative roots: a packaged recipe's are relative to the working directory (never to the package); a
    recipe file of one's own: relative to the project holding its ``recipes/datasets/`` folder, else to the
    file's folder."""
    root_path = Path(root).expanduser()
    if root_path.is_absolute():
        return str(root_path)
    if is_packaged(recipe_path):
        return str((Path.cwd() / root_path).resolve())
    folder = recipe_path.resolve().parent
    # <project>/recipes/datasets/x.yaml: relative to <project>, the same rule as in the package's own layout
    base = folder.parents[1] if folder.name == "datasets" and folder.parent.name == "recipes" else folder
    return str((base / root_path).resolve())


def load_dataset_recipe(name_or_path: str | Path) -> dict[str, Any]:
    """Read and validate a recipe by name (the package's ``recipes/datasets/<name>.yaml``) or path.

    Unknown or missing keys, wrong types and out-of-range values raise a one-line ``ValueError`` naming the
    file and key. ``root`` is returned absolute; ``patch_shape`` as a tuple; ``recipe_path`` is added;
    ``min_num_instances`` (2) and ``augment`` (from ``modality``) are filled in when absent.
    """
    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"name_or_path: expected a recipe name or path, got {type(name_or_path).__name__}")
    from ..train import read_yaml_file  # bad YAML / non-UTF-8: one line naming the file and the line

    path = find_recipe(name_or_path, "datasets")
    recipe = read_yaml_file(path, "dataset recipe")
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
        # YAML's true / false are bools, which isinstance(.., int) accepts; YAML reads 1 (no dot) as an int, a valid
        # float value
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
    # 2: torch_em MinInstanceSampler()'s default (options.TRAINING_MIN_NUM_INSTANCES). Unlike DataOptions' None,
    # set here it also applies the sampler rule to a recipe's fixed (validation) rows
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
    """The :func:`build_dataset` / :func:`train_val_datasets` options a recipe fixes (root included), as
    keyword arguments; :meth:`~hf_sam_peft.data.DataOptions.from_recipe` makes the options object of them."""
    return {key: recipe[key] for key in _BUILD_KEYS if key in recipe}
