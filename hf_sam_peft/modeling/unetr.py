"""UNETR decoder for automatic instance segmentation (AIS) on SAM's image embedding.

The architecture is the one micro-sam trains next to SAM (torch_em's ``UNETR`` with
``use_skip_connection=False``, ``out_channels=3``, ``final_activation="Sigmoid"``): it sees only the
image embedding after the neck (B, 256, 64, 64 for ViT-B at 1024²), no intermediate ViT features.

- Pseudo-skips: a *chain* of up-blocks (upsample ×2, conv3×3, BatchNorm, ReLU) from the embedding:
  512 @ 2×, 256 @ 4×, 128 @ 8×, 64 @ 16× the embedding resolution.
- Main path: ConvBlock embed→512, then 3× [upsample ×2 (halving channels), concat skip, ConvBlock], a
  final upsample ×2 at 64 channels, concat with the 16× skip, ConvBlock 128→64, 1×1 conv → 3 channels,
  sigmoid.
- Reference quirk we keep on purpose: torch_em's decoder crops each skip to the shape of the upsampled
  tensor *including the channel axis*, so the 512/256/128-channel pseudo-skips enter the concat as their
  middle 256/128/64 channels. Keeping it keeps the parameter count, the numerics and the ability to load
  micro-sam's trained decoders; the unused outer channels still train through the chain.
- ConvBlock is torch_em's: (InstanceNorm, conv3×3, ReLU) twice; the instance norms have no affine
  parameters, which is why the parameter counts below hold (not batch norm: torch_em's ``ConvBlock``
  in ``torch_em/model/unet.py`` normalises with non-affine instance norm, and so do we).
- ``upsampling="transposed"``: ConvTranspose2d(k2, s2) (the paper's runs) = 11,028,931 parameters on
  ViT-B; ``"interpolate"``: bilinear ×2 then a 1×1 conv (the reference's later default) = 9,591,235.
  (The paper's Table 5 prints these rounded to 0.0001 M: 11.0289 M / 9.5912 M.)

Output channels: 0 = foreground, 1 = distance to the object centre, 2 = (inverted) distance to the
object boundary — the order of ``hf_sam_peft.training.ais.distance_targets`` and of micro-sam.

Submodule names follow torch_em's UNETR (state-dict keys checked against torch_em 0.10.9), so a
micro-sam ``decoder_state`` (the UNETR state without ``encoder.*``) loads with ``load_state_dict``.

SAM 2 (``Sam2Model``): the decoder takes the last of SAM 2's three image-embedding maps
(:func:`hf_sam_peft.sam_forward.kinds.main_embedding`): stride 16 with ``fpn_hidden_size`` (256) channels, the
shape of SAM's embedding (64² at 1024²), and the very tensor SAM 2's mask decoder attends to (the FPN's top
level + ``no_memory_embedding``). So the head is the paper's architecture unchanged (same ×16 upsampling, same
parameter counts), and joint training shares one encoder pass with the interactive objective. The two
high-resolution maps (strides 4 and 8, already projected by the mask decoder's ``conv_s0`` / ``conv_s1``) are
not used: feeding them as real skips would be a different head than the paper's, which has none. SAM 2's
input frame is the stretched square, so its "resized size" is ``(S, S)``: nothing is cropped, the output is
only resized back to the image (pass ``input_shape`` as the preprocessing returned it).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import Sam2Model, SamModel

from hf_sam_peft.atomic import atomic_write

UPSAMPLING_MODES = ("transposed", "interpolate")
CONFIG_NAME = "unetr_config.json"
WEIGHTS_NAME = "unetr.safetensors"
ATTRIBUTE_NAME = "unetr_decoder"


@dataclass
class UNETRConfig:
    """Everything needed to rebuild a `UNETRDecoder` (saved as JSON next to the weights)."""

    embed_dim: int = 256
    out_channels: int = 3
    features: tuple[int, ...] = (512, 256, 128, 64)
    upsampling: str = "transposed"
    sigmoid: bool = True
    # Side of SAM's square (padded) input; the output is resized to it first when the ×16 upsampling does
    # not land there (a patch size other than 16). None: use the output as it is.
    image_size: int | None = None
    # How the image sits in that square: "pad" (SAM: longest side resized, padded at the bottom / right) or
    # "square" (SAM 2: stretched, nothing to crop). Only used to derive `input_shape` from `original_shape`.
    frame: str = "pad"

    def __post_init__(self) -> None:
        if self.frame not in ("pad", "square"):
            raise ValueError(f"frame must be 'pad' or 'square', got {self.frame!r}")
        # a JSON round trip gives a list: back to a tuple, so a loaded config equals the one saved
        self.features = tuple(int(f) for f in self.features)
        if self.upsampling not in UPSAMPLING_MODES:
            raise ValueError(f"upsampling must be one of {UPSAMPLING_MODES}, got {self.upsampling!r}")
        f = self.features
        # non-increasing: each pseudo-skip (features[i]) is cropped down to the upsampled tensor it joins
        # (features[i + 1]), which needs it at least as wide
        if len(f) != 4 or any(c <= 0 for c in f) or any(a < b for a, b in zip(f, f[1:])):
            raise ValueError(f"features must be 4 positive, non-increasing channel counts, got {f}")
        for name in ("embed_dim", "out_channels"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.image_size is not None and int(self.image_size) <= 0:
            raise ValueError(f"image_size must be a positive int or None, got {self.image_size!r}")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["features"] = list(self.features)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "UNETRConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown UNETRConfig keys: {sorted(unknown)}")
        return cls(**data)


# --- building blocks (attribute names mirror torch_em's so state dicts are interchangeable) -----------


class _TransposedUpsample(nn.Module):
    """×2 upsampling by a learned ConvTranspose2d(k2, s2)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        # torch_em's SingleDeconv2DBlock (unetr.py), key `block`
        self.block = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class _InterpolateUpsample(nn.Module):
    """×2 bilinear upsampling followed by a 1×1 conv that sets the channel count."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch_em's Upsampler2d (unet.py): interpolate, then the 1x1 conv; key `conv` as there
        return self.conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))


def _upsample(mode: str, in_channels: int, out_channels: int) -> nn.Module:
    return _TransposedUpsample(in_channels, out_channels) if mode == "transposed" else _InterpolateUpsample(
        in_channels, out_channels
    )


class _Conv3x3(nn.Module):
    """A padded 3×3 conv (wrapped only so parameter names match the reference)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.block = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class ConvBlock(nn.Module):
    """(InstanceNorm, conv3×3, ReLU) × 2 — torch_em's 2D ConvBlock with its default norm."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            # InstanceNorm2d's default affine=False: no parameters, as torch_em's get_norm_layer("InstanceNorm")
            nn.InstanceNorm2d(in_channels),
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.InstanceNorm2d(out_channels),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class UpBlock(nn.Module):
    """Upsample ×2, conv3×3, BatchNorm, ReLU: one link of the pseudo-skip chain."""

    def __init__(self, in_channels: int, out_channels: int, upsampling: str) -> None:
        super().__init__()
        self.block = nn.Sequential(
            # torch_em's Deconv2DBlock (unetr.py): keys block.0 (upsampler), block.1.block (conv), block.2 (BatchNorm)
            _upsample(upsampling, in_channels, out_channels),
            _Conv3x3(out_channels, out_channels),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def _centre_channels(skip: torch.Tensor, channels: int) -> torch.Tensor:
    """The middle `channels` channels of `skip` (the reference crops skips to the upsampled tensor's shape,
    channels included: with features (512, 256, 128, 64) each pseudo-skip has twice the channels of the
    tensor it joins, and only its middle half reaches the ConvBlock)."""
    # as torch_em's Decoder._crop (unet.py), whose slice(d, n - d) is one channel wider when n - channels is odd
    # (a shape mismatch there); here always exactly `channels` (the reference's features give even differences)
    start = (skip.shape[1] - channels) // 2
    return skip[:, start : start + channels]


class _SkipDecoder(nn.Module):
    """The U-Net decoder levels: upsample, concatenate the (channel-cropped) skip, ConvBlock."""

    def __init__(self, features: Sequence[int], upsampling: str) -> None:
        super().__init__()
        pairs = list(zip(features[:-1], features[1:]))
        # upsampled tensor (cout) + equally wide crop of the skip; = cin for the reference's halving features
        self.blocks = nn.ModuleList([ConvBlock(2 * cout, cout) for _, cout in pairs])
        self.samplers = nn.ModuleList([_upsample(upsampling, cin, cout) for cin, cout in pairs])

    def forward(self, x: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        for block, sampler, skip in zip(self.blocks, self.samplers, skips):
            x = sampler(x)
            x = block(torch.cat([x, _centre_channels(skip, x.shape[1])], dim=1))
        return x


# --- the decoder --------------------------------------------------------------------------------------


def sam_resized_shape(original_shape: Sequence[int], image_size: int) -> tuple[int, int]:
    """Shape after SAM's resize of the longest side to `image_size` (before padding to a square)."""
    h, w = _as_shape(original_shape, "original_shape")
    scale = image_size / max(h, w)
    # round half up, as torch_em's UNETRBase.get_preprocess_shape: the crop must match the preprocessing's resize
    # to the pixel
    return int(h * scale + 0.5), int(w * scale + 0.5)


