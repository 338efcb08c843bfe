"""W4A8 against W8A8 and cuBLAS bf16 at the PixArt / OpenSORA linear shapes, the int4 nibbles unpacked by inline
PTX (four bytes per register) and by Triton's own byte-by-byte lowering (VIDITQ_W4_ASM=0); int4 in groups of 128
with float group scales and with two-level integer ones (w4a8-g128-fast), weights in the split16 byte order the
layers keep, activation codes in natural order. GPU only.

Each GEMM is tuned by the module's own tuner, checked against the fp32 reference, then timed as the median of
CUDA-graph replays (the kernels alone). The JSON is rewritten after every shape, so a cut-off run keeps its rows.

    python bench/bench_w4a8.py --out $OUT/results          # on the device: w4a8_<gpu>.json
    python bench/bench_w4a8.py --dry                        # CPU interpreter, tiny shapes: the script only
"""
import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--m", type=int, nargs="+", default=[8192, 2048, 32768])
p.add_argument("--out", default=str(ROOT / "bench" / "results"))
p.add_argument("--budget-s", type=float, default=400.0, help="skip shapes that would start after this many s")
p.add_argument("--dry", action="store_true")
p.add_argument("--shapes", default="qkv,proj,fc1,fc2", help="comma-separated subset of qkv, proj, fc1, fc2")
p.add_argument("--variants", default="w8a8_int8,w4a8_asm,w4a8_triton,w4a8_s16,w4a8_g128_s16,w4a8_g128_2l",
               help="comma-separated subset of the variants (the bf16 row is always timed)")
ARGS = p.parse_args()
if ARGS.dry:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _viditq import graph_replay_ms, import_viditq  # noqa: E402

import_viditq()
from viditq.kernels import reference, triton_gemm as tg  # noqa: E402
from viditq.kernels.types import QuantizedWeight  # noqa: E402
from viditq.quant_core.quantizers import quantize_weight  # noqa: E402

if not ARGS.dry and not torch.cuda.is_available():
    print("bench_w4a8.py needs a CUDA GPU; use --dry to check the script on the CPU.")
    sys.exit(2)
DEV = "cpu" if ARGS.dry else "cuda"
SHAPES = [sh for sh in [("qkv", 1152, 3456), ("proj", 1152, 1152), ("fc1", 1152, 4608), ("fc2", 4608, 1152)]
          if sh[0] in ARGS.shapes.split(",")]
MS = ARGS.m
if ARGS.dry:
    SHAPES, MS = [("tiny", 128, 96)], [48]
GPU = "cpu" if ARGS.dry else torch.cuda.get_device_name().lower().replace(" ", "_").replace("-", "_")
T0 = time.time()
ROWS, ERRORS = [], []


def graph_ms(fn):
    """Median time of fn replayed from a CUDA graph (None on the interpreter)."""
    if ARGS.dry:
        fn()
        return None
    return graph_replay_ms(fn, rep=60)


def rel_err(y, r):
    y, r = y.float(), r.float()
    return float("inf") if not torch.isfinite(y).all() else ((y - r).norm() / r.norm()).item()


