"""Attention over a short axis: the frames of one spatial position (OpenSORA's temporal attention), in one launch.

    out[b, s, h] = softmax(q[b, s, h] k[b, s, h]^T / sqrt(D)) v[b, s, h]      q, k, v: [B, S, H, T, D] views

Why: a video DiT's temporal attention is B*S*H independent problems of T = 16-32 frames. Flash-attention kernels
(cuDNN's in torch SDPA) tile 64+ queries x 128 keys per program, so at T = 16 one program per (sequence, head)
computes ~2 % useful work; and the model first copies the tokens into frame order and back (two rearranges of the
residual stream). Here a program takes BS sequences x G heads, all frames at once (T <= MAX_T), reading q / k / v
straight from the qkv output in the tokens' own order through strides, and writes the output in that order, so
the block needs no rearrange. It is a memory-bound kernel: the products are tiny batched tensor-core dots (T x D).

Head dims that are not a power of two (72 in OpenSORA / PixArt) are two pieces DA + DB (64 + 16, the second zero
padded) so no product runs on more than 16 padded columns. Inputs fp16 / bf16; scores, softmax and the output
accumulate in fp32; P is rounded to the input dtype for the second product, as flash attention does.
The reference twin is kernels/reference_attention.frame_attention_reference (torch SDPA in fp32).
"""
import functools

import torch
import triton
import triton.language as tl

from .reference_attention import frame_attention_storage
from .triton_act_quant import INTERPRET, Tuner, _cdiv, _next_pow2, m_bucket
from .triton_attention import _to_bf16

MAX_T = 64  # frames per sequence the kernel holds at once; longer sequences go to SDPA
MAX_D = 256
LOG2E = 1.4426950408889634


@triton.jit
def _rows(base, t, stride_t, ALIGN: tl.constexpr):
    """[NB, BT] element offsets of each (problem, frame) row; ALIGN: all of them multiples of ALIGN elements (the
    host checked the strides and pointers), so the loads and stores are 16-byte vectors (head dim 72 = 9 x 8)."""
    return tl.multiple_of(base[:, None] + t.to(tl.int64)[None, :] * stride_t, [ALIGN, ALIGN])  # int64: big videos


@triton.jit
def _load_piece(P, rows, tmask, smask, d0: tl.constexpr, DW: tl.constexpr, D: tl.constexpr):
    """[NB, BT, DW] slice of channels d0 .. d0 + DW of every problem (zeros past T, D and the last sequence)."""
    d = d0 + tl.arange(0, DW)
    mask = smask[:, None, None] & tmask[None, :, None] & (d < D)[None, None, :]
    return tl.load(P + rows[:, :, None] + d[None, None, :], mask=mask, other=0.0)


