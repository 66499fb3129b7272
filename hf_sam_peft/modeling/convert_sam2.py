"""Conversion between the official SAM 2 / SAM 2.1 checkpoints (facebookresearch/sam2) and transformers' `Sam2Model`.

An official file (`sam2_hiera_*.pt`, `sam2.1_hiera_*.pt`) is `{"model": state_dict}` of sam2's `SAM2Base`: the
image model (Hiera trunk + FPN neck, prompt encoder, mask decoder, `no_mem_embed`) and the video memory (memory
attention and encoder, object pointers, temporal encodings). `Sam2Model` is the image model only, so conversion
drops the memory tensors with a warning. Export writes the image model back under the official names; with
`memory_from=<the original file>` it carries the memory tensors over, so the export is again a complete checkpoint
that sam2's `build_sam2` (a strict load) and its video predictor accept. Without `memory_from` the file holds
the image model alone: `SAM2ImagePredictor` uses nothing else, but sam2 then needs
`model.load_state_dict(torch.load(f)["model"], strict=False)`.

Files are read with `torch.load(weights_only=True)` only, and keys are translated by one two-way table (as
`hf_sam_peft.modeling.convert_sam` does for SAM, with the helpers of `hf_sam_peft.modeling.convert_common`), so
conversion and export are exact inverses. The shapes tell the four official sizes apart; their head counts,
window sizes and 1024² input come from `hf_sam_peft.modeling.sam2.sam2_config`. A SAM 2 of other shapes needs
its `Sam2Config` (`config=`), because head counts, window sizes and the image size leave no trace in the shapes.
"""

from __future__ import annotations

import copy
import json
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import Sam2Config, Sam2Model

from hf_sam_peft.atomic import atomic_write
from hf_sam_peft.modeling.base_models import sam2_processor
from hf_sam_peft.modeling.convert_common import (
    DECODER_STATE,
    build_with_weights,
    check_file_target,
    check_folder_target,
    compile_key_rules,
    count_numbered,
    examples,
    first_line,
    read_checkpoint,
    save_model_folder,
    translate_all,
    weights_and_decoder,
)
from hf_sam_peft.modeling.sam2 import HIERA_SIZES, SAM2_MODEL_TYPES, sam2_config

__all__ = [
    "SAM2_LAYOUT",
    "SAM2_MODEL_TYPES",
    "convert_sam2_checkpoint",
    "convert_sam2_state_dict",
    "detect_sam2_model_type",
    "export_sam2_checkpoint",
    "load_sam2_checkpoint",
    "load_sam2_config",
    "sam2_model_from_state_dict",
    "to_sam2_state_dict",
]

SAM2_LAYOUT = "official SAM 2 checkpoint ({'model': ...}: sam2's build_sam2 / SAM2ImagePredictor)"

# Any key under these makes a checkpoint a SAM 2 one (then a missing part is a SAM 2 error, not "not a SAM").
_SIGNATURE_PREFIXES = ("image_encoder.trunk.", "sam_prompt_encoder.", "sam_mask_decoder.")
# The video memory of SAM2Base (SAM 2.0 and 2.1), which the image model does not use.
_MEMORY_PREFIXES = ("memory_attention.", "memory_encoder.", "mask_downsample.", "obj_ptr_proj.", "obj_ptr_tpos_proj.")
_MEMORY_KEYS = ("maskmem_tpos_enc", "no_mem_pos_enc", "no_obj_ptr", "no_obj_embed_spatial")

_PLACEHOLDERS = {
    # each placeholder becomes a named group (convert_common._template_regex), so a template may use a name only once:
    # `i` and `j` are two independent numbers in one key (blocks.{i}.norm{j})
    "i": r"\d+",
    "j": r"\d+",
    "p": r"weight|bias",
    "attn": r"self_attn|cross_attn_token_to_image|cross_attn_image_to_token",
    "qkv": r"q_proj|k_proj|v_proj",
    "token": r"iou_token|mask_tokens|obj_score_token",
    "head": r"output_hypernetworks_mlps\.\d+|iou_prediction_head|pred_obj_score_head",
}
_TRUNK, _HF_TRUNK = "image_encoder.trunk", "vision_encoder.backbone"
_TWO_WAY, _HF_TWO_WAY = "sam_mask_decoder.transformer", "mask_decoder.transformer"

