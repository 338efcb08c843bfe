"""Quantizer math: the reference every kernel is checked against.

Weights: static, per output channel (or per group of input channels, or per tensor), symmetric or asymmetric,
int8 / int6 / int4 (packed) / fp8. Activations: dynamic per token (kernels.reference.quantize_activation),
or static per tensor for the naive baseline.
"""
from typing import Optional

import torch

from ..kernels.reference import dequantize_activation, dequantize_weight, pack_int4, quantize_activation
from ..kernels.types import FP8_E4M3_MAX, GPARAM_QMAX, SCALE_EPS, QuantizedWeight, make_gparam
from .config import GROUP_SCALES


def int_range(bits: int, symmetric: bool):
    """(qmin, qmax) of a signed integer code."""
    qmax = 2 ** (bits - 1) - 1
    return (-qmax if symmetric else -qmax - 1), qmax


def _grouped(w: torch.Tensor, granularity: str, group_size: int) -> torch.Tensor:
    """View w [N, K] as [rows, G, K/G]: the last dim shares one scale."""
    n, k = w.shape
    if granularity == "tensor":
        return w.reshape(1, 1, n * k)
    if granularity == "group":
        if k % group_size:
            raise ValueError(f"in_features {k} is not a multiple of the group size {group_size}")
        return w.reshape(n, k // group_size, group_size)
    return w.reshape(n, 1, k)


def quantize_weight_two_level(w: torch.Tensor, group_size: int) -> QuantizedWeight:
    """int4 weights with two-level group scales (QServe's progressive group quantization, arXiv 2405.04532):
    a float scale per output channel s1 = max|W[n]| / 119 (level 1: int8 codes), then per group of `group_size`
    input channels an integer scale s2 in 1..16 and a zero z in 0..15 (level 2, asymmetric, the group's range with
    zero in it): W ~= s1 * s2 * (q - z), q in 0..15, with every s2 * (q - z) in [-128, 127] (clamped where the
    rounding would leave it), so the GEMM multiplies int8 values and sums all of K in one int32 accumulator."""
    wf = w.detach().float()
    n, k = wf.shape
    if group_size <= 0 or k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of the group size {group_size}")
    s1 = wf.abs().amax(1).clamp_min(SCALE_EPS) / GPARAM_QMAX
    v = (wf / s1[:, None]).reshape(n, k // group_size, group_size)  # level-1 units (|v| <= 119)
    lo = v.amin(-1, keepdim=True).clamp(max=0)
    hi = v.amax(-1, keepdim=True).clamp(min=0)
    s2 = torch.ceil((hi - lo) / 15 - 1e-6).clamp(1, 16)
    z = torch.round(-lo / s2).clamp(0, 15)
    # q - z within [ceil(-128 / s2), floor(127 / s2)]: s2 * (q - z) fits int8
    q_min = torch.clamp(z + torch.ceil(-128 / s2), min=0)
    q_max = torch.clamp(z + torch.floor(127 / s2), max=15)
    q = torch.maximum(torch.minimum(torch.round(v / s2) + z, q_max), q_min)
    codes = (q - 8).reshape(n, k).to(torch.int8)
    return QuantizedWeight(data=pack_int4(codes), scale=s1.contiguous(), zero=None, fmt="int4", in_features=k,
                           group_size=group_size,
                           gparam=make_gparam(s2.reshape(n, -1), z.reshape(n, -1)).contiguous())


def quantize_weight(w: torch.Tensor, bits: int = 8, fmt: str = "int", granularity: str = "channel",
                    group_size: int = 0, symmetric: bool = True, group_scale: str = "float") -> QuantizedWeight:
    """Quantize a float weight [N, K] (out, in) into stored codes + scales (+ zero points).
    group_scale "int8" (int4 groups only): two-level group scales, see quantize_weight_two_level."""
    if group_scale not in GROUP_SCALES:
        raise ValueError(f"group_scale must be one of {GROUP_SCALES}, got {group_scale!r}")
    if group_scale == "int8" and granularity == "group":
        if bits != 4 or fmt != "int":
            raise ValueError("two-level (int8) group scales are for int4 weights")
        return quantize_weight_two_level(w, group_size)
    wf = w.detach().float()
    n, k = wf.shape
    g = _grouped(wf, granularity, group_size)
    zero = None
    if fmt == "fp8":
        if bits != 8 or not symmetric:
            raise ValueError("fp8 weights are 8-bit and symmetric")
        scale = g.abs().amax(-1, keepdim=True).clamp_min(SCALE_EPS) / FP8_E4M3_MAX
        codes = (g / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    elif symmetric:
        qmin, qmax = int_range(bits, True)
        scale = g.abs().amax(-1, keepdim=True).clamp_min(SCALE_EPS) / qmax
        codes = torch.clamp(torch.round(g / scale), qmin, qmax)
    else:
        qmin, qmax = int_range(bits, False)
        lo = g.amin(-1, keepdim=True).clamp(max=0)
        hi = g.amax(-1, keepdim=True).clamp(min=0)
        scale = ((hi - lo) / (qmax - qmin)).clamp_min(SCALE_EPS)
        zero = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
        codes = torch.clamp(torch.round(g / scale) + zero, qmin, qmax)
    codes = codes.reshape(n, k)
    if granularity == "group":
        scale, zero = scale.reshape(n, -1), None if zero is None else zero.reshape(n, -1)
    else:  # per channel, or one per-tensor value repeated per channel (the same kernels serve both)
        scale, zero = scale.reshape(-1).expand(n), None if zero is None else zero.reshape(-1).expand(n)
    if fmt == "fp8":
        data, wfmt = codes, "fp8"
    elif bits == 4:
        data, wfmt = pack_int4(codes.to(torch.int8)), "int4"
    else:
        data, wfmt = codes.to(torch.int8), "int8"
    return QuantizedWeight(data=data, scale=scale.contiguous(), zero=None if zero is None else zero.contiguous(),
                           fmt=wfmt, in_features=k, group_size=group_size if granularity == "group" else 0)


def fake_quantize_weight(w: torch.Tensor, **kwargs) -> torch.Tensor:
    """Quantize then dequantize (simulation), in w's dtype."""
    return dequantize_weight(quantize_weight(w, **kwargs)).to(w.dtype)


def fake_quantize_activation(x: torch.Tensor, bits: int = 8, fmt: str = "int",
                             static_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token (or static per-tensor) quantize then dequantize, same shape and dtype as x."""
    a = quantize_activation(x, fmt="fp8" if fmt == "fp8" else "int8", qmax=2 ** (bits - 1) - 1,
                            static_scale=static_scale)
    return dequantize_activation(a).reshape(x.shape).to(x.dtype)
