"""`hf-sam-peft evaluate` and `hf-sam-peft segment` end to end on a tiny SAM, adapters saved to disk and a
small dataset folder cut from real dsb2018 images."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from hf_sam_peft import cli
from tests.evaluation.test_interactive_eval import small_rows

FEATURES = (32, 16, 8, 8)


@pytest.fixture(autouse=True)
def commands(monkeypatch):
    """Make sure `hf-sam-peft` knows both commands, whether or not cli.py lists them yet."""
    missing = tuple(c for c in ("evaluate", "segment") if c not in cli.COMMANDS)
    monkeypatch.setattr(cli, "COMMANDS", cli.COMMANDS + missing)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A dataset folder (val split of two crops) and three adapters: UNETR in <adapter>/unetr, UNETR in
    modules_to_save, and none."""
    from hf_sam_peft.evaluation.predictor import load_base
    from hf_sam_peft.methods import apply_method
    from hf_sam_peft.modeling.unetr import attach_unetr, save_unetr
    from hf_sam_peft.tuners.base import default_modules_to_save

    root = tmp_path_factory.mktemp("cli")
    data = root / "mini_nuclei"
    for split in ("val", "test"):
        (data / split / "images").mkdir(parents=True)
        (data / split / "labels").mkdir(parents=True)
        for i, row in enumerate(small_rows(2)):
            Image.fromarray(row["image"]).save(data / split / "images" / f"img{i}.png")
            tifffile.imwrite(data / split / "labels" / f"img{i}.tif", row["labels"].astype(np.uint16))

    torch.manual_seed(1)
    base = load_base("tiny")
    decoder = attach_unetr(base, features=FEATURES)
    apply_method(base, "lora", r=4).save_pretrained(root / "with_folder")
    save_unetr(decoder, root / "with_folder" / "unetr")

    base = load_base("tiny")
    attach_unetr(base, features=FEATURES)
    torch.nn.init.normal_(base.unetr_decoder.out_conv.weight)  # weights that differ from a fresh decoder
    reference = {k: v.clone() for k, v in base.unetr_decoder.state_dict().items()}
    saved = apply_method(base, "lora", r=4, modules_to_save=default_modules_to_save() + ["unetr_decoder"])
    saved.save_pretrained(root / "in_adapter")

    apply_method(load_base("tiny"), "freeze_encoder").save_pretrained(root / "no_decoder")
    return {"root": root, "data": data, "reference_decoder": reference}


def test_decoder_is_found_in_both_layouts(workspace):
    from hf_sam_peft.evaluation.predictor import has_unetr, load_model
    from hf_sam_peft.sam_forward import unwrap_sam

    root = workspace["root"]
    assert has_unetr(load_model("tiny", str(root / "with_folder")))
    model = load_model("tiny", str(root / "in_adapter"))
    assert has_unetr(model)
    loaded = unwrap_sam(model).unetr_decoder.state_dict()
    for key, value in workspace["reference_decoder"].items():
        assert torch.equal(loaded[f"modules_to_save.default.{key}"], value), key  # peft's trained copy
    assert not has_unetr(load_model("tiny", str(root / "no_decoder")))
    assert not has_unetr(load_model("tiny"))


