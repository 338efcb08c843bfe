"""Static-dynamic channel balancing: a static smoothing vector plus a deterministic block-Hadamard rotation.

For y = x W^T, with s the smoothing vector and R = diag(signs) H (H block-diagonal, orthonormal, symmetric):
    x_hat = (x * signs / s) H          (run time: one per-channel multiply, then H, fused in the quantize kernel)
    W_hat = (W * s * signs) H          (offline: folded into the stored weight)
so x_hat W_hat^T = x W^T exactly in real arithmetic; only quantization sees the balanced tensors.
"""
import hashlib
from typing import Optional, Tuple

import torch

from ..kernels.reference import block_hadamard

_EPS = 1e-5


def smoothing_vector(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha) (SmoothQuant's convention); 1 for channels never seen."""
    a = act_absmax.float().clamp_min(_EPS)
    w = weight.detach().float().abs().amax(dim=0).clamp_min(_EPS)
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    return torch.where(act_absmax > 0, s, torch.ones_like(s))


def hadamard_block_for(in_features: int, cap: int) -> int:
    """Largest power of two <= cap that divides in_features (1152 -> 128, 4608 -> 128 with cap 128)."""
    b = 1
    while b * 2 <= cap and in_features % (b * 2) == 0:
        b *= 2
    return b


def rotation_signs(seed: int, layer_name: str, in_features: int) -> torch.Tensor:
    """Random +-1 per input channel, a pure function of (seed, layer name): the same on every load."""
    digest = hashlib.sha256(f"{seed}:{layer_name}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % (2 ** 63))
    return torch.where(torch.rand(in_features, generator=g) < 0.5, -1.0, 1.0)


def balance(weight: torch.Tensor, smooth: Optional[torch.Tensor], signs: Optional[torch.Tensor],
            had_block: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Fold smoothing and rotation into the weight. Returns (W_hat float32, activation multiplier or None)."""
    w = weight.detach().float()
    mult = None
    if smooth is not None:
        w = w * smooth[None, :]
        mult = 1.0 / smooth
    if signs is not None:
        w = w * signs[None, :]
        mult = signs.clone() if mult is None else mult * signs
    if had_block > 1:
        w = block_hadamard(w, had_block)
    return w, mult


def balance_activation(x: torch.Tensor, mult: Optional[torch.Tensor], had_block: int) -> torch.Tensor:
    """What the fused quantize kernel applies before quantizing (reference, for tests and simulation)."""
    if mult is not None:
        x = x * mult
    return block_hadamard(x, had_block) if had_block > 1 else x
