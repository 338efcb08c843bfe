#!/usr/bin/env bash
# Device run for the two-level int4 format (w4a8-g128-fast), GPU only: each swapped kernel kind alone first (a
# kernel that faults poisons its CUDA context, so a fault names its kind here), then the layer checks and the GEMM
# table with the kinds that passed. Usage on the device: bash bench/run_two_level_gpu.sh $OUT
set -uo pipefail
OUT=${1:?output folder}
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

ok=""
for kd in swapts2 swapt2 swapts swapt swap; do
  echo "== probe $kd"
  if VIDITQ_GEMM_KINDS=$kd timeout 90 python bench/bench_w4a8.py --m 8192 2048 --shapes qkv \
      --variants w4a8_g128_2l --out /tmp/probe_$kd > /tmp/probe_$kd.log 2>&1 \
      && ! grep -q -E '^\[error\]|^[1-9][0-9]* incorrect| [1-9][0-9]* errors' /tmp/probe_$kd.log; then
    ok="$ok${ok:+,}$kd"
  fi
  grep -E '^[0-9]+x|error|Error|incorrect' /tmp/probe_$kd.log | head -6
done
echo "== kinds that passed: ${ok:-none}"
[ -n "$ok" ] || exit 1

echo "== gpu_check"
VIDITQ_GEMM_KINDS="ptr,tma,tmas,tma2,tmas2,$ok" timeout 150 python bench/gpu_check.py --only layers,fused \
  --presets w4a8-g128-fast,w4a8 --out "$OUT" 2>&1 | tail -25

echo "== bench_w4a8"
VIDITQ_GEMM_KINDS="ptr,tma,tmas,tma2,tmas2,$ok" python bench/bench_w4a8.py --m 8192 2048 --budget-s 200 \
  --variants w8a8_int8,w4a8_s16,w4a8_g128_s16,w4a8_g128_2l --out "$OUT" 2>&1 | tail -16
