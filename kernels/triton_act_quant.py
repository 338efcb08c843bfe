"""Fused activation quantization (Triton): x -> x*mult -> block Hadamard -> per-token scale -> int8 / fp8.

One launch reads x[M, K] (fp16 / bf16 / fp32) and writes q[M, K] (int8 or float8_e4m3fn), scale[M] (fp32) and,
when asked, per-group sums of q (int32). The oracle is `reference.quantize_activation`.

Kernels (the tuner times the candidates of all three once per row shape on the GPU and keeps the fastest):
  * `_aq_flat_kernel` (usually fastest): x [M, K] seen as M * K/CW blocks of CW = 128 channels; a tile holds T
    whole tokens (K = 1152: 7 tokens = 63 of 64 block rows), so the Hadamard is one tensor-core product
    [BB, CW] x [CW, CW] per tile with nothing padded, every token's rotated row is in registers once (one pass over
    x), and the per-token abs-max is reduced from the per-row maxima; persistent with the next tile's load issued
    before the current products;
  * `_aq_chunk_kernel`: row blocks walked in chunks of CW channels, two passes (abs-max, then re-read from L2 and
    quantize), persistent with prefetch; for shapes the flat tiling does not fit;
  * `_act_quant_kernel` (legacy): the whole row padded to a power of two (or power-of-two pieces) in registers.
Numerics: the block-diagonal Hadamard is a +-1 matrix product (exact) scaled by 1/sqrt(had) per row; when the values
are not exact in one 16-bit type (smoothing multiplier, fp32 input) HAD_PREC selects bf16 hi + lo (two products,
"exact": codes equal the fp32 reference's except at rounding ties) or one fp16 product after a power-of-two
prescale per row ("fast"); rounding is round-half-even (the reference's torch.round) through the 1.5*2^23 trick;
fp8: the hardware's round-to-nearest-even conversion (under the CPU interpreter, whose fp32->fp8 conversion
truncates, the value is first rounded to the e4m3 grid explicitly).
"""
import functools
import os

import torch
import triton
import triton.language as tl

from .types import FP8_E4M3_MAX, QuantizedActivation

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_RNE_MAGIC = 12582912.0  # 1.5 * 2**23: (v + M) - M rounds |v| < 2**22 to the nearest integer, ties to even


@triton.jit
def _round_fp8_grid(v):
    """Round fp32 v (|v| <= 448) to the nearest float8 e4m3 value (ties to even), still in fp32."""
    bits = v.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    e = tl.maximum(e, -6)  # e4m3 subnormals share the exponent of the smallest normal
    ulp = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    t = v / ulp
    t = (t + 12582912.0) - 12582912.0
    return t * ulp


