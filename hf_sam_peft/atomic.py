"""Atomic file and folder writes: readers see the old content or the complete new one, never half of it.

The temporary file or folder is created with the mode a plain `open(path, "w")` / `os.mkdir(path)` asks for
(0o666 / 0o777), so the kernel applies the process umask (and any default ACL of the parent folder) exactly as
for a plain write. `tempfile.mkstemp` / `mkdtemp` would create 0o600 / 0o700 instead, and the rename would carry
that private mode to the final path. The umask is never read or changed: `os.umask(0)`-then-restore would
briefly give every other thread of the process a zero umask, and /proc/self/status is Linux-only.
Replacing an existing file keeps that file's permission bits, as writing it in place with `open(path, "w")` would.

A full disk (ENOSPC / EDQUOT, also when a writer reports it in its own exception type, as safetensors' Rust
writer or torch's stream writer do) removes the temporary file or folder and raises :class:`NoSpaceLeft`,
one line: ``no space left writing FILE; nothing was changed`` (true: the old content is untouched).

`atomic_folder` replaces an existing folder by two renames (old away, new in). A process killed between them
leaves the folder only in its hidden ``.NAME.XXXX.old/folder``; :func:`recover_folder`, called by every
`atomic_folder` and by the adapter loaders, puts it back before anything reads or replaces the folder.
"""

from __future__ import annotations

import errno
import glob
import os
import secrets
import shutil
import stat
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# O_EXCL: never reuse an existing name (another writer's temporary, or a planted file); O_NOFOLLOW: never write
# through a symlink planted at the name; O_CLOEXEC: the fd is not inherited by child processes (loader workers)
_FILE_FLAGS = (
    os.O_WRONLY | os.O_CREAT | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
)
# 4 random bytes per name: collisions are rare, so 100 failed tries end the loop instead of spinning
_ATTEMPTS = 100
# EDQUOT is missing on some platforms (Windows): fall back to ENOSPC alone
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
# how writers that wrap the OS error in their own exception say it: the OS text, Rust's io::ErrorKind
_NO_SPACE_TEXT = ("no space left on device", "disk quota exceeded", "storagefull", "os error 28")