# (official key, transformers key); {name} is a placeholder from _PLACEHOLDERS, kept as is. sam2's MLPs number
# their linears `layers.0..n-1`; transformers' call them proj_in, layers.0..n-3, proj_out.
_RULE_TEMPLATES: tuple[tuple[str, str], ...] = (
    # image encoder: Hiera trunk
    (f"{_TRUNK}.pos_embed", f"{_HF_TRUNK}.pos_embed"),
    (f"{_TRUNK}.pos_embed_window", f"{_HF_TRUNK}.pos_embed_window"),
    (f"{_TRUNK}.patch_embed.proj.{{p}}", f"{_HF_TRUNK}.patch_embed.projection.{{p}}"),
    (f"{_TRUNK}.blocks.{{i}}.norm{{j}}.{{p}}", f"{_HF_TRUNK}.blocks.{{i}}.layer_norm{{j}}.{{p}}"),
    (f"{_TRUNK}.blocks.{{i}}.attn.qkv.{{p}}", f"{_HF_TRUNK}.blocks.{{i}}.attn.qkv.{{p}}"),
    (f"{_TRUNK}.blocks.{{i}}.attn.proj.{{p}}", f"{_HF_TRUNK}.blocks.{{i}}.attn.proj.{{p}}"),
    (f"{_TRUNK}.blocks.{{i}}.mlp.layers.0.{{p}}", f"{_HF_TRUNK}.blocks.{{i}}.mlp.proj_in.{{p}}"),
    (f"{_TRUNK}.blocks.{{i}}.mlp.layers.1.{{p}}", f"{_HF_TRUNK}.blocks.{{i}}.mlp.proj_out.{{p}}"),
    # only blocks whose width changes have it (sam2 hieradet.py, MultiScaleBlock.__init__: `if dim != dim_out`)
    (f"{_TRUNK}.blocks.{{i}}.proj.{{p}}", f"{_HF_TRUNK}.blocks.{{i}}.proj.{{p}}"),  # stage change: wider
    # image encoder: FPN neck
    ("image_encoder.neck.convs.{i}.conv.{p}", "vision_encoder.neck.convs.{i}.{p}"),
    # prompt encoder (point_embeddings.N <-> the rows of point_embed: beside the table)
    ("sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", "shared_image_embedding.positional_embedding"),
    ("sam_prompt_encoder.not_a_point_embed.weight", "prompt_encoder.not_a_point_embed.weight"),
    ("sam_prompt_encoder.no_mask_embed.weight", "prompt_encoder.no_mask_embed.weight"),
    # nn.Sequential indices in sam2's PromptEncoder.mask_downscaling (sam/prompt_encoder.py): 2 and 5 are the
    # parameter-free activations, hence absent here (likewise output_upscaling.2 and .4 below)
    ("sam_prompt_encoder.mask_downscaling.0.{p}", "prompt_encoder.mask_embed.conv1.{p}"),
    ("sam_prompt_encoder.mask_downscaling.1.{p}", "prompt_encoder.mask_embed.layer_norm1.{p}"),
    ("sam_prompt_encoder.mask_downscaling.3.{p}", "prompt_encoder.mask_embed.conv2.{p}"),
    ("sam_prompt_encoder.mask_downscaling.4.{p}", "prompt_encoder.mask_embed.layer_norm2.{p}"),
    ("sam_prompt_encoder.mask_downscaling.6.{p}", "prompt_encoder.mask_embed.conv3.{p}"),
    # mask decoder: two-way transformer
    (f"{_TWO_WAY}.layers.{{i}}.{{attn}}.{{qkv}}.{{p}}", f"{_HF_TWO_WAY}.layers.{{i}}.{{attn}}.{{qkv}}.{{p}}"),
    (f"{_TWO_WAY}.layers.{{i}}.{{attn}}.out_proj.{{p}}", f"{_HF_TWO_WAY}.layers.{{i}}.{{attn}}.o_proj.{{p}}"),
    (f"{_TWO_WAY}.layers.{{i}}.mlp.layers.0.{{p}}", f"{_HF_TWO_WAY}.layers.{{i}}.mlp.proj_in.{{p}}"),
    (f"{_TWO_WAY}.layers.{{i}}.mlp.layers.1.{{p}}", f"{_HF_TWO_WAY}.layers.{{i}}.mlp.proj_out.{{p}}"),
    (f"{_TWO_WAY}.layers.{{i}}.norm{{j}}.{{p}}", f"{_HF_TWO_WAY}.layers.{{i}}.layer_norm{{j}}.{{p}}"),
    (f"{_TWO_WAY}.final_attn_token_to_image.{{qkv}}.{{p}}", f"{_HF_TWO_WAY}.final_attn_token_to_image.{{qkv}}.{{p}}"),
    (f"{_TWO_WAY}.final_attn_token_to_image.out_proj.{{p}}", f"{_HF_TWO_WAY}.final_attn_token_to_image.o_proj.{{p}}"),
    (f"{_TWO_WAY}.norm_final_attn.{{p}}", f"{_HF_TWO_WAY}.layer_norm_final_attn.{{p}}"),
    # mask decoder: tokens, upscaling, high-resolution skips, heads (3-layer MLPs: first/middle/last)
    ("sam_mask_decoder.{token}.weight", "mask_decoder.{token}.weight"),
    ("sam_mask_decoder.output_upscaling.0.{p}", "mask_decoder.upscale_conv1.{p}"),
    ("sam_mask_decoder.output_upscaling.1.{p}", "mask_decoder.upscale_layer_norm.{p}"),
    ("sam_mask_decoder.output_upscaling.3.{p}", "mask_decoder.upscale_conv2.{p}"),
    ("sam_mask_decoder.conv_s{j}.{p}", "mask_decoder.conv_s{j}.{p}"),
    ("sam_mask_decoder.{head}.layers.0.{p}", "mask_decoder.{head}.proj_in.{p}"),
    ("sam_mask_decoder.{head}.layers.1.{p}", "mask_decoder.{head}.layers.0.{p}"),
    ("sam_mask_decoder.{head}.layers.2.{p}", "mask_decoder.{head}.proj_out.{p}"),
    # the no-memory token, which the image model adds to the stride-16 features
    ("no_mem_embed", "no_memory_embedding"),
)
_RULES = compile_key_rules(_RULE_TEMPLATES, _PLACEHOLDERS)

