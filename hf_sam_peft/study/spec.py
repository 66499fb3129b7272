"""A study file (YAML): which methods × datasets × seeds (× ablation values) to run, and how.

The paper is a grid of such cells (its Tab. 1/2: ten methods on each dataset; App. D: LoRA rank × α × learning
rate, AdaptFormer α / projection size / dropout, FacT rank / dropout). One file describes the whole grid::

    name: lite_medsam_2d
    base_model: lite_medsam            # or a list of base models: each is one more axis of the grid
    methods: all                       # the paper's ten, or a list of names (peft's own included: dora, vera, ...)
    datasets: [dsb2018_stage1test_fluo_nuclei, usiigaci_phase_contrast_cells]
    seeds: [0]
    method_options: {lora: {r: 16}}    # per method, for all its cells
    ablations:                         # optional: per method, a grid of values (cartesian product) = extra cells
      lora: {r: [4, 16], training.learning_rate: [1.0e-4, 3.0e-4]}
    training: {max_steps: 20, n_sub_iterations: 8}   # InteractiveTrainingArguments of every cell
    data: {max_images: 4}                             # recipe data options of every cell
    evaluation: {split: val, max_images: 2}           # see EVALUATION_KEYS

An ablation key ``training.X`` / ``data.X`` sets a training argument / data option; any other key is an option
of the method (as in a recipe's ``method_options``). Every value is checked here, before any cell runs.

``methods`` names any of ``hf_sam_peft.methods.ALL_METHOD_NAMES``: the paper's ten and peft's own tuners
(``PEFT_METHOD_NAMES``); ``all`` is the paper's ten. With several base models the cell ids name the model
(``<dataset>__<model>__<method>__s<seed>``); with one they do not (a one-model study keeps the ids it had).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

__all__ = [
    "Cell", "EVALUATION_DEFAULTS", "MAX_STUDY_CELLS", "StudySpec", "count_cells", "expand_cells", "load_study",
    "study_from_dict",
]

STUDY_KEYS = {
    "name": str, "description": str, "base_model": (str, list), "methods": (str, list), "datasets": list, "seeds": list,
    "method_options": dict, "ablations": dict, "training": dict, "data": dict, "evaluation": dict, "ais": bool,
    "output_dir": str, "base": bool,
}
MAX_STUDY_CELLS = 10_000
"""The most cells one study file may describe (the paper's whole grid is a few hundred). Counted before any
cell is built, so a typo in an ablation axis (2.56 million cells) is a one-line error, not a hang; raise
``hf_sam_peft.study.spec.MAX_STUDY_CELLS`` for a larger grid, or split the study."""
EVALUATION_DEFAULTS: dict[str, Any] = {
    "split": "val",  # the split scored (the shared sets' held-out images; training holds out its own validation)
    "patch": "auto",  # auto: the dataset's patch_shape grid for instance sets, whole images for semantic ones
    "max_images": None,  # images (after cutting into patches: patches) scored per dataset; None: all
    "n_corrections": 7,  # micro-sam's iterative evaluation: n_iterations=8, the first prompt + 7 corrections
    "batch_size": 16,
    "seed": 0,
    "ais_grid_search": False,  # True: grid-search the watershed on the training images first
    # the decoder in bf16 where the CPU/GPU runs it natively (as training does); scores within 0.005 of float32
    # on the demo's tiles (benchmarks/EVALUATION.md); false: exact float32
    "bf16": True,
}


@dataclass(frozen=True)
class Cell:
    """One training + evaluation run of the grid (``method="base"``: the untouched base model, scored only)."""

    dataset: str
    method: str
    seed: int = 0
    ablation: tuple[tuple[str, Any], ...] = ()  # (key, value) pairs of this cell's ablation values
    model: str = ""  # the base model, where the study has several ("": the study's only one)

    @property
    def ablation_label(self) -> str:
        """``r=4,training.learning_rate=0.0001`` (empty for a default cell)."""
        return ",".join(f"{k}={v}" for k, v in self.ablation)

    @property
    def cell_id(self) -> str:
        """A folder-safe unique name: ``<dataset>[__<model>]__<method>[__<ablation>]__s<seed>``."""
        # the id is a folder name: a Hub id's "/" (and anything else unsafe) becomes "_"; "." and "-" stay for
        # values such as 1e-4
        model = [re.sub(r"[^A-Za-z0-9_.=,+-]", "_", self.model)] if self.model else []
        parts = [self.dataset, *model, self.method]
        if self.ablation:
            parts.append(re.sub(r"[^A-Za-z0-9_.=,+-]", "_", self.ablation_label))
        return "__".join(parts) + f"__s{self.seed}"


@dataclass
class StudySpec:
    """A validated study file."""

    name: str
    datasets: list[str]
    methods: list[str]
    base_models: list[str] = field(default_factory=lambda: ["lite_medsam"])
    seeds: list[int] = field(default_factory=lambda: [0])
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    ablations: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=lambda: dict(EVALUATION_DEFAULTS))
    ais: Optional[bool] = None  # None: each dataset recipe decides
    base: bool = True  # also score the untouched base model on every dataset (the paper's first row)
    output_dir: Optional[str] = None
    description: str = ""
    path: Optional[Path] = None
    overrides: dict[str, Any] = field(default_factory=dict)  # keys the command line replaced (--methods, --models)

    @property
    def base_model(self) -> str:
        """The base models as one label (the only one, or all of them comma-separated)."""
        return ", ".join(self.base_models)

    def model_of(self, cell: Cell) -> str:
        """The base model a cell trains and is scored with."""
        return cell.model or self.base_models[0]

    def cells(self) -> list["Cell"]:
        return expand_cells(self)

    def cell_options(self, cell: Cell) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """``(method_options, training, data)`` of a cell: the study's, then the cell's ablation values."""
        options = dict(self.method_options.get(cell.method, {}))
        training, data = dict(self.training), dict(self.data)
        # ablation values are applied after the study-wide sections, so they win over them
        for key, value in cell.ablation:
            section, _, name = key.partition(".")
            if section == "training" and name:
                training[name] = value
            elif section == "data" and name:
                data[name] = value
            else:
                options[key] = value
        return options, training, data


def _fail(where: str, message: str) -> None:
    raise ValueError(f"{where}: {message}")


def _check_methods(where: str, methods: Any) -> list[str]:
    """``all`` (the paper's ten) or a list of distinct names from ``ALL_METHOD_NAMES`` (peft's own included)."""
    from ..methods import ALL_METHOD_NAMES, METHOD_NAMES

    if methods == "all":
        return list(METHOD_NAMES)
    if not isinstance(methods, list) or not methods:
        _fail(where, f"methods must be 'all' or a non-empty list of {', '.join(ALL_METHOD_NAMES)}; got {methods!r}")
    unknown = [m for m in methods if m not in ALL_METHOD_NAMES]
    if unknown:
        _fail(where, f"unknown methods {unknown} (known: {', '.join(ALL_METHOD_NAMES)})")
    if len(set(methods)) != len(methods):
        _fail(where, f"methods lists a method twice: {methods}")
    return list(methods)


def _check_models(where: str, models: Any) -> list[str]:
    """``base_model``: one name / folder / Hub id, or a non-empty list of distinct ones (a grid axis)."""
    listed = models if isinstance(models, list) else [models]
    if not listed or not all(isinstance(m, str) and m.strip() for m in listed):
        _fail(where, "base_model must be a base model name, folder or Hub id, or a non-empty list of them; "
                     f"got {models!r}")
    if len(set(listed)) != len(listed):
        _fail(where, f"base_model lists a model twice: {listed}")
    return list(listed)


def _check_datasets(where: str, datasets: Any) -> list[str]:
    from ..data import load_dataset_recipe

    if not isinstance(datasets, list) or not datasets or not all(isinstance(d, str) and d for d in datasets):
        _fail(where, f"datasets must be a non-empty list of dataset recipe names or paths; got {datasets!r}")
    if len(set(datasets)) != len(datasets):
        _fail(where, f"datasets lists a dataset twice: {datasets}")
    for name in datasets:
        try:
            recipe = load_dataset_recipe(name)
        except (ValueError, FileNotFoundError) as exc:
            _fail(where, f"dataset {name!r}: {exc}")
        if recipe.get("dimensions", 2) != 2:
            _fail(where, f"dataset {name!r} is 3D; the study scores 2D sets (evaluate volumes per slice)")
    return list(datasets)


def _check_seeds(where: str, seeds: Any) -> list[int]:
    # bool excluded (an int subclass); non-negative: numpy's generators refuse negative seeds
    ok = isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
    if not ok or len(set(seeds)) != len(seeds):
        _fail(where, f"seeds must be a non-empty list of distinct non-negative ints; got {seeds!r}")
    return list(seeds)


def _check_ablations(where: str, ablations: Any, methods: list[str]) -> dict[str, dict[str, list[Any]]]:
    out: dict[str, dict[str, list[Any]]] = {}
    for method, axes in (ablations or {}).items():
        if method not in methods:
            _fail(where, f"ablations name method {method!r}, which the study does not run (methods: {methods})")
        if not isinstance(axes, dict) or not axes:
            _fail(where, f"ablations.{method} must map option names to lists of values; got {axes!r}")
        for key, values in axes.items():
            if not isinstance(values, list) or not values:
                _fail(where, f"ablations.{method}.{key} must be a non-empty list of values; got {values!r}")
            # by repr: values may be unhashable (lists), and 1, 1.0 and True compare equal yet are different settings
            if len({repr(v) for v in values}) != len(values):
                _fail(where, f"ablations.{method}.{key} repeats a value: {values}")
        out[method] = {k: list(v) for k, v in axes.items()}
    return out


def count_cells(spec: StudySpec) -> int:
    """How many cells :func:`expand_cells` builds at most, by arithmetic (nothing is built): per dataset the
    base, then per seed and method its default cell and the product of its ablation axes' lengths."""
    per_seed = 0
    for method in spec.methods:
        axes = spec.ablations.get(method)
        per_seed += 1 + (math.prod(len(values) for values in axes.values()) if axes else 0)
    return len(spec.datasets) * len(spec.base_models) * (int(spec.base) + len(spec.seeds) * per_seed)


def check_grid_size(where: str, spec: StudySpec) -> None:
    """A one-line ValueError when the grid has more than :data:`MAX_STUDY_CELLS` cells."""
    n = count_cells(spec)
    if n > MAX_STUDY_CELLS:
        _fail(where, f"the grid has {n:,} cells (datasets x seeds x methods x ablation values), more than the limit "
                     f"of {MAX_STUDY_CELLS:,} (hf_sam_peft.study.spec.MAX_STUDY_CELLS): shorten the ablation lists "
                     "or split the study into several files")


def _check_cell_settings(where: str, spec: StudySpec) -> None:
    """Every cell's method options and training arguments are valid before the first cell trains."""
    from ..methods import method_config
    from ..train import check_training_settings, data_keys

    # base cells train nothing: they have no method options or training arguments to check
    for cell in expand_cells(spec):
        if cell.method == "base":
            continue
        options, training, data = spec.cell_options(cell)
        try:
            method_config(cell.method, **options)
            check_training_settings({"seed": cell.seed, **training})
        except (ValueError, TypeError) as exc:
            _fail(where, f"cell {cell.cell_id}: {' '.join(str(exc).split())}")  # multi-line messages made one line
        unknown = sorted(set(data) - set(data_keys()))
        if unknown:
            _fail(where, f"cell {cell.cell_id}: unknown data keys {unknown} (allowed: {list(data_keys())})")


def _check_evaluation(where: str, evaluation: Any) -> dict[str, Any]:
    if not isinstance(evaluation, dict):
        _fail(where, f"evaluation must be a mapping; got {evaluation!r}")
    unknown = sorted(set(evaluation) - set(EVALUATION_DEFAULTS))
    if unknown:
        _fail(where, f"unknown evaluation keys {unknown} (allowed: {sorted(EVALUATION_DEFAULTS)})")
    # completed with the defaults here, so cell.json records every evaluation setting a result depends on
    out = {**EVALUATION_DEFAULTS, **evaluation}
    patch = out["patch"]
    if not (patch in ("auto", None) or (isinstance(patch, list) and len(patch) == 2
                                        and all(isinstance(p, int) and p > 0 for p in patch))):
        _fail(where, f"evaluation.patch must be 'auto', null (whole images) or [height, width]; got {patch!r}")
    for key, low in (("n_corrections", 0), ("batch_size", 1), ("seed", 0)):
        if not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < low:
            _fail(where, f"evaluation.{key} must be an int >= {low}; got {out[key]!r}")
    if out["max_images"] is not None and (not isinstance(out["max_images"], int) or out["max_images"] < 1):
        _fail(where, f"evaluation.max_images must be a positive int or null; got {out['max_images']!r}")
    if not isinstance(out["bf16"], bool) or not isinstance(out["ais_grid_search"], bool):
        _fail(where, "evaluation.bf16 and evaluation.ais_grid_search must be true or false")
    if not isinstance(out["split"], str) or not out["split"]:
        _fail(where, f"evaluation.split must be a split name; got {out['split']!r}")
    return out


def study_from_dict(raw: Any, where: str = "study") -> StudySpec:
    """A :class:`StudySpec` from a parsed study file; a bad key or value is a one-line ``ValueError``."""
    if not isinstance(raw, dict):
        _fail(where, f"expected a mapping of keys, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(STUDY_KEYS))
    if unknown:
        _fail(where, f"unknown keys {unknown} (allowed: {sorted(STUDY_KEYS)})")
    for key in ("name", "datasets", "methods"):
        if key not in raw:
            _fail(where, f"missing key {key!r}")
    for key, expected in STUDY_KEYS.items():
        if raw.get(key) is not None and not isinstance(raw[key], expected):
            _fail(where, f"{key} has the wrong type {type(raw[key]).__name__}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", raw["name"]):
        _fail(where, f"name must be letters, digits, '_', '-' or '.', got {raw['name']!r}")
    methods = _check_methods(where, raw["methods"])
    method_options = raw.get("method_options") or {}
    from ..methods import ALL_METHOD_NAMES

    for method, options in method_options.items():  # options of a method the study skips are kept, not an error
        if method not in ALL_METHOD_NAMES or not isinstance(options, dict):
            _fail(where, f"method_options.{method} must be a mapping of options of a method "
                         f"({', '.join(ALL_METHOD_NAMES)})")
    spec = StudySpec(
        name=raw["name"],
        datasets=_check_datasets(where, raw["datasets"]),
        methods=methods,
        base_models=_check_models(where, "lite_medsam" if raw.get("base_model") is None else raw["base_model"]),
        seeds=_check_seeds(where, raw.get("seeds", [0])),
        method_options={k: dict(v) for k, v in method_options.items()},
        ablations=_check_ablations(where, raw.get("ablations"), methods),
        training=dict(raw.get("training") or {}),
        data=dict(raw.get("data") or {}),
        evaluation=_check_evaluation(where, raw.get("evaluation") or {}),
        ais=raw.get("ais"),
        base=raw.get("base", True),
        output_dir=raw.get("output_dir"),
        description=raw.get("description") or "",
    )
    check_grid_size(where, spec)  # before any cell is built
    _check_cell_settings(where, spec)
    return spec


def load_study(
    path: str | Path, methods: Optional[list[str]] = None, models: Optional[list[str]] = None
) -> StudySpec:
    """Read and validate a study file; errors name the file and the bad key.

    ``methods`` / ``models`` (the command line's ``--methods`` / ``--models``) replace the file's ``methods`` /
    ``base_model`` before validation; the spec's ``overrides`` records them.
    """
    from ..train import read_yaml_file

    path = Path(path)
    raw = read_yaml_file(path, "study file")
    overrides: dict[str, Any] = {}
    if methods is not None:
        overrides["methods"] = list(methods)
    if models is not None:
        overrides["base_model"] = list(models)
    where = f"study file {path}"
    # a file that is not a mapping is left for study_from_dict's own one-line error
    if overrides and isinstance(raw, dict):
        raw = {**raw, **overrides}
        where += f" with {', '.join(overrides)} from the command line"
    spec = study_from_dict(raw, where=where)
    spec.path = path
    spec.overrides = overrides
    return spec


def expand_cells(spec: StudySpec) -> list[Cell]:
    """The grid in run order: per dataset (and base model, where there are several), the base (once), then per
    seed every method's default cell and its ablation cells (the cartesian product of its ablation axes, in the
    order the file lists them); a grid larger than :data:`MAX_STUDY_CELLS` is a one-line ValueError."""
    check_grid_size(f"study {spec.name}", spec)
    # "": a one-model study's cell ids leave the model out, so they stay what they were before models were an axis
    models = spec.base_models if len(spec.base_models) > 1 else [""]
    cells: list[Cell] = []
    for dataset in spec.datasets:
        for model in models:
            if spec.base:
                cells.append(Cell(dataset, "base", 0, model=model))  # nothing trains: one seed is enough
            for seed in spec.seeds:
                for method in spec.methods:
                    cells.append(Cell(dataset, method, seed, model=model))
                    axes = spec.ablations.get(method)
                    if not axes:
                        continue
                    keys = list(axes)
                    for values in itertools.product(*(axes[k] for k in keys)):
                        cells.append(Cell(dataset, method, seed, tuple(zip(keys, values)), model=model))
    # cell ids name the folders: where two cells give one id (e.g. models "a/b" and "a_b"), the first is kept
    unique: dict[str, Cell] = {}
    for cell in cells:
        unique.setdefault(cell.cell_id, cell)
    return list(unique.values())