@triton.jit
def _store_piece(O, rows, tmask, smask, val, d0: tl.constexpr, DW: tl.constexpr, D: tl.constexpr):
    d = d0 + tl.arange(0, DW)
    mask = smask[:, None, None] & tmask[None, :, None] & (d < D)[None, None, :]
    tl.store(O + rows[:, :, None] + d[None, None, :], val.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr):
    """Batched a @ b (+ acc) in fp32; the CPU interpreter's bf16 dot is not a bf16 product, so there the operands
    (bf16 values already) go in as fp32: the same products, exactly."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _frame_attn_kernel(Q, K, V, O, n_seq, S_inner, T, qk_scale,
                       sqb, sqs, sqh, sqt, skb, sks, skh, skt, svb, svs, svh, svt, sob, sos, soh, sot,
                       H: tl.constexpr, G: tl.constexpr, BS: tl.constexpr, BT: tl.constexpr, D: tl.constexpr,
                       DA: tl.constexpr, DB: tl.constexpr, ALIGN: tl.constexpr, SOFT: tl.constexpr):
    """One program: BS sequences x G heads (NB = BS * G problems), all T frames of each. Sequence i is (b, s) =
    (i // S_inner, i % S_inner); the strides place q / k / v / out of (b, s, h, t) anywhere."""
    NB: tl.constexpr = BS * G
    pid = tl.program_id(0)
    n_hg = H // G
    j = tl.arange(0, NB)
    seq = (pid // n_hg) * BS + j // G
    h = ((pid % n_hg) * G + j % G).to(tl.int64)
    smask = seq < n_seq
    seq = tl.minimum(seq, n_seq - 1)  # addresses stay in bounds; the store is masked
    b = (seq // S_inner).to(tl.int64)
    s = (seq % S_inner).to(tl.int64)
    t = tl.arange(0, BT)
    tmask = t < T
    qr = _rows(b * sqb + s * sqs + h * sqh, t, sqt, ALIGN)
    kr = _rows(b * skb + s * sks + h * skh, t, skt, ALIGN)
    vr = _rows(b * svb + s * svs + h * svh, t, svt, ALIGN)
    orow = _rows(b * sob + s * sos + h * soh, t, sot, ALIGN)
    q = _load_piece(Q, qr, tmask, smask, 0, DA, D)
    k = _load_piece(K, kr, tmask, smask, 0, DA, D)
    scores = _dot(q, tl.permute(k, (0, 2, 1)), None, SOFT)  # [NB, BT queries, BT keys], fp32
    if DB > 0:
        q2 = _load_piece(Q, qr, tmask, smask, DA, DB, D)
        k2 = _load_piece(K, kr, tmask, smask, DA, DB, D)
        scores = _dot(q2, tl.permute(k2, (0, 2, 1)), scores, SOFT)
    scores = tl.where(tmask[None, None, :], scores, float("-inf"))  # padded keys
    mx = tl.max(scores, axis=2)
    p = tl.math.exp2((scores - mx[:, :, None]) * qk_scale)  # qk_scale = log2(e) / sqrt(D)
    inv = 1.0 / tl.sum(p, axis=2)
    if V.dtype.element_ty == tl.bfloat16:
        pv = _to_bf16(p, SOFT)
    else:
        pv = p.to(V.dtype.element_ty)
    v = _load_piece(V, vr, tmask, smask, 0, DA, D)
    _store_piece(O, orow, tmask, smask, _dot(pv, v, None, SOFT) * inv[:, :, None], 0, DA, D)
    if DB > 0:
        v2 = _load_piece(V, vr, tmask, smask, DA, DB, D)
        _store_piece(O, orow, tmask, smask, _dot(pv, v2, None, SOFT) * inv[:, :, None], DA, DB, D)


tuner = Tuner("frame_attention", graph=True)  # microsecond kernels: graph replays time the GPU, not the host
last_config = None


def pieces(d: int):
    """(DA, DB): the head dim as a power of two plus a zero-padded power-of-two tail (72 = 64 + 16 with 8 used);
    every product needs >= 16 columns."""
    da = max(1 << (d.bit_length() - 1), 16)
    rest = d - da
    return da, (max(_next_pow2(rest), 16) if rest > 0 else 0)


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Can the kernel take these [B, S, H, T, D] views (same shape, fp16 / bf16, unit channel stride, T <= MAX_T)?"""
    if q.dim() != 5 or q.shape != k.shape or q.shape != v.shape:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if any(x.stride(-1) != 1 for x in (q, k, v)):
        return False
    t, d = q.shape[-2], q.shape[-1]
    return 1 <= t <= MAX_T and 1 <= d <= MAX_D


def candidates(nb_heads: int, bt: int, d: int):
    """(BS sequences, G heads, num_warps) per program, a few problems per warp."""
    if INTERPRET:
        return [(2, 2, 4)] if nb_heads % 2 == 0 else [(2, 1, 4)]
    out = []
    for bs, g, nw in ((1, 4, 4), (2, 2, 4), (1, 8, 4), (2, 4, 4), (1, 2, 2), (4, 1, 4), (1, 16, 8), (2, 8, 8),
                      (4, 4, 8), (1, 1, 1), (2, 1, 2), (1, 1, 2), (1, 1, 4), (1, 2, 8)):
        if nb_heads % g == 0 and bs * g * bt * d <= 80 * 32 * nw:  # <= 80 values of each tensor per thread
            out.append((bs, g, nw))
    return out or [(1, 1, 1)]


def new_output(q: torch.Tensor) -> torch.Tensor:
    """The output for q [B, S, H, T, D]: stored frame-major ([B, T, S, H, D]: the tokens' own order, so
    out.permute(0, 3, 1, 2, 4).reshape(B, T * S, H * D) is free) and returned as the [B, S, H, T, D] view."""
    shape, perm = frame_attention_storage(q)
    return torch.empty(shape, device=q.device, dtype=q.dtype).permute(perm)


def frame_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out=None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over the T axis of [B, S, H, T, D] views (caller checks `supported`); writes
    `out` (a [B, S, H, T, D] view, default new_output(q)) and returns it."""
    b, s, h, t, d = q.shape
    if out is None:
        out = new_output(q)
    n_seq = b * s
    if n_seq == 0 or h == 0:
        return out
    bt = max(16, _next_pow2(t))
    da, db = pieces(d)
    qk_scale = LOG2E / d ** 0.5
    args = (q, k, v, out, n_seq, s, t, qk_scale, *q.stride()[:4], *k.stride()[:4], *v.stride()[:4],
            *out.stride()[:4])

    align = _alignment(q, k, v, out)

    def launch(c):
        return launcher(c, h, bt, d, da, db, align)(args)

    global last_config
    key = (h, bt, d, q.dtype, m_bucket(n_seq), str(q.device), align)
    last_config = tuner.pick(key, candidates(h, bt, da + db), launch)
    launch(last_config)
    return out


def _alignment(*ts) -> int:
    """8 when every row of every tensor starts on a 16-byte boundary (8 fp16 / bf16 elements), else 1."""
    ok = all(t.data_ptr() % 16 == 0 and all(st % 8 == 0 for st in t.stride()[:4]) for t in ts)
    return 8 if ok else 1


@functools.lru_cache(maxsize=64)
def launcher(c, h, bt, d, da, db, align):
    bs, g, nw = c

    def fn(args):
        n_seq = args[4]
        grid = (_cdiv(n_seq, bs) * (h // g),)
        return _frame_attn_kernel[grid](*args, H=h, G=g, BS=bs, BT=bt, D=d, DA=da, DB=db, ALIGN=align, SOFT=INTERPRET,
                                        num_warps=nw)
    return fn
