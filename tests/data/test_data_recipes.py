"""Dataset recipes: every shipped YAML loads, and bad recipes fail with the file and key named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hf_sam_peft.data import build_dataset, dataset_kwargs, load_dataset_recipe
from hf_sam_peft.data.recipes import RECIPE_DIR
from tests.conftest import SHARED_DATA, shared_dataset

PAPER_MICROSCOPY = ["covid_if", "hpa", "gonuclear", "orgasegment", "platynereis_cilia", "mitolab", "livecell"]
PAPER_MEDICAL = ["amd_sd", "jsrt", "mice_tumseg", "papila", "motum", "psfhs"]
LOCAL = [
    "dsb2018_stage1test_fluo_nuclei",
    "usiigaci_phase_contrast_cells",
    "hc18_fetal_head_ultrasound",
    "drosophila_vnc_sstem_mito_3d",
]
VOLUMES = {"gonuclear", "platynereis_cilia", "mitolab", "mice_tumseg", "motum", "drosophila_vnc_sstem_mito_3d"}


def test_every_shipped_recipe_loads_with_the_paper_settings():
    names = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
    assert names == sorted(PAPER_MICROSCOPY + PAPER_MEDICAL + LOCAL)
    for name in names:
        recipe = load_dataset_recipe(name)
        assert recipe["name"] == name and Path(recipe["root"]).is_absolute()
        assert recipe["dimensions"] == (3 if name in VOLUMES else 2)
        if name in PAPER_MICROSCOPY + PAPER_MEDICAL:
            expected_shape = (520, 704) if name == "livecell" else (512, 512)
            assert recipe["patch_shape"] == expected_shape and recipe["obtain"].strip()
            medical = name in PAPER_MEDICAL
            assert recipe["ais"] is not medical
            assert recipe["label_mode"] == ("semantic" if medical else "instances")
            assert recipe["metric"] == ("dice" if medical else "msa")


def test_local_recipes_point_at_shared_data():
    for name in LOCAL:
        recipe = load_dataset_recipe(name)
        assert Path(recipe["root"]) == (SHARED_DATA / name).resolve()
    assert load_dataset_recipe("hc18_fetal_head_ultrasound")["label_mode"] == "semantic"


def test_recipe_builds_a_dataset(tmp_path):
    shared_dataset("hc18_fetal_head_ultrasound")
    recipe = load_dataset_recipe("hc18_fetal_head_ultrasound")
    ds = build_dataset(**dataset_kwargs(recipe), split="val", max_images=1, cache_dir=tmp_path)
    row = ds[0]
    assert row["image"].shape == (512, 512, 3) and row["labels"].max() >= 1
    assert np.array_equal(row["semantic"] > 0, row["labels"] > 0)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


VALID = (
    "name: x\nroot: data/x\nmodality: ultrasound\npatch_shape: [64, 64]\nlabel_mode: semantic\nmin_size: 5\n"
    "ais: false\n"
)


def test_recipe_by_path_resolves_relative_root(tmp_path):
    recipe = load_dataset_recipe(write(tmp_path / "x.yaml", VALID))
    assert recipe["root"] == str((tmp_path / "data" / "x").resolve()) and recipe["patch_shape"] == (64, 64)
    (tmp_path / "proj" / "recipes" / "datasets").mkdir(parents=True)
    nested = load_dataset_recipe(write(tmp_path / "proj" / "recipes" / "datasets" / "x.yaml", VALID))
    assert nested["root"] == str((tmp_path / "proj" / "data" / "x").resolve())


@pytest.mark.parametrize(
    "text, message",
    [
        (VALID + "patch_size: [1, 2]\n", r"unknown keys \['patch_size'\]"),
        (VALID.replace("min_size: 5\n", ""), r"missing keys \['min_size'\]"),
        (VALID.replace("ais: false", "ais: 1"), "ais must be bool"),
        (VALID.replace("min_size: 5", "min_size: true"), "min_size must be int"),
        (VALID.replace("[64, 64]", "[64]"), "patch_shape must be two positive ints"),
        (VALID.replace("semantic", "boxes"), "label_mode must be one of"),
        (VALID + "metric: f1\n", "metric must be one of"),
        ("- a\n- b\n", "expected a mapping"),
    ],
)
def test_bad_recipes_name_the_file_and_key(tmp_path, text, message):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ValueError, match=message) as info:
        load_dataset_recipe(path)
    assert str(path) in str(info.value)


def test_unknown_recipe_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown dataset recipe 'nope'.*livecell"):
        load_dataset_recipe("nope")
    with pytest.raises(FileNotFoundError):
        load_dataset_recipe("/nonexistent/recipe.yaml")
    with pytest.raises(TypeError):
        load_dataset_recipe(3)
