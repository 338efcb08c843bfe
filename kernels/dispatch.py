"""Pick the backend for each call: Triton on CUDA GPUs where a kernel exists, the torch reference elsewhere.

VIDITQ_BACKEND=torch|triton|auto forces a backend for debugging (default auto). A layer may also ask for one.

torch.compile: `quant_linear` and `quantized_attention` go through the custom ops of kernels/custom_ops.py while
Dynamo traces (torch.compiler.is_compiling()), so compiled graphs hold one opaque op per call and never trace the
Triton host code; eager calls run `*_impl` directly. The backend is resolved at run time inside the op, exactly
as in eager (env var, layer's choice, device), never baked into a graph.
"""
import contextlib
import logging
import os
from typing import Optional

import torch

from . import custom_ops, reference, reference_attention
from .types import QuantizedActivation, QuantizedWeight

log = logging.getLogger("vidit_q.kernels")
BACKENDS = ("auto", "triton", "torch")
ATTENTION_BLOCK_N = 64  # key block of the attention's torch twin (the CUDA kernel tunes its own: 64 or 128)
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
    if torch.compiler.is_compiling():  # one opaque op in the compiled graph (custom_ops.py says why)
        if _quantize_in_torch(w, had_block):
            # the activation quantize as torch code, so Inductor fuses it into whatever produced x (LayerNorm +
            # modulate, GELU): x never goes to memory in bf16, only as codes + scales; then the GEMM op
            sum_group = (w.group_size or w.in_features) if w.zero is not None else 0
            a = reference.quantize_activation(x, mult, had_block, act_fmt, act_qmax, static_scale, sum_group)
            y = custom_ops.quantized_matmul(a.q, a.scale, a.qsum, w.data, w.scale, w.zero, w.gparam, bias,
                                            w.fmt_tag, w.in_features, w.group_size, x.dtype, backend or "auto")
            return y.reshape(*x.shape[:-1], w.out_features)
        return custom_ops.quant_linear(x, w.data, w.scale, w.zero, w.gparam, bias, mult, static_scale, w.fmt_tag,
                                       w.in_features, w.group_size, had_block, act_fmt, act_qmax, backend or "auto")
    return quant_linear_impl(x, w, bias, mult, had_block, act_fmt, act_qmax, static_scale, backend)


COMPILE_QUANT_ENV = "VIDITQ_COMPILE_QUANT"  # auto | torch | kernel: how compiled code quantizes activations
_compile_quant_override: Optional[str] = None


@contextlib.contextmanager
def compile_quant(mode: Optional[str]):
    """Within: code compiled (traced) here quantizes activations as `mode` says (auto / torch / kernel), whatever
    VIDITQ_COMPILE_QUANT says. ViDiTQCompileModel uses "kernel" for backends without Inductor (cudagraphs, the
    debugging ones): there nothing fuses torch's quantize into its producer, so it would run as separate kernels."""
    global _compile_quant_override
    if mode not in (None, "auto", "torch", "kernel"):
        raise ValueError(f"compile_quant: mode must be auto, torch or kernel, got {mode!r}")
    old, _compile_quant_override = _compile_quant_override, mode
    try:
        yield
    finally:
        _compile_quant_override = old


def _quantize_in_torch(w: QuantizedWeight, had_block: int) -> bool:
    """Under torch.compile: quantize activations with torch code (Inductor fuses it into the producer) or call the
    fused Triton quantize + GEMM op. auto: torch where there is no rotation (a row reduction and a cast: Inductor
    fuses them well) and the weights are int8 / fp8 (the raw-nibble int4 GEMM wants the codes' sums, and for weights
    in the files' byte order the codes reordered, which the Triton quantize writes); rotated layers keep the Triton kernel (a block Hadamard is a matmul Inductor
    does not fuse)."""
    mode = _compile_quant_override or os.environ.get(COMPILE_QUANT_ENV, "auto").strip().lower()
    if mode not in ("auto", "torch", "kernel"):
        raise ValueError(f"{COMPILE_QUANT_ENV} must be auto, torch or kernel, got {mode!r}")
    if mode == "kernel":
        return False
    if mode == "torch":
        return True
    if w.fmt == "fp8" and w.data.is_cuda and not _native_fp8(w.data.device.index or 0):
        return False  # Inductor's fp8 casts need sm89+; the op's kernel path falls back to the reference instead
    return had_block <= 1 and w.fmt in ("int8", "fp8")


