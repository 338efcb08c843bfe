"""Per-token activation quantize with the producer's elementwise work fused in front (one read of x, one write).

    prologue "none":                q, s = quantize(x * mult)                   (the plain per-token quantize)
    prologue "gelu_tanh" / "gelu":  q, s = quantize(GELU(h) * mult)             (fc2's input: fc1's output h)
    prologue "norm_modulate":       q, s = quantize((LN(x) * (1 + scale_b) + shift_b) * mult)
                                                                               (qkv / fc1 input: the residual x)
LN has no affine weights (PixArt / OpenSORA norm1 / norm2); shift_b / scale_b are the adaLN vectors of the row's
sample b = row // rows_per_sample. `mult` is the layer's smoothing vector (1/s, times the rotation's signs).
With `had_block` > 1 the block Hadamard rotation follows `mult` (ViDiT-Q's rotated layers): a fast Walsh-Hadamard
transform in registers (log2(block) add/subtract stages; triton lowers the stages whose pairs sit in other lanes
to warp shuffles), not a matmul: whole rows per program leave too few rows for a tensor-core tile, and the
matmul kernel of triton_act_quant was latency-bound at ~4.4x its byte floor (bench/NOTES_kernels.md).

Why: under torch.compile Inductor fuses LayerNorm+modulate+quantize and GELU+quantize itself, but as looped
reductions that read each row two or three times; on the H200 that was 4-7x the byte floor (bench/NOTES_e2e.md).
Here a program holds whole rows in registers, so x is read once. A row is two power-of-two pieces (1152 = 1024 +
128): a single padded block (1152 -> 2048) left 44 % of the lanes masked, and the kernel was issue-bound at ~3.3x
its byte floor (bench/NOTES_kernels.md, session 12).
The reference twin is kernels.reference.prologue_quantize (fp32 throughout, no bf16 rounding between the
prologue and the quantize, as here).
"""
import functools
import os

import torch
import triton
import triton.language as tl

from .triton_act_quant import INTERPRET, Tuner, _cdiv, _next_pow2, _round_fp8_grid, m_bucket
from .types import FP8_E4M3_MAX, MAX_FUSED_HAD, SCALE_EPS, QuantizedActivation

PROLOGUES = {"none": 0, "gelu_tanh": 1, "gelu": 2, "norm_modulate": 3}
assert SCALE_EPS == 1e-12  # the kernel writes this literal
MAX_K = 16384  # whole rows in registers: beyond this the reference runs (no DiT layer here is that wide)


# On the GPU the tanh GELU uses the hardware tanh (MUFU.TANH, max rel. error 2^-11: GELU off by <= 2.5e-4 |x|,
# below an fp16 rounding of its output and ~1 % of an int8 step of a typical row): one MUFU op per element instead of
# ex2 + rcp and the division's range checks. The CPU interpreter has no inline PTX, nor has ROCm: there the exact
# form runs.
_HW_TANH = tl.constexpr(not INTERPRET and torch.version.hip is None)


@triton.jit
def _gelu_f32(x, PROLOGUE: tl.constexpr):
    if PROLOGUE == 1 and _HW_TANH:  # 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3)
        th = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r",
                                       [x * (0.7978845608028654 + 0.035677408136300125 * x * x)],
                                       dtype=tl.float32, is_pure=True, pack=1)
        hx = 0.5 * x
        x = hx + hx * th
    elif PROLOGUE == 1:  # the same as x * sigmoid(2u): 0.5 * (1 + tanh(u)) = 1 / (1 + exp(-2u))
        u2 = x * (1.5957691216057308 + 0.0713548162726009 * x * x)  # 2u = 2 * sqrt(2/pi) * (x + 0.044715 x^3)
        x = x / (1.0 + tl.exp(tl.minimum(-u2, 80.0)))  # very negative x: x / 5.5e34, GELU's limit 0
    elif PROLOGUE == 2:
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    return x


