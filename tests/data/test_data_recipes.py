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
FOLDER = ["folder_tiles", "folder_resize"]  # what `train --data DIR` trains with
VOLUMES = {"gonuclear", "platynereis_cilia", "mitolab", "mice_tumseg", "motum", "drosophila_vnc_sstem_mito_3d"}


def test_every_shipped_recipe_loads_with_the_paper_settings():
    names = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
    assert names == sorted(PAPER_MICROSCOPY + PAPER_MEDICAL + LOCAL + FOLDER)
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


# peft-sam peft_sam/dataset/get_data_loaders.py: label-transform min_size / MinInstanceSampler(min_num_instances)
# (torch_em counts background among the label values: 2 = one object) / sampler min_size / augmentation.
PAPER_TRAINING_DATA = {
    "livecell": (25, 25, None, "flips"),
    "orgasegment": (5, 25, None, "flips"),
    "hpa": (5, 5, None, "flips"),
    "gonuclear": (5, 5, None, "flips"),
    "mitolab": (5, 5, None, "flips"),
    "platynereis_cilia": (3, 3, None, "flips"),
    "covid_if": (0, 2, None, "flips"),
    "amd_sd": (0, 2, 10, "none"),
    "jsrt": (0, 2, None, "none"),
    "mice_tumseg": (0, 2, 25, "none"),
    "papila": (0, 2, None, "none"),
    "motum": (0, 2, 50, "none"),
    "psfhs": (0, 2, None, "none"),
}


def test_recipes_carry_the_reference_training_data_settings():
    for name in PAPER_MICROSCOPY + PAPER_MEDICAL + LOCAL:
        text = (RECIPE_DIR / f"{name}.yaml").read_text()
        assert "\nmin_num_instances:" in text and "\naugment:" in text  # written out, not defaulted
        recipe = load_dataset_recipe(name)
        got = (recipe["min_size"], recipe["min_num_instances"], recipe.get("sampler_min_size"), recipe["augment"])
        if name in PAPER_TRAINING_DATA:
            assert got == PAPER_TRAINING_DATA[name], name
        assert recipe["augment"] == ("none" if recipe["metric"] == "dice" else "flips")
        assert {"min_num_instances", "augment"} <= set(dataset_kwargs(recipe))


def test_recipe_defaults_follow_the_modality(tmp_path):
    medical = load_dataset_recipe(write(tmp_path / "m.yaml", VALID))
    assert medical["augment"] == "none" and medical["min_num_instances"] == 2
    micro = load_dataset_recipe(write(tmp_path / "f.yaml", VALID.replace("ultrasound", "fluorescence microscopy")))
    assert micro["augment"] == "flips"


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
        (VALID + "min_num_instances: 0\n", "min_num_instances must be >= 1"),
        (VALID + "min_num_instances: 2.5\n", "min_num_instances must be int"),
        (VALID + "sampler_min_size: -3\n", "sampler_min_size must be >= 0"),
        (VALID + "augment: rotate90\n", "augment must be one of"),
        (VALID.replace("min_size: 5", "min_size: -1"), "min_size must be >= 0"),
    ],
)
def test_bad_recipes_name_the_file_and_key(tmp_path, text, message):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ValueError, match=message) as info:
        load_dataset_recipe(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_unknown_recipe_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown dataset recipe 'nope'.*livecell"):
        load_dataset_recipe("nope")
    with pytest.raises(FileNotFoundError):
        load_dataset_recipe("/nonexistent/recipe.yaml")
    with pytest.raises(TypeError):
        load_dataset_recipe(3)
