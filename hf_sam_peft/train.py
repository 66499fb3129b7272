"""Train SAM with one of the ten methods from a YAML recipe: `accelerate launch -m hf_sam_peft.train RECIPE`.

The same entry point serves `hf-sam-peft train RECIPE`, one process or many (DDP through accelerate). A recipe
names the dataset (a recipe under `recipes/datasets/` or a path), the base model, the method and its options,
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

RECIPE_KEYS = {
    "name": str, "dataset": (str, dict), "base_model": str, "method": str, "method_options": dict, "ais": bool,
    "data": dict, "training": dict, "output_dir": str, "seed": int, "description": str,
}
DATA_KEYS = ("max_images", "n_patches_per_image", "patch_shape", "min_size", "val_fraction", "with_objects_only")


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


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate an experiment recipe; a one-line error names the file and the bad key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist")
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise ValueError(f"recipe {path}: expected a mapping of keys, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(RECIPE_KEYS))
    if unknown:
        raise ValueError(f"recipe {path}: unknown keys {unknown} (allowed: {sorted(RECIPE_KEYS)})")
    for key, expected in RECIPE_KEYS.items():
        if key in raw and raw[key] is not None and not isinstance(raw[key], expected):
            raise ValueError(f"recipe {path}: {key} has the wrong type {type(raw[key]).__name__}")
    if "dataset" not in raw:
        raise ValueError(f"recipe {path}: missing key 'dataset'")
    bad_data = sorted(set(raw.get("data") or {}) - set(DATA_KEYS))
    if bad_data:
        raise ValueError(f"recipe {path}: unknown data keys {bad_data} (allowed: {list(DATA_KEYS)})")
    raw.setdefault("name", path.stem)
    return Recipe(**{k: v for k, v in raw.items() if v is not None}, path=path)


def _parse_value(text: str) -> Any:
    """A command-line value: bool, None, int, float, a YAML list/dict, else the string itself.

    (Plain YAML would turn `eval_strategy=no` into False.)
    """
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.strip()[:1] in ("[", "{"):
        return yaml.safe_load(text)
    return text


def apply_overrides(recipe: Recipe, args: argparse.Namespace) -> Recipe:
    """Command-line options win over the recipe."""
    for key in ("method", "base_model", "output_dir"):
        value = getattr(args, key, None)
        if value is not None:
            setattr(recipe, key, value)
    if args.max_steps is not None:
        recipe.training["max_steps"] = args.max_steps
    if args.ais is not None:
        recipe.ais = args.ais
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        section, _, name = key.partition(".")
        if section in ("training", "data", "method_options") and name:
            getattr(recipe, section)[name] = _parse_value(value)
        else:
            recipe.training[key] = _parse_value(value)
    return recipe


def build_datasets(recipe: Recipe):
    """(train, val) datasets and the dataset recipe."""
    from .data import dataset_kwargs, load_dataset_recipe, train_val_datasets

    spec = load_dataset_recipe(recipe.dataset) if isinstance(recipe.dataset, str) else recipe.dataset
    kwargs = {**dataset_kwargs(spec), **{k: v for k, v in recipe.data.items() if k != "root"}}
    if "patch_shape" in kwargs and kwargs["patch_shape"] is not None:
        kwargs["patch_shape"] = tuple(kwargs["patch_shape"])
    splits = train_val_datasets(seed=recipe.seed, **kwargs)
    return splits["train"], splits["val"], spec


def build_model(recipe: Recipe, ais: bool):
    """Base model (+ UNETR decoder when `ais`) wrapped with the recipe's method."""
    from .methods import apply_method
    from .modeling.base_models import load_base_model

    model = load_base_model(recipe.base_model)[0]
    options = dict(recipe.method_options)
    if ais:
        from .modeling.unetr import attach_unetr

        attach_unetr(model)  # trains with every method: it is in the configs' default modules_to_save
    return apply_method(model, recipe.method, **options)


