"""Per-token activation quantize with the producer's elementwise work fused in front (one read of x, one write).

    prologue "gelu_tanh" / "gelu":  q, s = quantize(GELU(h) * mult)             (fc2's input: fc1's output h)
    prologue "norm_modulate":       q, s = quantize((LN(x) * (1 + scale_b) + shift_b) * mult)
                                                                               (qkv / fc1 input: the residual x)
LN has no affine weights (PixArt / OpenSORA norm1 / norm2); shift_b / scale_b are the adaLN vectors of the row's
sample b = row // rows_per_sample. `mult` is the layer's smoothing vector (1/s). No rotation: rotated layers keep
triton_act_quant's kernel (fusions.py only fuses unrotated layers).

Why: under torch.compile Inductor fuses LayerNorm+modulate+quantize and GELU+quantize itself, but as looped
reductions that read each row two or three times; on the H200 that was 4-7x the byte floor (bench/NOTES_e2e.md).
Here a program holds whole rows in registers (K padded to a power of two, masked), so x is read once.
The reference twin is kernels.reference.prologue_quantize (fp32 throughout, no bf16 rounding between the
prologue and the quantize, as here).
"""
import os

import torch
import triton
import triton.language as tl

from .triton_act_quant import INTERPRET, Tuner, _cdiv, _next_pow2, _round_fp8_grid, m_bucket
from .types import FP8_E4M3_MAX, SCALE_EPS, QuantizedActivation

PROLOGUES = {"gelu_tanh": 1, "gelu": 2, "norm_modulate": 3}
assert SCALE_EPS == 1e-12  # the kernel writes this literal
MAX_K = 16384  # whole rows in registers: beyond this the reference runs (no DiT layer here is that wide)


@triton.jit
def _gelu_f32(x, PROLOGUE: tl.constexpr):
    if PROLOGUE == 1:  # tanh approximation; tanh(u) = 1 - 2 / (exp(2u) + 1), exp clamped below overflow
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = 0.5 * x * (2.0 - 2.0 / (tl.exp(tl.minimum(2.0 * u, 80.0)) + 1.0))
    else:
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    return x


@triton.jit
def _store_codes(qptr, v, m2, qmax, fmax, IS_FP8: tl.constexpr, FP8_SOFT: tl.constexpr):
    """v = x / scale as int8 (round to nearest even, clamped) or fp8 e4m3 codes."""
    if IS_FP8:
        v = tl.minimum(tl.maximum(v, -fmax), fmax)
        if FP8_SOFT:  # the interpreter's cast does not round to nearest-even; the GPU's does
            v = _round_fp8_grid(v)
        tl.store(qptr, v.to(tl.float8e4nv), mask=m2)
    else:
        v = tl.minimum(tl.maximum(v, -qmax), qmax)
        v = (v + 12582912.0) - 12582912.0  # round to nearest, ties to even (|v| <= 127)
        tl.store(qptr, v.to(tl.int32).to(tl.int8), mask=m2)


