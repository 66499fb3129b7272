"""TinyViT image encoder (LiteMedSAM / MobileSAM style) that plugs into transformers' `SamModel` as its
`vision_encoder`.

Written from the TinyViT architecture (Wu et al. 2022, as adapted by MobileSAM and LiteMedSAM); no timm.
Submodule names follow the original `tiny_vit_sam.py`, so an original `image_encoder.*` state dict loads
under `vision_encoder.*` with the same suffixes. Two deliberate differences from the original:

- `attn.qkv` rows are stored in SAM ViT's `[q | k | v]` order (all heads of q, then k, then v). The original
  interleaves them per head (`[q_h, k_h, v_h]` for each head h). The same order as `SamVisionAttention`
  lets tuners that slice the fused qkv (q/v LoRA, FacT, attention tuning) treat both encoders alike;
  `hf_sam_peft.modeling.lite_medsam.convert_lite_medsam` permutes the rows when loading a checkpoint.
- The attention bias is gathered from its table on every forward. The original caches it in a buffer on
  `.eval()`, so a model trained and then used without calling `.eval()` again runs with a stale bias.

`LiteSamVisionConfig.freeze_batch_norm` (default True) keeps the BatchNorm layers in eval mode under
`.train()`: a frozen-base PEFT run then leaves the base model's running statistics untouched (they are not
part of an adapter), and single-image batches do not normalise with batch statistics.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.sam.modeling_sam import SamLayerNorm, SamVisionEncoderOutput

__all__ = ["LiteSamVisionConfig", "TinyViTVisionEncoder"]


@strict
class LiteSamVisionConfig(PreTrainedConfig):
    """Configuration of the TinyViT image encoder; defaults are LiteMedSAM's (TinyViT-5M at 256², 64² output).

    Stage 0 is convolutional (MBConv blocks), stages 1.. are windowed attention blocks. Each stage but the last
    ends in a patch merging with stride `downsample_strides[i]`. `scale` and `num_pos_feats` size SAM's shared
    random Fourier positional basis (`SamModel.shared_image_embedding`), which transformers reads from the
    vision config; `scale=1.0` is the original SAM's.
    """

    base_config_key = "vision_config"
    model_type = "lite_sam_vision_model"

    image_size: int = 256
    num_channels: int = 3
    embed_dims: list[int] | tuple[int, ...] = (64, 128, 160, 320)
    depths: list[int] | tuple[int, ...] = (2, 2, 6, 2)
    num_heads: list[int] | tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: list[int] | tuple[int, ...] = (7, 7, 14, 7)
    downsample_strides: list[int] | tuple[int, ...] = (2, 2, 1)
    patch_embed_kernel_size: int = 1
    patch_embed_stride: int = 1
    mlp_ratio: float | int = 4.0
    mbconv_expand_ratio: float | int = 4.0
    local_conv_size: int = 3
    output_channels: int = 256
    num_pos_feats: int = 128
    scale: float | int = 1.0
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    neck_layer_norm_eps: float = 1e-6
    hidden_dropout: float | int = 0.0
    drop_path_rate: float | int = 0.0
    initializer_range: float = 0.02
    freeze_batch_norm: bool = True

    def __post_init__(self, **kwargs):
        stages = len(self.embed_dims)
        for name in ("depths", "num_heads", "window_sizes"):
            if len(getattr(self, name)) != stages:
                raise ValueError(f"{name} must have one entry per stage ({stages}), got {list(getattr(self, name))}")
        if len(self.downsample_strides) != stages - 1:
            raise ValueError(
                f"downsample_strides must have {stages - 1} entries (one per stage but the last), "
                f"got {list(self.downsample_strides)}"
            )
        for dim, heads in zip(self.embed_dims[1:], self.num_heads[1:]):
            if dim % heads:
                raise ValueError(f"num_heads must divide embed_dims per stage, got {heads} heads for width {dim}")
        # SAM's Fourier positional encoding concatenates sin and cos of num_pos_feats features each: the decoder adds it
        # to the image embedding, so it must be output_channels wide
        if 2 * self.num_pos_feats != self.output_channels:
            raise ValueError(
                f"num_pos_feats must be output_channels // 2 = {self.output_channels // 2}, got {self.num_pos_feats}"
            )
        super().__post_init__(**kwargs)

    def stage_resolutions(self) -> list[int]:
        """Side length of the token grid in each stage; the last one is the image embedding's."""
        side = self.image_size
        for _ in range(2):  # the patch embedding's two convolutions
            side = _conv_output_size(side, self.patch_embed_kernel_size, self.patch_embed_stride)
        sides = [side]
        for stride in self.downsample_strides:
            # 3: the size of PatchMerging's strided depthwise convolution (conv2)
            sides.append(_conv_output_size(sides[-1], 3, stride))
        return sides

    @property
    def embedding_size(self) -> int:
        """Side length of the output embedding (64 for LiteMedSAM)."""
        return self.stage_resolutions()[-1]


