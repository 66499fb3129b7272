#!/usr/bin/env bash
# Download, on a machine with internet, the wheels a GPU node without it needs to run the benchmarks from a
# checkout (benchmarks/gpu_table.sh with WHEELS=DIR), when that node's image already holds torch and the
# scientific stack (numpy, scipy, scikit-image, pandas, pyarrow, accelerate, safetensors, huggingface_hub,
# tokenizers) but not our pins of the rest. Each package is pinned to the version installed in the python
# that runs this script (the one the CPU tests passed with); pure-python wheels, plus CPython-versioned ones
# where a package ships them (multiprocess).
#
#   bash benchmarks/offline_wheels.sh DIR [PYTHON_VERSION]     # PYTHON_VERSION of the GPU node: default 3.12
#   PACKAGES="transformers peft" bash benchmarks/offline_wheels.sh DIR
#
# About 15 MB for the default set. Then, on the node: WHEELS=DIR bash benchmarks/gpu_table.sh (its first step imports
# everything and prints the versions, so a missing or too old package shows before any run; datasets needs
# pyarrow >= 24: where the node's is older, add pyarrow to PACKAGES, ~45 MB).
set -euo pipefail
DEST="${1:?usage: offline_wheels.sh DIR [PYTHON_VERSION]}"
PYVER="${2:-3.12}"
PYTHON="${PYTHON:-python3}"
PACKAGES="${PACKAGES:-transformers peft datasets evaluate dill multiprocess}"
mkdir -p "$DEST"
for name in $PACKAGES; do
  version="$("$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")"
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "$name==$version"
  echo "$name==$version"
done
ls -l "$DEST"
