"""The hooks our blocks give the fusions of quant_core/fusions.py: the modulated LayerNorm input of a linear, and
the gated residual add after one."""
import torch
import torch.nn as nn


# The patch embeddings (ours and ComfyUI's) end in flatten(2).transpose(1, 2), so the residual stream [B, N, C] is
# channel-strided and every elementwise op on it runs the slow strided path (and the fused quantize would need a
# copy). The blocks make it contiguous once, at the first block. False reproduces the strided layout (ComfyUI's own
# PixArt keeps it) for measurements: bench/bench_e2e.py's fp16_strided.
CONTIGUOUS_RESIDUAL = True


def block_input(x: torch.Tensor) -> torch.Tensor:
    """The residual stream as a block takes it: contiguous rows (see CONTIGUOUS_RESIDUAL)."""
    return x.contiguous() if CONTIGUOUS_RESIDUAL else x


def modulated_input(layer: nn.Module, norm: nn.Module, x: torch.Tensor, shift: torch.Tensor,
                    scale: torch.Tensor) -> torch.Tensor:
    """norm(x) * (1 + scale) + shift, the input of `layer` (x [B, N, C], shift / scale [B, 1, C]).

    A quantized layer that fuses this into its quantize kernel (QuantLinear with `norm_eps` set by fusions.py) is
    armed with shift / scale instead and gets x itself; so its caller must pass what this returns straight to the
    layer (reshapes allowed, nothing that reorders tokens)."""
    if getattr(layer, "norm_eps", None) is not None:
        layer.arm_norm_modulate(shift, scale, x.shape[1])
        return x
    return norm(x) * (1 + scale) + shift


def gated_residual(layer: nn.Module, x: torch.Tensor, gate, run, *args) -> torch.Tensor:
    """x + gate * run(*args) (gate None: x + run(*args)), with run's output given x's shape; `layer` is the last
    op of run (an attention's proj, the MLP's fc2), and nothing after it may change values (Dropout at inference
    and reshapes are fine).

    A quantized layer that fuses the add into its GEMM epilogue (QuantLinear with `fuse_residual`, set by fusions.py)
    is armed with x and gate and returns the sum itself: the layer's output is never written on its own, and no
    separate elementwise kernel reads it back."""
    if getattr(layer, "fuse_residual", False):
        layer.arm_residual(x, gate, x.shape[1])
        return run(*args).reshape(x.shape)
    y = run(*args).reshape(x.shape)
    return x + y if gate is None else x + gate * y
