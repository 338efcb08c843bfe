"""Quantized GEMMs (Triton) with the dequant epilogue fused: out = (a_q @ w_q^T) * s_tok * s_ch (- zero term) + bias.

Formats (see types.QuantizedWeight): activations int8 or fp8 e4m3 [M, K]; weights int8 [N, K], fp8 [N, K], or int4
packed two per byte [N, K/2] (offset-binary, low nibble = even column), unpacked in registers to int8.

Math (the oracle is reference.quantized_matmul):
  per channel:  out[m,n] = s_a[m] * s_w[n] * (acc[m,n] - z[n] * qsum[m])            (z term only if asymmetric)
  group-wise:   out[m,n] = s_a[m] * sum_g s_w[n,g] * (acc_g[m,n] - z[n,g] * qsum[m,g])
with acc the int32 (fp32 for fp8) dot product and qsum the per-token sums of the activation codes.

Two kernels:
  * `_qgemm_kernel`: one program per output tile, grouped tile order for L2 reuse, pointer loads. Any GPU
    with int8 tensor cores (and the CPU interpreter).
  * `_qgemm_tma_kernel`: persistent (one program per SM walks tiles), tiles fetched by the TMA engine through
    tensor descriptors, the K loops of consecutive tiles flattened into one pipelined loop so the next tile's
    loads overlap this tile's epilogue. Hopper and newer.
  * `_w4_swap_kernel` / `_w4_swap_tma_kernel` (W4A8): operands swapped (out^T = W . a^T), so the int4 weights,
    unpacked in registers, are the wgmma's register operand and never go back to shared memory; with the tokens'
    code sums they multiply the raw nibbles (value + 8: two bitwise ops per four weights) and subtract 8 * qsum in
    the epilogue; on "perm32" activation codes one dot covers a whole K step.
The dispatcher (triton_ops) times the candidates once per shape on the GPU and keeps the fastest.
"""
import functools
import os

import torch
import triton
import triton.language as tl

from .triton_act_quant import INTERPRET, Tuner, _cdiv, m_bucket

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except Exception:  # Triton too old for host-side tensor descriptors
    TensorDescriptor = None


@triton.jit
def _tile_ids(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ("super-row") tile order: GROUP_M row-tiles share each column strip of W while it is in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_pid_n
    group = tile // width
    first_m = group * GROUP_M
    rows_here = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % width) % rows_here
    pid_n = (tile % width) // rows_here
    return pid_m, pid_n


