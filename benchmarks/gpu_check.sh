#!/usr/bin/env bash
# The GPU check, one script for one CUDA GPU with no network, in at most 8 minutes:
#   1. the CUDA-marked tests (bf16, fp16 + scaler, fused AdamW, the step read a step late, resume
#      within tolerance, KV-cache generation equal to recomputation);
#   2. gpt-tui bench --device cuda at small and gpt2 (16 x 1024, bf16), without and with --compile;
#   3. the dashboard against headless on the GPU (tmux, if installed).
# It prints one summary table and writes $OUT/gpu_check.json (OUT defaults to ./gpu-check).
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine, from the repository root
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh   # the plumbing, on a CPU (tiny sizes)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-gpu-check}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 GPT_TUI_CACHE="$OUT/cache"

if [ "${QUICK:-0}" = 1 ]; then
  PRESETS="tiny,small:2x64"; DTYPE=fp32; STEPS=2; DASH="--presets tiny --tiny-steps 300 --rounds 1"
else
  PRESETS="small:16x256,gpt2:16x1024"; DTYPE=bf16; STEPS=10
  DASH="--presets small --small-steps 400 --rounds 1 --batch-size 16"
fi

step() { echo; echo "== $1 ($(date +%H:%M:%S))"; }

step "CUDA tests"
if [ "$DEVICE" = cuda ]; then
  timeout 180 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests 2>&1 | tee "$OUT/tests.log" | tail -15
else
  echo "skipped: DEVICE=$DEVICE" | tee "$OUT/tests.log"
fi

step "bench: $PRESETS, $DTYPE"
timeout 150 "$PY" -m tui.cli bench --device "$DEVICE" --dtype "$DTYPE" --presets "$PRESETS" --only peak,train \
  --steps "$STEPS" --warmup 2 --save "$OUT/bench.json" 2>&1 | tail -15

step "bench with --compile"
timeout 240 "$PY" -m tui.cli bench --device "$DEVICE" --dtype "$DTYPE" --presets "$PRESETS" --only train --compile \
  --steps "$STEPS" --warmup 3 --save "$OUT/bench_compile.json" 2>&1 | tail -10

step "dashboard against headless"
if command -v tmux >/dev/null 2>&1; then
  # shellcheck disable=SC2086
  timeout 150 "$PY" benchmarks/bench_dashboard.py --device "$DEVICE" --dtype "$DTYPE" $DASH \
    --save "$OUT/dashboard.json" 2>&1 | tail -8
else
  echo "skipped: no tmux"
fi

step "summary"
"$PY" benchmarks/gpu_summary.py "$OUT"
