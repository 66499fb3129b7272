"""EdgeTAM (transformers' `EdgeTamModel`): SAM 2's prompt encoder and mask decoder behind a RepViT image encoder.

The image encoder is timm's RepViT (`vision_config.backbone_config` is a `timm_wrapper` config, built with
`AutoModel.from_config`), so an `EdgeTamModel` needs timm, and timm needs torchvision. This package installs
neither: PyPI's torchvision wheels are built against PyPI's torch and do not load against the CPU torch build the
project pins ("operator torchvision::nms does not exist"). :func:`require_timm` turns their absence into one line
naming what to install, before transformers fails deep inside `from_pretrained`. The public weights are
`yonigozlan/EdgeTAM-hf` (transformers' format of facebook/EdgeTAM).

RepViT is convolutional (BatchNorm'd convolutions): only Full FT and Freeze Encoder fit
(`hf_sam_peft.tuners.native.check_fits`), and a frozen encoder's BatchNorms run on their running statistics in
training too (`hf_sam_peft.sam_forward.forward.frozen_batch_norms_in_eval`).
"""

from __future__ import annotations

import importlib

from transformers import (
    EdgeTamConfig,
    EdgeTamMaskDecoderConfig,
    EdgeTamPromptEncoderConfig,
    EdgeTamVisionConfig,
    TimmWrapperConfig,
)

from hf_sam_peft.modeling.sam2 import tiny_heads

__all__ = ["TIMM_NEEDED", "require_timm", "tiny_edgetam_config"]

TIMM_NEEDED = (
    "EdgeTAM's RepViT image encoder is built by timm: `pip install timm` with a torchvision built for your torch"
)


def require_timm() -> None:
    """An ImportError naming what to install where timm (or the torchvision it imports) cannot be imported."""
    try:
        importlib.import_module("timm")
    except (ImportError, RuntimeError, OSError) as error:  # RuntimeError / OSError: a torchvision for another torch
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ImportError(f"{TIMM_NEEDED} ({first})") from None


def tiny_edgetam_config(image_size: int = 256, fpn_hidden_size: int = 32,
                        backbone_channel_list: tuple[int, ...] = (64, 32, 16, 8)) -> EdgeTamConfig:
    """A small EdgeTAM config around a backbone of four levels at strides 4, 8, 16, 32 (`backbone_channel_list`
    lists their widths lowest resolution first, as the neck reads them). The backbone itself is timm's
    `repvit_m1` (whose widths are 384, 192, 96, 48): building this model needs timm, or a backbone of these
    widths put in its place."""
    # named explicitly: transformers' default backbone_config spells the key "archirecture" (5.25), so a default
    # EdgeTamVisionConfig names timm's resnet50
    backbone = TimmWrapperConfig(
        architecture="repvit_m1", model_args={"in_chans": 3, "features_only": True, "out_indices": [0, 1, 2, 3]}
    )
    vision = EdgeTamVisionConfig(
        backbone_config=backbone,
        backbone_channel_list=list(backbone_channel_list),
        backbone_feature_sizes=[[image_size // (4 * 2**i)] * 2 for i in range(3)],
        fpn_hidden_size=fpn_hidden_size,
    )
    prompt, decoder = tiny_heads(fpn_hidden_size, image_size, EdgeTamPromptEncoderConfig, EdgeTamMaskDecoderConfig)
    return EdgeTamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
