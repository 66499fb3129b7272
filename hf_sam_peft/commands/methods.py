"""`hf-sam-peft methods`: the fine-tuning methods (the paper's ten, peft's own) and their trainable parameters."""

from __future__ import annotations

import argparse

from ..methods import ALL_METHOD_NAMES, METHOD_NAMES, METHODS, parameter_table
from ..modeling.sam import VIT_SIZES
from ..modeling.sam2 import SAM2_SIZES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "methods",
        help="list the fine-tuning methods with their trainable parameters",
        description=(
            "Print the paper's ten fine-tuning methods and peft's own (DoRA, VeRA, IA3, OFT, BOFT, LoHa, LoKr, "
            "AdaLoRA, HRA, FourierFT; kind 'peft') with the trainable parameters each leaves in SAM or SAM 2 "
            "(image encoder only, and in total with the prompt encoder and mask decoder, which always train). "
            "Counts come from the configs alone: no weights are downloaded or loaded."
        ),
    )
    parser.add_argument(
        "--last-k", type=int, default=None, metavar="K",
        help="count every method placed on the encoder's last K blocks only (the option layers=[-K, ..., -1])",
    )
    parser.add_argument("--paper-only", action="store_true", help="only the paper's ten methods")
    parser.add_argument(
        "--model", choices=[*sorted(VIT_SIZES), *SAM2_SIZES], action="append",
        help="SAM or SAM 2 (2.1) size to count for (repeatable; default: vit_b, vit_l and vit_h side by side)",
    )
    parser.set_defaults(func=run)


def format_table(tables: dict[str, list[dict]]) -> str:
    sizes = list(tables)
    header = ["method", "kind"] + [f"{s} encoder" for s in sizes] + [f"{s} total (M)" for s in sizes]
    lines = []
    notes = []
    # every size's table lists the same methods in the same order (parameter_table over one names tuple), so row i
    # of each is the same method
    for i, entry in enumerate(tables[sizes[0]]):
        name = entry["method"]
        row = [METHODS[name].title, METHODS[name].kind]
        # trainable None: a peft method that cannot be placed on this model (check_fits); its reason goes below
        row += ["n/a" if tables[s][i]["trainable"] is None else f"{tables[s][i]['encoder_trainable']:,}" for s in sizes]
        row += ["n/a" if tables[s][i]["trainable"] is None else f"{tables[s][i]['trainable'] / 1e6:.4f}" for s in sizes]
        lines.append(row)
        notes += [f"n/a ({s}): {tables[s][i]['why']}" for s in sizes if tables[s][i]["trainable"] is None]
    widths = [max(len(r[c]) for r in [header, *lines]) for c in range(len(header))]
    # method and kind columns left-aligned, the numbers right-aligned so their digits line up
    fmt = lambda r: "  ".join(v.ljust(w) if c < 2 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths)))
    rule = "  ".join("-" * w for w in widths)
    totals = ", ".join(f"{s}: {tables[s][0]['base_total']:,} parameters" for s in sizes)
    return "\n".join([fmt(header), rule, *map(fmt, lines), "", f"base models: {totals}", *notes])


def run(args: argparse.Namespace) -> int:
    sizes = args.model or ["vit_b", "vit_l", "vit_h"]
    names = METHOD_NAMES if args.paper_only else ALL_METHOD_NAMES
    try:
        # dict.fromkeys: a --model given twice is counted once, the order kept
        tables = {s: parameter_table(s, names, last_k=args.last_k) for s in dict.fromkeys(sizes)}
    except ValueError as exc:
        # e.g. --last-k beyond the model's encoder blocks: argparse's error format, without a traceback
        raise SystemExit(f"hf-sam-peft methods: error: {exc}") from None
    if args.last_k is not None:
        print(f"every method on the last {args.last_k} encoder blocks only")
    print(format_table(tables))
    return 0
