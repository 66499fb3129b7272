"""Pushing adapters to the Hub: a model (`push_adapter_to_hub`) or a saved folder (`push_folder_to_hub`).

Only an adapter repo's files (`REPO_FILES`) are uploaded, with the card re-rendered for the target repo id,
and only regular files inside the adapter folder: a symlink (to a file outside, or even inside), a folder
reached through one, or a fifo / device among them is refused before anything is read or uploaded
(:func:`check_upload_files`), so that a link to `~/.ssh/id_rsa` named `adapter_model.safetensors` never
reaches the Hub.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub.utils import HFValidationError, validate_repo_id
from torch import nn

from ..atomic import atomic_write_text
from .card import render_card
from .load import from_pretrained
from .provenance import CARD_NAME, PROVENANCE_NAME, REPO_FILES, _repo_files, read_provenance
from .save import save_adapter

DEFAULT_COMMIT_MESSAGE = "Upload hf-sam-peft adapter"


def _upload(folder: Path, repo_id: str, private: bool, token: str | None, commit_message: str, api: Any) -> str:
    if not isinstance(commit_message, str) or not commit_message:
        raise ValueError(f"commit_message must be a non-empty string, got {commit_message!r}")
    # looked up on the module at call time, so a replaced huggingface_hub.HfApi (a test's fake) is the one used
    api = api if api is not None else huggingface_hub.HfApi(token=token)
    # exist_ok: pushing to an existing repo adds a commit (`private` then leaves its visibility as it is)
    repo_url = api.create_repo(repo_id, exist_ok=True, private=private, repo_type="model")
    repo_id = getattr(repo_url, "repo_id", None) or repo_id  # the Hub may complete the namespace
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, repo_type="model",
        allow_patterns=list(REPO_FILES),  # a second filter, on huggingface_hub's side, over a folder already filtered
    )
    # upload_folder's CommitInfo names the commit; RepoUrl (itself a str) is the fallback
    return str(getattr(commit, "commit_url", None) or getattr(repo_url, "url", None) or repo_url)


def _check_repo_id(repo_id: str) -> None:
    if not isinstance(repo_id, str):
        raise TypeError(f"repo_id must be a string like 'org/name', got {type(repo_id).__name__}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ValueError(f"repo_id must be a Hub repo id like 'org/name', got {repo_id!r}") from exc


def check_upload_files(adapter_dir: str | os.PathLike) -> list[str]:
    """The repo files of `adapter_dir` (relative posix paths), after checking that each is a regular file
    that lies inside it; anything else that push would upload is a one-line ValueError naming it."""
    root = Path(adapter_dir)
    real_root = root.resolve()
    out = []
    # followlinks=False: a linked folder is not entered, but os.walk still lists it among `dirs`, where the
    # lstat below finds and refuses it
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in sorted(dirs + files):
            path = Path(folder, name)
            rel = path.relative_to(root).as_posix()
            wanted = any(fnmatch.fnmatchcase(rel, pattern) for pattern in REPO_FILES)
            inside = any(pattern.startswith(rel + "/") for pattern in REPO_FILES)  # e.g. unetr/ for unetr/*
            if not (wanted or inside):
                continue
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                raise ValueError(
                    f"{path} is a symlink (to {os.path.realpath(path)}); push uploads only regular files inside "
                    f"{root}: replace the link by a copy of the file"
                )
            if name in dirs:
                continue  # a real folder: its files are checked as the walk reaches them
            if not stat.S_ISREG(mode):
                raise ValueError(f"{path} is not a regular file; push uploads only regular files inside {root}")
            if not Path(os.path.realpath(path)).is_relative_to(real_root):
                raise ValueError(f"{path} lies outside {root} ({os.path.realpath(path)}); push uploads only files inside it")
            if wanted:
                out.append(rel)
    return sorted(out)


def push_adapter_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    api: Any = None,
    **card_kwargs: Any,
) -> str:
    """Save `model` with `save_adapter` (card written for `repo_id`) and upload it; returns the commit URL.

    `card_kwargs` go to `save_adapter` (base_model_id, method, training_data, metrics, extra, license,
    point_multimask).
    `api`: an `huggingface_hub.HfApi` (default: `HfApi(token=token)`).
    """
    _check_repo_id(repo_id)
    if "repo_id" in card_kwargs or "overwrite" in card_kwargs:
        raise TypeError("push_adapter_to_hub sets repo_id and overwrite itself")
    with tempfile.TemporaryDirectory(prefix="hf_sam_peft_push_") as tmp:
        folder = save_adapter(model, Path(tmp) / "adapter", repo_id=repo_id, **card_kwargs)
        return _upload(folder, repo_id, private, token, commit_message, api)


def prepare_upload(
    adapter_dir: str | os.PathLike, repo_id: str, dest: str | os.PathLike, base_model: Any = None
) -> list[str]:
    """Copy an adapter folder's repo files into `dest` with the card re-rendered for `repo_id`; returns them.

    A folder without `hf_sam_peft.json` (saved by peft or a Trainer checkpoint) is loaded onto its base
    (`base_model`, default the one its config names) and saved again, so its card has real counts.
    """
    _check_repo_id(repo_id)
    src, dest = Path(adapter_dir), Path(dest)
    if not src.is_dir():
        raise FileNotFoundError(f"adapter folder {src} does not exist")
    files = check_upload_files(src)  # before anything is read: only regular files inside the folder
    provenance = read_provenance(src)
    # no provenance to render a card from: the folder is loaded and saved again, which writes one
    if not provenance:
        model = from_pretrained(src, base_model=base_model)
        save_adapter(model, dest, repo_id=repo_id, overwrite=True)
        return _repo_files(dest)
    if base_model is not None:
        raise ValueError(f"{src} already records its base model in {PROVENANCE_NAME}; drop base_model")
    dest.mkdir(parents=True, exist_ok=True)
    for rel in files:
        if rel != CARD_NAME:  # the card is re-rendered below, for repo_id
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            # follow_symlinks=False: a file swapped for a link after the check is copied as the link, never its target
            shutil.copy2(src / rel, dest / rel, follow_symlinks=False)
    atomic_write_text(dest / CARD_NAME, render_card(provenance, repo_id))
    return _repo_files(dest)


def push_folder_to_hub(
    adapter_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    base_model: Any = None,
    api: Any = None,
    announce: Callable[[Path, list[str]], None] | None = None,
) -> str:
    """Upload a saved adapter folder (only its repo files, card re-rendered for `repo_id`); returns the commit URL.

    `announce(folder, files)` is called with the prepared upload before anything reaches the Hub (the
    `push` command lists the files there, as `--dry-run` does).
    """
    with tempfile.TemporaryDirectory(prefix="hf_sam_peft_push_") as tmp:
        files = prepare_upload(adapter_dir, repo_id, tmp, base_model=base_model)
        if announce is not None:
            announce(Path(tmp), files)
        return _upload(Path(tmp), repo_id, private, token, commit_message, api)
