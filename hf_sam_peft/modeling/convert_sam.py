"""The segment_anything format (original SAM, micro-sam, MedicoSAM checkpoints) <-> transformers' `SamModel`.

Checkpoints are read with `torch.load(weights_only=True)` only, so a file can never run code on load. Key names
are translated by one two-way table (`_RULES`), so conversion and export are exact inverses of each other.
`hf_sam_peft.modeling.convert.convert_checkpoint` routes a SAM file here (`write_sam_folder`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import SamConfig, SamMaskDecoderConfig, SamModel, SamPromptEncoderConfig, SamVisionConfig

from hf_sam_peft.atomic import atomic_write
from hf_sam_peft.modeling.convert_common import (
    DECODER_STATE,
    LITE_MEDSAM_SIGNATURE,
    build_with_weights,
    check_file_target,
    check_folder_target,
    compile_key_rules,
    count_numbered,
    examples,
    read_checkpoint,
    save_model_folder,
    translate_all,
    weights_and_decoder,
)
from hf_sam_peft.modeling.sam import VIT_SIZES
from hf_sam_peft.modeling.tiny_vit import TinyViTVisionEncoder

__all__ = [
    "PIXEL_MEAN",
    "PIXEL_STD",
    "convert_sam_state_dict",
    "detect_model_type",
    "export_to_segment_anything",
    "load_sam_checkpoint",
    "sam_config_from_state_dict",
    "sam_model_from_state_dict",
    "sam_processor",
    "sam_state_of",
    "to_segment_anything_state_dict",
    "write_sam_folder",
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
# (micro_sam/util.py strips "sam." from a torch_em "model_state" the same way when it loads or exports one)
_WRAPPER_PREFIXES = ("module.sam.", "module.", "sam.")
# Keys that every original SAM has; their absence means another architecture.
_SIGNATURE_KEYS = (
    "image_encoder.patch_embed.proj.weight",
    "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
    "mask_decoder.iou_token.weight",
)

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
    # nn.Sequential indices: 2 and 5 are parameter-free activations (likewise output_upscaling.2 and .4 below)
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
        # segment_anything's MLP numbers its linears layers.0..2; transformers' SamFeedForward names them
        # proj_in, layers.0 (the hidden ones), proj_out
        for sa_layer, hf_layer in (("0", "proj_in"), ("1", "layers.0"), ("2", "proj_out"))
    ),
)


_RULES = compile_key_rules(_RULE_TEMPLATES, _PLACEHOLDERS)


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
    return sam_state_of(read_checkpoint(path), str(path))


def sam_state_of(raw: object, name: str) -> dict[str, Tensor]:
    """The segment_anything state dict of a loaded checkpoint (`name`: the file, for messages): micro-sam/torch_em
    wrappers stripped, checked to be an original SAM's."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"checkpoint {name!r} holds a {type(raw).__name__}, expected a state dict (a mapping)")
    state = raw
    # the first wrapper found wins; a decoder_state is looked for only beside one (micro-sam's combined layout)
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
        # all keys or none: a real SAM key never starts with these, so a prefix only some keys carry is left for the
        # key table to refuse; no break, so "module." then "sam." also unwraps a DDP-wrapped torch_em model
        if state and all(isinstance(k, str) and k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    not_tensors = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise ValueError(f"checkpoint {name!r} is not a state dict: non-tensor entries {examples(not_tensors)}")
    missing = [k for k in _SIGNATURE_KEYS if k not in state]
    # a LiteMedSAM file shares the prompt encoder and decoder keys: name the format rather than a missing key
    if missing and LITE_MEDSAM_SIGNATURE in state:
        raise ValueError(
            f"checkpoint {name!r} is a LiteMedSAM (TinyViT encoder) checkpoint, not an original SAM (ViT) one; "
            "convert_checkpoint and hf_sam_peft.modeling.lite_medsam.convert_lite_medsam read it"
        )
    if missing:
        raise ValueError(
            f"checkpoint {name!r} is not an original SAM (ViT) checkpoint: it lacks {missing[0]!r}; "
            f"its keys look like {examples(state) if state else 'nothing (it is empty)'}"
        )
    return state


# ---------------------------------------------------------------------------------------------------------------
# Shapes -> configuration
# ---------------------------------------------------------------------------------------------------------------


def _shape(state_dict: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise ValueError(f"state_dict lacks {key!r}: not a complete original SAM checkpoint")
    return tuple(state_dict[key].shape)


def _vision_config(state_dict: Mapping[str, Tensor]) -> SamVisionConfig:
    """The image encoder's configuration: heads from the relative position tables (their width is the head
    dimension), global blocks from the table lengths (2 * grid - 1), image size from the position embedding."""
    # the patch embedding conv weight: (hidden, image channels, patch, patch)
    hidden, channels, patch, _ = _shape(state_dict, "image_encoder.patch_embed.proj.weight")
    depth = count_numbered(state_dict, r"image_encoder\.blocks\.(\d+)\.")
    if depth == 0:
        raise ValueError("state_dict has no image_encoder.blocks: not an original SAM (ViT) checkpoint")
    # pos_embed is (1, grid, grid, hidden): the token grid of the full image
    grid = _shape(state_dict, "image_encoder.pos_embed")[1]
    rel_pos = [_shape(state_dict, f"image_encoder.blocks.{i}.attn.rel_pos_h") for i in range(depth)]
    # rel_pos_h is (2 * size - 1, head_dim) with size the grid (global blocks) or the window (windowed ones)
    head_dim = rel_pos[0][1]
    if hidden % head_dim:
        raise ValueError(f"state_dict: relative position width {head_dim} does not divide the hidden size {hidden}")
    # a windowed block whose window equals the grid reads as global: harmless, one unpadded window is global
    # attention over the same tokens
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
        # no windowed block at all: window 0 (transformers' value for "every block global")
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
        # mask_downscaling.3 is the second conv: its output width is segment_anything's mask_in_chans
        mask_input_channels=_shape(state_dict, "prompt_encoder.mask_downscaling.3.weight")[0],
        num_point_embeddings=count_numbered(state_dict, r"prompt_encoder\.point_embeddings\.(\d+)\."),
    )
    attention_dim = _shape(state_dict, "mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight")[0]
    if output_channels % attention_dim or attention_dim % decoder_num_heads:
        raise ValueError(
            f"decoder_num_heads must divide the decoder attention width {attention_dim}, got {decoder_num_heads}"
        )
    decoder = SamMaskDecoderConfig(
        hidden_size=output_channels,
        mlp_dim=_shape(state_dict, "mask_decoder.transformer.layers.0.mlp.lin1.weight")[0],
        num_hidden_layers=count_numbered(state_dict, r"mask_decoder\.transformer\.layers\.(\d+)\."),
        num_attention_heads=decoder_num_heads,
        attention_downsample_rate=output_channels // attention_dim,
        # one mask token for the single-mask output plus one per multimask output
        num_multimask_outputs=_shape(state_dict, "mask_decoder.mask_tokens.weight")[0] - 1,
        iou_head_depth=count_numbered(state_dict, r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\."),
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
    # a named size also needs SAM's 1024² input and 256-wide embedding: a ViT-B trunk at another resolution is custom
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
    # popped before translation (the table does not know them); only a non-default value is worth a warning
    for key, default in zip(_PIXEL_KEYS, (PIXEL_MEAN, PIXEL_STD)):
        value = state.pop(key, None)
        if value is not None and not torch.allclose(value.flatten().float(), torch.tensor(default)):
            warnings.warn(
                f"checkpoint's {key} {value.flatten().tolist()} differs from SAM's {list(default)}; transformers "
                "normalises in the image processor, so set image_mean/image_std there",
                stacklevel=2,
            )
    converted = translate_all(
        state, to_hf=True, unknown_hint="an original SAM does not have",
        remedy="adapter or extra-head weights? merge or drop them first", rules=_RULES,
    )
    if _PE_KEY in converted:
        # the same tensor: SamModel ties the alias to the basis (_tied_weights_keys), unlike Sam2Model's two buffers
        converted[_PE_ALIAS] = converted[_PE_KEY]
    return converted


def to_segment_anything_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """transformers `SamModel` keys -> segment_anything keys.

    pixel_mean/pixel_std are left out: segment_anything registers them as non-persistent buffers, and its
    strict `load_state_dict` rejects a checkpoint that carries them.
    """
    state = dict(state_dict)
    alias = state.pop(_PE_ALIAS, None)
    # tied in SamModel, so they differ only in a state dict edited by hand; segment_anything has room for one
    if alias is not None and _PE_KEY in state and not torch.equal(alias, state[_PE_KEY]):
        raise ValueError(f"state_dict: {_PE_ALIAS!r} and {_PE_KEY!r} differ; SAM has one positional basis")
    converted = translate_all(
        state, to_hf=False, unknown_hint="transformers' SamModel does not have",
        remedy="unmerged adapter, quantised or extra-head weights?", rules=_RULES,
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


def sam_processor(config: SamConfig):
    """SAM's processor for this image size (PIL backend: needs no torchvision)."""
    # lazy: the processor classes load transformers' image-processing stack: not at `import hf_sam_peft`
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


def write_sam_folder(
    state_dict: Mapping[str, Tensor],
    out_dir: str | os.PathLike,
    *,
    decoder_num_heads: int = 8,
    overwrite: bool = False,
) -> SamModel:
    """`sam_model_from_state_dict` written to `out_dir` with SAM's processor for its image size (safetensors +
    config + processor config), beside `out_dir` first and renamed into place."""
    out_dir = Path(out_dir)
    # before the model is built: a refused target fails without the conversion's cost
    check_folder_target(out_dir, overwrite)
    model = sam_model_from_state_dict(state_dict, decoder_num_heads=decoder_num_heads)
    save_model_folder(model, sam_processor(model.config), out_dir)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------


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
    check_file_target(path, overwrite)
    sam, state, decoder = weights_and_decoder(model, SamModel)
    if isinstance(sam.vision_encoder, TinyViTVisionEncoder):
        raise ValueError(
            "model is a LiteMedSAM (TinyViT encoder), which a segment_anything checkpoint cannot hold; "
            "export_to_lite_medsam writes LiteMedSAM's own layout"
        )
    state = to_segment_anything_state_dict(state)
    # plain state dict without a decoder: what segment_anything's build_sam loads; with one, micro-sam's layout
    payload = state if decoder is None else {"model_state": state, DECODER_STATE: decoder}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))
