"""Glue between the dispatcher and the Triton kernels: pick a kernel by format, device and shape.

quant_linear(...) returns the [M, N] output, or None when no kernel fits (the caller then uses the reference).
quantize_activation(...) always returns a QuantizedActivation (the reference where no kernel fits).
"""
import functools
import glob
import json
import logging
import os

import torch

from . import reference
from . import triton_act_quant as _aq
from . import triton_gemm as _gemm

log = logging.getLogger("vidit_q.kernels")
_noted = set()


def _note_once(msg: str) -> None:
    if msg not in _noted:
        _noted.add(msg)
        log.warning(msg)


@functools.lru_cache(maxsize=8)
def _capability(device_str: str):
    if _aq.INTERPRET or not device_str.startswith("cuda"):
        return (9, 0)  # the interpreter runs every kernel (fp8 included) on the CPU
    return torch.cuda.get_device_capability(torch.device(device_str))


def fp8_ok(device: torch.device) -> bool:
    return _capability(str(device)) >= (8, 9)


def quantize_activation(x, mult=None, had_block=0, fmt="int8", qmax=127, static_scale=None, sum_group=0):
    if fmt == "fp8" and not fp8_ok(x.device):
        _note_once(f"fp8 activations need an sm89+ GPU; {x.device} uses the torch reference")
        return reference.quantize_activation(x, mult, had_block, fmt, qmax, static_scale, sum_group)
    a = _aq.quantize_activation(x, mult, had_block, fmt, qmax, static_scale, sum_group)
    if a is None:
        _note_once(f"no activation-quantize kernel for fmt={fmt} had_block={had_block} sum_group={sum_group} "
                   f"K={x.shape[-1]} dtype={x.dtype}; using the torch reference")
        return reference.quantize_activation(x, mult, had_block, fmt, qmax, static_scale, sum_group)
    return a


# ---- "is this shape slower than bf16?" -------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _measured_table(gpu_name: str):
    """{(M, K, N, variant): speedup_vs_bf16} from bench/results/linear_*.json made on this GPU model."""
    table = {}
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "results")
    for path in glob.glob(os.path.join(root, "linear_*.json")):
        try:
            with open(path) as f:
                data = json.load(f)
        except Exception:
            continue
        if data.get("gpu") != gpu_name:
            continue
        for r in data.get("rows", []):
            # what the layer runs: activation quantize + GEMM, for w4a8 the per-channel weights
            if r.get("mode") != "act_quant+gemm" or r.get("weight", "per_channel") != "per_channel":
                continue
            if r.get("had_prec", _aq.HAD_PREC_DEFAULT) != _aq.HAD_PREC_DEFAULT:
                continue
            if r.get("speedup_vs_bf16") is not None:
                table[(r["M"], r["K"], r["N"], r["variant"])] = (r["speedup_vs_bf16"], r.get("speedup_graph_vs_bf16"))
    return table


def _variant(act_fmt: str, w) -> str:
    return {"fp8": "w8a8_fp8", "int4": "w4a8"}.get(w.fmt, "w8a8_int8")


def _check_speed(x2, w, m, k, n, act_fmt, run):
    """Say once per shape bucket when the quantized path is measured slower than cuBLAS bf16.

    Uses the benchmark's results for this GPU model when present (nearest M measured at this K, N); with
    VIDITQ_CHECK_SPEED=1 it times both paths once on the live shape instead (costs a dequantized weight copy).
    """
    key = (_aq.m_bucket(m), k, n, w.fmt, w.group_size, act_fmt)
    if key in _noted:
        return
    _noted.add(key)
    variant = _variant(act_fmt, w)
    speed = None
    if os.environ.get("VIDITQ_CHECK_SPEED", "0") not in ("0", ""):
        import triton

        wb = reference.dequantize_weight(w).to(x2.dtype)
        t_bf16 = triton.testing.do_bench(lambda: torch.nn.functional.linear(x2, wb), warmup=5, rep=20)
        t_ours = triton.testing.do_bench(run, warmup=5, rep=20)
        speed = t_bf16 / t_ours
        del wb
    else:
        table = _measured_table(torch.cuda.get_device_name(x2.device))
        rows = [(abs(mm - m), sp) for (mm, kk, nn, v), sp in table.items() if kk == k and nn == n and v == variant]
        if rows:
            speed, speed_graph = min(rows, key=lambda r: r[0])[1]
            if speed >= 1.0:
                speed = None
            elif speed_graph is not None and speed_graph >= 1.0:
                log.warning(f"quantized linear {m}x{k}x{n} ({variant}) measured {speed:.2f}x cuBLAS bf16 when "
                            f"launched eagerly but {speed_graph:.2f}x from a CUDA graph: at this size the Python "
                            f"launch overhead dominates (capture the model in a CUDA graph to remove it)")
                return
    if speed is not None and speed < 1.0:
        log.warning(f"quantized linear {m}x{k}x{n} ({variant}, incl. activation quantize) runs at {speed:.2f}x "
                    f"cuBLAS bf16 on this GPU; the layer holds only quantized weights, so it stays on the "
                    f"fastest quantized kernel")


