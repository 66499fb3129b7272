"""One run at a time per output folder: a second `train` / `evaluate` / `study` / `segment` into a folder a live
process holds fails at once, in one line naming the folder and the holder's PID; a lock a SIGKILLed run left
is taken over with a note. The holders are real processes (``python -c`` taking the lock, then waiting)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hf_sam_peft import cli

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="fcntl.flock")

REPO = Path(__file__).resolve().parents[2]


class Reached(Exception):
    """The command got past the lock into its real work (stubbed out: the test is about the lock)."""


def _hold(folder: Path, target: Path | None = None) -> subprocess.Popen:
    """A real second process that takes the lock of `folder` (or of the results file `target`) and waits."""
    # run_lock.py loaded on its own (it imports nothing of the package): the holder starts in a blink
    code = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("run_lock", {str(REPO / "hf_sam_peft" / "run_lock.py")!r})
        run_lock = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(run_lock)
        with run_lock.output_lock({str(folder)!r}, target={None if target is None else str(target)!r}):
            print("locked", flush=True)
            sys.stdin.read()
    """)
    holder = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def _release(holder: subprocess.Popen) -> None:
    holder.stdin.close()
    assert holder.wait(timeout=30) == 0


def _error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def stub_work(monkeypatch):
    """Every command's first step of real work raises Reached."""
    from hf_sam_peft import train
    from hf_sam_peft.evaluation import predictor
    from hf_sam_peft.study import runner

    def reached(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(train, "build_datasets", reached)
    monkeypatch.setattr(predictor, "load_model", reached)
    monkeypatch.setattr(runner, "_finished", reached)


def _commands(tmp_path: Path) -> dict[str, tuple[list[str], Path, Path | None]]:
    """command -> (argv, folder to lock, results file locked instead of the folder)."""
    data = tmp_path / "data"
    for split in ("val",):
        (data / split / "images").mkdir(parents=True)
        (data / split / "labels").mkdir(parents=True)
    out = tmp_path / "shared_out"
    return {
        "train": (["train", "smoke_tiny", "--output-dir", str(out)], out, None),
        "evaluate": (
            ["evaluate", "--base", "tiny", "--data", str(data), "--label-mode", "instances", "--out", str(out / "results.csv")],
            out, out / "results.csv",
        ),
        "segment": (["segment", str(tmp_path / "a.png"), "--base", "tiny", "--out", str(out)], out, None),
        "study": (["study", "smoke_tiny", "--output-dir", str(out)], out, None),
    }


@pytest.mark.parametrize("command", ["train", "evaluate", "segment", "study"])
def test_a_second_run_into_a_held_folder_fails_at_once(command, tmp_path, stub_work, capsys):
    argv, folder, target = _commands(tmp_path)[command]
    holder = _hold(folder, target)
    try:
        assert cli.main(argv) == 2  # today: both runs go on (here: Reached, the work began)
        line = _error_line(capsys)
        assert f"PID {holder.pid}" in line
        assert str(target if target is not None else folder) in line and "in use by another hf-sam-peft run" in line
    finally:
        _release(holder)
    # the holder gone (its lock released and removed), the same command gets past the lock
    with pytest.raises(Reached):
        cli.main(argv)
    assert not any(p.name.endswith(".lock") for p in folder.iterdir())


def test_evaluations_into_other_tables_of_one_folder_run_side_by_side(tmp_path, stub_work):
    argv, folder, _ = _commands(tmp_path)["evaluate"]
    holder = _hold(folder, folder / "other.csv")
    try:
        with pytest.raises(Reached):
            cli.main(argv)
    finally:
        _release(holder)


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_note(tmp_path, stub_work, capsys):
    argv, folder, _ = _commands(tmp_path)["train"]
    holder = _hold(folder)
    os.kill(holder.pid, signal.SIGKILL)  # a real kill: no cleanup ran, the lock file still names the PID
    holder.wait(timeout=30)
    lock = folder / ".hf_sam_peft.lock"
    assert lock.read_text().split()[0] == str(holder.pid)
    with pytest.raises(Reached):  # the run goes on
        cli.main(argv)
    err = capsys.readouterr().err
    assert f"took over the stale lock of output folder {folder} left by PID {holder.pid} (no longer running)" in err
    assert not lock.exists()


def test_the_lock_is_exclusive_between_two_live_processes(tmp_path):
    """Two real processes race for one folder: exactly one holds it, the other is told who."""
    from hf_sam_peft.run_lock import FolderInUse, output_lock

    folder = tmp_path / "out"
    holder = _hold(folder)
    try:
        with pytest.raises(FolderInUse, match=rf"output folder {folder} is in use .*PID {holder.pid}"):
            with output_lock(folder):
                pass
    finally:
        _release(holder)
    with output_lock(folder) as path:
        assert path.read_text().split()[0] == str(os.getpid())


def test_other_ddp_ranks_take_no_lock(tmp_path, monkeypatch):
    """Ranks > 0 of one DDP run share rank 0's folder: they must not fail on its lock."""
    from hf_sam_peft.run_lock import is_main_process, output_lock

    monkeypatch.setenv("RANK", "1")
    assert not is_main_process()
    holder = _hold(tmp_path / "out")
    try:
        with output_lock(tmp_path / "out", enabled=is_main_process()) as path:
            assert path is None
    finally:
        _release(holder)
