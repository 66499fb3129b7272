"""One cell of a study: train (a recipe built from the study + the cell), then score on the held-out split.

Runs in its own process by default (``python -m hf_sam_peft.study.cell CELL.json``; :mod:`.runner` starts it),
so that its peak memory is its own and a crash or a kill loses that cell only. The cell folder holds
``cell.json`` (everything the cell needs, written by the runner), ``run/`` (the training run: checkpoints,
adapter, loss curve) and, once finished, ``cell_result.json`` (written atomically: its presence means done).
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from transformers import TrainerCallback

__all__ = ["RESULT_NAME", "SPEC_NAME", "StepTimer", "evaluation_resize", "evaluation_rows", "peak_memory_gib", "run_cell"]

SPEC_NAME = "cell.json"
RESULT_NAME = "cell_result.json"
RUN_FOLDER = "run"


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (data, forward, backward, update; not evaluation or saving)."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self._start: Optional[float] = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is not None:
            self.durations.append(time.perf_counter() - self._start)
            self._start = None

    def time_per_iteration(self) -> Optional[float]:
        """Median step time, the first step (warm-up: allocations, kernel choice) left out when there are more."""
        steps = self.durations[1:] if len(self.durations) > 1 else self.durations
        return statistics.median(steps) if steps else None


def peak_memory_gib(device: str = "cpu") -> float:
    """Peak memory of this process so far: GPU memory allocated by torch on CUDA, else the peak RSS."""
    import torch

    # both are high-water marks of the whole process and never go down: why each cell runs in a process of its own
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30  # allocated tensors, not the allocator's reserved cache
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


def evaluation_rows(dataset: str, evaluation: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """The rows a cell is scored on, and the dataset's table metric (``msa`` or ``dice``).

    ``patch="auto"``: instance sets are cut into the dataset's ``patch_shape`` grid (the scale the training
    patches have; with LiteMedSAM's 256² input a whole 1024² image would show objects 4× smaller than in
    training), semantic (medical) sets are scored as whole images (peft-sam's medical loaders resize whole
    images, ``peft_sam/dataset/get_data_loaders.py``), through the recipe's resize when it has
    ``resize_inputs`` (:func:`evaluation_resize`). Ground truth as stored (``min_size=0``).
    """
    from ..data import iter_rows, load_dataset_recipe

    recipe = load_dataset_recipe(dataset)
    patch = evaluation["patch"]
    if patch == "auto":
        patch = None if recipe["label_mode"] == "semantic" else recipe["patch_shape"]
    rows = iter_rows(
        recipe["root"], evaluation["split"], patch_shape=patch, min_size=0, label_mode=recipe["label_mode"],
        seed=evaluation["seed"],
    )
    # the cap counts scored rows (grid patches for instance sets), not files as iter_rows' max_images would; the
    # generator is left as soon as it is reached, so the rest of the split is never read
    limit = evaluation["max_images"]
    out = []
    for row in rows:
        if limit is not None and len(out) >= limit:
            break
        out.append(row)
    if not out:
        raise ValueError(f"dataset {dataset!r}: split {evaluation['split']!r} has no image with objects to score")
    return out, recipe.get("metric", "msa")


def evaluation_resize(dataset: str, evaluation: dict[str, Any]) -> int | None:
    """The square side a cell's whole images are resized to before the model sees them (the same transform
    as the dataset's training rows), or None: ``patch="auto"`` and a recipe with ``resize_inputs``."""
    from ..data import load_dataset_recipe

    recipe = load_dataset_recipe(dataset)
    if evaluation["patch"] == "auto" and recipe.get("resize_inputs"):
        return int(recipe["patch_shape"][0])
    return None


def _train(cell: dict[str, Any], folder: Path, timer: StepTimer):
    from ..train import Recipe, existing_run, train_model
    from ..training.trainer import list_checkpoints

    run_dir = folder / RUN_FOLDER
    data = dict(cell["data"])
    # checkpoints are chosen on a part of train held out for validation, never on the split the cell is scored on
    if data.get("val_split", "val") == cell["evaluation"]["split"]:
        data["val_split"] = None
    # a study's patch count is for the datasets that sample patches; resized whole images are one row each
    # asked with patch="auto" whatever the cell's evaluation says: this is about how the recipe trains
    if evaluation_resize(cell["dataset"], {"patch": "auto"}) is not None:
        data.pop("n_patches_per_image", None)
    recipe = Recipe(
        name=f"{cell['study']}-{cell['cell_id']}", dataset=cell["dataset"], base_model=cell["base_model"],
        method=cell["method"], method_options=dict(cell["method_options"]), ais=cell["ais"], data=data,
        # no logging integrations picked up from the environment, no bars in log.txt; the study's own keys win
        training={"report_to": "none", "disable_tqdm": True, **cell["training"]}, output_dir=str(run_dir), seed=cell["seed"],
    )
    # This cell's own unfinished run (no cell_result.json yet): continue from its newest intact checkpoint, or,
    # with none, start it again. Nothing outside the study's cell folder is touched.
    # True: resume from the newest intact checkpoint; with none, overwrite lets this cell's own leftovers (adapter,
    # trainer_state.json) be replaced, which train_model otherwise refuses
    resume = True if run_dir.is_dir() and list_checkpoints(run_dir) else None
    overwrite = resume is None and run_dir.is_dir() and bool(existing_run(run_dir))
    return train_model(recipe, resume_from_checkpoint=resume, overwrite=overwrite, callbacks=[timer])


