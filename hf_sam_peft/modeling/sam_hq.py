"""SAM-HQ configurations: a tiny one for tests (the released sizes are on the Hub, `syscv-community/sam-hq-vit-*`).

transformers' `SamHQModel` is SAM's ViT, prompt encoder and mask decoder plus the HQ output token, its MLP and the
fusion of the image embedding with the output of the encoder's first global-attention block (Ke et al. 2023,
SysCV/sam-hq). The fusion reads that block's width: the mask decoder's `vit_dim` is the ViT's `hidden_size`.
"""

from __future__ import annotations

from transformers import SamHQConfig, SamHQMaskDecoderConfig, SamHQPromptEncoderConfig, SamHQVisionConfig

from hf_sam_peft.modeling.sam import tiny_sam_config

__all__ = ["tiny_sam_hq_config"]


def tiny_sam_hq_config(hidden_size: int = 64, num_hidden_layers: int = 2, image_size: int = 256,
                       output_channels: int = 32) -> SamHQConfig:
    """A small but complete SAM-HQ: `tiny_sam_config`'s shapes (its last block global, so the HQ fusion has its
    input), with the mask decoder's `vit_dim` set to the ViT's width."""
    sam = tiny_sam_config(hidden_size, num_hidden_layers, image_size, output_channels)
    # to_diff_dict: only what tiny_sam_config set; the SAM-HQ classes' own defaults fill in the rest
    vision = SamHQVisionConfig(**sam.vision_config.to_diff_dict())
    prompt = SamHQPromptEncoderConfig(**sam.prompt_encoder_config.to_diff_dict())
    # vit_dim: the HQ fusion reads the first global block's output, hidden_size wide (module docstring)
    decoder = SamHQMaskDecoderConfig(**sam.mask_decoder_config.to_diff_dict(), vit_dim=hidden_size)
    return SamHQConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