def test_evaluate_writes_and_updates_a_table(workspace, capsys):
    root, data = workspace["root"], workspace["data"]
    out = root / "results.csv"
    argv = ["evaluate", "--base", "tiny", "--adapter", str(root / "with_folder"), "--data", str(data),
            "--split", "test", "--grid-search-split", "val", "--out", str(out), "--no-progress"]
    assert cli.main(argv + ["--metric", "msa", "--metric", "dice"]) == 0
    printed = capsys.readouterr().out
    assert "I_P" in printed and "AIS" in printed and "mini_nuclei" in printed
    rows = list(csv.DictReader(out.open()))
    assert [(r["dataset"], r["method"], r["metric"]) for r in rows] == [("mini_nuclei", "lora", "msa"), ("mini_nuclei", "lora", "dice")]
    for column in ("point", "box", "ip", "ib", "ais"):
        assert 0.0 <= float(rows[0][column]) <= 1.0
    assert rows[1]["ais"] == "" and rows[1]["ib"] != ""

    # A second method lands in the same file; the first rows stay.
    assert cli.main(["evaluate", "--base", "tiny", "--adapter", str(root / "no_decoder"), "--data", str(data),
                     "--split", "test", "--mode", "all", "--method", "freeze_encoder", "--out", str(out),
                     "--n-corrections", "1", "--no-progress"]) == 0
    assert "AIS skipped" in capsys.readouterr().err
    rows = list(csv.DictReader(out.open()))
    assert [(r["method"], r["metric"]) for r in rows] == [("lora", "msa"), ("lora", "dice"), ("freeze_encoder", "msa")]
    assert rows[2]["ais"] == "" and rows[2]["ip"] != ""


def test_evaluate_ais_only_to_json(workspace):
    root, data = workspace["root"], workspace["data"]
    out = root / "ais.json"
    assert cli.main(["evaluate", "--base", "tiny", "--adapter", str(root / "in_adapter"), "--data", str(data),
                     "--mode", "ais", "--out", str(out), "--no-progress"]) == 0
    payload = json.loads(out.read_text())
    (row,) = payload["rows"]
    assert row["ais"] is not None and row["point"] is None
    assert payload["details"]["ais"]["n_images"] == 2 and payload["details"]["interactive"] is None


