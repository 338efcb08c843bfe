"""Fused activation quantization (Triton): x -> x*mult -> block Hadamard -> per-token scale -> int8 / fp8.

One launch reads x[M, K] (fp16 / bf16 / fp32) and writes q[M, K] (int8 or float8_e4m3fn), scale[M] (fp32) and,
when asked, per-group sums of q (int32). The oracle is `reference.quantize_activation`.

How it works (one program = BLOCK_M tokens):
  * the row is walked in chunks of BLOCK_K channels (a power of two, multiple of the Hadamard block);
    BLOCK_K >= K means the whole row sits in registers and is read once ("one chunk");
    otherwise pass 1 finds the rotated row's abs-max and pass 2 re-reads the same rows (an L1/L2 hit)
    and quantizes;
  * the block-diagonal Hadamard is one tensor-core product per chunk: the chunk [BLOCK_M, BLOCK_K] is viewed
    as [BLOCK_M*BLOCK_K/HD, HD] and multiplied by a ±1 matrix of size HD = max(had_block, 16)
    (kron(I, H_had_block), exact in bf16); fp32 inputs are split into two bf16 parts (hi + lo), which keeps
    ~16 mantissa bits, far finer than one int8 step;
  * rounding is round-half-even (the reference's torch.round) through the 1.5*2^23 trick;
  * fp8: the clamp to ±448 then the hardware's round-to-nearest-even conversion; under the CPU interpreter
    (whose fp32->fp8 conversion truncates) the value is first rounded to the e4m3 grid explicitly.
"""
import functools
import os

import torch
import triton
import triton.language as tl

from .types import FP8_E4M3_MAX, SCALE_EPS, QuantizedActivation

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

    def __init__(self, name: str):
        self.name = name
        self.best = {}
        self.timings = {}
        self.force = None

    def pick(self, key, candidates, launch):
        if self.force is not None:
            return self.force
        if key in self.best:
            return self.best[key]
        tune = os.environ.get("VIDITQ_TUNE", "1") not in ("0", "")
        if INTERPRET or not tune or len(candidates) == 1:
            best = candidates[0]
        else:
            times = {}
            for c in candidates:
                try:
                    launch(c)  # compile + warm
                    times[c] = triton.testing.do_bench(lambda: launch(c), warmup=5, rep=20, return_mode="median")
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
tuner = Tuner("act_quant")

# Candidates: (BLOCK_M, BLOCK_K, num_warps); BLOCK_K = 0: the whole row padded to a power of two;
# BLOCK_K = -1: the whole row as power-of-two pieces (no padding); otherwise chunks of BLOCK_K, two passes.
_GPU_CANDIDATES = [(16, -1, 8), (8, -1, 8), (4, -1, 8), (4, -1, 4), (32, -1, 8), (2, -1, 4), (1, -1, 4),
                   (4, 0, 4), (2, 0, 4), (8, 0, 8), (1, 0, 4), (2, 0, 8), (16, 128, 4), (8, 256, 4)]
_INTERP_CANDIDATES = [(8, 64, 4), (4, 0, 4), (16, -1, 8), (4, -1, 4)]


def row_pieces(k: int):
    """K as at most four powers of two, largest first (1152 -> (1024, 128)); None if it takes more."""
    p = [1 << b for b in range(k.bit_length() - 1, -1, -1) if k >> b & 1]
    return tuple(p) if len(p) <= 4 else None