class NoSpaceLeft(OSError):
    """The disk (or quota) filled up while writing `filename`; nothing was changed (errno ENOSPC)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.message = f"no space left writing {os.fspath(path)}; nothing was changed"
        super().__init__(self.message)
        self.errno = errno.ENOSPC
        self.filename = os.fspath(path)

    def __str__(self) -> str:  # OSError's own would be "[Errno 28] None: 'PATH'"
        return self.message

    def __reduce__(self):
        return type(self), (self.filename,)


def is_no_space(exc: BaseException, folder: str | os.PathLike | None = None) -> bool:
    """Whether `exc` (or an exception it was raised from) is a full disk or quota.

    A writer that says nothing recognisable (torch's ``file write failed``) counts when `folder`'s file system
    has no space left for this user now.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    # `seen` stops at a cause/context chain that loops back on itself
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _NO_SPACE_ERRNOS:
            return True
        if any(text in str(current).lower() for text in _NO_SPACE_TEXT):
            return True
        # the explicit cause (raise ... from) first, else the implicit context
        current = current.__cause__ or current.__context__
    # torch's stream writer raises RuntimeError("file write failed"), with no errno
    if folder is not None and isinstance(exc, (OSError, RuntimeError)):
        try:
            # f_bavail: blocks available to unprivileged users, so a root reserve left over still reads as full
            return os.statvfs(folder).f_bavail == 0
        # AttributeError: no os.statvfs on Windows
        except (OSError, AttributeError):
            return False
    return False


def _no_space_as_error(create: Callable[[], Path], path: Path) -> Path:
    """`create()` (a temporary file or folder), a full disk there being :class:`NoSpaceLeft` for `path`."""
    try:
        return create()
    except OSError as exc:
        if is_no_space(exc):
            raise NoSpaceLeft(path) from exc
        raise


def _backups(out_dir: Path) -> list[Path]:
    """The hidden `.NAME.XXXX.old` folders `atomic_folder` moves a replaced folder into, oldest first."""
    # glob.escape: a folder name with [ ] * ? must match itself only
    found = [Path(p) for p in glob.glob(os.path.join(glob.escape(str(out_dir.parent)), f".{glob.escape(out_dir.name)}.*.old"))]
    # symlinks are skipped: recovery renames and deletes, never through a link someone planted; mtime order puts the
    # newest replaced content last
    return sorted((p for p in found if p.is_dir() and not p.is_symlink()), key=lambda p: p.stat().st_mtime_ns)


def recover_folder(out_dir: str | os.PathLike) -> bool:
    """Undo a replacement of `out_dir` that a kill interrupted; True when the folder was put back.

    Killed between `atomic_folder`'s two renames, `out_dir` is missing and its previous content sits in
    ``.NAME.XXXX.old/folder``: it is renamed back (a note on stderr says so; the save did not finish, so the
    folder is what it was before it) and the unfinished new one, ``.NAME.XXXX.tmp``, removed. Killed after
    the second rename, the old copy is left over beside the new folder: it is removed, as the save would have
    done.
    """
    out_dir = Path(out_dir)
    if not out_dir.name or not out_dir.parent.is_dir():
        return False
    backups = [b for b in _backups(out_dir) if (b / "folder").is_dir()]
    if not backups:
        return False
    recovered = False
    # a dangling symlink at out_dir still occupies the name: nothing is renamed over it
    if not (out_dir.exists() or out_dir.is_symlink()):
        # the newest backup holds the content that was in place when the interrupted save began
        os.replace(backups[-1] / "folder", out_dir)
        print(f"note: recovered {out_dir} from an interrupted save (it was left in {backups[-1]})", file=sys.stderr)
        recovered = True
    for backup in backups:
        # the unfinished .tmp of the same save shares the backup's token (see atomic_folder)
        shutil.rmtree(backup.with_name(backup.name[: -len(".old")] + ".tmp"), ignore_errors=True)
        shutil.rmtree(backup, ignore_errors=True)
    return recovered


def _temporary_name(parent: Path, name: str, suffix: str) -> Path:
    return parent / f".{name}.{secrets.token_hex(4)}{suffix}"


def _create_file(parent: Path, name: str, suffix: str) -> Path:
    """A new empty file beside `name`, created with mode 0o666 (less the umask, as `open(..., "w")`)."""
    for _ in range(_ATTEMPTS):
        tmp = _temporary_name(parent, name, suffix)
        try:
            # closed at once: writers (safetensors, torch.save) open the path themselves
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
    tmp = _no_space_as_error(lambda: _create_file(path.parent, path.name, ".tmp"), path)
    try:
        write(str(tmp))
        try:
            # before the rename, so the final path never shows the temporary's mode; & 0o777 keeps the permission
            # bits only (no setuid / setgid / sticky)
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode) & 0o777)
        except FileNotFoundError:
            pass  # a new file: keep the mode the umask gave it
        os.replace(tmp, path)
    # BaseException: Ctrl-C inside `write` removes the temporary as well
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        # a NoSpaceLeft from `write` is already in its final form: do not wrap it twice
        if not isinstance(exc, NoSpaceLeft) and is_no_space(exc, path.parent):
            raise NoSpaceLeft(path) from exc
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


@contextmanager
def atomic_folder(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `out_dir`; on success it replaces `out_dir` by renames.

    A non-empty existing `out_dir` is an error unless `overwrite`; a file at `out_dir` always is. The folder
    gets the permissions `os.mkdir(out_dir)` would give it (0o777 less the umask). A full disk while the
    body writes is :class:`NoSpaceLeft` naming `out_dir` (the old folder is untouched).
    """
    out_dir = Path(out_dir)
    # first: a half-done earlier replacement must be undone before out_dir's emptiness is judged
    recover_folder(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir must be a folder, but {out_dir} is a file")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"out_dir {out_dir} exists and is not empty; pass overwrite=True to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _no_space_as_error(lambda: _create_folder(out_dir.parent, out_dir.name, ".tmp"), out_dir)
    try:
        try:
            yield tmp
        except BaseException as exc:
            if is_no_space(exc, out_dir.parent):
                raise NoSpaceLeft(out_dir) from exc
            raise
        old = None
        if out_dir.exists():
            # mkdir fails when the name is taken, where a rename onto an empty folder of that name would silently
            # replace it
            old = tmp.with_name(tmp.name[: -len(".tmp")] + ".old")  # the same token: recover_folder pairs them
            os.mkdir(old, 0o777)
            # the backup is complete once `folder` exists inside it: recover_folder only restores backups that have it
            os.replace(out_dir, old / "folder")
        # out_dir is gone at this point, so this rename cannot meet a non-empty target
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old)
    finally:
        # after a successful rename tmp no longer exists; on any failure the half-written folder goes
        if tmp.exists():
            shutil.rmtree(tmp)
