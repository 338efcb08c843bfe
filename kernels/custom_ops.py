"""Our two kernel calls as torch.library custom ops, so torch.compile (fullgraph) and CUDA graphs see them as one
opaque op each instead of tracing into Triton's host-side code.

  viditq::quant_linear         the QuantLinear call (kernels.dispatch.quant_linear) on plain tensors and scalars
  viditq::quantized_matmul     the GEMM alone, on activations quantized by compiled torch code (see dispatch:
                               Inductor then fuses the quantize into the op producing x: LayerNorm+modulate, GELU)
  viditq::prologue_quant_linear  a layer quant_core/fusions.py fuses: GELU or LayerNorm+modulate (or nothing), the
                               smoothing and the rotation in the quantize, then the GEMM (+ the gated residual add)
  viditq::quantized_attention  the quantized attention call (kernels.dispatch.quantized_attention, which
                               quant_core.attention.quantized_attention calls)
  viditq::frame_attention      attention over the frames of each spatial position (kernels.dispatch.frame_attention:
                               the video models' temporal attention)

Why: Dynamo cannot trace the Triton launch path (TensorDescriptor's `data_ptr() % 16` alignment assert, the
lru_cache'd device queries, the tuners that time candidates on first call). As custom ops these run for real (the
same code as eager, backend picked at run time from VIDITQ_BACKEND / the layer's backend and the device), and the
fake (meta) implementations below give the compiler the output's shape, dtype, device and strides.

Only compiled code goes through the ops: the callers check `torch.compiler.is_compiling()` and eager calls go
straight to the implementations (no custom-op dispatch overhead on the eager path, which is Python-bound already).

Output layouts are fixed per op (Inductor asserts the real strides against the fake ones):
  quant_linear: contiguous [..., N] in x's dtype;
  quantized_attention: [B, H, Nq, D] in q's dtype, stored as [B, Nq, H, D] (what the Triton kernel writes; the
  caller's `out.transpose(1, 2).reshape(B, Nq, H * D)` is then free). The torch reference's output is copied into
  that layout (CPU / fallback path only);
  frame_attention: [B, S, H, T, D] stored as [B, T, S, H, D] (both paths write it so).

Inference only: the outputs are marked non-differentiable (no gradient flows through a quantized op, as with the
Triton kernels in eager), so compiled models also run with grad-requiring inputs (e.g. outside torch.no_grad).
"""
from typing import Optional

import torch

from .reference_attention import frame_attention_storage
from .types import QuantizedActivation, QuantizedWeight, split_fmt_tag

NAMESPACE = "viditq"


def _define(name: str, impl, fake):
    """Register `viditq::name` (schema from impl's annotations) with its fake implementation. Another copy of
    this package imported under another module name in the same process registers the same op first; a second
    registration would raise, so that copy's op (same code) is used."""
    try:
        return getattr(getattr(torch.ops, NAMESPACE), name)
    except (AttributeError, RuntimeError):
        pass
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", impl, mutates_args=())
    op.register_fake(fake)
    op.register_autograd(_no_grad_backward, setup_context=_no_grad_setup)
    return op


def _no_grad_setup(ctx, inputs, output):
    # quantized forwards have no gradient (rounding), and the Triton kernels give outputs without one in eager:
    # under autograd the output is a constant, so compiled code with grad-requiring inputs works as eager does
    ctx.mark_non_differentiable(*(output if isinstance(output, tuple) else (output,)))


def _no_grad_backward(ctx, grad):
    raise RuntimeError("ViDiT-Q's quantized ops are inference-only (their outputs are non-differentiable)")


