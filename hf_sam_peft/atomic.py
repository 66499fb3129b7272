"""Atomic file and folder writes: readers see the old content or the complete new one, never half of it.

The temporary file or folder is created with the mode a plain `open(path, "w")` / `os.mkdir(path)` asks for
(0o666 / 0o777), so the kernel applies the process umask (and any default ACL of the parent folder) exactly as
for a plain write. `tempfile.mkstemp` / `mkdtemp` would create 0o600 / 0o700 instead, and the rename would carry
that private mode to the final path. The umask is never read or changed: `os.umask(0)`-then-restore would
briefly give every other thread of the process a zero umask, and /proc/self/status is Linux-only.
Replacing an existing file keeps that file's permission bits, as writing it in place with `open(path, "w")` would.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_FILE_FLAGS = (
    os.O_WRONLY | os.O_CREAT | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
)
_ATTEMPTS = 100


def _temporary_name(parent: Path, name: str, suffix: str) -> Path:
    return parent / f".{name}.{secrets.token_hex(4)}{suffix}"


def _create_file(parent: Path, name: str, suffix: str) -> Path:
    """A new empty file beside `name`, created with mode 0o666 (less the umask, as `open(..., "w")`)."""
    for _ in range(_ATTEMPTS):
        tmp = _temporary_name(parent, name, suffix)
        try:
            os.close(os.open(tmp, _FILE_FLAGS, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"could not create a temporary file in {str(parent)!r} after {_ATTEMPTS} attempts")


def _create_folder(parent: Path, name: str, suffix: str) -> Path:
    """A new empty folder beside `name`, created with mode 0o777 (less the umask, as `os.mkdir`)."""
    for _ in range(_ATTEMPTS):
        tmp = _temporary_name(parent, name, suffix)
        try:
            os.mkdir(tmp, 0o777)
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"could not create a temporary folder in {str(parent)!r} after {_ATTEMPTS} attempts")


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call `write(tmp_path)` on a temporary file beside `path`, then rename it into place.

    The result has the permissions `open(path, "w")` would give it: the umask's for a new file, the old file's
    permission bits when `path` already exists.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_file(path.parent, path.name, ".tmp")
    try:
        write(str(tmp))
        try:
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode) & 0o777)
        except FileNotFoundError:
            pass  # a new file: keep the mode the umask gave it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


@contextmanager
def atomic_folder(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `out_dir`; on success it replaces `out_dir` by renames.

    A non-empty existing `out_dir` is an error unless `overwrite`; a file at `out_dir` always is. The folder
    gets the permissions `os.mkdir(out_dir)` would give it (0o777 less the umask).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir must be a folder, but {out_dir} is a file")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"out_dir {out_dir} exists and is not empty; pass overwrite=True to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_folder(out_dir.parent, out_dir.name, ".tmp")
    try:
        yield tmp
        old = None
        if out_dir.exists():
            old = _create_folder(out_dir.parent, out_dir.name, ".old")
            os.replace(out_dir, old / "folder")
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
