"""The ``hf-sam-peft`` subcommands, one module each, and the options several of them share."""

from __future__ import annotations

import argparse


def add_resize_argument(parser: argparse.ArgumentParser) -> None:
    """``--resize [SIZE]`` of ``evaluate`` and ``segment`` (read by
    :func:`hf_sam_peft.evaluation.resized.resized_if`)."""
    parser.add_argument(
        "--resize", nargs="?", type=int, const=0, default=None, metavar="SIZE",
        help="feed each image whole, longest side resized to SIZE (default: the model's input size) and padded, "
        "as the reference serves medical images; masks are mapped back to the original size",
    )
