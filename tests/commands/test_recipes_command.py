"""`hf-sam-peft recipes` (the recipes inside the package), recipes by name, `--version`, and `--data DIR` for
`train` / `evaluate` / `segment`: the layout chosen as the demo chooses it, and one line for a folder in the
wrong layout. Everything here stops before training or loading a model except one short evaluation."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import tifffile

from hf_sam_peft.cli import main as cli_main
from hf_sam_peft.data.recipes import RECIPES_DIR, find_recipe, list_recipes, load_dataset_recipe
from tests.conftest import shared_dataset
from tests.test_cli import one_error_line

DSB = "dsb2018_stage1test_fluo_nuclei"
HC18 = "hc18_fetal_head_ultrasound"


def test_recipes_live_inside_the_package():
    import hf_sam_peft

    assert RECIPES_DIR == Path(hf_sam_peft.__file__).resolve().parent / "recipes"
    kinds = list_recipes()
    assert {"livecell", "smoke_tiny", "folder_tiles", "folder_resize"} <= set(kinds["training"])
    assert {"datasets/livecell", "datasets/folder_tiles"} <= set(kinds["datasets"])
    assert "studies/smoke_tiny" in kinds["studies"] and "accelerate/cpu_ddp" in kinds["accelerate"]
    assert not (RECIPES_DIR.parents[1] / "recipes").exists(), "one copy of the recipes: inside the package"


def test_recipes_command_lists_shows_and_locates(capsys):
    assert cli_main(["recipes"]) == 0
    listing = capsys.readouterr().out
    for name in ("smoke_tiny", "datasets/papila", "studies/lite_medsam_2d", "accelerate/multi_gpu"):
        assert f"  {name} " in listing
    assert "LIVECell: phase-contrast images" in listing  # each with its description
    assert cli_main(["recipes", "show", "datasets/papila"]) == 0
    assert capsys.readouterr().out == (RECIPES_DIR / "datasets" / "papila.yaml").read_text()
    assert cli_main(["recipes", "path", "accelerate/cpu_ddp"]) == 0
    assert capsys.readouterr().out.strip() == str(RECIPES_DIR / "accelerate" / "cpu_ddp.yaml")
    line = one_error_line(capsys, ["recipes", "show", "nope"])
    assert "unknown recipe 'nope'; the package ships: amd_sd" in line and "accelerate/cpu_ddp" in line


def test_version(capsys):
    import hf_sam_peft

    with pytest.raises(SystemExit) as info:
        cli_main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"hf-sam-peft {hf_sam_peft.__version__}"


def test_recipes_by_name_and_by_path(tmp_path):
    assert find_recipe("livecell") == RECIPES_DIR / "livecell.yaml"
    assert find_recipe("datasets/livecell", "datasets") == find_recipe("livecell", "datasets")
    assert find_recipe("smoke_tiny", "studies") == RECIPES_DIR / "studies" / "smoke_tiny.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text("dataset: livecell\n")
    assert find_recipe(own) == own
    with pytest.raises(FileNotFoundError, match=r"recipes/smoke_tiny.yaml does not exist \(the package ships a "
                                                r"training recipe of that name: pass 'smoke_tiny'\)"):
        find_recipe("recipes/smoke_tiny.yaml")  # the path before the recipes moved into the package
    with pytest.raises(ValueError, match=r"unknown training recipe 'nope' \(known: \[.*'livecell'"):
        find_recipe("nope")
    with pytest.raises(ValueError, match="unknown study"):
        find_recipe("../livecell", "studies")  # names stay inside the package's folder of that kind


def test_packaged_roots_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    """Never to the package (site-packages holds no data); a copy of one's own: relative to the copy."""
    monkeypatch.chdir(tmp_path)
    assert load_dataset_recipe("livecell")["root"] == str(tmp_path / "data" / "livecell")
    copy = tmp_path / "elsewhere" / "livecell.yaml"
    copy.parent.mkdir()
    copy.write_text((RECIPES_DIR / "datasets" / "livecell.yaml").read_text())
    assert load_dataset_recipe(copy)["root"] == str(copy.parent / "data" / "livecell")


def _train_args(*argv: str) -> argparse.Namespace:
    from hf_sam_peft.train import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("name, layout", [(DSB, "tiles"), (HC18, "resize")])
def test_train_data_uses_the_recipe_the_layout_picks(name, layout):
    from hf_sam_peft.train import recipe_from_args

    data = shared_dataset(name)
    recipe, line = recipe_from_args(_train_args("--data", str(data), "--model", "tiny"))
    assert line.startswith(f"data layout: {layout} (median ") and f"folder_{layout}" in line
    assert recipe.name == name and recipe.path == RECIPES_DIR / f"folder_{layout}.yaml"
    spec = recipe.dataset
    assert spec["root"] == str(data.resolve()) and spec["name"] == name
    assert spec.get("resize_inputs", False) is (layout == "resize")
    assert spec["label_mode"] == ("semantic" if layout == "resize" else "instances")
    # --resize / --patches choose instead of the data
    recipe, line = recipe_from_args(_train_args("--data", str(data), "--patches"))
    assert recipe.path.stem == "folder_tiles" and "--patches given" in line
    # a recipe and --data: the recipe's settings on the folder
    recipe, _ = recipe_from_args(_train_args("papila", "--data", str(data)))
    assert recipe.name == "papila" and recipe.dataset["root"] == str(data.resolve())
    assert recipe.dataset["metric"] == "dice"