@triton.jit
def _w_tile(w, W_INT4: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_N, BLOCK_K] weight codes; int4: unpack [BLOCK_N, BLOCK_K/2] bytes to int8 in registers."""
    if W_INT4:
        lo = (w & 15).to(tl.int8) - 8
        hi = (w >> 4).to(tl.int8) - 8
        w = tl.reshape(tl.join(lo, hi), [BLOCK_N, BLOCK_K])
    return w


@triton.jit
def _int4_halves(w):
    """Packed bytes [BLOCK_N, BLOCK_K/2] -> (even-column codes, odd-column codes), int8, same layout: no shuffle."""
    lo = (w & 15).to(tl.int8) - 8
    hi = (w >> 4).to(tl.int8) - 8
    return lo, hi


@triton.jit
def _int4_halves_u(w, ASM: tl.constexpr = False):
    """Packed bytes -> the raw nibbles (value + 8, in [0, 15]) as int8: two bitwise ops, no sign handling. The GEMM
    then subtracts 8 * (per-token sum of the activation codes) once in its epilogue.
    ASM (GPU only): the same ops on four bytes per 32-bit register (3 instructions per 8 nibbles); Triton's own
    lowering extracts, shifts, masks and re-packs each byte (~16 SASS instructions per 8 nibbles, sm_90a)."""
    if ASM:
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b32 t; and.b32 $0, $2, 0x0F0F0F0F; shr.u32 t, $2, 4; and.b32 $1, t, 0x0F0F0F0F; }",
            "=r,=r,r", [w], dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
        return lo, hi
    return (w & 15).to(tl.int8), (w >> 4).to(tl.int8)


@triton.jit
def _g2_split(p):
    """gparam bytes -> (s2, s2 * z), int32."""
    p = p.to(tl.int32)
    s2 = (p >> 4) + 1
    return s2, (p & 15) * s2


@triton.jit
def _g2_rows(GP, bn, stride_gp, g, N):
    """Two-level int4 (types.QuantizedWeight.gparam): group g's integer scale s2 and s2 * zero of weight rows bn,
    int32 [BLOCK_N] each (rows past N read as s2 = 1, z = 0: their outputs are never stored)."""
    return _g2_split(tl.load(GP + bn * stride_gp + g, mask=bn < N, other=0))


@triton.jit
def _int4_halves_g2(w, s2, zs, ASM: tl.constexpr = False):
    """Packed bytes [BLOCK_N, BLOCK_K/2] of two-level int4 weights -> the int8 values s2 * (q - z) of the low and
    high nibbles (exact: the quantizer keeps them in [-128, 127]), given each row's s2 and s2 * z ([BLOCK_N] int32).
    ASM (GPU only): four bytes per 32-bit register, per 4 weights one mask, one multiply-add and one xor: the nibbles
    (<= 15) times s2 (<= 16) stay below 256, so one 32-bit multiply-add by s2 and by (128 - s2 * z) * 0x01010101 is
    four byte-wise ones without carries (the result, w + 128, is in 0..255), and the xor with 0x80 makes each byte the
    signed w. It relies on the four bytes of a register sharing a row (Triton packs a thread's consecutive elements,
    which run along K here); bench/gpu_check.py checks the kernel against the reference on the GPU."""
    if ASM:
        s2b = tl.broadcast_to(s2[:, None], w.shape)
        db = tl.broadcast_to(((128 - zs).to(tl.uint32) * 0x01010101).to(tl.int32, bitcast=True)[:, None], w.shape)
        lo, hi = tl.inline_asm_elementwise(
            # (the comment names all four packed scale operands and all four offsets, so that a test can read in
            # the compiled PTX that each four are one register, i.e. one row: tests/test_two_level_int4.py)
            "{ .reg .b32 t, u; // g2 operands $3 $4 $5 $6 | $7 $8 $9 $10\n"
            "and.b32 t, $2, 0x0F0F0F0F; mad.lo.u32 t, t, $3, $7; xor.b32 $0, t, 0x80808080; "
            "shr.u32 u, $2, 4; and.b32 u, u, 0x0F0F0F0F; mad.lo.u32 u, u, $3, $7; xor.b32 $1, u, 0x80808080; }",
            "=r,=r,r,r,r,r,r,r,r,r,r", [w, s2b, db], dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
        return lo, hi
    lo = ((w & 15).to(tl.int32) * s2[:, None] - zs[:, None]).to(tl.int8)
    hi = ((w >> 4).to(tl.int32) * s2[:, None] - zs[:, None]).to(tl.int8)
    return lo, hi


@triton.jit
def _join32(lo, hi, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Low / high nibble values [BLOCK_N, BLOCK_K/2] -> one [BLOCK_N, BLOCK_K] operand, per 32 channels the 16
    low-nibble ones then the 16 high-nibble ones (see _w4_operand32)."""
    lo = tl.reshape(lo, [BLOCK_N, BLOCK_K // 32, 16])
    hi = tl.reshape(hi, [BLOCK_N, BLOCK_K // 32, 16])
    return tl.reshape(tl.permute(tl.join(lo, hi), [0, 1, 3, 2]), [BLOCK_N, BLOCK_K])


@triton.jit
def _w4_operand32(w, U4: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ASM: tl.constexpr = False):
    """Packed bytes [BLOCK_N, BLOCK_K/2] -> one [BLOCK_N, BLOCK_K] int8 operand whose channel order within each
    32-channel block is: the 16 even channels, then the 16 odd ones ("perm32", the order the quantize kernel writes
    activation codes in for this GEMM). With the low nibbles of bytes 16b..16b+15 being one 16-run and the high
    nibbles the next, the join below lands each thread's bytes in the registers the wgmma operand layout wants."""
    if U4:
        lo, hi = _int4_halves_u(w, ASM)
    else:
        lo, hi = _int4_halves(w)
    return _join32(lo, hi, BLOCK_N, BLOCK_K)


@triton.jit
def _i32_to_f32(acc, MAGIC: tl.constexpr):
    if MAGIC:  # |acc| < 2**22: integer add + float subtract instead of the slower I2F conversion
        return (acc + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
    else:
        return acc.to(tl.float32)


@triton.jit
def _fold_group(acc_f, acc_i, g, offs_m, offs_n, M, N, WS, WZ, QS, stride_ws, stride_qs,
                HAS_ZERO: tl.constexpr, MAGIC: tl.constexpr):
    f = _i32_to_f32(acc_i, MAGIC)
    nmask = offs_n < N
    ws = tl.load(WS + offs_n * stride_ws + g, mask=nmask, other=0.0)
    if HAS_ZERO:
        qs = tl.load(QS + offs_m * stride_qs + g, mask=offs_m < M, other=0).to(tl.float32)
        z = tl.load(WZ + offs_n * stride_ws + g, mask=nmask, other=0.0).to(tl.float32)
        f = f - qs[:, None] * z[None, :]
    return acc_f + f * ws[None, :]


@triton.jit
def _epilogue_values(acc_f, offs_m, offs_n, M, N, AS, WS, WZ, QS, BIAS, stride_qs,
                     GROUP_K: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] output tile: token scale x channel scale (- zero term) + bias."""
    mmask = offs_m < M
    nmask = offs_n < N
    a_s = tl.load(AS + offs_m, mask=mmask, other=0.0)
    if GROUP_K == 0:
        w_s = tl.load(WS + offs_n, mask=nmask, other=0.0)
        if HAS_ZERO:
            qs = tl.load(QS + offs_m * stride_qs, mask=mmask, other=0).to(tl.float32)
            z = tl.load(WZ + offs_n, mask=nmask, other=0.0).to(tl.float32)
            acc_f = acc_f - qs[:, None] * z[None, :]
        out = acc_f * (a_s[:, None] * w_s[None, :])
    else:
        out = acc_f * a_s[:, None]
    if HAS_BIAS:
        out = out + tl.load(BIAS + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    return out


@triton.jit
def _residual(out, offs_m, offs_n, M, N, RES, GATE, stride_rm, stride_gb, res_rows,
              HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr, GATE_1D: tl.constexpr = False):
    """res + gate_b * out (the block's gated residual add, b = row // res_rows the row's sample), in fp32.
    GATE_1D: the tile's rows are one sample's (res_rows a multiple of BLOCK_M): one gate row per tile."""
    if HAS_RES:
        m2 = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        if HAS_GATE and GATE_1D:
            b0 = (tl.min(offs_m, axis=0) // res_rows).to(tl.int64)
            out = out * tl.load(GATE + b0 * stride_gb + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        elif HAS_GATE:
            b = (offs_m // res_rows).to(tl.int64)
            out = out * tl.load(GATE + b[:, None] * stride_gb + offs_n[None, :], mask=m2, other=0.0).to(tl.float32)
        out = out + tl.load(RES + offs_m.to(tl.int64)[:, None] * stride_rm + offs_n[None, :], mask=m2,
                            other=0.0).to(tl.float32)
    return out


@triton.jit
def _epilogue(acc_f, offs_m, offs_n, M, N, C, stride_cm, AS, WS, WZ, QS, BIAS, stride_qs,
              RES, GATE, stride_rm, stride_gb, res_rows,
              GROUP_K: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
              HAS_GATE: tl.constexpr, GATE_1D: tl.constexpr):
    out = _epilogue_values(acc_f, offs_m, offs_n, M, N, AS, WS, WZ, QS, BIAS, stride_qs, GROUP_K, HAS_ZERO, HAS_BIAS)
    out = _residual(out, offs_m, offs_n, M, N, RES, GATE, stride_rm, stride_gb, res_rows, HAS_RES, HAS_GATE,
                    GATE_1D)
    tl.store(C + offs_m[:, None] * stride_cm + offs_n[None, :], out.to(C.dtype.element_ty),
             mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit
def _qgemm_kernel(A, B, C, AS, WS, WZ, QS, BIAS, M, N, K, stride_am, stride_bn, stride_cm, stride_ws, stride_qs,
                  RES, GATE, stride_rm, stride_gb, res_rows,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                  W_INT4: tl.constexpr, IS_FP8: tl.constexpr, GROUP_K: tl.constexpr, HAS_ZERO: tl.constexpr,
                  HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, MAGIC: tl.constexpr, A_PERM: tl.constexpr = False,
                  HAS_RES: tl.constexpr = False, HAS_GATE: tl.constexpr = False, GATE_1D: tl.constexpr = False):
    # A_PERM (int4 weights, K % BLOCK_K == 0): the activation codes are parity-split (even channels in the first
    # half of each row, odd in the second), so the two nibbles of each weight byte meet their activations with
    # two plain dot products and no interleaving shuffle.
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    am = tl.max_contiguous(tl.multiple_of(offs_m % M, BLOCK_M), BLOCK_M)  # wrapped rows: loads need no mask
    bn = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N)
    KB: tl.constexpr = BLOCK_K // 2 if W_INT4 else BLOCK_K
    rk = tl.arange(0, BLOCK_K)
    rkb = tl.arange(0, KB)
    if A_PERM:
        a_ptrs = A + am[:, None] * stride_am + rkb[None, :]
    else:
        a_ptrs = A + am[:, None] * stride_am + rk[None, :]
    b_ptrs = B + bn[:, None] * stride_bn + rkb[None, :]
    if GROUP_K == 0:
        if IS_FP8:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if A_PERM:
                lo, hi = _int4_halves(tl.load(b_ptrs))
                acc = tl.dot(tl.load(a_ptrs), tl.trans(lo), acc, out_dtype=acc.dtype)
                acc = tl.dot(tl.load(a_ptrs + K // 2), tl.trans(hi), acc, out_dtype=acc.dtype)
                a_ptrs += KB
                b_ptrs += KB
            elif EVEN_K:
                a = tl.load(a_ptrs)
                w = tl.load(b_ptrs)
            else:
                a = tl.load(a_ptrs, mask=rk[None, :] < K - k * BLOCK_K, other=0.0)
                w = tl.load(b_ptrs, mask=rkb[None, :] < (K - k * BLOCK_K) // (BLOCK_K // KB), other=0.0)
            if not A_PERM:
                acc = tl.dot(a, tl.trans(_w_tile(w, W_INT4, BLOCK_N, BLOCK_K)), acc, out_dtype=acc.dtype)
                a_ptrs += BLOCK_K
                b_ptrs += KB
        acc_f = acc.to(tl.float32)
    else:
        acc_f = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for g in range(0, K // GROUP_K):
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
            for kk in tl.static_range(GROUP_K // BLOCK_K):
                if A_PERM:
                    lo, hi = _int4_halves(tl.load(b_ptrs))
                    acc = tl.dot(tl.load(a_ptrs), tl.trans(lo), acc, out_dtype=acc.dtype)
                    acc = tl.dot(tl.load(a_ptrs + K // 2), tl.trans(hi), acc, out_dtype=acc.dtype)
                    a_ptrs += KB
                else:
                    a = tl.load(a_ptrs)
                    w = tl.load(b_ptrs)
                    acc = tl.dot(a, tl.trans(_w_tile(w, W_INT4, BLOCK_N, BLOCK_K)), acc, out_dtype=acc.dtype)
                    a_ptrs += BLOCK_K
                b_ptrs += KB
            acc_f = _fold_group(acc_f, acc, g, offs_m, offs_n, M, N, WS, WZ, QS, stride_ws, stride_qs,
                                HAS_ZERO, MAGIC)
    _epilogue(acc_f, offs_m, offs_n, M, N, C, stride_cm, AS, WS, WZ, QS, BIAS, stride_qs,
              RES, GATE, stride_rm, stride_gb, res_rows, GROUP_K, HAS_ZERO, HAS_BIAS, HAS_RES, HAS_GATE, GATE_1D)


@triton.jit
def _qgemm_tma_kernel(a_desc, b_desc, C, AS, WS, WZ, QS, BIAS, M, N, K, stride_cm, stride_ws, stride_qs,
                      NUM_PROGS, RES, GATE, stride_rm, stride_gb, res_rows,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                      W_INT4: tl.constexpr, IS_FP8: tl.constexpr, GROUP_K: tl.constexpr, HAS_ZERO: tl.constexpr,
                      HAS_BIAS: tl.constexpr, MAGIC: tl.constexpr, EPI_TMA: tl.constexpr, A_PERM: tl.constexpr = False,
                      HAS_RES: tl.constexpr = False, HAS_GATE: tl.constexpr = False, GATE_1D: tl.constexpr = False):
    start = tl.program_id(0)
    KB: tl.constexpr = BLOCK_K // 2 if W_INT4 else BLOCK_K
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    my_tiles = tl.cdiv(num_tiles - start, NUM_PROGS)
    tile = start - NUM_PROGS
    ki = -1
    pid_m = 0
    pid_n = 0
    if IS_FP8:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    acc_f = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # One flat loop over (tile, k) pairs: the software pipeline then prefetches the next tile's first K blocks
    # while this tile's epilogue runs.
    for _ in range(0, my_tiles * k_tiles):
        ki = tl.where(ki == k_tiles - 1, 0, ki + 1)
        if ki == 0:
            tile += NUM_PROGS
            pid_m, pid_n = _tile_ids(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        if A_PERM:  # parity-split activations (see _qgemm_kernel): two dots, no interleave
            lo, hi = _int4_halves(b_desc.load([pid_n * BLOCK_N, ki * KB]))
            a_e = a_desc.load([pid_m * BLOCK_M, ki * KB])
            a_o = a_desc.load([pid_m * BLOCK_M, K // 2 + ki * KB])
            if GROUP_K == 0:
                acc = tl.dot(a_e, tl.trans(lo), acc, out_dtype=acc.dtype)
                acc = tl.dot(a_o, tl.trans(hi), acc, out_dtype=acc.dtype)
            else:
                part = tl.dot(a_e, tl.trans(lo), out_dtype=tl.int32)
                part = tl.dot(a_o, tl.trans(hi), part, out_dtype=tl.int32)
        else:
            a = a_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
            w = _w_tile(b_desc.load([pid_n * BLOCK_N, ki * KB]), W_INT4, BLOCK_N, BLOCK_K)
            if GROUP_K == 0:
                acc = tl.dot(a, tl.trans(w), acc, out_dtype=acc.dtype)
            else:
                part = tl.dot(a, tl.trans(w), out_dtype=tl.int32)
        if GROUP_K != 0:  # BLOCK_K == GROUP_K: one K block is one group
            acc_f = _fold_group(acc_f, part, ki, pid_m * BLOCK_M + tl.arange(0, BLOCK_M),
                                pid_n * BLOCK_N + tl.arange(0, BLOCK_N), M, N, WS, WZ, QS, stride_ws, stride_qs,
                                HAS_ZERO, MAGIC)
        if ki == k_tiles - 1:
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            if GROUP_K == 0:
                out = _epilogue_values(acc.to(tl.float32), offs_m, offs_n, M, N, AS, WS, WZ, QS, BIAS, stride_qs,
                                       GROUP_K, HAS_ZERO, HAS_BIAS)
                if IS_FP8:
                    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                else:
                    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
            else:
                out = _epilogue_values(acc_f, offs_m, offs_n, M, N, AS, WS, WZ, QS, BIAS, stride_qs,
                                       GROUP_K, HAS_ZERO, HAS_BIAS)
                acc_f = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            out = _residual(out, offs_m, offs_n, M, N, RES, GATE, stride_rm, stride_gb, res_rows, HAS_RES, HAS_GATE,
                            GATE_1D)
            if EPI_TMA:  # C is a tensor descriptor: one bulk asynchronous store, clipped at the edges
                C.store([pid_m * BLOCK_M, pid_n * BLOCK_N], out.to(C.dtype))
            else:
                tl.store(C + offs_m[:, None] * stride_cm + offs_n[None, :], out.to(C.dtype.element_ty),
                         mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


# ----------------------------------------------------------------------------------------------------------------
# W4A8 with the operands swapped ("swap" kinds): out^T[n, m] = W[n, :] . a[m, :]. The unpacked int4 weights are the
# wgmma's A operand, fed from registers (RS wgmma), so they never go back to shared memory; the int8 activation
# tiles (parity-split, see A_PERM) are the B operand, straight from TMA / cp.async shared-memory buffers.
@triton.jit
def _epilogue_values_t(acc_f, offs_n, offs_m, M, N, AS, WS, WZ, QS, BIAS, stride_qs,
                       GROUP_K: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Transposed `_epilogue_values`: acc_f is [BLOCK_N, BLOCK_M] (weights' rows x tokens)."""
    mmask = offs_m < M
    nmask = offs_n < N
    a_s = tl.load(AS + offs_m, mask=mmask, other=0.0)
    if GROUP_K == 0:
        w_s = tl.load(WS + offs_n, mask=nmask, other=0.0)
        if HAS_ZERO:
            qs = tl.load(QS + offs_m * stride_qs, mask=mmask, other=0).to(tl.float32)
            z = tl.load(WZ + offs_n, mask=nmask, other=0.0).to(tl.float32)
            acc_f = acc_f - z[:, None] * qs[None, :]
        out = acc_f * (w_s[:, None] * a_s[None, :])
    else:
        out = acc_f * a_s[None, :]
    if HAS_BIAS:
        out = out + tl.load(BIAS + offs_n, mask=nmask, other=0.0).to(tl.float32)[:, None]
    return out


@triton.jit
def _fold_group_t(acc_f, acc_i, g, offs_n, offs_m, M, N, WS, WZ, QS, stride_ws, stride_qs,
                  HAS_ZERO: tl.constexpr, MAGIC: tl.constexpr, U4: tl.constexpr):
    if U4:  # raw nibbles were multiplied: subtract 8 * this group's code sum of each token (exact, int32)
        acc_i = acc_i - 8 * tl.load(QS + offs_m * stride_qs + g, mask=offs_m < M, other=0)[None, :]
    f = _i32_to_f32(acc_i, MAGIC)
    nmask = offs_n < N
    ws = tl.load(WS + offs_n * stride_ws + g, mask=nmask, other=0.0)
    if HAS_ZERO:
        qs = tl.load(QS + offs_m * stride_qs + g, mask=offs_m < M, other=0).to(tl.float32)
        z = tl.load(WZ + offs_n * stride_ws + g, mask=nmask, other=0.0).to(tl.float32)
        f = f - z[:, None] * qs[None, :]
    return acc_f + f * ws[:, None]


@triton.jit
def _store_t(C, out, pid_m, pid_n, offs_m, offs_n, M, N, stride_cm, RES, GATE, stride_rm, stride_gb, res_rows,
             HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr, GATE_1D: tl.constexpr, EPI_TMA: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store a swapped kernel's output tile (out [BLOCK_N, BLOCK_M]: channels x tokens) into C [M, N]; EPI_TMA: C is
    a tensor descriptor. HAS_RES: the block's gated residual add first, on the tile turned back to tokens x
    channels."""
    if HAS_RES:
        out_mn = _residual(tl.trans(out), offs_m, offs_n, M, N, RES, GATE, stride_rm, stride_gb, res_rows, HAS_RES,
                           HAS_GATE, GATE_1D)
        if EPI_TMA:
            C.store([pid_m * BLOCK_M, pid_n * BLOCK_N], out_mn.to(C.dtype))
        else:
            tl.store(C + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :], out_mn.to(C.dtype.element_ty),
                     mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])
    elif EPI_TMA:
        C.store([pid_m * BLOCK_M, pid_n * BLOCK_N], tl.trans(out).to(C.dtype))
    else:
        tl.store(C + offs_m[None, :] * stride_cm + offs_n[:, None], out.to(C.dtype.element_ty),
                 mask=(offs_m < M)[None, :] & (offs_n < N)[:, None])


@triton.jit
def _w4_swap_kernel(A, B, C, AS, WS, WZ, QS, BIAS, M, N, K, stride_am, stride_bn, stride_cm, stride_ws, stride_qs,
                    RES, GATE, stride_rm, stride_gb, res_rows, GP, stride_gp,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                    GROUP_K: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, MAGIC: tl.constexpr,
                    U4: tl.constexpr = False, MERGE: tl.constexpr = False, ASM: tl.constexpr = False,
                    HAS_RES: tl.constexpr = False, HAS_GATE: tl.constexpr = False, GATE_1D: tl.constexpr = False,
                    G2: tl.constexpr = 0):
    """Pointer-load variant, one program per output tile; A parity-split (MERGE: perm32, one dot per K step),
    K % BLOCK_K == 0, BLOCK_K == GROUP_K when group-wise. G2 > 0: two-level int4 weights in groups of G2 columns
    (GP their gparam [N, K / G2]; GROUP_K 0, WS per channel, G2 % BLOCK_K == 0): the nibbles become int8 values in
    registers and one int32 sum covers all of K."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    KH: tl.constexpr = BLOCK_K // 2
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    am = tl.max_contiguous(tl.multiple_of(offs_m % M, BLOCK_M), BLOCK_M)
    bn = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N)
    rkh = tl.arange(0, KH)
    rk = tl.arange(0, BLOCK_K)
    if MERGE:
        a_ptrs = A + am[:, None] * stride_am + rk[None, :]
    else:
        a_ptrs = A + am[:, None] * stride_am + rkh[None, :]
    b_ptrs = B + bn[:, None] * stride_bn + rkh[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
    acc_f = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for kt in range(0, K // BLOCK_K):
        if G2:
            s2, zs = _g2_rows(GP, bn, stride_gp, (kt * BLOCK_K) // G2, N)
        if MERGE:
            if G2:
                lo, hi = _int4_halves_g2(tl.load(b_ptrs), s2, zs, ASM)
                wa = _join32(lo, hi, BLOCK_N, BLOCK_K)
            else:
                wa = _w4_operand32(tl.load(b_ptrs), U4, BLOCK_N, BLOCK_K, ASM)
            if GROUP_K == 0:
                acc = tl.dot(wa, tl.trans(tl.load(a_ptrs)), acc, out_dtype=tl.int32)
            else:
                part = tl.dot(wa, tl.trans(tl.load(a_ptrs)), out_dtype=tl.int32)
                acc_f = _fold_group_t(acc_f, part, kt, offs_n, offs_m, M, N, WS, WZ, QS, stride_ws, stride_qs,
                                      HAS_ZERO, MAGIC, U4)
            a_ptrs += BLOCK_K
        else:
            if G2:
                lo, hi = _int4_halves_g2(tl.load(b_ptrs), s2, zs, ASM)
            elif U4:
                lo, hi = _int4_halves_u(tl.load(b_ptrs), ASM)
            else:
                lo, hi = _int4_halves(tl.load(b_ptrs))
            if GROUP_K == 0:
                acc = tl.dot(lo, tl.trans(tl.load(a_ptrs)), acc, out_dtype=tl.int32)
                acc = tl.dot(hi, tl.trans(tl.load(a_ptrs + K // 2)), acc, out_dtype=tl.int32)
            else:
                part = tl.dot(lo, tl.trans(tl.load(a_ptrs)), out_dtype=tl.int32)
                part = tl.dot(hi, tl.trans(tl.load(a_ptrs + K // 2)), part, out_dtype=tl.int32)
                acc_f = _fold_group_t(acc_f, part, kt, offs_n, offs_m, M, N, WS, WZ, QS, stride_ws, stride_qs,
                                      HAS_ZERO, MAGIC, U4)
            a_ptrs += KH
        b_ptrs += KH
    if GROUP_K == 0:
        if U4:
            acc = acc - 8 * tl.load(QS + offs_m * stride_qs, mask=offs_m < M, other=0)[None, :]
        acc_f = acc.to(tl.float32)
    out = _epilogue_values_t(acc_f, offs_n, offs_m, M, N, AS, WS, WZ, QS, BIAS, stride_qs, GROUP_K, HAS_ZERO,
                             HAS_BIAS)
    _store_t(C, out, pid_m, pid_n, offs_m, offs_n, M, N, stride_cm, RES, GATE, stride_rm, stride_gb, res_rows,
             HAS_RES, HAS_GATE, GATE_1D, False, BLOCK_M, BLOCK_N)


@triton.jit
def _w4_swap_tma_kernel(a_desc, b_desc, C, AS, WS, WZ, QS, BIAS, M, N, K, stride_cm, stride_ws, stride_qs, NUM_PROGS,
                        RES, GATE, stride_rm, stride_gb, res_rows, GP, stride_gp,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                        GROUP_K: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, MAGIC: tl.constexpr,
                        EPI_TMA: tl.constexpr, U4: tl.constexpr = False, MERGE: tl.constexpr = False,
                        ASM: tl.constexpr = False, HAS_RES: tl.constexpr = False, HAS_GATE: tl.constexpr = False,
                        GATE_1D: tl.constexpr = False, G2: tl.constexpr = 0):
    """Persistent TMA variant: the (tile, k) loops flattened as in `_qgemm_tma_kernel`; G2 as in _w4_swap_kernel."""
    start = tl.program_id(0)
    KH: tl.constexpr = BLOCK_K // 2
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = K // BLOCK_K
    my_tiles = tl.cdiv(num_tiles - start, NUM_PROGS)
    tile = start - NUM_PROGS
    ki = -1
    pid_m = 0
    pid_n = 0
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
    acc_f = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    gp_next = tl.zeros([BLOCK_N], dtype=tl.uint8)
    for _ in range(0, my_tiles * k_tiles):
        ki = tl.where(ki == k_tiles - 1, 0, ki + 1)
        if ki == 0:
            tile += NUM_PROGS
            pid_m, pid_n = _tile_ids(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        if G2:  # this K block's group parameters, loaded one K block ahead (a tile's first one on the spot)
            rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            if ki == 0:
                gp_cur = tl.load(GP + rows * stride_gp, mask=rows < N, other=0)
            else:
                gp_cur = gp_next
            gp_next = tl.load(GP + rows * stride_gp + ((ki + 1) * BLOCK_K) // G2,
                              mask=(rows < N) & (ki + 1 < k_tiles), other=0)
            s2, zs = _g2_split(gp_cur)
        if MERGE:  # perm32 activations: one [BLOCK_M, BLOCK_K] tile, one dot per K step
            if G2:
                lo, hi = _int4_halves_g2(b_desc.load([pid_n * BLOCK_N, ki * KH]), s2, zs, ASM)
                wa = _join32(lo, hi, BLOCK_N, BLOCK_K)
            else:
                wa = _w4_operand32(b_desc.load([pid_n * BLOCK_N, ki * KH]), U4, BLOCK_N, BLOCK_K, ASM)
            a = a_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
            if GROUP_K == 0:
                acc = tl.dot(wa, tl.trans(a), acc, out_dtype=tl.int32)
            else:
                part = tl.dot(wa, tl.trans(a), out_dtype=tl.int32)
        else:  # parity-split activations: two dots per K step
            if G2:
                lo, hi = _int4_halves_g2(b_desc.load([pid_n * BLOCK_N, ki * KH]), s2, zs, ASM)
            elif U4:
                lo, hi = _int4_halves_u(b_desc.load([pid_n * BLOCK_N, ki * KH]), ASM)
            else:
                lo, hi = _int4_halves(b_desc.load([pid_n * BLOCK_N, ki * KH]))
            a_e = a_desc.load([pid_m * BLOCK_M, ki * KH])
            a_o = a_desc.load([pid_m * BLOCK_M, K // 2 + ki * KH])
            if GROUP_K == 0:
                acc = tl.dot(lo, tl.trans(a_e), acc, out_dtype=tl.int32)
                acc = tl.dot(hi, tl.trans(a_o), acc, out_dtype=tl.int32)
            else:
                part = tl.dot(lo, tl.trans(a_e), out_dtype=tl.int32)
                part = tl.dot(hi, tl.trans(a_o), part, out_dtype=tl.int32)
        if GROUP_K != 0:
            acc_f = _fold_group_t(acc_f, part, ki, pid_n * BLOCK_N + tl.arange(0, BLOCK_N),
                                  pid_m * BLOCK_M + tl.arange(0, BLOCK_M), M, N, WS, WZ, QS, stride_ws, stride_qs,
                                  HAS_ZERO, MAGIC, U4)
        if ki == k_tiles - 1:
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            if GROUP_K == 0:
                if U4:
                    acc = acc - 8 * tl.load(QS + offs_m * stride_qs, mask=offs_m < M, other=0)[None, :]
                out = _epilogue_values_t(acc.to(tl.float32), offs_n, offs_m, M, N, AS, WS, WZ, QS, BIAS, stride_qs,
                                         GROUP_K, HAS_ZERO, HAS_BIAS)
                acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
            else:
                out = _epilogue_values_t(acc_f, offs_n, offs_m, M, N, AS, WS, WZ, QS, BIAS, stride_qs,
                                         GROUP_K, HAS_ZERO, HAS_BIAS)
                acc_f = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            _store_t(C, out, pid_m, pid_n, offs_m, offs_n, M, N, stride_cm, RES, GATE, stride_rm, stride_gb,
                     res_rows, HAS_RES, HAS_GATE, GATE_1D, EPI_TMA, BLOCK_M, BLOCK_N)


# ----------------------------------------------------------------------------------------------------------------
# Candidates: (kind, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_stages, num_warps)
_SMALL_M = [("ptr", 16, 64, 128, 1, 4, 4), ("ptr", 16, 128, 128, 1, 4, 4), ("ptr", 32, 64, 128, 1, 4, 4),
            ("ptr", 32, 128, 128, 4, 4, 4), ("ptr", 16, 64, 256, 1, 3, 4)]
_MID_M = [("ptr", 64, 64, 128, 8, 4, 4), ("ptr", 64, 128, 128, 8, 4, 4), ("ptr", 128, 64, 128, 8, 4, 4),
          ("ptr", 128, 128, 128, 8, 4, 8), ("tma", 64, 128, 128, 8, 4, 4), ("tma", 128, 128, 128, 8, 4, 8),
          ("tma", 128, 64, 128, 8, 4, 4)]
_LARGE_M = [("tma2", 128, 128, 128, 8, 3, 4), ("tma2", 64, 128, 128, 8, 4, 4), ("ptr", 128, 128, 128, 8, 3, 4),
            ("tmas", 128, 256, 128, 8, 3, 8), ("tma", 256, 128, 128, 8, 3, 8), ("ptr", 128, 256, 128, 8, 3, 8),
            ("tmas2", 128, 128, 64, 8, 4, 4), ("tma3", 64, 128, 128, 8, 2, 4), ("tma3", 64, 64, 128, 8, 4, 4)]
# (the configs that won somewhere in bench/results/linear_nvidia_h200.json of 2026-11; "tma2": two programs per SM,
# one's epilogue / synchronous int8 wgmma wait overlaps the other's main loop). "tma3": three per SM, for the tile
# counts that leave a last wave mostly empty at two: N = 1152 at M = 8192 is 576 tiles of 128 x 128 on 2 x 132
# programs (2.18 waves, so 3 rounds), but 1152 of 64 x 128 on 3 x 132 (2.91, 3 rounds); their shared memory
# (57 / 74 KB) and registers (<= 168 without the residual epilogue, ptxas sm_90a) fit three CTAs.
_INTERP = [("ptr", 32, 32, 64, 4, 1, 4), ("tma", 32, 32, 64, 4, 1, 4), ("ptr", 16, 64, 128, 1, 1, 4),
           ("tmas", 32, 32, 64, 4, 1, 4), ("tma2", 32, 32, 64, 4, 1, 4), ("tma3", 32, 32, 64, 4, 1, 4)]
# W4A8 (int4 weights, parity-split activations). "swap*": operands swapped, BLOCK_M = tokens (the wgmma's N),
# BLOCK_N = weight rows (its M); swapt = persistent TMA, swapts = + TMA store, trailing 2 = two programs per SM.
_W4_SMALL_M = [("swap", 16, 128, 128, 1, 4, 4), ("swap", 32, 128, 128, 1, 4, 4), ("swap", 16, 64, 128, 1, 4, 4),
               ("ptr", 16, 64, 128, 1, 4, 4)]
_W4_MID_M = [("swap", 64, 128, 128, 8, 4, 4), ("swapt", 64, 128, 128, 8, 4, 4), ("swap", 32, 128, 128, 4, 4, 4),
             ("swapt2", 128, 128, 128, 8, 3, 4), ("swapt", 128, 128, 128, 8, 3, 4), ("tma", 64, 128, 128, 8, 4, 4)]
_W4_LARGE_M = [("swapts2", 128, 128, 128, 8, 3, 4), ("swapt", 256, 128, 128, 8, 3, 8),
               ("swapt3", 64, 128, 128, 8, 3, 4),  # 64 tokens: <= 168 registers without a residual (sm_90a)
               ("swapt2", 128, 128, 128, 8, 3, 4),
               ("swap", 128, 128, 128, 8, 3, 4), ("swapt2", 128, 64, 128, 8, 4, 4),
               ("swap", 64, 128, 128, 8, 3, 4),  # group-wise weights without TMA (pre-Hopper): two accumulators fit
               # the best non-swapped ones measured before (staging the unpacked weights through shared memory)
               ("tmas", 256, 128, 128, 8, 3, 8), ("tma2", 128, 128, 128, 8, 3, 4)]
_W4_INTERP = [("swap", 32, 32, 64, 4, 1, 4), ("swapt", 32, 32, 64, 4, 1, 4), ("swapts", 32, 32, 64, 4, 1, 4),
              ("swapt2", 16, 64, 64, 4, 1, 4), ("ptr", 32, 32, 64, 4, 1, 4), ("tma", 32, 32, 64, 4, 1, 4),
              ("swapt3", 16, 32, 64, 4, 1, 4)]

tuner = Tuner("qgemm", graph=True)  # graph replays: at M <= 8192 eager timing measured the host launch path
last_kernel = None  # the last compiled kernel launched and its candidate (benchmark reports)
last_config = None
# Restrict the kinds tried (bench / debugging): VIDITQ_GEMM_KINDS=ptr or tma or ptr,tma
_KINDS_ENV = "VIDITQ_GEMM_KINDS"


def _programs_per_sm(kind: str) -> int:
    """Persistent kinds launch this many programs per SM: the trailing digit of the kind ("tma2", "swapts2")."""
    return int(kind[-1]) if kind[-1].isdigit() else 1


@functools.lru_cache(maxsize=16)
def _device_props(device_str: str):
    """torch's properties of a CUDA device; None on the interpreter or another device type."""
    if INTERPRET or not device_str.startswith("cuda"):
        return None
    return torch.cuda.get_device_properties(torch.device(device_str))


def _sm_limits(device_str: str):
    """(32-bit registers, shared-memory bytes) of one SM of a CUDA device; None on the interpreter."""
    props = _device_props(device_str)
    if props is None:
        return None
    regs = getattr(props, "regs_per_multiprocessor", 0)  # older torch builds lack these: no cap then
    shared = getattr(props, "shared_memory_per_multiprocessor", 0)
    return (regs, shared) if regs and shared else None


def resident_per_sm(kernel, num_warps: int, device_str: str, want: int) -> int:
    """How many programs of a compiled kernel one SM holds at once (its registers and shared memory), at most `want`.
    A persistent launch of more programs than fit runs the rest as a second, mostly idle round, so the launchers
    size their grids by this once the kernel is compiled."""
    limits = _sm_limits(device_str)
    regs = getattr(kernel, "n_regs", 0) or 0
    meta = getattr(kernel, "metadata", None)
    if limits is None or not regs or meta is None:
        return want
    warp_regs = -(-regs * 32 // 256) * 256  # registers are given to warps in blocks of 256
    fit = limits[0] // (warp_regs * num_warps)
    shared = getattr(meta, "shared", 0) or 0
    if shared:
        fit = min(fit, limits[1] // (shared + 1024))  # the driver keeps 1 KB of shared memory per block
    return max(1, min(want, fit))


def _device_info(device_str: str):
    """(compute capability major, multiprocessor count) of a CUDA device; (0, 4) on the interpreter."""
    props = _device_props(device_str)
    return (0, 4) if props is None else (props.major, props.multi_processor_count)


def tma_ok(device: torch.device) -> bool:
    if TensorDescriptor is None:
        return False
    if INTERPRET:
        return True
    return device.type == "cuda" and _device_info(str(device))[0] >= 9


def candidates(m: int, n: int, k: int, w_int4: bool, group_k: int, tma: bool, tma_store: bool = False,
               a_perm: bool = False, g2: int = 0):
    """GEMM configurations to time for this call; g2 (two-level int4 groups): the swapped kernels only, their K
    block within one group."""
    w4 = w_int4 and bool(a_perm)
    a_perm = int(a_perm)
    if INTERPRET:
        base = list(_W4_INTERP if w4 else _INTERP)
    elif m <= 32:
        base = list(_W4_SMALL_M if w4 else _SMALL_M)
    elif m <= 1024:
        base = list(_W4_MID_M) if w4 else _SMALL_M[2:4] + _MID_M
    else:
        base = list(_W4_LARGE_M if w4 else _LARGE_M)
    every = "ptr,tma,tmas,tma2,tmas2,tma3,swap,swapt,swapts,swapt2,swapts2,swapt3"
    kinds = os.environ.get(_KINDS_ENV, every).split(",")
    out = []
    for c in base:
        kind, bm, bn, bk, gm, st, nw = c
        tma_kind = kind.startswith("tma") or kind.startswith("swapt")
        store_kind = kind.startswith("tmas") or kind.startswith("swapts")
        if kind not in kinds or (tma_kind and not tma) or (store_kind and not tma_store):
            continue
        if a_perm == 2 and not kind.startswith("swap"):
            continue  # the other kernels read parity-split codes only
        if g2 and not kind.startswith("swap"):
            continue  # two-level int4 runs on the swapped kernels only
        if kind.startswith("swap"):
            if not w4:
                continue
            if group_k:
                bk = group_k  # one K block per group
            elif g2 and (bk > g2 or g2 % bk):
                bk = g2  # a K block reads one group's scales
            c = (kind, bm, bn, bk, gm, st, nw)
            if k % bk or (a_perm == 2 and bk % 32) or (group_k and bm * bn > 64 * 32 * nw) or c in out:
                continue
            out.append(c)
            continue
        if group_k and bm * bn > 64 * 32 * nw:  # two fp32/int32 accumulators must fit in registers
            continue
        if group_k:
            if kind != "ptr":
                bk = group_k  # one K block per group
            elif group_k % bk:
                bk = min(group_k, bk)
                if group_k % bk:
                    continue
        if a_perm and k % bk:
            continue
        c = (kind, bm, bn, bk, gm, st, nw)
        if c not in out:
            out.append(c)
    if not out:  # (no TMA, a restrictive VIDITQ_GEMM_KINDS): a small pointer tile, still one K block per group
        bk = min(64, group_k) if group_k else 64
        if a_perm:
            bk = 32 if k % 64 else 64
            if group_k:
                bk = group_k if a_perm == 2 else min(bk, group_k)  # the swapped kernels need BLOCK_K == GROUP_K
            elif g2:
                bk = min(bk, g2)
        out.append(("swap" if a_perm == 2 or g2 else "ptr", 32, 32, bk, 4, 2, 4))
    return out


def w4_asm_ok(device: torch.device) -> bool:
    """Unpack int4 nibbles with inline PTX (NVIDIA GPUs; not the interpreter, not ROCm). VIDITQ_W4_ASM=0: Triton's
    own byte-by-byte lowering (for comparison / debugging)."""
    return (not INTERPRET and device.type == "cuda" and torch.version.hip is None
            and os.environ.get("VIDITQ_W4_ASM", "1") != "0")


def tensor_cache(t: torch.Tensor, attr: str) -> dict:
    """A dict kept as an attribute of the tensor itself, freed with it; a moved or reloaded weight (a new tensor)
    starts afresh. What goes in must not reference the tensor (a reference cycle would keep a model's weights
    alive until a full garbage collection). Tensor subclasses that refuse attributes get a fresh dict each time."""
    per = getattr(t, attr, None)
    if per is None:
        per = {}
        try:
            setattr(t, attr, per)
        except Exception:
            pass
    return per


def kernel_zero(w) -> torch.Tensor:
    """The launchers' `wz` argument for weight w: its zero points, its two-level group parameters (gparam), or the
    scale as a stand-in that is never read."""
    if w.zero is not None:
        return w.zero
    return w.gparam if w.gparam is not None else w.scale


def supported(a_fmt: str, w) -> bool:
    """Does a kernel exist for activations in `a_fmt` times this QuantizedWeight?"""
    if w.gparam is not None:  # two-level int4: the swapped kernels (int4 codes with K % 64 == 0, groups >= 32)
        g = w.group_size
        return (a_fmt == "int8" and w.fmt == "int4" and w.zero is None and g >= 32 and not g & (g - 1)
                and w.in_features % g == 0 and w.in_features % 64 == 0)
    if w.fmt == "fp8":
        return a_fmt == "fp8" and not w.group_size and w.zero is None
    if w.fmt in ("int8", "int4"):
        if a_fmt != "int8":
            return False
        g = w.group_size
        if g and (g & (g - 1) or g < 16 or w.in_features % g):
            return False
        if w.fmt == "int4" and w.pack == "split16" and (w.in_features % 64 or (g and g < 32)):
            return False  # the swapped kernels' K steps are whole 32-column blocks (>= 64 columns)
        return w.in_features % 2 == 0 or w.fmt == "int8"
    return False


def check_residual(residual, gate, res_rows, m, n):
    if tuple(residual.shape) != (m, n):
        raise ValueError(f"residual of shape {tuple(residual.shape)} for an output of {m} x {n}")
    if gate is not None and (gate.dim() != 2 or gate.shape[1] != n or res_rows <= 0 or m % res_rows
                             or gate.shape[0] not in (1, m // res_rows)):
        raise ValueError(f"gate of shape {tuple(gate.shape)} is not one row of {n} per sample of {res_rows} rows "
                         f"({m} rows)")


def _gate_1d(gate, res_rows, bm) -> bool:
    """Can each output tile of bm rows read one gate row (its rows all in one sample, or one gate for all)?"""
    return gate is not None and (gate.shape[0] == 1 or int(res_rows) % bm == 0)


def _residual_args(c, res, gate, res_rows):
    """(RES, GATE, stride_rm, stride_gb, res_rows) kernel arguments; c stands in for what is absent (never read)."""
    if res is None:
        return c, c, 0, 0, 1
    stride_gb = gate.stride(0) if gate is not None and gate.shape[0] > 1 else 0  # one gate row: all samples
    return res, (gate if gate is not None else c), res.stride(0), stride_gb, max(int(res_rows), 1)


@functools.lru_cache(maxsize=512)
def launcher(cfg, n, k, group_k, has_zero, has_bias, magic, u4, perm_mode, device_str, flag_items, g2=0, asm=False):
    """The launch of GEMM candidate `cfg` with everything that is not a tensor bound once:
    fn(q, a_scale, a_qsum, wd, ws, wz, bias_or_scale, c, m) -> compiled kernel (wz: kernel_zero(w)). It holds no
    tensor (so a plan that keeps it never keeps a weight alive); the weight's tensor descriptor is built per call (a
    few microseconds). g2: the group size of two-level int4 weights (swapped kernels only; wz is then the gparam);
    asm: their nibbles turned into int8 values by inline PTX (w4_asm_ok), else by Triton's own lowering."""
    kind, bm, bn, bk, gm, st, nw = cfg
    flags = dict(flag_items)
    fit = [_programs_per_sm(kind), False]  # programs per SM of a persistent kind; checked after the first compile

    def _fit_once(kern):
        if not fit[1]:
            fit[0], fit[1] = resident_per_sm(kern, nw, device_str, fit[0]), True

    use_qsum = has_zero or u4  # the epilogue reads the per-token code sums (else a.scale stands in, unread)
    nsm = _device_info(device_str)[1]
    w_int4 = flags["W_INT4"]
    if kind.startswith("swap"):
        kw = dict(GROUP_K=group_k, HAS_ZERO=has_zero, HAS_BIAS=has_bias, MAGIC=magic, U4=bool(u4),
                  ASM=u4 == 2 or bool(asm),
                  MERGE=perm_mode == 2, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_stages=st, num_warps=nw,
                  HAS_RES=flags["HAS_RES"], HAS_GATE=flags["HAS_GATE"], G2=g2)
        if kind == "swap":
            def fn(q, a_scale, a_qsum, wd, ws, wz, bias_t, c, m, res=None, gate=None, res_rows=1):
                qs, stride_qs = (a_qsum, a_qsum.stride(0)) if use_qsum else (a_scale, 0)
                grid = (_cdiv(m, bm) * _cdiv(n, bn),)
                return _w4_swap_kernel[grid](q, wd, c, a_scale, ws, wz, qs, bias_t, m, n, k, q.stride(0),
                                             wd.stride(0), c.stride(0), ws.stride(0) if group_k else 0, stride_qs,
                                             *_residual_args(c, res, gate, res_rows), wz, wz.stride(0) if g2 else 0,
                                             GATE_1D=_gate_1d(gate, res_rows, bm), **kw)
            return fn
        a_kb = bk if perm_mode == 2 else bk // 2
        epi_tma = kind.startswith("swapts")

        def fn(q, a_scale, a_qsum, wd, ws, wz, bias_t, c, m, res=None, gate=None, res_rows=1):
            qs, stride_qs = (a_qsum, a_qsum.stride(0)) if use_qsum else (a_scale, 0)
            a_desc = TensorDescriptor(q, [m, k], [q.stride(0), 1], [bm, a_kb])
            b_desc = TensorDescriptor(wd, [n, wd.shape[1]], [wd.stride(0), 1], [bn, bk // 2])
            c_arg = TensorDescriptor(c, [m, n], [c.stride(0), 1], [bm, bn]) if epi_tma else c
            progs = min(nsm * fit[0], _cdiv(m, bm) * _cdiv(n, bn))
            kern = _w4_swap_tma_kernel[(progs,)](a_desc, b_desc, c_arg, a_scale, ws, wz, qs, bias_t, m, n, k,
                                                 c.stride(0), ws.stride(0) if group_k else 0, stride_qs, progs,
                                                 *_residual_args(c, res, gate, res_rows), wz,
                                                 wz.stride(0) if g2 else 0, EPI_TMA=epi_tma,
                                                 GATE_1D=_gate_1d(gate, res_rows, bm), **kw)
            _fit_once(kern)
            return kern
        return fn
    if kind == "ptr":
        kw = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, EVEN_K=k % bk == 0, num_stages=st, num_warps=nw,
                  **flags)

        def fn(q, a_scale, a_qsum, wd, ws, wz, bias_t, c, m, res=None, gate=None, res_rows=1):
            qs, stride_qs = (a_qsum, a_qsum.stride(0)) if use_qsum else (a_scale, 0)
            grid = (_cdiv(m, bm) * _cdiv(n, bn),)
            return _qgemm_kernel[grid](q, wd, c, a_scale, ws, wz, qs, bias_t, m, n, k, q.stride(0), wd.stride(0),
                                       c.stride(0), ws.stride(0) if group_k else 0, stride_qs,
                                       *_residual_args(c, res, gate, res_rows), GATE_1D=_gate_1d(gate, res_rows, bm),
                                       **kw)
        return fn
    kb = bk // 2 if w_int4 else bk
    a_kb = kb if perm_mode == 1 else bk
    epi_tma = kind.startswith("tmas")
    kw = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, EPI_TMA=epi_tma, num_stages=st, num_warps=nw, **flags)

    def fn(q, a_scale, a_qsum, wd, ws, wz, bias_t, c, m, res=None, gate=None, res_rows=1):
        qs, stride_qs = (a_qsum, a_qsum.stride(0)) if use_qsum else (a_scale, 0)
        a_desc = TensorDescriptor(q, [m, k], [q.stride(0), 1], [bm, a_kb])
        b_desc = TensorDescriptor(wd, [n, wd.shape[1]], [wd.stride(0), 1], [bn, kb])
        c_arg = TensorDescriptor(c, [m, n], [c.stride(0), 1], [bm, bn]) if epi_tma else c
        progs = min(nsm * fit[0], _cdiv(m, bm) * _cdiv(n, bn))
        kern = _qgemm_tma_kernel[(progs,)](a_desc, b_desc, c_arg, a_scale, ws, wz, qs, bias_t, m, n, k,
                                           c.stride(0), ws.stride(0) if group_k else 0, stride_qs, progs,
                                           *_residual_args(c, res, gate, res_rows),
                                           GATE_1D=_gate_1d(gate, res_rows, bm), **kw)
        _fit_once(kern)
        return kern
    return fn


def quantized_matmul(a, w, bias, out_dtype, out=None, a_perm=False, return_launch=False, residual=None, gate=None,
                     res_rows=0):
    """Triton twin of reference.quantized_matmul(a, w, bias, out_dtype, residual, gate, res_rows); None when no
    kernel fits.

    residual [M, N] (unit channel stride), gate [B', N] (one row per sample of res_rows rows; B' = 1: one for all):
    the block's gated residual add in the epilogue, out = residual + gate * (GEMM + bias), every weight format.

    a_perm: int4 weights in the "pairs" byte order only; the layout `a.q` holds the codes in
    (triton_act_quant.quantize_activation(perm=...)): True / "parity" (parity-split halves) or "perm32" (16 even
    then 16 odd channels per 32; one dot per K step). int4 weights in the "split16" order take natural-order codes.
    int4 weights with a_perm (or split16) and per-token code sums in `a.qsum` (per weight group, or per token for
    per-channel weights) let the swapped kernels multiply the raw nibbles and subtract 8 * qsum once (see
    _int4_halves_u).
    """
    global last_kernel, last_config
    a_fmt = "fp8" if a.q.dtype == torch.float8_e4m3fn else "int8"
    perm_mode = {False: 0, None: 0, 0: 0, True: 1, 1: 1, "parity": 1, 2: 2, "perm32": 2}[a_perm]
    if not supported(a_fmt, w):
        return None
    if w.fmt == "int4" and w.pack == "split16":
        # split16 bytes + natural-order codes multiply exactly as "pairs" bytes + perm32 codes (the same K
        # permutation on both sides): the same swapped kernels, the activation written in plain order
        if perm_mode:
            raise ValueError("split16 int4 weights take activation codes in natural order (a_perm=False)")
        perm_mode = 2
    if residual is not None and (residual.stride(-1) != 1 or (gate is not None and gate.stride(-1) != 1)):
        return None  # the epilogue reads residual / gate rows with unit channel stride
    q = a.q if a.q.stride(-1) == 1 else a.q.contiguous()
    m, k = q.shape
    n = w.out_features
    if k != w.in_features:
        raise ValueError(f"activation has {k} channels, weight expects {w.in_features}")
    g2 = int(w.group_size) if w.gparam is not None else 0  # two-level int4: accumulated like per-channel weights
    if g2 and not perm_mode:
        return None  # (the swapped kernels only: int4 codes in the split16 order, or perm'd activation codes)
    group_k = 0 if g2 else int(w.group_size or 0)
    has_zero = w.zero is not None
    if has_zero and a.qsum is None:
        return None
    n_groups = k // group_k if group_k else 1
    u4 = int(w.fmt == "int4" and perm_mode > 0 and a.qsum is not None and tuple(a.qsum.shape) == (m, n_groups)
             and not g2)
    if u4 and w4_asm_ok(q.device):
        u4 = 2  # the nibbles unpacked four bytes per register by inline PTX
    asm = bool(g2) and w4_asm_ok(q.device)  # two-level: the multiply-add per four weights by inline PTX too
    if perm_mode and (w.fmt != "int4" or k % (32 if perm_mode == 1 else 64)):
        return None
    dev = q.device
    if residual is not None:
        check_residual(residual, gate, res_rows, m, n)
    c = out if out is not None else torch.empty((m, n), device=dev, dtype=out_dtype)
    if m == 0 or n == 0:
        return (c, None) if return_launch else c
    # (with return_launch, the launch is fn(q, a_scale, a_qsum, wd, ws, wz, bias_or_scale, c, m[, res, gate,
    # res_rows]))
    wd = w.data if w.data.is_contiguous() else w.data.contiguous()
    ws = w.scale.float().contiguous()
    wz = w.zero.float().contiguous() if has_zero else (w.gparam.contiguous() if g2 else ws)
    bias_t = bias.contiguous() if bias is not None else a.scale
    w_int4 = w.fmt == "int4"
    is_fp8 = a_fmt == "fp8"
    if has_zero and group_k and a.qsum.shape[1] != k // group_k:
        return None
    if has_zero and not group_k and a.qsum.shape[1] != 1:
        return None
    bound = 127 * (8 if w_int4 else 128) * max(group_k, 1)
    magic = bool(group_k) and bound < (1 << 22)
    flags = dict(W_INT4=w_int4, IS_FP8=is_fp8, GROUP_K=group_k, HAS_ZERO=has_zero, HAS_BIAS=bias is not None,
                 MAGIC=magic, A_PERM=perm_mode == 1, HAS_RES=residual is not None, HAS_GATE=gate is not None)
    tma = tma_ok(dev) and q.data_ptr() % 16 == 0 and wd.data_ptr() % 16 == 0 and k % 16 == 0 and \
        (wd.shape[1] * wd.element_size()) % 16 == 0
    tma_store = tma and c.data_ptr() % 16 == 0 and (c.stride(0) * c.element_size()) % 16 == 0 and c.stride(1) == 1
    setup = (n, k, group_k, has_zero, bias is not None, magic, u4, perm_mode, str(dev), tuple(flags.items()), g2,
             asm)

    def launch(cfg):
        if residual is not None:
            return launcher(cfg, *setup)(q, a.scale, a.qsum, wd, ws, wz, bias_t, c, m, residual, gate, res_rows)
        return launcher(cfg, *setup)(q, a.scale, a.qsum, wd, ws, wz, bias_t, c, m)

    key = (m_bucket(m), n, k, str(dev), out_dtype, bias_t.dtype, tma, tma_store, os.environ.get(_KINDS_ENV, ""),
           u4, perm_mode, g2, asm) + tuple(flags.values())
    cfg = tuner.pick(key, candidates(m, n, k, w_int4, group_k, tma, tma_store, perm_mode, g2), launch)
    last_config = cfg
    last_kernel = launch(cfg)
    return (c, launcher(cfg, *setup)) if return_launch else c
