"""Training data as torch_em serves it: random patches per fetch, MinInstanceSampler rule, flips, min_size."""

from __future__ import annotations

import re

import numpy as np
import pytest

from hf_sam_peft.data import (
    RandomPatchDataset,
    dataset_kwargs,
    default_augment,
    find_pairs,
    load_dataset_recipe,
    min_instance_ok,
    train_val_datasets,
    training_dataset,
)
from tests.conftest import shared_dataset

USIIGACI = "usiigaci_phase_contrast_cells"
HC18 = "hc18_fetal_head_ultrasound"
DSB = "dsb2018_stage1test_fluo_nuclei"
DROSOPHILA = "drosophila_vnc_sstem_mito_3d"
POSITION = re.compile(r"^(?P<base>.+)_y(?P<y>\d+)_x(?P<x>\d+)$")


def recipe_splits(name, tmp_path, **overrides):
    shared_dataset(name)
    kwargs = {**dataset_kwargs(load_dataset_recipe(name)), **overrides}
    return train_val_datasets(cache_dir=tmp_path, **kwargs)


@pytest.fixture(scope="module")
def usiigaci(tmp_path_factory):
    """Usiigaci's recipe (512 x 512, min_size 25, 10 label values, flips), two training images."""
    return recipe_splits(USIIGACI, tmp_path_factory.mktemp("usiigaci"), max_images=2, n_patches_per_image=4)


def test_min_instance_rule_counts_background_as_torch_em():
    labels = np.zeros((10, 10), np.int32)
    labels[:2, :2] = 1
    assert min_instance_ok(labels, 2)  # one object + background: torch_em's default MinInstanceSampler()
    assert not min_instance_ok(labels, 3)
    assert not min_instance_ok(np.zeros((4, 4), np.int32), 2)
    assert min_instance_ok(np.ones((4, 4), np.int32), 1)  # a patch full of one object: one label value
    labels[5:, 5:] = 2  # 25 px
    assert min_instance_ok(labels, 3) and not min_instance_ok(labels, 3, min_size=5)  # object 1 has 4 px
    assert min_instance_ok(labels, 2, min_size=25)  # background (71 px) + object 2 (25 px)


def test_patches_are_redrawn_per_sample_and_epoch_and_reproducible(usiigaci, tmp_path):
    train = usiigaci["train"]
    assert isinstance(train, RandomPatchDataset) and len(train) == 8
    first = [train[i] for i in range(len(train))]
    ids = [row["id"] for row in first]
    assert len(set(ids)) == len(ids)  # samples of one image get different positions
    again = [train[i] for i in range(len(train))]
    for a, b in zip(first, again):  # fetching again in the same epoch replays the same rows
        assert a["id"] == b["id"]
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
    train.set_epoch(1)
    assert train.epoch == 1
    assert [train[i]["id"] for i in range(len(train))] != ids  # a new epoch draws new patches
    train.set_epoch(0)
    # The same seed in a fresh build (no shared cache) gives identical rows; another seed other rows.
    other = recipe_splits(USIIGACI, tmp_path / "a", max_images=2, n_patches_per_image=4)["train"]
    row = other[3]
    assert row["id"] == first[3]["id"]
    np.testing.assert_array_equal(row["image"], first[3]["image"])
    np.testing.assert_array_equal(row["labels"], first[3]["labels"])
    reseeded = recipe_splits(USIIGACI, tmp_path / "b", max_images=2, n_patches_per_image=4, seed=1)["train"]
    assert [reseeded[i]["id"] for i in range(len(reseeded))] != ids
    with pytest.raises(ValueError, match="epoch"):
        train.set_epoch(-1)


def test_every_served_patch_satisfies_the_rule_and_min_size(usiigaci):
    train = usiigaci["train"]
    for epoch in range(3):
        train.set_epoch(epoch)
        for i in range(len(train)):
            row = train[i]
            assert row["image"].shape == (512, 512, 3) and row["image"].dtype == np.uint8
            labels = row["labels"]
            assert labels.dtype == np.int32 and labels.shape == (512, 512)
            assert min_instance_ok(labels, 10)  # usiigaci's recipe: 10 label values incl. background
            n = int(labels.max())
            assert np.array_equal(np.unique(labels), np.arange(n + 1))
            assert np.bincount(labels.ravel())[1:].min() >= 25  # recipe's min_size
            match = POSITION.match(row["id"])
            assert 0 <= int(match["y"]) <= 1022 - 512 and 0 <= int(match["x"]) <= 1024 - 512
    train.set_epoch(0)


