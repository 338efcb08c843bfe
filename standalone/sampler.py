"""A small Euler sampler with classifier-free guidance for eps-prediction DiTs (PixArt's discrete schedule).

Same parameterisation as ComfyUI's (k-diffusion) samplers: sigma = sqrt((1 - a_bar) / a_bar), model input
x / sqrt(sigma^2 + 1), model timestep interpolated from log-sigma.
"""
from typing import Callable, Optional, Sequence

import torch

from ..quant_core.calibration import COND, UNCOND


class DiscreteSchedule:
    def __init__(self, beta_start: float = 1e-4, beta_end: float = 0.02, num_timesteps: int = 1000):
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        a_bar = torch.cumprod(1.0 - betas, 0)
        self.log_sigmas = (((1 - a_bar) / a_bar) ** 0.5).log().float()
        self.num_timesteps = num_timesteps

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional model timestep of sigma (linear in log-sigma between table entries)."""
        ls = sigma.float().log()
        dists = ls - self.log_sigmas[:, None]
        low = dists.ge(0).cumsum(0).argmax(0).clamp(max=self.log_sigmas.shape[0] - 2)
        lo, hi = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = ((lo - ls) / (lo - hi)).clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).reshape(sigma.shape)

    def sigmas(self, steps: int) -> torch.Tensor:
        """`steps` sigmas uniform in timestep from the noisiest, then 0."""
        t = torch.linspace(self.num_timesteps - 1, 0, steps)
        s = torch.exp(torch.stack([self._interp_log_sigma(v) for v in t]))
        return torch.cat([s, torch.zeros(1)])

    def _interp_log_sigma(self, t: torch.Tensor) -> torch.Tensor:
        lo = int(t.floor().clamp(0, self.num_timesteps - 1))
        hi = min(lo + 1, self.num_timesteps - 1)
        w = float(t) - lo
        return (1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]


StepHook = Callable[[torch.Tensor, Sequence[int]], None]


@torch.no_grad()
def sample_euler_cfg(model: Callable, noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, steps: int,
                     cfg: float, schedule: Optional[DiscreteSchedule] = None,
                     on_model_call: Optional[StepHook] = None) -> torch.Tensor:
    """Denoise `noise` ([B, C, H, W], unit variance) into a latent. on_model_call(timesteps, branches) runs
    before each model call (calibration uses it). cond/uncond: [B or 1, T, D] text features."""
    schedule = schedule or DiscreteSchedule()
    sigmas = schedule.sigmas(steps).to(noise.device)
    b = noise.shape[0]
    x = noise * sigmas[0]
    ctx = torch.cat([cond.expand(b, -1, -1), uncond.expand(b, -1, -1)]).to(noise.dtype)
    for i in range(steps):
        sigma = sigmas[i]
        t = schedule.timestep(sigma.reshape(1).cpu()).to(noise.device).expand(2 * b)
        if on_model_call is not None:
            on_model_call(t, [COND] * b + [UNCOND] * b)
        inp = torch.cat([x, x]) / (sigma ** 2 + 1) ** 0.5
        eps_c, eps_u = model(inp, t, ctx).chunk(2)
        eps = eps_u + cfg * (eps_c - eps_u)
        x = x + (sigmas[i + 1] - sigma) * eps
    return x