def run_cell(cell: dict[str, Any], folder: str | Path, progress: bool = False) -> dict[str, Any]:
    """Train and score one cell described by ``cell`` (the runner's ``cell.json``); write and return its result."""
    import torch

    from ..atomic import atomic_write_text
    from ..evaluation.ais import evaluate_ais
    from ..evaluation.interactive import evaluate_interactive
    from ..evaluation.predictor import SamPredictor, has_unetr, load_base, set_point_multimask
    from ..evaluation.resized import resized_if
    from ..methods import count_parameters

    folder = Path(folder)
    start = time.perf_counter()
    # CPU unless the study's training says use_cpu: false (TrainingArguments' key), so train and score agree
    device = "cuda" if cell["training"].get("use_cpu") is False else "cpu"
    timer = StepTimer()
    if cell["method"] == "base":
        model = load_base(cell["base_model"], device)
        # scored through the output the study's fine-tunes answer points with, so the rows compare like with like
        # True: InteractiveTrainingArguments.point_multimask's default, what a fine-tune of this study trained with
        set_point_multimask(model, cell["training"].get("point_multimask", True))
        summary: dict[str, Any] = {"steps": 0, "best_is_base": None, "best_metric": None, "base_metric": None}
        trainable = 0
    else:
        summary, model = _train(cell, folder, timer)
        set_point_multimask(model, summary["point_multimask"])
        trainable = summary["trainable_parameters"]
    # read before scoring: the table's memory is training's (for a base cell: loading the model)
    peak_train = peak_memory_gib(device)
    train_s = time.perf_counter() - start
    model.eval()

    evaluation = cell["evaluation"]
    rows, table_metric = evaluation_rows(cell["dataset"], evaluation)
    eval_start = time.perf_counter()
    with torch.no_grad():
        # model_input_size 0 is never read: evaluation_resize gives None or the recipe's positive side
        predictor = resized_if(
            SamPredictor(model, bf16=evaluation.get("bf16", False)), evaluation_resize(cell["dataset"], evaluation), 0
        )
        interactive = evaluate_interactive(
            predictor, rows, n_corrections=evaluation["n_corrections"], seed=evaluation["seed"],
            batch_size=evaluation["batch_size"], progress=progress,
        )
        ais = None
        if has_unetr(model) and cell["method"] != "base":
            val_rows = None
            if evaluation["ais_grid_search"]:
                # watershed parameters tuned on train: never on the split being scored, which may be val
                val_rows, _ = evaluation_rows(cell["dataset"], {**evaluation, "split": "train"})
            ais = evaluate_ais(model, rows, val_rows=val_rows, progress=progress)
    result = {
        "cell_id": cell["cell_id"],
        "study": cell["study"],
        "dataset": cell["dataset"],
        "method": cell["method"],
        "base_model": cell["base_model"],
        "seed": cell["seed"],
        "ablation": cell["ablation"],
        "table_metric": table_metric,
        "scores": {m: interactive[m] for m in ("msa", "dice", "iou")},
        "rounds": interactive["rounds"],
        "ais": None if ais is None else {k: ais[k] for k in ("msa", "sa50", "sa75")},
        "n_images": interactive["n_images"],
        "scoring": interactive["scoring"],
        "dice_per_class": interactive.get("dice_per_class"),
        "resize": evaluation_resize(cell["dataset"], evaluation),
        "n_objects": interactive["n_objects"],
        "trainable_parameters": trainable,
        "total_parameters": count_parameters(model)[1],
        "steps": summary["steps"],
        "time_per_iteration_s": timer.time_per_iteration(),
        "peak_memory_gib": peak_train,
        "train_s": train_s,
        "eval_s": time.perf_counter() - eval_start,
        "wall_s": time.perf_counter() - start,
        "best_is_base": summary.get("best_is_base"),
        "best_metric": summary.get("best_metric"),
        "base_metric": summary.get("base_metric"),
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    # written last and atomically: its presence is the runner's "done"; default=float for numpy scalars
    atomic_write_text(folder / RESULT_NAME, json.dumps(result, indent=2, default=float))
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m hf_sam_peft.study.cell CELL_FOLDER [--progress]``: run the cell described in its cell.json."""
    import argparse

    from ..cli import run_command

    parser = argparse.ArgumentParser(prog="python -m hf_sam_peft.study.cell", description=main.__doc__)
    parser.add_argument("folder", type=Path, help="the cell folder (holds cell.json)")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")

    def _run(args) -> int:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        from ..hub.provenance import read_json_file

        spec = read_json_file(args.folder / SPEC_NAME)  # damaged: one line naming the file and the line
        run_cell(spec, args.folder, progress=args.progress)
        return 0

    return run_command(_run, parser.parse_args(argv), "hf-sam-peft study (cell)")


if __name__ == "__main__":
    sys.exit(main())
