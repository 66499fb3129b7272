"""`hf-sam-peft app`: a local Gradio page to prompt a base SAM and compare adapters on your own images."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "app",
        help="interactive web app: click on an image, compare the base model with adapters",
        description=(
            "Start a Gradio app on 127.0.0.1: upload a 2D image, click positive/negative points or draw a box, "
            "see the mask and its predicted IoU; switch between the base model and each adapter on the same "
            "prompts; 'segment all' (AIS) for adapters with a UNETR decoder; download the label image. "
            "Needs the [app] extra: pip install 'hf-sam-peft[app]'."
        ),
    )
    parser.add_argument(
        "--base", default=None,
        help="base model: 'lite_medsam', a SamModel / Sam2Model folder or Hub id, or 'tiny' / 'tiny_sam2' (random, for development); "
        "default: the base the first adapter names, else lite_medsam",
    )
    parser.add_argument(
        "--adapter", action="append", default=[], metavar="DIR_OR_REPO",
        help="adapter folder or Hub repo id (repeatable: each one becomes a choice in the page)",
    )
    parser.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: Gradio's, 7860 or the next free)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # lazy: kept off the CLI start-up path (every command module is imported to build --help)
    from ..app import INSTALL_HINT

    try:
        import gradio  # noqa: F401  (lazy: optional dependency, the `app` extra; its absence gives INSTALL_HINT)
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    # checked here, before loading the models (slow), rather than left to Gradio's bind after it
    if args.port is not None and not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")

    # lazy: the app's modules load the model stack; app.ui needs gradio (optional, the `app` extra)
    from ..app import AppLogic, ModelBank
    from ..app.models import recorded_base
    from ..app.ui import launch
    from ..evaluation.predictor import load_base

    # an adapter only fits the base (size) it was trained on, so the first adapter's record beats the default
    base = args.base or (recorded_base(args.adapter[0]) if args.adapter else None) or "lite_medsam"
    print(f"loading base model {base!r} and {len(args.adapter)} adapter(s) ...", flush=True)
    bank = ModelBank(load_base(base, args.device), args.adapter)
    launch(AppLogic(bank), port=args.port)
    return 0
