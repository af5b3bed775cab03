#!/usr/bin/env bash
# The long-range backwards side by side end to end (ISA_TRITON_LONG_BWD=four|fused|split), and the auto
# policy; first used (as old vs fused, ISA_TRITON_FUSED_BWD=0/1) for the second GPU run in BENCHMARKS.md.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
timeout 200 python3 scripts/gpu_kernels.py --budget 150 --skip flex memory compile --json "$OUT/gpu_kernels2.json" 2>&1 | tee "$OUT/gpu_kernels2.log" | grep -E "PASS|FAIL|sweep summary|done in|Error|error" | head -60
for mode in four fused split; do
  ISA_TRITON_LONG_BWD=$mode timeout 60 python3 -m isa_triton.bench kernels --cases cityscapes_whole --patterns long short \
    --layouts channels_last --backends triton eager --batch 1 8 --warmup 5 --rep 25 2>&1 | tail -9
done 2>&1 | tee "$OUT/long_bwd_e2e.log"
for dtype in float32 bfloat16; do
  timeout 60 python3 -m isa bench model --device cuda --size 1024x2048 --dtype "$dtype" \
    --warmup 3 --repeats 10 --json "$OUT/model2_$dtype.json" 2>&1 | grep -v "^INFO" | head -1
done
for mode in four fused split; do
  ISA_TRITON_LONG_BWD=$mode timeout 60 python3 scripts/gpu_train_bench.py --backends triton --dtypes bf16 --budget-s 40 2>&1 | tail -3
done 2>&1 | tee "$OUT/train2.log"
