"""`hf-sam-peft convert` and `hf-sam-peft export`: original SAM checkpoints to transformers and back."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hf_sam_peft.modeling.sam import VIT_SIZES

CONVERT_HELP = """\
Convert an original SAM checkpoint (segment_anything .pth, or a micro-sam / MedicoSAM export) into a
transformers SamModel folder (model.safetensors, config.json, processor config) that SamModel.from_pretrained
and every hf-sam-peft command accept. The file is read with torch.load(weights_only=True): a checkpoint that
would need to run Python code to load is refused. The model size is read from the tensor shapes."""

EXPORT_HELP = """\
Write a model back as a segment_anything checkpoint (.pth of plain tensors) that
segment_anything.sam_model_registry[TYPE](checkpoint=...) and micro-sam's annotator load. MODEL is a SamModel
folder or a peft adapter folder; adapters are merged into the base weights first (methods that cannot be
merged are refused)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `convert` and `export` subcommands."""
    convert = subparsers.add_parser(
        "convert",
        help="original SAM checkpoint (.pth) -> transformers SamModel folder",
        description=CONVERT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument("checkpoint", metavar="CKPT", type=Path, help="segment_anything / micro-sam checkpoint file")
    convert.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="folder to write the SamModel to")
    convert.add_argument(
        "--model-type",
        choices=sorted(VIT_SIZES),
        default=None,
        help="expected size; an error if the checkpoint's shapes say otherwise (default: detect)",
    )
    convert.add_argument(
        "--decoder-heads",
        type=int,
        default=8,
        help="attention heads of the mask decoder, the one number the shapes do not fix (default: 8, as SAM)",
    )
    convert.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    convert.set_defaults(func=run)

    export = subparsers.add_parser(
        "export",
        help="SamModel or adapter folder -> segment_anything checkpoint (.pth)",
        description=EXPORT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("model", metavar="MODEL", help="SamModel folder, or peft adapter folder (adapter_config.json)")
    export.add_argument("output", metavar="OUT.pth", type=Path, help="checkpoint file to write")
    export.add_argument(
        "--base",
        default=None,
        help="base SamModel folder or Hub id for an adapter (default: the adapter's base_model_name_or_path)",
    )
    export.add_argument("--overwrite", action="store_true", help="replace OUT.pth if it exists")
    export.set_defaults(func=run_export)


def run(args: argparse.Namespace) -> int:
    """Convert CKPT into OUT_DIR and report what was found."""
    from hf_sam_peft.modeling.convert import convert_checkpoint

    model = convert_checkpoint(
        args.checkpoint,
        args.out_dir,
        model_type=args.model_type,
        decoder_num_heads=args.decoder_heads,
        overwrite=args.overwrite,
    )
    vision = model.config.vision_config
    print(
        f"converted {args.checkpoint} -> {args.out_dir} "
        f"(hidden {vision.hidden_size}, {vision.num_hidden_layers} blocks, {vision.image_size}px images, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters)"
    )
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Load MODEL (merging an adapter into its base) and write it as a segment_anything checkpoint."""
    from hf_sam_peft.modeling.convert import export_to_segment_anything

    model = _load_model(args.model, args.base)
    path = export_to_segment_anything(model, args.output, overwrite=args.overwrite)
    print(f"exported {args.model} -> {path}")
    return 0


def _load_model(model: str, base: str | None):
    """A SamModel, or a PeftModel when `model` is an adapter folder."""
    from transformers import SamModel

    adapter_config = Path(model) / "adapter_config.json"
    if not adapter_config.is_file():
        if base is not None:
            raise ValueError(f"--base is only for adapters, but {model!r} has no adapter_config.json")
        return SamModel.from_pretrained(model)

    from ..loading import (
        load_adapter,  # registers our peft methods and handles q/v LoRA
    )

    base = base or json.loads(adapter_config.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"adapter {model!r} names no base model; pass --base")
    return load_adapter(SamModel.from_pretrained(base), model)
