"""Quantizer math: the reference every kernel is checked against.

Weights: static, per output channel (or per group of input channels, or per tensor), symmetric or asymmetric,
int8 / int6 / int4 (packed) / fp8. Activations: dynamic per token (kernels.reference.quantize_activation),
or static per tensor for the naive baseline.
"""
from typing import Optional

import torch

from ..kernels.reference import dequantize_activation, dequantize_weight, pack_int4, quantize_activation
from ..kernels.types import FP8_E4M3_MAX, SCALE_EPS, QuantizedWeight


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


def quantize_weight(w: torch.Tensor, bits: int = 8, fmt: str = "int", granularity: str = "channel",
                    group_size: int = 0, symmetric: bool = True) -> QuantizedWeight:
    """Quantize a float weight [N, K] (out, in) into stored codes + scales (+ zero points)."""
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
