#!/usr/bin/env bash
# The device work still pending after session 24, GPU only, in two calls of at most 600 s each. Carry .whl/ (the
# torchao wheel: `pip download --no-deps torchao==0.15.0 -d .whl`) for PART=2.
#   PART=1 bash bench/run_pending_gpu.sh $OUT   # GEMM table at M = 2048 (skipped in session 24 for time) and the
#                                               # tuner's per-candidate times (--logdir): why tma3 / swapt3 lost
#   PART=2 bash bench/run_pending_gpu.sh $OUT   # PixArt step with the torchao peers (int8 compiled, fp8), first in
#                                               # the run so the compile gets its time, beside FP16 and W8A8
# Session 24 ran the earlier version of this script: its results are in bench/results/*_h100_80gb_hbm3.json.
set -uo pipefail
OUT=${1:?output folder}
PART=${PART:-1}
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
mkdir -p "$OUT"

if [ "$PART" = 1 ]; then
  echo "== bench_linear (PixArt shapes, M = 2048, then 8192; the tuner's candidate times in lin/log.json)"
  timeout ${LIN_S:-420} python3 bench/bench_linear.py --m 2048 8192 --shapes pixart --no-sweep \
    --budget-s ${LIN_BUDGET_S:-360} --out "$OUT/lin" --logdir /tmp/linlog > "$OUT/lin.log" 2>&1
  cp /tmp/linlog/log.json "$OUT/lin/log.json"  # not the IR files: at most 8 files come back from a call
  tail -60 "$OUT/lin.log"
else
  # `pip` there may not be the interpreter that holds torch (session 24: torchao "not found" after pip install)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/torchao-*.whl \
    && export PYTHONPATH=/tmp/site
  python3 -c "import torchao; print('torchao', torchao.__version__)"
  echo "== bench_e2e (PixArt-Sigma size, torchao peers)"
  timeout ${E2E_S:-540} python3 bench/bench_e2e.py --no-attn-bench --no-launch-bench --no-profile \
    --compile-reserve-s 60 --reps 15 --budget-s 480 --resolutions 1024,512 --run-tag ${RUN_TAG:-s25a} \
    --out "$OUT/e2e" --variants fp16,torchao_fp8,torchao_int8_compile,w8a8_stepgraphs > "$OUT/e2e.log" 2>&1
  tail -22 "$OUT/e2e.log"
fi
