#!/usr/bin/env bash
# Create a SEPARATE virtual environment with micro-sam (the paper's reference code) for the side-by-side
# benchmark (benchmarks/micro_sam_step.py). It pulls its own torch (2.14.x, through torchvision, ~6 GB):
# never install it into the project's venv.
#
#   bash benchmarks/setup_micro_sam.sh [VENV_DIR]
#
# VENV_DIR: the argument, else $MICRO_SAM_VENV, else `microsam-venv` beside the repository checkout
# (<checkout>/../microsam-venv). benchmarks/train_step.py finds the peer the same way (or --peer-python).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-${MICRO_SAM_VENV:-$(dirname "$REPO")/microsam-venv}}"
case "$VENV" in
  "$REPO"*) echo "refusing to create the peer venv inside the repository: $VENV" >&2; exit 2;;
esac
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet --upgrade pip
# CPU wheels are enough for the CPU comparison; micro-sam pulls torch_em, python-elf, torchvision, torch.
"$VENV/bin/pip" install --quiet micro-sam segment-anything
"$VENV/bin/python" -c "import torch, micro_sam, segment_anything; from micro_sam.training import SamTrainer; print('micro-sam', micro_sam.__version__, 'torch', torch.__version__)"
