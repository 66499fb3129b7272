"""Damaged input files and values end in one line naming the file (and the line) or the setting, never a parser
traceback or a message without the file; nothing the user had is changed. Real damaged files on disk."""

from __future__ import annotations

import numpy as np
import pytest

from hf_sam_peft import cli


def _one_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_a_dataset_recipe_with_bad_yaml_names_the_file_and_line(tmp_path):
    from hf_sam_peft.data import load_dataset_recipe

    recipe = tmp_path / "mine.yaml"
    recipe.write_text("root: data\npatch_shape: [256, 256\nlabel_mode: instances\n")
    with pytest.raises(ValueError) as caught:  # today: yaml.parser.ParserError, a multi-line parser dump
        load_dataset_recipe(recipe)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"dataset recipe {recipe}: malformed YAML at line 3")


def test_a_dataset_recipe_that_is_not_utf8_names_the_file(tmp_path):
    from hf_sam_peft.data import load_dataset_recipe

    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("root: d\xe4ten\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"dataset recipe {recipe}: not UTF-8 text"):
        load_dataset_recipe(recipe)


def test_a_set_value_with_bad_yaml_names_the_setting(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "smoke_tiny", "--output-dir", str(out), "--set", "data.patch_shape=[64, 64"]) == 2
    line = _one_line(capsys)  # today: a yaml ParserError traceback
    assert "--set data.patch_shape=[64, 64: malformed YAML list or mapping" in line
    assert not out.exists()  # nothing was created


@pytest.fixture
def broken_adapter(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    config = folder / "adapter_config.json"
    config.write_text('{\n  "peft_type": "LORA",\n  "r": 4,,\n}\n')
    return folder, config


def test_evaluate_with_a_malformed_adapter_config_names_the_file_and_line(broken_adapter, tmp_path, capsys):
    folder, config = broken_adapter
    data = tmp_path / "data"
    (data / "val" / "images").mkdir(parents=True)
    (data / "val" / "labels").mkdir(parents=True)
    before = config.read_bytes()
    code = cli.main(["evaluate", "--base", "tiny", "--adapter", str(folder), "--data", str(data),
                     "--label-mode", "instances"])
    assert code == 2
    line = _one_line(capsys)  # today: "Expecting property name enclosed in double quotes: line 3 ..." without the file
    assert f"{config} is malformed JSON (line 3" in line
    assert config.read_bytes() == before


def test_the_app_reads_a_malformed_adapter_config_as_one_line(broken_adapter):
    from hf_sam_peft.app.models import recorded_base

    folder, config = broken_adapter
    with pytest.raises(ValueError, match=rf"{config} is malformed JSON \(line 3"):
        recorded_base(str(folder))


def test_a_damaged_cell_json_names_the_file_and_line(tmp_path, capsys):
    from hf_sam_peft.study.cell import SPEC_NAME, main

    cell = tmp_path / "cells" / "lora-s0"
    cell.mkdir(parents=True)
    (cell / SPEC_NAME).write_text('{"cell_id": "lora-s0",\n "method": "lora"')  # cut off by a crash
    assert main([str(cell)]) == 2
    line = _one_line(capsys)  # today: "Expecting ',' delimiter: line 2 column 18 (char 40)", no file named
    assert f"{cell / SPEC_NAME} is malformed JSON (line 2" in line


def test_a_study_with_a_damaged_cell_json_stops_before_touching_the_cell(tmp_path):
    from hf_sam_peft.data.recipes import find_recipe
    from hf_sam_peft.study import load_study
    from hf_sam_peft.study.cell import SPEC_NAME
    from hf_sam_peft.study.runner import CELLS, run_study, study_folder

    spec = load_study(find_recipe("smoke_tiny", "studies"))
    folder = tmp_path / "study"
    cell = folder / CELLS / spec.cells()[0].cell_id
    (cell / "run").mkdir(parents=True)
    (cell / "run" / "checkpoint-1").mkdir()
    (cell / SPEC_NAME).write_text("{\n")
    with pytest.raises(ValueError, match=rf"{cell / SPEC_NAME} is malformed JSON \(line 2"):
        run_study(spec, folder, isolate=False, progress=False)
    assert (cell / "run" / "checkpoint-1").is_dir() and (cell / SPEC_NAME).read_text() == "{\n"
    assert study_folder(spec, folder) == folder


def test_a_damaged_cell_result_names_the_file(tmp_path):
    from hf_sam_peft.data.recipes import find_recipe
    from hf_sam_peft.study import load_study
    from hf_sam_peft.study.cell import RESULT_NAME
    from hf_sam_peft.study.report import collect_records

    spec = load_study(find_recipe("smoke_tiny", "studies"))
    path = tmp_path / "cells" / spec.cells()[0].cell_id / RESULT_NAME
    path.parent.mkdir(parents=True)
    path.write_text('{"cell_id": 1,\n\n "scores": }')
    with pytest.raises(ValueError, match=rf"{path} is malformed JSON \(line 3"):
        collect_records(spec, tmp_path)


def test_a_results_json_that_is_not_utf8_names_the_file(tmp_path):
    from hf_sam_peft.evaluation.results import check_results_file

    table = tmp_path / "results.json"
    table.write_bytes(b'{"rows": ["\xff"]}')
    with pytest.raises(ValueError) as caught:  # today: UnicodeDecodeError, not a ValueError naming the file
        check_results_file(table)
    assert f"{table} is not a UTF-8 text file" in str(caught.value)
    assert table.read_bytes() == b'{"rows": ["\xff"]}'


# ------------------------------------------------------------------------------------------- image range


def test_images_near_the_float32_limits_keep_their_grey_levels():
    from hf_sam_peft.data.normalize import normalize_image

    ramp = np.linspace(-3e38, 3e38, 256, dtype=np.float32).reshape(16, 16)
    out = normalize_image(ramp)[..., 0].ravel()
    assert len(np.unique(out)) == 256  # today: 2 grey levels (hi - lo is inf in float32)
    assert out[0] == 0 and out[-1] == 255 and np.all(np.diff(out.astype(int)) >= 0)
    huge = np.array([[-1.7e308, 0.0], [1.0e308, 1.7e308]])  # float64 near its limits: hi - lo is inf there too
    assert normalize_image(huge)[..., 0].tolist() == [[0, 128], [202, 255]]  # 202.5 rounds to even
    assert normalize_image(ramp, percentiles=(0, 100))[..., 0].ravel().tolist() == out.tolist()


def test_ordinary_images_normalise_as_before():
    from hf_sam_peft.data.normalize import normalize_image

    image = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    assert normalize_image(image)[..., 0].tolist() == [[0, 64], [128, 255]]
    assert normalize_image(np.array([[0.0, 0.5], [0.25, 1.0]], dtype=np.float32))[..., 0].tolist() == [[0, 128], [64, 255]]
