"""Quantized-linear benchmark (GPU only; never run in CI).

For the PixArt / OpenSORA linear shapes (hidden 1152) at M = 2048, 8192, 32768 it first checks every kernel
against the torch reference, then times (median of triton.testing.do_bench, L2 flushed between reps):
cuBLAS bf16 (F.linear), torch._int_mm, torch._scaled_mm (fp8, row-wise scales), our W8A8 int8, W8A8 fp8 and
W4A8 GEMMs (the GEMM alone and with our fused activation quantize in front), and the fused activation quantize
against its bandwidth floor. Writes bench/results/linear_<gpu>.json and prints a table last.

    python bench/bench_linear.py                      # everything (about 5-8 minutes on an H100/H200)
    python bench/bench_linear.py --m 8192 --shapes pixart
    python bench/bench_linear.py --dry                # CPU interpreter, tiny shapes: checks this script only
"""
import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, nargs="+", default=[8192, 32768, 2048])
    p.add_argument("--shapes", default="all", choices=["all", "pixart", "opensora"])
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--logdir", default=None, help="extra logs (candidate timings, compiler reports, IR)")
    p.add_argument("--had-block", type=int, default=128)
    p.add_argument("--no-sweep", action="store_true", help="skip the all-candidates correctness sweep")
    p.add_argument("--budget-s", type=float, default=540.0, help="stop timing new shapes after this many s")
    p.add_argument("--dry", action="store_true", help="run on the CPU interpreter with tiny shapes")
    p.add_argument("--explore", action="store_true",
                   help="instead of the table: time every quantize / W4A8 candidate at the PixArt shapes (logs)")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="CPU: merge result files of several runs into --out/linear_<gpu>.json (a later file's rows "
                        "replace an earlier file's rows of the same M x K x N; each row keeps its run's command)")
    return p.parse_args()


def merge(paths, out_dir):
    """One results file from several runs (same GPU): rows by (M, K, N) from the last file that has them."""
    runs = [json.loads(pathlib.Path(p).read_text()) for p in paths]
    if len({r["gpu"] for r in runs}) != 1:
        sys.exit(f"--merge: the files come from different GPUs: {sorted({r['gpu'] for r in runs})}")
    shapes, rows = {}, []
    for i, run in enumerate(runs):
        for r in run["rows"]:
            shapes[(r["M"], r["K"], r["N"])] = i
    for i, run in enumerate(runs):
        rows += [dict(r, command=r.get("command", run["command"])) for r in run["rows"]
                 if shapes[(r["M"], r["K"], r["N"])] == i]
    res = dict(runs[-1], rows=rows, command=" ; ".join(dict.fromkeys(r["command"] for r in runs)),
               merged_from=[r["command"] for r in runs])
    out = pathlib.Path(out_dir) / f"linear_{runs[-1]['gpu'].lower().replace(' ', '_').replace('-', '_')}.json"
    out.write_text(json.dumps(res, indent=1))
    print(f"merged {len(rows)} rows of {len(runs)} runs into {out}")


ARGS = _parse()
if ARGS.merge:
    merge(ARGS.merge, ARGS.out)
    sys.exit(0)
if ARGS.dry:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def _import_pkg():
    from _viditq import import_viditq  # bench/_viditq.py, beside this script

    import_viditq()
    from viditq.kernels import reference, triton_act_quant, triton_gemm, triton_ops  # noqa: F401
    from viditq.kernels.types import QuantizedWeight

    return reference, triton_act_quant, triton_gemm, triton_ops, QuantizedWeight


if not ARGS.dry and not torch.cuda.is_available():
    print("bench_linear.py needs a CUDA GPU (it times kernels); none found. Use --dry to check the script on CPU.")
    sys.exit(2)

import triton  # noqa: E402

reference, taq, tgemm, tops, QuantizedWeight = _import_pkg()
DEV = "cpu" if ARGS.dry else "cuda"
T0 = time.time()

# (name, K, N); the same hidden size 1152 in PixArt-α/Σ and OpenSORA (STDiT).
PIXART = [("qkv", 1152, 3456), ("proj", 1152, 1152), ("fc1", 1152, 4608), ("fc2", 4608, 1152)]
OPENSORA_EXTRA = [("cross_kv", 1152, 2304)]  # also PixArt's cross-attention kv_linear
if ARGS.shapes == "pixart":
    SHAPES = PIXART
elif ARGS.shapes == "opensora":
    SHAPES = PIXART + OPENSORA_EXTRA
else:
    SHAPES = PIXART + OPENSORA_EXTRA
MS = ARGS.m
if ARGS.dry:
    SHAPES = [("tiny", 256, 96)]
    MS = [48]


def bench(fn):
    if ARGS.dry:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def sync():
    if not ARGS.dry:
        torch.cuda.synchronize()


