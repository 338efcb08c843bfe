"""Pick the backend for each call: Triton on CUDA GPUs where a kernel exists, the torch reference elsewhere.

VIDITQ_BACKEND=torch|triton|auto forces a backend for debugging (default auto). A layer may also ask for one.
"""
import logging
import os
from typing import Optional

import torch

from . import reference
from .types import QuantizedActivation, QuantizedWeight

log = logging.getLogger("vidit_q.kernels")
BACKENDS = ("auto", "triton", "torch")
_warned = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning(msg)


def resolve_backend(requested: Optional[str], device: torch.device) -> str:
    """'triton' or 'torch' for a call on `device`; the env var overrides a layer's choice."""
    env = os.environ.get("VIDITQ_BACKEND", "").strip().lower()
    choice = env or (requested or "auto")
    if choice not in BACKENDS:
        raise ValueError(f"unknown kernel backend {choice!r}; expected one of {BACKENDS}")
    if choice == "torch":
        return "torch"
    if device.type != "cuda":
        if choice == "triton":
            _warn_once(f"triton backend asked for tensors on {device}; using the torch reference")
        return "torch"
    try:
        from . import triton_ops  # noqa: F401  (imports triton)
    except Exception as e:  # triton missing or broken: reference path, said once
        _warn_once(f"Triton kernels unavailable ({e}); using the torch reference")
        return "torch"
    return "triton"


def quant_linear(
    x: torch.Tensor,
    w: QuantizedWeight,
    bias: Optional[torch.Tensor],
    mult: Optional[torch.Tensor] = None,
    had_block: int = 0,
    act_fmt: str = "int8",
    act_qmax: int = 127,
    static_scale: Optional[torch.Tensor] = None,
    backend: Optional[str] = "auto",
) -> torch.Tensor:
    """The one call QuantLinear makes: y[..., N] = quantize(x) @ W^T + bias in x's dtype."""
    lead = x.shape[:-1]
    sum_group = 0
    if w.zero is not None:
        sum_group = w.group_size or w.in_features
    if resolve_backend(backend, x.device) == "triton":
        from . import triton_ops

        y = triton_ops.quant_linear(x, w, bias, mult, had_block, act_fmt, act_qmax, static_scale, sum_group)
        if y is not None:
            return y.reshape(*lead, w.out_features)
    a = reference.quantize_activation(x, mult, had_block, act_fmt, act_qmax, static_scale, sum_group)
    return reference.quantized_matmul(a, w, bias, x.dtype).reshape(*lead, w.out_features)


def quantize_activation(x, mult=None, had_block=0, fmt="int8", qmax=127, static_scale=None, sum_group=0,
                        backend: Optional[str] = "auto") -> QuantizedActivation:
    if resolve_backend(backend, x.device) == "triton":
        from . import triton_ops

        return triton_ops.quantize_activation(x, mult, had_block, fmt, qmax, static_scale, sum_group)
    return reference.quantize_activation(x, mult, had_block, fmt, qmax, static_scale, sum_group)
