"""The ``hf-sam-peft`` subcommands, one module each, and the options several of them share."""

from __future__ import annotations

import argparse


def add_resize_argument(parser: argparse.ArgumentParser) -> None:
    """``--resize [SIZE]`` of ``evaluate`` and ``segment`` (read by
    :func:`hf_sam_peft.evaluation.resized.resized_if`)."""
    # three states: absent -> None (no resizing), bare --resize -> 0 (resized_if reads 0 as the model's own input
    # size, which is only known once the model is loaded), --resize N -> N px
    parser.add_argument(
        "--resize", nargs="?", type=int, const=0, default=None, metavar="SIZE",
        help="feed each image whole, longest side resized to SIZE (default: the model's input size) and padded, "
        "as the reference serves medical images; masks are mapped back to the original size",
    )


LAYOUT_PROBE_IMAGES = 16
"""Training images :func:`data_layout` reads to choose tiles or resize (sorted by id: the same ones every time);
enough for a median of objects per image, few enough that a folder of thousands is not read just for this."""


def data_layout(root, split: str = "train", requested: str | None = None, flag: str | None = None):
    """How a ``--data`` folder is served: ``tiles`` (many small objects: microscopy) or ``resize`` (few large
    ones: medical), chosen by :func:`hf_sam_peft.demo.choose_layout` from the first
    :data:`LAYOUT_PROBE_IMAGES` images of ``split`` (the demo's rule, so demo, train, evaluate and segment agree),
    or ``requested`` (given on the command line as ``flag``)."""
    # lazy: kept off the CLI start-up path (every command module is imported to build --help)
    from ..demo import DataLayout, choose_layout

    if requested is not None:
        return DataLayout(requested, f"{flag or '--' + requested} given")
    # lazy: kept off the CLI start-up path (every command module is imported to build --help)
    from ..data import iter_rows

    # min_size=0: small objects count towards the statistics (DataOptions' default 25 would drop them); "semantic"
    # keeps the stored label values, which choose_layout counts ("instances" would split each into its regions)
    rows = list(iter_rows(root, split, min_size=0, label_mode="semantic", max_images=LAYOUT_PROBE_IMAGES))
    return choose_layout(rows)


def layout_reason(layout) -> str:
    """The data statistics behind a chosen layout, without the demo's own flag hint (``--tiles`` is the demo's
    option; each command names its own)."""
    # choose_layout's reason is "<statistics>: <verdict>; --tiles/--resize to ...": the part after ';' is the hint
    return layout.reason.split(";")[0]


def scoring_layout(data, split: str, chosen: bool, adapter: str | None = None) -> tuple[bool, str | None]:
    """For ``evaluate`` / ``segment --data DIR``: whether to feed whole resized images scored per class (the
    ``resize`` layout), and the line saying why. ``chosen``: the user already picked (``--resize`` /
    ``--label-mode``), nothing is decided here. Else an ``adapter`` that records how it was trained
    (``resize_inputs`` in its provenance, written by ``train``) decides: a model is scored on images served as
    it saw them. Else the layout ``train --data DIR`` trains with decides, from DIR's ``train`` split; a folder
    without one is scored as before (whole images, per object).

    A folder without ``split`` is a one-line error saying what layout was expected and what was found.
    """
    # lazy: kept off the CLI start-up path (every command module is imported to build --help)
    from ..data.recipes import check_data_folder
    from ..hub.provenance import recorded_resize_inputs

    # checked even when the user chose: a missing split is an error either way, and better before the model loads
    splits = check_data_folder(data, (split,))
    if chosen:
        return False, None
    recorded = recorded_resize_inputs(adapter) if adapter is not None else None
    if recorded is not None:
        what = "whole images resized to the model input, Dice per class" if recorded else "whole images at their own size, scored per object"
        served = "resized whole images" if recorded else "patches"
        return recorded, (f"data layout: the adapter was trained on {served} (resize_inputs in its provenance): {what}; "
                          "--resize or --label-mode to choose")
    # a test-only folder gives no training statistics to decide from: the older default (whole images, per object)
    if "train" not in splits:
        return False, None
    layout = data_layout(data)
    if layout.layout == "resize":
        what = "whole images resized to the model input, Dice per class"
    else:
        what = "whole images at their own size, scored per object"
    return layout.layout == "resize", (
        f"data layout: {layout.layout}, as train --data would serve {data} ({layout_reason(layout)}): {what}; "
        "--resize or --label-mode to choose"
    )
