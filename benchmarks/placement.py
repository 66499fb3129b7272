"""Where the adapters sit: step time and peak memory of methods in all / the last 6 / the last 3 encoder blocks.

The ``layers`` option of every method (peft's ``layers_to_transform``; ``hf-sam-peft methods --last-k K`` shows
the counts) keeps the blocks below the first adapted one frozen, so backward stops above them. This measures
what that buys: for each method and each ``k`` in ``--ks`` (``all`` = every block), one real training step of
µSAM's interactive objective (``interactive_loss``: image encoder once, ``--rounds`` prompt rounds, backward,
AdamW step; the trainer's default ``EfficiencyOptions``), beside Freeze Encoder (the floor: no encoder graph)
measured in the same run. Each row runs in its own process (``train_step.measure``: same model builder, batch,
timing and peak RSS as ``benchmarks/train_step.py``; a row is ``name@lastK`` there), so peak memory is the row's
own. Random weights (the full ViT-B ``SamConfig``, nothing downloaded), the synthetic batch of
``benchmarks/synthetic.py`` (one image of bright discs on noise).

    python benchmarks/placement.py                                        # ViT-B, 1024², lora,dora,ia3 x all,6,3
    python benchmarks/placement.py --image-size 512 --rounds 2            # ViT-B's blocks at 512²: ~14 min here
    python benchmarks/placement.py --model tiny --image-size 256 --ks all,1 --steps 1 --warmup 0   # seconds
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue as queues
import sys
from typing import Any, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_info import isa_line, isa_summary  # noqa: E402
import train_step  # noqa: E402
from train_step import measure, result_of  # noqa: E402

DEFAULT_METHODS = ("lora", "dora", "ia3")  # the paper's LoRA and two of peft's own
FLOOR = "freeze_encoder"
PATH = "optimized"  # the trainer's defaults (EfficiencyOptions()) with fused AdamW


def parse_ks(text: str) -> list[int | None]:
    """``all,6,3`` -> ``[None, 6, 3]`` (None: every block); a bad entry is a one-line ValueError."""
    ks: list[int | None] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        if item == "all":
            ks.append(None)
        elif item.isdigit() and int(item) >= 1:
            ks.append(int(item))
        else:
            raise ValueError(
                f"--ks must be a comma-separated list of 'all' and positive ints, got {item!r} in {text!r}")
    if not ks or len(set(ks)) != len(ks):
        raise ValueError(f"--ks must list at least one distinct value, got {text!r}")
    return ks


def row_specs(methods: Sequence[str], ks: Sequence[int | None]) -> list[tuple[str, int | None]]:
    """(method, k) per row: Freeze Encoder first (its k is None: no encoder block trains), then methods x ks."""
    from hf_sam_peft.methods import ALL_METHOD_NAMES

    unknown = [m for m in methods if m not in ALL_METHOD_NAMES or m == FLOOR]
    if unknown:
        raise ValueError(f"--methods must name encoder methods of {', '.join(ALL_METHOD_NAMES)} other than {FLOOR} "
                         f"(measured in every run), got {unknown}")
    return [(FLOOR, None)] + [(m, k) for m in methods for k in ks]


def build_model(model: str, image_size: int):
    """``train_step.build_model``, and a paper size at another input than 1024² (same blocks and widths, fewer
    tokens: a shorter run where a 1024² one does not fit the time there is)."""
    if model == "tiny" or image_size == 1024:
        return _build_model_1024(model, image_size)
    from transformers import SamModel

    from hf_sam_peft.modeling.sam import sam_config

    config = sam_config(model)
    config.vision_config.image_size = image_size
    config.prompt_encoder_config.image_size = image_size
    config.prompt_encoder_config.image_embedding_size = image_size // config.prompt_encoder_config.patch_size
    return SamModel(config)


_build_model_1024 = train_step.build_model


def _measure(spec: str, path: str, opts: dict[str, Any], queue) -> None:
    """``train_step.measure`` with this module's model builder (the spawned process imports both afresh)."""
    train_step.build_model = build_model
    measure(spec, path, opts, queue)


def measure_row(method: str, k: int | None, opts: dict[str, Any], isolate: bool = True) -> dict[str, Any]:
    """One row: ``train_step.measure`` of ``method@lastK`` (or all blocks), in its own process unless ``isolate``
    is False (tests: peak memory is then this process's so far)."""
    spec = method if k is None else f"{method}@last{k}"
    if isolate:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_measure, args=(spec, PATH, opts, queue))
        proc.start()
        row = result_of(proc, queue, spec, PATH)
        proc.join()
    else:
        threads = torch.get_num_threads()  # measure sets the row's threads; the caller keeps its own
        queue = queues.Queue()
        try:
            _measure(spec, PATH, opts, queue)
        finally:
            torch.set_num_threads(threads)
        row = queue.get_nowait()
    return {**row, "method": method, "k": k}


