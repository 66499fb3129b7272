"""`python -m hf_sam_peft`: the `hf-sam-peft` command, for environments without the console script on PATH."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m hf_sam_peft"))
