#!/usr/bin/env bash
# The accelerator measurements of docs/performance.md ("Accelerator efficiency"), as one script for a lent
# GPU (device tool; see docs/performance.md for carrying flax/optax/ml_collections/clu as wheels):
#   KBCNet-R101, 240 px, bf16, BatchNorm folded: 8, 32 and 128 pairs per step, 1 and 8 steps per dispatch;
#   and the unfolded step at 32 pairs for the folding's effect. Writes JSON (and the log) under $OUT.
# Budget: about 6 minutes on an H100 (each row compiles once, 40-80 s, then times 10 steps).
set -euo pipefail
OUT=${OUT:-/tmp/gpu_efficiency}
mkdir -p "$OUT"
run() {  # name, then train_step.py arguments
  local name=$1; shift
  python benchmarks/without_tensorflow.py benchmarks/train_step.py --variants kbcnet_r101 --sizes 240 \
      --dtypes bfloat16 --steps 10 --peak_tflops "${PEAK_TFLOPS:-989}" --out "$OUT/$name.json" "$@" \
      2>&1 | tee -a "$OUT/log.txt"
}
for pairs in 8 32 128; do
  run "b$pairs" --batch "$pairs" --steps_per_dispatch 1,8
done
run unfolded_b32 --batch 32 --set model.fold_batchnorm=False