def format_row(row: dict[str, Any], floor: dict[str, Any] | None, n_blocks: int) -> str:
    """A Markdown row; the ratios are this row's over Freeze Encoder's (same run)."""
    k = "—" if row["method"] == FLOOR else (f"all ({n_blocks})" if row["k"] is None else str(row["k"]))
    if "error" in row:
        return f"| {row['method']} | {k} | — | — | unavailable: {row['error']} | — | — | — | — |"
    ok = floor is not None and "error" not in floor
    encoder = f"{row['trainable'] - floor['trainable']:,}" if ok else "—"
    ratio_t = f"{row['time_per_it'] / floor['time_per_it']:.2f}×" if ok else "—"
    ratio_m = f"{row['peak_gib'] / floor['peak_gib']:.2f}×" if ok else "—"
    return (f"| {row['method']} | {k} | {row['trainable']:,} | {encoder} | {row['time_per_it']:.2f} | "
            f"{row['cpu_per_it']:.1f} | {row['peak_gib']:.2f} | {ratio_t} | {ratio_m} |")


HEADER = (
    "| method | k (last blocks) | trainable params | of them in the encoder | s/step | CPU s/step | "
    "peak memory (GiB) | time vs Freeze Encoder | memory vs Freeze Encoder |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|"
)


def encoder_blocks(model: str, image_size: int) -> int:
    """How many encoder blocks the benchmark's model has (the 'all' of ``--ks``), from its config alone."""
    from hf_sam_peft.modeling.sam import sam_config, tiny_sam_config

    config = tiny_sam_config(image_size=image_size) if model == "tiny" else sam_config(model)
    return config.vision_config.num_hidden_layers


def run(args: argparse.Namespace, isolate: bool = True, out=sys.stdout) -> list[dict[str, Any]]:
    """Measure every row and print the table as it goes; returns the rows."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    ks = parse_ks(args.ks)
    specs = row_specs(methods, ks)
    image_size = args.image_size or (256 if args.model == "tiny" else 1024)
    if image_size % 16:
        raise ValueError(f"--image-size must be a multiple of 16 (the patch size), got {image_size}")
    n_blocks = encoder_blocks(args.model, image_size)
    too_deep = [k for k in ks if k is not None and k > n_blocks]
    if too_deep:
        raise ValueError(f"--ks {too_deep} exceed the {n_blocks} encoder blocks of model {args.model!r}")
    opts = dict(model=args.model, image_size=image_size, data_size=image_size, batch=1, objects=args.objects,
                rounds=args.rounds, steps=args.steps, warmup=args.warmup, threads=args.threads, device="cpu",
                profile=None)
    print(f"# {args.model} ({n_blocks} encoder blocks), input {image_size}², batch 1, {args.objects} objects, "
          f"{args.rounds} rounds, CPU ({args.threads} threads), {PATH} path; median of {args.steps} steps after "
          f"{args.warmup} warm-up; one process per row; load average at start {os.getloadavg()[0]:.1f}", file=out)
    print(isa_line(), file=out)
    print(HEADER, file=out)
    out.flush()
    rows: list[dict[str, Any]] = []
    floor = None
    for method, k in specs:
        row = measure_row(method, k, opts, isolate=isolate)
        if method == FLOOR:
            floor = row
        rows.append(row)
        print(format_row(row, floor, n_blocks), file=out)
        out.flush()
    print(f"# load average at end {os.getloadavg()[0]:.1f}", file=out)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"options": opts, "isa": isa_summary(), "n_blocks": n_blocks, "rows": rows}, f, indent=2)
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_b", choices=["tiny", "vit_b", "vit_l", "vit_h"],
                   help="random-weight SAM: a paper size (1024² input) or the tiny test model")
    p.add_argument("--image-size", type=int, default=None,
                   help="input size (default: 1024 for the paper sizes, whose real input it is; 256 for tiny)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated method names (Freeze Encoder is always measured); "
                        f"default {','.join(DEFAULT_METHODS)}")
    p.add_argument("--ks", default="all,6,3", help="comma-separated: how many of the last encoder blocks hold adapters")
    p.add_argument("--steps", type=int, default=2, help="timed steps per row (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--objects", type=int, default=4)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the rows to this JSON file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    for name in ("steps", "objects", "rounds", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be at least 0, got {args.warmup}")
    try:
        run(args)
    except ValueError as exc:
        p.error(str(exc))
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)  # the parent only waits; each row's process sets its own threads
    sys.exit(main())
