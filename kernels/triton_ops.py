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
from . import triton_prologue_quant as _pq

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
    speed = speed_graph = None
    source = "measured on this shape"
    if os.environ.get("VIDITQ_CHECK_SPEED", "0") not in ("0", ""):
        import triton

        wb = reference.dequantize_weight(w).to(x2.dtype)
        t_bf16 = triton.testing.do_bench(lambda: torch.nn.functional.linear(x2, wb), warmup=5, rep=20)
        t_ours = triton.testing.do_bench(run, warmup=5, rep=20)
        speed = t_bf16 / t_ours
        del wb
    else:
        table = _measured_table(torch.cuda.get_device_name(x2.device))
        source = "as bench/results measured it for this GPU, the layer unfused"
        rows = [(abs(mm - m), sp) for (mm, kk, nn, v), sp in table.items() if kk == k and nn == n and v == variant]
        if rows:
            speed, speed_graph = min(rows, key=lambda r: r[0])[1]
            if speed >= 1.0:
                speed = None
            elif speed_graph is not None and speed_graph >= 1.0:
                log.warning(f"quantized linear {m}x{k}x{n} ({variant}) measured {speed:.2f}x cuBLAS bf16 when "
                            f"launched eagerly but {speed_graph:.2f}x from a CUDA graph: at this size the Python "
                            f"launch overhead dominates (the ViDiT-Q CUDA Graphs node removes it)")
                return
    if speed is not None and speed < 1.0:
        graph = f" launched eagerly, {speed_graph:.2f}x from a CUDA graph," if speed_graph is not None else ""
        log.warning(f"quantized linear {m}x{k}x{n} ({variant}, incl. activation quantize) runs at {speed:.2f}x "
                    f"cuBLAS bf16{graph} on this GPU ({source}); the layer holds only quantized weights, so it "
                    f"stays on the fastest quantized kernel")


# Environment variables that change which kernels a call takes: a layer keeps one plan per their values.
_PLAN_ENV = ("VIDITQ_W4_PERM", "VIDITQ_W4_U4", "VIDITQ_W4_LAYOUT", "VIDITQ_W4_ASM", "VIDITQ_TUNE", _aq.HAD_PREC_ENV,
             _aq._LEGACY_ENV, _aq._PQ_ENV, _gemm._KINDS_ENV)


class LinearPlan:
    """A layer's tuned call for one token-count bucket: two allocations, the quantize launch, the output allocation
    and the GEMM launch, with every choice (kernels, configs, int4 layout, weight descriptor) made once.

    Eager ComfyUI sampling calls each linear once per step with the same shapes; the first call at a bucket takes the
    full path (checks, tuning, the speed note) and leaves a plan on the weight tensor, the later ones run this. The
    plan holds no tensor of the layer: the weight, its scales, the bias and the multiplier come with each call (so
    new scales are used, and the plan never keeps a weight alive).
    """

    __slots__ = ("aq", "gemm", "k", "n", "qdtype", "qsum_cols")

    def __init__(self, aq, gemm, k, n, qdtype, qsum_cols):
        self.aq, self.gemm, self.k, self.n, self.qdtype, self.qsum_cols = aq, gemm, k, n, qdtype, qsum_cols

    def __call__(self, x2, w, mult, bias, static_scale):
        m = x2.shape[0]
        dev = x2.device
        q = torch.empty((m, self.k), device=dev, dtype=self.qdtype)
        scale = torch.empty((m,), device=dev, dtype=torch.float32)
        qsum = torch.empty((m, self.qsum_cols), device=dev, dtype=torch.int32) if self.qsum_cols else None
        sscale = scale if static_scale is None else static_scale.reshape(-1)[:1].to(device=dev, dtype=torch.float32)
        self.aq(x2, scale if mult is None else mult, q, scale, scale if qsum is None else qsum, sscale, m,
                0 if qsum is None else qsum.stride(0))
        c = torch.empty((m, self.n), device=dev, dtype=x2.dtype)
        self.gemm(q, scale, qsum, w.data, w.scale, _gemm.kernel_zero(w), scale if bias is None else bias, c, m)
        return c


