"""`hf-sam-peft methods`: the ten fine-tuning methods and their trainable parameters."""

from __future__ import annotations

import argparse

from ..methods import METHODS, parameter_table
from ..modeling.sam import VIT_SIZES
from ..modeling.sam2 import SAM2_SIZES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "methods",
        help="list the ten fine-tuning methods with their trainable parameters",
        description=(
            "Print the paper's ten fine-tuning methods with the trainable parameters each leaves in SAM or SAM 2 "
            "(image encoder only, and in total with the prompt encoder and mask decoder, which always train). "
            "Counts come from the configs alone: no weights are downloaded or loaded."
        ),
    )
    parser.add_argument(
        "--model", choices=[*sorted(VIT_SIZES), *SAM2_SIZES], action="append",
        help="SAM or SAM 2 (2.1) size to count for (repeatable; default: vit_b, vit_l and vit_h side by side)",
    )
    parser.set_defaults(func=run)


def format_table(tables: dict[str, list[dict]]) -> str:
    sizes = list(tables)
    header = ["method", "kind"] + [f"{s} encoder" for s in sizes] + [f"{s} total (M)" for s in sizes]
    lines = []
    for i, name in enumerate(METHODS):
        row = [METHODS[name].title, METHODS[name].kind]
        row += [f"{tables[s][i]['encoder_trainable']:,}" for s in sizes]
        row += [f"{tables[s][i]['trainable'] / 1e6:.4f}" for s in sizes]
        lines.append(row)
    widths = [max(len(r[c]) for r in [header, *lines]) for c in range(len(header))]
    fmt = lambda r: "  ".join(v.ljust(w) if c < 2 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths)))
    rule = "  ".join("-" * w for w in widths)
    totals = ", ".join(f"{s}: {tables[s][0]['base_total']:,} parameters" for s in sizes)
    return "\n".join([fmt(header), rule, *map(fmt, lines), "", f"base models: {totals}"])


def run(args: argparse.Namespace) -> int:
    sizes = args.model or ["vit_b", "vit_l", "vit_h"]
    print(format_table({s: parameter_table(s) for s in dict.fromkeys(sizes)}))
    return 0