# Beside the table: sam2 has one (1, C) Embedding per point label, transformers the rows of one (N, C) Embedding;
# and sam2's one positional basis is two (untied) buffers in transformers.
_POINT_KEY = re.compile(r"sam_prompt_encoder\.point_embeddings\.(\d+)\.weight")
_HF_POINT_KEY = "prompt_encoder.point_embed.weight"
_PE_KEY = "shared_image_embedding.positional_embedding"
_PE_ALIAS = "prompt_encoder.shared_embedding.positional_embedding"


# ---------------------------------------------------------------------------------------------------------------
# Reading checkpoints
# ---------------------------------------------------------------------------------------------------------------


def sam2_state_of(raw: object, name: str) -> dict[str, Tensor] | None:
    """The state dict of a loaded SAM 2 checkpoint (official `{"model": ...}` or bare), or None when `raw` is
    not a SAM 2 checkpoint (how `convert_checkpoint` tells SAM 2 from SAM). A UNETR `decoder_state` beside it is
    ignored with a warning."""
    if not isinstance(raw, Mapping):
        return None
    # a bare state dict is accepted too (e.g. one a user already unwrapped from its {'model': ...})
    state = raw["model"] if isinstance(raw.get("model"), Mapping) else raw
    if not any(isinstance(key, str) and key.startswith(_SIGNATURE_PREFIXES) for key in state):
        return None
    not_tensors = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise ValueError(f"checkpoint {name!r} is not a SAM 2 state dict: non-tensor entries {examples(not_tensors)}")
    # only beside "model": in a bare state dict "decoder_state" would be an (unknown) weight key, refused later
    if state is not raw and DECODER_STATE in raw:
        warnings.warn(
            f"checkpoint {name!r} also holds a UNETR decoder ('{DECODER_STATE}'); it is not converted", stacklevel=3
        )
    return dict(state)


