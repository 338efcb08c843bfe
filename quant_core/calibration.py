"""Calibration: forward hooks on every quantizable linear record input statistics per timestep bucket and per
CFG branch (cond / uncond), without changing the model's output.

The sampler tells the Calibrator, before each model call, the timestep of each batch row and which rows are
conditional or unconditional (`set_step`). Timesteps (0..num_timesteps, the model's own time axis, as
ComfyUI's model_sampling.timestep(sigma) gives it) fall in equal-width buckets; bucket 0 is the cleanest.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

COND, UNCOND = 0, 1
BRANCH_NAMES = ("cond", "uncond")
# token_stats columns: tokens seen, sum of per-token abs-max, largest per-token abs-max
TOKENS, TOKEN_ABSMAX_SUM, TOKEN_ABSMAX_MAX = 0, 1, 2


def bucket_edges(num_buckets: int, num_timesteps: float = 1000.0) -> List[float]:
    return [num_timesteps * i / num_buckets for i in range(num_buckets + 1)]


def bucket_of(t: torch.Tensor, num_buckets: int, num_timesteps: float = 1000.0) -> torch.Tensor:
    """Bucket index of model timesteps t (any shape); the last bucket is the noisiest."""
    b = torch.floor(t.float() / num_timesteps * num_buckets).long()
    return b.clamp(0, num_buckets - 1)


@dataclass
class CalibrationData:
    """What Calibrate hands to Quantize and the Planner (the VIDITQ_CALIB type)."""

    fingerprint: Dict
    num_buckets: int
    absmax: Dict[str, torch.Tensor]  # layer -> [buckets, 2, K] input channel abs-max (0 = never seen)
    token_stats: Dict[str, torch.Tensor]  # layer -> [buckets, 2, 3]
    groups: Dict[str, str] = field(default_factory=dict)  # layer -> group (self_attn, cross_attn, mlp, ...)
    num_timesteps: float = 1000.0
    settings: Dict = field(default_factory=dict)  # how it was made: sampler, steps, cfg, seed, ...

    def channel_absmax(self, layer: str) -> torch.Tensor:
        """[K] abs-max over all timesteps and both branches: the static statistic smoothing uses."""
        return self.absmax[layer].amax(dim=(0, 1))

    def tensor_absmax(self, layer: str) -> float:
        return float(self.absmax[layer].max())

    def branches_seen(self) -> List[str]:
        any_layer = next(iter(self.token_stats.values()))
        seen = any_layer[:, :, TOKENS].sum(0) > 0
        return [BRANCH_NAMES[i] for i in range(2) if seen[i]]

    def summary(self) -> Dict:
        return {
            "layers": len(self.absmax),
            "buckets": self.num_buckets,
            "branches": self.branches_seen(),
            "fingerprint": self.fingerprint,
            "settings": self.settings,
        }


class Calibrator:
    """Records per-layer input statistics while a sampler runs the model.

        with Calibrator(layers, num_buckets=4) as cal:
            for step: cal.set_step(timesteps, branches); model(...)
        data = cal.result(fingerprint)
    """

    def __init__(self, layers: Dict[str, nn.Module], num_buckets: int = 4, num_timesteps: float = 1000.0,
                 groups: Optional[Dict[str, str]] = None):
        if num_buckets < 1:
            raise ValueError("num_buckets must be >= 1")
        self.layers = layers
        self.num_buckets = num_buckets
        self.num_timesteps = num_timesteps
        self.groups = dict(groups or {})
        self.absmax: Dict[str, torch.Tensor] = {}
        self.token_stats: Dict[str, torch.Tensor] = {}
        self._handles = []
        self._row_bucket: Optional[torch.Tensor] = None
        self._row_branch: Optional[torch.Tensor] = None
        self.calls = 0

    def set_step(self, timesteps: torch.Tensor, branches: Optional[Sequence[int]] = None) -> None:
        """timesteps: [B] model timesteps of this call; branches: COND/UNCOND per row (None = all cond)."""
        t = torch.as_tensor(timesteps).reshape(-1).detach().cpu()
        self._row_bucket = bucket_of(t, self.num_buckets, self.num_timesteps)
        if branches is None:
            branches = [COND] * len(t)
        if len(branches) != len(t):
            raise ValueError(f"{len(branches)} branch labels for a batch of {len(t)}")
        self._row_branch = torch.as_tensor(list(branches), dtype=torch.long)
        self.calls += 1

    def __enter__(self):
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module, args):
            self._record(name, args[0])

        return hook

    @torch.no_grad()
    def _record(self, name: str, x: torch.Tensor) -> None:
        if self._row_bucket is None:
            raise RuntimeError("Calibrator.set_step() must be called before each model call")
        k = x.shape[-1]
        b = len(self._row_bucket)
        if x.numel() % (b * k):  # cannot attribute rows to batch entries: count all as the first row's
            rows = x.reshape(1, -1, k).abs().float()
            buckets, branches = self._row_bucket[:1], self._row_branch[:1]
        else:  # [B, N, K], or ComfyUI's flattened [1, B*T, K] text tokens (batch-major)
            rows = x.reshape(b, -1, k).abs().float()
            buckets, branches = self._row_bucket, self._row_branch
        if name not in self.absmax:
            self.absmax[name] = torch.zeros(self.num_buckets, 2, k)
            self.token_stats[name] = torch.zeros(self.num_buckets, 2, 3, dtype=torch.float64)
        chan = rows.amax(dim=1).cpu()  # [B, K]
        tok = rows.amax(dim=2).cpu()  # [B, T]
        for i in range(rows.shape[0]):
            bk, br = int(buckets[i]), int(branches[i])
            self.absmax[name][bk, br] = torch.maximum(self.absmax[name][bk, br], chan[i])
            st = self.token_stats[name][bk, br]
            st[TOKENS] += tok.shape[1]
            st[TOKEN_ABSMAX_SUM] += float(tok[i].sum())
            st[TOKEN_ABSMAX_MAX] = max(float(st[TOKEN_ABSMAX_MAX]), float(tok[i].max()))

    def result(self, fingerprint: Dict, settings: Optional[Dict] = None) -> CalibrationData:
        missing = [n for n in self.layers if n not in self.absmax]
        if missing:
            raise RuntimeError(f"calibration saw no input for {len(missing)} layers (e.g. {missing[0]}); "
                               "did the sampler run the model?")
        return CalibrationData(fingerprint=fingerprint, num_buckets=self.num_buckets, absmax=dict(self.absmax),
                               token_stats=dict(self.token_stats), groups=self.groups,
                               num_timesteps=self.num_timesteps, settings=dict(settings or {}))

