"""Train SAM with one of the ten methods from a YAML recipe: `accelerate launch -m hf_sam_peft.train RECIPE`.

The same entry point serves `hf-sam-peft train RECIPE` and `hf-sam-peft train --data DIR`, one process or many
(DDP through accelerate). RECIPE is a packaged recipe's name (`hf-sam-peft recipes`) or a YAML path. A recipe
names the dataset (a packaged dataset recipe's name or a path), the base model, the method and its options,
whether to train the UNETR decoder for AIS, and the `InteractiveTrainingArguments`. Command-line options
override the recipe (see `--help`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

# the type each recipe key must have; `dataset` is a name / path (str) or an inline dataset recipe (dict)
RECIPE_KEYS = {
    "name": str, "dataset": (str, dict), "base_model": str, "method": str, "method_options": dict, "ais": bool,
    "data": dict, "training": dict, "output_dir": str, "seed": int, "description": str,
}
def data_keys() -> tuple[str, ...]:
    """The keys a recipe's ``data:`` section may set: :class:`hf_sam_peft.data.DataOptions`' fields, one list.

    ``label_transform`` (a Python callable) has no YAML spelling; ``seed`` is listed so that setting it gets
    :func:`data_options`' own message (the data follow the run's seed).
    """
    from .data.options import DataOptions  # lazy, as every package import of this module (it imports only stdlib + yaml at load)

    return tuple(name for name in DataOptions.names() if name != "label_transform")


@dataclass
class Recipe:
    """An experiment: dataset + base model + method + training settings."""

    name: str
    dataset: str | dict
    base_model: str = "facebook/sam-vit-base"
    method: str = "lora"
    method_options: dict = field(default_factory=dict)
    ais: Optional[bool] = None  # None: the dataset recipe decides
    data: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    output_dir: Optional[str] = None
    seed: int = 0
    description: str = ""
    path: Optional[Path] = None


def read_yaml_file(path: Path, what: str = "recipe") -> Any:
    """A YAML file's content; a missing file, bad YAML or non-UTF-8 text is a one-line error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{what} {path}: malformed YAML{where}: {problem}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate an experiment recipe; a one-line error names the file and the bad key."""
    path = Path(path)
    raw = read_yaml_file(path, "recipe")
    if not isinstance(raw, dict):
        raise ValueError(f"recipe {path}: expected a mapping of keys, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(RECIPE_KEYS))
    if unknown:
        raise ValueError(f"recipe {path}: unknown keys {unknown} (allowed: {sorted(RECIPE_KEYS)})")
    for key, expected in RECIPE_KEYS.items():
        # null is "unset": such keys are dropped below, so the dataclass default applies
        if key in raw and raw[key] is not None and not isinstance(raw[key], expected):
            raise ValueError(f"recipe {path}: {key} has the wrong type {type(raw[key]).__name__}")
    if "dataset" not in raw:
        raise ValueError(f"recipe {path}: missing key 'dataset'")
    bad_data = sorted(set(raw.get("data") or {}) - set(data_keys()))
    if bad_data:
        raise ValueError(f"recipe {path}: unknown data keys {bad_data} (allowed: {list(data_keys())})")
    # the name defaults to the file's stem; it names the default output folder (outputs/NAME-METHOD)
    raw.setdefault("name", path.stem)
    return Recipe(**{k: v for k, v in raw.items() if v is not None}, path=path)


def _parse_value(text: str, key: str = "KEY") -> Any:
    """A command-line value: bool, None, int, float, a YAML list/dict, else the string itself.

    (Plain YAML would turn `eval_strategy=no` into False.) A malformed list/dict is a one-line error naming
    the setting `key`.
    """
    low = text.strip().lower()
    # bool / None first, then int before float: "10" must stay an int (max_steps is type-checked as one), "1e-4"
    # becomes a float
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    # only brackets go through YAML: YAML would also turn bare words (no, off, yes) into booleans
    if text.strip()[:1] in ("[", "{"):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ValueError(f"--set {key}={text}: malformed YAML list or mapping{where}: {problem}") from None
    return text


def apply_overrides(recipe: Recipe, args: argparse.Namespace) -> Recipe:
    """Command-line options win over the recipe."""
    for key in ("method", "base_model", "output_dir"):
        value = getattr(args, key, None)
        if value is not None:
            setattr(recipe, key, value)
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise ValueError(f"--max-steps must be a positive number of optimizer steps, got {args.max_steps}")
        recipe.training["max_steps"] = args.max_steps
    device = getattr(args, "device", None)
    if device is not None:
        # transformers' TrainingArguments spells the device choice as use_cpu
        recipe.training["use_cpu"] = device == "cpu"
    if args.ais is not None:
        recipe.ais = args.ais
    resize = getattr(args, "resize_inputs", None)
    if resize is not None:
        recipe.data["resize_inputs"] = resize
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        # a key without a known section is a training argument (--set learning_rate=1e-4 == training.learning_rate)
        section, _, name = key.partition(".")
        if section in ("training", "data", "method_options") and name:
            getattr(recipe, section)[name] = _parse_value(value, key)
        else:
            recipe.training[key] = _parse_value(value, key)
    return recipe


def data_options(recipe: Recipe, spec: dict[str, Any]):
    """The run's :class:`~hf_sam_peft.data.DataOptions`: the dataset recipe's, then the recipe's ``data:``
    section (``--set data.KEY=VALUE`` included; ``root`` is the dataset recipe's), then the run's seed."""
    from .data import DataOptions

    if "seed" in recipe.data:
        raise ValueError("data.seed: the data follow the run's seed; set seed (the recipe's top-level key) instead")
    return DataOptions.from_recipe(spec, **{k: v for k, v in recipe.data.items() if k != "root"}, seed=recipe.seed)


def build_datasets(recipe: Recipe):
    """(train, val) datasets and the dataset recipe."""
    from .data import load_dataset_recipe, train_val_datasets

    spec = load_dataset_recipe(recipe.dataset) if isinstance(recipe.dataset, str) else recipe.dataset
    if not spec.get("root"):
        raise ValueError("dataset: expected a dataset recipe with a root (the data folder), got none")
    splits = train_val_datasets(spec["root"], data_options(recipe, spec))
    return splits["train"], splits["val"], spec


def build_model(recipe: Recipe, ais: bool):
    """Base model (+ UNETR decoder when `ais`) wrapped with the recipe's method."""
    from .methods import apply_method
    from .modeling.base_models import load_base_model

    from transformers import set_seed

    model = load_base_model(recipe.base_model)[0]
    options = dict(recipe.method_options)
    set_seed(recipe.seed)  # the new weights (UNETR decoder, adapter) start the same for the same seed
    if ais:
        from .modeling.unetr import attach_unetr

        attach_unetr(model)  # trains with every method: it is in the configs' default modules_to_save
    return apply_method(model, recipe.method, **options)


RUN_MARKERS = ("adapter", "trainer_state.json")


def default_output_dir(recipe: Recipe) -> Path:
    return Path(recipe.output_dir or f"outputs/{recipe.name}-{recipe.method}")


def existing_run(output_dir: Path) -> list[str]:
    """What in `output_dir` belongs to an earlier run (its checkpoints, its adapter); [] for a fresh folder."""
    from .training.trainer import list_checkpoints

    found = [p.name for p in reversed(list_checkpoints(output_dir))]
    found += [name for name in RUN_MARKERS if (output_dir / name).exists()]
    return found


def check_output_dir(output_dir: Path, resume: Optional[str | bool], overwrite: bool) -> None:
    """Before any work: the output folder is writable and an earlier run in it is never replaced by accident.

    A run already there needs `--resume` (continue it) or `--overwrite` (the only way to replace it; its
    checkpoints and adapter are deleted here).
    """
    import shutil
    import tempfile

    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output folder {output_dir} is a file, not a folder; pass another --output-dir")
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run in "
                         f"{output_dir} or replace it, not both")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        # a real file, not just mkdir: exist_ok passes on a read-only folder; the probe file goes when it is closed
        with tempfile.TemporaryFile(dir=output_dir, prefix=".write_test_"):
            pass
    except OSError as exc:
        raise ValueError(f"output folder {output_dir} is not writable ({exc.strerror or exc}); pass another --output-dir") from None
    run = existing_run(output_dir)
    if not run or resume:
        return
    if not overwrite:
        raise ValueError(
            f"output folder {output_dir} already holds a run ({', '.join(run)}): pass --resume to continue it, "
            "or --overwrite to replace it"
        )
    for name in run:  # (every DDP process may get here: whichever comes first deletes)
        path = output_dir / name
        # ignore_errors / missing_ok: another DDP process may have deleted it first
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


