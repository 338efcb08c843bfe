"""Side-by-side comparison images (plain torch, IMAGE layout [B, H, W, 3] in 0..1)."""
from typing import Optional

import torch
import torch.nn.functional as F


def latent_preview(latent: torch.Tensor, scale: int = 8) -> torch.Tensor:
    """A viewable IMAGE of a latent [B, C, H, W] (first three channels, each normalised) when no VAE is given."""
    x = latent.float()[:, :3]
    if x.shape[1] < 3:
        x = torch.cat([x, x[:, :1].expand(-1, 3 - x.shape[1], -1, -1)], 1)
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1e-8)
    return F.interpolate(x, scale_factor=scale, mode="nearest").permute(0, 2, 3, 1).contiguous()


def abs_error(ref: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """[B, H, W] |ref - test| averaged over colour."""
    return (ref.float() - test.float()).abs().mean(-1)


def error_heatmap(ref: torch.Tensor, test: torch.Tensor, vmax: Optional[float] = None) -> torch.Tensor:
    """|ref - test| as black -> red -> yellow -> white, scaled to vmax (default: each image's own maximum;
    pass one vmax to make several heat maps comparable)."""
    err = abs_error(ref, test)
    if vmax is None:
        err = err / err.flatten(1).amax(1).clamp_min(1e-8)[:, None, None]
    else:
        err = (err / max(vmax, 1e-8)).clamp(0, 1)
    r = (err * 3).clamp(0, 1)
    g = (err * 3 - 1).clamp(0, 1)
    b = (err * 3 - 2).clamp(0, 1)
    return torch.stack([r, g, b], -1)


def side_by_side(ref: torch.Tensor, test: torch.Tensor, gap: int = 4, vmax: Optional[float] = None) -> torch.Tensor:
    """[B, H, 3W + 2 gap, 3]: reference | quantized | error heat map."""
    ref, test = ref.float().cpu(), test.float().cpu()
    if ref.shape != test.shape:
        raise ValueError(f"cannot compare images of shapes {tuple(ref.shape)} and {tuple(test.shape)}")
    sep = torch.ones(ref.shape[0], ref.shape[1], gap, 3)
    return torch.cat([ref, sep, test, sep, error_heatmap(ref, test, vmax)], dim=2).clamp(0, 1)
