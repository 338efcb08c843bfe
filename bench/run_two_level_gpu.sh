#!/usr/bin/env bash
# Device run for the two-level int4 format (w4a8-g128-fast), GPU only: each swapped kernel kind alone first (a
# kernel that faults poisons its CUDA context, so a fault names its kind here), then the layer checks and the GEMM
# table with the kinds that passed.
#   bash bench/run_two_level_gpu.sh $OUT            # probes, gpu_check, GEMM table (~9 min)
#   ONE_CALL=1 bash bench/run_two_level_gpu.sh $OUT # fits one 600 s device call: probes at M = 2048, GEMM table, then the
#                                                    # PixArt 1024 px step (FP16 / W8A8 / W4A8 / W4A8-g128-fast)
set -uo pipefail
OUT=${1:?output folder}
ONE_CALL=${ONE_CALL:-0}
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

probe_m="8192 2048"
[ "$ONE_CALL" = 1 ] && probe_m="2048"  # (session 18's fault came at M = 2048, on the TMA candidates)
ok=""
for kd in swapts2 swapt2 swapts swapt swap; do
  echo "== probe $kd"
  if VIDITQ_GEMM_KINDS=$kd timeout 75 python bench/bench_w4a8.py --m $probe_m --shapes qkv \
      --variants w4a8_g128_2l --out /tmp/probe_$kd > /tmp/probe_$kd.log 2>&1 \
      && ! grep -q -E '^\[error\]|^[1-9][0-9]* incorrect| [1-9][0-9]* errors' /tmp/probe_$kd.log; then
    ok="$ok${ok:+,}$kd"
  fi
  grep -E '^[0-9]+x|error|Error|incorrect' /tmp/probe_$kd.log | head -6
  cp /tmp/probe_$kd.log "$OUT/" 2>/dev/null
done
echo "== kinds that passed: ${ok:-none}"
[ -n "$ok" ] || exit 1
export VIDITQ_GEMM_KINDS="ptr,tma,tmas,tma2,tmas2,$ok"

if [ "$ONE_CALL" != 1 ]; then
  echo "== gpu_check"
  timeout 150 python bench/gpu_check.py --only layers,fused --presets w4a8-g128-fast,w4a8 --out "$OUT" 2>&1 | tail -25
fi

echo "== bench_w4a8"
budget=200; [ "$ONE_CALL" = 1 ] && budget=110
timeout 240 python bench/bench_w4a8.py --m 8192 2048 --budget-s $budget \
  --variants w8a8_int8,w4a8_s16,w4a8_g128_s16,w4a8_g128_2l --out "$OUT" 2>&1 | tail -16

if [ "$ONE_CALL" = 1 ]; then
  echo "== bench_e2e (PixArt-Sigma size, 1024 px, ViDiTQCudaGraphs path)"
  timeout 230 python bench/bench_e2e.py --no-attn-bench --no-launch-bench --no-profile --compile-reserve-s 0 \
    --reps 10 --budget-s 150 --resolutions 1024 --run-tag ${RUN_TAG:-s22} \
    --variants fp16_stepgraphs,w8a8_stepgraphs,w4a8_stepgraphs,w4a8_g128fast_stepgraphs --out "$OUT" 2>&1 | tail -20
fi