RUN_CONFIG_NAME = "run_config.json"
"""The run's settings, written when a run starts; ``--resume`` compares the command line with them."""
FIXED_ON_RESUME = ("method", "base_model", "method_options", "ais")
"""Settings a checkpoint's weights depend on: never changed on resume (start a new run instead)."""
RESUME_MAY_CHANGE = frozenset({
    # how long, where and how loudly: extending a run (more steps) or moving it to a GPU is what resume is for
    "max_steps", "num_train_epochs", "use_cpu", "logging_steps", "logging_strategy", "logging_first_step",
    "report_to", "run_name", "disable_tqdm", "plot_loss_curve", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "dataloader_prefetch_factor",
})
"""(With the speed settings, :func:`speed_settings`: how a step runs, not what it computes.)"""
OPTIMIZER_SETTINGS = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon")
"""Training arguments a resumed optimizer state would override with its saved values (so applying a change
needs :attr:`SamInteractiveTrainer.reset_optimizer_hyperparameters`)."""


def run_settings(recipe: Recipe) -> dict[str, Any]:
    """The settings that decide what a run computes, flat (``training.learning_rate``, ``data.max_images``,
    ``method_options.r``, ...) and JSON-normal (tuples as lists), as ``run_config.json`` stores them."""
    flat: dict[str, Any] = {"method": recipe.method, "base_model": recipe.base_model, "ais": recipe.ais,
                            "seed": recipe.seed}
    if isinstance(recipe.dataset, dict):
        flat.update({f"dataset.{k}": v for k, v in recipe.dataset.items()})
    else:
        flat["dataset"] = recipe.dataset
    for section in ("method_options", "data", "training"):
        flat.update({f"{section}.{k}": v for k, v in getattr(recipe, section).items()})
    # JSON round trip: tuples become lists and other objects strings, exactly as run_config.json reads back
    return json.loads(json.dumps(flat, default=str))


