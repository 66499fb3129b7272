"""The app's model switching and page logic, without a browser (tiny SAM, real saved adapters)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_sam_peft.app import BASE_NAME, AppLogic, ModelBank, Session, load_app_image, render
from hf_sam_peft.evaluation.predictor import SamPredictor, load_model


def _perturbed_adapter(base: torch.nn.Module, method: str, seed: int, folder: Path, unetr: bool = False) -> Path:
    """Apply ``method`` to a copy of ``base``, add seeded noise to every trainable tensor and save the adapter."""
    from hf_sam_peft import apply_method
    from hf_sam_peft.modeling.unetr import attach_unetr, save_unetr

    model = apply_method(copy.deepcopy(base), method)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.5 * torch.randn(param.shape, generator=generator) * (param.abs().mean() + 0.05))
    model.save_pretrained(folder)
    if unetr:
        torch.manual_seed(seed)
        decoder = attach_unetr(copy.deepcopy(base), features=(32, 16, 16, 8))
        save_unetr(decoder, folder / "unetr")
    return folder


def make_models(root: Path) -> tuple[Path, dict[str, Path]]:
    """A saved seeded tiny SamModel and three adapters for it: two LoRA (one with a UNETR decoder) and SSF."""
    from transformers import SamModel

    from hf_sam_peft.modeling.sam import tiny_sam_config

    torch.manual_seed(0)
    base = SamModel(tiny_sam_config()).eval()
    base_dir = root / "tiny_base"
    base.save_pretrained(base_dir)
    adapters = {
        "lora": _perturbed_adapter(base, "lora", 1, root / "lora"),
        "ssf": _perturbed_adapter(base, "ssf", 2, root / "ssf"),
        "lora_ais": _perturbed_adapter(base, "lora", 3, root / "lora_ais", unetr=True),
    }
    return base_dir, adapters


def blob_image(shape: tuple[int, int] = (96, 128)) -> np.ndarray:
    """A 16-bit grey image with one bright disc at (x=40, y=50), radius 18."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    image = 800 + 300 * ((xx - 40) ** 2 + (yy - 50) ** 2 < 18**2)
    return (image + (np.arange(shape[1]) % 7)[None]).astype(np.uint16)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("app_models"))


@pytest.fixture(scope="module")
def logic(models, tmp_path_factory):
    from transformers import SamModel

    base_dir, adapters = models
    bank = ModelBank(SamModel.from_pretrained(base_dir), [str(p) for p in adapters.values()])
    return AppLogic(bank, out_dir=tmp_path_factory.mktemp("app_out"))


def _reference(base_dir: Path, adapter: Path | None, image, points, labels) -> np.ndarray:
    """The Python API's mask for one object's points (one point: best of SAM's three by predicted IoU)."""
    predictor = SamPredictor(load_model(str(base_dir), str(adapter) if adapter else None))
    predictor.set_image(image)
    return predictor.predict_masks(torch.tensor([points]), torch.tensor([labels]), multimask=len(points) == 1)[0]


def test_bank_names_and_decoders(logic):
    bank = logic.bank
    assert bank.names == [BASE_NAME, "lora", "ssf", "lora_ais"]
    assert [bank.adapters[n].peft_type for n in bank.adapters] == ["LORA", "SSF", "LORA"]
    assert [bank.has_decoder(n) for n in bank.names] == [False, False, False, True]
    with pytest.raises(ValueError, match="model must be one of"):
        bank.has_decoder("nope")


def test_every_model_matches_the_python_api(logic, models, tmp_path):
    """Switching in place (set_adapter / disable_adapter, two peft types) gives each model's own masks."""
    base_dir, adapters = models
    image = blob_image()
    masks = {}
    for name in logic.bank.names:
        mask, iou = logic.predict(image, name, [(40, 50)], [1])
        expected = _reference(base_dir, adapters.get(name), image, [(40, 50)], [1])
        assert mask.shape == image.shape and np.isfinite(iou)  # random models: any finite score
        np.testing.assert_array_equal(mask, expected, err_msg=name)
        masks[name] = mask
    # the adapters really differ from the base and from each other
    assert len({m.tobytes() for m in masks.values()}) == len(masks)


def test_embedding_computed_once_per_image_and_model(logic):
    image = blob_image((80, 90))
    session = Session()
    path = Path(logic.out_dir) / "blob.tif"
    import tifffile

    tifffile.imwrite(path, image)
    logic.load(session, path)
    before = logic.encoder_runs
    logic.click(session, 40, 50, "positive point")
    logic.click(session, 5, 5, "negative point")
    logic.click(session, 60, 60, "negative point")
    assert logic.encoder_runs == before + 1
    logic.set_model(session, "lora")
    logic.click(session, 70, 10, "negative point")
    logic.set_model(session, BASE_NAME)  # back: cached, no new encoding
    assert logic.encoder_runs == before + 2
    assert session.result_kind == "mask" and session.labels.shape == image.shape
    assert session.prompt_text() == "+(40, 50) -(5, 5) -(60, 60) -(70, 10)"


def test_session_box_clear_export(logic):
    import tifffile

    session = Session(model="ssf")
    path = Path(logic.out_dir) / "rgb.png"
    from PIL import Image

    Image.fromarray(np.stack([blob_image().astype(np.uint8)] * 3, axis=-1)).save(path)
    logic.load(session, path)
    logic.click(session, 30, 40, "box")
    assert session.corner == (30, 40) and session.labels is None  # half a box predicts nothing yet
    logic.click(session, 10, 70, "box")
    assert session.box == (10, 40, 31, 71) and session.result_kind == "mask"
    expected, _ = logic.predict(session.image, "ssf", box=(10, 40, 31, 71))
    saved = tifffile.imread(logic.export(session))
    np.testing.assert_array_equal(saved, expected.astype(np.uint8))
    assert "predicted IoU" in logic.status(session)
    logic.clear(session)
    assert session.labels is None and logic.export(session) is None and session.prompt_text() == "none"


