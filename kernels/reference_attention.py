"""Torch reference twin of the quantized attention kernel (kernels/triton_attention.py), and the exact oracle.

Quantized attention, softmax(Q K^T / sqrt(d)) V with low-bit tensor-core products (beyond the ViDiT-Q paper):
  * Q: one scale per token (its abs-max over the head dim), codes fp8 e4m3 (mode "fp8") or int8 (mode "int8");
  * K: smoothed (its per-channel mean over the keys subtracted: q.(k - mu) differs from q.k by the same amount for
    every key of a query, so the softmax is unchanged; it takes the channels' common offset, e.g. from the k bias,
    out of the codes), then one scale per block of `block_n` tokens (per batch and head), same code format as Q;
  * S = (Q codes . K codes) * q_scale * k_scale, softmax in fp32, computed online block by block (flash style:
    running row max m, running sum l, rescale by exp2(m_old - m_new));
  * mode "fp8": P = exp2(S - m + log2 448) lies in [0, 448] and is cast to fp8 e4m3 as it is (no extra scale);
    V is fp8 with one scale per channel (per batch and head, over all tokens); P V is an fp8 product and the
    channel scales and 1 / l are applied once at the end (the factor 448 cancels against l);
  * mode "int8": P (unscaled, in [0, 1]) and V stay in bf16 for P V (SageAttention-style: int8 only for Q K^T);
    "int8_fp8pv" / "fp8_bf16pv" mix the two (int8 Q K^T with fp8 P V, fp8 Q K^T with bf16 P V).
The twin walks the key blocks in the kernel's order and rounds exactly where the kernel rounds, so kernel and twin
agree to fp32 rounding (the kernel's block size must equal `block_n`).
"""
import math
from typing import Optional

import torch

FP8_MAX = 448.0
INT8_MAX = 127.0
SCALE_EPS = 1e-12
MODES = ("fp8", "int8", "int8_fp8pv", "fp8_bf16pv")
_MODE_FMTS = {"fp8": ("fp8", True), "int8": ("int8", False), "int8_fp8pv": ("int8", True),
              "fp8_bf16pv": ("fp8", False)}  # mode -> (Q K^T code format, P V in fp8)
LOG2E = 1.4426950408889634


def _codes(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Values already divided by their scale -> the code grid, returned as fp32 (fp8: RNE, int8: half-even)."""
    if fmt == "fp8":
        return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return torch.round(x).clamp(-INT8_MAX, INT8_MAX)


def quantize_q(q: torch.Tensor, fmt: str):
    """Per-token codes and scales of q [..., N, D] (fp32 codes, scale [..., N, 1])."""
    qmax = FP8_MAX if fmt == "fp8" else INT8_MAX
    qf = q.float()
    scale = qf.abs().amax(-1, keepdim=True).clamp_min(SCALE_EPS) / qmax
    return _codes(qf * (1.0 / scale), fmt), scale


def quantize_k(k: torch.Tensor, fmt: str, block_n: int):
    """Per-block codes and scales of the smoothed k [B, H, N, D] (k minus its per-channel mean over the keys):
    scale [B, H, nblocks] over block_n tokens x D channels."""
    qmax = FP8_MAX if fmt == "fp8" else INT8_MAX
    b, h, n, d = k.shape
    nb = -(-n // block_n)
    kf = torch.zeros(b, h, nb * block_n, d, dtype=torch.float32, device=k.device)
    kf[:, :, :n] = k.float() - k.float().mean(dim=2, keepdim=True)
    blocks = kf.reshape(b, h, nb, block_n, d)
    scale = blocks.abs().amax(dim=(-1, -2)).clamp_min(SCALE_EPS) / qmax  # [B, H, nb]
    codes = _codes(blocks * (1.0 / scale)[..., None, None], fmt)
    return codes.reshape(b, h, nb * block_n, d)[:, :, :n], scale


def quantize_v(v: torch.Tensor):
    """fp8 codes of v [B, H, N, D] with one scale per channel (over all tokens): scale [B, H, 1, D]."""
    vf = v.float()
    scale = vf.abs().amax(-2, keepdim=True).clamp_min(SCALE_EPS) / FP8_MAX
    return _codes(vf / scale, "fp8"), scale


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str = "fp8", block_n: int = 64,
                        sm_scale: Optional[float] = None) -> torch.Tensor:
    """What the Triton kernel computes, in torch (fp32 math). q [B, H, Nq, D], k/v [B, H, Nk, D] -> [B, H, Nq, D]
    in q's dtype."""
    if mode not in MODES:
        raise ValueError(f"unknown quantized attention mode {mode!r}; expected one of {MODES}")
    b, h, nq, d = q.shape
    nk = k.shape[2]
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    qk_fmt, pv_fp8 = _MODE_FMTS[mode]
    q8, qs = quantize_q(q, qk_fmt)
    k8, ks = quantize_k(k, qk_fmt, block_n)
    if pv_fp8:
        v8, vs = quantize_v(v)
        pshift = math.log2(FP8_MAX)
    else:
        v8, vs = v.to(torch.bfloat16).float(), None
        pshift = 0.0
    rc = qs[..., 0] * (sm_scale * LOG2E)  # [B, H, Nq]: the row factor that takes raw dot products to log2 units
    m = torch.full((b, h, nq), float("-inf"), device=q.device)
    l_sum = torch.zeros(b, h, nq, device=q.device)
    acc = torch.zeros(b, h, nq, d, device=q.device)
    for j, start in enumerate(range(0, nk, block_n)):
        kb = k8[:, :, start:start + block_n]
        r = rc * ks[:, :, j, None]
        s = q8 @ kb.transpose(-1, -2)  # exact: fp8 / int8 products summed in fp32
        m_new = torch.maximum(m, s.amax(-1) * r)
        p = torch.exp2(s * r[..., None] - (m_new - pshift)[..., None])
        alpha = torch.exp2(m - m_new)
        l_sum = l_sum * alpha + p.sum(-1)
        pq = p.to(torch.float8_e4m3fn).float() if pv_fp8 else p.to(torch.bfloat16).float()
        acc = acc * alpha[..., None] + pq @ v8[:, :, start:start + block_n]
        m = m_new
    out = acc / l_sum[..., None]
    if vs is not None:
        out = out * vs
    return out.to(q.dtype)


def attention_exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: Optional[float] = None
                    ) -> torch.Tensor:
    """Unquantized attention in fp32 (the oracle for the quantization error)."""
    d = q.shape[-1]
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    s = (q.float() @ k.float().transpose(-1, -2)) * sm_scale
    return (s.softmax(-1) @ v.float()).to(q.dtype)


def frame_attention_storage(q: torch.Tensor):
    """(storage shape, permute) of frame attention's output for q [B, S, H, T, D]: frame-major [B, T, S, H, D] (the
    tokens' own order), seen as [B, S, H, T, D]."""
    b, s, h, t, d = q.shape
    return (b, t, s, h, d), (0, 2, 3, 1, 4)


def frame_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention over the T axis of [B, S, H, T, D] views (kernels/triton_frame_attention.py's twin and fallback):
    torch SDPA on [B*S, H, T, D] copies, written into the kernel's output layout (frame_attention_storage)."""
    b, s, h, t, d = q.shape
    o = torch.nn.functional.scaled_dot_product_attention(*(x.reshape(b * s, h, t, d) for x in (q, k, v)))
    shape, perm = frame_attention_storage(q)
    return torch.empty(shape, dtype=q.dtype, device=q.device).permute(perm).copy_(o.reshape(b, s, h, t, d))
