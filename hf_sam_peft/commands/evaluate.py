"""`hf-sam-peft evaluate`: interactive (Point, Box, I_P, I_B) and AIS scores of a SAM + adapter on a split."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from . import add_resize_argument
from ..evaluation.results import METRIC_NAMES, ResultsTable
from ..run_lock import output_lock

MODES = ("interactive", "ais", "all")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score a SAM (+ adapter) on a dataset split: Point, Box, I_P, I_B and AIS",
        description=(
            "Evaluate a base SAM with an optional adapter on <data>/<split> (layout <split>/images + "
            "<split>/labels): interactive segmentation from a point and from a box with 7 corrections "
            "(Point, Box, I_P, I_B), and automatic instance segmentation when the adapter has a UNETR decoder "
            "(<adapter>/unetr or 'unetr_decoder' in its modules_to_save). The point start is one click at each "
            "object's centre, answered through the output the adapter trained points with ('point_multimask' "
            "in its hf_sam_peft.json: SAM's multimask output unless it records false). Prints a results table "
            "and writes it to --out (CSV or JSON; an existing file is updated, rows with the same key replaced)."
        ),
    )
    parser.add_argument("--base", "--model", dest="base", required=True, help="base model: a SamModel / Sam2Model folder or Hub id, or a name: lite_medsam, tiny, tiny_sam2 (random, for development)")
    parser.add_argument("--adapter", help="adapter folder or Hub repo id (omit to evaluate the base model)")
    parser.add_argument("--data", required=True, help="dataset root with <split>/images and <split>/labels")
    parser.add_argument("--split", default="val", help="split to score (default: val)")
    parser.add_argument(
        "--grid-search-split",
        help="split to grid-search the AIS watershed parameters on first (e.g. val when scoring test)",
    )
    parser.add_argument("--mode", choices=MODES, default="all", help="what to evaluate (default: all)")
    parser.add_argument(
        "--metric", choices=METRIC_NAMES, action="append",
        help="table metric(s): msa (microscopy), dice (medical), iou; repeatable (default: msa)",
    )
    parser.add_argument("--out", help="results file to write or update (.csv or .json)")
    parser.add_argument("--dataset", help="dataset name in the table (default: the data folder's name)")
    parser.add_argument("--method", help="method name in the table (default: the adapter's peft type, or 'base')")
    # 7: micro-sam's run_inference_with_iterative_prompting (micro_sam/evaluation/inference.py) runs n_iterations=8,
    # the first prompt and 7 corrections
    parser.add_argument("--n-corrections", type=int, default=7, help="correction rounds after the first prompt (default: 7)")
    parser.add_argument("--seed", type=int, default=0, help="prompt sampling seed (default: 0)")
    parser.add_argument("--batch-size", type=int, default=16, help="objects per mask-decoder call (default: 16)")
    parser.add_argument("--max-images", type=int, help="evaluate only the first N images of the split")
    parser.add_argument(
        "--label-mode", choices=("instances", "semantic"), default=None,
        help="semantic: labels are class maps, Dice is averaged over classes (medical data). Default, with "
        "--resize also left out: as train --data serves the folder (chosen from its train split: few large "
        "objects per image -> semantic + --resize + Dice), else instances",
    )
    add_resize_argument(parser)
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument(
        "--bf16", action="store_true",
        help="run the mask decoder's transformer in bf16 where the device computes it natively (on a CPU with AMX "
        "1.0-1.2x the float32 speed, see benchmarks/EVALUATION.md; masks move on boundary pixels: box mSA 0.276 "
        "vs 0.282 on the demo tile); default: float32",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=run)


def _rows(args: argparse.Namespace, split: str) -> list[dict[str, Any]]:
    # lazy: kept off the CLI start-up path (every command module is imported to build --help)
    from ..data import iter_rows

    # Whole images, ground truth as stored (connected components, no size filter), images with objects only.
    return list(
        iter_rows(args.data, split, min_size=0, max_images=args.max_images, label_mode=args.label_mode)
    )


def method_name(adapter: str | None) -> str:
    """The adapter's peft type (lower case) as a method name, or ``base`` without an adapter."""
    if adapter is None:
        return "base"
    # lazy: kept off the CLI start-up path (every command module is imported to build --help)
    from ..hub.provenance import read_json_file

    config = Path(adapter, "adapter_config.json")
    if config.is_file():
        return str(read_json_file(config).get("peft_type", "adapter")).lower()
    return "adapter"


def _stamp(path: str | None) -> Any:
    """What a local file or folder holds (names, sizes, modification times), so that a journal of a run on
    other weights or data is never taken for this one's; a Hub id or name as it is."""
    if path is None or not Path(path).exists():
        return path
    # sizes and mtimes, not content hashes: hashing would read every byte (gigabytes for a vit_h) on every run
    root = Path(path).resolve()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return [str(root)] + [[p.relative_to(root).as_posix() if p != root else "", p.stat().st_size, p.stat().st_mtime_ns]
                          for p in files]


