"""Temporal consistency of a quantized video against the FP16 one.

Per-frame metrics (PSNR of each frame) miss flicker: a quantized video can be close to the reference frame by
frame and still shimmer, because its errors change from frame to frame. Two numbers catch that:
  * frame-difference error: the frame-to-frame changes d_t = x[t+1] - x[t] of the quantized video against the
    reference's, as a relative L2 (`frame_diff_rel_l2`) and a PSNR over the reference changes' range
    (`frame_diff_psnr_db`); static errors cancel, flicker does not;
  * frame-to-frame cosine: cos(x[t], x[t+1]) of each video (`frame_cosine_fp`, `frame_cosine_q`, means over
    t and batch) and their mean absolute difference (`frame_cosine_abs_diff`): a flickering video is less
    self-similar than its reference.

Layout (chosen for the whole plugin): videos are 5-D [B, C, T, H, W] (ComfyUI's video-latent layout; time on
axis 2), or frames-in-batch IMAGE tensors [B * T, H, W, C] with the frame count given (frames of one video
consecutive). `as_video` converts both to [B, T, N] (features flattened).
"""
from typing import Dict, Optional

import torch

from .metrics import PSNR_IDENTICAL


def as_video(x: torch.Tensor, frames: Optional[int] = None) -> torch.Tensor:
    """[B, T, N] float64 from a 5-D latent [B, C, T, H, W] or a frames-in-batch tensor [B * T, ...]."""
    if frames is None:
        if x.ndim != 5:
            raise ValueError(f"a video latent must be 5-D [B, C, T, H, W]; got shape {tuple(x.shape)} (give `frames` "
                             "for a frames-in-batch tensor)")
        b, _, t = x.shape[:3]
        return x.double().movedim(2, 1).reshape(b, t, -1)
    if frames < 1 or x.shape[0] % frames:
        raise ValueError(f"{x.shape[0]} frames cannot be split into videos of {frames} frames")
    return x.double().reshape(x.shape[0] // frames, frames, -1)


def frames_in_batch(latent: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [B * T, C, H, W] (each video's frames consecutive), for per-frame decoders/previews."""
    b, c, t, h, w = latent.shape
    return latent.movedim(2, 1).reshape(b * t, c, h, w)


def _frame_cosine(v: torch.Tensor) -> torch.Tensor:
    """[B, T-1] cosine of consecutive frames."""
    return torch.nn.functional.cosine_similarity(v[:, 1:], v[:, :-1], dim=-1)


def temporal_metrics(ref: torch.Tensor, test: torch.Tensor, frames: Optional[int] = None) -> Dict[str, float]:
    """Temporal consistency of `test` (quantized) against `ref` (FP16); see the module docstring."""
    r, q = as_video(ref, frames), as_video(test, frames)
    if r.shape != q.shape:
        raise ValueError(f"cannot compare videos of shapes {tuple(ref.shape)} and {tuple(test.shape)}")
    t = r.shape[1]
    out: Dict[str, float] = {"frames": t}
    if t < 2:
        out["note"] = "single frame: no temporal metrics"
        return out
    dr, dq = r[:, 1:] - r[:, :-1], q[:, 1:] - q[:, :-1]
    err = dq - dr
    mse = float(err.pow(2).mean())
    peak = float(dr.max() - dr.min())
    ref_norm = float(torch.linalg.vector_norm(dr))
    out["frame_diff_rel_l2"] = float(torch.linalg.vector_norm(err)) / max(ref_norm, 1e-30)
    out["frame_diff_psnr_db"] = PSNR_IDENTICAL if mse == 0 else (
        10.0 * torch.log10(torch.tensor(max(peak, 1e-30) ** 2 / mse)).item())
    # per transition t -> t+1: which step of the video differs most from the reference's
    per_step = err.pow(2).mean(dim=(0, 2)).sqrt() / dr.pow(2).mean(dim=(0, 2)).sqrt().clamp_min(1e-30)
    out["frame_diff_rel_l2_worst"] = float(per_step.max())
    cos_r, cos_q = _frame_cosine(r), _frame_cosine(q)
    out["frame_cosine_fp"] = float(cos_r.mean())
    out["frame_cosine_q"] = float(cos_q.mean())
    out["frame_cosine_abs_diff"] = float((cos_q - cos_r).abs().mean())
    return out
