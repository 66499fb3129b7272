"""Atomic writes end with the permissions a plain open(..., "w") / mkdir gives under the current umask, and
leave nothing behind when the write fails."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from hf_sam_peft.atomic import atomic_folder, atomic_write, atomic_write_text

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    previous = os.umask(request.param)  # the test process is single-threaded here
    try:
        yield request.param
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _plain_modes(tmp_path: Path) -> tuple[int, int]:
    """What open(..., "w") and mkdir give under the current umask."""
    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain_dir").mkdir()
    return _mode(tmp_path / "plain.txt"), _mode(tmp_path / "plain_dir")


def test_files_get_the_umask_permissions(umask, tmp_path):
    file_mode, _ = _plain_modes(tmp_path)
    assert file_mode == 0o666 & ~umask
    path = atomic_write_text(tmp_path / "sub" / "a.json", "{}")
    assert _mode(path) == file_mode and path.read_text() == "{}"
    other = atomic_write(tmp_path / "b.bin", lambda tmp: Path(tmp).write_bytes(b"\0"))
    assert _mode(other) == file_mode


def test_folders_and_their_files_get_the_umask_permissions(umask, tmp_path):
    file_mode, dir_mode = _plain_modes(tmp_path)
    assert dir_mode == 0o777 & ~umask
    with atomic_folder(tmp_path / "adapter") as tmp:
        atomic_write_text(tmp / "config.json", "{}")
        (tmp / "weights.bin").write_bytes(b"\0")
    out = tmp_path / "adapter"
    assert _mode(out) == dir_mode
    assert {p.name: _mode(p) for p in out.iterdir()} == {"config.json": file_mode, "weights.bin": file_mode}
    with atomic_folder(out, overwrite=True) as tmp:  # replacing a folder: the new one is a fresh mkdir
        atomic_write_text(tmp / "config.json", "{}")
    assert _mode(out) == dir_mode and [p.name for p in out.iterdir()] == ["config.json"]


def test_replacing_a_file_keeps_its_permissions_as_open_w_does(umask, tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("old")
    os.chmod(path, 0o640)
    atomic_write_text(path, "new")
    assert _mode(path) == 0o640 and path.read_text() == "new"


def test_failed_writes_leave_nothing(tmp_path):
    def fail(tmp):
        Path(tmp).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(tmp_path / "a.txt", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_folder(tmp_path / "folder") as tmp:
            fail(tmp / "x")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "a.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(tmp_path / "a.txt", fail)
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"] and (tmp_path / "a.txt").read_text() == "old"