def load_sam2_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """The full state dict (video memory included) of an official SAM 2 / 2.1 checkpoint, read with
    `weights_only=True`: a file that needs Python objects is refused, never run."""
    path = Path(path)
    raw = read_checkpoint(path)
    state = sam2_state_of(raw, str(path))
    if state is None:
        if isinstance(raw, Mapping):
            inner = raw["model"] if isinstance(raw.get("model"), Mapping) else raw
            found = f"its keys look like {examples(inner) if inner else 'nothing (it is empty)'}"
        else:
            found = f"it holds a {type(raw).__name__}"
        raise ValueError(
            f"checkpoint {str(path)!r} is not a SAM 2 checkpoint: {found} (expected {{'model': state dict}} with "
            "keys 'image_encoder.trunk.*', 'sam_prompt_encoder.*', 'sam_mask_decoder.*')"
        )
    return state


def _is_memory_key(key: str) -> bool:
    return key in _MEMORY_KEYS or key.startswith(_MEMORY_PREFIXES)


def _split(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(image-model tensors, video-memory tensors); unknown keys stay with the image model, whose table refuses them."""
    image, memory = {}, {}
    for key, value in state_dict.items():
        # unknown keys go to the image side on purpose: its key table refuses them by name (the memory side is dropped)
        (memory if _is_memory_key(key) else image)[key] = value
    return image, memory


# ---------------------------------------------------------------------------------------------------------------
# State dicts both ways
# ---------------------------------------------------------------------------------------------------------------


def convert_sam2_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official SAM 2 keys -> `Sam2Model` keys. Video-memory keys are left out; keys that neither the image model
    nor the memory has are a one-line error. Tensors are shared, except the stacked point embeddings and the
    second copy of the positional basis."""
    image, _ = _split(state_dict)
    points, rest = {}, {}
    for key, value in image.items():
        match = _POINT_KEY.fullmatch(key)
        if match:
            points[int(match.group(1))] = value
        else:
            rest[key] = value
    converted = translate_all(
        rest, to_hf=True, unknown_hint="a SAM 2 does not have",
        remedy="adapter or extra-head weights? merge or drop them first", rules=_RULES,
    )
    if points:
        # row i of point_embed is label i (transformers indexes it by label), so a gap would shift every later label
        if sorted(points) != list(range(len(points))):
            raise ValueError(f"state_dict has gaps in the numbering of its point embeddings: {sorted(points)}")
        converted[_HF_POINT_KEY] = torch.cat([points[i] for i in range(len(points))])
    if _PE_KEY in converted:
        converted[_PE_ALIAS] = converted[_PE_KEY].clone()  # a buffer of its own (safetensors refuses shared ones)
    return converted


def to_sam2_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`Sam2Model` keys -> official SAM 2 keys of the image model (the exact inverse of `convert_sam2_state_dict`)."""
    state = dict(state_dict)
    alias = state.pop(_PE_ALIAS, None)
    if alias is not None:
        # setdefault: a state dict holding only the alias (partial export) still yields the one official basis
        basis = state.setdefault(_PE_KEY, alias)
        # meta tensors have no values to compare (_check_fits runs this on a meta-device model's state dict)
        if not (alias.is_meta or basis.is_meta or torch.equal(alias, basis)):
            raise ValueError(
                f"state_dict: {_PE_ALIAS!r} and {_PE_KEY!r} differ, but SAM 2 has one positional basis (a Sam2Model "
                "initialised at random draws the two apart; one converted from SAM 2 has them equal)"
            )
    points = state.pop(_HF_POINT_KEY, None)
    converted = translate_all(
        state, to_hf=False, unknown_hint="transformers' Sam2Model does not have",
        remedy="unmerged adapter, quantised or extra-head weights?", rules=_RULES,
    )
    if points is not None:
        for i in range(points.shape[0]):
            # clone: each row its own storage, as sam2's separate nn.Embedding weights (a view keeps the stacked one)
            converted[f"sam_prompt_encoder.point_embeddings.{i}.weight"] = points[i : i + 1].clone()
    return converted


# ---------------------------------------------------------------------------------------------------------------
# Shapes -> configuration
# ---------------------------------------------------------------------------------------------------------------


def _hiera_shape(state_dict: Mapping[str, Tensor]) -> tuple[int, list[int]]:
    """(width of the first stage, blocks per stage) of the Hiera trunk: a stage starts at a block that projects
    its input to a wider width (`blocks.N.proj`)."""
    key = f"{_TRUNK}.patch_embed.proj.weight"
    if key not in state_dict:
        raise ValueError(f"state_dict lacks {key!r}: not a complete SAM 2 checkpoint")
    depth = count_numbered(state_dict, r"image_encoder\.trunk\.blocks\.(\d+)\.")
    # the first block of every stage after the first has `proj` (sam2 hieradet.py: `if dim != dim_out`)
    starts = [i for i in range(depth) if f"{_TRUNK}.blocks.{i}.proj.weight" in state_dict]
    bounds = [0, *starts, depth]
    # patch_embed's conv weight is (embed_dim, 3, 7, 7): its first dimension is the first stage's width
    return state_dict[key].shape[0], [end - start for start, end in zip(bounds, bounds[1:])]


def detect_sam2_model_type(state_dict: Mapping[str, Tensor]) -> str:
    """The official size (`sam2_hiera_tiny`, `_small`, `_base_plus`, `_large`) whose Hiera has the checkpoint's
    width and blocks per stage, else `"custom"`."""
    width, stages = _hiera_shape(state_dict)
    for name, size in HIERA_SIZES.items():
        if size["hidden_size"] == width and list(size["blocks_per_stage"]) == stages:
            return name
    return "custom"


def _canonical(model_type: str) -> str:
    if model_type not in SAM2_MODEL_TYPES:
        raise ValueError(f"model_type must be one of {', '.join(SAM2_MODEL_TYPES)} or None, got {model_type!r}")
    # a sam2.1_ name shares its size's SAM 2.0 config (sam2.SAM2_SIZES), and detection returns the 2.0 name
    return model_type.replace("sam2.1_", "sam2_", 1)


def load_sam2_config(config: Sam2Config | str | os.PathLike) -> Sam2Config:
    """A copy of `config`, or the `Sam2Config` in a config.json (or a folder holding one, e.g. a converted model)."""
    if isinstance(config, Sam2Config):
        return copy.deepcopy(config)
    if not isinstance(config, (str, os.PathLike)):
        raise TypeError(f"config must be a Sam2Config or the path of a config.json, got {type(config).__name__}")
    path = Path(config)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"config {str(path)!r} is neither a config.json nor a folder holding one")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"config {str(file)!r} is not valid JSON ({first_line(error)})") from None
    found = data.get("model_type") if isinstance(data, dict) else None
    if found != Sam2Config.model_type:
        raise ValueError(
            f"config {str(file)!r} has model_type {found!r}, expected {Sam2Config.model_type!r} (a Sam2Model's)"
        )
    try:
        return Sam2Config.from_dict(data)
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(f"config {str(file)!r} is not a valid Sam2Config ({first_line(error)})") from None


def _resolve_config(
    image: Mapping[str, Tensor],
    name: str,
    model_type: str | None,
    config: Sam2Config | str | os.PathLike | None,
    decoder_num_heads: int | None,
) -> tuple[Sam2Config, str]:
    """The config for `image` and how errors name it: the given config, else the official size the shapes show
    (which `model_type`, when given, must be)."""
    if config is not None and model_type is not None:
        raise ValueError("pass model_type (an official size) or config (any other SAM 2), not both")
    if config is not None:
        config, what = load_sam2_config(config), "the given config"
    else:
        if model_type is not None and model_type not in SAM2_MODEL_TYPES:
            raise ValueError(
                f"model_type is {model_type!r} but checkpoint {name!r} is a SAM 2 checkpoint; pass one of "
                f"{', '.join(SAM2_MODEL_TYPES)} or None"
            )
        detected = detect_sam2_model_type(image)
        if model_type is not None and _canonical(model_type) != detected:
            raise ValueError(f"model_type is {model_type!r} but checkpoint {name!r} has the shapes of {detected!r}")
        if detected == "custom":
            width, stages = _hiera_shape(image)
            raise ValueError(
                f"checkpoint {name!r} is a SAM 2 of none of the official sizes (Hiera width {width}, blocks per stage "
                f"{stages}); pass its Sam2Config (config=, CLI --config): head counts, window sizes and the image size "
                "leave no trace in the shapes"
            )
        config, what = sam2_config(detected), detected
    if decoder_num_heads is not None:
        decoder = config.mask_decoder_config
        width = decoder.hidden_size // decoder.attention_downsample_rate
        if not isinstance(decoder_num_heads, int) or decoder_num_heads < 1 or width % decoder_num_heads:
            raise ValueError(
                f"decoder_num_heads must divide the decoder attention width {width}, got {decoder_num_heads!r}"
            )
        # on the copy load_sam2_config / sam2_config returned, never on the caller's config object
        decoder.num_attention_heads = decoder_num_heads
    return config, what


def _check_fits(image: Mapping[str, Tensor], config: Sam2Config, name: str, what: str) -> None:
    """One-line errors, in official key names, for tensors the model `config` describes lacks, has more or has
    in other shapes (built on the meta device: no memory, no initialisation)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in to_sam2_state_dict(Sam2Model(config).state_dict()).items()}
    missing = [k for k in expected if k not in image]
    if missing:
        raise ValueError(f"checkpoint {name!r} lacks {examples(missing)} of {what}: not a complete SAM 2 image model")
    extra = [k for k in image if k not in expected]
    if extra:
        raise ValueError(f"checkpoint {name!r} has {examples(extra)}, which {what} does not have")
    wrong = [k for k in expected if tuple(image[k].shape) != expected[k]]
    if wrong:
        more = f" (+{len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise ValueError(
            f"checkpoint {name!r}: {wrong[0]!r} has shape {tuple(image[wrong[0]].shape)} where {what} has "
            f"{expected[wrong[0]]}{more}"
        )