def _in_layout(t: torch.Tensor, storage_shape, perm) -> torch.Tensor:
    """t as `torch.empty(storage_shape).permute(perm)` would lay it out (exact strides, size-1 dims included:
    Inductor checks a custom op's real output strides against its fake's); t itself when it already is."""
    strides, acc = [0] * len(storage_shape), 1
    for i in range(len(storage_shape) - 1, -1, -1):
        strides[i] = acc
        acc *= max(storage_shape[i], 1)  # as torch lays out empty tensors
    if t.stride() == tuple(strides[p] for p in perm):
        return t
    return torch.empty(storage_shape, dtype=t.dtype, device=t.device).permute(perm).copy_(t)


def _weight(w_data, w_scale, w_zero, w_gparam, w_fmt, in_features, group_size) -> QuantizedWeight:
    """The QuantizedWeight an op's arguments describe (w_fmt: QuantizedWeight.fmt_tag, the int4 byte order in it)."""
    fmt, pack = split_fmt_tag(w_fmt)
    return QuantizedWeight(data=w_data, scale=w_scale, zero=w_zero, fmt=fmt, in_features=in_features,
                           group_size=group_size, pack=pack, gparam=w_gparam)


# ---- viditq::quant_linear ----------------------------------------------------------------------------------------
def _quant_linear(x: torch.Tensor, w_data: torch.Tensor, w_scale: torch.Tensor, w_zero: Optional[torch.Tensor],
                  w_gparam: Optional[torch.Tensor], bias: Optional[torch.Tensor], mult: Optional[torch.Tensor], static_scale: Optional[torch.Tensor],
                  w_fmt: str, in_features: int, group_size: int, had_block: int, act_fmt: str, act_qmax: int,
                  backend: str) -> torch.Tensor:
    """y[..., N] = quantize(x) @ W^T + bias in x's dtype; W = (w_data, w_scale, w_zero, w_gparam, w_fmt,
    in_features, group_size) as in kernels.types.QuantizedWeight (N = w_data.shape[0])."""
    from . import dispatch

    w = _weight(w_data, w_scale, w_zero, w_gparam, w_fmt, in_features, group_size)
    y = dispatch.quant_linear_impl(x, w, bias, mult, had_block, act_fmt, act_qmax, static_scale, backend)
    return _in_layout(y, y.shape, range(y.dim()))  # contiguous: what both paths give


def _quant_linear_fake(x, w_data, w_scale, w_zero, w_gparam, bias, mult, static_scale, w_fmt, in_features, group_size,
                       had_block, act_fmt, act_qmax, backend):
    torch._check(x.shape[-1] == in_features,
                 lambda: f"quant_linear: input has {x.shape[-1]} features, the layer {in_features}")
    return x.new_empty((*x.shape[:-1], w_data.shape[0]))