@triton.jit
def _load_rotate(X, MULT, hmat, rows, rmask, k0, K, stride_xm, inv_sqrt_h,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, HD: tl.constexpr,
                 HAS_MULT: tl.constexpr, HAS_HAD: tl.constexpr, SPLIT: tl.constexpr, DOT_F32: tl.constexpr):
    cols = k0 + tl.arange(0, BLOCK_K)
    cmask = cols < K
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
    x = x.to(tl.float32)
    if HAS_MULT:
        mv = tl.load(MULT + cols, mask=cmask, other=0.0).to(tl.float32)
        x = x * mv[None, :]
    if HAS_HAD:
        xr = tl.reshape(x, [BLOCK_M * BLOCK_K // HD, HD])
        if DOT_F32:  # CPU interpreter: its bf16 dot multiplies raw bit patterns, so use fp32 there
            y = tl.dot(xr, hmat.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
        else:
            hi = xr.to(tl.bfloat16)
            y = tl.dot(hi, hmat, out_dtype=tl.float32)
            if SPLIT:
                lo = (xr - hi.to(tl.float32)).to(tl.bfloat16)
                y = tl.dot(lo, hmat, y, out_dtype=tl.float32)
        x = tl.reshape(y, [BLOCK_M, BLOCK_K]) * inv_sqrt_h
    return x


@triton.jit
def _quant_store(y, scale, Q, QSUM, rows, rmask, k0, K, stride_qm, stride_sm, qmax, fmax,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, IS_FP8: tl.constexpr, FP8_SOFT: tl.constexpr,
                 SUM_G: tl.constexpr, ROW_SUM: tl.constexpr, PERM: tl.constexpr):
    cols = k0 + tl.arange(0, BLOCK_K)
    cmask = cols < K
    v = y / scale[:, None]
    m2 = rmask[:, None] & cmask[None, :]
    if IS_FP8:
        v = tl.minimum(tl.maximum(v, -fmax), fmax)
        if FP8_SOFT:
            v = _round_fp8_grid(v)
        tl.store(Q + rows[:, None] * stride_qm + cols[None, :], v.to(tl.float8e4nv), mask=m2)
        part = tl.zeros([BLOCK_M], dtype=tl.int32)
    else:
        v = tl.minimum(tl.maximum(v, -qmax), qmax)
        v = (v + 12582912.0) - 12582912.0
        qi = v.to(tl.int32)
        if PERM:  # parity-split layout for the W4A8 GEMM: even channels in [0, K/2), odd ones in [K/2, K)
            qe, qo = tl.split(tl.reshape(qi.to(tl.int8), [BLOCK_M, BLOCK_K // 2, 2]))
            hcols = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            hm = rmask[:, None] & (hcols < K // 2)[None, :]
            tl.store(Q + rows[:, None] * stride_qm + hcols[None, :], qe, mask=hm)
            tl.store(Q + rows[:, None] * stride_qm + (K // 2 + hcols)[None, :], qo, mask=hm)
        else:
            tl.store(Q + rows[:, None] * stride_qm + cols[None, :], qi.to(tl.int8), mask=m2)
        part = tl.zeros([BLOCK_M], dtype=tl.int32)
        if SUM_G > 0:
            if ROW_SUM:
                part = tl.sum(qi, axis=1)
            else:
                gs = tl.sum(tl.reshape(qi, [BLOCK_M, BLOCK_K // SUM_G, SUM_G]), axis=2)
                gcols = k0 // SUM_G + tl.arange(0, BLOCK_K // SUM_G)
                tl.store(QSUM + rows[:, None] * stride_sm + gcols[None, :], gs,
                         mask=rmask[:, None] & (gcols < K // SUM_G)[None, :])
    return part


@triton.jit
def _quant_store_rows(y, scale, Q, QSUM, rows, rmask, cbase, K, stride_qm, stride_sm, qmax, fmax,
                      BLOCK_M: tl.constexpr, CW: tl.constexpr, IS_FP8: tl.constexpr, FP8_SOFT: tl.constexpr,
                      SUM_G: tl.constexpr, ROW_SUM: tl.constexpr, PERM: tl.constexpr, EVEN_K: tl.constexpr,
                      CLAMP: tl.constexpr = True, RCP: tl.constexpr = False):
    """Quantize y [BLOCK_M, CW] (row i = channels cbase[i] .. cbase[i] + CW of token rows[i]) with the per-row
    scale, store the codes (PERM 0: natural order; 1: parity-split halves; 2: perm32, see triton_gemm
    _w4_operand32), and the per-group sums; returns the per-row code sums (ROW_SUM) or zeros."""
    cc = tl.arange(0, CW)
    cols = cbase[:, None] + cc[None, :]
    if EVEN_K:
        m2 = rmask[:, None] & (cc >= 0)[None, :]
    else:
        m2 = rmask[:, None] & (cols < K)
    qrow = Q + rows[:, None] * stride_qm
    if RCP:  # one reciprocal per row, a multiply per element (differs from dividing at the last bit: ties only)
        v = y * (1.0 / scale)[:, None]
    else:
        v = y / scale[:, None]
    part = tl.zeros([BLOCK_M], dtype=tl.int32)
    if IS_FP8:
        if CLAMP:
            v = tl.minimum(tl.maximum(v, -fmax), fmax)
        if FP8_SOFT:
            v = _round_fp8_grid(v)
        tl.store(qrow + cols, v.to(tl.float8e4nv), mask=m2)
    else:
        # CLAMP=False (dynamic scale = row abs-max / qmax): |v| <= qmax up to rounding, so it already rounds in range
        if CLAMP:
            v = tl.minimum(tl.maximum(v, -qmax), qmax)
        # round half to even: the integer sits in the low bits of v + 1.5 * 2**23; its low byte is the int8 code
        bits = (v + 12582912.0).to(tl.int32, bitcast=True)
        qi = bits - 0x4B400000
        if PERM == 1:
            qe, qo = tl.split(tl.reshape(qi.to(tl.int8), [BLOCK_M, CW // 2, 2]))
            hcols = cbase[:, None] // 2 + tl.arange(0, CW // 2)[None, :]
            hm = rmask[:, None] & (hcols < K // 2)
            tl.store(qrow + hcols, qe, mask=hm)
            tl.store(qrow + K // 2 + hcols, qo, mask=hm)
        elif PERM == 2:
            qp = tl.reshape(tl.permute(tl.reshape(qi.to(tl.int8), [BLOCK_M, CW // 32, 16, 2]), [0, 1, 3, 2]),
                            [BLOCK_M, CW])
            tl.store(qrow + cols, qp, mask=m2)
        else:
            tl.store(qrow + cols, qi.to(tl.int8), mask=m2)
        if SUM_G > 0:
            if ROW_SUM:
                part = tl.sum(qi, axis=1)
            else:
                gs = tl.sum(tl.reshape(qi, [BLOCK_M, CW // SUM_G, SUM_G]), axis=2)
                gcols = cbase[:, None] // SUM_G + tl.arange(0, CW // SUM_G)[None, :]
                tl.store(QSUM + rows[:, None] * stride_sm + gcols, gs, mask=rmask[:, None] & (gcols < K // SUM_G))
    return part


@triton.jit
def _aq_load(X, rows, rmask, cols, K, stride_xm, EVEN_K: tl.constexpr):
    ptrs = X + rows[:, None] * stride_xm + cols[None, :]
    if EVEN_K:
        return tl.load(ptrs, mask=rmask[:, None], other=0.0)
    return tl.load(ptrs, mask=rmask[:, None] & (cols < K)[None, :], other=0.0)


@triton.jit
def _aq_load_step(X, it, pid, NUM_PROGS, steps, NC, total, r, hr, M, K, stride_xm,
                  BLOCK_M: tl.constexpr, CW: tl.constexpr, EVEN_K: tl.constexpr):
    """The x chunk [BLOCK_M, CW] that flat step `it` of this program works on (all masked past the end)."""
    rows = (pid + (it // steps) * NUM_PROGS) * BLOCK_M + r
    return _aq_load(X, rows, (rows < M) & (it < total), ((it % steps) % NC) * CW + hr, K, stride_xm, EVEN_K)


@triton.jit
def _pow2_prescale(xf):
    """Per row of xf: (p, 1/p), powers of two with max|xf * p| in [2**14, 2**15) (inside the fp16 range)."""
    cmax = tl.max(tl.abs(xf), axis=1)
    eb = (cmax.to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased exponent of the row-chunk max
    p = (tl.minimum(tl.maximum(268 - eb, 1), 254) << 23).to(tl.float32, bitcast=True)  # 2**(141 - eb)
    ip = (tl.minimum(tl.maximum(eb - 14, 1), 254) << 23).to(tl.float32, bitcast=True)  # 2**(eb - 141)
    return p, ip


@triton.jit
def _rotate_raw(x, hmat, PREC: tl.constexpr, HAS_HAD: tl.constexpr, DOT_F32: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """x [BLOCK_M, CW] (already multiplied) -> (y, f): the rotated rows are y * f[:, None] * (1 / sqrt(had)), with
    y the +-1 products (see _rotate_chunk for PREC) and f the per-row power of two undoing PREC 1's prescale
    (ones otherwise). Callers fold f and 1/sqrt(had) into per-row factors instead of scaling every element."""
    f = tl.full([BLOCK_M], 1.0, tl.float32)
    y = x.to(tl.float32)
    if HAS_HAD:
        if PREC == 1:
            p, f = _pow2_prescale(y)
            xh = (y * p[:, None]).to(tl.float16)
            if DOT_F32:
                y = tl.dot(xh.to(tl.float32), hmat.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
            else:
                y = tl.dot(xh, hmat, out_dtype=tl.float32)
        elif PREC == 2:
            if DOT_F32:  # CPU interpreter: its bf16 dot multiplies raw bit patterns, so use fp32 there
                y = tl.dot(y, hmat.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
            else:
                hi = y.to(tl.bfloat16)
                lo = (y - hi.to(tl.float32)).to(tl.bfloat16)
                y = tl.dot(hi, hmat, out_dtype=tl.float32)
                y = tl.dot(lo, hmat, y, out_dtype=tl.float32)
        else:
            if DOT_F32:
                y = tl.dot(y, hmat.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
            else:
                y = tl.dot(x, hmat, out_dtype=tl.float32)
    return y, f


@triton.jit
def _rotate_chunk(x, mv, hmat, inv_sqrt_h, PREC: tl.constexpr, HAS_MULT: tl.constexpr, HAS_HAD: tl.constexpr,
                  DOT_F32: tl.constexpr):
    """x [BLOCK_M, CW] (one chunk of channels) -> fp32 (x * mult) @ kron(I, H) / sqrt(had_block).

    PREC 0: one product in the input's own 16-bit type (exact: no multiplier, bf16/fp16 input, +-1 matrix);
    PREC 1: one fp16 product after a power-of-two prescale per (row, chunk) (11-bit operands);
    PREC 2: two bf16 products, hi + lo split (~16-bit operands).
    """
    xf = x.to(tl.float32)
    if HAS_MULT:
        xf = xf * mv[None, :]
    y = xf
    if HAS_HAD:
        if PREC == 1:
            p, ip = _pow2_prescale(xf)
            xh = (xf * p[:, None]).to(tl.float16)
            if DOT_F32:
                y = tl.dot(xh.to(tl.float32), hmat.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
            else:
                y = tl.dot(xh, hmat, out_dtype=tl.float32)
            y = y * (ip * inv_sqrt_h)[:, None]
        elif PREC == 2:
            if DOT_F32:  # CPU interpreter: its bf16 dot multiplies raw bit patterns, so use fp32 there
                y = tl.dot(xf, hmat.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
            else:
                hi = xf.to(tl.bfloat16)
                lo = (xf - hi.to(tl.float32)).to(tl.bfloat16)
                y = tl.dot(hi, hmat, out_dtype=tl.float32)
                y = tl.dot(lo, hmat, y, out_dtype=tl.float32)
            y = y * inv_sqrt_h
        else:
            if DOT_F32:
                y = tl.dot(xf, hmat.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
            else:
                y = tl.dot(x, hmat, out_dtype=tl.float32)
            y = y * inv_sqrt_h
    return y


@triton.jit
def _aq_chunk_kernel(X, MULT, HMAT, Q, SCALE, QSUM, SSCALE,
                     M, K, stride_xm, stride_qm, stride_sm, inv_sqrt_h, qmax, fmax, NUM_PROGS,
                     BLOCK_M: tl.constexpr, CW: tl.constexpr, PREC: tl.constexpr,
                     HAS_MULT: tl.constexpr, HAS_HAD: tl.constexpr,
                     IS_FP8: tl.constexpr, FP8_SOFT: tl.constexpr, STATIC: tl.constexpr,
                     SUM_G: tl.constexpr, ROW_SUM: tl.constexpr, DOT_F32: tl.constexpr, PERM: tl.constexpr,
                     ONE_PASS: tl.constexpr, EVEN_K: tl.constexpr, PREFETCH: tl.constexpr = 1):
    """Persistent: program p walks row blocks p, p + NUM_PROGS, ...; each row block is walked in chunks of CW
    channels (no padding of K), twice (pass 1: rotated abs-max, pass 2: re-read from L2, rotate, quantize, store)
    unless ONE_PASS (static scale, or K <= CW). All (block, pass, chunk) steps form one flat loop whose next
    step's load is issued before this step's products, so a load is always in flight."""
    pid = tl.program_id(0)
    NC = tl.cdiv(K, CW)
    if ONE_PASS:
        steps = NC
    else:
        steps = 2 * NC
    n_blocks = tl.cdiv(M, BLOCK_M)
    total = tl.cdiv(n_blocks - pid, NUM_PROGS) * steps
    hr = tl.arange(0, CW)
    r = tl.arange(0, BLOCK_M)
    if HAS_HAD:
        hmat = tl.load(HMAT + hr[:, None] * CW + hr[None, :])
    else:
        hmat = None
    if PREFETCH >= 1:
        x_next = _aq_load_step(X, 0, pid, NUM_PROGS, steps, NC, total, r, hr, M, K, stride_xm, BLOCK_M, CW, EVEN_K)
    if PREFETCH >= 2:
        x_next2 = _aq_load_step(X, 1, pid, NUM_PROGS, steps, NC, total, r, hr, M, K, stride_xm, BLOCK_M, CW, EVEN_K)
    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
    if STATIC:
        scale = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(SSCALE).to(tl.float32)
    else:
        scale = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    rowsum = tl.zeros([BLOCK_M], dtype=tl.int32)
    for it in range(0, total):
        # issue the next steps' loads before this step's math (PREFETCH = how many steps ahead; 0: the compiler's
        # software pipeliner, num_stages, decides)
        if PREFETCH == 0:
            x = _aq_load_step(X, it, pid, NUM_PROGS, steps, NC, total, r, hr, M, K, stride_xm, BLOCK_M, CW, EVEN_K)
        elif PREFETCH == 1:
            x = x_next
            x_next = _aq_load_step(X, it + 1, pid, NUM_PROGS, steps, NC, total, r, hr, M, K, stride_xm, BLOCK_M, CW,
                                   EVEN_K)
        else:
            x = x_next
            x_next = x_next2
            x_next2 = _aq_load_step(X, it + 2, pid, NUM_PROGS, steps, NC, total, r, hr, M, K, stride_xm, BLOCK_M,
                                    CW, EVEN_K)
        s = it % steps
        c = s % NC
        rows = (pid + (it // steps) * NUM_PROGS) * BLOCK_M + r
        rmask = rows < M
        k0 = c * CW
        if HAS_MULT:
            if EVEN_K:
                mv = tl.load(MULT + k0 + hr).to(tl.float32)
            else:
                mv = tl.load(MULT + k0 + hr, mask=k0 + hr < K, other=0.0).to(tl.float32)
        else:
            mv = None
        y = _rotate_chunk(x, mv, hmat, inv_sqrt_h, PREC, HAS_MULT, HAS_HAD, DOT_F32)
        if ONE_PASS:
            if not STATIC:
                scale = tl.maximum(tl.max(tl.abs(y), axis=1), 1e-12) / fmax
            rowsum += _quant_store_rows(y, scale, Q, QSUM, rows, rmask, k0 + r * 0, K, stride_qm, stride_sm, qmax,
                                        fmax, BLOCK_M, CW, IS_FP8, FP8_SOFT, SUM_G, ROW_SUM, PERM, EVEN_K)
            if c == NC - 1:
                tl.store(SCALE + rows, scale, mask=rmask)
                if ROW_SUM:
                    tl.store(QSUM + rows * stride_sm, rowsum, mask=rmask)
                rowsum = tl.zeros([BLOCK_M], dtype=tl.int32)
        else:
            if s < NC:
                amax = tl.maximum(amax, tl.max(tl.abs(y), axis=1))
                if s == NC - 1:
                    scale = tl.maximum(amax, 1e-12) / fmax
                    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
            else:
                rowsum += _quant_store_rows(y, scale, Q, QSUM, rows, rmask, k0 + r * 0, K, stride_qm, stride_sm,
                                            qmax, fmax, BLOCK_M, CW, IS_FP8, FP8_SOFT, SUM_G, ROW_SUM, PERM, EVEN_K)
                if s == steps - 1:
                    tl.store(SCALE + rows, scale, mask=rmask)
                    if ROW_SUM:
                        tl.store(QSUM + rows * stride_sm, rowsum, mask=rmask)
                    rowsum = tl.zeros([BLOCK_M], dtype=tl.int32)


@triton.jit
def _aq_flat_kernel(X, MULT, HMAT, Q, SCALE, QSUM, SSCALE,
                    M, K, stride_xm, stride_qm, stride_sm, inv_sqrt_h, qmax, fmax, NUM_PROGS,
                    BB: tl.constexpr, CW: tl.constexpr, NB: tl.constexpr, T: tl.constexpr, TP: tl.constexpr,
                    PREC: tl.constexpr, HAS_MULT: tl.constexpr, HAS_HAD: tl.constexpr,
                    IS_FP8: tl.constexpr, FP8_SOFT: tl.constexpr, STATIC: tl.constexpr,
                    SUM_G: tl.constexpr, ROW_SUM: tl.constexpr, DOT_F32: tl.constexpr, PERM: tl.constexpr,
                    PREFETCH: tl.constexpr):
    """One pass, nothing padded: x [M, K] seen as M * NB blocks of CW channels (NB = K / CW); a tile is T whole
    tokens = T * NB <= BB block rows (K = 1152: 9 blocks, 7 tokens in 63 of 64 rows), so every token's rotated
    row is in registers at once. The block rows are one tensor-core operand [BB, CW] x [CW, CW]; the per-token
    abs-max and scale are reduced from the per-row maxima with a [TP, BB] selection. Persistent over tiles
    (program p: tiles p, p + NUM_PROGS, ...), the next tile's load issued before this one's math (PREFETCH)."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(M, T)
    r = tl.arange(0, BB)
    c = tl.arange(0, CW)
    tok_l = r // NB
    cbase = (r % NB) * CW
    rvalid = r < T * NB
    tt = tl.arange(0, TP)
    sel = tok_l[None, :] == tt[:, None]  # [TP, BB]: block row -> its token in the tile
    if HAS_HAD:
        hmat = tl.load(HMAT + c[:, None] * CW + c[None, :])
    else:
        hmat = None
    if PREFETCH:
        tok0 = pid * T + tok_l
        x_next = tl.load(X + tok0[:, None] * stride_xm + cbase[:, None] + c[None, :],
                         mask=(rvalid & (tok0 < M))[:, None], other=0.0)
    for t in range(pid, n_tiles, NUM_PROGS):
        tok = t * T + tok_l
        valid = rvalid & (tok < M)
        if PREFETCH:
            x = x_next
            tokn = (t + NUM_PROGS) * T + tok_l
            x_next = tl.load(X + tokn[:, None] * stride_xm + cbase[:, None] + c[None, :],
                             mask=(rvalid & (tokn < M))[:, None], other=0.0)
        else:
            x = tl.load(X + tok[:, None] * stride_xm + cbase[:, None] + c[None, :], mask=valid[:, None], other=0.0)
        if HAS_MULT:
            x = x.to(tl.float32) * tl.load(MULT + cbase[:, None] + c[None, :])
        y, f = _rotate_raw(x, hmat, PREC, HAS_HAD, DOT_F32, BB)
        f = f * inv_sqrt_h  # rotated row i = y[i, :] * f[i]
        ttok = t * T + tt
        tmask = (tt < T) & (ttok < M)
        if STATIC:
            ts = tl.zeros([TP], dtype=tl.float32) + tl.load(SSCALE).to(tl.float32)
            rs = tl.zeros([BB], dtype=tl.float32) + tl.load(SSCALE).to(tl.float32)
        else:
            bmax = tl.max(tl.abs(y), axis=1) * f
            tmax = tl.max(tl.where(sel, bmax[None, :], 0.0), axis=1)
            ts = tl.maximum(tmax, 1e-12) / fmax
            rs = tl.sum(tl.where(sel, ts[:, None], 0.0), axis=0)  # exactly one token per row: exact
            rs = tl.where(rvalid, rs, 1.0)
        part = _quant_store_rows(y, rs / f, Q, QSUM, tok, valid, cbase, K, stride_qm, stride_sm, qmax, fmax,
                                 BB, CW, IS_FP8, FP8_SOFT, SUM_G, ROW_SUM, PERM, True, STATIC, HAS_HAD)
        tl.store(SCALE + ttok, ts, mask=tmask)
        if ROW_SUM:
            tsum = tl.sum(tl.where(sel, part[None, :], 0), axis=1)
            tl.store(QSUM + ttok * stride_sm, tsum, mask=tmask)


@triton.jit
def _act_quant_kernel(X, MULT, HMAT, Q, SCALE, QSUM, SSCALE,
                      M, K, stride_xm, stride_qm, stride_sm, inv_sqrt_h, qmax, fmax,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, HD: tl.constexpr,
                      HAS_MULT: tl.constexpr, HAS_HAD: tl.constexpr, SPLIT: tl.constexpr,
                      IS_FP8: tl.constexpr, FP8_SOFT: tl.constexpr, STATIC: tl.constexpr,
                      SUM_G: tl.constexpr, ROW_SUM: tl.constexpr, DOT_F32: tl.constexpr, ONE_CHUNK: tl.constexpr,
                      PERM: tl.constexpr = False, P0: tl.constexpr = 0, P1: tl.constexpr = 0, P2: tl.constexpr = 0,
                      P3: tl.constexpr = 0):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    if HAS_HAD:
        hr = tl.arange(0, HD)
        hmat = tl.load(HMAT + hr[:, None] * HD + hr[None, :])
    else:
        hmat = None
    rowsum = tl.zeros([BLOCK_M], dtype=tl.int32)
    if P0 > 0:
        # the row as up to four power-of-two pieces (K = P0 + P1 + P2 + P3, e.g. 1152 = 1024 + 128): all of it in
        # registers, read once, no padded lanes in the Hadamard products
        y0 = _load_rotate(X, MULT, hmat, rows, rmask, 0, K, stride_xm, inv_sqrt_h,
                          BLOCK_M, P0, HD, HAS_MULT, HAS_HAD, SPLIT, DOT_F32)
        amax = tl.max(tl.abs(y0), axis=1)
        if P1 > 0:
            y1 = _load_rotate(X, MULT, hmat, rows, rmask, P0, K, stride_xm, inv_sqrt_h,
                              BLOCK_M, P1, HD, HAS_MULT, HAS_HAD, SPLIT, DOT_F32)
            amax = tl.maximum(amax, tl.max(tl.abs(y1), axis=1))
        if P2 > 0:
            y2 = _load_rotate(X, MULT, hmat, rows, rmask, P0 + P1, K, stride_xm, inv_sqrt_h,
                              BLOCK_M, P2, HD, HAS_MULT, HAS_HAD, SPLIT, DOT_F32)
            amax = tl.maximum(amax, tl.max(tl.abs(y2), axis=1))
        if P3 > 0:
            y3 = _load_rotate(X, MULT, hmat, rows, rmask, P0 + P1 + P2, K, stride_xm, inv_sqrt_h,
                              BLOCK_M, P3, HD, HAS_MULT, HAS_HAD, SPLIT, DOT_F32)
            amax = tl.maximum(amax, tl.max(tl.abs(y3), axis=1))
        if STATIC:
            scale = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(SSCALE).to(tl.float32)
        else:
            scale = tl.maximum(amax, 1e-12) / fmax
        rowsum += _quant_store(y0, scale, Q, QSUM, rows, rmask, 0, K, stride_qm, stride_sm, qmax, fmax,
                               BLOCK_M, P0, IS_FP8, FP8_SOFT, SUM_G, ROW_SUM, PERM)
        if P1 > 0:
            rowsum += _quant_store(y1, scale, Q, QSUM, rows, rmask, P0, K, stride_qm, stride_sm, qmax, fmax,
                                   BLOCK_M, P1, IS_FP8, FP8_SOFT, SUM_G, ROW_SUM, PERM)
        if P2 > 0:
            rowsum += _quant_store(y2, scale, Q, QSUM, rows, rmask, P0 + P1, K, stride_qm, stride_sm, qmax, fmax,
                                   BLOCK_M, P2, IS_FP8, FP8_SOFT, SUM_G, ROW_SUM, PERM)
        if P3 > 0:
            rowsum += _quant_store(y3, scale, Q, QSUM, rows, rmask, P0 + P1 + P2, K, stride_qm, stride_sm, qmax,
                                   fmax, BLOCK_M, P3, IS_FP8, FP8_SOFT, SUM_G, ROW_SUM, PERM)
    elif ONE_CHUNK:
        y = _load_rotate(X, MULT, hmat, rows, rmask, 0, K, stride_xm, inv_sqrt_h,
                         BLOCK_M, BLOCK_K, HD, HAS_MULT, HAS_HAD, SPLIT, DOT_F32)
        if STATIC:
            scale = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(SSCALE).to(tl.float32)
        else:
            scale = tl.maximum(tl.max(tl.abs(y), axis=1), 1e-12) / fmax
        rowsum += _quant_store(y, scale, Q, QSUM, rows, rmask, 0, K, stride_qm, stride_sm, qmax, fmax,
                               BLOCK_M, BLOCK_K, IS_FP8, FP8_SOFT, SUM_G, ROW_SUM, PERM)
    else:
        if STATIC:
            scale = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(SSCALE).to(tl.float32)
        else:
            amax = tl.zeros([BLOCK_M], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                y = _load_rotate(X, MULT, hmat, rows, rmask, k0, K, stride_xm, inv_sqrt_h,
                                 BLOCK_M, BLOCK_K, HD, HAS_MULT, HAS_HAD, SPLIT, DOT_F32)
                amax = tl.maximum(amax, tl.max(tl.abs(y), axis=1))
            scale = tl.maximum(amax, 1e-12) / fmax
        for k0 in range(0, K, BLOCK_K):
            y = _load_rotate(X, MULT, hmat, rows, rmask, k0, K, stride_xm, inv_sqrt_h,
                             BLOCK_M, BLOCK_K, HD, HAS_MULT, HAS_HAD, SPLIT, DOT_F32)
            rowsum += _quant_store(y, scale, Q, QSUM, rows, rmask, k0, K, stride_qm, stride_sm, qmax, fmax,
                                   BLOCK_M, BLOCK_K, IS_FP8, FP8_SOFT, SUM_G, ROW_SUM, PERM)
    tl.store(SCALE + rows, scale, mask=rmask)
    if ROW_SUM:
        tl.store(QSUM + rows * stride_sm, rowsum, mask=rmask)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv costs ~5 us per call on the host (a constexpr function); launches use this


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def m_bucket(m: int) -> int:
    """Tuning key for the token count: the next power of two (capped)."""
    return min(_next_pow2(max(m, 1)), 65536)


class Tuner:
    """Per-shape choice among launch candidates, measured once per key on the GPU.

    `pick(key, candidates, launch)` returns the candidate with the lowest median time of `launch(c)`
    (triton.testing.do_bench), caching it per key. Under the CPU interpreter, with VIDITQ_TUNE=0, or with a
    single candidate it takes the first one without timing. `force` (tests) overrides the choice.
    A candidate that fails to compile or launch is skipped; `timings[key]` keeps what was measured.
    """

    def __init__(self, name: str, graph: bool = False):
        self.name = name
        self.graph = graph  # time CUDA-graph replays: for kernels shorter than their host launch path
        self.best = {}
        self.timings = {}
        self.force = None
        self.inherit = {}

    def pick(self, key, candidates, launch):
        if self.force is not None:
            return self.force
        if key in self.best:
            return self.best[key]
        tune = os.environ.get("VIDITQ_TUNE", "1") not in ("0", "")
        if not INTERPRET and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return candidates[0]  # nothing can be timed inside a capture; tuned on the next eager call
        if INTERPRET or not tune or len(candidates) == 1:
            best = candidates[0]
        else:
            times = {}
            if self.graph:
                # triton's do_bench_cudagraph runs its first call on a fresh stream that does not wait for ours:
                # without this, a candidate could write its output into memory that queued kernels of this stream
                # are still reading (a block freed and handed out again) or read inputs not yet written
                torch.cuda.synchronize()
            for c in candidates:
                try:
                    launch(c)  # compile + warm
                    if self.graph:
                        times[c] = triton.testing.do_bench_cudagraph(lambda: launch(c), rep=10,
                                                                     return_mode="median")
                    else:
                        times[c] = triton.testing.do_bench(lambda: launch(c), warmup=5, rep=20,
                                                           return_mode="median")
                except Exception as e:  # out of resources, compile failure: not a candidate here
                    times[c] = float("inf")
                    last_errors[(self.name, c)] = f"{type(e).__name__}: {str(e)[-400:]}"
            best = min(times, key=times.get)
            if times[best] == float("inf"):
                raise RuntimeError(f"{self.name}: no candidate config ran for {key}: {list(last_errors.values())[-1]}")
            self.timings[key] = times
        self.best[key] = best
        return best


last_errors = {}
tuner = Tuner("act_quant", graph=True)  # graph replays: eager timing of a ~10 us kernel times the host

# Candidates: (kind, rows per program step, num_warps, programs per SM (0: one program per tile, no persistence),
# CW (0: the default channels per block / chunk), PREFETCH, num_stages).
#   "flat":  one pass over tiles of whole tokens (_aq_flat_kernel); rows = BB block rows of CW channels;
#   "chunk": two passes over K per row block (_aq_chunk_kernel), for shapes the flat tiling does not fit.
_GPU_FLAT = [("flat", 64, 4, 0, 0, 0, 1), ("flat", 64, 4, 2, 0, 1, 1), ("flat", 128, 8, 0, 0, 0, 1),
             ("flat", 16, 4, 0, 0, 0, 1)]
_INTERP_FLAT = [("flat", 64, 4, 0, 0, 0, 1), ("flat", 16, 4, 2, 0, 1, 1)]
_GPU_CHUNK = [("chunk", 64, 4, 1, 0, 0, 3), ("chunk", 64, 4, 2, 0, 1, 1)]
_INTERP_CHUNK = [("chunk", 16, 4, 2, 0, 1, 1), ("chunk", 32, 4, 1, 0, 2, 1), ("chunk", 16, 4, 3, 0, 0, 1)]
# Legacy whole-row kernel (the previous winners): ("row", BLOCK_M, BLOCK_K, num_warps); BLOCK_K = 0: the whole row
# padded to a power of two; -1: the whole row as power-of-two pieces; otherwise chunks of BLOCK_K, two passes.
_GPU_ROW = [(4, 0, 4), (1, 0, 4)]
_INTERP_ROW = [(8, 64, 4), (4, 0, 4), (16, -1, 8), (4, -1, 4)]
_LEGACY_ENV = "VIDITQ_AQ_LEGACY"  # 1: the tuner also times the legacy whole-row kernel; only: nothing else
_PQ_ENV = "VIDITQ_AQ_PQ"  # 1 (default): the tuner also times the whole-row transform kernel ("pq"); 0: not


def row_pieces(k: int):
    """K as at most four powers of two, largest first (1152 -> (1024, 128)); None if it takes more."""
    p = [1 << b for b in range(k.bit_length() - 1, -1, -1) if k >> b & 1]
    return tuple(p) if len(p) <= 4 else None


def chunk_width(k: int, had_block: int, sum_group: int, row_sum: bool) -> int:
    """Channels per chunk: a power of two, a multiple of the Hadamard block and of the sum group, <= 128 where
    those allow (K = 1152 -> 128: nine chunks, nothing padded)."""
    cw = max(16, min(128, _next_pow2(k)))
    if had_block > 1:
        cw = max(cw, had_block)
    if sum_group and not row_sum:
        cw = max(cw, sum_group)
    return cw


def _row_candidates(k, had_block, sum_group, row_sum):
    hd = max(had_block, 16) if had_block > 1 else 16
    full = max(_next_pow2(k), hd, 16)
    pieces = row_pieces(k)
    out = []
    for bm, bk, nw in (_INTERP_ROW if INTERPRET else _GPU_ROW):
        if bk == -1:  # pieces
            if pieces is None or min(pieces) < max(hd, 16) or (had_block > 1 and bm * min(pieces) // hd < 16):
                continue
            if sum_group and not row_sum and min(pieces) % sum_group:
                continue
            if bm * k > 2560 * nw:  # <= 80 fp32 of the row block per thread
                continue
            out.append(("row", bm, -1, nw))
            continue
        whole = bk == 0
        bk = full if whole else bk
        if bk < hd or (had_block > 1 and bm * bk // hd < 16):
            continue
        if sum_group and not row_sum and bk % sum_group:
            continue
        if whole and bm * bk > 2048 * nw:  # the row block must fit in registers (<= 64 fp32 per thread)
            continue
        if not whole and bk >= k:
            continue  # same as a whole-row candidate
        c = ("row", bm, bk, nw)
        if c not in out:
            out.append(c)
    return out


def flat_block(k: int, had_block: int, sum_group: int, row_sum: bool) -> int:
    """Channels per block row of the flat kernel (0: the flat tiling does not fit this K)."""
    for cw in (128, max(16, had_block, sum_group if (sum_group and not row_sum) else 0)):
        if cw >= max(had_block, 1) and (row_sum or not sum_group or cw % sum_group == 0) and k % cw == 0:
            return cw
    return 0


def candidates(k: int, had_block: int, sum_group: int, row_sum: bool, m: int = 1 << 30, perm: int = 0,
               static: bool = False):
    """Valid launch candidates for this row shape (the first is the default under VIDITQ_TUNE=0).

    ("pq", rows, warps): triton_prologue_quant's whole-row kernel with no prologue (dynamic scales; code sums and
    the perm32 order as its W4A8 mode writes them, no parity split), the block Hadamard as a transform in registers;
    the tensor-core kernels below follow."""
    from . import triton_prologue_quant as tpq  # it imports this module

    legacy = os.environ.get(_LEGACY_ENV, "1" if not INTERPRET else "0")
    out = []
    pq = os.environ.get(_PQ_ENV, "1").strip() not in ("0", "")
    w4_ok = k % 32 == 0 and (row_sum or tpq.group_sums_supported(k, sum_group))  # its code-sum / perm32 store
    if pq and legacy != "only" and not static and perm != 1 and (w4_ok or not (sum_group or perm)) \
            and k <= tpq.MAX_K and tpq.had_supported(k, had_block):
        # one or two rows per program (one warp per row won for the plain quantize: session 12)
        out += [("pq",) + c for c in tpq.candidates(k, m, 0, had_block if had_block > 1 else 0) if c[0] <= 2]
    if legacy != "only":
        fcw = flat_block(k, had_block, sum_group, row_sum)
        if fcw:
            nb = k // fcw
            for kind, bb, nw, occ, _, pf, st in (_INTERP_FLAT if INTERPRET else _GPU_FLAT):
                if bb < nb or bb * fcw > 64 * 32 * nw:  # a token must fit; <= 64 fp32 of the tile per thread
                    continue
                if (bb // nb) * nb * 4 < bb * 3 and bb > 16 * nb:  # < 75 % of the rows used, and a smaller tile fits
                    continue
                c = (kind, bb, nw, occ, fcw, pf, st)
                if c not in out:
                    out.append(c)
        cw = chunk_width(k, had_block, sum_group, row_sum)
        for kind, bm, nw, occ, _, pf, st in (_INTERP_CHUNK if INTERPRET else _GPU_CHUNK):
            if bm * cw > 64 * 32 * nw or bm > max(16, _next_pow2(m)):
                continue
            c = (kind, bm, nw, occ, cw, pf, st)
            if c not in out:
                out.append(c)
        if not out:
            out.append(("chunk", 16, 4, 4, cw, 1, 1))
    if (legacy != "0" and perm != 2) or not out:
        out += _row_candidates(k, had_block, sum_group, row_sum)
    return out


_HADAMARD_CACHE = {}


def _pm1_hadamard(hd: int, had_block: int, device_str: str, dtype=torch.bfloat16) -> torch.Tensor:
    """kron(I_{hd/had_block}, H_had_block) with ±1 entries (exact in bf16 / fp16), on the device, built once.

    Kept for the process, so it must not come from a CUDA graph's private memory pool: torch.compile's
    mode="reduce-overhead" routes the calling thread's allocations to its pool both while it records and in the
    warm-up run before (no capture is visible then), and a cached tensor in the pool would be overwritten by
    replays. So on CUDA it is always built in another thread, whose allocations the pool does not own."""
    key = (hd, had_block, device_str, dtype)
    t = _HADAMARD_CACHE.get(key)
    if t is None:
        if device_str.startswith("cuda") and not INTERPRET:
            import threading

            box = []

            def build():
                try:
                    box.append(_build_pm1_hadamard(hd, had_block, device_str, dtype))
                except BaseException as e:  # raised in the caller's thread below
                    box.append(e)
            th = threading.Thread(target=build)
            th.start()
            th.join()
            if isinstance(box[0], BaseException):
                raise box[0]
            t = box[0]
        else:
            t = _build_pm1_hadamard(hd, had_block, device_str, dtype)
        _HADAMARD_CACHE[key] = t
    return t


def _build_pm1_hadamard(hd, had_block, device_str, dtype):
    h = torch.ones(1, 1)
    while h.shape[0] < had_block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    full = torch.kron(torch.eye(hd // had_block), h)
    t = full.to(device=device_str, dtype=dtype).contiguous()
    if t.is_cuda:
        torch.cuda.current_stream(t.device).synchronize()  # this thread's copy is done before the caller uses it
    return t


last_kernel = None  # the last compiled kernel launched and its candidate (benchmark reports)
last_config = None

# Precision of the Hadamard product when the rotated values are not exactly representable in one 16-bit type
# (a smoothing multiplier, or fp32 input): "exact" = bf16 hi + lo, two products (codes equal the fp32 reference's
# except at rounding ties, ~1e-4 of them); "fast" = one fp16 product after a power-of-two prescale (11-bit
# operands: a code moves by one where the fp32 value lies within ~0.03 of a rounding tie, ~1 % of codes).
HAD_PREC_ENV = "VIDITQ_HAD_PREC"
HAD_PREC_DEFAULT = "exact"


def had_precision(x_dtype, has_mult: bool, prec=None) -> int:
    """The kernel's PREC for this call: 0 one exact product, 1 fp16 fast, 2 bf16 hi/lo exact."""
    if x_dtype in (torch.bfloat16, torch.float16) and not has_mult:
        return 0
    p = (prec or os.environ.get(HAD_PREC_ENV, "") or HAD_PREC_DEFAULT).strip().lower()
    if p not in ("exact", "fast"):
        raise ValueError(f"{HAD_PREC_ENV} must be 'exact' or 'fast', got {p!r}")
    return 1 if p == "fast" else 2


def supported(x: torch.Tensor, had_block: int, fmt: str, sum_group: int) -> bool:
    k = x.shape[-1]
    if fmt not in ("int8", "fp8") or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if had_block > 1 and (had_block & (had_block - 1) or k % had_block or had_block > 1024):
        return False
    if sum_group:
        if fmt != "int8" or k % sum_group:
            return False
        if sum_group != k and sum_group & (sum_group - 1):
            return False
    return k > 0


def _num_sms(dev) -> int:
    if INTERPRET or dev.type != "cuda":
        return 1
    return _sm_count(str(dev))


@functools.lru_cache(maxsize=8)
def _sm_count(device_str: str) -> int:
    return torch.cuda.get_device_properties(torch.device(device_str)).multi_processor_count


PERM_MODES = {False: 0, None: 0, 0: 0, True: 1, 1: 1, "parity": 1, 2: 2, "perm32": 2}


@functools.lru_cache(maxsize=512)
def launcher(c, k, dtype, device_str, had_block, pr, qmax, fmt, common_items):
    """The launch of candidate `c` for one row shape, everything that does not depend on the call's tensors
    bound once: returns fn(x2, mult_or_scale, q, scale, qsum_or_scale, sscale, m, stride_sm) -> compiled kernel.
    (Cached: a layer's steady-state call then costs two allocations and this one launch.)"""
    common = dict(common_items)
    has_had = had_block > 1
    inv_sqrt_h = 1.0 / (had_block ** 0.5) if has_had else 1.0
    fmax = FP8_E4M3_MAX if fmt == "fp8" else float(qmax)
    dev = torch.device(device_str)
    if c[0] == "pq":
        from . import triton_prologue_quant as tpq

        _, rows, nw = c
        sg, perm = common["SUM_G"], common["PERM"]
        w4 = 2 if perm == 2 else (1 if sg else 0)  # its W4A8 store: perm32 codes / natural codes, with code sums
        if common["STATIC"] or perm == 1 or not tpq.had_supported(k, had_block) or (perm and not sg):
            raise ValueError(f"act-quant candidate {c} takes dynamic scales, no parity split, perm32 with sums")
        run = tpq.launcher((rows, nw), k, 0, common["HAS_MULT"], fmt, had_block if has_had else 0, 1e-6, fmax, w4,
                           0 if common["ROW_SUM"] else sg)

        def fn(x2, mv, q, scale, qs, sscale, m, stride_sm):  # qs: a contiguous [M, K / sum_group] (as allocated)
            return run(x2, scale, scale, mv, q, scale, m, max(m, 1), 0, 0, qs)
        return fn
    if c[0] in ("flat", "chunk"):
        _, bb, nw, occ, cw, pf, st = c
        hdt = {0: dtype, 1: torch.float16, 2: torch.bfloat16}[pr]
        hmat = _pm1_hadamard(cw, had_block, device_str, hdt) if has_had else None
        cap = 2 if INTERPRET else _num_sms(dev) * occ  # persistent programs
        if c[0] == "flat":
            nb = k // cw
            t = bb // nb
            kw = dict(BB=bb, CW=cw, NB=nb, T=t, TP=_next_pow2(t), PREC=pr, PREFETCH=bool(pf) and occ > 0,
                      num_warps=nw, num_stages=st, **common)

            def fn(x2, mv, q, scale, qs, sscale, m, stride_sm):
                ntiles = _cdiv(m, t)
                progs = ntiles if occ == 0 else min(ntiles, cap)
                return _aq_flat_kernel[(progs,)](x2, mv, scale if hmat is None else hmat, q, scale, qs, sscale, m,
                                                 k, x2.stride(0), q.stride(0), stride_sm, inv_sqrt_h, qmax, fmax,
                                                 progs, **kw)
            return fn
        kw = dict(BLOCK_M=bb, CW=cw, PREC=pr, ONE_PASS=common["STATIC"] or k <= cw, EVEN_K=k % cw == 0,
                  PREFETCH=pf, num_warps=nw, num_stages=st, **common)

        def fn(x2, mv, q, scale, qs, sscale, m, stride_sm):
            progs = min(_cdiv(m, bb), cap)
            return _aq_chunk_kernel[(progs,)](x2, mv, scale if hmat is None else hmat, q, scale, qs, sscale, m, k,
                                              x2.stride(0), q.stride(0), stride_sm, inv_sqrt_h, qmax, fmax, progs,
                                              **kw)
        return fn
    # legacy whole-row kernel
    _, bm, bk, nw = c
    hd = max(had_block, 16) if has_had else 16
    hmat = _pm1_hadamard(hd, had_block, device_str) if has_had else None
    flags = dict(common, HD=hd, SPLIT=dtype != torch.bfloat16 or common["HAS_MULT"], num_warps=nw)
    if bk == -1:
        p = (row_pieces(k) or ()) + (0,) * 4
        flags.update(BLOCK_M=bm, BLOCK_K=p[0], ONE_CHUNK=True, P0=p[0], P1=p[1], P2=p[2], P3=p[3])
    else:
        bk = bk or max(_next_pow2(k), hd, 16)
        flags.update(BLOCK_M=bm, BLOCK_K=bk, ONE_CHUNK=bk >= k)

    def fn(x2, mv, q, scale, qs, sscale, m, stride_sm):
        return _act_quant_kernel[(_cdiv(m, bm),)](x2, mv, scale if hmat is None else hmat, q, scale, qs,
                                                         sscale, m, k, x2.stride(0), q.stride(0), stride_sm,
                                                         inv_sqrt_h, qmax, fmax, **flags)
    return fn


def quantize_activation(x, mult=None, had_block=0, fmt="int8", qmax=127, static_scale=None, sum_group=0,
                        out=None, perm=False, prec=None, return_launch=False):
    """Triton twin of reference.quantize_activation; None when the combination has no kernel.

    `out` may pass preallocated (q, scale, qsum) buffers. `perm` (int8 only, for the W4A8 GEMM) reorders each
    token's codes: True / "parity": channels 0, 2, 4, ... in q[:, :K/2] and 1, 3, 5, ... in q[:, K/2:];
    "perm32": within every 32 channels, the 16 even ones then the 16 odd ones (K % 32 == 0). Scale and qsum are
    unchanged. `prec` ("exact" / "fast") overrides VIDITQ_HAD_PREC (see HAD_PREC_DEFAULT).
    return_launch: also return the tuned launch for this row shape, fn(x2, mult_or_scale, q, scale, qsum_or_scale,
    sscale, m, stride_sm) (see `launcher`), so a caller can skip this setup on its next calls.
    """
    global last_kernel, last_config
    k = x.shape[-1]
    perm = PERM_MODES[perm]
    if not supported(x, had_block, fmt, sum_group) or (perm and (fmt != "int8" or k % (2 if perm == 1 else 32))):
        return None
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    dev = x2.device
    if out is not None:
        q, scale, qsum = out
    else:
        q = torch.empty((m, k), device=dev, dtype=torch.float8_e4m3fn if fmt == "fp8" else torch.int8)
        scale = torch.empty((m,), device=dev, dtype=torch.float32)
        qsum = torch.empty((m, k // sum_group), device=dev, dtype=torch.int32) if sum_group else None
    if m == 0:
        a = QuantizedActivation(q=q, scale=scale, qsum=qsum)
        return (a, None) if return_launch else a
    has_had = had_block > 1
    has_mult = mult is not None
    if has_mult and (mult.device != dev or not mult.is_contiguous() or mult.dim() != 1):
        mult = mult.reshape(-1).to(device=dev).contiguous()
    pr = had_precision(x2.dtype, has_mult, prec) if has_had else 0
    sscale = static_scale.reshape(-1)[:1].to(device=dev, dtype=torch.float32) if static_scale is not None else scale
    row_sum = bool(sum_group) and sum_group == k
    static = static_scale is not None
    common = dict(HAS_MULT=has_mult, HAS_HAD=has_had, IS_FP8=fmt == "fp8", FP8_SOFT=INTERPRET, STATIC=static,
                  SUM_G=int(sum_group), ROW_SUM=row_sum, DOT_F32=INTERPRET, PERM=perm)
    setup = (k, x2.dtype, str(dev), had_block, pr, float(qmax), fmt, tuple(common.items()))
    args = (x2, mult if has_mult else scale, q, scale, qsum if qsum is not None else scale, sscale, m,
            qsum.stride(0) if qsum is not None else 0)

    def launch(c):
        return launcher(c, *setup)(*args)

    key = (k, m_bucket(m), x2.dtype, str(dev), had_block, pr, os.environ.get(_LEGACY_ENV, ""),
           os.environ.get(_PQ_ENV, "")) + \
        tuple(common.values())
    cands = candidates(k, had_block, int(sum_group), row_sum, m, perm, static)
    if qsum is not None and not qsum.is_contiguous():  # (a caller's `out`): the whole-row kernel writes contiguous
        cands = [c for c in cands if c[0] != "pq"] or cands  # sums only
        key += ("strided_qsum",)
    # the variants of one row shape (code order, code sums, static scale) reuse the configuration timed for the
    # first one tuned (their kernels differ only in the store), instead of compiling and timing every candidate;
    # not across rotation and no rotation ("pq" costs differ there) nor across the "pq" switch
    base = (k, m_bucket(m), x2.dtype, str(dev), fmt, pr if has_had else had_precision(x2.dtype, True, prec),
            has_had, os.environ.get(_PQ_ENV, ""))
    if key not in tuner.best and tuner.force is None and tuner.inherit.get(base) in cands:
        tuner.best[key] = tuner.inherit[base]
    c = tuner.pick(key, cands, launch)
    tuner.inherit.setdefault(base, c)
    last_config = c
    last_kernel = launch(c)
    a = QuantizedActivation(q=q, scale=scale, qsum=qsum)
    return (a, launcher(c, *setup)) if return_launch else a