def write():
    out_dir = pathlib.Path(ARGS.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = dict(gpu=GPU, command="python bench/bench_w4a8.py " + " ".join(sys.argv[1:]), torch=torch.__version__,
               triton=triton.__version__, rows=ROWS, errors=ERRORS)
    tmp = out_dir / f"w4a8_{GPU}.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(out_dir / f"w4a8_{GPU}.json")


def run_shape(m, name, k, n):
    g = torch.Generator().manual_seed(m + k + n)
    x = (torch.randn(m, k, generator=g) * (torch.rand(k, generator=g) * 4 + 0.1)).to(torch.bfloat16).to(DEV)
    bias = (torch.randn(n, generator=g) * 0.1).to(torch.bfloat16).to(DEV)
    scale = (torch.rand(n, generator=g) * 0.02 + 0.002).to(DEV)
    w8 = QuantizedWeight(torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(DEV), scale, None,
                         "int8", k, 0)
    w4 = QuantizedWeight(reference.pack_int4(torch.randint(-8, 8, (n, k), generator=g)).to(DEV), scale, None, "int4",
                         k, 0)
    a8 = reference.quantize_activation(x, None, 0, "int8", 127, None, 0)
    # perm32 codes (16 even then 16 odd channels per 32, the order the quantize kernel writes for W4A8) + sums
    q32 = a8.q.reshape(m, k // 32, 16, 2).transpose(2, 3).reshape(m, k).contiguous()
    a4 = type(a8)(q=q32, scale=a8.scale, qsum=a8.q.to(torch.int32).sum(-1, keepdim=True, dtype=torch.int32))
    wb = reference.dequantize_weight(w8).to(torch.bfloat16)
    base = graph_ms(lambda: F.linear(x, wb, bias))
    ROWS.append(dict(M=m, K=k, N=n, layer=name, variant="bf16", ms=base))
    # the layers' own formats: split16 bytes, natural-order codes (+ per-token / per-group code sums where the
    # raw-nibble kernels need them); groups of 128 from a real quantizer run on a random weight with outlier columns
    wf = torch.randn(n, k, generator=g) * (torch.rand(k, generator=g) * 2 + 0.1)
    s16 = lambda w: dataclasses.replace(w, data=reference.repack_int4(w.data, "pairs", "split16"), pack="split16")
    wg = quantize_weight(wf, bits=4, granularity="group", group_size=128)
    w2 = quantize_weight(wf, bits=4, granularity="group", group_size=128, group_scale="int8")
    wg, w2 = (dataclasses.replace(w, data=w.data.to(DEV), scale=w.scale.to(DEV),
                                  gparam=None if w.gparam is None else w.gparam.to(DEV)) for w in (wg, w2))
    sums = lambda grp: type(a8)(q=a8.q, scale=a8.scale, qsum=a8.q.to(torch.int32).reshape(m, k // grp, grp).sum(
        -1, dtype=torch.int32))
    cases = [("w8a8_int8", a8, w8, False, "1"), ("w4a8_asm", a4, w4, "perm32", "1"),
             ("w4a8_triton", a4, w4, "perm32", "0"), ("w4a8_s16", sums(k), s16(w4), False, "1"),
             ("w4a8_g128_s16", sums(128), s16(wg), False, "1"), ("w4a8_g128_2l", a8, s16(w2), False, "1")]
    wanted = set(ARGS.variants.split(","))
    for variant, a, w, perm, asm in cases:
        if variant not in wanted:
            continue
        os.environ["VIDITQ_W4_ASM"] = asm
        ref = reference.quantized_matmul(a8, w, bias, torch.float32)
        out = torch.full((m, n), float("nan"), device=DEV, dtype=torch.bfloat16)
        try:
            sums = (int(a8.q.sum()), int(a.q.sum()), int(w.data.sum()))
            y = tg.quantized_matmul(a, w, bias, torch.bfloat16, out=out, a_perm=perm)  # tunes once per shape
            e = rel_err(y, ref)
            if e > 8e-3:  # tell a wrong kernel from inputs that changed under it
                y2 = tg.quantized_matmul(a, w, bias, torch.bfloat16, a_perm=perm)
                print(f"[diag] err {e:.2e}; inputs changed: {sums != (int(a8.q.sum()), int(a.q.sum()), int(w.data.sum()))}"
                      f"; vs fresh ref {rel_err(y, reference.quantized_matmul(a8, w, bias, torch.float32)):.2e}; "
                      f"rerun vs ref {rel_err(y2, ref):.2e}; rerun vs first {rel_err(y2, y):.2e}", flush=True)
            cfg = tg.last_config
            t = graph_ms(lambda: tg.quantized_matmul(a, w, bias, torch.bfloat16, out=out, a_perm=perm))
            ROWS.append(dict(M=m, K=k, N=n, layer=name, variant=variant, ms=t, rel_err=e, correct=e < 8e-3,
                             config=list(cfg) if cfg else None, x_bf16=(base / t) if base and t else None))
            print(f"{m}x{k}x{n} {variant:12s} {str(cfg):38s} {t or 0:.4f} ms err {e:.1e}", flush=True)
        except Exception as ex:
            ERRORS.append(f"{variant} {m}x{k}x{n}: {str(ex)[-400:]}")
            print(f"[error] {variant} {m}x{k}x{n}: {ex!r}"[:300], flush=True)
    os.environ["VIDITQ_W4_ASM"] = "1"


for m in MS:
    for name, k, n in SHAPES:
        if time.time() - T0 > ARGS.budget_s:
            print(f"[budget] skipped {m}x{k}x{n}", flush=True)
            continue
        run_shape(m, name, k, n)
        write()

COLS = ("bf16", "w8a8_int8", "w4a8_asm", "w4a8_triton", "w4a8_s16", "w4a8_g128_s16", "w4a8_g128_2l")
print(f"\n{'M x K x N':20s} " + " ".join(f"{c[:10]:>10s}" for c in COLS) + "  (ms; last: 2l / w8a8, 2l / g128)")
for m in MS:
    for name, k, n in SHAPES:
        r = {x["variant"]: x["ms"] for x in ROWS if (x["M"], x["K"], x["N"]) == (m, k, n) and x.get("correct", True)}
        if r.get("bf16") is None and not ARGS.dry:
            continue
        cols = [r.get(v) for v in COLS]
        ratios = [f"{a / b:.2f}x" for a, b in ((cols[1], cols[6]), (cols[5], cols[6])) if a and b]
        print(f"{m}x{k}x{n:<10d} " + " ".join(f"{c:10.4f}" if c else "         -" for c in cols)
              + "  " + " ".join(ratios))
print(f"{sum(1 for x in ROWS if x.get('correct') is False)} incorrect rows, {len(ERRORS)} errors, "
      f"{time.time() - T0:.0f} s")
