#!/usr/bin/env bash
# The one script for a lent GPU (about 9 minutes on an H100): kernel correctness + benchmark,
# whole-model inference, training iteration. Run from the repository root; results go to $OUT.
#   OUT=gpu_out bash scripts/gpu_all.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
{ date -u; git rev-parse HEAD 2>/dev/null; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)"; } \
  2>&1 | tee "$OUT/gpu.txt"
timeout 300 python3 scripts/gpu_kernels.py --budget 240 --json "$OUT/gpu_kernels.json" 2>&1 | tee "$OUT/gpu_kernels.log"
timeout 70 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py 2>&1 | tail -15 | tee "$OUT/pytest_gpu.log"
for dtype in float32 bfloat16; do
  timeout 70 python3 -m isa bench model --device cuda --size 1024x2048 --dtype "$dtype" \
    --warmup 3 --repeats 10 --json "$OUT/model_$dtype.json" 2>&1 | grep -v "^INFO" | head -3
done
timeout 100 python3 scripts/gpu_train_bench.py --budget-s 60 --json "$OUT/train_bench.json" 2>&1 | tail -20
