"""`hf-sam-peft push`: upload a saved adapter folder to the Hugging Face Hub with its model card."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from huggingface_hub import constants
from huggingface_hub.errors import OfflineModeIsEnabled

PUSH_HELP = """\
Upload ADAPTER_DIR (written by hf_sam_peft.hub.save_adapter, a peft adapter folder, or a Trainer
checkpoint) to the Hub repo REPO_ID, created if needed. Only the adapter's own files are uploaded
(adapter_config.json, adapter_model.safetensors, hf_sam_peft.json, unetr/, README.md; never optimizer
states), only regular files inside ADAPTER_DIR (a symlink among them is refused), listed before the upload,
and the model card is re-rendered so its loading snippet names REPO_ID. A folder without
hf_sam_peft.json is first loaded onto its base model (--base, default the one its config names) to count
its parameters. Log in with `huggingface-cli login` or pass --token. Load it back with
hf_sam_peft.from_pretrained("REPO_ID")."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `push` subcommand."""
    parser = subparsers.add_parser(
        "push",
        help="upload an adapter folder to the Hugging Face Hub with its model card",
        description=PUSH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("adapter_dir", metavar="ADAPTER_DIR", type=Path, help="saved adapter folder")
    parser.add_argument("repo_id", metavar="REPO_ID", help="Hub repo id, e.g. your-name/sam-lora-livecell")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--token", default=None, help="Hub token (default: the stored login / HF_TOKEN)")
    parser.add_argument(
        "--base", default=None, help="base model for a folder without hf_sam_peft.json (default: its config's)"
    )
    parser.add_argument("--message", default=None, help="commit message")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the model card and the files that would be uploaded; upload nothing"
    )
    parser.set_defaults(func=run)


def hub_offline() -> bool:
    """Whether huggingface_hub is in offline mode (HF_HUB_OFFLINE, read now or when it was imported)."""
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: the environment is read again for a later change
    value = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return bool(constants.HF_HUB_OFFLINE) or value in {"1", "ON", "YES", "TRUE"}


def list_upload(folder: Path, files: list[str], what: str, repo_id: str) -> None:
    """`what N files to REPO_ID:` (``dry run: would upload`` / ``uploading``), then the files with their sizes."""
    print(f"{what} {len(files)} files to {repo_id}:")
    for name in files:
        print(f"  {name}  ({(folder / name).stat().st_size:,} bytes)")


def run(args: argparse.Namespace) -> int:
    """Prepare the upload folder; print it (dry run) or list it and push it."""
    # lazy: kept off the CLI start-up path (every command module is imported to build --help)
    from hf_sam_peft.hub import (
        CARD_NAME,
        DEFAULT_COMMIT_MESSAGE,
        prepare_upload,
        push_folder_to_hub,
    )

    if args.dry_run:
        # the very folder a real push would upload, built in a throwaway place: ADAPTER_DIR is never written to
        with tempfile.TemporaryDirectory(prefix="hf_sam_peft_push_") as tmp:
            files = prepare_upload(args.adapter_dir, args.repo_id, tmp, base_model=args.base)
            print((Path(tmp) / CARD_NAME).read_text(encoding="utf-8"))
            list_upload(Path(tmp), files, "dry run: would upload", args.repo_id)
        return 0
    if not args.adapter_dir.is_dir():
        raise FileNotFoundError(f"adapter folder {args.adapter_dir} does not exist")
    try:
        url = push_folder_to_hub(
            args.adapter_dir, args.repo_id, private=args.private, token=args.token,
            commit_message=args.message or DEFAULT_COMMIT_MESSAGE, base_model=args.base,
            announce=lambda folder, files: list_upload(folder, files, "uploading", args.repo_id),
        )
    except Exception as exc:
        # offline, huggingface_hub fails with OfflineModeIsEnabled or with a plain OSError (e.g. a cache miss, a
        # LocalEntryNotFoundError, while fetching the base to count parameters): both name the switch as the cause
        if isinstance(exc, OfflineModeIsEnabled) or (hub_offline() and isinstance(exc, OSError)):
            raise ValueError(
                f"cannot upload {args.adapter_dir} to {args.repo_id}: the Hub is switched off (HF_HUB_OFFLINE=1); "
                "unset HF_HUB_OFFLINE, or check the upload with --dry-run"
            ) from None
        raise
    print(f"pushed {args.adapter_dir} -> {url}")
    return 0