def test_train_needs_a_recipe_or_data(capsys):
    line = one_error_line(capsys, ["train"])
    assert "train needs a RECIPE (a name from 'hf-sam-peft recipes' or a YAML path) or --data DIR" in line


def test_a_folder_in_the_wrong_layout_is_one_line(tmp_path, capsys):
    split = tmp_path / "mine" / "train"
    for folder in ("images", "labels"):
        (split / folder).mkdir(parents=True)
    line = one_error_line(capsys, ["train", "--data", str(split)])
    assert line.endswith(
        f"--data {split}: expected the layout <split>/images + <split>/labels with the split folder train/ "
        "(train/images + train/labels); "
        f"found images/, labels/ (this looks like one split: pass {split.parent} if it is train/ of a dataset)"
    )
    (tmp_path / "flat" / "pictures").mkdir(parents=True)
    (tmp_path / "flat" / "notes.txt").write_text("")
    line = one_error_line(capsys, ["evaluate", "--base", "tiny", "--data", str(tmp_path / "flat")])
    assert line.endswith("with the split folder val/ (val/images + val/labels); found notes.txt, pictures/")
    line = one_error_line(capsys, ["segment", "--base", "tiny", "--data", str(tmp_path / "flat"), "--out",
                                   str(tmp_path / "seg")])
    assert "found notes.txt, pictures/" in line
    line = one_error_line(capsys, ["segment", "--base", "tiny", "--out", str(tmp_path / "seg")])
    assert line.endswith("segment needs IMAGE files or --data DIR")
    image = tmp_path / "a.tif"
    tifffile.imwrite(image, np.zeros((8, 8), np.uint8))
    line = one_error_line(capsys, ["segment", "--base", "tiny", str(image), "--data", str(tmp_path / "flat"),
                                   "--out", str(tmp_path / "seg")])
    assert "pass IMAGE files or --data, not both" in line


def test_evaluate_data_scores_a_medical_folder_as_train_would_serve_it(tmp_path, capsys, monkeypatch):
    """HC18 (one head per image): resized whole, scored per class by Dice, without any flag; a flag wins."""
    from hf_sam_peft.evaluation import resized

    data = shared_dataset(HC18)
    seen: list[int] = []
    original = resized.ResizedPredictor.set_image
    monkeypatch.setattr(resized.ResizedPredictor, "set_image", lambda self, image: (seen.append(self.target),
                                                                                  original(self, image))[1])
    assert cli_main(["evaluate", "--model", "tiny", "--data", str(data), "--mode", "interactive", "--max-images", "1",
                     "--n-corrections", "0", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("data layout: resize, as train --data would serve")
    assert "scoring: semantic classes" in printed and " dice " in printed and seen == [256]
    seen.clear()
    assert cli_main(["evaluate", "--model", "tiny", "--data", str(data), "--mode", "interactive", "--max-images", "1",
                     "--n-corrections", "0", "--no-progress", "--label-mode", "instances"]) == 0
    printed = capsys.readouterr().out
    assert "data layout" not in printed and " msa " in printed and not seen


@pytest.mark.parametrize("recorded", [True, False])
def test_evaluate_serves_the_data_as_the_adapter_was_trained(tmp_path, capsys, monkeypatch, recorded):
    """An adapter that records resize_inputs (train writes it) decides the layout over the folder's guess: DSB
    nuclei (tiles by their look) resized for an adapter trained resized, HC18 (resize by its look) per object for
    one trained on patches."""
    import torch
    from transformers import SamModel

    import hf_sam_peft
    from hf_sam_peft.evaluation import resized
    from hf_sam_peft.hub import recorded_resize_inputs, save_adapter
    from hf_sam_peft.modeling.sam import tiny_sam_config

    data = shared_dataset(DSB if recorded else HC18)
    torch.manual_seed(0)
    model = hf_sam_peft.apply_method(SamModel(tiny_sam_config()), "freeze_encoder")
    adapter = save_adapter(model, tmp_path / "adapter", base_model_id="tiny", method="freeze_encoder",
                           extra={"resize_inputs": recorded})
    assert recorded_resize_inputs(adapter) is recorded
    seen: list[int] = []
    original = resized.ResizedPredictor.set_image
    monkeypatch.setattr(resized.ResizedPredictor, "set_image", lambda self, image: (seen.append(self.target),
                                                                                  original(self, image))[1])
    assert cli_main(["evaluate", "--model", "tiny", "--adapter", str(adapter), "--data", str(data), "--mode",
                     "interactive", "--max-images", "1", "--n-corrections", "0", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    served = "resized whole images" if recorded else "patches"
    assert printed.startswith(f"data layout: the adapter was trained on {served}")
    assert (" dice " in printed and seen == [256]) if recorded else (" msa " in printed and not seen)
