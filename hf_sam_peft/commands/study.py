"""`hf-sam-peft study STUDY.yaml`: the paper's grid of methods × datasets (× seeds, × ablation values)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "study",
        help="run a study: methods x datasets x seeds (x ablations), with the paper's tables and plots",
        description=(
            "Train and score every cell of a study file (methods x datasets x seeds, plus optional ablation "
            "values; the package ships some: hf-sam-peft recipes): each cell trains with the interactive "
            "objective, keeps its best checkpoint (the untouched base included), and is scored on the held-out split with Point, Box, "
            "I_P, I_B (and AIS where the UNETR decoder trains), with its trainable parameters, time per "
            "iteration, peak memory and wall time. Cells run one after another, each in its own process; a "
            "finished cell is never run again, so a killed study resumes where it stopped. Writes results.csv "
            "(one row per cell and metric), results.md (the paper's layout) and plots to the study folder, among them "
            "score_vs_parameters.png (score against trainable parameters, log scale: the paper's efficiency "
            "comparison). --methods / --models replace the file's methods / base_model, e.g. "
            "--methods freeze_encoder,lora,dora,vera,ia3."
        ),
    )
    parser.add_argument("study", help="study: a packaged name (hf-sam-peft recipes), e.g. lite_medsam_2d, or a YAML path")
    parser.add_argument("--methods", type=_names, metavar="A,B,...",
                        help="run these methods instead of the file's: any of the paper's ten and peft's own "
                             "(hf-sam-peft methods), e.g. --methods lora,dora,vera")
    parser.add_argument("--models", type=_names, metavar="A,B,...",
                        help="base models instead of the file's base_model (names, folders or Hub ids); with "
                             "several, each is one more axis of the grid and the cell ids name the model")
    parser.add_argument("--output-dir", dest="output_dir", help="study folder (default: the file's output_dir, "
                        "else studies/<name>)")
    parser.add_argument("--only", action="append", metavar="TEXT",
                        help="run only cells whose id contains TEXT (repeatable), e.g. --only lora")
    parser.add_argument("--overwrite", action="store_true",
                        help="run finished cells again (their results are replaced); needed when a cell's settings changed")
    parser.add_argument("--threads", type=int, help="torch threads per cell (default: torch's)")
    parser.add_argument("--list", action="store_true", help="print the cells and whether each is done, run nothing")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def _names(text: str) -> list[str]:
    """``a,b`` -> ``["a", "b"]``; an empty entry is argparse's one-line error."""
    names = [part.strip() for part in text.split(",")]
    if not names or not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def run(args: argparse.Namespace) -> int:
    from ..data.recipes import find_recipe
    from ..study import load_study, run_study, study_folder
    from ..study.cell import RESULT_NAME

    # find_recipe takes a packaged study name or a path; --methods / --models replace the file's keys before the
    # grid is expanded, so the cell ids and the saved study.yaml follow them
    spec = load_study(find_recipe(args.study, "studies"), methods=args.methods, models=args.models)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be a positive number, got {args.threads}")
    if args.list:
        folder = study_folder(spec, args.output_dir)
        for cell in spec.cells():
            # the result file is written last and atomically by a cell: its presence is what "finished" means
            done = (folder / "cells" / cell.cell_id / RESULT_NAME).is_file()
            print(f"{'done' if done else 'todo'}  {cell.cell_id}")
        return 0
    result = run_study(
        spec, args.output_dir, only=args.only, overwrite=args.overwrite, threads=args.threads,
        progress=not args.no_progress,
    )
    print(result.files["markdown"].read_text(encoding="utf-8"))
    print(f"ran {len(result.ran)} cells, {len(result.skipped)} already done, {len(result.failed)} failed")
    for cell_id, message in result.failed.items():
        print(f"  FAILED {cell_id}: {message}")
    print("tables and plots: " + ", ".join(str(p) for p in result.files.values()))
    return 1 if result.failed else 0  # a failed cell makes the exit status non-zero: scripts and CI notice it
