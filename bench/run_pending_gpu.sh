#!/usr/bin/env bash
# The device work still pending after session 23 (no machine was lent that session), GPU only, in two calls of
# at most 600 s each. Carry .whl/ (the torchao wheel: `pip download --no-deps torchao==0.15.0 -d .whl`).
#   PART=1 bash bench/run_pending_gpu.sh $OUT   # GEMM table with the tma3 / swapt3 candidates (fp8 too), then the
#                                               # PixArt step with the peers (torchao int8 compiled, torchao fp8,
#                                               # ComfyUI's fp8 path) and W8A8 fp8 on the node's CUDA-graph path
#   PART=2 bash bench/run_pending_gpu.sh $OUT   # OpenSORA step, three presets against one FP16 baseline, then the
#                                               # layer checks (the tuner may now pick tma3 / swapt3)
# With less device time left: OS_S=240 CHECK_S=120 OS_PRESETS=w4a8-g128-fast,w8a8-smoothquant PART=2 ...
set -uo pipefail
OUT=${1:?output folder}
PART=${PART:-1}
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
mkdir -p "$OUT"

if [ "$PART" = 1 ]; then
  echo "== bench_linear (PixArt shapes, M = 8192 / 2048)"
  timeout 180 python bench/bench_linear.py --m 8192 2048 --shapes pixart --no-sweep --budget-s 120 \
    --out "$OUT/lin" > "$OUT/lin.log" 2>&1
  tail -40 "$OUT/lin.log"
  ls .whl/torchao-*.whl >/dev/null 2>&1 && pip install -q --no-deps .whl/torchao-*.whl 2>&1 | tail -1
  echo "== bench_e2e (PixArt-Sigma size, peers)"
  timeout 330 python bench/bench_e2e.py --no-attn-bench --no-launch-bench --no-profile --compile-reserve-s 130 \
    --reps 15 --budget-s 260 --resolutions 1024,512 --run-tag ${RUN_TAG:-s24a} --out "$OUT/e2e" \
    --variants fp16,fp16_strided,w8a8_stepgraphs,w8a8_fp8_stepgraphs,comfy_fp8_fast_equiv,torchao_fp8,torchao_int8_compile \
    > "$OUT/e2e.log" 2>&1
  tail -22 "$OUT/e2e.log"
else
  echo "== bench_opensora_step (STDiT 16 x 512 x 512)"
  timeout ${OS_S:-330} python bench/bench_opensora_step.py --reps 5 --warmup 2 \
    --preset ${OS_PRESETS:-w8a8-smoothquant,w4a8-g128-fast,w4a8} \
    --out "$OUT/os" > "$OUT/os.log" 2>&1
  tail -14 "$OUT/os.log"
  echo "== gpu_check (layers, fused)"
  timeout ${CHECK_S:-200} python bench/gpu_check.py --only layers,fused --presets w8a8,w4a8-g128-fast,w4a8 \
    --out "$OUT/check" 2>&1 \
    | tail -25
fi