def speed_settings() -> frozenset[str]:
    """The training arguments generated from ``EfficiencyOptions`` (and ``speed_preset``): they may change on resume."""
    from .speed import argument_fields

    return frozenset(name for name, _, _ in argument_fields())


def _training_default(name: str) -> Any:
    """An ``InteractiveTrainingArguments`` field's default (what a recipe that does not set it gets)."""
    import dataclasses

    from .training.trainer import InteractiveTrainingArguments

    for f in dataclasses.fields(InteractiveTrainingArguments):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                # normalised like run_settings' values, so a default compares equal to the same value saved in the file
                return json.loads(json.dumps(f.default, default=str))
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                return json.loads(json.dumps(f.default_factory(), default=str))  # type: ignore[misc]
    return None


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``[(setting, saved value, current value)]`` for every setting that differs, training arguments compared
    by their effective value (a recipe's unset key is the argument's default); the ones in
    :data:`RESUME_MAY_CHANGE` and :func:`speed_settings` are not compared."""
    unset = "(unset)"
    may_change = RESUME_MAY_CHANGE | speed_settings()
    changes = []
    for key in sorted(set(saved) | set(current)):
        section, _, name = key.partition(".")
        if section == "training" and name:
            if name in may_change:
                continue
            default = _training_default(name)
            # a key the recipe does not set counts as the argument's default: writing the default out is no change
            old, new = saved.get(key, default), current.get(key, default)
        else:
            old, new = saved.get(key, unset), current.get(key, unset)
        if old != new:
            changes.append((key, old, new))
    return changes


def _spell(key: str) -> str:
    """A setting as --set spells it (training arguments without their section)."""
    return key.split(".", 1)[1] if key.startswith("training.") else key


def prepare_run_config(
    output_dir: Path, recipe: Recipe, resume: Optional[str | bool], allow_changed_settings: bool = False
) -> list[tuple[str, Any, Any]]:
    """A fresh run writes its settings to ``run_config.json``; a resumed one is compared with them first.

    Settings that differ from the saved ones are refused with one line listing them, unless
    ``allow_changed_settings`` (then they are applied and recorded; returns them). Model settings
    (:data:`FIXED_ON_RESUME`) are refused either way. A run folder from before ``run_config.json`` existed
    is resumed unchecked (a note says so).
    """
    from accelerate import PartialState

    from .atomic import atomic_write_text

    path = output_dir / RUN_CONFIG_NAME
    current = run_settings(recipe)
    # every process checks (so all fail alike); only the main one prints and writes the file
    main = PartialState().is_main_process
    changes: list[tuple[str, Any, Any]] = []
    if resume:
        if not path.is_file():
            if main:
                print(f"note: {output_dir} has no {RUN_CONFIG_NAME} (a run from an older version): the settings "
                      "of this resume are not compared with the run's", file=sys.stderr)
            return []
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))["settings"]
            if not isinstance(saved, dict):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError):
            raise ValueError(f"{path} is unreadable: cannot check the settings of --resume against the run's "
                             f"(restore it, or start a new run in another --output-dir)") from None
        changes = changed_settings(saved, current)
        listing = ", ".join(f"{_spell(k)} {old!r} -> {new!r}" for k, old, new in changes)
        # the key's section: method_options.r is fixed because method_options is
        fixed = [k for k, _, _ in changes if k.split(".")[0] in FIXED_ON_RESUME]
        if fixed:
            shown = ", ".join(f"{_spell(k)} {old!r} -> {new!r}" for k, old, new in changes if k in fixed)
            raise ValueError(f"--resume cannot change the model ({shown}): the checkpoints in {output_dir} hold the "
                             "run's model; start a new run in another --output-dir")
        if changes and not allow_changed_settings:
            raise ValueError(f"--resume: settings differ from the run's saved configuration {path}: {listing}; "
                             "drop the changes, or pass --allow-changed-settings to apply them")
        # a resume that changes nothing leaves run_config.json as it was
        if not changes:
            return []
        if main:
            print(f"note: --resume applies changed settings: {listing}", file=sys.stderr)
    if main:
        atomic_write_text(path, json.dumps({"settings": current}, indent=1))
    return changes


def _expected_type(hint: Any) -> tuple[type, ...] | None:
    """The plain types a training argument accepts (None: anything, e.g. a str-or-dict field)."""
    import types
    import typing

    # `int | None` (PEP 604) has origin types.UnionType, not typing.Union, before Python 3.14
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    plain = tuple(a for a in args if isinstance(a, type) and a is not type(None))
    # str / dict / list fields and non-builtin types (enums such as IntervalStrategy) take strings from YAML that
    # TrainingArguments converts itself: not checked here
    if not plain or any(a in (str, dict, list) or not a.__module__ == "builtins" for a in plain):
        return None
    return plain


def check_training_settings(settings: dict[str, Any]) -> None:
    """One-line errors for training arguments of the wrong type, a non-positive max_steps, or a GPU without CUDA."""
    import typing

    from .training.trainer import InteractiveTrainingArguments

    # resolves string annotations (postponed evaluation) into the real types
    hints = typing.get_type_hints(InteractiveTrainingArguments)
    for key, value in settings.items():
        if key not in hints:
            raise ValueError(f"unknown training argument {key!r} (see transformers.TrainingArguments)")
        expected = _expected_type(hints[key])
        if expected is None or value is None:
            continue
        # bool is a subclass of int: true must not pass where an int goes
        ok = isinstance(value, expected) and not (isinstance(value, bool) and bool not in expected)
        if not ok and float in expected and isinstance(value, int) and not isinstance(value, bool):
            ok = True  # an int where a float goes
        if not ok:
            names = " or ".join("a number" if t is float else "an integer" if t is int else
                                "true/false" if t is bool else t.__name__ for t in expected)
            raise ValueError(f"training argument {key}={value!r}: expected {names}")
    max_steps = settings.get("max_steps")
    # -1 is TrainingArguments' "no step limit: num_train_epochs decides"
    if max_steps is not None and max_steps != -1 and max_steps < 1:
        raise ValueError(f"training argument max_steps={max_steps}: expected a positive number of steps (or -1: epochs)")
    if settings.get("use_cpu") is False:
        import torch

        if not (torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
                or torch.backends.mps.is_available()):
            raise ValueError(
                "a GPU was asked for (--device cuda / use_cpu=false) but this machine has none that torch can use "
                f"(torch {torch.__version__}); pass --device cpu"
            )


def run_training_loss(trainer, result) -> float:
    """The mean training loss of the whole run.

    `TrainOutput.training_loss` averages the steps of this call only: 0.0 for a resumed run with no step left.
    A resumed run averages the logged losses of every step instead (each weighted by the steps it covers).
    """
    # Trainer sets _initial_global_step to the step it resumed from (0 for a fresh run)
    if not getattr(trainer, "_initial_global_step", 0):
        return result.training_loss
    logged = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e and "step" in e]
    total = steps = 0
    # each logged loss is the mean since the previous log (Trainer divides by the steps in between): weight it by
    # those steps; an entry at or before a step already counted is skipped, so no step counts twice
    for step, loss in logged:
        if step > steps:
            total += loss * (step - steps)
            steps = step
    return total / steps if steps else result.training_loss


def train(
    recipe: Recipe, resume_from_checkpoint: Optional[str | bool] = None, overwrite: bool = False,
    allow_changed_settings: bool = False,
) -> dict[str, Any]:
    """Run a recipe; returns the summary (best step, metric, where the adapter and plots are).

    An output folder that already holds a run needs `resume_from_checkpoint` (continue it; True: its newest
    intact checkpoint) or `overwrite=True` (replace it).
    """
    return train_model(recipe, resume_from_checkpoint, overwrite, allow_changed_settings=allow_changed_settings)[0]


def train_model(
    recipe: Recipe,
    resume_from_checkpoint: Optional[str | bool] = None,
    overwrite: bool = False,
    callbacks: Sequence[Any] = (),
    allow_changed_settings: bool = False,
) -> tuple[dict[str, Any], Any]:
    """:func:`train`, also returning the trained model (the best checkpoint's weights, as saved) and taking
    extra `transformers.TrainerCallback`s (e.g. the study's step timer)."""
    from .methods import count_parameters, method_config
    from .run_lock import is_main_process, output_lock
    from .training.trainer import InteractiveTrainingArguments, SamInteractiveTrainer

    output_dir = default_output_dir(recipe)
    # the run's seed also goes to TrainingArguments.seed (its data order and dropout)
    settings = {"seed": recipe.seed, **recipe.training}
    check_training_settings(settings)
    method_config(recipe.method, **recipe.method_options)  # a bad method option fails before any work
    # one run at a time in an output folder (its checkpoints and adapter are this run's); DDP: rank 0 holds it
    with output_lock(output_dir, enabled=is_main_process()):
        check_output_dir(output_dir, resume_from_checkpoint, overwrite)
        if resume_from_checkpoint:  # True or a path: resolved (and checked intact) now, not after loading data and model
            from .training.trainer import resolve_resume_checkpoint

            resume_from_checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, output_dir)
        changed = prepare_run_config(output_dir, recipe, resume_from_checkpoint, allow_changed_settings)
        train_ds, val_ds, spec = build_datasets(recipe)
        ais = bool(spec.get("ais", False)) if recipe.ais is None else recipe.ais
        # train_decoder from `ais` first, so a recipe's explicit training.train_decoder wins
        args = InteractiveTrainingArguments(output_dir=str(output_dir), **{"train_decoder": ais, **settings})
        model = build_model(recipe, ais)
        trainer = SamInteractiveTrainer(model, args, train_dataset=train_ds, eval_dataset=val_ds)
        # a resumed optimizer state brings its own learning rate etc.: an applied change must replace them
        trainer.reset_optimizer_hyperparameters = any(_spell(k) in OPTIMIZER_SETTINGS for k, _, _ in changed)
        from .data.epoch import add_epoch_callback

        add_epoch_callback(trainer, train_ds)  # new random patches every epoch, also where accelerate does not call it (DDP)
        for callback in callbacks:
            trainer.add_callback(callback)
        result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        adapter_dir = output_dir / "adapter"
        trainable, _ = count_parameters(model)
        summary = {
            "recipe": recipe.name,
            "method": recipe.method,
            "base_model": recipe.base_model,
            "ais": ais,
            "trainable_parameters": trainable,
            "steps": trainer.state.global_step,
            "train_loss": run_training_loss(trainer, result),
            "best_checkpoint": trainer.state.best_model_checkpoint,
            "best_metric": trainer.state.best_metric,
            "base_metric": trainer.base_metric,
            "best_is_base": trainer.best_is_base,
            "selection": trainer.selection_summary(),
            "point_multimask": args.point_multimask,
            "resize_inputs": data_options(recipe, spec).resize_inputs,
            "adapter": str(adapter_dir),
            "loss_curve": str(output_dir / "loss_curve.png"),
        }
        if resume_from_checkpoint:
            summary["resumed_from"] = str(resume_from_checkpoint)
        # one process writes the adapter: under DDP the others would race on the same folder
        if trainer.is_world_process_zero():
            try:
                save_trained(model, adapter_dir, recipe, summary)
            except OSError as exc:
                raise OSError(f"could not save the adapter to {adapter_dir}: {exc.strerror or exc}") from exc
        return summary, model


def save_trained(model, adapter_dir: Path, recipe: Recipe, summary: dict[str, Any]) -> None:
    """The adapter with its provenance and model card (hub.save_adapter), plus a JSON summary of the run."""
    from .atomic import atomic_write_text
    from .hub import save_adapter
    from .hub.provenance import RESIZE_INPUTS_KEY

    dataset = recipe.dataset if isinstance(recipe.dataset, str) else recipe.dataset.get("name", "custom")
    save_adapter(
        model, adapter_dir, base_model_id=recipe.base_model, method=recipe.method,
        training_data=f"{dataset} (recipe {recipe.name})",
        extra={**recipe.training, "steps": summary["steps"], "best_metric": summary["best_metric"],
               "best_is_base": summary.get("best_is_base"),
               # how images were served: evaluate / segment feed them the same way unless told otherwise
               RESIZE_INPUTS_KEY: summary["resize_inputs"]},
        # overwrite=True: check_output_dir already allowed replacing this run's adapter (fresh run, --resume or
        # --overwrite); save_adapter replaces the whole folder atomically, so the summary goes in after it
        overwrite=True, point_multimask=summary.get("point_multimask"),
    )
    atomic_write_text(adapter_dir / "training_summary.json", json.dumps(summary, indent=2, default=str))


def _base_verdict(summary: dict[str, Any]) -> list[str]:
    """The best-checkpoint selection line (trainer.selection_summary()) and a plain line when fine-tuning did not
    beat the untouched base on validation."""
    selection = [f"  selection: {summary['selection']}"] if summary.get("selection") else []
    if summary.get("best_is_base"):
        base = summary.get("base_metric")
        why = "no evaluation after training qualified (see selection)" if selection else (
            "no evaluation after training improved on the base's validation "
            + (f"metric {base:.4f}" if base is not None else "metric"))
        return selection + [
            f"  FINE-TUNING DID NOT BEAT THE BASE (best_is_base): {why}; the adapter holds the untouched base "
            "(step 0), not a fine-tune. Try more steps, another learning rate or method."
        ]
    if selection:
        return selection
    if summary.get("best_is_base") is None and summary.get("best_metric") is None:
        return ["  no validation ran: the last state was kept without a check against the base"]
    return []


def format_summary(summary: dict[str, Any]) -> str:
    best = summary["best_checkpoint"] or "(no evaluation ran)"
    metric = summary["best_metric"]
    lines = [
        f"recipe {summary['recipe']}: {summary['method']} on {summary['base_model']}"
        + (" + UNETR decoder (AIS)" if summary["ais"] else ""),
        f"  trainable parameters: {summary['trainable_parameters']:,}",
        f"  steps: {summary['steps']}, final mean training loss: {summary['train_loss']:.4f}",
        f"  best checkpoint: {best}" + (f" (validation metric {metric:.4f})" if metric is not None else ""),
        *_base_verdict(summary),
        f"  adapter saved to: {summary['adapter']}",
        f"  loss curve: {summary['loss_curve']}",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "recipe", nargs="?", default=None,
        help="experiment recipe: a packaged name (see 'hf-sam-peft recipes'), e.g. livecell, or a YAML path; "
        "optional with --data",
    )
    parser.add_argument(
        "--data", metavar="DIR",
        help="train on this folder (<split>/images + <split>/labels: train/, optionally val/). Alone: with the "
        "packaged recipe folder_tiles or folder_resize, chosen from the data as the demo chooses (few large "
        "objects per image -> resize); with RECIPE: that recipe's settings on this folder",
    )
    parser.add_argument("--method", help="fine-tuning method (overrides the recipe), e.g. lora, fact, full_ft")
    parser.add_argument("--base-model", "--model", dest="base_model", help="base model: Hub id, folder (SamModel / Sam2Model), lite_medsam, tiny or tiny_sam2")
    parser.add_argument("--output-dir", dest="output_dir", help="where checkpoints, the adapter and plots go")
    parser.add_argument("--max-steps", dest="max_steps", type=int, help="stop after this many optimizer steps")
    parser.add_argument("--ais", dest="ais", action="store_true", default=None, help="also train the UNETR decoder")
    parser.add_argument("--no-ais", dest="ais", action="store_false", help="interactive objective only")
    layout = parser.add_mutually_exclusive_group()
    layout.add_argument(
        "--resize", dest="resize_inputs", action="store_true", default=None,
        help="serve whole images, longest side resized to the dataset's patch side and padded (the reference's "
        "resize_inputs for medical sets; overrides the dataset recipe)",
    )
    layout.add_argument(
        "--patches", dest="resize_inputs", action="store_false",
        help="sample random patches of the dataset's patch shape instead (microscopy; overrides the recipe)",
    )
    parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE",
        help="override a training argument (e.g. --set learning_rate=1e-4) or data./method_options. keys",
    )
    parser.add_argument(
        "--resume", nargs="?", const=True, default=None,
        help="continue the run in the output folder from its newest intact (or a given) checkpoint",
    )
    parser.add_argument(
        "--allow-changed-settings", dest="allow_changed_settings", action="store_true",
        help="with --resume: apply settings that differ from the run's run_config.json (learning rate, "
        "n_objects, data, ...; refused otherwise); the method and base model never change on resume",
    )
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace the run already in the output folder (its checkpoints and adapter are deleted)",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default=None,
        help="train on the CPU or a GPU (overrides the recipe's use_cpu); cuda needs a GPU torch can use",
    )


