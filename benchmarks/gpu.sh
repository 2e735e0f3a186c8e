#!/usr/bin/env bash
# On a lent GPU machine, in one go: the compiled denoiser's tests on CUDA (AOTInductor packages replayed as
# CUDA graphs per cohort-size bucket), then the compiled bench (raw pipeline vs eager loop vs compiled loop),
# so the first lease brings back the GPU table. Not run here: the machine this was written on has no GPU.
#
#   PYTHON=/path/to/python benchmarks/gpu.sh [out-dir]
#
# PYTHON must have a CUDA build of torch and this package's dependencies (the lent machine reaches no index);
# without PYTHON, .venv/bin/python, then python3. Results: out-dir (default $OUT, else gpu_results/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT_DIR=${1:-${OUT:-gpu_results}}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

"$PY" - <<'PYEOF' | tee "$OUT_DIR/device.txt"
import torch
assert torch.cuda.is_available(), "no CUDA device: this script is for a GPU machine"
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))
PYEOF
nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true

# the tests pick the GPU themselves (device auto): the compiled path, its tolerance, handover and control
"$PY" -m pytest -q -p no:cacheprovider tests/test_compiled_denoiser.py 2>&1 | tee "$OUT_DIR/tests.txt" || true
# identity of the eager loop on the GPU, for reference beside the compiled figures
"$PY" -m pytest -q -p no:cacheprovider tests/test_denoise_matches_pipeline.py 2>&1 | tee "$OUT_DIR/identity.txt" || true

# the bench part (writes benchmarks/results/bench.{json,md}; copied out)
"$PY" -m benchmarks.run --only compiled --no-host 2>&1 | tee "$OUT_DIR/bench.txt"
cp benchmarks/results/bench.json benchmarks/results/bench.md "$OUT_DIR/"