def journal_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Everything an evaluation's per-image results depend on (the key of its ImageJournal)."""
    # the grid-search split changes the AIS parameters and so every AIS result: its files are part of the key too
    splits = [args.split] + ([args.grid_search_split] if args.grid_search_split else [])
    return {
        "base": _stamp(args.base), "adapter": _stamp(args.adapter),
        "data": [_stamp(str(Path(args.data, split))) for split in splits],
        **{key: getattr(args, key) for key in (
            "split", "grid_search_split", "mode", "n_corrections", "seed", "batch_size", "max_images",
            "label_mode", "resize", "device", "bf16",
        )},
    }


def _details(result: dict[str, Any] | None) -> dict[str, Any] | None:
    if result is None:
        return None
    # the segmentations are label images (numpy arrays): too large for the results file and not JSON
    return {k: v for k, v in result.items() if k != "segmentations"}


def run(args: argparse.Namespace) -> int:
    """Evaluate; with --out, holding that results file's lock for the whole run (one evaluation at a time
    writes a table; others beside it go on)."""
    # lazy: kept off the CLI start-up path (every command module is imported to build --help)
    from ..evaluation.results import check_results_file

    if args.out is None:
        return _evaluate(args)
    # before the model is loaded: a finished evaluation is never lost for want of a place to write it
    check_results_file(args.out)
    with output_lock(Path(args.out).parent, target=args.out):
        return _evaluate(args)


def _evaluate(args: argparse.Namespace) -> int:
    # lazy: kept off the CLI start-up path (every command module is imported to build --help)
    from ..evaluation.ais import NO_DECODER_MESSAGE, evaluate_ais
    from ..evaluation.interactive import SCORING, evaluate_interactive, format_per_class
    from ..evaluation.predictor import SamPredictor, has_unetr, image_size_of, load_model, point_multimask_of
    from ..evaluation.resized import resized_if
    from ..evaluation.results import ImageJournal
    from . import scoring_layout

    resize, line = scoring_layout(
        args.data, args.split, args.label_mode is not None or args.resize is not None, adapter=args.adapter
    )
    if line is not None:
        print(line)
    # resize 0: the model's own input size (resized_if); medical data is scored per class, by Dice unless --metric
    if resize:
        args.resize, args.label_mode, args.metric = 0, "semantic", args.metric or ["dice"]
    # defaulted only now: scoring_layout above reads a None label_mode as "the user did not choose"
    args.label_mode = args.label_mode or "instances"
    # finished images are kept beside the table as they come: a crash or a full disk loses at most one image
    # keyed after the layout is resolved: on the label_mode / resize the per-image results were computed with
    journal = ImageJournal(args.out, journal_settings(args)) if args.out is not None else None
    model = load_model(args.base, args.adapter, device=args.device)
    rows = _rows(args, args.split)
    progress = not args.no_progress

    interactive = ais = None
    if args.mode in ("interactive", "all"):
        # the adapter's recorded point_multimask (set on the model by load_model) decides how a click is answered
        predictor = resized_if(SamPredictor(model, bf16=args.bf16), args.resize, image_size_of(model))
        interactive = evaluate_interactive(
            predictor, rows, n_corrections=args.n_corrections, seed=args.seed, batch_size=args.batch_size,
            # without --out there is no journal: done / on_image are None (score every image, record nothing)
            progress=progress, done=journal and journal.done("interactive"),
            on_image=journal and journal.callback("interactive"),
        )
    if args.mode in ("ais", "all"):
        if has_unetr(model):
            val_rows = _rows(args, args.grid_search_split) if args.grid_search_split else None
            ais = evaluate_ais(
                model, rows, val_rows=val_rows, progress=progress, done=journal and journal.done("ais"),
                on_image=journal and journal.callback("ais"),
            )
        elif args.mode == "ais":
            raise ValueError(NO_DECODER_MESSAGE)
        else:
            print("note: the model has no UNETR decoder, AIS skipped", file=sys.stderr)

    dataset = args.dataset or Path(args.data).resolve().name
    table = ResultsTable()
    table.add_evaluation(
        dataset, args.method or method_name(args.adapter), args.adapter or "", interactive, ais,
        metrics=tuple(dict.fromkeys(args.metric or ["msa"])),  # a repeated --metric once, in the order given
    )
    if args.out is not None:
        out = Path(args.out)
        merged = ResultsTable.read(out).merge(table) if out.is_file() else table
        details = {
            "dataset": dataset, "split": args.split, "point_multimask": point_multimask_of(model),
            "interactive": _details(interactive), "ais": _details(ais), "resize": args.resize,
        }
        merged.write(out, details=details)
        # only after the table is written: until then the journal is the only copy of the finished images
        journal.remove()
    print(table.format())
    if interactive is not None:
        print(f"scoring: {SCORING[interactive['scoring']]}")
        per_class = format_per_class(interactive)
        if per_class:
            print("Dice per class:")
            print(per_class)
    return 0