def _plain(x2, w, mult, bias) -> bool:
    """Do the call's tensors need none of the conversions the full path makes (the only calls a plan may run)?"""
    s, z = w.scale, w.zero
    return (w.data.is_contiguous() and s.dtype == torch.float32 and s.is_contiguous()
            and (z is None or (z.dtype == torch.float32 and z.is_contiguous()))
            and (mult is None or (mult.dim() == 1 and mult.is_contiguous() and mult.device == x2.device))
            and (bias is None or bias.is_contiguous()))


try:  # os.environ.get encodes the key on every call (~1 us); its backing dict is read directly, same values
    _ENV_DATA, _ENV_KEYS = os.environ._data, tuple(os.environ.encodekey(k) for k in _PLAN_ENV)
except AttributeError:  # another Python: the public way
    _ENV_DATA, _ENV_KEYS = os.environ, _PLAN_ENV


def _plan_key(x2, bias, mult, had_block, act_fmt, act_qmax, static_scale, sum_group):
    m = x2.shape[0]
    return (min(1 << (m - 1).bit_length(), 65536), x2.dtype, x2.device, None if bias is None else bias.dtype,
            mult is None, static_scale is None, had_block, act_fmt, act_qmax, sum_group,
            tuple(map(_ENV_DATA.get, _ENV_KEYS)))


class FusedPlan:
    """A fused layer's tuned call (triton_prologue_quant's producer + quantize kernel, then the GEMM with its epilogue
    and, when armed, the gated residual add) for one token-count bucket: what LinearPlan is for plain layers. Eager
    sampling and compiled graphs without CUDA graphs call every fused layer once per block per step; the full path's
    checks, tuner lookups and argument setup cost ~2-3x the two launches themselves on the GPU's host."""

    __slots__ = ("quant", "gemm", "k", "n", "qdtype", "norm", "w4")

    def __init__(self, quant, gemm, k, n, qdtype, norm, w4=0):
        self.quant, self.gemm, self.k, self.n, self.qdtype, self.norm = quant, gemm, k, n, qdtype, norm
        self.w4 = w4  # int4 weights: perm32 codes + code sums (w4 columns) for the raw-nibble W4A8 kernel

    def __call__(self, x2, shift, scale, rows_per_sample, w, bias, mult, residual, gate, res_rows):
        m, k = x2.shape
        dev = x2.device
        q = torch.empty((m, k), device=dev, dtype=self.qdtype)
        s = torch.empty((m,), device=dev, dtype=torch.float32)
        qs = torch.empty((m, self.w4), device=dev, dtype=torch.int32) if self.w4 else None
        if self.norm:
            rps = int(rows_per_sample)
            sh, sc, stride_sh, stride_sc = _pq.adaln_rows(shift, scale, m, rps, k)
            self.quant(x2, sh, sc, s if mult is None else mult, q, s, m, rps, stride_sh, stride_sc, qs)
        else:
            self.quant(x2, s, s, s if mult is None else mult, q, s, m, max(m, 1), 0, 0, qs)
        bias_t = s if bias is None else bias
        c = torch.empty((m, self.n), device=dev, dtype=x2.dtype)
        wz = _gemm.kernel_zero(w)
        if residual is None:
            self.gemm(q, s, qs, w.data, w.scale, wz, bias_t, c, m)
        else:
            _gemm.check_residual(residual, gate, res_rows, m, self.n)
            self.gemm(q, s, qs, w.data, w.scale, wz, bias_t, c, m, residual, gate, res_rows)
        return c