def candidates(k: int, had_block: int, sum_group: int, row_sum: bool):
    """Valid (BLOCK_M, BLOCK_K, num_warps) for this row shape; the first is the default."""
    hd = max(had_block, 16) if had_block > 1 else 16
    full = max(_next_pow2(k), hd, 16)
    pieces = row_pieces(k)
    out = []
    for bm, bk, nw in (_INTERP_CANDIDATES if INTERPRET else _GPU_CANDIDATES):
        if bk == -1:  # pieces
            if pieces is None or min(pieces) < max(hd, 16) or (had_block > 1 and bm * min(pieces) // hd < 16):
                continue
            if sum_group and not row_sum and min(pieces) % sum_group:
                continue
            if bm * k > 2560 * nw:  # <= 80 fp32 of the row block per thread
                continue
            out.append((bm, -1, nw))
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
        c = (bm, bk, nw)
        if c not in out:
            out.append(c)
    if not out:
        bk = max(full, sum_group if (sum_group and not row_sum) else 1)
        bm = _next_pow2(max(1, 16 * hd // bk)) if had_block > 1 else 1
        out.append((bm, bk, 4))
    return out


@functools.lru_cache(maxsize=32)
def _pm1_hadamard(hd: int, had_block: int, device_str: str) -> torch.Tensor:
    """kron(I_{hd/had_block}, H_had_block) with ±1 entries, bf16 (exact), on the device."""
    h = torch.ones(1, 1)
    while h.shape[0] < had_block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    full = torch.kron(torch.eye(hd // had_block), h)
    return full.to(device=device_str, dtype=torch.bfloat16).contiguous()


last_kernel = None  # the last compiled kernel launched and its candidate (benchmark reports)
last_config = None


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


def quantize_activation(x, mult=None, had_block=0, fmt="int8", qmax=127, static_scale=None, sum_group=0,
                        out=None, perm=False):
    """Triton twin of reference.quantize_activation; None when the combination has no kernel.

    `out` may pass preallocated (q, scale, qsum) buffers. `perm=True` (int8 only, for the W4A8 GEMM) writes the
    codes of each token parity-split: channels 0, 2, 4, ... in q[:, :K/2] and 1, 3, 5, ... in q[:, K/2:]
    (scale and qsum are unchanged).
    """
    global last_kernel, last_config
    k = x.shape[-1]
    if not supported(x, had_block, fmt, sum_group) or (perm and (fmt != "int8" or k % 2)):
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
        return QuantizedActivation(q=q, scale=scale, qsum=qsum)
    has_had = had_block > 1
    hd = max(had_block, 16) if has_had else 16
    hmat = _pm1_hadamard(hd, had_block, str(dev)) if has_had else scale
    has_mult = mult is not None
    if has_mult and (mult.device != dev or not mult.is_contiguous() or mult.dim() != 1):
        mult = mult.reshape(-1).to(device=dev).contiguous()
    split = x2.dtype != torch.bfloat16 or has_mult
    sscale = static_scale.reshape(-1)[:1].to(device=dev, dtype=torch.float32) if static_scale is not None else scale
    fmax = FP8_E4M3_MAX if fmt == "fp8" else float(qmax)
    row_sum = bool(sum_group) and sum_group == k
    flags = dict(HD=hd, HAS_MULT=has_mult, HAS_HAD=has_had, SPLIT=split, IS_FP8=fmt == "fp8",
                 FP8_SOFT=INTERPRET, STATIC=static_scale is not None, SUM_G=int(sum_group), ROW_SUM=row_sum,
                 DOT_F32=INTERPRET, PERM=bool(perm))
    args = (x2, mult if has_mult else scale, hmat, q, scale, qsum if qsum is not None else scale, sscale,
            m, k, x2.stride(0), q.stride(0), qsum.stride(0) if qsum is not None else 0,
            1.0 / (had_block ** 0.5) if has_had else 1.0, float(qmax), fmax)

    pieces = row_pieces(k) or ()

    def launch(c):
        bm, bk, nw = c
        if bk == -1:
            p = pieces + (0,) * (4 - len(pieces))
            return _act_quant_kernel[(triton.cdiv(m, bm),)](*args, BLOCK_M=bm, BLOCK_K=p[0], num_warps=nw,
                                                            ONE_CHUNK=True, P0=p[0], P1=p[1], P2=p[2], P3=p[3],
                                                            **flags)
        return _act_quant_kernel[(triton.cdiv(m, bm),)](*args, BLOCK_M=bm, BLOCK_K=bk, num_warps=nw,
                                                        ONE_CHUNK=bk >= k, **flags)

    key = (k, m_bucket(m), x2.dtype, str(dev)) + tuple(flags.values())
    c = tuner.pick(key, candidates(k, had_block, int(sum_group), row_sum), launch)
    last_config = c
    last_kernel = launch(c)
    return QuantizedActivation(q=q, scale=scale, qsum=qsum)