def recipe_from_args(args: argparse.Namespace) -> tuple[Recipe, Optional[str]]:
    """The recipe a command line names, and a line saying how a ``--data`` folder is served (or None).

    RECIPE alone: a packaged name or a YAML path. ``--data DIR`` alone: the packaged ``folder_tiles`` or
    ``folder_resize`` recipe, as :func:`hf_sam_peft.commands.data_layout` chooses from DIR's training images
    (``--resize`` / ``--patches`` choose instead), so a folder trains without writing a YAML first. Both:
    RECIPE's settings, its dataset recipe pointed at DIR.
    """
    from .data import load_dataset_recipe
    from .data.recipes import FOLDER_RECIPE, check_data_folder, find_recipe, folder_dataset_recipe

    if args.recipe is None and getattr(args, "data", None) is None:
        raise ValueError("train needs a RECIPE (a name from 'hf-sam-peft recipes' or a YAML path) or --data DIR")
    if getattr(args, "data", None) is None:
        return load_recipe(find_recipe(args.recipe, "training")), None
    check_data_folder(args.data, ("train",))
    # absolute, so run_config.json records the same root from whichever working directory a resume runs
    root = Path(args.data).expanduser().resolve()
    if args.recipe is not None:
        recipe = load_recipe(find_recipe(args.recipe, "training"))
        spec = load_dataset_recipe(recipe.dataset) if isinstance(recipe.dataset, str) else dict(recipe.dataset)
        spec.update(root=str(root), name=root.name)
        recipe.dataset = spec
        return recipe, f"data: {root} with the settings of recipe {recipe.name} (dataset {spec.get('recipe_path', '')})"
    from .commands import data_layout, layout_reason

    resize = getattr(args, "resize_inputs", None)
    requested, flag = (None, None) if resize is None else ("resize", "--resize") if resize else ("tiles", "--patches")
    layout = data_layout(root, requested=requested, flag=flag)
    name = FOLDER_RECIPE.format(layout=layout.layout)
    recipe = load_recipe(find_recipe(name, "training"))
    recipe.dataset = folder_dataset_recipe(root, layout.layout)
    recipe.name = root.name
    line = (f"data layout: {layout.layout} ({layout_reason(layout)}): the packaged recipe {name} "
            f"(hf-sam-peft recipes show {name}); --resize or --patches to choose")
    return recipe, line


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    recipe, line = recipe_from_args(args)
    # under DDP only the main process prints
    if line is not None and PartialState().is_main_process:
        print(line)
    recipe = apply_overrides(recipe, args)
    summary = train(recipe, resume_from_checkpoint=args.resume, overwrite=getattr(args, "overwrite", False),
                    allow_changed_settings=getattr(args, "allow_changed_settings", False))
    if PartialState().is_main_process:
        print(format_summary(summary))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune SAM from a recipe or on a folder (interactive objective, optional AIS decoder)",
        description=(
            "Fine-tune SAM with one of the ten methods and µSAM's interactive objective, as a recipe says (a name "
            "from 'hf-sam-peft recipes' or a YAML path), or on your own folder with --data DIR. Runs on one "
            "process here; for several GPUs use: accelerate launch -m hf_sam_peft.train RECIPE"
        ),
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .cli import run_command

    parser = argparse.ArgumentParser(prog="python -m hf_sam_peft.train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_command(run, parser.parse_args(argv), "hf-sam-peft train")


if __name__ == "__main__":
    sys.exit(main())
