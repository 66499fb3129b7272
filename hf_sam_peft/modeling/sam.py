"""Building SAM configurations by name: the three paper sizes and a tiny one for tests."""

from __future__ import annotations

from transformers import (
    SamConfig,
    SamMaskDecoderConfig,
    SamPromptEncoderConfig,
    SamVisionConfig,
)

# ViT sizes of the original SAM (segment_anything's build_sam.py).
VIT_SIZES: dict[str, dict] = {
    "vit_b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, global_attn_indexes=[2, 5, 8, 11]),
    "vit_l": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, global_attn_indexes=[5, 11, 17, 23]),
    "vit_h": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, global_attn_indexes=[7, 15, 23, 31]),
}


def sam_config(model_type: str = "vit_b") -> SamConfig:
    """The `SamConfig` of one of the original SAM sizes (`vit_b`, `vit_l`, `vit_h`)."""
    if model_type not in VIT_SIZES:
        raise ValueError(f"model_type must be one of {sorted(VIT_SIZES)}, got {model_type!r}")
    # segment_anything's mask decoder uses nn.LayerNorm's default eps (transformers' default is 1e-6)
    return SamConfig(
        vision_config=SamVisionConfig(**VIT_SIZES[model_type]),
        mask_decoder_config=SamMaskDecoderConfig(layer_norm_eps=1e-5),
    )


def tiny_sam_config(
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    image_size: int = 256,
    output_channels: int = 32,
) -> SamConfig:
    """A small but complete SAM for tests and quick experiments (random weights that do not output constants)."""
    vision = SamVisionConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        mlp_dim=2 * hidden_size,
        image_size=image_size,
        # the last block global, the others windowed: both attention paths (and SAM-HQ's fusion input) exist
        global_attn_indexes=[num_hidden_layers - 1],
        output_channels=output_channels,
        # divides the 16 x 16 token grid of 256² at patch 16: windowed blocks run unpadded
        window_size=4,
        # sin and cos of num_pos_feats features each make the output_channels-wide positional encoding
        num_pos_feats=output_channels // 2,
        initializer_range=0.02,  # the default 1e-10 makes random tiny models output constants
    )
    prompt = SamPromptEncoderConfig(hidden_size=output_channels, image_size=image_size, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(
        hidden_size=output_channels, mlp_dim=2 * output_channels, num_attention_heads=2, iou_head_hidden_dim=output_channels
    )
    return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