def sam2_model_from_state_dict(
    state_dict: Mapping[str, Tensor],
    model_type: str | None = None,
    *,
    config: Sam2Config | str | os.PathLike | None = None,
    decoder_num_heads: int | None = None,
    name: str = "state_dict",
) -> Sam2Model:
    """A `Sam2Model` (eval mode) holding the image-model weights of an official SAM 2 state dict (video-memory
    tensors are ignored), built on the meta device so no size costs a random initialisation.

    The configuration: `config` (a `Sam2Config` or config.json) when given, else the official size the shapes
    show (`model_type`, when given, must be that size). `decoder_num_heads` overrides the mask decoder's head
    count, the one decoder number the shapes do not fix (8 in every official size).
    """
    image, _ = _split(state_dict)
    converted = convert_sam2_state_dict(image)  # unknown keys fail here, before anything is built
    config, what = _resolve_config(image, name, model_type, config, decoder_num_heads)
    # in official names (`image`, not `converted`), so its messages name the keys the user's file has
    _check_fits(image, config, name, what)
    return build_with_weights(Sam2Model, config, converted)


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------


def write_sam2_folder(
    state_dict: Mapping[str, Tensor],
    name: str,
    out_dir: str | os.PathLike,
    model_type: str | None = None,
    *,
    config: Sam2Config | str | os.PathLike | None = None,
    decoder_num_heads: int | None = None,
    overwrite: bool = False,
) -> Sam2Model:
    """`sam2_model_from_state_dict` written to `out_dir` (model, and SAM 2's processor where torchvision is
    installed: `hf_sam_peft.modeling.base_models.sam2_processor`); warns that the video memory is not converted.
    `convert_checkpoint` calls this for a SAM 2 file; `name` is the file, for messages."""
    out_dir = Path(out_dir)
    check_folder_target(out_dir, overwrite)
    _, memory = _split(state_dict)
    model = sam2_model_from_state_dict(
        state_dict, model_type, config=config, decoder_num_heads=decoder_num_heads, name=name
    )
    if memory:
        parts = sorted({key.split(".")[0] for key in memory})
        warnings.warn(
            f"checkpoint {name!r}: its {len(memory)} video-memory tensors ({', '.join(parts)}) are not converted "
            f"(Sam2Model is the image model); exporting with memory_from={name!r} (CLI: --memory-from) puts them back",
            stacklevel=3,
        )
    save_model_folder(model, sam2_processor(model.config), out_dir)  # emptiness was checked above
    return model