def test_evaluate_errors(workspace, capsys):
    root, data = workspace["root"], workspace["data"]
    assert cli.main(["evaluate", "--base", "tiny", "--adapter", str(root / "no_decoder"), "--data", str(data),
                     "--mode", "ais", "--no-progress"]) == 2
    assert "UNETR decoder" in capsys.readouterr().err
    assert cli.main(["evaluate", "--base", "tiny", "--data", str(data), "--out", "r.txt"]) == 2
    assert ".csv or .json" in capsys.readouterr().err
    assert cli.main(["evaluate", "--base", str(root / "nowhere"), "--data", str(data)]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert cli.main(["evaluate", "--base", "tiny", "--data", str(data), "--split", "train"]) == 2
    assert "split folder" in capsys.readouterr().err


def test_segment_writes_labels_and_overlays(workspace, capsys):
    root, data = workspace["root"], workspace["data"]
    images = sorted(str(p) for p in (data / "val" / "images").iterdir())
    labels = sorted(str(p) for p in (data / "val" / "labels").iterdir())
    out = root / "segmented"
    assert cli.main(["segment", "--base", "tiny", "--adapter", str(root / "with_folder"), *images,
                     "--boxes-from", *labels, "--out", str(out), "--param", "min_size=5"]) == 0
    assert "img0.png" in capsys.readouterr().out
    for stem, label_path in zip(("img0", "img1"), labels):
        truth = tifffile.imread(label_path)
        for kind in ("ais", "boxes"):
            result = tifffile.imread(out / f"{stem}_{kind}.tif")
            assert result.shape == truth.shape and np.issubdtype(result.dtype, np.integer)
        assert tifffile.imread(out / f"{stem}_boxes.tif").max() > 0  # one mask per box prompt
        overlay = np.asarray(Image.open(out / f"{stem}_overlay.png").convert("RGB"))
        assert overlay.shape[1] > 3 * overlay.shape[0] * 0.9  # image | labels | AIS | from boxes
        assert len(np.unique(overlay.reshape(-1, 3), axis=0)) > 50


def test_segment_without_decoder(workspace, capsys):
    root, data = workspace["root"], workspace["data"]
    image = str(data / "val" / "images" / "img0.png")
    out = root / "no_decoder_out"
    assert cli.main(["segment", "--base", "tiny", "--adapter", str(root / "no_decoder"), image, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "UNETR decoder" in err and "--boxes-from" in err
    label = str(data / "val" / "labels" / "img0.tif")
    assert cli.main(["segment", "--base", "tiny", "--adapter", str(root / "no_decoder"), image, "--labels", label,
                     "--out", str(out)]) == 0
    assert (out / "img0_boxes.tif").is_file() and not (out / "img0_ais.tif").exists()


def test_segment_bad_inputs(workspace, capsys, tmp_path):
    root, data = workspace["root"], workspace["data"]
    adapter = str(root / "with_folder")
    volume = tmp_path / "volume.tif"
    tifffile.imwrite(volume, np.zeros((4, 32, 32), np.uint8))
    assert cli.main(["segment", "--base", "tiny", "--adapter", adapter, str(volume), "--out", str(tmp_path)]) == 2
    assert "2D" in capsys.readouterr().err
    image = str(data / "val" / "images" / "img0.png")
    assert cli.main(["segment", "--base", "tiny", "--adapter", adapter, image, image, "--boxes-from",
                     str(data / "val" / "labels" / "img0.tif"), "--out", str(tmp_path)]) == 2
    assert "one label image per image" in capsys.readouterr().err
    floats = tmp_path / "float_labels.tif"
    tifffile.imwrite(floats, np.full((96, 96), 0.5, np.float32))
    assert cli.main(["segment", "--base", "tiny", "--adapter", adapter, image, "--labels", str(floats),
                     "--out", str(tmp_path)]) == 2
    assert "integer" in capsys.readouterr().err
    assert cli.main(["segment", "--base", "tiny", "--adapter", adapter, image, "--param", "sigma=2",
                     "--out", str(tmp_path)]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_base_from_folder(workspace, tmp_path):
    from hf_sam_peft.evaluation.predictor import load_base

    tiny = load_base("tiny")
    tiny.save_pretrained(tmp_path / "base")
    from_folder = load_base(str(tmp_path / "base"))
    assert all(torch.equal(a, b) for a, b in zip(tiny.state_dict().values(), from_folder.state_dict().values()))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_base(str(tmp_path / "empty"))

    data = workspace["data"]
    assert cli.main(["evaluate", "--base", str(tmp_path / "base"), "--data", str(data), "--n-corrections", "0",
                     "--no-progress", "--mode", "interactive"]) == 0


@pytest.mark.parametrize("point_multimask", [False, None])
def test_evaluate_answers_the_point_start_through_the_trained_output(workspace, tmp_path, decode_calls, point_multimask):
    """An adapter saved with point_multimask=False answers the first click through the single-mask output;
    one saved without the field keeps SAM's multimask output. The JSON details record which."""
    from hf_sam_peft.evaluation.predictor import load_base
    from hf_sam_peft.hub import save_adapter
    from hf_sam_peft.methods import apply_method

    adapter = save_adapter(
        apply_method(load_base("tiny"), "freeze_encoder"), tmp_path / "adapter", base_model_id="tiny",
        point_multimask=point_multimask,
    )
    calls = decode_calls
    out = tmp_path / "results.json"
    assert cli.main(["evaluate", "--base", "tiny", "--adapter", str(adapter), "--data", str(workspace["data"]),
                     "--split", "test", "--mode", "interactive", "--n-corrections", "0", "--out", str(out),
                     "--no-progress"]) == 0
    # per image: the point start's one call, then the box start's
    assert calls == [point_multimask is not False, False] * 2
    assert json.loads(out.read_text())["details"]["point_multimask"] is (point_multimask is not False)


# --------------------------------------------------------------------------------------------- issue 15


def one_error_line(capsys, argv) -> str:
    """Run the CLI; assert status 2 and one `hf-sam-peft <command>: error:` line on stderr; return it."""
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"hf-sam-peft {argv[0]}: error: "), err
    return lines[0]


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command loads a model: the output path must be refused before any work."""
    from hf_sam_peft.evaluation import predictor

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(predictor, "load_model", refuse)


def tiny_data(root, image=None):
    """<root>/val with one 32 x 40 image (float when given) and its labels; returns (image, label) paths."""
    for folder in ("images", "labels"):
        (root / "val" / folder).mkdir(parents=True, exist_ok=True)
    labels = np.zeros((32, 40), np.uint16)
    labels[4:14, 4:14], labels[18:30, 20:36] = 1, 2
    image_path, label_path = root / "val" / "images" / "a.tif", root / "val" / "labels" / "a.tif"
    tifffile.imwrite(image_path, np.full((32, 40), 7, np.uint8) if image is None else image)
    tifffile.imwrite(label_path, labels)
    return image_path, label_path


def unwritable_folder(tmp_path, monkeypatch, use_chmod: bool):
    """A folder nothing can be written to: chmod 500 (when that binds this user; root ignores it), else
    os.access monkeypatched to answer no for it, as for a read-only mount."""
    import os

    folder = tmp_path / "locked"
    folder.mkdir()
    if use_chmod:
        folder.chmod(0o500)
        if os.access(folder, os.W_OK):  # root: permission bits do not bind
            folder.chmod(0o700)
            pytest.skip("running as root: chmod does not make a folder unwritable")
        return folder
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: False if str(path) == str(folder) else real_access(path, mode, *a, **k))
    return folder


def test_evaluate_refuses_a_bad_out_before_any_work(tmp_path, capsys, no_model):
    data = tmp_path / "data"
    tiny_data(data)
    base = ["evaluate", "--base", "tiny", "--data", str(data), "--no-progress", "--out"]
    (tmp_path / "results.csv").mkdir()
    line = one_error_line(capsys, base + [str(tmp_path / "results.csv")])
    assert f"--out {tmp_path / 'results.csv'} is a folder, not a results file" in line
    (tmp_path / "file").write_text("x")
    line = one_error_line(capsys, base + [str(tmp_path / "file" / "sub" / "r.json")])
    assert f"--out {tmp_path / 'file' / 'sub' / 'r.json'} is not writable ({tmp_path / 'file'} is not a folder)" in line
    (tmp_path / "broken.json").write_text("{not json")
    line = one_error_line(capsys, base + [str(tmp_path / "broken.json")])
    assert "cannot be updated" in line and str(tmp_path / "broken.json") in line and "line 1" in line
    (tmp_path / "other.json").write_text("[1, 2]")
    line = one_error_line(capsys, base + [str(tmp_path / "other.json")])
    assert "is not a results JSON" in line
    assert ".csv or .json" in one_error_line(capsys, base + [str(tmp_path / "r.txt")])


@pytest.mark.parametrize("use_chmod", [True, False], ids=["chmod", "read-only (os.access)"])
def test_evaluate_refuses_an_unwritable_out_before_any_work(tmp_path, capsys, monkeypatch, no_model, use_chmod):
    data = tmp_path / "data"
    tiny_data(data)
    folder = unwritable_folder(tmp_path, monkeypatch, use_chmod)
    try:
        for out in (folder / "r.csv", folder / "new" / "deeper" / "r.json"):
            line = one_error_line(capsys, ["evaluate", "--base", "tiny", "--data", str(data), "--out", str(out)])
            assert f"--out {out} is not writable ({folder}" in line and "pass another --out" in line
            assert not out.parent.exists() or out.parent == folder  # nothing created
        if not use_chmod:  # an existing table in a read-only folder cannot be replaced (written by a rename)
            from hf_sam_peft.evaluation.results import ResultsTable

            ResultsTable().write(folder / "old.csv")  # the folder is writable, only os.access says no
            line = one_error_line(capsys, ["evaluate", "--base", "tiny", "--data", str(data), "--out", str(folder / "old.csv")])
            assert f"--out {folder / 'old.csv'} is not writable ({folder}: permission denied or read-only)" in line
    finally:
        folder.chmod(0o700)


def test_segment_refuses_a_bad_out_before_any_work(tmp_path, capsys, monkeypatch, no_model):
    image, labels = tiny_data(tmp_path / "data")
    base = ["segment", "--base", "tiny", str(image), "--boxes-from", str(labels), "--out"]
    (tmp_path / "file").write_text("x")
    line = one_error_line(capsys, base + [str(tmp_path / "file")])
    assert f"--out {tmp_path / 'file'} is a file, not a folder; pass another --out" in line
    line = one_error_line(capsys, base + [str(tmp_path / "file" / "sub")])
    assert f"--out {tmp_path / 'file' / 'sub'} is not writable ({tmp_path / 'file'} is not a folder)" in line
    folder = unwritable_folder(tmp_path, monkeypatch, use_chmod=False)
    for out in (folder, folder / "new"):
        line = one_error_line(capsys, base + [str(out)])
        assert f"--out {out} is not writable ({folder}: permission denied or read-only)" in line
    assert not (folder / "new").exists()
    line = one_error_line(capsys, ["segment", "--base", "tiny", str(image), str(image), "--out", str(tmp_path / "o")])
    assert "share the name 'a'" in line


def test_segment_refuses_a_chmod_locked_out(tmp_path, capsys, monkeypatch, no_model):
    image, labels = tiny_data(tmp_path / "data")
    folder = unwritable_folder(tmp_path, monkeypatch, use_chmod=True)
    try:
        for out in (folder, folder / "new"):
            line = one_error_line(capsys, ["segment", "--base", "tiny", str(image), "--boxes-from", str(labels),
                                           "--out", str(out)])
            assert f"--out {out} is not writable" in line
    finally:
        folder.chmod(0o700)


def test_non_finite_images_in_evaluate_and_segment_name_the_file(tmp_path, capsys):
    image = np.random.default_rng(0).random((32, 40)).astype(np.float32)
    image[1, 2] = np.nan
    image_path, label_path = tiny_data(tmp_path / "data", image)
    line = one_error_line(capsys, ["evaluate", "--base", "tiny", "--data", str(tmp_path / "data"), "--mode",
                                   "interactive", "--no-progress", "--out", str(tmp_path / "r.csv")])
    assert line.endswith(f"error: {image_path}: image holds NaN or inf values")
    assert not (tmp_path / "r.csv").exists()
    line = one_error_line(capsys, ["segment", "--base", "tiny", str(image_path), "--boxes-from", str(label_path),
                                   "--out", str(tmp_path / "seg")])
    assert line.endswith(f"error: {image_path}: image holds NaN or inf values")


def test_resize_feeds_whole_images_and_answers_at_the_original_size(workspace, tmp_path, capsys, monkeypatch):
    """`--resize`: the model sees each image whole in a square (the reference's medical transform), scores and
    written label images are at the file's own size; semantic labels print a per-class Dice table."""
    from hf_sam_peft.evaluation import resized

    root, data = workspace["root"], workspace["data"]
    seen: list[int] = []
    original = resized.ResizedPredictor.set_image

    def spy(self, image):
        seen.append(self.target)
        return original(self, image)

    monkeypatch.setattr(resized.ResizedPredictor, "set_image", spy)
    out = tmp_path / "r.json"
    assert cli.main(["evaluate", "--base", "tiny", "--adapter", str(root / "no_decoder"), "--data", str(data),
                     "--mode", "interactive", "--n-corrections", "0", "--resize", "--label-mode", "semantic",
                     "--metric", "dice", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert seen and set(seen) == {256}  # the tiny model's input size
    assert "scoring: semantic classes" in printed and "Dice per class" in printed
    assert json.loads(out.read_text())["details"]["resize"] == 0
    images = sorted(str(p) for p in (data / "val" / "images").iterdir())
    labels = sorted(str(p) for p in (data / "val" / "labels").iterdir())
    assert cli.main(["segment", "--base", "tiny", "--adapter", str(root / "no_decoder"), *images, "--boxes-from",
                     *labels, "--out", str(tmp_path / "seg"), "--resize", "128"]) == 0
    assert 128 in seen
    for stem, label_path in zip(("img0", "img1"), labels):
        assert tifffile.imread(tmp_path / "seg" / f"{stem}_boxes.tif").shape == tifffile.imread(label_path).shape