def rel_err(y, r):
    y, r = y.float(), r.float()
    if not torch.isfinite(y).all():
        return float("inf")
    return ((y - r).norm() / r.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------------------------
def make_weight(n, k, fmt, group=0, asym=False):
    g = torch.Generator(device="cpu").manual_seed(n * 7 + k)
    shape = (n, k // group) if group else (n,)
    scale = (torch.rand(shape, generator=g) * 0.02 + 0.002).to(DEV)
    zero = None
    if fmt == "int8":
        data = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(DEV)
        if asym:
            zero = torch.randint(-20, 20, shape, generator=g).float().to(DEV)
    elif fmt == "int4":
        data = reference.pack_int4(torch.randint(-8, 8, (n, k), generator=g)).to(DEV)
        if asym:
            zero = torch.randint(-3, 3, shape, generator=g).float().to(DEV)
    else:
        data = (torch.randn(n, k, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn).to(DEV)
    return QuantizedWeight(data=data, scale=scale, zero=zero, fmt=fmt, in_features=k, group_size=group)


def split16(w):
    """w (int4, "pairs") in the "split16" byte order QuantLinear keeps in memory (K % 64 == 0; else w itself)."""
    if w.in_features % 64:
        return w
    return dataclasses.replace(w, data=reference.repack_int4(w.data, "pairs", "split16"), pack="split16")


def make_x(m, k, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed + m + k)
    x = torch.randn(m, k, generator=g) * (torch.rand(k, generator=g) * 4 + 0.1)  # channel imbalance
    x[0] *= 1000.0
    if m > 2:
        x[m // 2] = 0.0
    return x.to(dtype).to(DEV)


LOG = {"checks": [], "errors": [], "ceilings": {}, "compiler": {}}


def check(name, ok, **info):
    LOG["checks"].append(dict(name=name, ok=bool(ok), **info))
    print(f"[check] {'ok  ' if ok else 'FAIL'} {name} {info}", flush=True)
    return ok


# ---------------------------------------------------------------------------------------------------------------
def _perm_codes(q, perm):
    """The reference codes in the channel order the kernel writes for `perm` (see quantize_activation)."""
    if perm in (True, "parity"):
        return torch.cat([q[:, 0::2], q[:, 1::2]], 1)
    if perm == "perm32":
        m, k = q.shape
        return q.reshape(m, k // 32, 16, 2).transpose(2, 3).reshape(m, k)
    return q


def _check_act_quant(x, r, mv, had, fmt, qmax, ss, sg, cfg, m, k, label, prec=None, perm=False):
    taq.tuner.force = cfg
    try:
        a = taq.quantize_activation(x, mv, had, fmt, qmax, ss, sg, prec=prec, perm=perm)
        sync()
    except Exception as ex:
        LOG["errors"].append(f"act_quant {label}: {str(ex)[-600:]}")
        print(f"[error] act_quant {label}: {ex!r}"[:300], flush=True)
        return
    finally:
        taq.tuner.force = None
    rq = _perm_codes(r.q, perm)
    dq = (a.q.float() - rq.float()).abs()
    if fmt == "fp8":  # one e4m3 step at most: compare relative to the larger magnitude
        bad = (dq > 0.13 * torch.maximum(a.q.float().abs(), rq.float().abs()) + 2.0 ** -9).sum().item()
    else:
        bad = (dq > 1).sum().item()
    frac = (dq > 0).float().mean().item()
    srel = ((a.scale - r.scale).abs() / r.scale).max().item()
    fast = prec == "fast" and had > 1 and (mv is not None or x.dtype == torch.float32)
    qs_ok = True
    if sg:
        qs_ok = (a.qsum - a.q.to(torch.int32).reshape(m, k // sg, sg).sum(-1)).abs().max().item() == 0
    check(f"act_quant {label}", bad == 0 and frac < (0.02 if fast else 0.001) and srel < (1e-3 if fast else 1e-5)
          and qs_ok, mismatch_frac=frac, scale_rel=srel)


def correctness_sweep():
    """Every kernel combination against the reference on an odd-sized problem; every GEMM candidate config."""
    m, k, n = (37, 256, 96) if ARGS.dry else (3008, 1152, 1152)
    mult = (torch.rand(k) + 0.5).to(DEV)
    # activation quantize: (fmt, qmax, had, mult, sum_group, static, prec, perm)
    aq_combos = [("int8", 127, 128, True, 0, False, "exact", False), ("int8", 127, 128, True, 0, False, "fast", False),
                 ("int8", 127, 0, False, 0, False, None, False), ("int8", 31, 64, True, 64, False, "exact", False),
                 ("int8", 7, 16, False, k, False, None, False), ("fp8", 127, 128, True, 0, False, "exact", False),
                 ("int8", 127, 128, True, 128, True, "exact", False), ("fp8", 127, 0, False, 0, True, None, False),
                 ("int8", 127, 128, True, k, False, "exact", "perm32"),
                 ("int8", 127, 128, True, k, False, "exact", "parity")]
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        for fmt, qmax, had, use_mult, sg, static, prec, perm in aq_combos:
            main = had == 128 and use_mult and not sg and not static and fmt == "int8"
            if dt != torch.bfloat16 and not main:
                continue
            x = make_x(m, k, dt, seed=1)
            ss = torch.tensor(0.05, device=DEV) if static else None
            mv = mult if use_mult else None
            r = reference.quantize_activation(x, mv, had, fmt, qmax, ss, sg)
            cands = taq.candidates(k, had, sg, bool(sg) and sg == k, m, taq.PERM_MODES[perm])
            for cfg in (cands if (main and dt == torch.bfloat16) else cands[:1]):  # every candidate for the timed one
                _check_act_quant(x, r, mv, had, fmt, qmax, ss, sg, cfg, m, k, f"{dt} {fmt} qmax={qmax} had={had} "
                                 f"mult={use_mult} sum_group={sg} static={static} prec={prec} perm={perm} cfg={cfg}",
                                 prec=prec, perm=perm)
    # GEMMs: every candidate of the timed variants, the default ones for the rest; (fmt, group, asym, layout)
    timed = {("int8", 0, False, False), ("fp8", 0, False, False), ("int4", 0, False, "parity"),
             ("int4", 0, False, "perm32")}
    combos = [("int8", 0, False, False), ("int8", 0, True, False), ("int8", 64, False, False),
              ("int8", 128, True, False), ("fp8", 0, False, False), ("int4", 0, False, False),
              ("int4", 0, True, False), ("int4", 128, True, False), ("int4", 0, False, "parity"),
              ("int4", 0, False, "perm32"), ("int4", 0, True, "perm32"), ("int4", 128, False, "parity"),
              ("int4", 128, False, "perm32"), ("int4", 64, True, "perm32")]
    x = make_x(m, k, torch.bfloat16, seed=2)
    bias = (torch.randn(n) * 0.1).to(torch.bfloat16).to(DEV)
    tma = tgemm.tma_ok(torch.device(DEV))
    for fmt, group, asym, perm in combos:
        w = make_weight(n, k, fmt, group, asym)
        af = "fp8" if fmt == "fp8" else "int8"
        sg = (group or k) if (asym or perm) else 0  # the layer asks for code sums for int4 (raw-nibble kernels)
        a = reference.quantize_activation(x, None, 0, af, 127, None, sg)
        ref = reference.quantized_matmul(a, w, bias, torch.float32)
        if perm:
            a = type(a)(q=_perm_codes(a.q, perm).contiguous(), scale=a.scale, qsum=a.qsum)
        cands = tgemm.candidates(m, n, k, fmt == "int4", group, tma, tma, taq.PERM_MODES[perm])
        if (fmt, group, asym, perm) not in timed:
            cands = [([c for c in cands if c[0] == kd] or [None])[0]
                     for kd in ("ptr", "tma", "tmas", "tma2", "tma3", "swap", "swapt", "swapts2")]
            cands = [c for c in cands if c is not None]
        for c in cands:
            tgemm.tuner.force = c
            label = f"gemm {fmt} group={group} asym={asym} layout={perm} cfg={c}"
            try:
                out = torch.full((m, n), float("nan"), device=DEV, dtype=torch.bfloat16)
                y = tgemm.quantized_matmul(a, w, bias, torch.bfloat16, out=out, a_perm=perm)
                sync()
                e = rel_err(y, ref)
                check(label, e < 8e-3, rel_err=e)
            except Exception as ex:  # a config that cannot compile here is reported, not fatal
                LOG["errors"].append(f"{label}: {str(ex)[-600:]}")
                print(f"[error] {label}: {ex!r}"[:300], flush=True)
            finally:
                tgemm.tuner.force = None
    # the whole layer through the dispatcher, 3-D input, both W4A8 layouts and W8A8
    from viditq.kernels import dispatch

    x3 = make_x(2 * 129, k, torch.bfloat16, seed=3).reshape(2, 129, k)
    for fmt, asym, layout in (("int8", True, None), ("int4", False, "perm32"), ("int4", True, "parity")):
        w = make_weight(n, k, fmt, 0, asym)
        if layout:
            os.environ["VIDITQ_W4_LAYOUT"] = layout
        y = dispatch.quant_linear(x3, w, bias, mult, 128, "int8", 127, None, backend="triton")
        os.environ.pop("VIDITQ_W4_LAYOUT", None)
        r = dispatch.quant_linear(x3, w, bias, mult, 128, "int8", 127, None, backend="torch")
        e = rel_err(y, r)
        check(f"dispatch.quant_linear bf16 3-D {fmt} asym={asym} layout={layout} had=128", e < 1e-2 and
              y.shape == r.shape, rel_err=e)


# ---------------------------------------------------------------------------------------------------------------
def ceilings():
    if ARGS.dry:
        LOG["ceilings"] = {"copy_GBps": 50.0, "bf16_tflops": 1.0}
        return
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=DEV).random_()
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src))
    bw = 2 * n / (t * 1e-3) / 1e9
    del src, dst
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    t = bench(lambda: a @ b)
    LOG["ceilings"] = {"copy_GBps": bw, "bf16_tflops": 2 * 8192 ** 3 / (t * 1e-3) / 1e12}
    print(f"[ceilings] copy {bw:.0f} GB/s (read+write), bf16 8192^3 {LOG['ceilings']['bf16_tflops']:.0f} TFLOP/s",
          flush=True)


def compiler_report(tag, kern):
    """Registers, spills, shared memory, and which matrix instructions the kernel uses."""
    if kern is None or ARGS.dry:
        return
    try:
        info = {"n_regs": getattr(kern, "n_regs", None), "n_spills": getattr(kern, "n_spills", None),
                "shared": getattr(kern.metadata, "shared", None),
                "num_warps": getattr(kern.metadata, "num_warps", None),
                "num_stages": getattr(kern.metadata, "num_stages", None)}
        ptx = kern.asm.get("ptx", "")
        info["ptx_wgmma"] = ptx.count("wgmma.mma_async")
        info["ptx_mma_sync"] = ptx.count("mma.sync")
        cubin = kern.asm.get("cubin")
        if cubin is not None:
            with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
                f.write(cubin)
            try:
                sass = subprocess.run(["cuobjdump", "-sass", f.name], capture_output=True, text=True, timeout=60).stdout
                for op in ("IGMMA", "QGMMA", "HGMMA", "IMMA", "HMMA", "LDL", "STL", "I2F", "F2I"):
                    info["sass_" + op] = sum(1 for line in sass.splitlines() if op in line)
            except Exception as e:
                info["sass_error"] = repr(e)[:200]
        if ARGS.logdir:
            d = pathlib.Path(ARGS.logdir) / "ir"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{tag}.ttgir").write_text(kern.asm.get("ttgir", ""))
            (d / f"{tag}.ptx").write_text(ptx)
        LOG["compiler"][tag] = info
        print(f"[compiler] {tag}: {info}", flush=True)
    except Exception as e:
        LOG["errors"].append(f"compiler report {tag}: {e!r}"[:300])


# ---------------------------------------------------------------------------------------------------------------
ROWS = []


def graph_ms(fn):
    """Median GPU time of fn replayed from a CUDA graph: the kernels alone, no Python / launch overhead."""
    if ARGS.dry:
        return None
    try:
        from _viditq import graph_replay_ms  # bench/_viditq.py, beside this script

        return graph_replay_ms(fn)
    except Exception as e:
        LOG["errors"].append(f"graph capture: {str(e)[-300:]}")
        return None


def host_us(fn, n=30):
    """Host (CPU) time per call: Python wrapper + launch, the GPU not waited for."""
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    sync()
    return (t1 - t0) / n * 1e6


def measure(fn):
    return {"ms": bench(fn), "ms_graph": graph_ms(fn), "host_us": host_us(fn)}


def add(m, k, n, variant, meas, base, correct, **extra):
    ms, msg = meas["ms"], meas.get("ms_graph")
    row = {"M": m, "K": k, "N": n, "variant": variant, "ms": round(ms, 5),
           "speedup_vs_bf16": round(base["ms"] / ms, 3), "correct": bool(correct),
           "ms_graph": round(msg, 5) if msg else None,
           "speedup_graph_vs_bf16": round(base["ms_graph"] / msg, 3) if msg and base.get("ms_graph") else None,
           "host_us": round(meas.get("host_us", 0.0), 1)}
    row.update(extra)
    ROWS.append(row)
    return row


def time_shape(m, name, k, n):
    x = make_x(m, k, torch.bfloat16, seed=5)
    mult = (torch.rand(k) + 0.5).to(DEV)
    had = ARGS.had_block if k % ARGS.had_block == 0 else 0
    bias = (torch.randn(n) * 0.1).to(torch.bfloat16).to(DEV)
    w8 = make_weight(n, k, "int8")
    wf8 = make_weight(n, k, "fp8")
    w4 = make_weight(n, k, "int4")
    w4g = make_weight(n, k, "int4", group=128)
    w4s, w4gs = split16(w4), split16(w4g)  # the byte order QuantLinear keeps int4 weights in (K % 64 == 0)
    wb = reference.dequantize_weight(w8).to(torch.bfloat16)

    base = measure(lambda: F.linear(x, wb, bias))
    add(m, k, n, "bf16", base, base, True, layer=name)

    a8 = taq.quantize_activation(x, mult, had, "int8", 127, None, 0)
    af8 = taq.quantize_activation(x, mult, had, "fp8", 127, None, 0)
    sync()
    # baselines on the same codes
    try:
        wt = w8.data.t()
        meas = measure(lambda: torch._int_mm(a8.q, wt))
        y = torch._int_mm(a8.q, wt).float() * a8.scale[:, None] * w8.scale[None, :] + bias.float()
        ref8 = reference.quantized_matmul(a8, w8, bias, torch.float32)
        add(m, k, n, "int_mm", meas, base, rel_err(y, ref8) < 1e-4, layer=name, mode="gemm_only_no_epilogue")
    except Exception as e:
        LOG["errors"].append(f"int_mm {m}x{k}x{n}: {e!r}"[:300])
    try:
        sa = af8.scale[:, None].contiguous()
        sb = wf8.scale[None, :].contiguous()
        wft = wf8.data.t()
        fn = lambda: torch._scaled_mm(af8.q, wft, scale_a=sa, scale_b=sb, bias=bias, out_dtype=torch.bfloat16)  # noqa
        y = fn()
        meas = measure(fn)
        reff = reference.quantized_matmul(af8, wf8, bias, torch.float32)
        add(m, k, n, "scaled_mm_fp8", meas, base, rel_err(y, reff) < 8e-3, layer=name, mode="gemm+epilogue")
    except Exception as e:
        LOG["errors"].append(f"scaled_mm {m}x{k}x{n}: {e!r}"[:300])

    # W4A8 GEMM alone on the same codes in both channel orders, with the per-token (group) code sums the layer
    # passes (raw-nibble kernels)
    def w4_codes(layout, group):
        g = group or k
        qsum = a8.q.to(torch.int32).reshape(m, k // g, g).sum(-1, dtype=torch.int32)
        return type(a8)(q=_perm_codes(a8.q, layout).contiguous(), scale=a8.scale, qsum=qsum)

    variants = [("w8a8_int8", w8, "int8", "per_channel", False), ("w8a8_fp8", wf8, "fp8", "per_channel", False),
                ("w4a8", w4s, "int8", "per_channel", "split16"), ("w4a8", w4gs, "int8", "group128", "split16"),
                ("w4a8", w4, "int8", "per_channel", "perm32"), ("w4a8", w4, "int8", "per_channel", "parity"),
                ("w4a8", w4g, "int8", "group128", "perm32"), ("w4a8", w4g, "int8", "group128", "parity")]
    for variant, w, af, wkind, layout in variants:
        if af == "fp8" and not tops.fp8_ok(torch.device(DEV)):
            continue
        if w.pack == "split16" and w.pack != layout:
            continue  # (K % 64 != 0: no split16 copy)
        perm = False if layout == "split16" else layout  # split16 weights: natural-order codes with their sums
        a = w4_codes(perm, w.group_size) if layout else (a8 if af == "int8" else af8)
        try:
            out = torch.full((m, n), float("nan"), device=DEV, dtype=torch.bfloat16)
            y = tgemm.quantized_matmul(a, w, bias, torch.bfloat16, out=out, a_perm=perm)  # tunes once per shape
            sync()
            e = rel_err(y, reference.quantized_matmul(a8 if af == "int8" else af8, w, bias, torch.float32))
            kern = tgemm.last_kernel
            cfg = tgemm.last_config
            meas = measure(lambda: tgemm.quantized_matmul(a, w, bias, torch.bfloat16, out=out, a_perm=perm))
            layout = layout or "natural"
            add(m, k, n, variant, meas, base, e < 8e-3, layer=name, weight=wkind, mode="gemm", a_layout=layout,
                rel_err=e, config=list(cfg) if cfg else None)
            if m == 8192:
                compiler_report(f"{variant}_{wkind}_{layout}_{m}x{k}x{n}", kern)
        except Exception as ex:
            LOG["errors"].append(f"{variant} {wkind} {perm} {m}x{k}x{n}: {str(ex)[-600:]}")
            print(f"[error] {variant} {wkind} {perm} {m}x{k}x{n}: {ex!r}"[:300], flush=True)

    # the whole layer: fused activation quantize + GEMM, as QuantLinear calls it (W4A8: the weights in the byte order
    # QuantLinear keeps, split16 where K % 64 == 0); the default Hadamard precision, and the fast one for two variants
    layers = [("w8a8_int8", w8, "int8", "per_channel", None), ("w8a8_fp8", wf8, "fp8", "per_channel", None),
              ("w4a8", w4s, "int8", "per_channel", None), ("w4a8", w4gs, "int8", "group128", None),
              ("w8a8_int8", w8, "int8", "per_channel", "fast"), ("w4a8", w4s, "int8", "per_channel", "fast")]
    for variant, w, af, wkind, prec in layers:
        if af == "fp8" and not tops.fp8_ok(torch.device(DEV)):
            continue
        try:
            if prec:
                os.environ[taq.HAD_PREC_ENV] = prec
            fn = lambda: tops.quant_linear(x, w, bias, mult, had, af, 127, None, 0)  # noqa: E731
            yf = fn()
            ef = rel_err(yf, reference.quantized_matmul(a8 if af == "int8" else af8, w, bias, torch.float32))
            extra = {}
            if w.fmt == "int4" and w.pack == "split16":
                extra["a_layout"] = "split16"
            elif w.fmt == "int4":
                extra["a_layout"] = tops._w4_layouts.get(
                    (taq.m_bucket(m), k, n, w.group_size, False, x.dtype), os.environ.get("VIDITQ_W4_LAYOUT", "auto"))
            add(m, k, n, variant, measure(fn), base, ef < 1e-2, layer=name, weight=wkind, mode="act_quant+gemm",
                rel_err=ef, had_prec=prec or taq.HAD_PREC_DEFAULT, aq_config=list(taq.last_config),
                gemm_config=list(tgemm.last_config), **extra)
        except Exception as ex:
            LOG["errors"].append(f"layer {variant} {wkind} {prec} {m}x{k}x{n}: {str(ex)[-600:]}")
            print(f"[error] layer {variant} {wkind} {prec} {m}x{k}x{n}: {ex!r}"[:300], flush=True)
        finally:
            os.environ.pop(taq.HAD_PREC_ENV, None)

    # fused activation quantize vs its bandwidth floor (bf16 in, int8 codes + fp32 scales out)
    try:
        for fmt, prec in (("int8", "exact"), ("fp8", "exact"), ("int8", "fast")):
            a = taq.quantize_activation(x, mult, had, fmt, 127, None, 0, prec=prec)
            sync()
            r = reference.quantize_activation(x, mult, had, fmt, 127, None, 0)
            dq = (a.q.float() - r.q.float()).abs()
            frac = (dq > 0).float().mean().item()
            srel = ((a.scale - r.scale).abs() / r.scale).max().item()
            ok = (dq.max().item() <= (1 if fmt == "int8" else 32)) and frac < (0.02 if prec == "fast" else 0.001)
            meas = measure(lambda: taq.quantize_activation(x, mult, had, fmt, 127, None, 0, prec=prec))
            kern = taq.last_kernel
            floor = (m * k * 2 + m * k + m * 4) / (LOG["ceilings"]["copy_GBps"] * 1e9) * 1e3
            cfg = taq.last_config
            row = add(m, k, n, "act_quant", meas, base, ok, layer=name, floor_ms=round(floor, 5), fmt=fmt,
                      had_block=had, mult=True, had_prec=prec, over_floor=round(meas["ms"] / floor, 2),
                      over_floor_graph=round(meas["ms_graph"] / floor, 2) if meas["ms_graph"] else None,
                      mismatch_frac=frac, scale_rel=srel, config=list(cfg) if cfg else None)
            if m == 8192:
                compiler_report(f"act_quant_{fmt}_{prec}_{m}x{k}", kern)
            if prec == "exact":  # the plain version (no smoothing, no rotation) for comparison
                mp = measure(lambda: taq.quantize_activation(x, None, 0, fmt, 127, None, 0))
                row["ms_plain_no_rotation"] = round(mp["ms"], 5)
                row["ms_graph_plain_no_rotation"] = round(mp["ms_graph"], 5) if mp["ms_graph"] else None
                row["config_plain"] = list(taq.last_config)
    except Exception as ex:
        LOG["errors"].append(f"act_quant {m}x{k}: {str(ex)[-600:]}")
        print(f"[error] act_quant {m}x{k}: {ex!r}"[:300], flush=True)


def gpu_name():
    if ARGS.dry:
        return "cpu-interpreter"
    return torch.cuda.get_device_name()


def write(final=False):
    out_dir = pathlib.Path(ARGS.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    gname = gpu_name()
    slug = "".join(ch if ch.isalnum() else "_" for ch in gname).strip("_").lower()
    doc = {"gpu": gname, "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
           "torch": torch.__version__, "triton": triton.__version__, "ceilings": LOG["ceilings"],
           "complete": final, "rows": ROWS}
    path = out_dir / f"linear_{slug}.json"
    path.write_text(json.dumps(doc, indent=1))
    if ARGS.logdir:
        d = pathlib.Path(ARGS.logdir)
        d.mkdir(parents=True, exist_ok=True)
        tim = {str(k): {str(c): t for c, t in v.items()} for k, v in tgemm.tuner.timings.items()}
        tim.update({"act_quant " + str(k): {str(c): t for c, t in v.items()} for k, v in taq.tuner.timings.items()})
        (d / "log.json").write_text(json.dumps({"log": LOG, "timings": tim,
                                                "tuner_errors": {str(k): v for k, v in taq.last_errors.items()}},
                                               indent=1, default=str))
    return path


def table():
    print(f"\n{'M':>6} {'K':>5} {'N':>5} {'layer':>8} {'variant':<13} {'mode':<22} {'ms':>7} {'x bf16':>6} "
          f"{'graph':>7} {'x bf16':>6} {'host':>5} ok")
    for r in ROWS:
        mode = r.get("mode", "")
        if r["variant"] == "act_quant":
            mode = f"{r.get('fmt')} floor {r['floor_ms']:.4f}"
        elif r["variant"] == "w4a8":
            mode = r.get("weight", "")[:5] + " " + str(r.get("a_layout", ""))[:6] + " " + mode
        if r.get("had_prec") == "fast":
            mode = "FAST " + mode
        g = r.get("ms_graph") or 0.0
        print(f"{r['M']:>6} {r['K']:>5} {r['N']:>5} {r.get('layer', ''):>8} {r['variant']:<13} {mode[:22]:<22} "
              f"{r['ms']:7.4f} {r['speedup_vs_bf16'] or 0:6.2f} {g:7.4f} {r.get('speedup_graph_vs_bf16') or 0:6.2f} "
              f"{r.get('host_us', 0):5.0f} {'y' if r['correct'] else 'N'}")


# ---------------------------------------------------------------------------------------------------------------
def _time(fn):
    if ARGS.dry:
        return bench(fn)
    return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")


def explore():
    """Every candidate of the rotated quantize (both precisions) and of the W4A8 GEMM, checked then timed, plus
    the layer per variant; for choosing the candidate lists. Writes explore.json under --logdir (or --out)."""
    res = {"act_quant": [], "gemm": [], "layer": [], "errors": [], "skipped": []}
    bw = LOG["ceilings"]["copy_GBps"] * 1e9
    best_aq, best_gemm = {}, {}

    def over_budget(what):
        if time.time() - T0 > ARGS.budget_s:
            res["skipped"].append(what)
            return True
        return False

    def aq_sweep(m, k, legacy):
        if over_budget(f"aq {m}x{k}"):
            return
        x = make_x(m, k, torch.bfloat16, seed=7)
        mult = (torch.rand(k) + 0.5).to(DEV)
        had = ARGS.had_block if k % ARGS.had_block == 0 else 0
        floor = (m * k * 3 + m * 4) / bw * 1e3
        r = reference.quantize_activation(x, mult, had, "int8", 127, None, 0)
        cands = [c for c in taq.candidates(k, had, 0, False, m) if c[0] == "chunk"] + legacy
        for prec in ("exact", "fast"):
            for c in cands:
                if c[0] == "row" and prec == "fast":
                    continue
                taq.tuner.force = c
                try:
                    a = taq.quantize_activation(x, mult, had, "int8", 127, None, 0, prec=prec)
                    sync()
                    dq = (a.q.float() - r.q.float()).abs()
                    srel = ((a.scale - r.scale).abs() / r.scale).max().item()
                    t = _time(lambda: taq.quantize_activation(x, mult, had, "int8", 127, None, 0, prec=prec))
                    row = dict(M=m, K=k, prec=prec, cfg=list(c), ms=t, floor_ms=floor, over=t / floor,
                               flips=(dq > 0).float().mean().item(), maxdq=dq.max().item(), scale_rel=srel)
                    res["act_quant"].append(row)
                    if c[0] == "chunk" and row["maxdq"] <= 1 and t < best_aq.get((m, k, prec), (None, 1e9))[1]:
                        best_aq[(m, k, prec)] = (c, t)
                    print(f"[aq] {m}x{k} {prec:5s} {str(c):34s} {t * 1e3:8.1f} us  {t / floor:5.2f}x floor  "
                          f"flips {row['flips']:.1e} maxdq {row['maxdq']:.0f} scale {srel:.1e}", flush=True)
                except Exception as ex:
                    res["errors"].append(f"aq {m}x{k} {prec} {c}: {str(ex)[-500:]}")
                    print(f"[error] aq {m}x{k} {prec} {c}: {ex!r}"[:300], flush=True)
                finally:
                    taq.tuner.force = None

    def gemm_sweep(m, name, k, n):
        if over_budget(f"gemm {m}x{k}x{n}"):
            return
        x = make_x(m, k, torch.bfloat16, seed=5)
        bias = (torch.randn(n) * 0.1).to(torch.bfloat16).to(DEV)
        a8 = reference.quantize_activation(x, None, 0, "int8", 127, None, k)
        a8p = type(a8)(q=torch.cat([a8.q[:, 0::2], a8.q[:, 1::2]], 1).contiguous(), scale=a8.scale, qsum=a8.qsum)
        a8p_nosum = type(a8)(q=a8p.q, scale=a8.scale, qsum=None)
        af8 = reference.quantize_activation(x, None, 0, "fp8", 127, None, 0)
        jobs = []
        w4 = make_weight(n, k, "int4")
        ref4 = reference.quantized_matmul(a8, w4, bias, torch.float32)
        c4 = tgemm.candidates(m, n, k, True, 0, True, True, True)
        jobs += [("w4a8 u4", a8p, w4, ref4, c) for c in c4]
        jobs += [("w4a8 signed", a8p_nosum, w4, ref4, c) for c in c4[:3]]
        if m == 8192:
            w4g = make_weight(n, k, "int4", 128)
            a8g = reference.quantize_activation(x, None, 0, "int8", 127, None, 128)
            a8gp = type(a8)(q=a8p.q, scale=a8.scale, qsum=a8g.qsum)
            refg = reference.quantized_matmul(a8g, w4g, bias, torch.float32)
            jobs += [("w4a8g128 u4", a8gp, w4g, refg, c) for c in tgemm.candidates(m, n, k, True, 128, True, True, True)
                     if c[0] in ("swapt2", "swapt", "swap")][:3]
        w8 = make_weight(n, k, "int8")
        wf8 = make_weight(n, k, "fp8")
        for c in [("tma2", 128, 128, 128, 8, 3, 4), ("tma2", 64, 128, 128, 8, 4, 4), ("ptr", 128, 128, 128, 8, 3, 4),
                  ("tma3", 64, 128, 128, 8, 2, 4), ("tma3", 64, 64, 128, 8, 4, 4)]:
            jobs.append(("w8a8 int8", type(a8)(q=a8.q, scale=a8.scale), w8,
                         reference.quantized_matmul(a8, w8, bias, torch.float32), c))
            jobs.append(("w8a8 fp8", af8, wf8, reference.quantized_matmul(af8, wf8, bias, torch.float32), c))
        wb = reference.dequantize_weight(w8).to(torch.bfloat16)
        tb = _time(lambda: F.linear(x, wb, bias))
        res["gemm"].append(dict(M=m, K=k, N=n, what="bf16", ms=tb))
        print(f"[gemm] {m}x{k}x{n} bf16 {tb * 1e3:8.1f} us", flush=True)
        for what, a, w, ref, c in jobs:
            tgemm.tuner.force = c
            perm = w.fmt == "int4"
            try:
                out = torch.full((m, n), float("nan"), device=DEV, dtype=torch.bfloat16)
                y = tgemm.quantized_matmul(a, w, bias, torch.bfloat16, out=out, a_perm=perm)
                sync()
                e = rel_err(y, ref)
                t = _time(lambda: tgemm.quantized_matmul(a, w, bias, torch.bfloat16, out=out, a_perm=perm))
                res["gemm"].append(dict(M=m, K=k, N=n, what=what, cfg=list(c), ms=t, rel_err=e, x_bf16=tb / t))
                if e < 8e-3 and t < best_gemm.get((m, k, n, what), (None, 1e9))[1]:
                    best_gemm[(m, k, n, what)] = (c, t)
                print(f"[gemm] {m}x{k}x{n} {what:12s} {str(c):36s} {t * 1e3:8.1f} us {tb / t:5.2f}x bf16 "
                      f"err {e:.1e}", flush=True)
            except Exception as ex:
                res["errors"].append(f"gemm {what} {m}x{k}x{n} {c}: {str(ex)[-500:]}")
                print(f"[error] gemm {what} {m}x{k}x{n} {c}: {ex!r}"[:300], flush=True)
            finally:
                tgemm.tuner.force = None

    def layer(m, name, k, n):
        """quantize (best chunk config found above) + GEMM (best found above), graph replay."""
        if over_budget(f"layer {m}x{k}x{n}"):
            return
        x = make_x(m, k, torch.bfloat16, seed=5)
        mult = (torch.rand(k) + 0.5).to(DEV)
        had = ARGS.had_block if k % ARGS.had_block == 0 else 0
        bias = (torch.randn(n) * 0.1).to(torch.bfloat16).to(DEV)
        w8 = make_weight(n, k, "int8")
        wb = reference.dequantize_weight(w8).to(torch.bfloat16)
        base = graph_ms(lambda: F.linear(x, wb, bias)) or _time(lambda: F.linear(x, wb, bias))
        res["layer"].append(dict(M=m, K=k, N=n, what="bf16", ms=base))
        for variant, w, af, gk in [("w8a8_int8", w8, "int8", "w8a8 int8"), ("w8a8_fp8", make_weight(n, k, "fp8"), "fp8",
                                    "w8a8 fp8"), ("w4a8", make_weight(n, k, "int4"), "int8", "w4a8 u4")]:
            for prec in ("exact", "fast"):
                if (m, k, prec) not in best_aq or (m, k, n, gk) not in best_gemm:
                    continue
                os.environ[taq.HAD_PREC_ENV] = prec
                taq.tuner.force = best_aq[(m, k, prec)][0]
                tgemm.tuner.force = best_gemm[(m, k, n, gk)][0]
                try:
                    fn = lambda: tops.quant_linear(x, w, bias, mult, had, af, 127, None, 0)  # noqa: E731
                    y = fn()
                    rq = reference.quantize_activation(x, mult, had, af, 127, None, 0)
                    e = rel_err(y, reference.quantized_matmul(rq, w, bias, torch.float32))
                    t = graph_ms(fn) or _time(fn)
                    res["layer"].append(dict(M=m, K=k, N=n, what=variant, prec=prec, ms=t, x_bf16=base / t,
                                             rel_err=e, aq_cfg=list(taq.last_config), gemm_cfg=list(tgemm.last_config)))
                    print(f"[layer] {m}x{k}x{n} {variant:10s} {prec:5s} {t * 1e3:8.1f} us {base / t:5.2f}x bf16 "
                          f"err {e:.1e}", flush=True)
                except Exception as ex:
                    res["errors"].append(f"layer {variant} {prec} {m}x{k}x{n}: {str(ex)[-500:]}")
                    print(f"[error] layer {variant} {prec}: {ex!r}"[:300], flush=True)
                finally:
                    os.environ.pop(taq.HAD_PREC_ENV, None)
                    taq.tuner.force = None
                    tgemm.tuner.force = None

    shapes = [("tiny", 256, 96)] if ARGS.dry else PIXART
    m0 = 48 if ARGS.dry else 8192
    for k in sorted({s[1] for s in shapes}):
        aq_sweep(m0, k, [("row", 4, 0, 4)] if not ARGS.dry else [])
    for name, k, n in shapes:
        gemm_sweep(m0, name, k, n)
    for name, k, n in shapes:
        layer(m0, name, k, n)
    if not ARGS.dry:
        for m in (32768, 2048):
            for k in (1152, 4608):
                aq_sweep(m, k, [])
        for name, k, n in shapes[:2]:
            gemm_sweep(2048, name, k, n)
    d = pathlib.Path(ARGS.logdir or ARGS.out)
    d.mkdir(parents=True, exist_ok=True)
    res["best_aq"] = {str(kk): v for kk, v in best_aq.items()}
    res["best_gemm"] = {str(kk): v for kk, v in best_gemm.items()}
    res["tuner_errors"] = {str(kk): v for kk, v in taq.last_errors.items()}
    (d / "explore.json").write_text(json.dumps(res, indent=1, default=str))
    print(f"[explore] done at {time.time() - T0:.0f}s; {len(res['errors'])} errors; skipped {res['skipped']}",
          flush=True)


def main():
    print(f"GPU: {gpu_name()}  torch {torch.__version__}  triton {triton.__version__}", flush=True)
    if ARGS.explore:
        ceilings()
        explore()
        return
    ceilings()
    if not ARGS.no_sweep:
        correctness_sweep()
        print(f"[time] sweep done at {time.time() - T0:.0f}s", flush=True)
    for m in MS:
        for name, k, n in SHAPES:
            if time.time() - T0 > ARGS.budget_s:
                LOG["errors"].append(f"budget reached: skipped M={m} {name}")
                continue
            time_shape(m, name, k, n)
            write()
            print(f"[time] M={m} {name} done at {time.time() - T0:.0f}s", flush=True)
    path = write(final=True)
    fails = [c["name"] for c in LOG["checks"] if not c["ok"]] + [f"{r['variant']} {r['M']}x{r['K']}x{r['N']}"
                                                                 for r in ROWS if not r["correct"]]
    print(f"\nwrote {path}; {len(fails)} failed checks: {fails[:20]}; errors: {len(LOG['errors'])}")
    for e in LOG["errors"][:10]:
        print("  error:", e)
    table()


if __name__ == "__main__":
    main()