def prologue_quant_linear(x, prologue, shift, scale, rows_per_sample, eps, w, bias, mult=None, act_fmt="int8",
                          act_qmax=127, had_block=0, residual=None, gate=None, res_rows=0):
    """dispatch.prologue_quant_linear on the GPU: [M, N] in x's dtype, or None where no kernel fits (the caller then
    runs the quantize and the GEMM separately). The first call per token-count bucket takes the full path and leaves
    a FusedPlan on the weight tensor; later calls with the same kind of arguments run the plan."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    forced = _pq.tuner.force is not None or _gemm.tuner.force is not None
    had = int(had_block) if had_block and had_block > 1 else 0
    plannable = (not forced and m > 0 and _plain(x2, w, mult, bias) and w.zero is None
                 and (residual is None or (residual.stride(-1) == 1 and (gate is None or gate.stride(-1) == 1))))
    key = None
    if plannable:
        key = (min(1 << (m - 1).bit_length(), 65536), x2.dtype, x2.device, None if bias is None else bias.dtype,
               mult is None, prologue, had, act_fmt, act_qmax, float(eps), residual is None, gate is None,
               tuple(map(_ENV_DATA.get, _ENV_KEYS)))
        plan = getattr(w.data, "_viditq_fused_plans", {}).get(key)
        if plan is not None:
            return plan(x2, shift, scale, rows_per_sample, w, bias, mult, residual, gate, res_rows)
    if act_fmt == "fp8" and not fp8_ok(x.device):
        return None
    # symmetric int4 weights: each row's code sums (per weight group for group-wise weights; the raw-nibble GEMM
    # subtracts 8 x the sum) written with the codes by the same one-pass kernel; the codes in natural order for
    # weights kept in the "split16" byte order (QuantLinear's default), in the swapped W4A8 kernels' "perm32" order
    # for "pairs" ones (VIDITQ_W4_PERM=0 / VIDITQ_W4_LAYOUT=parity there: natural order, unswapped kernels);
    # VIDITQ_W4_U4=0: no sums (the GEMM unpacks signed nibbles); two-level int4 weights (gparam) take plain codes,
    # no sums (their GEMM makes signed int8 values of the nibbles)
    group = int(w.group_size or 0)
    w4 = 0  # the prologue kernel's W4A8 mode: 1 natural codes + sums, 2 perm32 codes + sums
    if (w.fmt == "int4" and w.zero is None and w.gparam is None and act_fmt == "int8" and k % 64 == 0
            and (not group or _pq.group_sums_supported(k, group)) and os.environ.get("VIDITQ_W4_U4", "1") != "0"):
        if w.pack == "split16":
            w4 = 1
        elif (os.environ.get("VIDITQ_W4_PERM", "1") != "0"
              and os.environ.get("VIDITQ_W4_LAYOUT", "auto").strip().lower() in ("auto", "perm32")):
            w4 = 2
    try:
        got = _pq.prologue_quantize(x2, prologue, shift, scale, rows_per_sample, eps, mult, act_fmt, act_qmax, had,
                                    return_launch=True, perm32=w4 == 2, sums=w4 == 1, sum_group=group if w4 else 0)
        if got is None:
            return None
        a, quant_fn = got
        got = _gemm.quantized_matmul(a, w, bias, x.dtype, return_launch=True, residual=residual, gate=gate,
                                     res_rows=res_rows, a_perm="perm32" if w4 == 2 else False)
    except Exception as e:  # int4 only: a kernel that cannot run here leaves the general path (parity / natural;
        if not w4 and w.pack != "split16":  # for split16 weights the reference)
            raise
        _note_once(f"fused W4A8 ({'split16' if w.pack == 'split16' else 'perm32'}) path failed, using the general "
                   f"one: {e!r}"[:300])
        return None
    if got is None:
        if w4:
            return None  # (the caller's general path quantizes again)
        return quantized_matmul(a, w, bias, x.dtype, residual, gate, res_rows)  # no kernel here: the reference
    y, gemm_fn = got
    if plannable and quant_fn is not None and gemm_fn is not None:
        _gemm.tensor_cache(w.data, "_viditq_fused_plans")[key] = FusedPlan(
            quant_fn, gemm_fn, k, w.out_features, a.q.dtype, prologue == "norm_modulate",
            (k // group if group else 1) if w4 else 0)
    return y


def _split16_failed(w, e: Exception) -> None:
    """A kernel call raised e: re-raise it, except for int4 weights in the split16 byte order, which have only the
    swapped W4A8 kernels (the caller then takes the torch reference; said once)."""
    if w.pack != "split16":
        raise e
    _note_once(f"W4A8 kernels for split16 weights failed here, using the torch reference: {e!r}"[:300])


def quant_linear(x, w, bias, mult=None, had_block=0, act_fmt="int8", act_qmax=127, static_scale=None,
                 sum_group=0):
    """y[M, N] = dequant(quantize(x)) @ dequant(w)^T + bias in x's dtype, or None if no kernel fits."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    forced = _aq.tuner.force is not None or _gemm.tuner.force is not None
    if not forced and x2.shape[0]:
        plans = getattr(w.data, "_viditq_plans", None)
        if plans and _plain(x2, w, mult, bias):
            plan = plans.get(_plan_key(x2, bias, mult, had_block, act_fmt, act_qmax, static_scale, sum_group))
            if plan is not None:
                return plan(x2, w, mult, bias, static_scale)
    if act_fmt == "fp8" and not fp8_ok(x.device):
        _note_once(f"fp8 GEMM needs an sm89+ GPU; {x.device} uses the torch reference")
        return None
    if not _gemm.supported(act_fmt, w):
        _note_once(f"no Triton GEMM for activations {act_fmt} x weights {w.fmt} (group {w.group_size}, "
                   f"zero={'yes' if w.zero is not None else 'no'}); using the torch reference")
        return None
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
    # (weights kept in the "split16" byte order take natural-order codes: only the sums)
    perm = False
    sg = sum_group
    u4 = not sg and w.gparam is None and os.environ.get("VIDITQ_W4_U4", "1") != "0"
    if w.fmt == "int4" and w.pack == "split16":
        if u4:
            sg = w.group_size or k
    elif w.fmt == "int4" and k % 64 == 0 and os.environ.get("VIDITQ_W4_PERM", "1") != "0":
        perm = "parity"
        if u4:
            sg = w.group_size or k

    def run_with(layout, return_launch=False):
        a = _aq.quantize_activation(x2, mult, had_block, act_fmt, act_qmax, static_scale, sg, perm=layout,
                                    return_launch=return_launch)
        if not return_launch:
            return _gemm.quantized_matmul(a, w, bias, x.dtype, a_perm=layout)
        if a is None:
            return None, None, None, None
        a, aq_fn = a
        y, gemm_fn = _gemm.quantized_matmul(a, w, bias, x.dtype, a_perm=layout, return_launch=True) or (None, None)
        return y, aq_fn, gemm_fn, a

    if perm:
        perm = _w4_layout(x2, w, k, run_with)

    def run():
        return run_with(perm)

    try:
        y, aq_fn, gemm_fn, a = run_with(perm, return_launch=True)
    except Exception as e:
        _split16_failed(w, e)
        return None
    if y is not None and x2.is_cuda and not _aq.INTERPRET:
        _check_speed(x2, w, x2.shape[0], k, w.out_features, act_fmt, run)
    # keep a plan only for calls that need no conversion the full path made (checked again on every reuse)
    if y is not None and aq_fn is not None and gemm_fn is not None and not forced and _plain(x2, w, mult, bias):
        qsum_cols = 0 if a.qsum is None else a.qsum.shape[1]
        key = _plan_key(x2, bias, mult, had_block, act_fmt, act_qmax, static_scale, sum_group)
        _gemm.tensor_cache(w.data, "_viditq_plans")[key] = LinearPlan(aq_fn, gemm_fn, k, w.out_features, a.q.dtype,
                                                                      qsum_cols)
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


def quantized_matmul(a, w, bias, out_dtype, residual=None, gate=None, res_rows=0):
    """GEMM + epilogue alone on an already quantized activation (reference where no kernel fits); with `residual`,
    the gated residual add in the epilogue (reference.quantized_matmul)."""
    res = (residual, gate, res_rows)
    if a.q.dtype == torch.float8_e4m3fn and not fp8_ok(a.q.device):
        return reference.quantized_matmul(a, w, bias, out_dtype, *res)
    try:
        y = _gemm.quantized_matmul(a, w, bias, out_dtype, residual=residual, gate=gate, res_rows=res_rows)
    except Exception as e:
        _split16_failed(w, e)
        return reference.quantized_matmul(a, w, bias, out_dtype, *res)
    if y is None and residual is not None:  # no residual epilogue for this weight format: GEMM, then the add
        y = _gemm.quantized_matmul(a, w, bias, torch.float32)
        if y is not None:
            return reference.residual_add(y, out_dtype, *res)
    return y if y is not None else reference.quantized_matmul(a, w, bias, out_dtype, *res)
