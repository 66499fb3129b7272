"""benchmarks/multiclass_medical_set.py: the grey / white matter set built from the ICBM152 files in nilearn's wheel."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "multiclass_medical_set.py"
_spec = importlib.util.spec_from_file_location("bench_multiclass_medical_set", _SCRIPT)
mcs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mcs)


def _build(out: Path, **kwargs) -> list[dict]:
    """Build the set, or skip when its source (the nilearn distribution's template files) is absent or other."""
    try:
        return mcs.build(out, **kwargs)
    except mcs.SourceMissing as err:
        pytest.skip(f"source of the multi-class set not installed ({err})")
    except mcs.SourceMismatch as err:
        pytest.skip(f"installed nilearn ships other template files than the set was made from ({err})")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("mcs") / "set"
    return out, _build(out)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_splits_and_manifest(built):
    from PIL import Image
    import tifffile

    out, manifest = built
    assert sorted(p.name for p in out.iterdir()) == ["SOURCE.md", "manifest.json", "test", "train", "val"]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    counts = {s: sum(m["split"] == s for m in manifest) for s in ("train", "val", "test")}
    assert counts == {"train": 9, "val": 3, "test": 3}
    for split in counts:
        ids = sorted(m["id"] for m in manifest if m["split"] == split)
        assert sorted(p.stem for p in (out / split / "images").iterdir()) == ids
        assert sorted(p.name for p in (out / split / "labels").iterdir()) == [f"{i}.tif" for i in ids]
    for m in manifest:
        with Image.open(out / m["split"] / "images" / f"{m['id']}.png") as img:
            assert img.mode == "L" and img.size == (197, 233)
            image = np.asarray(img)
        labels = tifffile.imread(out / m["split"] / "labels" / f"{m['id']}.tif")
        assert labels.dtype == np.uint8 and labels.shape == image.shape == tuple(m["shape"]) == (233, 197)
        # every class present in every slice, at the fraction the manifest gives; nothing but 0, 1, 2
        assert set(np.unique(labels).tolist()) == {0, 1, 2}
        assert m["n_classes"] == 2 and m["classes"] == {"1": "grey matter", "2": "white matter"}
        for c in (1, 2):
            frac = float((labels == c).mean())
            assert frac >= 0.02 and abs(frac - m["class_frac"][str(c)]) < 1e-4
        assert abs(float((labels > 0).mean()) - m["foreground_frac"]) < 1e-4
        # labels lie on the brain: tissue only where the (skull-stripped) T1 is non-zero, mostly bright there
        assert not (labels[image == 0] > 0).any()
        assert image[labels == 2].mean() > image[labels == 1].mean()  # T1: white matter brighter than grey
        assert m["mni_z_mm"] == m["slice_index"] - 72


def test_splits_share_no_neighbouring_slices(built):
    _, manifest = built
    z = {s: [m["slice_index"] for m in manifest if m["split"] == s] for s in ("train", "val", "test")}
    for a in z:
        for b in z:
            if a < b:
                gap = min(abs(i - j) for i in z[a] for j in z[b])
                assert gap >= 6, (a, b, gap)
    every = sorted(i for zs in z.values() for i in zs)
    # each split spans inferior to superior levels, not one block of the brain
    for zs in z.values():
        assert min(zs) < every[len(every) // 3] and max(zs) > every[2 * len(every) // 3]


def test_source_md_names_origin_licence_and_processing(built):
    out, manifest = built
    text = (out / "SOURCE.md").read_text()
    for needle in ("nilearn==", "McConnell Brain Imaging Centre", "Permission to use, copy, modify, and distribute",
                   "doi:10.1016/j.neuroimage.2010.07.033", "axial", "1 = grey matter", "2 = white matter",
                   *mcs.KNOWN_SHA256.values(), *(m["id"] for m in manifest)):
        assert needle in text, needle


def test_deterministic(built, tmp_path):
    out, manifest = built
    again = tmp_path / "again"
    assert _build(again) == manifest
    assert _files(again) == _files(out)  # byte for byte, SOURCE.md and manifest.json included


def test_refuses_a_non_empty_folder_unless_overwrite(built, tmp_path):
    out, manifest = built
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        mcs.build(target)
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    assert mcs.main([str(target)]) == 2
    (target / "train").mkdir()
    (target / "train" / "stale.png").write_bytes(b"x")
    assert _build(target, overwrite=True) == manifest
    assert (target / "keep.txt").read_text() == "mine"  # only the set's own entries are replaced
    assert not (target / "train" / "stale.png").exists()
    assert _files(target) == {**_files(out), "keep.txt": b"mine"}
    assert not [p for p in target.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_cli_builds_into_an_empty_folder(built, tmp_path, capsys):
    out, _ = built
    target = tmp_path / "cli"
    code = mcs.main([str(target)])  # the fixture has built the set, so its source is there
    assert code == 0 and "train 9, val 3, test 3" in capsys.readouterr().out
    assert _files(target) == _files(out)


def test_reads_back_through_the_package_as_semantic_labels(built):
    from hf_sam_peft.data import build_dataset, find_pairs

    out, manifest = built
    for split in ("train", "val", "test"):
        pairs = find_pairs(out, split)
        assert [p.id for p in pairs] == sorted(m["id"] for m in manifest if m["split"] == split)
    rows = build_dataset(out, "val", label_mode="semantic", min_size=0, cache_dir=str(out.parent / "cache"))
    assert len(rows) == 3
    for i in range(len(rows)):
        row = rows[i]
        semantic = np.asarray(row["semantic"])
        assert semantic.shape == (233, 197) and set(np.unique(semantic).tolist()) == {0, 1, 2}
        assert np.asarray(row["image"]).shape == (233, 197, 3)


def test_volumes_read_as_nibabel_stores_them():
    nibabel = pytest.importorskip("nibabel")
    try:
        _, paths = mcs.source_files()
    except mcs.SourceMissing as err:
        pytest.skip(str(err))
    for path in paths.values():
        ours = mcs.read_volume(path)
        theirs = np.asanyarray(nibabel.load(path).dataobj)
        assert ours.dtype == theirs.dtype == np.uint8 and np.array_equal(ours, theirs)


def test_tissue_labels_rule():
    gm = np.array([200, 100, 100, 60, 0, 128], np.uint8)
    wm = np.array([50, 100, 120, 60, 0, 127], np.uint8)
    # background = 255 - gm - wm: 5, 55, 35, 135, 255, 0
    assert mcs.tissue_labels(gm, wm).tolist() == [1, 1, 2, 0, 0, 1]


def test_a_multi_class_set_trains_and_scores_end_to_end(built, tiny_sam, tmp_path):
    """Resize mode + semantic labels on the real two-class set: a tiny SAM trains two interactive steps on
    the resized whole slices, then is scored at the original size with Dice per class (grey, white matter)."""
    from hf_sam_peft.data import iter_rows, train_val_datasets
    from hf_sam_peft.evaluation.interactive import evaluate_interactive
    from hf_sam_peft.evaluation.predictor import SamPredictor
    from hf_sam_peft.evaluation.resized import ResizedPredictor
    from hf_sam_peft.methods import apply_method
    from hf_sam_peft.training.trainer import InteractiveTrainingArguments, SamInteractiveTrainer

    root, _ = built
    size = tiny_sam.config.vision_config.image_size
    splits = train_val_datasets(
        root, patch_shape=(size, size), resize_inputs=True, label_mode="semantic", min_size=0, augment="none",
        cache_dir=tmp_path / "cache", max_images=2,
    )
    sample = splits["train"][0]
    assert sample["image"].shape == (size, size, 3) and set(np.unique(sample["semantic"])) >= {1, 2}
    model = apply_method(tiny_sam, "lora", r=2)
    args = InteractiveTrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=1, per_device_eval_batch_size=1,
        n_objects=4, n_sub_iterations=2, eval_strategy="steps", eval_steps=2, save_strategy="no",
        load_best_model_at_end=False, report_to="none", use_cpu=True, disable_tqdm=True, plot_loss_curve=False,
        learning_rate=1e-3,
    )
    trainer = SamInteractiveTrainer(model, args=args, train_dataset=splits["train"], eval_dataset=splits["val"])
    trainer.train()
    assert np.isfinite(trainer.state.log_history[-1]["train_loss"])
    assert any("eval_dice_box" in entry for entry in trainer.state.log_history)  # validated on resized slices

    rows = list(iter_rows(root, "test", min_size=0, label_mode="semantic", max_images=1))
    result = evaluate_interactive(
        ResizedPredictor(SamPredictor(trainer.model.eval()), size), rows, n_corrections=1, progress=False,
    )
    assert result["scoring"] == "semantic"
    assert set(result["dice_per_class"]["box"]) == {1, 2}
    assert result["images"][0]["id"] == rows[0]["id"] and rows[0]["labels"].shape == (233, 197)
    assert all(0.0 <= v <= 1.0 for v in result["dice_per_class"]["ib"].values())