def _as_shape(shape: Sequence[int] | None, name: str) -> tuple[int, int]:
    try:
        out = tuple(int(s) for s in shape)  # type: ignore[union-attr]
    except TypeError:
        raise TypeError(f"{name} must be a (height, width) pair of ints, got {shape!r}") from None
    if len(out) != 2 or min(out) <= 0:
        raise ValueError(f"{name} must be a (height, width) pair of positive ints, got {shape!r}")
    return out  # type: ignore[return-value]


class UNETRDecoder(nn.Module):
    """UNETR head on SAM's image embedding → (B, out_channels, H, W) in [0, 1] (foreground, centre and
    boundary distances). Upsamples ×16 (SAM's patch size), so 64² → 1024² for ViT-B and 16² → 256² for the
    tiny test SAM."""

    def __init__(self, config: UNETRConfig | None = None, **kwargs) -> None:
        super().__init__()
        if config is not None and kwargs:
            raise TypeError("pass either config or keyword arguments, not both")
        if config is None:
            config = UNETRConfig(**kwargs)
        if not isinstance(config, UNETRConfig):
            raise TypeError(f"config must be a UNETRConfig, got {type(config).__name__}")
        self.config = config
        f, mode = config.features, config.upsampling

        self.deconv1 = UpBlock(config.embed_dim, f[0], mode)
        self.deconv2 = UpBlock(f[0], f[1], mode)
        self.deconv3 = UpBlock(f[1], f[2], mode)
        self.deconv4 = UpBlock(f[2], f[3], mode)
        self.base = ConvBlock(config.embed_dim, f[0])
        self.decoder = _SkipDecoder(f, mode)
        self.deconv_out = _upsample(mode, f[-1], f[-1])
        self.decoder_head = ConvBlock(2 * f[-1], f[-1])
        self.out_conv = nn.Conv2d(f[-1], config.out_channels, kernel_size=1)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        input_shape: Sequence[int] | None = None,
        original_shape: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Decode; then crop SAM's padding away (`input_shape`: the resized image before padding) and
        resize to `original_shape` (bilinear), as micro-sam's UNETR post-processing does. When only
        `original_shape` is given, `input_shape` is derived by SAM's longest-side rule (``frame="pad"``) or
        is the whole square (``frame="square"``, SAM 2)."""
        if not isinstance(image_embeddings, torch.Tensor) or image_embeddings.ndim != 4:
            raise ValueError("image_embeddings must be a (batch, channels, height, width) tensor")
        if image_embeddings.shape[1] != self.config.embed_dim:
            raise ValueError(
                f"image_embeddings must have {self.config.embed_dim} channels, got {image_embeddings.shape[1]}"
            )
        z = image_embeddings
        # torch_em's UNETR.forward without skip connections: the chain z9 -> z6 -> z3 -> z0 all grows from the embedding
        skip1 = self.deconv1(z)
        skip2 = self.deconv2(skip1)
        skip3 = self.deconv3(skip2)
        skip4 = self.deconv4(skip3)

        x = self.decoder(self.base(z), [skip1, skip2, skip3])
        # skip4 (the 16x level) is concatenated whole: deconv_out keeps features[-1] channels, so no crop is needed
        x = self.decoder_head(torch.cat([self.deconv_out(x), skip4], dim=1))
        x = self.out_conv(x)
        if self.config.sigmoid:
            x = torch.sigmoid(x)
        return self.postprocess(x, input_shape, original_shape)

    def postprocess(
        self, x: torch.Tensor, input_shape: Sequence[int] | None, original_shape: Sequence[int] | None
    ) -> torch.Tensor:
        """Square output → crop of the un-padded input → original size."""
        size = self.config.image_size
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            # torch_em's UNETRBase.postprocess_masks resizes to img_size unconditionally; skipping the identity resize
            # only saves work (bilinear to the same size returns the same values)
            x = F.interpolate(x, (size, size), mode="bilinear", align_corners=False)
        if input_shape is None and original_shape is not None and self.config.frame == "pad":
            # the padded square's side is the output's side here (after the resize above)
            input_shape = sam_resized_shape(original_shape, max(x.shape[-2:]))
        if input_shape is not None:
            h, w = _as_shape(input_shape, "input_shape")
            if h > x.shape[-2] or w > x.shape[-1]:
                raise ValueError(f"input_shape {(h, w)} exceeds the decoder output {tuple(x.shape[-2:])}")
            # SAM pads at the bottom and right, so the image is the top-left h x w
            x = x[..., :h, :w]
        if original_shape is not None:
            target = _as_shape(original_shape, "original_shape")
            if tuple(x.shape[-2:]) != target:
                x = F.interpolate(x, target, mode="bilinear", align_corners=False)
        return x


# --- save / load ---------------------------------------------------------------------------------------


def save_unetr(decoder: UNETRDecoder, directory: str | os.PathLike) -> Path:
    """Save `decoder` as `unetr_config.json` + `unetr.safetensors` in `directory` (created if needed)."""
    if not isinstance(decoder, UNETRDecoder):
        raise TypeError(f"decoder must be a UNETRDecoder, got {type(decoder).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in decoder.state_dict().items()}
    # each file is replaced atomically on its own, not the pair: a failure between the two writes leaves the
    # previous config beside the new weights
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(state, p, metadata={"format": "pt"}))
    text = json.dumps(decoder.config.to_dict(), indent=2, sort_keys=True) + "\n"
    atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(text))
    return directory


def load_unetr(directory: str | os.PathLike, device: str | torch.device = "cpu") -> UNETRDecoder:
    """Rebuild a decoder saved by `save_unetr` (strict: every weight must match)."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{directory} must contain {CONFIG_NAME} and {WEIGHTS_NAME}")
    decoder = UNETRDecoder(UNETRConfig.from_dict(json.loads(config_path.read_text())))
    # strict by default: a missing or extra key (or a config that does not fit the weights) raises here
    decoder.load_state_dict(load_file(str(weights_path), device=str(device)))
    # load_state_dict copies into the freshly built CPU tensors; the module moves to `device` only here
    return decoder.to(device)


