"""`output_lock(folder)`: one run at a time writes into an output folder (train, evaluate, study, segment).

Two runs into the same folder would each report success while one silently replaces the other's checkpoints,
adapter or results. The lock is `fcntl.flock` on a file inside the folder (`.hf_sam_peft.lock`, or
`.NAME.lock` beside one results file) holding the holder's PID and command line. The kernel drops a flock
when its process ends, however it ends, so a lock left by a killed run is always obtainable: it is taken
over with a note naming the dead PID. A live holder makes the second run fail at once, in one line naming
the folder and the PID. The file is unlinked on release while still locked; a process that opened it just
before checks after locking that it still holds the file at the path (else it retries), so two processes
never both believe they hold the lock.

POSIX only: where `fcntl` is missing (Windows) the lock is a no-op.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "FolderInUse", "is_main_process", "output_lock", "read_holder"]

LOCK_NAME = ".hf_sam_peft.lock"
# no O_TRUNC: a second run opening the file must not wipe the live holder's PID before its flock fails;
# O_NOFOLLOW: never lock or truncate through a symlink planted at the lock path
_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)


class FolderInUse(OSError):
    """Another live process holds the output lock (an OSError: the CLI prints it as one line, status 2)."""


def _alive(pid: int) -> bool:
    try:
        # signal 0 only checks that the process exists; nothing is sent
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def read_holder(path: str | os.PathLike) -> tuple[int | None, str]:
    """(PID, command line) recorded in a lock file; (None, "") when it is empty or unreadable."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None, ""
    first, _, rest = text.partition("\n")
    try:
        return int(first.strip()), rest.strip()
    except ValueError:
        return None, ""


def is_main_process() -> bool:
    """Whether this is the process that takes a run's lock: rank 0 under torchrun / accelerate launch (DDP
    ranks of one run share its output folder), or the only process."""
    # torchrun and accelerate launch set RANK for every process; a plain run has none
    return os.environ.get("RANK", "0") in ("", "0")


def _open_locked(path: Path, shown: str) -> int:
    """An fd of `path` holding an exclusive flock; FolderInUse when a live process holds it."""
    while True:
        fd = os.open(path, _FLAGS, 0o666)
        try:
            # LOCK_NB: a second run fails at once instead of waiting for the first to end
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid, command = read_holder(path)
            # an empty record: the holder has taken the flock but not yet written its PID (see output_lock)
            who = f"PID {pid}" if pid is not None else "a process that is just starting"
            what = f": {command}" if command else ""
            raise FolderInUse(
                f"{shown} is in use by another hf-sam-peft run ({who}{what}); wait for it to end or pass another folder"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:  # the holder before us may have unlinked the file between our open and our flock
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextmanager
def output_lock(
    folder: str | os.PathLike, target: str | os.PathLike | None = None, *, enabled: bool = True
) -> Iterator[Path | None]:
    """Hold the exclusive lock of output folder `folder` (created if needed) for the `with` body.

    Take it before anything is written or deleted there, after the command's checks of the folder.

    `target`: lock one file in the folder instead of the whole folder (a results table: evaluations writing
    other tables beside it run side by side). `enabled=False` takes no lock (DDP ranks other than 0).
    Yields the lock file's path (None when nothing was locked).
    """
    if not enabled or fcntl is None:
        yield None
        return
    folder = Path(folder)
    if target is None:
        path, shown = folder / LOCK_NAME, f"output folder {folder}"
    else:
        path, shown = folder / f".{Path(target).name}.lock", f"results file {target}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd: int | None = _open_locked(path, shown)
    except FolderInUse:
        raise
    except OSError:
        # a folder that cannot hold files (a file on its path, no permission, read-only): nothing can be written
        # there either, and the command's own check of the folder says so in its words
        fd = None
    if fd is None:
        yield None
        return
    try:
        pid, _ = read_holder(path)
        # the flock is ours now, so a PID on record (another process) is not holding it: dead, or its number reused
        if pid is not None and pid != os.getpid():
            state = "no longer running" if not _alive(pid) else "no longer holding it"
            print(f"note: took over the stale lock of {shown} left by PID {pid} ({state})", file=sys.stderr)
        # rewrite through the locked fd, in place: the lock belongs to this inode, a new file would not be locked
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n{' '.join(sys.argv)}\n".encode("utf-8", "replace"), 0)
        yield path
    finally:
        try:
            os.unlink(path)  # while still locked: see the module docstring
        except FileNotFoundError:
            pass
        os.close(fd)
