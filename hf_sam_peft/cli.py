"""The `hf-sam-peft` command: one subcommand per job, each defined in `hf_sam_peft/commands/`."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from typing import Optional, Sequence

from . import __version__

# subcommand modules, in the order `--help` lists them; each has register(subparsers)
COMMANDS: tuple[str, ...] = (
    "demo", "methods", "recipes", "train", "study", "evaluate", "segment", "app", "convert", "push",
)


def build_parser(prog: str = "hf-sam-peft") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Parameter-efficient fine-tuning of Segment Anything (SAM) with transformers + peft.",
        epilog="Run 'hf-sam-peft <command> --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"hf-sam-peft {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="<command>", dest="command")
    for name in COMMANDS:
        # each module adds its own subparser and sets `func` on it (see run_command)
        importlib.import_module(f"hf_sam_peft.commands.{name}").register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None, prog: str = "hf-sam-peft") -> int:
    # deprecation chatter between peft and transformers is not actionable for CLI users
    warnings.filterwarnings("ignore", category=FutureWarning)
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    # no subcommand given: argparse set no `func`
    if not hasattr(args, "func"):
        parser.print_help()
        return 1
    return run_command(args.func, args, f"hf-sam-peft {args.command}")


# errors a user can fix from the message alone (a bad input, a missing file, a full disk): one line, status 2
# ImportError: a missing optional extra (commands/app.py re-raises gradio's with the install hint); OSError
# covers run_lock.FolderInUse and atomic.NoSpaceLeft. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, OSError, ImportError)


def error_line(exc: BaseException) -> str:
    """`exc` as one line: its first line, or its type when it says nothing."""
    # str.split() with no argument also splits on newlines: a multi-line message is joined into one line
    text = " ".join(str(exc).split()) if str(exc).strip() else type(exc).__name__
    return text


def run_command(func, args: argparse.Namespace, prog: str) -> int:
    """Run a subcommand; a user error becomes `PROG: error: MESSAGE` on stderr (one line) and exit status 2."""
    try:
        # a command that returns None has succeeded: status 0
        return int(func(args) or 0)
    except USER_ERRORS as exc:
        print(f"{prog}: error: {error_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
