"""A full disk: every writer goes to a temporary name and renames, and ENOSPC becomes one line, ``no space left
writing FILE; nothing was changed``, with the old file or folder untouched and no temporary left behind.
`evaluate` keeps each finished image in a journal beside its table, so that a full disk or a crash at any
point loses at most the image in progress and a rerun takes the finished ones from it.

Where an unprivileged user namespace is allowed (``unshare -rm``), the disk is really full: a small tmpfs
mounted in a child process and filled up. Elsewhere, and for the command-level cases, the OSError(ENOSPC)
the kernel would give is injected into the real write path (the write call under the temporary name) and
the test says so.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from hf_sam_peft import cli

REPO = Path(__file__).resolve().parents[2]
N_IMAGES = 2  # real dsb2018 crops (all the validation split offers with enough nuclei)


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _tiny_lora(seed: int):
    from hf_sam_peft.methods import apply_method
    from hf_sam_peft.modeling.base_models import load_base_model

    torch.manual_seed(seed)
    model = apply_method(load_base_model("tiny")[0], "lora", r=2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()  # weights that differ from seed to seed
    return model


# ---------------------------------------------------------------------------------------- injected ENOSPC


def test_adapter_save_on_a_full_disk_changes_nothing(tmp_path, monkeypatch):
    """INJECTED: peft's safetensors write of the new adapter writes part of the file, then fails with ENOSPC."""
    import peft.peft_model

    from hf_sam_peft.atomic import NoSpaceLeft
    from hf_sam_peft.hub import save_adapter

    out = save_adapter(_tiny_lora(0), tmp_path / "adapter", base_model_id="tiny")
    before = _digest(out)

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # the half-written file a full disk leaves
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full_disk)
    with pytest.raises(NoSpaceLeft) as caught:
        save_adapter(_tiny_lora(1), out, base_model_id="tiny", overwrite=True)
    assert str(caught.value) == f"no space left writing {out}; nothing was changed"  # today: [Errno 28] ...
    assert _digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary or .old folder left


