"""SAM 2 configurations by name: the four SAM 2 / SAM 2.1 Hiera sizes and a tiny one for tests.

The image model only (transformers' `Sam2Model`: Hiera image encoder + FPN neck, prompt encoder, mask decoder
with high-resolution skips and an object score); the video memory modules are out of scope. The sizes follow
the official configs (facebookresearch/sam2 `sam2/configs/sam2.1/sam2.1_hiera_{t,s,b+,l}.yaml`; SAM 2.0 has
the same image-model shapes): Hiera doubles width and heads at every stage.
"""

from __future__ import annotations

from transformers import (
    Sam2Config,
    Sam2HieraDetConfig,
    Sam2MaskDecoderConfig,
    Sam2PromptEncoderConfig,
    Sam2VisionConfig,
)

# name -> (embed dim of stage 1, heads of stage 1, blocks per stage, global-attention blocks,
#          window positional embedding background size, window size per stage)
HIERA_SIZES: dict[str, dict] = {
    "sam2_hiera_tiny": dict(
        hidden_size=96, num_attention_heads=1, blocks_per_stage=[1, 2, 7, 2], global_attention_blocks=[5, 7, 9],
        window_positional_embedding_background_size=[7, 7], window_size_per_stage=[8, 4, 14, 7],
    ),
    "sam2_hiera_small": dict(
        hidden_size=96, num_attention_heads=1, blocks_per_stage=[1, 2, 11, 2], global_attention_blocks=[7, 10, 13],
        window_positional_embedding_background_size=[7, 7], window_size_per_stage=[8, 4, 14, 7],
    ),
    "sam2_hiera_base_plus": dict(
        hidden_size=112, num_attention_heads=2, blocks_per_stage=[2, 3, 16, 3], global_attention_blocks=[12, 16, 20],
        window_positional_embedding_background_size=[14, 14], window_size_per_stage=[8, 4, 14, 7],
    ),
    "sam2_hiera_large": dict(
        hidden_size=144, num_attention_heads=2, blocks_per_stage=[2, 6, 36, 4], global_attention_blocks=[23, 33, 43],
        window_positional_embedding_background_size=[7, 7], window_size_per_stage=[8, 4, 16, 8],
    ),
}
# SAM 2.1 changed training and the video memory, not the image model's shapes: the same configs serve both.
SAM2_SIZES: tuple[str, ...] = tuple(HIERA_SIZES)
# `model_type` names the converter and the CLI accept: the sizes, and the same sizes by their SAM 2.1 names
SAM2_MODEL_TYPES: tuple[str, ...] = SAM2_SIZES + tuple(name.replace("sam2_", "sam2.1_", 1) for name in SAM2_SIZES)


def _hiera(hidden_size: int, num_attention_heads: int, **kwargs) -> Sam2HieraDetConfig:
    """A Hiera backbone config whose width and heads double at every stage (the official `dim_mul`/`head_mul` 2)."""
    stages = len(kwargs["blocks_per_stage"])
    return Sam2HieraDetConfig(
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        embed_dim_per_stage=[hidden_size * 2**i for i in range(stages)],
        num_attention_heads_per_stage=[num_attention_heads * 2**i for i in range(stages)],
        **kwargs,
    )


def sam2_config(model_type: str = "sam2_hiera_tiny") -> Sam2Config:
    """The `Sam2Config` of one SAM 2 / 2.1 size (`sam2_hiera_tiny`, `_small`, `_base_plus`, `_large`)."""
    if model_type not in HIERA_SIZES:
        raise ValueError(f"model_type must be one of {', '.join(SAM2_SIZES)}, got {model_type!r}")
    backbone = _hiera(**HIERA_SIZES[model_type])
    vision = Sam2VisionConfig(
        # the neck reads the stage widths lowest resolution (widest) first
        backbone_config=backbone, backbone_channel_list=list(reversed(backbone.embed_dim_per_stage))
    )
    return Sam2Config(vision_config=vision)


def tiny_heads(
    fpn_hidden_size: int, image_size: int, prompt_cls: type = Sam2PromptEncoderConfig,
    decoder_cls: type = Sam2MaskDecoderConfig,
) -> tuple:
    """The prompt encoder and mask decoder configs of a tiny SAM 2-shaped model (SAM 2, EdgeTAM: ``prompt_cls`` /
    ``decoder_cls``): as wide as the FPN, whose output they read; two heads, MLP twice the width."""
    prompt = prompt_cls(hidden_size=fpn_hidden_size, image_size=image_size, mask_input_channels=4)
    decoder = decoder_cls(
        hidden_size=fpn_hidden_size, mlp_dim=2 * fpn_hidden_size, num_attention_heads=2,
        iou_head_hidden_dim=fpn_hidden_size,
    )
    return prompt, decoder


def tiny_sam2_config(hidden_size: int = 16, image_size: int = 256, fpn_hidden_size: int = 32) -> Sam2Config:
    """A small but complete SAM 2 (four Hiera stages, one global-attention block, 256² input) for tests."""
    backbone = _hiera(
        hidden_size=hidden_size,
        num_attention_heads=1,
        blocks_per_stage=[1, 1, 2, 1],
        global_attention_blocks=[3],
        window_positional_embedding_background_size=[4, 4],
        window_size_per_stage=[8, 4, 4, 2],
        image_size=[image_size, image_size],
        initializer_range=0.02,
    )
    stride = 4  # the patch embedding's; every level below halves
    vision = Sam2VisionConfig(
        backbone_config=backbone,
        backbone_channel_list=list(reversed(backbone.embed_dim_per_stage)),
        # the three highest-resolution levels (strides 4, 8, 16): the decoder's image embedding (16) and its skips
        backbone_feature_sizes=[[image_size // (stride * 2**i)] * 2 for i in range(3)],
        fpn_hidden_size=fpn_hidden_size,
    )
    prompt, decoder = tiny_heads(fpn_hidden_size, image_size)
    return Sam2Config(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