# --- SAM integration -----------------------------------------------------------------------------------


def _base_model(model: nn.Module) -> nn.Module:
    """The SamModel inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def attach_unetr(
    model: nn.Module,
    upsampling: str = "transposed",
    overwrite: bool = False,
    features: Sequence[int] = UNETRConfig.features,
) -> UNETRDecoder:
    """Build a decoder sized from `model`'s config and register it as `model.unetr_decoder` (so a peft
    wrapper can list "unetr_decoder" in `modules_to_save`). Returns the decoder. `model`: a `SamModel`
    (embedding channels `vision_config.output_channels`) or a `Sam2Model` (`vision_config.fpn_hidden_size`, see
    the module docstring). `features` other than the reference's (512, 256, 128, 64) are for quick
    experiments and tests only."""
    # lazy: sam_forward imports the data stack (~0.9 s): not at `import hf_sam_peft`
    from hf_sam_peft.sam_forward.kinds import frame_of, input_size_of

    if not isinstance(model, (SamModel, Sam2Model)):
        raise TypeError(f"model must be a transformers SamModel or Sam2Model, got {type(model).__name__}")
    if hasattr(model, ATTRIBUTE_NAME) and not overwrite:
        raise ValueError(f"model already has a {ATTRIBUTE_NAME!r}; pass overwrite=True to replace it")
    vision = model.config.vision_config
    channels = vision.fpn_hidden_size if isinstance(model, Sam2Model) else vision.output_channels
    decoder = UNETRDecoder(
        embed_dim=channels, upsampling=upsampling, image_size=input_size_of(model), features=features,
        frame=frame_of(model),
    )
    reference = next(
        (p for p in model.vision_encoder.parameters() if p.is_floating_point()), None
    )  # 4-bit encoders hold uint8 weights: take device/dtype from a float parameter
    if reference is not None:
        decoder.to(device=reference.device, dtype=reference.dtype)
    # a registered submodule: it is in model.state_dict() and peft's modules_to_save can name it
    setattr(model, ATTRIBUTE_NAME, decoder)
    return decoder


def predict_distances(
    model: nn.Module,
    pixel_values: torch.Tensor,
    input_shape: Sequence[int] | None = None,
    original_shape: Sequence[int] | None = None,
) -> torch.Tensor:
    """Image encoder (with gradients, unlike `get_image_embeddings`) then the UNETR decoder. Works on a
    SamModel, a Sam2Model (its stride-16 map, see the module docstring) or a peft model wrapping one (its
    `modules_to_save` copy is the active one). The embedding is `hf_sam_peft.sam_forward.encode_images`'s,
    the one the interactive objective decodes."""
    # lazy: sam_forward imports the data stack (~0.9 s): not at `import hf_sam_peft`
    from hf_sam_peft.sam_forward.forward import encode_images
    from hf_sam_peft.sam_forward.kinds import main_embedding

    # under peft, base.unetr_decoder is the ModulesToSaveWrapper, which runs the active adapter's trained copy
    base = _base_model(model)
    if not hasattr(base, ATTRIBUTE_NAME):
        raise ValueError("model has no UNETR decoder: call attach_unetr(model) first")
    embeddings = main_embedding(encode_images(base, pixel_values))
    return getattr(base, ATTRIBUTE_NAME)(embeddings, input_shape=input_shape, original_shape=original_shape)