def test_safetensors_own_error_for_a_full_disk_is_recognised(tmp_path, monkeypatch):
    """INJECTED: safetensors reports ENOSPC as SafetensorError('... No space left on device (os error 28)')."""
    from safetensors import SafetensorError

    from hf_sam_peft.atomic import NoSpaceLeft, atomic_write

    target = tmp_path / "unetr.safetensors"
    target.write_bytes(b"old")

    def write(tmp):
        Path(tmp).write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with pytest.raises(NoSpaceLeft, match=f"no space left writing {target}; nothing was changed"):
        atomic_write(target, write)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["unetr.safetensors"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tests.evaluation.test_interactive_eval import small_rows

    root = tmp_path_factory.mktemp("full_disk") / "mini"
    (root / "val" / "images").mkdir(parents=True)
    (root / "val" / "labels").mkdir(parents=True)
    for i, row in enumerate(small_rows(N_IMAGES)):
        Image.fromarray(row["image"]).save(root / "val" / "images" / f"img{i}.png")
        tifffile.imwrite(root / "val" / "labels" / f"img{i}.tif", row["labels"].astype(np.uint16))
    return root


def _evaluate(data: Path, out: Path, method: str = "base") -> int:
    return cli.main([
        "evaluate", "--base", "tiny", "--data", str(data), "--label-mode", "instances", "--mode", "interactive",
        "--n-corrections", "1", "--out", str(out), "--method", method, "--no-progress",
    ])


@pytest.fixture
def set_image_calls(monkeypatch):
    """How many images the evaluation really ran (SamPredictor.set_image: one per image)."""
    from hf_sam_peft.evaluation.predictor import SamPredictor

    calls = []
    original = SamPredictor.set_image

    def counting(self, image, *args, **kwargs):
        calls.append(1)
        if getattr(counting, "fail_at", None) == len(calls):
            raise RuntimeError("killed in the middle of this image")
        return original(self, image, *args, **kwargs)

    monkeypatch.setattr(SamPredictor, "set_image", counting)
    return counting, calls


def _rows(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_evaluate_on_a_full_disk_keeps_the_table_and_the_finished_images(data, tmp_path, monkeypatch, capsys, set_image_calls):
    """INJECTED: the write of the results table's temporary file fails with ENOSPC."""
    _, calls = set_image_calls
    fresh = tmp_path / "fresh.csv"
    assert _evaluate(data, fresh) == 0
    out = tmp_path / "results.csv"
    assert _evaluate(data, out, method="earlier") == 0  # the user's table, holding an earlier row
    before = out.read_bytes()
    capsys.readouterr()

    original = Path.write_text

    def full_disk(self, *args, **kwargs):
        if self.name.startswith(".results.csv.") and self.name.endswith(".tmp"):
            original(self, "method,po", encoding="utf-8")  # half of it, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    calls.clear()
    assert _evaluate(data, out) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f"hf-sam-peft evaluate: error: no space left writing {out}; nothing was changed"
    assert out.read_bytes() == before and len(calls) == N_IMAGES
    (journal,) = tmp_path.glob(".results.csv.*.partial.jsonl")  # today: the scored images are lost
    assert len(journal.read_text().splitlines()) == 1 + N_IMAGES  # settings, then one line per image

    monkeypatch.setattr(Path, "write_text", original)  # space freed: the rerun takes every image from the journal
    calls.clear()
    assert _evaluate(data, out) == 0
    assert calls == [] and not journal.exists()
    rows = {line.split(",")[1]: line.split(",", 2)[2] for line in _rows(out)[1:]}
    fresh_rows = {line.split(",")[1]: line.split(",", 2)[2] for line in _rows(fresh)[1:]}
    assert rows == {"earlier": fresh_rows["base"], "base": fresh_rows["base"]}


KILLED_EVALUATION = textwrap.dedent("""
    import os, signal, sys
    from hf_sam_peft import cli
    from hf_sam_peft.evaluation.predictor import SamPredictor

    calls, original = [], SamPredictor.set_image

    def set_image(self, image, *args, **kwargs):
        calls.append(1)
        if len(calls) == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)  # a real kill in the middle of this image
        return original(self, image, *args, **kwargs)

    SamPredictor.set_image = set_image
    cli.main({argv!r})
""")


def test_a_killed_evaluation_loses_only_the_image_in_progress(data, tmp_path, set_image_calls):
    """REAL: a child process running `evaluate` is SIGKILLed while it scores the last image."""
    _, calls = set_image_calls
    fresh = tmp_path / "fresh.csv"
    assert _evaluate(data, fresh) == 0
    out = tmp_path / "results.csv"
    argv = [
        "evaluate", "--base", "tiny", "--data", str(data), "--label-mode", "instances", "--mode", "interactive",
        "--n-corrections", "1", "--out", str(out), "--method", "base", "--no-progress",
    ]
    child = subprocess.run([sys.executable, "-c", KILLED_EVALUATION.format(kill_at=N_IMAGES, argv=argv)], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -9, child.stderr[-2000:]
    assert not out.exists()
    calls.clear()
    assert _evaluate(data, out) == 0
    assert len(calls) == 1  # today: every image again (the finished ones come from the journal)
    assert _rows(out) == _rows(fresh)


def test_a_journal_of_other_settings_is_not_taken(data, tmp_path, set_image_calls):
    counting, calls = set_image_calls
    out = tmp_path / "results.csv"
    counting.fail_at = N_IMAGES
    with pytest.raises(RuntimeError):
        _evaluate(data, out)
    counting.fail_at = None
    calls.clear()
    assert cli.main([
        "evaluate", "--base", "tiny", "--data", str(data), "--label-mode", "instances", "--mode", "interactive",
        "--n-corrections", "2", "--out", str(out), "--no-progress",
    ]) == 0
    assert len(calls) == N_IMAGES  # other n_corrections: every image runs again


# ---------------------------------------------------------------------------------------- a real full disk


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None or sys.platform != "linux":
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


REAL_FULL_DISK = textwrap.dedent("""
    import errno, hashlib, json, os, subprocess, sys
    from pathlib import Path
    import torch
    from hf_sam_peft.atomic import NoSpaceLeft
    from hf_sam_peft.evaluation.results import ResultsTable
    from hf_sam_peft.hub import save_adapter
    sys.path.insert(0, {repo!r})
    from tests.reliability.test_disk_full import _digest, _tiny_lora

    disk = Path({disk!r})
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], check=True)
    adapter = save_adapter(_tiny_lora(0), disk / "adapter", base_model_id="tiny")
    table = ResultsTable([{{"dataset": "d", "method": "m", "point": 0.5}}]).write(disk / "results.csv")
    before = _digest(disk)
    with open(disk / "filler", "wb", buffering=0) as f:  # fill the disk up to the last byte
        for size in (1 << 16, 1 << 12, 1 << 8, 1):
            try:
                while True:
                    f.write(b"\\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    before["filler"] = _digest(disk)["filler"]
    messages = []
    for write in (
        lambda: save_adapter(_tiny_lora(1), adapter, base_model_id="tiny", overwrite=True),
        lambda: ResultsTable([{{"dataset": "d", "method": f"m{{i}}", "point": 0.1}} for i in range(2000)]).write(table),
    ):
        try:
            write()
            messages.append("no error")
        except NoSpaceLeft as exc:
            messages.append(str(exc))
        except BaseException as exc:
            messages.append(f"{{type(exc).__name__}}: {{exc}}")
    print(json.dumps({{"messages": messages, "unchanged": _digest(disk) == before,
                      "entries": sorted(os.listdir(disk))}}))
""")


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="no unprivileged user namespace here to mount a small tmpfs")
def test_a_real_full_disk(tmp_path):
    """REAL: a 4 MiB tmpfs filled to the last block; the adapter and the table are written again."""
    disk = tmp_path / "disk"
    disk.mkdir()
    script = REAL_FULL_DISK.format(repo=str(REPO), disk=str(disk))
    done = subprocess.run(["unshare", "-rm", sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["messages"] == [  # today: a SafetensorError traceback; a bare OSError
        f"no space left writing {disk / 'adapter'}; nothing was changed",
        f"no space left writing {disk / 'results.csv'}; nothing was changed",
    ]
    assert report["unchanged"] and report["entries"] == ["adapter", "filler", "results.csv"]
