"""`python -m hf_sam_peft`: the `hf-sam-peft` command, for environments without the console script on PATH."""

import sys

from .cli import main

if __name__ == "__main__":
    # prog: usage and error lines name the command the way it was run
    sys.exit(main(prog="python -m hf_sam_peft"))
