"""SAM 3 tracker configurations: a tiny one for tests (the released model is `facebook/sam3`, gated on the Hub).

transformers' `Sam3TrackerModel` is SAM 3's promptable (point / box / mask) segmentation of one image: SAM 2's
prompt encoder and mask decoder (high-resolution skips, object score) behind SAM 3's image encoder, a plain ViT
(patch 14, rotary positions, windowed blocks with a few global ones; q, k, v and the output are four Linears)
with a simple FPN neck (transposed convolutions to strides 3.5 and 7, the ViT's stride 14, and a stride-28
level that only SAM 3's detector reads). `Sam3TrackerModel.from_pretrained("facebook/sam3")` takes the tracker
out of the full SAM 3 checkpoint (transformers' conversion mapping renames the detector's ViT and the tracker neck).
"""

from __future__ import annotations

from transformers import (
    Sam3TrackerConfig,
    Sam3TrackerMaskDecoderConfig,
    Sam3TrackerPromptEncoderConfig,
    Sam3ViTConfig,
    Sam3VisionConfig,
)

__all__ = ["tiny_sam3_tracker_config"]


def tiny_sam3_tracker_config(hidden_size: int = 64, num_hidden_layers: int = 2, image_size: int = 224,
                             fpn_hidden_size: int = 32) -> Sam3TrackerConfig:
    """A small but complete SAM 3 tracker: 2 ViT blocks (the last global), 224² input (16² patches of 14), a
    three-level neck (the tracker's levels, 64², 32², 16²)."""
    patch = 14
    grid = image_size // patch
    backbone = Sam3ViTConfig(
        hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_hidden_layers,
        # half the grid: the windowed block runs 2 x 2 whole windows (16 / 8) beside the global one
        num_attention_heads=2, image_size=image_size, patch_size=patch, window_size=grid // 2,
        global_attn_indexes=[num_hidden_layers - 1], pretrain_image_size=image_size,
    )
    vision = Sam3VisionConfig(
        # 4x, 2x and 1x the ViT grid, highest resolution first: the tracker's three levels (strides 3.5, 7 and 14)
        backbone_config=backbone, fpn_hidden_size=fpn_hidden_size, scale_factors=[4.0, 2.0, 1.0],
        backbone_feature_sizes=[[grid * 4] * 2, [grid * 2] * 2, [grid] * 2],
    )
    prompt = Sam3TrackerPromptEncoderConfig(
        hidden_size=fpn_hidden_size, image_size=image_size, patch_size=patch, mask_input_channels=4
    )
    decoder = Sam3TrackerMaskDecoderConfig(
        hidden_size=fpn_hidden_size, mlp_dim=2 * fpn_hidden_size, num_attention_heads=2,
        iou_head_hidden_dim=fpn_hidden_size,
    )
    return Sam3TrackerConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