@triton.jit
def _gelu_chunk(X, MULT, rows64, rmask, k0, K, stride_xm, CK: tl.constexpr, PROLOGUE: tl.constexpr,
                HAS_MULT: tl.constexpr):
    """GELU(x[rows, k0:k0+CK]) * mult in fp32, with its columns and mask."""
    cols = k0 + tl.arange(0, CK)
    cmask = cols < K
    m2 = rmask[:, None] & cmask[None, :]
    x = _gelu_f32(tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=m2, other=0.0).to(tl.float32),
                  PROLOGUE)
    if HAS_MULT:
        x = x * tl.load(MULT + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return x, cols, m2


@triton.jit
def _prologue_quant_kernel(X, SHIFT, SCL, MULT, Q, S,
                           M, K, stride_xm, stride_qm, rows_per_sample, stride_shb, stride_scb, eps, qmax, fmax,
                           ROWS: tl.constexpr, BLOCK_K: tl.constexpr, PROLOGUE: tl.constexpr,
                           HAS_MULT: tl.constexpr, IS_FP8: tl.constexpr, FP8_SOFT: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    rmask = rows < M
    cols = tl.arange(0, BLOCK_K)
    cmask = cols < K
    m2 = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    if PROLOGUE != 3:
        x = _gelu_f32(x, PROLOGUE)
    else:  # LayerNorm (no affine) + adaLN modulate of the row's sample
        mean = tl.sum(x, axis=1) / K
        d = tl.where(m2, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / K + eps)
        b = (rows // rows_per_sample).to(tl.int64)
        sc = tl.load(SCL + b[:, None] * stride_scb + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        sh = tl.load(SHIFT + b[:, None] * stride_shb + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        x = d * rstd[:, None] * (1.0 + sc) + sh
    if HAS_MULT:
        x = x * tl.load(MULT + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    x = tl.where(m2, x, 0.0)
    scale = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12) / fmax  # SCALE_EPS, as the reference
    tl.store(S + rows, scale, mask=rmask)
    _store_codes(Q + rows64[:, None] * stride_qm + cols[None, :], x / scale[:, None], m2, qmax, fmax, IS_FP8,
                 FP8_SOFT)


@triton.jit
def _gelu_quant_chunked_kernel(X, MULT, Q, S, M, K, stride_xm, stride_qm, qmax, fmax,
                               ROWS: tl.constexpr, CK: tl.constexpr, PROLOGUE: tl.constexpr,
                               HAS_MULT: tl.constexpr, IS_FP8: tl.constexpr, FP8_SOFT: tl.constexpr):
    """GELU prologue for wide rows (fc2's K = 4608): two passes over K in chunks of CK, the second re-reading x
    from L2, instead of one whole row padded to a power of two in registers."""
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    amax = tl.zeros([ROWS], dtype=tl.float32)
    for k0 in tl.range(0, K, CK, num_stages=3):
        x, cols, m2 = _gelu_chunk(X, MULT, rows64, rmask, k0, K, stride_xm, CK, PROLOGUE, HAS_MULT)
        amax = tl.maximum(amax, tl.max(tl.where(m2, tl.abs(x), 0.0), axis=1))
    scale = tl.maximum(amax, 1e-12) / fmax
    tl.store(S + rows, scale, mask=rmask)
    for k0 in tl.range(0, K, CK, num_stages=3):
        x, cols, m2 = _gelu_chunk(X, MULT, rows64, rmask, k0, K, stride_xm, CK, PROLOGUE, HAS_MULT)
        _store_codes(Q + rows64[:, None] * stride_qm + cols[None, :], x / scale[:, None], m2, qmax, fmax, IS_FP8,
                     FP8_SOFT)


tuner = Tuner("prologue_quant", graph=True)  # microseconds of kernel: eager timing would time the host
last_config = None


def candidates(k: int, m: int, pcode: int = 3):
    """(rows per program, num_warps[, chunk]): whole rows per program with about 8-32 fp32 values per thread; for
    the GELU prologue at K >= 2048 also the two-pass chunked kernel (chunk of CK channels)."""
    bk = max(_next_pow2(k), 16)
    if INTERPRET:
        return [(2, 4)] + ([(2, 4, 64)] if pcode != 3 else [])
    out = []
    if pcode != 3 and k >= 2048:
        out += [(r, nw, ck) for r, nw, ck in ((1, 4, 1024), (2, 4, 512), (4, 8, 512), (2, 8, 1024), (1, 8, 2048))]
    for rows in (1, 2, 4, 8, 16):
        for nw in (4, 8, 16):
            per_thread = rows * bk // (32 * nw)
            if 4 <= per_thread <= 32 and not (m <= 1024 and rows > 4):
                out.append((rows, nw))
    return out or [(1, 4)]


def _as_rows(t: torch.Tensor, batch: int, k: int) -> torch.Tensor:
    """An adaLN vector ([B, 1, K] / [B, K] / [1, K] / [K]) as [B', K] with unit channel stride (B' in {1, B})."""
    t2 = t.reshape(-1, k) if t.dim() != 3 or t.shape[1] == 1 else None
    if t2 is None or t2.shape[0] not in (1, batch):
        raise ValueError(f"norm_modulate: shift/scale of shape {tuple(t.shape)} do not give one vector per sample "
                         f"({batch} samples of {k} channels)")
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def prologue_quantize(x, prologue, shift=None, scale=None, rows_per_sample=0, eps=1e-6, mult=None, fmt="int8",
                      qmax=127):
    """Triton twin of reference.prologue_quantize; None when no kernel fits (caller uses the reference)."""
    if prologue not in PROLOGUES or fmt not in ("int8", "fp8"):
        raise ValueError(f"prologue_quantize: unknown prologue {prologue!r} or format {fmt!r}")
    k = x.shape[-1]
    if k > MAX_K or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return None
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    dev = x2.device
    q = torch.empty((m, k), device=dev, dtype=torch.float8_e4m3fn if fmt == "fp8" else torch.int8)
    s = torch.empty((m,), device=dev, dtype=torch.float32)
    if m == 0:
        return QuantizedActivation(q=q, scale=s)
    pcode = PROLOGUES[prologue]
    if pcode == 3:
        rows_per_sample = int(rows_per_sample)
        if rows_per_sample <= 0 or m % rows_per_sample:
            raise ValueError(f"norm_modulate: {m} rows are not whole samples of {rows_per_sample} rows")
        batch = m // rows_per_sample
        sh, sc = _as_rows(shift, batch, k), _as_rows(scale, batch, k)
        if sh.shape[0] != sc.shape[0]:
            raise ValueError("norm_modulate: shift and scale cover different batches")
        # a single vector for all samples: stride 0 repeats it
        stride_sh, stride_sc = (sh.stride(0) if sh.shape[0] > 1 else 0), (sc.stride(0) if sc.shape[0] > 1 else 0)
    else:
        sh = sc = s
        stride_sh = stride_sc = 0
        rows_per_sample = max(m, 1)
    has_mult = mult is not None
    if has_mult and (mult.device != dev or not mult.is_contiguous() or mult.dim() != 1):
        mult = mult.reshape(-1).to(device=dev).contiguous()
    fmax = FP8_E4M3_MAX if fmt == "fp8" else float(qmax)
    bk = max(_next_pow2(k), 16)
    flags = dict(BLOCK_K=bk, PROLOGUE=pcode, HAS_MULT=has_mult, IS_FP8=fmt == "fp8", FP8_SOFT=INTERPRET)

    def launch(c):
        rows, nw = c[:2]
        if len(c) == 3:
            return _gelu_quant_chunked_kernel[(_cdiv(m, rows),)](
                x2, mult if has_mult else s, q, s, m, k, x2.stride(0), q.stride(0), float(qmax), fmax, ROWS=rows,
                CK=c[2], PROLOGUE=pcode, HAS_MULT=has_mult, IS_FP8=fmt == "fp8", FP8_SOFT=INTERPRET, num_warps=nw)
        return _prologue_quant_kernel[(_cdiv(m, rows),)](
            x2, sh, sc, mult if has_mult else s, q, s, m, k, x2.stride(0), q.stride(0), rows_per_sample,
            stride_sh, stride_sc, float(eps), float(qmax), fmax, ROWS=rows, num_warps=nw, **flags)

    global last_config
    key = (k, m_bucket(m), x2.dtype, str(dev), pcode, has_mult, fmt, os.environ.get("VIDITQ_TUNE", "1"))
    last_config = tuner.pick(key, candidates(k, m, pcode), launch)
    launch(last_config)
    return QuantizedActivation(q=q, scale=s)