@triton.jit
def _store_codes(qptr, v, m2, fmax, IS_FP8: tl.constexpr, FP8_SOFT: tl.constexpr):
    """v = x * (fmax / amax) as int8 (round to nearest even) or fp8 e4m3 codes. |v| <= fmax up to an ulp of the
    reciprocal, so int8 needs no clamp: v + 1.5 * 2^23 rounds, and its low byte is the two's-complement code."""
    if IS_FP8:
        v = tl.minimum(tl.maximum(v, -fmax), fmax)
        if FP8_SOFT:  # the interpreter's cast does not round to nearest-even; the GPU's does
            v = _round_fp8_grid(v)
        tl.store(qptr, v.to(tl.float8e4nv), mask=m2)
    else:
        tl.store(qptr, (v + 12582912.0).to(tl.int32, bitcast=True).to(tl.int8), mask=m2)


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
def _load_piece(X, rows64, rmask, c0, K, stride_xm, BK: tl.constexpr):
    cols = c0 + tl.arange(0, BK)
    cmask = cols < K
    m2 = rmask[:, None] & cmask[None, :]
    x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    return x, cols, cmask, m2


@triton.jit
def _modulate_piece(d, cols, cmask, m2, b_row, b0, SHIFT, SCL, MULT, stride_shb, stride_scb,
                    HAS_MULT: tl.constexpr, ONE_SAMPLE: tl.constexpr):
    """d * (1 + scale_b) * mult + shift_b * mult for the rows' samples b (one vector when they share one)."""
    if ONE_SAMPLE:
        a = 1.0 + tl.load(SCL + b0 * stride_scb + cols, mask=cmask, other=0.0).to(tl.float32)
        c = tl.load(SHIFT + b0 * stride_shb + cols, mask=cmask, other=0.0).to(tl.float32)
        if HAS_MULT:
            mu = tl.load(MULT + cols, mask=cmask, other=0.0).to(tl.float32)
            a, c = a * mu, c * mu
        return d * a[None, :] + c[None, :]
    else:
        sc = tl.load(SCL + b_row[:, None] * stride_scb + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        sh = tl.load(SHIFT + b_row[:, None] * stride_shb + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        y = d * (1.0 + sc) + sh
        if HAS_MULT:
            y = y * tl.load(MULT + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        return y


@triton.jit
def _act_piece(x, cols, cmask, MULT, PROLOGUE: tl.constexpr, HAS_MULT: tl.constexpr):
    x = _gelu_f32(x, PROLOGUE)
    if HAS_MULT:
        x = x * tl.load(MULT + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return x


@triton.jit
def _butterfly(x, R: tl.constexpr, C: tl.constexpr, STRIDE: tl.constexpr):
    """One radix-2 stage on every row of x [R, C]: (x[i], x[i + STRIDE]) -> (sum, difference) for the i whose
    STRIDE bit is clear."""
    y = tl.permute(tl.reshape(x, [R, C // (2 * STRIDE), 2, STRIDE]), (0, 1, 3, 2))
    a, b = tl.split(y)
    return tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), [R, C])


@triton.jit
def _fwht(x, R: tl.constexpr, C: tl.constexpr, HAD: tl.constexpr):
    """x [R, C] times the unnormalized Sylvester Hadamard matrix of size HAD in every block of HAD channels
    (C % HAD == 0); the caller applies 1 / sqrt(HAD) to the row's scale."""
    for i in tl.static_range(9):  # strides 1 .. 256: HAD <= MAX_FUSED_HAD = 512
        if (1 << i) < HAD:
            x = _butterfly(x, R, C, 1 << i)
    return x


@triton.jit
def _store_codes_w4(Q, rows64, rmask, c0, K, stride_qm, v, m2, R: tl.constexpr, BK: tl.constexpr, QSUM=None,
                    SUM_G: tl.constexpr = 0, PERM32: tl.constexpr = True):
    """int8 codes of v (as _store_codes) for channels c0 .. c0 + BK (c0 and K multiples of 32) for the W4A8 GEMM,
    with their sums. PERM32 (int4 weights in the files' "pairs" byte order): written in "perm32" order (within
    every 32 channels the 16 even ones, then the 16 odd ones): the even and the odd codes split apart in registers,
    each stored as runs of 16 bytes; else (weights in "split16" order) in natural order. Returns each row's sum of
    the codes (int32), which the raw-nibble W4A8 kernels subtract 8 times in their epilogue; SUM_G > 0 (group-wise
    weights): the sums per SUM_G channels go to QSUM [M, K / SUM_G] here instead."""
    tl.static_assert(BK % 32 == 0, "W4A8 codes: pieces / chunks must be whole 32-channel blocks")
    code = (v + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000
    if PERM32:
        qe, qo = tl.split(tl.reshape(code.to(tl.int8), [R, BK // 2, 2]))
        j = tl.arange(0, BK // 2)  # channel c0 + 2j -> c0 + (j // 16) * 32 + j % 16; its odd neighbour 16 further
        pos = c0 + (j // 16) * 32 + j % 16
        hm = rmask[:, None] & (c0 + 2 * j < K)[None, :]
        base = Q + rows64[:, None] * stride_qm + pos[None, :]
        tl.store(base, qe, mask=hm)
        tl.store(base + 16, qo, mask=hm)
    else:
        cols = c0 + tl.arange(0, BK)
        tl.store(Q + rows64[:, None] * stride_qm + cols[None, :], code.to(tl.int8), mask=m2)
    if SUM_G > 0:
        tl.static_assert(BK % SUM_G == 0, "group sums: pieces / chunks must be whole groups")
        gs = tl.sum(tl.reshape(tl.where(m2, code, 0), [R, BK // SUM_G, SUM_G]), axis=2)
        g = c0 // SUM_G + tl.arange(0, BK // SUM_G)
        tl.store(QSUM + rows64[:, None] * (K // SUM_G) + g[None, :], gs,
                 mask=rmask[:, None] & (g < K // SUM_G)[None, :])
        return tl.zeros([R], dtype=tl.int32)
    return tl.sum(tl.where(m2, code, 0), axis=1)


@triton.jit
def _row_scale(amax, hscale, fmax):
    """(scale to store, factor for the unnormalized transformed row): amax is the row's abs-max before the
    Hadamard normalization hscale = 1 / sqrt(HAD) (1 without rotation)."""
    amax = tl.maximum(amax * hscale, 1e-12)  # SCALE_EPS, as the reference
    return amax / fmax, (fmax * hscale) / amax


@triton.jit
def _prologue_quant_kernel(X, SHIFT, SCL, MULT, Q, S,
                           M, K, stride_xm, stride_qm, rows_per_sample, stride_shb, stride_scb, eps, fmax, hscale,
                           ROWS: tl.constexpr, BK1: tl.constexpr, BK2: tl.constexpr, PROLOGUE: tl.constexpr,
                           HAS_MULT: tl.constexpr, ONE_SAMPLE: tl.constexpr, IS_FP8: tl.constexpr,
                           FP8_SOFT: tl.constexpr, HAD: tl.constexpr, QSUM=None, W4: tl.constexpr = 0,
                           SUM_G: tl.constexpr = 0):
    """ROWS whole rows per program, each held as two power-of-two pieces [0, BK1) + [BK1, BK1 + BK2) (1152 =
    1024 + 128, 4608 = 4096 + 512: no padded lanes where K is such a sum; BK2 = 0: one piece).
    W4 (int8 codes for the W4A8 GEMM): each row's code sum into QSUM (SUM_G > 0: the sums per SUM_G channels), the
    codes in natural order (1) or in "perm32" order (2)."""
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    x1, c1, cm1, m1 = _load_piece(X, rows64, rmask, 0, K, stride_xm, BK1)
    if BK2 > 0:
        x2, c2, cm2, m2 = _load_piece(X, rows64, rmask, BK1, K, stride_xm, BK2)
    if PROLOGUE == 3:  # LayerNorm (no affine) + adaLN modulate of the row's sample
        tot = tl.sum(x1, axis=1)
        if BK2 > 0:
            tot += tl.sum(x2, axis=1)
        mean = tot / K
        d1 = tl.where(m1, x1 - mean[:, None], 0.0)
        var = tl.sum(d1 * d1, axis=1)
        if BK2 > 0:
            d2 = tl.where(m2, x2 - mean[:, None], 0.0)
            var += tl.sum(d2 * d2, axis=1)
        rstd = tl.math.rsqrt(var / K + eps)
        b_row = (rows // rows_per_sample).to(tl.int64)
        b0 = ((pid * ROWS) // rows_per_sample).to(tl.int64)
        x1 = _modulate_piece(d1 * rstd[:, None], c1, cm1, m1, b_row, b0, SHIFT, SCL, MULT, stride_shb, stride_scb,
                             HAS_MULT, ONE_SAMPLE)
        if BK2 > 0:
            x2 = _modulate_piece(d2 * rstd[:, None], c2, cm2, m2, b_row, b0, SHIFT, SCL, MULT, stride_shb,
                                 stride_scb, HAS_MULT, ONE_SAMPLE)
    else:  # GELU (1, 2) or nothing (0), then the smoothing vector; padded lanes hold 0 and stay 0
        x1 = _act_piece(x1, c1, cm1, MULT, PROLOGUE, HAS_MULT)
        if BK2 > 0:
            x2 = _act_piece(x2, c2, cm2, MULT, PROLOGUE, HAS_MULT)
    if HAD > 1:  # padded lanes are whole blocks of zeros (K and both pieces are multiples of HAD): they stay 0
        x1 = _fwht(x1, ROWS, BK1, HAD)
        if BK2 > 0:
            x2 = _fwht(x2, ROWS, BK2, HAD)
    amax = tl.max(tl.abs(x1), axis=1)
    if BK2 > 0:
        amax = tl.maximum(amax, tl.max(tl.abs(x2), axis=1))
    sc, inv = _row_scale(amax, hscale, fmax)
    tl.store(S + rows, sc, mask=rmask)
    if W4:
        tot = _store_codes_w4(Q, rows64, rmask, 0, K, stride_qm, x1 * inv[:, None], m1, ROWS, BK1, QSUM, SUM_G,
                              W4 == 2)
        if BK2 > 0:
            tot += _store_codes_w4(Q, rows64, rmask, BK1, K, stride_qm, x2 * inv[:, None], m2, ROWS, BK2, QSUM,
                                   SUM_G, W4 == 2)
        if SUM_G == 0:
            tl.store(QSUM + rows, tot, mask=rmask)
    else:
        _store_codes(Q + rows64[:, None] * stride_qm + c1[None, :], x1 * inv[:, None], m1, fmax, IS_FP8, FP8_SOFT)
        if BK2 > 0:
            _store_codes(Q + rows64[:, None] * stride_qm + c2[None, :], x2 * inv[:, None], m2, fmax, IS_FP8,
                         FP8_SOFT)


@triton.jit
def _gelu_quant_chunked_kernel(X, MULT, Q, S, M, K, stride_xm, stride_qm, fmax, hscale,
                               ROWS: tl.constexpr, CK: tl.constexpr, PROLOGUE: tl.constexpr,
                               HAS_MULT: tl.constexpr, IS_FP8: tl.constexpr, FP8_SOFT: tl.constexpr,
                               HAD: tl.constexpr, QSUM=None, W4: tl.constexpr = 0, SUM_G: tl.constexpr = 0):
    """GELU prologue for wide rows (fc2's K = 4608): two passes over K in chunks of CK (a multiple of HAD), the
    second re-reading x from L2 (and transforming it again), instead of one whole row in registers."""
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    amax = tl.zeros([ROWS], dtype=tl.float32)
    for k0 in tl.range(0, K, CK, num_stages=3):
        x, cols, m2 = _gelu_chunk(X, MULT, rows64, rmask, k0, K, stride_xm, CK, PROLOGUE, HAS_MULT)
        if HAD > 1:
            x = _fwht(x, ROWS, CK, HAD)
        amax = tl.maximum(amax, tl.max(tl.where(m2, tl.abs(x), 0.0), axis=1))
    sc, inv = _row_scale(amax, hscale, fmax)
    tl.store(S + rows, sc, mask=rmask)
    tot = tl.zeros([ROWS], dtype=tl.int32)
    for k0 in tl.range(0, K, CK, num_stages=3):
        x, cols, m2 = _gelu_chunk(X, MULT, rows64, rmask, k0, K, stride_xm, CK, PROLOGUE, HAS_MULT)
        if HAD > 1:
            x = _fwht(x, ROWS, CK, HAD)
        if W4:
            tot += _store_codes_w4(Q, rows64, rmask, k0, K, stride_qm, x * inv[:, None], m2, ROWS, CK, QSUM, SUM_G,
                                   W4 == 2)
        else:
            _store_codes(Q + rows64[:, None] * stride_qm + cols[None, :], x * inv[:, None], m2, fmax, IS_FP8,
                         FP8_SOFT)
    if W4 and SUM_G == 0:
        tl.store(QSUM + rows, tot, mask=rmask)


tuner = Tuner("prologue_quant", graph=True)  # microseconds of kernel: eager timing would time the host
last_config = None


def pieces(k: int):
    """(BK1, BK2): a row of K channels as two power-of-two pieces (BK2 = 0: one piece); padding only where K is
    not a sum of two powers of two (1152 = 1024 + 128 and 4608 = 4096 + 512 have none)."""
    bk1 = max(1 << (max(k, 1).bit_length() - 1), 16)
    rest = k - bk1
    return bk1, (max(_next_pow2(rest), 16) if rest > 0 else 0)


def candidates(k: int, m: int, pcode: int = 3, had_block: int = 0):
    """(rows per program, num_warps[, chunk]): whole rows per program with about 8-48 fp32 values per thread (up to
    144 for one row per program: a row on one warp reduces with shuffles alone, which won at K = 1152; up to 72
    for several rows on one warp: the adaLN / smoothing vectors loaded once for them, where one row per warp
    measured L1-bound on an H200, ncu); for the GELU prologue at K >= 2048 also the two-pass chunked kernel (chunk
    of CK channels)."""
    lanes = sum(pieces(k))
    if INTERPRET:
        return [(2, 4)] + ([(2, 4, 64)] if pcode in (1, 2) and 64 % max(had_block, 1) == 0 else [])
    out = []
    if pcode in (1, 2) and k >= 2048:
        out += [(r, nw, ck) for r, nw, ck in ((1, 4, 1024), (2, 4, 512), (4, 8, 512), (2, 8, 1024), (1, 8, 2048))
                if ck % max(had_block, 1) == 0]
    for rows in (1, 2, 4, 8, 16):
        for nw in (1, 2, 4, 8, 16):
            per_thread = rows * lanes // (32 * nw)
            cap = 144 if rows == 1 else (72 if nw == 1 else 48)
            if 8 <= per_thread <= cap and not (m <= 1024 and rows > 4):
                out.append((rows, nw))
    return out or [(1, 4)]


def _as_rows(t: torch.Tensor, batch: int, k: int) -> torch.Tensor:
    """An adaLN vector ([B, 1, K] / [B, K] / [1, K] / [K]) as [B', K] with unit channel stride (B' in {1, B})."""
    t2 = t.reshape(-1, k) if t.dim() != 3 or t.shape[1] == 1 else None
    if t2 is None or t2.shape[0] not in (1, batch):
        raise ValueError(f"norm_modulate: shift/scale of shape {tuple(t.shape)} do not give one vector per sample "
                         f"({batch} samples of {k} channels)")
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def had_supported(k: int, had_block: int) -> bool:
    """Can the kernel rotate rows of k channels by blocks of had_block (power of two; both pieces whole blocks)?"""
    if had_block <= 1:
        return True
    if had_block & (had_block - 1) or had_block > MAX_FUSED_HAD or k % had_block:
        return False
    return all(p % had_block == 0 for p in pieces(k) if p)


def group_sums_supported(k: int, group: int) -> bool:
    """Can the W4A8 prologue write code sums per `group` channels (a power of two >= 32 dividing both row pieces)?"""
    if group < 32 or group & (group - 1) or k % group:
        return False
    return all(p % group == 0 for p in pieces(k) if p)


def adaln_rows(shift, scale, m: int, rows_per_sample: int, k: int):
    """(shift rows, scale rows, their sample strides) for the norm_modulate kernel, checked against m rows of
    rows_per_sample per sample; a single vector for all samples gets stride 0 (it repeats)."""
    if rows_per_sample <= 0 or m % rows_per_sample:
        raise ValueError(f"norm_modulate: {m} rows are not whole samples of {rows_per_sample} rows")
    batch = m // rows_per_sample
    sh, sc = _as_rows(shift, batch, k), _as_rows(scale, batch, k)
    if sh.shape[0] != sc.shape[0]:
        raise ValueError("norm_modulate: shift and scale cover different batches")
    return sh, sc, (sh.stride(0) if sh.shape[0] > 1 else 0), (sc.stride(0) if sc.shape[0] > 1 else 0)


def prologue_quantize(x, prologue, shift=None, scale=None, rows_per_sample=0, eps=1e-6, mult=None, fmt="int8",
                      qmax=127, had_block=0, return_launch=False, perm32=False, sum_group=0, sums=False):
    """Triton twin of reference.prologue_quantize; None when no kernel fits (caller uses the reference).
    return_launch: (activation, the tuned launch for this row shape: launcher's fn) instead.
    For the W4A8 GEMM (int8, K % 32 == 0): sums: each row's code sum in the activation's qsum [M, 1] (with
    sum_group, group-wise int4 weights: the sums per sum_group channels, qsum [M, K / sum_group]); perm32 (weights
    in the "pairs" byte order): the same, the codes in "perm32" channel order
    (triton_act_quant.quantize_activation(perm="perm32", sum_group=K) writes the same)."""
    if prologue not in PROLOGUES or fmt not in ("int8", "fp8"):
        raise ValueError(f"prologue_quantize: unknown prologue {prologue!r} or format {fmt!r}")
    k = x.shape[-1]
    had = int(had_block) if had_block and had_block > 1 else 0
    if k > MAX_K or x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not had_supported(k, had):
        return None
    w4 = 2 if perm32 else (1 if sums else 0)  # the kernel's W4 mode
    if w4 and (fmt != "int8" or k % 32):
        raise ValueError(f"prologue_quantize: W4A8 codes (sums / perm32) need int8 and K % 32 == 0 (K = {k}, {fmt})")
    sum_group = int(sum_group) if w4 and sum_group and sum_group != k else 0
    if sum_group and not group_sums_supported(k, sum_group):
        return None
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    dev = x2.device
    q = torch.empty((m, k), device=dev, dtype=torch.float8_e4m3fn if fmt == "fp8" else torch.int8)
    s = torch.empty((m,), device=dev, dtype=torch.float32)
    qs = torch.empty((m, k // sum_group if sum_group else 1), device=dev, dtype=torch.int32) if w4 else None
    if m == 0:
        a = QuantizedActivation(q=q, scale=s, qsum=qs)
        return (a, None) if return_launch else a
    pcode = PROLOGUES[prologue]
    if pcode == 3:
        rows_per_sample = int(rows_per_sample)
        sh, sc, stride_sh, stride_sc = adaln_rows(shift, scale, m, rows_per_sample, k)
    else:
        sh = sc = s
        stride_sh = stride_sc = 0
        rows_per_sample = max(m, 1)
    has_mult = mult is not None
    if has_mult and (mult.device != dev or not mult.is_contiguous() or mult.dim() != 1):
        mult = mult.reshape(-1).to(device=dev).contiguous()
    fmax = FP8_E4M3_MAX if fmt == "fp8" else float(qmax)
    setup = (k, pcode, has_mult, fmt, had, float(eps), fmax, w4, sum_group)
    args = (x2, sh, sc, mult if has_mult else s, q, s, m, rows_per_sample, stride_sh, stride_sc, qs)

    def launch(c):
        return launcher(c, *setup)(*args)

    global last_config
    key = (k, m_bucket(m), x2.dtype, str(dev), pcode, has_mult, fmt, had, os.environ.get("VIDITQ_TUNE", "1"),
           w4, sum_group)
    last_config = tuner.pick(key, [c for c in candidates(k, m, pcode, had)
                                   if len(c) < 3 or not sum_group or c[2] % sum_group == 0], launch)
    launch(last_config)
    a = QuantizedActivation(q=q, scale=s, qsum=qs)
    return (a, launcher(last_config, *setup)) if return_launch else a


@functools.lru_cache(maxsize=256)
def launcher(c, k, pcode, has_mult, fmt, had, eps, fmax, w4=0, sum_group=0):
    """The launch of candidate c for one row shape with everything but the tensors bound once:
    fn(x2, shift_rows, scale_rows, mult_or_s, q, s, m, rows_per_sample, stride_sh, stride_sc[, qsum]) (a fused
    layer's launch plan keeps it: triton_ops.FusedPlan); w4 1: row code sums into qsum [M, 1] (per sum_group
    channels: [M, K / sum_group]); 2: the same with perm32 codes."""
    w4 = int(w4)
    rows, nw = c[:2]
    hscale = had ** -0.5 if had else 1.0
    is_fp8 = fmt == "fp8"
    if len(c) == 3:
        def fn(x2, sh, sc, mv, q, s, m, rows_per_sample, stride_sh, stride_sc, qs=None):
            return _gelu_quant_chunked_kernel[(_cdiv(m, rows),)](
                x2, mv, q, s, m, k, x2.stride(0), q.stride(0), fmax, hscale, ROWS=rows, CK=c[2], PROLOGUE=pcode,
                HAS_MULT=has_mult, IS_FP8=is_fp8, FP8_SOFT=INTERPRET, HAD=had, QSUM=qs if w4 else s, W4=w4,
                SUM_G=sum_group, num_warps=nw)
        return fn
    bk1, bk2 = pieces(k)
    flags = dict(BK1=bk1, BK2=bk2, PROLOGUE=pcode, HAS_MULT=has_mult, IS_FP8=is_fp8, FP8_SOFT=INTERPRET, HAD=had,
                 ROWS=rows, W4=w4, SUM_G=sum_group, num_warps=nw)

    def fn(x2, sh, sc, mv, q, s, m, rows_per_sample, stride_sh, stride_sc, qs=None):
        return _prologue_quant_kernel[(_cdiv(m, rows),)](
            x2, sh, sc, mv, q, s, m, k, x2.stride(0), q.stride(0), rows_per_sample, stride_sh, stride_sc, eps, fmax,
            hscale, ONE_SAMPLE=rows_per_sample % rows == 0, QSUM=qs if w4 else s, **flags)
    return fn
