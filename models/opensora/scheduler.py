"""OpenSORA's schedulers mapped onto ComfyUI's model sampling (plain torch; no ComfyUI import).

OpenSORA 1.0 - IDDPM: betas = linspace(1e-4, 0.02, 1000) (the "linear" schedule of improved-diffusion),
eps prediction with a learned variance. ComfyUI's ModelSamplingDiscrete names this schedule "sqrt_linear"
(its "linear" is the LDM scaled-linear schedule), with the same start/end, so
    sampling_settings = IDDPM_SAMPLING_SETTINGS, model type EPS.
The learned variance channels are dropped (STDiT.forward returns eps only); ComfyUI's samplers use their own
step variances. The official CFG mixes only the first 3 of the 4 eps channels (a quirk of its
forward_with_cfg); ComfyUI guides all channels.

OpenSORA 1.2 - rectified flow: x_t = (1 - s) x0 + s noise with s = t / 1000, velocity target x0 - noise, Euler
steps on s uniform in (0, 1], remapped by the "timestep transform"
    s' = r s / (1 + (r - 1) s),  r = sqrt(H * W / 512^2) * sqrt(latent frames)   (pixels; 1 for one frame)
which is exactly ComfyUI's flow `shift` (time_snr_shift). So: ComfyUI model type FLOW (ModelSamplingDiscreteFlow,
multiplier 1000, shift r) with the model output negated (ComfyUI's flow models predict noise - x0).
"""
import math
from typing import Callable, Optional, Sequence

import torch

IDDPM_SAMPLING_SETTINGS = {"beta_schedule": "sqrt_linear", "linear_start": 1e-4, "linear_end": 0.02,
                           "timesteps": 1000}
RFLOW_NUM_TIMESTEPS = 1000
RFLOW_BASE_RESOLUTION = 512 * 512
VAE12_MICRO_FRAMES, VAE12_MICRO_LATENT, VAE12_TIME_FACTOR = 17, 5, 4


def iddpm_betas(num_timesteps: int = 1000) -> torch.Tensor:
    """improved-diffusion's named 'linear' schedule (scaled for other step counts, as the official code)."""
    scale = 1000 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def iddpm_sigmas(num_timesteps: int = 1000) -> torch.Tensor:
    """k-diffusion sigmas sqrt((1 - a_bar) / a_bar) of the IDDPM schedule (what ComfyUI's table holds)."""
    a_bar = torch.cumprod(1.0 - iddpm_betas(num_timesteps), 0)
    return ((1 - a_bar) / a_bar).sqrt()


def latent_frames(num_frames: int, version: str) -> int:
    """Latent frames of a `num_frames` video: 1.0 encodes each frame with the SD VAE; the 1.2 VAE encodes
    17-frame chunks into 5 latent frames (a remainder of r frames into ceil(r / 4))."""
    if num_frames < 1:
        raise ValueError("a video needs at least one frame")
    if version == "1.0":
        return num_frames
    if version == "1.2":
        full, rest = divmod(num_frames, VAE12_MICRO_FRAMES)
        return full * VAE12_MICRO_LATENT + math.ceil(rest / VAE12_TIME_FACTOR)
    raise ValueError(f"unknown OpenSORA version {version!r}")


def official_flow_shift(height: float, width: float, frames_latent: int) -> float:
    """OpenSORA 1.2's timestep-transform ratio for a video of height x width pixels and `frames_latent` latent
    frames (the official code uses num_frames // 17 * 5, i.e. the latent frame count, and 1 for images)."""
    ratio_space = math.sqrt(height * width / RFLOW_BASE_RESOLUTION)
    ratio_time = math.sqrt(max(1, frames_latent))
    return ratio_space * ratio_time


def shift_sigma(s, shift: float):
    return shift * s / (1 + (shift - 1) * s)


StepHook = Callable[[torch.Tensor, Sequence[int]], None]


@torch.no_grad()
def sample_flow_euler_cfg(model: Callable, noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                          steps: int, cfg: float, shift: float = 1.0, on_model_call: Optional[StepHook] = None,
                          **model_kwargs) -> torch.Tensor:
    """The official rectified-flow sampler (Euler, CFG on the velocity) for a plain STDiT3: noise [B, C, T, H, W]
    -> x0. on_model_call(timesteps, branches) runs before each model call (calibration uses it)."""
    from ...quant_core.calibration import COND, UNCOND

    b = noise.shape[0]
    sig = [shift_sigma(1.0 - i / steps, shift) for i in range(steps)] + [0.0]
    x = noise.clone()
    ctx = torch.cat([cond.expand(b, -1, -1), uncond.expand(b, -1, -1)]).to(noise.dtype)
    for i in range(steps):
        t = torch.full((2 * b,), sig[i] * RFLOW_NUM_TIMESTEPS, device=noise.device)
        if on_model_call is not None:
            on_model_call(t.cpu(), [COND] * b + [UNCOND] * b)
        v_c, v_u = model(torch.cat([x, x]), t, ctx, **model_kwargs).chunk(2)
        x = x + (v_u + cfg * (v_c - v_u)) * (sig[i] - sig[i + 1])
    return x
