#!/usr/bin/env bash
# What a session with a GPU runs, in one go, to settle what CPU-only sessions owe:
# the kernel tests on the real compiler, the tuned table for this GPU, then the report.
# Usage (repository root, a CUDA build of torch and Triton installed):
#   bash reports/run_gpu.sh [OUT_DIR]        # logs into OUT_DIR (default reports/<gpu>/logs)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")
out=${1:-reports/$gpu/logs}
mkdir -p "$out"
python -m pip install -q --no-deps -e . >/dev/null 2>&1 || true  # maps kernels/, autotune/

# 1. correctness on the real compiler (no interpreter)
SASA_TEST_REAL_GPU=1 python -m pytest -q -x tests/test_kernels_forward.py \
    tests/test_kernels_backward.py tests/test_autograd_compile.py 2>&1 | tee "$out/tests.log"
# 2. tune this GPU's table (shipped in the package), a few configs per variant and key
python -m sasa_triton.autotune --suite resnet50,det --direction both --dtype bf16 \
    --limit 6 --ship 2>&1 | tee "$out/autotune.log"
# 3. the report: suite of PERF.md, forward and forward+backward, next to the baselines
python -m sasa_triton.report --suite resnet50 2>&1 | tee "$out/report.log"
python -m sasa_triton.report --suite all --impl 'attend*,conv*,unfold' \
    --out "reports/$gpu/all" 2>&1 | tee "$out/report_all.log"