def train(recipe: Recipe, resume_from_checkpoint: Optional[str | bool] = None) -> dict[str, Any]:
    """Run a recipe; returns the summary (best step, metric, where the adapter and plots are)."""
    from .methods import count_parameters
    from .training.trainer import InteractiveTrainingArguments, SamInteractiveTrainer

    train_ds, val_ds, spec = build_datasets(recipe)
    ais = bool(spec.get("ais", False)) if recipe.ais is None else recipe.ais
    model = build_model(recipe, ais)
    output_dir = Path(recipe.output_dir or f"outputs/{recipe.name}-{recipe.method}")
    settings = {"seed": recipe.seed, "train_decoder": ais, **recipe.training}
    args = InteractiveTrainingArguments(output_dir=str(output_dir), **settings)
    trainer = SamInteractiveTrainer(model, args, train_dataset=train_ds, eval_dataset=val_ds)
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
        "train_loss": result.training_loss,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "best_metric": trainer.state.best_metric,
        "adapter": str(adapter_dir),
        "loss_curve": str(output_dir / "loss_curve.png"),
    }
    if trainer.is_world_process_zero():
        save_trained(model, adapter_dir, recipe, summary)
    return summary


def save_trained(model, adapter_dir: Path, recipe: Recipe, summary: dict[str, Any]) -> None:
    """The adapter with its provenance and model card (hub.save_adapter), plus a JSON summary of the run."""
    from .atomic import atomic_write_text
    from .hub import save_adapter

    dataset = recipe.dataset if isinstance(recipe.dataset, str) else recipe.dataset.get("name", "custom")
    save_adapter(
        model, adapter_dir, base_model_id=recipe.base_model, method=recipe.method,
        training_data=f"{dataset} (recipe {recipe.name})",
        extra={**recipe.training, "steps": summary["steps"], "best_metric": summary["best_metric"]},
        overwrite=True,
    )
    atomic_write_text(adapter_dir / "training_summary.json", json.dumps(summary, indent=2, default=str))


def format_summary(summary: dict[str, Any]) -> str:
    best = summary["best_checkpoint"] or "(no evaluation ran)"
    metric = summary["best_metric"]
    lines = [
        f"recipe {summary['recipe']}: {summary['method']} on {summary['base_model']}"
        + (" + UNETR decoder (AIS)" if summary["ais"] else ""),
        f"  trainable parameters: {summary['trainable_parameters']:,}",
        f"  steps: {summary['steps']}, final mean training loss: {summary['train_loss']:.4f}",
        f"  best checkpoint: {best}" + (f" (validation metric {metric:.4f})" if metric is not None else ""),
        f"  adapter saved to: {summary['adapter']}",
        f"  loss curve: {summary['loss_curve']}",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", type=Path, help="experiment recipe (YAML), e.g. recipes/livecell.yaml")
    parser.add_argument("--method", help="fine-tuning method (overrides the recipe), e.g. lora, fact, full_ft")
    parser.add_argument("--base-model", dest="base_model", help="base model: Hub id, folder, lite_medsam or tiny")
    parser.add_argument("--output-dir", dest="output_dir", help="where checkpoints, the adapter and plots go")
    parser.add_argument("--max-steps", dest="max_steps", type=int, help="stop after this many optimizer steps")
    parser.add_argument("--ais", dest="ais", action="store_true", default=None, help="also train the UNETR decoder")
    parser.add_argument("--no-ais", dest="ais", action="store_false", help="interactive objective only")
    parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE",
        help="override a training argument (e.g. --set learning_rate=1e-4) or data./method_options. keys",
    )
    parser.add_argument("--resume", nargs="?", const=True, default=None, help="resume from the last (or a given) checkpoint")


def run(args: argparse.Namespace) -> int:
    recipe = apply_overrides(load_recipe(args.recipe), args)
    summary = train(recipe, resume_from_checkpoint=args.resume)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(format_summary(summary))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune SAM from a YAML recipe (interactive objective, optional AIS decoder)",
        description=(
            "Fine-tune SAM with one of the ten methods and µSAM's interactive objective, as a YAML recipe says. "
            "Runs on one process here; for several GPUs use: accelerate launch -m hf_sam_peft.train RECIPE"
        ),
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_sam_peft.train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