def test_segment_all_only_with_decoder(logic):
    session = Session()
    path = Path(logic.out_dir) / "for_ais.tif"
    import tifffile

    tifffile.imwrite(path, blob_image())
    logic.load(session, path)
    with pytest.raises(ValueError, match="UNETR decoder.*'base' has none"):
        logic.segment_all(session)
    logic.set_model(session, "lora_ais")
    logic.segment_all(session)
    assert session.result_kind == "ais" and session.labels.shape == (96, 128) and session.labels.dtype == np.uint32
    assert tifffile.imread(logic.export(session)).dtype == np.uint32
    logic.set_model(session, "lora")  # no decoder: the AIS result is dropped rather than shown for the wrong model
    assert session.labels is None


def test_bad_input_gives_one_line_errors(logic, tmp_path):
    session = Session()
    with pytest.raises(ValueError, match="upload an image first"):
        logic.click(session, 1, 1, "positive point")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="could not read"):
        logic.load(session, broken)
    import tifffile

    volume = tmp_path / "volume.tif"
    tifffile.imwrite(volume, np.zeros((5, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="2D images"):
        logic.load(session, volume)
    tifffile.imwrite(tmp_path / "ok.tif", blob_image())
    logic.load(session, tmp_path / "ok.tif")
    with pytest.raises(ValueError, match="outside"):
        logic.click(session, 500, 1, "positive point")
    with pytest.raises(ValueError, match="mode must be"):
        logic.click(session, 1, 1, "lasso")
    with pytest.raises(ValueError, match="model must be one of"):
        logic.set_model(session, "missing")


def test_load_app_image_matches_training_loader(tmp_path):
    import tifffile

    from hf_sam_peft.data import load_image

    path = tmp_path / "x.tif"
    tifffile.imwrite(path, blob_image().astype(np.float32))
    np.testing.assert_array_equal(load_app_image(path), load_image(path))


def test_render_draws_mask_points_and_box():
    image = blob_image()
    mask = np.zeros(image.shape, np.uint8)
    mask[40:60, 30:50] = 1
    plain = render(image)
    out = render(image, mask, [(5, 5), (100, 80)], [1, 0], box=(60, 10, 90, 30))
    assert out.dtype == np.uint8 and out.shape == (*image.shape, 3)
    assert not np.array_equal(out[45, 40], plain[45, 40])  # tinted inside the mask
    np.testing.assert_array_equal(out[20, 115], plain[20, 115])  # untouched elsewhere
    assert out[5, 5].tolist() == [0, 200, 0] and out[80, 100].tolist() == [230, 0, 0]
    assert out[10, 70].tolist() == [255, 210, 0]  # box edge


def test_app_command_without_gradio(monkeypatch):
    import argparse
    import builtins

    from hf_sam_peft.commands import app as app_command

    real_import = builtins.__import__

    def no_gradio(name, *args, **kwargs):
        if name == "gradio" or name.startswith("gradio."):
            raise ImportError("No module named 'gradio'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gradio)
    parser = argparse.ArgumentParser()
    app_command.register(parser.add_subparsers())
    args = parser.parse_args(["app", "--base", "tiny"])
    with pytest.raises(ImportError, match=r"^the app needs Gradio: pip install 'hf-sam-peft\[app\]'$"):
        args.func(args)


def test_adapter_trained_with_single_mask_points_answers_a_click_through_it(models, tmp_path):
    """An adapter saved with point_multimask=False (the demo's LiteMedSAM recipe) answers one click with SAM's
    single-mask output in the app, as the Python API does; the other adapters and the base keep multimask."""
    from transformers import SamModel

    from hf_sam_peft import apply_method
    from hf_sam_peft.hub import save_adapter

    base_dir, adapters = models
    trained = apply_method(SamModel.from_pretrained(base_dir), "lora")
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in trained.parameters():
            if param.requires_grad:
                param.add_(0.5 * torch.randn(param.shape, generator=generator) * (param.abs().mean() + 0.05))
    single = save_adapter(trained, tmp_path / "single_mask", base_model_id=str(base_dir), point_multimask=False)
    bank = ModelBank(SamModel.from_pretrained(base_dir), [str(single), str(adapters["ssf"])])
    logic = AppLogic(bank, out_dir=tmp_path / "out")
    assert bank.adapters["single_mask"].point_multimask is False and bank.adapters["ssf"].point_multimask is None
    assert [bank.point_multimask(n) for n in bank.names] == [True, False, True]

    image = blob_image()
    mask, iou = logic.predict(image, "single_mask", [(40, 50)], [1])
    model = load_model(str(base_dir), str(single))
    predictor = SamPredictor(model)
    assert predictor.point_multimask is False
    predictor.set_image(image)
    logits, expected_iou = predictor.predict(torch.tensor([[[40, 50]]]), torch.tensor([[1]]), multimask=False)
    np.testing.assert_array_equal(mask, (logits[0, 0] > 0).numpy())
    assert iou == pytest.approx(float(expected_iou[0, 0]), abs=1e-6)
    multimask = SamPredictor(model, point_multimask=True)
    multimask.set_image(image)
    assert multimask.predict(torch.tensor([[[40, 50]]]), torch.tensor([[1]]), multimask=True)[0].shape[1] == 3
    # the adapter without a record still answers through the best of SAM's three masks
    ssf_mask, _ = logic.predict(image, "ssf", [(40, 50)], [1])
    np.testing.assert_array_equal(ssf_mask, _reference(base_dir, adapters["ssf"], image, [(40, 50)], [1]))