def test_flips_for_microscopy_none_for_medical(tmp_path):
    # Whole-image patches of one dsb image (256 x 256 = the patch): the only change between fetches is the flip.
    dsb = recipe_splits(DSB, tmp_path / "dsb", max_images=1, n_patches_per_image=40)["train"]
    assert dsb.augment == "flips"
    base = dsb.slices[0]
    raw = np.asarray(base["image"]).reshape(tuple(base["image_shape"]))
    seen = set()
    for i in range(len(dsb)):
        image = dsb[i]["image"][..., 0]
        for flips, candidate in {
            (False, False): raw, (True, False): raw[:, ::-1], (False, True): raw[::-1], (True, True): raw[::-1, ::-1]
        }.items():
            if np.array_equal(image, candidate):
                seen.add(flips)
                break
        else:
            raise AssertionError("served image is not a flip of the source")
    assert seen == {(False, False), (True, False), (False, True), (True, True)}
    # patches of a medical set (its recipe resizes whole images; patches here to see every crop unflipped)
    hc18 = recipe_splits(HC18, tmp_path / "hc18", max_images=1, n_patches_per_image=12, resize_inputs=False)["train"]
    assert hc18.augment == "none"
    base = hc18.slices[0]
    raw = np.asarray(base["image"]).reshape(tuple(base["image_shape"]))
    for i in range(len(hc18)):
        row = hc18[i]
        y, x = (int(v) for v in POSITION.match(row["id"]).group("y", "x"))
        np.testing.assert_array_equal(row["image"][..., 0], raw[y : y + 512, x : x + 512])  # never flipped
    assert default_augment("fluorescence microscopy") == "flips" and default_augment("ultrasound") == "none"
    # as the recipe serves it: the whole image, resized, never flipped (the same row on every fetch)
    whole = recipe_splits(HC18, tmp_path / "hc18_whole", max_images=1)["train"]
    assert whole.augment == "none" and len(whole) == 1
    first, again = whole[0], whole[0]
    np.testing.assert_array_equal(first["image"], again["image"])
    assert first["image"].shape == (512, 512, 3) and first["id"] == whole.slice_ids[0]


def test_min_size_removes_small_objects(tmp_path):
    small = recipe_splits(DSB, tmp_path / "a", max_images=1, min_size=0)["train"][0]["labels"]
    large = recipe_splits(DSB, tmp_path / "b", max_images=1, min_size=300)["train"][0]["labels"]
    assert int(large.max()) < int(small.max())
    assert np.bincount(large.ravel())[1:].min() >= 300
    assert np.bincount(small.ravel())[1:].min() < 300


def test_no_qualifying_patch_is_a_one_line_error(tmp_path):
    root = shared_dataset(HC18)
    train = training_dataset(find_pairs(root, "train")[:2], patch_shape=(512, 512), min_num_instances=3, max_attempts=20,
                             augment="none", cache_dir=tmp_path, name=str(root))
    with pytest.raises(ValueError) as info:
        train[0]
    message = str(info.value)
    assert "\n" not in message and "hc18_fetal_head_ultrasound" in message and "000_HC" in message
    assert ">= 3 label values" in message and "20 attempts" in message


def test_rejected_slices_hand_over_to_other_slices(tmp_path):
    # Drosophila slices hold 3-8 mitochondria and the patch is the whole slice: slices with fewer than 4
    # cannot qualify, so the sampler moves to other slices (as torch_em moves to another image).
    train = recipe_splits(DROSOPHILA, tmp_path, min_num_instances=8)["train"]
    for i in range(len(train)):
        assert min_instance_ok(train[i]["labels"], 8)
    assert len({train[i]["id"] for i in range(len(train))}) < len(train)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(min_num_instances=0), "min_num_instances"),
        (dict(sampler_min_size=-1), "sampler_min_size"),
        (dict(augment="rotate"), "augment"),
        (dict(min_size=True), "min_size"),
    ],
)
def test_bad_training_options_are_one_line_errors(tmp_path, overrides, message):
    shared_dataset(DSB)
    with pytest.raises(ValueError, match=message) as info:
        recipe_splits(DSB, tmp_path, max_images=1, **overrides)
    assert "\n" not in str(info.value)


def test_set_epoch_callback_reaches_the_dataset_under_ddp_too(usiigaci):
    """accelerate's DataLoaderShard skips dataset.set_epoch when the batch sampler is sharded (DDP); the
    callback passes the Trainer's epoch on at on_epoch_begin."""
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader
    from transformers import TrainerControl, TrainerState

    from hf_sam_peft.data.epoch import SetEpochCallback

    train = usiigaci["train"]
    loader = prepare_data_loader(DataLoader(train, batch_size=2, shuffle=True), num_processes=2, process_index=0,
                                 put_on_device=False, use_seedable_sampler=True)
    loader.set_epoch(3)
    assert train.epoch == 0  # the gap the callback closes
    callback = SetEpochCallback(train)
    for progress, expected in ((0.0, 0), (3.0, 3), (2.5, 2)):
        callback.on_epoch_begin(None, TrainerState(epoch=progress), TrainerControl())
        assert train.epoch == expected
    train.set_epoch(0)
    with pytest.raises(TypeError):
        SetEpochCallback(object())