# ---- viditq::quantized_attention -------------------------------------------------------------------------------
def _quantized_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str, backend: str
                         ) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with quantized products; q [B, H, Nq, D], k/v [B, H, Nk, D] -> [B, H, Nq, D]
    (stored as [B, Nq, H, D])."""
    from . import dispatch

    out = dispatch.quantized_attention_impl(q, k, v, mode, backend)
    return _in_layout(out, _attention_storage_shape(q), (0, 2, 1, 3))  # the kernel's layout; the twin's is copied


def _attention_storage_shape(q):
    b, h, nq, d = q.shape
    return b, nq, h, d


def _quantized_attention_fake(q, k, v, mode, backend):
    return q.new_empty(_attention_storage_shape(q)).permute(0, 2, 1, 3)


# ---- viditq::frame_attention -------------------------------------------------------------------------------------
def _frame_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """Attention over the T axis of [B, S, H, T, D] views -> [B, S, H, T, D] stored as [B, T, S, H, D]."""
    from . import dispatch

    return _in_layout(dispatch.frame_attention_impl(q, k, v, backend), *frame_attention_storage(q))


def _frame_attention_fake(q, k, v, backend):
    shape, perm = frame_attention_storage(q)
    return q.new_empty(shape).permute(perm)


# ---- viditq::quantized_matmul (the GEMM alone, for activations quantized by compiled torch code) -----------------
def _quantized_matmul(q: torch.Tensor, scale: torch.Tensor, qsum: Optional[torch.Tensor], w_data: torch.Tensor,
                      w_scale: torch.Tensor, w_zero: Optional[torch.Tensor], w_gparam: Optional[torch.Tensor],
                      bias: Optional[torch.Tensor], w_fmt: str, in_features: int, group_size: int,
                      out_dtype: torch.dtype, backend: str,
                      residual: Optional[torch.Tensor] = None, gate: Optional[torch.Tensor] = None,
                      res_rows: int = 0) -> torch.Tensor:
    """[M, N] = dequant(q, scale) @ dequant(W)^T + bias in out_dtype (W as in quant_linear); with residual [M, N]:
    residual + gate_b * that (gate [B', N], b = row // res_rows), the block's gated residual add."""
    from . import dispatch

    w = _weight(w_data, w_scale, w_zero, w_gparam, w_fmt, in_features, group_size)
    return dispatch.quantized_matmul_impl(QuantizedActivation(q=q, scale=scale, qsum=qsum), w, bias, out_dtype,
                                          backend, residual, gate, res_rows).contiguous()


def _quantized_matmul_fake(q, scale, qsum, w_data, w_scale, w_zero, w_gparam, bias, w_fmt, in_features, group_size, out_dtype,
                           backend, residual=None, gate=None, res_rows=0):
    return q.new_empty((q.shape[0], w_data.shape[0]), dtype=out_dtype)


# ---- viditq::prologue_quant_linear (a fused layer: producer + quantize, GEMM + epilogue) ----------------------------
def _prologue_quant_linear(x: torch.Tensor, prologue: str, shift: Optional[torch.Tensor],
                           scale: Optional[torch.Tensor], rows_per_sample: int, eps: float, w_data: torch.Tensor,
                           w_scale: torch.Tensor, w_zero: Optional[torch.Tensor], w_gparam: Optional[torch.Tensor],
                           bias: Optional[torch.Tensor], mult: Optional[torch.Tensor], w_fmt: str, in_features: int, group_size: int, act_fmt: str,
                           act_qmax: int, backend: str, residual: Optional[torch.Tensor], gate: Optional[torch.Tensor],
                           res_rows: int, had_block: int) -> torch.Tensor:
    """[M, N] = quantize(H(prologue(x) * mult)) @ W^T + bias (+ the gated residual add), dispatch.prologue_quant_linear
    as one op: one dispatch per layer, and eager's launch plan serves compiled calls too."""
    from . import dispatch

    w = _weight(w_data, w_scale, w_zero, w_gparam, w_fmt, in_features, group_size)
    return dispatch.prologue_quant_linear_impl(x, prologue, shift, scale, rows_per_sample, eps, w, bias, mult, act_fmt,
                                               act_qmax, backend, residual, gate, res_rows, had_block).contiguous()


def _prologue_quant_linear_fake(x, prologue, shift, scale, rows_per_sample, eps, w_data, w_scale, w_zero, w_gparam,
                                bias, mult, w_fmt, in_features, group_size, act_fmt, act_qmax, backend, residual, gate,
                                res_rows, had_block):
    torch._check(x.shape[-1] == in_features,
                 lambda: f"prologue_quant_linear: input has {x.shape[-1]} features, the layer {in_features}")
    return x.new_empty((x.numel() // x.shape[-1], w_data.shape[0]))


quant_linear = _define("quant_linear", _quant_linear, _quant_linear_fake)
quantized_matmul = _define("quantized_matmul", _quantized_matmul, _quantized_matmul_fake)
prologue_quant_linear = _define("prologue_quant_linear", _prologue_quant_linear, _prologue_quant_linear_fake)
quantized_attention = _define("quantized_attention", _quantized_attention, _quantized_attention_fake)
frame_attention = _define("frame_attention", _frame_attention, _frame_attention_fake)