def convert_sam2_checkpoint(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    model_type: str | None = None,
    *,
    config: Sam2Config | str | os.PathLike | None = None,
    decoder_num_heads: int | None = None,
    overwrite: bool = False,
) -> Sam2Model:
    """Convert an official SAM 2 / 2.1 checkpoint into a `Sam2Model` folder (safetensors + config, and the
    processor where torchvision is installed), written beside `out_dir` and renamed into place.

    `model_type`: an official size (`sam2_hiera_tiny` ... `_large`, or its `sam2.1_` name) that the shapes must
    show; `config`: the `Sam2Config` (or config.json) of a SAM 2 of other shapes. The video-memory tensors are
    dropped with a warning (see the module doc).
    """
    if model_type is not None:
        _canonical(model_type)
    if config is not None:
        # checked again by write_sam2_folder (as the folder is); here a bad config fails before the checkpoint is read
        config = load_sam2_config(config)  # before reading a large file
    out_dir = Path(out_dir)
    check_folder_target(out_dir, overwrite)
    state = load_sam2_checkpoint(path)
    return write_sam2_folder(
        state, str(path), out_dir, model_type, config=config, decoder_num_heads=decoder_num_heads, overwrite=overwrite
    )


def _memory_from(path: str | os.PathLike, image: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The video-memory tensors of the checkpoint at `path`, checked to come from a SAM 2 of `image`'s shapes."""
    name = str(path)
    donor_image, memory = _split(load_sam2_checkpoint(path))
    if not memory:
        raise ValueError(
            f"memory_from {name!r} holds no video-memory tensors (an image-only export?); pass the original sam2 "
            "checkpoint the model was converted from"
        )
    shapes = {k: tuple(v.shape) for k, v in image.items()}
    donor = {k: tuple(v.shape) for k, v in donor_image.items()}
    if shapes != donor:
        # keys present on one side only first; with the same keys, those whose shapes differ
        differing = sorted(set(shapes) ^ set(donor)) or [k for k in shapes if shapes[k] != donor[k]]
        raise ValueError(
            f"memory_from {name!r} is a SAM 2 of other shapes than the model ({examples(differing)} differ), so its "
            "memory does not fit; pass the checkpoint the model was converted from"
        )
    return memory


def export_sam2_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    memory_from: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a `Sam2Model` (or a peft model around one: adapters are merged into a copy) as an official SAM 2
    checkpoint `{"model": state_dict}`, through a temporary file renamed into place.

    `memory_from`: an official checkpoint of the same size (normally the one the model was converted from)
    whose video-memory tensors are carried over, so that sam2's `build_sam2` loads the file strictly and its
    video predictor runs with the fine-tuned image model. Without it the file holds the image model only (see
    the module doc). A UNETR decoder the model carries goes beside the weights as `decoder_state`, as
    micro-sam's layout does for SAM (sam2 reads only `model`).
    """
    path = Path(path)
    check_file_target(path, overwrite)
    _, state, decoder = weights_and_decoder(model, Sam2Model)
    state = to_sam2_state_dict(state)
    if memory_from is not None:
        # the image side comes from the model; only the donor's memory tensors are added (memory keys never collide)
        state.update(_memory_from(memory_from, state))
    payload = {"model": state} if decoder is None else {"model": state, DECODER_STATE: decoder}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))