def _conv_output_size(size: int, kernel: int, stride: int) -> int:
    # padding kernel // 2, as Conv2dBN pads
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


# ---------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------


class Conv2dBN(nn.Sequential):
    """Convolution without bias followed by BatchNorm (keys `c.*`, `bn.*` as in the original)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, groups: int = 1):
        super().__init__()
        self.add_module(
            # no bias: the BatchNorm's shift that follows would absorb it (and the original has none)
            "c", nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        )
        self.add_module("bn", nn.BatchNorm2d(out_channels))


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample during training."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        # one draw per sample, broadcast over the rest; dividing by `keep` keeps the expectation (no rescale in eval)
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def _drop_path(rate: float) -> nn.Module:
    return DropPath(rate) if rate > 0 else nn.Identity()


class PatchEmbed(nn.Module):
    """Two Conv-BN layers (stride 1, 1x1 in LiteMedSAM; 3x3 stride 2 in MobileSAM) from pixels to stage 0."""

    def __init__(self, config: LiteSamVisionConfig):
        super().__init__()
        dim, kernel, stride = config.embed_dims[0], config.patch_embed_kernel_size, config.patch_embed_stride
        self.seq = nn.Sequential(
            Conv2dBN(config.num_channels, dim // 2, kernel, stride),
            ACT2FN[config.hidden_act],
            Conv2dBN(dim // 2, dim, kernel, stride),
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.seq(pixel_values)


class MBConv(GradientCheckpointingLayer):
    """Inverted residual block of stage 0: 1x1 expand, 3x3 depthwise, 1x1 project, residual, activation."""

    def __init__(self, config: LiteSamVisionConfig, dim: int, drop_path: float):
        super().__init__()
        hidden = int(dim * config.mbconv_expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden)
        self.act1 = ACT2FN[config.hidden_act]
        self.conv2 = Conv2dBN(hidden, hidden, 3, groups=hidden)
        self.act2 = ACT2FN[config.hidden_act]
        self.conv3 = Conv2dBN(hidden, dim)
        self.conv3.bn.zero_init = True  # the block starts as the identity (TinyViT's bn_weight_init=0)
        self.act3 = ACT2FN[config.hidden_act]
        self.drop_path = _drop_path(drop_path)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.conv1(hidden_states))
        x = self.act2(self.conv2(x))
        x = self.drop_path(self.conv3(x))
        return self.act3(x + hidden_states)


class PatchMerging(nn.Module):
    """Tokens (B, H*W, C) or maps (B, C, H, W) -> tokens of the next stage (1x1, strided 3x3 depthwise, 1x1)."""

    def __init__(self, config: LiteSamVisionConfig, resolution: int, dim: int, out_dim: int, stride: int):
        super().__init__()
        self.resolution = resolution
        self.act = ACT2FN[config.hidden_act]
        self.conv1 = Conv2dBN(dim, out_dim)
        # `stride` from the config: the original tiny_vit_sam.py's PatchMerging hard-codes stride 1 when out_dim is 320,
        # 448 or 576 (each TinyViT size's last stage), else 2; LiteMedSAM's (2, 2, 1) is that rule spelled out
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # tokens (B, H*W, C) after attention stages; stage 0's MBConv blocks hand over maps (B, C, H, W)
        if hidden_states.ndim == 3:
            batch = hidden_states.shape[0]
            hidden_states = hidden_states.view(batch, self.resolution, self.resolution, -1).permute(0, 3, 1, 2)
        x = self.act(self.conv1(hidden_states))
        x = self.act(self.conv2(x))
        return self.conv3(x).flatten(2).transpose(1, 2)


class TinyViTMlp(nn.Module):
    """Pre-norm MLP: LayerNorm, fc1, activation, fc2."""

    def __init__(self, config: LiteSamVisionConfig, dim: int):
        super().__init__()
        hidden = int(dim * config.mlp_ratio)
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(self.norm(hidden_states))))
        return self.drop(self.fc2(x))


# cached per (window, device): only the integer index, which never changes; the bias itself is gathered per forward
@functools.lru_cache(maxsize=32)
def _relative_offset_index(window: int, device: torch.device) -> torch.Tensor:
    """(N, N) index into the per-offset bias table: |dy| * window + |dx| for N = window² tokens.

    This equals the original's enumeration of offsets in order of first appearance (row-major from (0, 0)).
    """
    coords = torch.stack(
        torch.meshgrid(torch.arange(window, device=device), torch.arange(window, device=device), indexing="ij")
    ).flatten(1)
    offsets = (coords[:, :, None] - coords[:, None, :]).abs()
    return offsets[0] * window + offsets[1]


class TinyViTAttention(nn.Module):
    """Window self-attention with a learned bias per head and relative offset (LeViT style).

    `qkv` is one Linear(dim, 3 * dim) whose rows are ordered `[q | k | v]`, each `(num_heads, head_dim)`, as in
    SAM's ViT attention.
    """

    def __init__(self, config: LiteSamVisionConfig, dim: int, num_heads: int, window_size: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # one entry per (|dy|, |dx|) offset, each 0..window-1: window² entries, the original's table size
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))

    def attention_bias(self) -> torch.Tensor:
        """(num_heads, N, N) additive bias, gathered from the table now (never a stale cached copy)."""
        index = _relative_offset_index(self.window_size, self.attention_biases.device)
        return self.attention_biases[:, index]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = hidden_states.shape
        qkv = self.qkv(self.norm(hidden_states))
        # dim 2 is q/k/v, then heads: the [q | k | v] row order (SamVisionAttention reshapes its qkv the same way); the
        # original splits view(B, N, heads, 3 * d) per head instead, hence the row permutation on load
        q, k, v = qkv.view(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # SDPA wants a float mask in the query's dtype (bf16 under autocast; the table is a float32 parameter)
        bias = self.attention_bias().to(q.dtype)
        # SDPA's default scale head_dim**-0.5 is the original's key_dim**-0.5 (TinyViTBlock builds Attention with
        # key_dim = head_dim, attn_ratio=1); the (heads, N, N) bias broadcasts over batch * windows
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, -1))


class TinyViTBlock(GradientCheckpointingLayer):
    """Windowed attention (residual), depthwise 3x3 Conv-BN, MLP (residual), on tokens (B, H*W, C)."""

    def __init__(
        self, config: LiteSamVisionConfig, dim: int, resolution: int, num_heads: int, window_size: int, drop_path: float
    ):
        super().__init__()
        self.resolution = resolution
        self.window_size = window_size
        self.attn = TinyViTAttention(config, dim, num_heads, window_size)
        self.mlp = TinyViTMlp(config, dim)
        self.local_conv = Conv2dBN(dim, dim, config.local_conv_size, groups=dim)
        self.drop_path = _drop_path(drop_path)

    def _windowed_attention(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Zero-pad the grid to whole windows, attend within each window (padding unmasked, as the original)."""
        batch, _, channels = hidden_states.shape
        side, window = self.resolution, self.window_size
        padded = math.ceil(side / window) * window
        x = hidden_states.view(batch, side, side, channels)
        if padded != side:
            # F.pad's pairs run from the last dim: channels untouched, then right (W) and bottom (H) padding
            x = F.pad(x, (0, 0, 0, padded - side, 0, padded - side))
        n = padded // window
        # (B, rows, w, cols, w, C) -> (B, rows, cols, w, w, C): windows row-major, tokens row-major within each window,
        # the order _relative_offset_index assumes
        x = x.view(batch, n, window, n, window, channels).transpose(2, 3).reshape(-1, window * window, channels)
        x = self.attn(x)
        x = x.view(batch, n, n, window, window, channels).transpose(2, 3).reshape(batch, padded, padded, channels)
        return x[:, :side, :side].reshape(batch, side * side, channels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, tokens, channels = hidden_states.shape
        if tokens != self.resolution**2:
            raise ValueError(f"TinyViTBlock expects {self.resolution}² tokens, got {tokens} (wrong image size?)")
        x = hidden_states + self.drop_path(self._windowed_attention(hidden_states))
        x = x.transpose(1, 2).reshape(batch, channels, self.resolution, self.resolution)
        # no residual around the depthwise conv, as the original TinyViTBlock
        x = self.local_conv(x).view(batch, channels, tokens).transpose(1, 2)
        return x + self.drop_path(self.mlp(x))


class TinyViTStage(nn.Module):
    """One stage: its blocks, then the patch merging into the next stage (all stages but the last)."""

    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (the stage's own output, the input of the next stage)."""
        for block in self.blocks:
            hidden_states = block(hidden_states)
        merged = self.downsample(hidden_states) if self.downsample is not None else hidden_states
        return hidden_states, merged


class TinyViTNeck(nn.Sequential):
    """1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d to `output_channels` (SAM's neck; keys `neck.0..3`)."""

    def __init__(self, config: LiteSamVisionConfig):
        out, eps = config.output_channels, config.neck_layer_norm_eps
        super().__init__(
            nn.Conv2d(config.embed_dims[-1], out, kernel_size=1, bias=False),
            SamLayerNorm(out, eps=eps, data_format="channels_first"),
            nn.Conv2d(out, out, kernel_size=3, padding=1, bias=False),
            SamLayerNorm(out, eps=eps, data_format="channels_first"),
        )


# ---------------------------------------------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------------------------------------------


class TinyViTPreTrainedModel(PreTrainedModel):
    config: LiteSamVisionConfig
    config_class = LiteSamVisionConfig
    base_model_prefix = "vision_encoder"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["TinyViTBlock", "MBConv"]
    supports_gradient_checkpointing = True

    def _init_weights(self, module: nn.Module) -> None:
        """TinyViT's initialisation: Linear truncated normal (std `initializer_range`), zero biases and
        attention bias tables, unit norms; the last BatchNorm of each MBConv starts at zero (identity block)."""
        # transformers.initialization, not torch.nn.init: its functions skip tensors flagged as loaded
        # (`_is_hf_initialized`), so from_pretrained never re-initialises checkpoint weights
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))  # torch's default for convolutions
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            (init.zeros_ if getattr(module, "zero_init", False) else init.ones_)(module.weight)
            init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm2d):
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, TinyViTAttention):
            init.zeros_(module.attention_biases)


