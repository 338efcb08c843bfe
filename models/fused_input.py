"""The one hook our blocks give the fusions of quant_core/fusions.py: the modulated LayerNorm input of a linear."""
import torch
import torch.nn as nn


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