@torch.compiler.assume_constant_result
def _native_fp8(device_index: int) -> bool:
    """Does this CUDA device have fp8 (sm89+)? A constant for the compiler (asked while Dynamo traces)."""
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


def quantized_matmul_impl(a: QuantizedActivation, w: QuantizedWeight, bias: Optional[torch.Tensor],
                          out_dtype: torch.dtype, backend: Optional[str] = "auto",
                          residual: Optional[torch.Tensor] = None, gate: Optional[torch.Tensor] = None,
                          res_rows: int = 0) -> torch.Tensor:
    """GEMM + dequant epilogue on already quantized activations: Triton where it runs, the reference elsewhere;
    with `residual` [M, N] the block's gated residual add too (reference.quantized_matmul)."""
    if resolve_backend(backend, a.q.device) == "triton":
        from . import triton_ops

        return triton_ops.quantized_matmul(a, w, bias, out_dtype, residual, gate, res_rows)
    return reference.quantized_matmul(a, w, bias, out_dtype, residual, gate, res_rows)


def quant_linear_impl(x: torch.Tensor, w: QuantizedWeight, bias: Optional[torch.Tensor],
                      mult: Optional[torch.Tensor] = None, had_block: int = 0, act_fmt: str = "int8",
                      act_qmax: int = 127, static_scale: Optional[torch.Tensor] = None,
                      backend: Optional[str] = "auto") -> torch.Tensor:
    """quant_linear's implementation (eager calls and the custom op's real run)."""
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


def prologue_quant_linear(x: torch.Tensor, prologue: str, shift: Optional[torch.Tensor],
                          scale: Optional[torch.Tensor], rows_per_sample: int, eps: float, w: QuantizedWeight,
                          bias: Optional[torch.Tensor], mult: Optional[torch.Tensor] = None, act_fmt: str = "int8",
                          act_qmax: int = 127, backend: Optional[str] = "auto",
                          residual: Optional[torch.Tensor] = None, gate: Optional[torch.Tensor] = None,
                          res_rows: int = 0, had_block: int = 0) -> torch.Tensor:
    """quant_linear with the producer's elementwise work fused into the quantize (reference.apply_prologue: GELU,
    or LayerNorm + adaLN modulate): y = quantize(H(prologue(x) * mult)) @ W^T + bias, H the block Hadamard of
    had_block channels (none if <= 1). For layers with dynamic scales and symmetric int8 / fp8 / int4 weights
    (quant_core/fusions.py picks them). With `residual` (the block's residual stream, [..., N] as y) the
    consumer's gated residual add too: residual + gate_b * y, gate [B', 1, N] / [B', N] per sample of res_rows rows."""
    n = w.out_features
    res2 = gate2 = None
    if residual is not None:
        res2 = residual.reshape(-1, n)
        res2 = res2 if res2.stride(-1) == 1 else res2.contiguous()
        if gate is not None:
            gate2 = gate.reshape(-1, n)
            gate2 = gate2 if gate2.stride(-1) == 1 else gate2.contiguous()
    if torch.compiler.is_compiling():
        y = custom_ops.prologue_quant_linear(x, prologue, shift, scale, int(rows_per_sample), float(eps), w.data,
                                             w.scale, w.zero, w.gparam, bias, mult, w.fmt_tag, w.in_features,
                                             w.group_size,
                                             act_fmt, act_qmax, backend or "auto", res2, gate2, int(res_rows),
                                             int(had_block))
    else:
        y = prologue_quant_linear_impl(x, prologue, shift, scale, rows_per_sample, eps, w, bias, mult, act_fmt,
                                       act_qmax, backend, res2, gate2, res_rows, had_block)
    return y.reshape(*x.shape[:-1], n)


