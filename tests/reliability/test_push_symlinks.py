"""`push` uploads only regular files inside the adapter folder: a real symlink among its repo files (to a file
outside, or a linked `unetr/` folder) is refused in one line before anything is read or uploaded, and a real
push lists what it uploads, as `--dry-run` does."""

from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="symlinks")


class RecordingHfApi:
    """The two HfApi calls push makes (no network): what reached the "Hub"."""

    instances: list["RecordingHfApi"] = []

    def __init__(self, token=None):
        self.uploaded: list[str] | None = None
        RecordingHfApi.instances.append(self)

    def create_repo(self, repo_id, exist_ok=False, private=False, repo_type=None):
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, commit_message, repo_type, allow_patterns):
        import fnmatch
        from pathlib import Path

        root = Path(folder_path)
        self.uploaded = sorted(
            p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and any(fnmatch.fnmatchcase(p.relative_to(root).as_posix(), a) for a in allow_patterns)
        )
        return None


@pytest.fixture
def adapter(tmp_path):
    from hf_sam_peft.hub import save_adapter
    from hf_sam_peft.methods import apply_method
    from hf_sam_peft.modeling.base_models import load_base_model
    from hf_sam_peft.modeling.unetr import attach_unetr

    torch.manual_seed(0)
    base = load_base_model("tiny")[0]
    attach_unetr(base, features=(32, 16, 8, 8))
    return save_adapter(apply_method(base, "lora", r=2), tmp_path / "adapter", base_model_id="tiny")


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub

    RecordingHfApi.instances.clear()
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    return RecordingHfApi.instances


def _push(argv: list[str], capsys) -> tuple[int, str, str]:
    from hf_sam_peft import cli

    code = cli.main(["push", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_symlink_to_a_file_outside_is_refused(adapter, tmp_path, hub, capsys):
    secret = tmp_path / "elsewhere" / "secret.safetensors"
    secret.parent.mkdir()
    shutil.move(adapter / "adapter_model.safetensors", secret)  # a valid weights file, only outside the folder
    os.symlink(secret, adapter / "adapter_model.safetensors")
    for flags in (["--dry-run"], []):
        code, out, err = _push([str(adapter), "org/name", *flags], capsys)
        assert code == 2, out  # today: listed and uploaded, content read through the link
        (line,) = err.strip().splitlines()
        assert f"{adapter / 'adapter_model.safetensors'} is a symlink (to {secret})" in line
        assert "push uploads only regular files inside" in line
    assert not any(api.uploaded for api in hub)


def test_a_linked_unetr_folder_is_refused(adapter, tmp_path, hub, capsys):
    shutil.move(adapter / "unetr", tmp_path / "outside_unetr")
    os.symlink(tmp_path / "outside_unetr", adapter / "unetr")
    code, out, err = _push([str(adapter), "org/name"], capsys)
    assert code == 2
    assert f"{adapter / 'unetr'} is a symlink" in err and not any(api.uploaded for api in hub)


def test_a_fifo_among_the_repo_files_is_refused(adapter, hub, capsys):
    (adapter / "README.md").unlink()
    os.mkfifo(adapter / "README.md")  # a read would block for ever
    code, _, err = _push([str(adapter), "org/name", "--dry-run"], capsys)
    assert code == 2 and f"{adapter / 'README.md'} is not a regular file" in err


def test_a_push_lists_what_it_uploads(adapter, hub, capsys):
    (adapter / "notes.txt").symlink_to("/etc/hostname")  # not a repo file: neither uploaded nor refused
    code, out, err = _push([str(adapter), "org/name"], capsys)
    assert code == 0, err
    (api,) = hub
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert f"uploading {len(api.uploaded)} files to org/name:" in out  # today: no list before the upload
    assert listed == api.uploaded and "adapter_model.safetensors" in listed and "notes.txt" not in listed