class TinyViTVisionEncoder(TinyViTPreTrainedModel):
    """TinyViT image encoder with `SamVisionEncoder`'s interface: `(B, 3, S, S)` pixels ->
    `SamVisionEncoderOutput.last_hidden_state` `(B, output_channels, s, s)` (`(B, 256, 64, 64)` for LiteMedSAM).

    With `output_hidden_states=True`, `hidden_states` holds each stage's output, channels last `(B, h, w, C)`.
    """

    def __init__(self, config: LiteSamVisionConfig):
        super().__init__(config)
        self.image_size = config.image_size
        self.patch_embed = PatchEmbed(config)
        resolutions = config.stage_resolutions()
        # device="cpu": converters build this model under `torch.device("meta")`, where .tolist() would fail
        rates = torch.linspace(0, float(config.drop_path_rate), sum(config.depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        for i, (dim, depth) in enumerate(zip(config.embed_dims, config.depths)):
            stage_rates = rates[sum(config.depths[:i]) : sum(config.depths[: i + 1])]
            if i == 0:
                blocks = [MBConv(config, dim, rate) for rate in stage_rates]
            else:
                blocks = [
                    TinyViTBlock(config, dim, resolutions[i], config.num_heads[i], config.window_sizes[i], rate)
                    for rate in stage_rates
                ]
            last = i == len(config.embed_dims) - 1
            downsample = None if last else PatchMerging(
                config, resolutions[i], dim, config.embed_dims[i + 1], config.downsample_strides[i]
            )
            self.layers.append(TinyViTStage(blocks, downsample))
        self.neck = TinyViTNeck(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.patch_embed

    def train(self, mode: bool = True) -> "TinyViTVisionEncoder":
        super().train(mode)
        if mode and self.config.freeze_batch_norm:
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    # after super().train(mode): that call would set every BatchNorm back to training mode
                    module.eval()
        return self

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SamVisionEncoderOutput | tuple:
        """`kwargs` (e.g. `output_attentions`, which this encoder does not record) are accepted and ignored, so
        `SamModel.forward` can pass its own through."""
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        size = self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (self.config.num_channels, size, size):
            raise ValueError(
                f"pixel_values must be (batch, {self.config.num_channels}, {size}, {size}), got {tuple(pixel_values.shape)}"
            )
        stage_outputs = []
        hidden_states = self.patch_embed(pixel_values)
        for stage in self.layers:
            output, hidden_states = stage(hidden_states)
            stage_outputs.append(output)
        side = self.config.embedding_size
        # the last stage has no PatchMerging, so hidden_states are its tokens (B, s*s, C); the neck wants (B, C, s, s)
        embedding = hidden_states.view(hidden_states.shape[0], side, side, -1).permute(0, 3, 1, 2)
        embedding = self.neck(embedding)
        all_hidden = None
        if output_hidden_states:
            # stage 0 (MBConv) outputs maps (B, C, H, W), the attention stages tokens: both made (B, h, w, C)
            all_hidden = (stage_outputs[0].permute(0, 2, 3, 1),) + tuple(
                out.view(out.shape[0], r, r, -1) for out, r in zip(stage_outputs[1:], self.config.stage_resolutions()[1:])
            )
        if return_dict is False:
            # transformers' tuple convention: None entries are left out
            return tuple(v for v in (embedding, all_hidden) if v is not None)
        return SamVisionEncoderOutput(last_hidden_state=embedding, hidden_states=all_hidden)