def prologue_quant_linear_impl(x, prologue, shift, scale, rows_per_sample, eps, w, bias, mult=None, act_fmt="int8",
                               act_qmax=127, backend: Optional[str] = "auto", residual=None, gate=None, res_rows=0,
                               had_block=0) -> torch.Tensor:
    """prologue_quant_linear's implementation on [M, N] (residual, gate as [M, N] / [B', N]): on the GPU the layer's
    cached launch plan (triton_ops.prologue_quant_linear), else the quantize then the GEMM, each where it runs."""
    if resolve_backend(backend, x.device) == "triton":
        from . import triton_ops

        y = triton_ops.prologue_quant_linear(x, prologue, shift, scale, rows_per_sample, eps, w, bias, mult, act_fmt,
                                             act_qmax, had_block, residual, gate, res_rows)
        if y is not None:
            return y
    a = prologue_quantize_impl(x, prologue, shift, scale, rows_per_sample, eps, mult, act_fmt, act_qmax, backend,
                               had_block)
    return quantized_matmul_impl(a, w, bias, x.dtype, backend, residual, gate, int(res_rows))


def prologue_quantize_impl(x, prologue, shift=None, scale=None, rows_per_sample=0, eps=1e-6, mult=None,
                           fmt="int8", qmax=127, backend: Optional[str] = "auto",
                           had_block: int = 0) -> QuantizedActivation:
    """reference.prologue_quantize, on the Triton kernel where it runs."""
    if resolve_backend(backend, x.device) == "triton":
        from . import triton_ops, triton_prologue_quant

        if fmt != "fp8" or triton_ops.fp8_ok(x.device):
            a = triton_prologue_quant.prologue_quantize(x, prologue, shift, scale, rows_per_sample, eps, mult, fmt,
                                                        qmax, had_block)
            if a is not None:
                return a
    return reference.prologue_quantize(x, prologue, shift, scale, rows_per_sample, eps, mult, fmt, qmax, had_block)


def quantized_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str,
                        backend: Optional[str] = "auto") -> torch.Tensor:
    """Quantized softmax(q k^T / sqrt(d)) v (reference_attention.MODES); q [B, H, Nq, D], k/v [B, H, Nk, D] ->
    [B, H, Nq, D] in q's dtype."""
    if torch.compiler.is_compiling():
        return custom_ops.quantized_attention(q, k, v, mode, backend or "auto")
    return quantized_attention_impl(q, k, v, mode, backend)


def quantized_attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str,
                             backend: Optional[str] = "auto") -> torch.Tensor:
    """quantized_attention's implementation: the Triton kernel where it runs, its torch twin elsewhere."""
    if resolve_backend(backend, q.device) == "triton":
        from . import triton_attention

        if triton_attention.supported(q, mode):
            return triton_attention.attention(q, k, v, mode)
    return reference_attention.attention_reference(q, k, v, mode, block_n=ATTENTION_BLOCK_N)


FRAME_ATTENTION_ENV = "VIDITQ_FRAME_ATTENTION"


def frame_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: Optional[str] = "auto"
                    ) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over the T axis of [B, S, H, T, D] views (a video DiT's temporal attention: the
    frames of each spatial position) -> [B, S, H, T, D] stored frame-major ([B, T, S, H, D], the tokens' order)."""
    if torch.compiler.is_compiling():
        return custom_ops.frame_attention(q, k, v, backend or "auto")
    return frame_attention_impl(q, k, v, backend)


def frame_attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: Optional[str] = "auto"
                         ) -> torch.Tensor:
    """frame_attention's implementation: the Triton kernel for short sequences, torch SDPA elsewhere
    (VIDITQ_FRAME_ATTENTION=sdpa: SDPA always, for measurements and debugging)."""
    mode = os.environ.get(FRAME_ATTENTION_ENV, "auto").strip().lower()
    if mode not in ("auto", "sdpa"):
        raise ValueError(f"{FRAME_ATTENTION_ENV} must be auto or sdpa, got {mode!r}")
    if mode == "auto" and resolve_backend(backend, q.device) == "triton":
        from . import triton_frame_attention

        if triton_frame_attention.supported(q, k, v):
            return triton_frame_attention.frame_attention(q, k, v)
    return reference_attention.frame_attention_reference(q, k, v)
