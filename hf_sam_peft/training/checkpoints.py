"""Checkpoint integrity: a checkpoint counts only once it is complete, whole and finite.

:class:`~hf_sam_peft.training.trainer.SamInteractiveTrainer` writes ``checkpoint_complete.json`` last into
every checkpoint folder (:func:`mark_checkpoint_complete`): each file's size and SHA-256. A resume
(:func:`resolve_resume_checkpoint`) takes a checkpoint only when :func:`checkpoint_problem` finds nothing
wrong with it:

- the marker is there (a save killed half-way never wrote it) and readable;
- every recorded file is there with its recorded size and checksum (a truncated, overwritten or bit-flipped
  file is caught even when its size did not change);
- ``trainer_state.json`` parses, and every ``*.safetensors`` file and ``optimizer.pt`` hold finite numbers
  only (a checkpoint saved after the weights went NaN would otherwise resume into a run whose loss is NaN or
  0 forever).

A marker written before checksums existed (sizes only) is still accepted: its sizes are checked and the
files are scanned for non-finite values, so older runs resume as before.

The scheduler state is not scanned: ``ReduceLROnPlateau`` legitimately stores ``best = inf`` before its
first evaluation.

Verified once per process: a resume is checked by the command (``hf_sam_peft.train``, before data and model
are loaded) and again by ``SamInteractiveTrainer.train``, and the recorded best checkpoint is often the one
resumed from. Hashing a checkpoint reads every byte of it (gigabytes of optimizer state for ViT-H), so
:func:`checkpoint_problem` remembers each folder it found intact with a stat fingerprint of its files (name,
size, inode, mtime and ctime, in nanoseconds) and checks it again in full only when that changed. ``ctime``
cannot be set back from user space, so any write, replacement or ``os.utime`` since the check shows. A file
changed within the same timestamp tick as its last write would keep its stamps (Linux stamps files with a
coarse clock, ~4 ms), so a folder whose newest stamp is younger than :data:`SETTLED_SECONDS` is never
remembered (git's "racily clean" rule).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from hf_sam_peft.atomic import atomic_write_text

__all__ = [
    "CHECKPOINT_MARKER",
    "CheckpointError",
    "checkpoint_problem",
    "file_sha256",
    "latest_intact_checkpoint",
    "list_checkpoints",
    "mark_checkpoint_complete",
    "non_finite_tensor",
    "resolve_resume_checkpoint",
]

CHECKPOINT_MARKER = "checkpoint_complete.json"  # written last: a checkpoint without it is damaged
OPTIMIZER_NAME = "optimizer.pt"  # transformers' OPTIMIZER_NAME
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
_CHUNK = 1 << 20
SETTLED_SECONDS = 2.0
"""A checkpoint whose newest file stamp is younger than this is checked in full every time (module notes); 2 s
also covers filesystems with 2-second stamps (FAT)."""
_INTACT: dict[str, tuple] = {}  # realpath -> stat fingerprint of a folder found intact (module notes)
_INTACT_LIMIT = 16  # a process resumes from a handful of checkpoints; the oldest entry goes first
# the trainer's logger: the notes about skipped checkpoints belong to the training log
logger = logging.getLogger("hf_sam_peft.training.trainer")


class CheckpointError(OSError):
    """A checkpoint could not be written (full disk, ...); the message names the folder."""


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 1 MiB chunks (a checkpoint's optimizer state can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _checkpoint_files(folder: Path) -> dict[str, int]:
    """``{relative path: size}`` of every file in a checkpoint folder but the marker."""
    return {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name != CHECKPOINT_MARKER
    }


def mark_checkpoint_complete(folder: str | os.PathLike) -> Path:
    """Write the completeness marker (every file's size and SHA-256) into a fully written checkpoint folder,
    atomically."""
    folder = Path(folder)
    files = _checkpoint_files(folder)
    sha256 = {name: file_sha256(folder / name) for name in files}
    # atomic: a crash while writing leaves no marker rather than a partial one, so the folder reads as unfinished
    return atomic_write_text(folder / CHECKPOINT_MARKER, json.dumps({"files": files, "sha256": sha256}, indent=1))


def non_finite_tensor(tensors: Any, prefix: str = "") -> str | None:
    """The name of the first floating-point tensor (or float) holding NaN or inf in a nested dict / list of
    tensors (an optimizer's ``state_dict()``), or None when all are finite."""
    if isinstance(tensors, torch.Tensor):
        # integer tensors (step counters) cannot hold NaN / inf
        if tensors.is_floating_point() or tensors.is_complex():
            return None if bool(torch.isfinite(tensors).all()) else prefix or "tensor"
        return None
    if isinstance(tensors, float):
        return None if math.isfinite(tensors) else prefix or "value"
    if isinstance(tensors, dict):
        items = tensors.items()
    elif isinstance(tensors, (list, tuple)):
        items = enumerate(tensors)
    else:
        return None
    for key, value in items:
        found = non_finite_tensor(value, f"{prefix}.{key}" if prefix else str(key))
        if found is not None:
            return found
    return None


def _safetensors_problem(path: Path, name: str) -> str | None:
    """A damaged header or a tensor holding NaN / inf in a safetensors file (tensors read one at a time)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
                    return f"{name} holds NaN or inf values (tensor {key})"
    except Exception as exc:  # SafetensorError and friends: a damaged header or body
        return f"{name} is damaged ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    return None


def _optimizer_problem(path: Path, name: str) -> str | None:
    """An unreadable optimizer state or one holding NaN / inf (Adam moments, learning rates)."""
    try:
        # weights_only: a checkpoint file is data, never code to run
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        return f"{name} is unreadable ({' '.join(str(exc).split()[:12]) or type(exc).__name__})"
    found = non_finite_tensor(state.get("state", {}) if isinstance(state, dict) else state, "state")
    if found is None and isinstance(state, dict):
        for index, group in enumerate(state.get("param_groups", [])):
            # "params" holds parameter ids (ints); lr, betas, weight_decay, ... are the values that can go non-finite
            found = non_finite_tensor({k: v for k, v in group.items() if k != "params"}, f"param_groups.{index}")
            if found is not None:
                break
    return None if found is None else f"{name} holds NaN or inf values ({found})"


def _fingerprint(folder: Path) -> tuple | None:
    """``(name, size, inode, mtime_ns, ctime_ns)`` of every file under ``folder``, the marker included; None when
    a file vanished while listing or the newest stamp is younger than :data:`SETTLED_SECONDS`."""
    try:
        stats = [(p.relative_to(folder).as_posix(), p.stat()) for p in sorted(folder.rglob("*")) if p.is_file()]
    except OSError:
        return None
    # ctime too: os.utime can set mtime back, but any change of a file moves its ctime forward
    newest = max((max(st.st_mtime_ns, st.st_ctime_ns) for _, st in stats), default=0)
    if time.time_ns() - newest < SETTLED_SECONDS * 1e9:
        return None
    return tuple((name, st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns) for name, st in stats)


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` cannot be resumed from (a half-written save, a missing, truncated or changed file,
    non-finite weights or optimizer state), or None if intact (see the module notes; a folder found intact
    before and unchanged since is not read again)."""
    folder = Path(folder)
    key = os.path.realpath(folder)
    fingerprint = _fingerprint(folder) if folder.is_dir() else None
    if fingerprint is not None and _INTACT.get(key) == fingerprint:
        return None
    problem = _verify_checkpoint(folder)
    # the old entry is stale either way; re-added below (as the newest) only if intact and unchanged while read
    _INTACT.pop(key, None)
    if problem is None and fingerprint is not None and _fingerprint(folder) == fingerprint:  # unchanged while read
        while len(_INTACT) >= _INTACT_LIMIT:
            _INTACT.pop(next(iter(_INTACT)))  # dicts keep insertion order: this is the oldest entry
        _INTACT[key] = fingerprint
    return problem


def _verify_checkpoint(folder: Path) -> str | None:
    """:func:`checkpoint_problem` without the memory: reads and hashes every file of ``folder``."""
    if not folder.is_dir():
        return "it is not a folder"
    marker = folder / CHECKPOINT_MARKER
    if not marker.is_file():
        return f"its save did not finish (no {CHECKPOINT_MARKER})"
    try:
        content = json.loads(marker.read_text(encoding="utf-8"))
        recorded = {str(k): int(v) for k, v in content["files"].items()}
        checksums = {str(k): str(v) for k, v in (content.get("sha256") or {}).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{CHECKPOINT_MARKER} is unreadable"
    if "trainer_state.json" not in recorded:
        return "it holds no trainer_state.json"
    # cheapest first: presence and sizes (stat), then checksums (read every byte), then the content scans
    for name, size in recorded.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{name} is truncated or changed ({actual:,} bytes, {size:,} when saved)"
    for name, expected in checksums.items():
        if name in recorded and file_sha256(folder / name) != expected:
            return f"{name} changed after the save (its SHA-256 differs from the one in {CHECKPOINT_MARKER})"
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"trainer_state.json is unreadable ({exc})"
    for name in recorded:
        if name.endswith(".safetensors"):
            problem = _safetensors_problem(folder / name, name)
            if problem is not None:
                return problem
    if OPTIMIZER_NAME in recorded:
        return _optimizer_problem(folder / OPTIMIZER_NAME, OPTIMIZER_NAME)
    return None


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-N`` folders of a run folder, newest (highest N) first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    # by the step number as an int: as strings, checkpoint-900 would sort after checkpoint-1000
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _CHECKPOINT_NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, key=lambda item: item[0], reverse=True)]


def latest_intact_checkpoint(run_dir: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest intact checkpoint of ``run_dir`` or None, [(newer damaged checkpoint, why), ...])."""
    damaged = []
    for folder in list_checkpoints(run_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, damaged
        damaged.append((folder, problem))
    return None, damaged


def resolve_resume_checkpoint(resume: str | os.PathLike | bool, run_dir: str | os.PathLike) -> str:
    """The checkpoint to resume from: ``True`` → the newest intact one in ``run_dir`` (a one-line note for each
    damaged one skipped); a path → that checkpoint, if intact. ValueError (one line) otherwise."""
    if resume is True:
        found, damaged = latest_intact_checkpoint(run_dir)
        reasons = "; ".join(f"{p.name}: {why}" for p, why in damaged)
        if found is None:
            if damaged:
                raise ValueError(f"no intact checkpoint to resume from in {run_dir} ({reasons})")
            raise ValueError(f"no checkpoint to resume from in {run_dir}")
        if damaged:
            logger.warning(f"note: skipping damaged {reasons}; resuming from {found}")
        return str(found)
    problem = checkpoint_problem(resume)
    if problem is not None:
        raise ValueError(f"cannot resume from {os.fspath(resume)}: {problem}")
    return os.fspath(resume)
