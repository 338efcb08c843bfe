"""Torch reference twins of every kernel: the oracle for the Triton kernels and the CPU path.

Activation side of a quantized linear (one call, fused on GPU):
    x -> x * mult (smoothing 1/s times the rotation's random signs, one vector)
      -> block Hadamard (blocks of `had_block` channels, orthonormal)
      -> per-token abs-max -> scale -> int8 / fp8 (or a static per-tensor scale)
"""
import functools
from typing import Optional

import torch

from .types import FP8_E4M3_MAX, SCALE_EPS, QuantizedActivation, QuantizedWeight, split_gparam


@functools.lru_cache(maxsize=16)
def _hadamard_cpu(n: int) -> torch.Tensor:
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard block size must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n ** 0.5).to(torch.float32)


def hadamard_matrix(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix of size n (symmetric, its own inverse)."""
    return _hadamard_cpu(n).to(device=device, dtype=dtype)


def block_hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """Rotate the last dim of x by a block-diagonal Hadamard (blocks of `block` channels)."""
    if block <= 1:
        return x
    k = x.shape[-1]
    if k % block:
        raise ValueError(f"in_features {k} is not a multiple of the Hadamard block {block}")
    h = hadamard_matrix(block, x.device, x.dtype)
    return (x.reshape(*x.shape[:-1], k // block, block) @ h).reshape(x.shape)


def _round_clamp(v: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.clamp(torch.round(v), -qmax, qmax)


def quantize_activation(
    x: torch.Tensor,
    mult: Optional[torch.Tensor] = None,
    had_block: int = 0,
    fmt: str = "int8",
    qmax: int = 127,
    static_scale: Optional[torch.Tensor] = None,
    sum_group: int = 0,
) -> QuantizedActivation:
    """Per-token dynamic (or static per-tensor) quantization of x[..., K] -> [M, K].

    sum_group > 0 also returns per-token sums of q over groups of that many channels
    (K itself for per-channel asymmetric weights), which the GEMM needs for zero points.
    """
    k = x.shape[-1]
    xf = x.reshape(-1, k).float()
    if mult is not None:
        xf = xf * mult.float()
    xf = block_hadamard(xf, had_block)
    fmax = FP8_E4M3_MAX if fmt == "fp8" else float(qmax)
    if static_scale is not None:
        scale = static_scale.float().reshape(1).expand(xf.shape[0]).contiguous()
    else:
        scale = xf.abs().amax(dim=1).clamp_min(SCALE_EPS) / fmax
    v = xf / scale[:, None]
    if fmt == "fp8":
        q = v.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    elif fmt == "int8":
        q = _round_clamp(v, qmax).to(torch.int8)
    else:
        raise ValueError(f"unknown activation format {fmt!r}")
    qsum = None
    if sum_group:
        qsum = q.to(torch.int32).reshape(q.shape[0], k // sum_group, sum_group).sum(-1, dtype=torch.int32)
    return QuantizedActivation(q=q, scale=scale, qsum=qsum)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int values in [-8, 7], shape [N, K] (K even) -> uint8 [N, K // 2] offset-binary nibbles."""
    if q.shape[-1] % 2:
        raise ValueError("int4 packing needs an even number of input channels")
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor, pack: str = "pairs") -> torch.Tensor:
    """Inverse of pack_int4 (pack "pairs"; "split16": of repack_int4(.., "split16")): uint8 [N, K // 2] -> int8
    [N, K]."""
    lo = (p & 0xF).to(torch.int8) - 8
    hi = (p >> 4).to(torch.int8) - 8
    if pack == "split16":  # bytes [.., K/32, 16]: low nibbles columns 0..15 of each 32, high nibbles 16..31
        if p.shape[-1] % 16:
            raise ValueError(f"split16 int4 codes need K % 32 == 0, got K = {p.shape[-1] * 2}")
        shape = (*p.shape[:-1], p.shape[-1] // 16, 16)
        return torch.cat([lo.reshape(shape), hi.reshape(shape)], dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)
    if pack != "pairs":
        raise ValueError(f"unknown int4 byte order {pack!r}")
    return torch.stack([lo, hi], dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


def repack_int4(p: torch.Tensor, src: str, dst: str) -> torch.Tensor:
    """Packed int4 bytes in byte order `src` -> the same codes in byte order `dst` (QuantizedWeight.pack); split16
    needs K % 32 == 0 (p.shape[-1] % 16 == 0). A new tensor unless the orders agree."""
    if src == dst:
        return p
    if "split16" in (src, dst) and p.shape[-1] % 16:
        raise ValueError(f"split16 int4 packing needs K % 32 == 0, got K = {p.shape[-1] * 2}")
    codes = unpack_int4(p, src)  # natural column order
    if dst == "pairs":
        return pack_int4(codes)
    if dst != "split16":
        raise ValueError(f"unknown int4 byte order {dst!r}")
    u = (codes.to(torch.int16) + 8).to(torch.uint8)
    u = u.reshape(*u.shape[:-1], u.shape[-1] // 32, 2, 16)
    return (u[..., 0, :] | (u[..., 1, :] << 4)).reshape(p.shape).contiguous()


def weight_codes(w: QuantizedWeight) -> torch.Tensor:
    """The stored integer (or fp8) codes as float32 [N, K]."""
    if w.fmt == "int4":
        return unpack_int4(w.data, w.pack).float()
    return w.data.float()


def _expand_groups(t: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    if w.group_size:
        return t.float().repeat_interleave(w.group_size, dim=1)
    return t.float()[:, None]


def gparam_int8(w: QuantizedWeight) -> torch.Tensor:
    """Two-level int4 (w.gparam): the int8 values s2 * (q - z) [N, K] the W4A8 GEMM multiplies, as float32."""
    s2, z = split_gparam(w.gparam)
    g = w.group_size
    return (weight_codes(w) + 8 - z.float().repeat_interleave(g, dim=1)) * s2.float().repeat_interleave(g, dim=1)


def dequantize_weight(w: QuantizedWeight) -> torch.Tensor:
    """float32 [N, K] weight that the stored codes represent."""
    if w.gparam is not None:
        return gparam_int8(w) * w.scale.float()[:, None]
    codes = weight_codes(w)
    if w.zero is not None:
        codes = codes - _expand_groups(w.zero, w)
    return codes * _expand_groups(w.scale, w)


def dequantize_activation(a: QuantizedActivation) -> torch.Tensor:
    return a.q.float() * a.scale[:, None]


def quantized_matmul(
    a: QuantizedActivation,
    w: QuantizedWeight,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
    residual: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
    res_rows: int = 0,
) -> torch.Tensor:
    """out[M, N] = dequant(a) @ dequant(w).T + bias, cast to out_dtype (the GEMM + epilogue oracle); with `residual`
    [M, N]: residual + gate_b * out, b = row // res_rows (gate [B', N], B' = 1: one row for all; None: 1), in fp32
    before the one cast (the block's gated residual add, fused)."""
    out = dequantize_activation(a) @ dequantize_weight(w).t()
    if bias is not None:
        out = out + bias.float()
    return residual_add(out, out_dtype, residual, gate, res_rows)


def residual_add(out: torch.Tensor, out_dtype: torch.dtype, residual: Optional[torch.Tensor] = None,
                 gate: Optional[torch.Tensor] = None, res_rows: int = 0) -> torch.Tensor:
    """(residual + gate_b * out) in fp32 (fp64 for a float64 oracle), cast to out_dtype; out itself (cast) without
    a residual."""
    dt = torch.float64 if out_dtype == torch.float64 else torch.float32
    out = out.to(dt)
    if residual is not None:
        if gate is not None:
            g = gate.to(dt).reshape(-1, out.shape[-1])
            rows = torch.arange(out.shape[0], device=out.device) // max(int(res_rows), 1)
            out = out * (g[rows] if g.shape[0] > 1 else g)
        out = out + residual.to(dt).reshape(out.shape)
    return out.to(out_dtype)


PROLOGUES = ("none", "gelu_tanh", "gelu", "norm_modulate")


def apply_prologue(x: torch.Tensor, prologue: Optional[str], shift: Optional[torch.Tensor] = None,
                   scale: Optional[torch.Tensor] = None, rows_per_sample: int = 0, eps: float = 1e-6
                   ) -> torch.Tensor:
    """The producer's elementwise work that a fused quantize runs first, in fp32: [..., K] -> float32 [M, K].

    none: x itself. gelu_tanh / gelu: GELU(x). norm_modulate: LayerNorm(x) (no affine) * (1 + scale_b) + shift_b, with b the
    sample of the row (rows_per_sample rows each; shift / scale [B, 1, K], [B, K] or one [K] vector for all)."""
    k = x.shape[-1]
    xf = x.reshape(-1, k).float()
    if prologue is None or prologue == "none":
        return xf
    if prologue == "gelu_tanh":
        return torch.nn.functional.gelu(xf, approximate="tanh")
    if prologue == "gelu":
        return torch.nn.functional.gelu(xf)
    if prologue != "norm_modulate":
        raise ValueError(f"unknown prologue {prologue!r}; expected one of {PROLOGUES}")
    m = xf.shape[0]
    if rows_per_sample <= 0 or m % rows_per_sample:
        raise ValueError(f"norm_modulate: {m} rows are not whole samples of {rows_per_sample} rows")
    y = torch.nn.functional.layer_norm(xf, (k,), eps=eps).reshape(m // rows_per_sample, rows_per_sample, k)
    sh = shift.float().reshape(-1, 1, k)
    sc = scale.float().reshape(-1, 1, k)
    return (y * (1 + sc) + sh).reshape(m, k)


def prologue_quantize(x: torch.Tensor, prologue: str, shift: Optional[torch.Tensor] = None,
                      scale: Optional[torch.Tensor] = None, rows_per_sample: int = 0, eps: float = 1e-6,
                      mult: Optional[torch.Tensor] = None, fmt: str = "int8", qmax: int = 127, had_block: int = 0
                      ) -> QuantizedActivation:
    """quantize_activation(apply_prologue(x, ...), mult, had_block): the oracle of kernels/triton_prologue_quant.py."""
    return quantize_activation(apply_prologue(x, prologue, shift, scale, rows_per_sample, eps), mult, had_block, fmt,
                               qmax)