def quant_linear(x, w, bias, mult=None, had_block=0, act_fmt="int8", act_qmax=127, static_scale=None,
                 sum_group=0):
    """y[M, N] = dequant(quantize(x)) @ dequant(w)^T + bias in x's dtype, or None if no kernel fits."""
    if act_fmt == "fp8" and not fp8_ok(x.device):
        _note_once(f"fp8 GEMM needs an sm89+ GPU; {x.device} uses the torch reference")
        return None
    if not _gemm.supported(act_fmt, w):
        _note_once(f"no Triton GEMM for activations {act_fmt} x weights {w.fmt} (group {w.group_size}, "
                   f"zero={'yes' if w.zero is not None else 'no'}); using the torch reference")
        return None
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return None
    if not _aq.supported(x2, had_block, act_fmt, sum_group):
        _note_once(f"no activation-quantize kernel for K={k} had_block={had_block} sum_group={sum_group}; "
                   f"using the torch reference")
        return None
    # int4 weights: the quantize kernel writes the codes in the channel order the W4A8 GEMM reads without a nibble
    # interleave ("parity": even channels then odd ones; "perm32": the same within every 32 channels, one dot per K
    # step), and the per-token (per-group) code sums, so that the swapped W4A8 kernels multiply raw nibbles and
    # correct once in the epilogue (two bitwise ops per four weights instead of a sign fix per weight)
    perm = False
    sg = sum_group
    if w.fmt == "int4" and k % 64 == 0 and os.environ.get("VIDITQ_W4_PERM", "1") != "0":
        perm = "parity"
        if not sg and os.environ.get("VIDITQ_W4_U4", "1") != "0":
            sg = w.group_size or k

    def run_with(layout):
        a = _aq.quantize_activation(x2, mult, had_block, act_fmt, act_qmax, static_scale, sg, perm=layout)
        return _gemm.quantized_matmul(a, w, bias, x.dtype, a_perm=layout)

    if perm:
        perm = _w4_layout(x2, w, k, run_with)

    def run():
        return run_with(perm)

    y = run()
    if y is not None and x2.is_cuda and not _aq.INTERPRET:
        _check_speed(x2, w, x2.shape[0], k, w.out_features, act_fmt, run)
    return y


_w4_layouts = {}


def _w4_layout(x2, w, k, run_with):
    """Activation channel order for a W4A8 layer: VIDITQ_W4_LAYOUT=parity|perm32, or (default) both timed once per
    shape bucket on the GPU (each with its own tuned kernels), the faster kept. The interpreter takes perm32."""
    env = os.environ.get("VIDITQ_W4_LAYOUT", "auto").strip().lower()
    if env in ("parity", "perm32"):
        return env
    if _aq.INTERPRET or not x2.is_cuda or os.environ.get("VIDITQ_TUNE", "1") in ("0", ""):
        return "perm32"
    key = (_aq.m_bucket(x2.shape[0]), k, w.out_features, w.group_size, w.zero is not None, x2.dtype)
    if key not in _w4_layouts:
        import triton

        times = {}
        for layout in ("perm32", "parity"):
            try:
                run_with(layout)  # tunes that path's kernels
                times[layout] = triton.testing.do_bench(lambda: run_with(layout), warmup=5, rep=20,
                                                        return_mode="median")
            except Exception as e:  # a layout whose kernels cannot run here
                times[layout] = float("inf")
                _note_once(f"W4A8 {layout} path failed: {e!r}"[:300])
        _w4_layouts[key] = min(times, key=times.get)
    return _w4_layouts[key]


def quantized_matmul(a, w, bias, out_dtype):
    """GEMM + epilogue alone on an already quantized activation (reference where no kernel fits)."""
    if a.q.dtype == torch.float8_e4m3fn and not fp8_ok(a.q.device):
        return reference.quantized_matmul(a, w, bias, out_dtype)
    y = _gemm.quantized_matmul(a, w, bias, out_dtype)
    return y if y is not None else reference.quantized_matmul(a, w, bias, out_dtype)
