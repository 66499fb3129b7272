#!/usr/bin/env bash
# The GPU table of benchmarks/RESULTS.md ("## GPU"; issue 7's targets) in one command: ViT-B at 1024², batch 2,
# 25 objects, 8 prompt rounds; LoRA, Freeze Encoder and Full FT, plain and optimized paths (train_step.py);
# median time/it of 5 steps after 2 warm-up ones, peak allocated GPU memory, one profiled step of each run, and
# a verdict against the targets (LoRA <= 0.3 s/it and <= 12 GB, Freeze Encoder <= 0.1 s/it and <= 4 GB).
#
#   bash benchmarks/gpu_table.sh [OUT_DIR]        # OUT_DIR: default $OUT, else ./gpu_table in the checkout
#   WHEELS=DIR bash benchmarks/gpu_table.sh ...   # first install DIR/*.whl (--no-deps) into a private folder
#                                                 # on the path: a GPU node without internet whose image has
#                                                 # torch but not our other needs (benchmarks/offline_wheels.sh)
#   SMOKE=1 bash benchmarks/gpu_table.sh ...      # the same flow on the CPU (tiny model, 4 objects, 2 rounds,
#                                                 # one step each, no verdict; ~1 minute): checks the script
#                                                 # and the wheels before GPU time is spent
#
# It runs the checkout's package (PYTHONPATH), installed or not, and writes 8 files: gpu_table.md (the table
# and the verdict), gpu_table.json, and profile_<method>_<path>.txt for each of the 6 runs. About 3-5 minutes
# on one H100/H200 (model builds and process starts included). Exit status 0 when every run finished, whether
# or not the targets were met (the verdict says which); non-zero when no GPU is seen or a run failed.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT_DIR="${1:-${OUT:-$REPO/gpu_table}}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT_DIR"
if [ -n "${WHEELS:-}" ]; then
  SITE="$(mktemp -d)"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if [ "${SMOKE:-0}" = 1 ]; then
  RUN=(--model tiny --objects 4 --rounds 2 --steps 1 --warmup 1 --device cpu)
else
  RUN=(--model vit_b --objects 25 --rounds 8 --steps 5 --warmup 2 --device cuda)
fi

(SMOKE="${SMOKE:-0}" "$PYTHON" - <<'EOF'
import os
import sys

import torch

if os.environ["SMOKE"] != "1" and not torch.cuda.is_available():
    sys.exit("gpu_table.sh: torch sees no GPU (a CUDA build of torch and a visible NVIDIA device are needed)")
import datasets, peft, transformers  # noqa: E401 - fail here, before any run, when one is missing

import hf_sam_peft

where = "SMOKE run on the CPU" if os.environ["SMOKE"] == "1" else torch.cuda.get_device_name()
print(f"# {where}, CUDA {torch.version.cuda}; torch {torch.__version__}, transformers "
      f"{transformers.__version__}, peft {peft.__version__}, datasets {datasets.__version__}; hf_sam_peft from "
      f"{hf_sam_peft.__file__}")
EOF
) | tee "$OUT_DIR/gpu_table.md"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null \
  | sed 's/^/# nvidia-smi: /' | tee -a "$OUT_DIR/gpu_table.md" || true

"$PYTHON" "$REPO/benchmarks/train_step.py" "${RUN[@]}" --batch 2 \
  --methods lora,freeze_encoder,full_ft --paths "plain;optimized" --peer-python '' \
  --json "$OUT_DIR/gpu_table.json" --profile "$OUT_DIR" | tee -a "$OUT_DIR/gpu_table.md"

SMOKE="${SMOKE:-0}" "$PYTHON" - "$OUT_DIR/gpu_table.json" <<'EOF' | tee -a "$OUT_DIR/gpu_table.md"
import json
import os
import sys

# issue 7: (seconds per iteration, GB = 10^9 bytes) for the optimized path
TARGETS = {"lora": (0.3, 12.0), "freeze_encoder": (0.1, 4.0)}
rows = json.load(open(sys.argv[1]))["rows"]
failed = [r for r in rows if "error" in r]
for row in rows:
    if os.environ["SMOKE"] == "1" or row.get("path") != "optimized" or row["method"] not in TARGETS or "error" in row:
        continue
    seconds, gigabytes = TARGETS[row["method"]]
    memory = row["peak_gib"] * 2**30 / 1e9
    verdict = "met" if row["time_per_it"] <= seconds and memory <= gigabytes else "NOT met"
    print(f"# {row['method']}: {row['time_per_it']:.3f} s/it (target <= {seconds}), {memory:.2f} GB "
          f"(target <= {gigabytes}): {verdict}")
if failed:
    sys.exit(f"gpu_table.sh: {len(failed)} run(s) failed: " + "; ".join(f"{r['method']} {r['path']}: {r['error']}" for r in failed))
EOF
