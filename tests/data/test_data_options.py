"""DataOptions: one checked object for how a folder becomes rows, built from a recipe plus overrides and accepted
by every builder (the loose keyword arguments still work, applied on top)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hf_sam_peft.data import (
    VAL_FRACTION,
    DataOptions,
    build_dataset,
    find_pairs,
    holdout_split,
    iter_rows,
    load_dataset_recipe,
    train_val_datasets,
)
from tests.conftest import shared_dataset

DSB = "dsb2018_stage1test_fluo_nuclei"


def test_defaults_are_the_references():
    options = DataOptions()
    # micro-sam's training CLI holds out 10 %; torch_em's default 2D augmentation is the two flips (no 90° turns)
    assert VAL_FRACTION == options.val_fraction == 0.1 and options.augment == "flips"
    assert options.training_min_num_instances == 2  # torch_em MinInstanceSampler(): background + one object
    assert DataOptions(augment=None).augment == "flips"  # train_val_datasets(augment=None) always meant flips


def test_from_recipe_takes_the_recipe_then_the_overrides():
    recipe = load_dataset_recipe("folder_tiles")
    options = DataOptions.from_recipe(recipe, patch_shape=[256, 256], seed=4, root="/ignored")
    assert options.patch_shape == (256, 256) and options.seed == 4  # a YAML list becomes the tuple
    assert (options.min_size, options.min_num_instances, options.sampler_min_size, options.augment) == (25, 3, 25, "flips")
    resize = DataOptions.from_recipe(load_dataset_recipe("folder_resize"))
    assert resize.resize_inputs and resize.resize_to == 512 and resize.augment == "none" and resize.label_mode == "semantic"
    assert DataOptions.from_recipe({**recipe, "val_fraction": 0.3}).val_fraction == 0.3  # a dataset recipe's own key
    assert json.loads(json.dumps(options.to_dict()))["patch_shape"] == [256, 256]
    assert options.replace(augment="none").augment == "none" and options.augment == "flips"  # frozen: a copy


@pytest.mark.parametrize(
    "fields, error, message",
    [
        (dict(patch_shape=(0, 5)), ValueError, "patch_shape: expected None or two positive ints"),
        (dict(patch_shape="64"), ValueError, "patch_shape"),
        (dict(min_size=True), ValueError, "min_size: expected an int >= 0"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(max_attempts=0), ValueError, "max_attempts"),
        (dict(augment="rotate"), ValueError, "augment: expected one of"),
        (dict(val_fraction=1.0), ValueError, r"val_fraction: expected a float in \(0, 1\)"),
        (dict(val_split=""), ValueError, "val_split"),
        (dict(label_mode="boxes"), ValueError, "label_mode"),
        (dict(random_train="yes"), TypeError, "random_train: expected True or False"),
        (dict(label_transform=3), TypeError, "label_transform"),
        (dict(n_patches_per_image=2), ValueError, "n_patches_per_image: needs a patch_shape"),
        (dict(patch_shape=(64, 32), resize_inputs=True), ValueError, "resize_inputs: needs a square patch_shape"),
    ],
)
def test_bad_options_are_one_line_errors_naming_the_option(fields, error, message):
    with pytest.raises(error, match=message) as info:
        DataOptions(**fields)
    assert "\n" not in str(info.value)


def test_unknown_names_and_a_stray_positional_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown data option 'patch' \\(known: patch_shape, "):
        DataOptions.from_mapping({"patch": 3})
    with pytest.raises(ValueError, match="unknown data option 'nope'"):
        DataOptions().replace(nope=1)
    with pytest.raises(TypeError, match=r"train_val_datasets: unexpected options \['nope'\]"):
        train_val_datasets(tmp_path, nope=1)
    # the old second positional of train_val_datasets was val_fraction: a float there is refused, not misread
    with pytest.raises(TypeError, match="options: expected a DataOptions or None, got float"):
        train_val_datasets(tmp_path, 0.2)


def test_an_options_object_and_loose_keywords_give_the_same_rows(tmp_path):
    root = shared_dataset(DSB)
    options = DataOptions(patch_shape=(128, 128), n_patches_per_image=2, min_num_instances=3, seed=3)
    loose = build_dataset(root, "val", patch_shape=(128, 128), n_patches_per_image=2, min_num_instances=3, seed=3,
                          cache_dir=tmp_path / "a")
    packed = build_dataset(root, "val", options, cache_dir=tmp_path / "b")
    assert [r["id"] for r in loose] == [r["id"] for r in packed]
    for a, b in zip(loose, packed):
        np.testing.assert_array_equal(a["image"], b["image"])
    # keywords apply on top of an options object
    reseeded = build_dataset(root, "val", options, seed=4, cache_dir=tmp_path / "b")
    assert [r["id"] for r in reseeded] != [r["id"] for r in packed]
    assert [r["id"] for r in iter_rows(root, "val", options)] == [r["id"] for r in packed]


def test_options_that_change_no_row_reuse_the_cached_table(tmp_path):
    root = shared_dataset(DSB)
    options = DataOptions(patch_shape=(128, 128), min_size=5)
    first = build_dataset(root, "val", options, cache_dir=tmp_path)
    other_training = build_dataset(root, "val", options.replace(augment="none", val_fraction=0.3, max_attempts=9),
                                   cache_dir=tmp_path)
    other_rows = build_dataset(root, "val", options.replace(min_size=6), cache_dir=tmp_path)
    assert first.cache_files == other_training.cache_files and first.cache_files != other_rows.cache_files


def test_the_holdout_uses_the_options_fraction_and_a_single_image_may_go_without(tmp_path):
    root = shared_dataset(DSB)  # 7 training images: a tenth holds out one, a half four
    for fraction, n_val in ((0.1, 1), (0.5, 4)):
        splits = train_val_datasets(root, DataOptions(patch_shape=(256, 256), val_split=None, val_fraction=fraction),
                                    cache_dir=tmp_path)
        _, held = holdout_split(find_pairs(root, "train"), fraction, 0)
        assert len(held) == n_val and {str(r["source"]) for r in splits["val"]} == {str(p.image_path) for p in held}
        assert len(splits["train"].slice_ids) == 7 - n_val
    import tifffile

    from hf_sam_peft.data import DataError

    one = tmp_path / "one"
    for folder in ("images", "labels"):
        (one / "train" / folder).mkdir(parents=True)
    labels = np.zeros((48, 64), np.int32)
    labels[5:15, 5:15], labels[20:40, 30:50] = 1, 2
    tifffile.imwrite(one / "train" / "images" / "a.tif", (labels * 60).astype(np.uint8))
    tifffile.imwrite(one / "train" / "labels" / "a.tif", labels)
    with pytest.raises(DataError, match="cannot hold out validation data from 1 file"):
        train_val_datasets(one, min_size=0, cache_dir=tmp_path)
    alone = train_val_datasets(one, min_size=0, cache_dir=tmp_path, allow_no_val=True)  # the demo's single image
    assert alone["val"] is None and alone["train"][0]["labels"].max() == 2
