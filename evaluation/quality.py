"""Run presets on the evaluation models and score them: the quality table behind every claim we make."""
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from ..models.pixart import PixArt, pixart_config_from_state_dict
from ..models.tiny_pixart import build_tiny_pixart_state_dict, pseudo_caption
from ..quant_core import (Calibrator, build_quant_layers, describe_model, get_preset, install_quant_layers,
                          replace_layers)
from ..quant_core.metrics import psnr_db
from ..quant_core.temporal import temporal_metrics
from ..standalone.sampler import sample_euler_cfg
from .analyzers import alignment, fidelity_to_data, psnr01, temporal_smoothness, video_alignment
from .toy_models import VIDEO_FRAMES, caption_features, load_toy_pixart, load_toy_stdit, null_features, spread
from .toy_world import all_image_scenes, all_video_scenes, render_video

PRESETS = ["w8a8-naive", "w8a8-pertoken", "w8a8-smoothquant", "w8a8-quarot", "w8a8", "w8a8-fp8", "w6a6",
           "w4a8", "w4a8-g128", "w4a8-g128-fast", "w4a8+plan", "w4a4"]


@dataclass
class EvalModel:
    name: str
    model: torch.nn.Module
    cond: torch.Tensor
    uncond: torch.Tensor
    noise: torch.Tensor
    scenes: Optional[list] = None  # toy-world scenes: enables the analyzers
    plan_samples: Optional[int] = None  # the W4A8 planner samples this many of them (evenly spread); None = all


SEEDED_PROMPTS = ("a red cube on a blue floor", "a small yellow ball in the sky")


def seeded_pixart(seed: int = 0) -> EvalModel:
    """The seeded 2-block PixArt-Σ-architecture model with DiT-like outliers (models/tiny_pixart.py)."""
    sd = build_tiny_pixart_state_dict(seed, hidden=1152, depth=2)
    model = PixArt(**pixart_config_from_state_dict(sd))
    model.load_state_dict(sd)
    prompts = SEEDED_PROMPTS
    noise = torch.randn(len(prompts), 4, 32, 32, generator=torch.Generator().manual_seed(seed))
    return EvalModel("seeded-pixart-1152x2 (outliers)", model.eval(),
                     torch.cat([pseudo_caption(p) for p in prompts]), pseudo_caption(""), noise)


def toy_pixart(n_captions: int = 90) -> Optional[EvalModel]:
    model = load_toy_pixart()
    if model is None:
        return None
    scenes = spread(all_image_scenes(), n_captions)
    noise = torch.randn(len(scenes), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return EvalModel("trained-toy-pixart", model, caption_features(scenes), null_features(1), noise, scenes)


def seeded_stdit(seed: int = 0) -> EvalModel:
    """A seeded OpenSORA 1.0 STDiT (official key layout, outlier channels; models/opensora/tiny.py), 8 frames."""
    from ..models.opensora.checkpoint import config_from_state_dict, model_class, state_dict_for_model
    from ..models.opensora.tiny import build_tiny_opensora_state_dict

    sd = build_tiny_opensora_state_dict("1.0", seed=seed, hidden=288, depth=2, caption_channels=256, token_num=16)
    model = model_class("1.0")(**config_from_state_dict(sd, "1.0"))
    model.load_state_dict(state_dict_for_model(sd, model))
    prompts = SEEDED_PROMPTS
    noise = torch.randn(len(prompts), 4, 8, 16, 16, generator=torch.Generator().manual_seed(seed))
    return EvalModel("seeded-stdit-1.0-288x2 (outliers, 8 frames)", model.eval(),
                     torch.cat([pseudo_caption(p, 16, 256) for p in prompts]), pseudo_caption("", 16, 256), noise)


def toy_stdit(n_captions: int = 120, plan_samples: int = 12) -> Optional[EvalModel]:
    """The trained toy STDiT on n_captions of the 360 video captions (120: every shape, colour and start/end
    pair; one attribute check = 100 / (4 n) points). The planner's sweep (hundreds of partial samplings) runs
    on plan_samples of them, its plan is scored on all."""
    model = load_toy_stdit()
    if model is None:
        return None
    scenes = spread(all_video_scenes(), n_captions)
    noise = torch.randn(len(scenes), 3, VIDEO_FRAMES, 32, 32, generator=torch.Generator().manual_seed(1))
    return EvalModel("trained-toy-stdit (8 frames)", model, caption_features(scenes), null_features(1), noise,
                     scenes, plan_samples)


MODEL_BUILDERS = {"seeded-pixart": seeded_pixart, "seeded-stdit": seeded_stdit, "toy-pixart": toy_pixart,
                  "toy-stdit": toy_stdit}


def evaluation_models(names: Optional[List[str]] = None) -> List[EvalModel]:
    unknown = set(names or []) - set(MODEL_BUILDERS)
    if unknown:
        raise ValueError(f"unknown evaluation models {sorted(unknown)}; choose from {list(MODEL_BUILDERS)}")
    built = (MODEL_BUILDERS[n]() for n in (names or MODEL_BUILDERS))
    return [m for m in built if m is not None]


def to_device(em: EvalModel, device) -> EvalModel:
    em.model.to(device)
    em.cond, em.uncond, em.noise = em.cond.to(device), em.uncond.to(device), em.noise.to(device)
    return em


def _score(em: EvalModel, out: torch.Tensor, ref: torch.Tensor) -> Dict:
    out, ref = out.float().cpu(), ref.float().cpu()
    row = {"psnr_db": psnr_db(ref, out), "alignment": None, "fidelity": None, "temporal": None}
    if out.ndim == 5:  # video [B, C, T, H, W]: frame-to-frame differences vs FP16's
        row["temporal"] = temporal_metrics(ref, out)["frame_diff_psnr_db"]
    if em.scenes is not None and out.ndim == 5:  # toy videos [B, 3, F, H, W]
        videos = out.clamp(-1, 1).transpose(1, 2)
        row["alignment"] = sum(video_alignment(v, s) for v, s in zip(videos, em.scenes)) / len(em.scenes)
        row["fidelity"] = sum(psnr01(render_video(s, v.shape[0], v.shape[-1]), v)
                              for v, s in zip(videos, em.scenes)) / len(em.scenes)
        row["temporal_smoothness"] = sum(temporal_smoothness(v) for v in videos) / len(videos)
    elif em.scenes is not None:
        imgs = out.clamp(-1, 1)
        row["alignment"] = sum(alignment(i, s) for i, s in zip(imgs, em.scenes)) / len(em.scenes)
        row["fidelity"] = sum(fidelity_to_data(i, s) for i, s in zip(imgs, em.scenes)) / len(em.scenes)
    return row


PLAN_BUDGET_BITS = 5.0


def plan_w4a8(em: EvalModel, calib, steps: int, cfg: float):
    """The metric-decoupled W4A8 plan at PLAN_BUDGET_BITS average weight bits (quant_core.planner)."""
    from ..quant_core.planner import PlannerSettings, TorchRunner, plan_mixed_precision

    _, _, layers, fingerprint = describe_model(em.model)
    noise, cond = em.noise, em.cond
    if em.plan_samples is not None and em.plan_samples < len(noise):
        stride = len(noise) // em.plan_samples
        noise, cond = noise[::stride][:em.plan_samples], cond[::stride][:em.plan_samples]

    def sample_fn(model_fn, hook):
        return sample_euler_cfg(model_fn, noise, cond, em.uncond, steps, cfg, on_model_call=hook)

    settings = PlannerSettings(budget=PLAN_BUDGET_BITS, timestep_ranges=4, evaluate=False)
    return plan_mixed_precision(layers, fingerprint, TorchRunner(em.model, sample_fn), get_preset("w4a8"), calib,
                                settings).plan


@torch.no_grad()
def evaluate(em: EvalModel, presets: List[str], steps: int = 20, cfg: float = 4.5,
             make_plan: Optional[Callable] = None, log=print, outputs: Optional[Dict] = None) -> List[Dict]:
    """One row per preset (fp16 first); 'w4a8+plan' runs the planner (make_plan(em, calib, steps, cfg) overrides).
    When `outputs` is a dict, each preset's final latents are stored in it."""
    def sample(hook=None):
        t0 = time.perf_counter()
        out = sample_euler_cfg(em.model, em.noise, em.cond, em.uncond, steps, cfg, on_model_call=hook)
        return out, time.perf_counter() - t0

    _, _, layers, fingerprint = describe_model(em.model)
    cal = Calibrator({n: m for n, (m, _) in layers.items()}, num_buckets=4)
    with cal:
        sample(cal.set_step)
    calib = cal.result(fingerprint)
    ref, seconds = sample()
    fp_bytes = sum(m.weight.numel() * 2 for m, _ in layers.values())
    rows = [{"model": em.name, "preset": "fp16", **_score(em, ref, ref), "seconds": seconds,
             "weight_bytes": fp_bytes}]
    if outputs is not None:
        outputs["fp16"] = ref
    for preset in presets:
        plan = None
        base = preset
        if preset.endswith("+plan"):
            base = preset.split("+")[0]
            plan = (make_plan or plan_w4a8)(em, calib, steps, cfg)
        q_layers, summary = build_quant_layers(em.model, get_preset(base), calib, plan)
        old = install_quant_layers(em.model, q_layers)
        try:
            out, seconds = sample()
        finally:
            replace_layers(em.model, old)
        row = {"model": em.name, "preset": preset, **_score(em, out, ref), "seconds": seconds,
               "weight_bytes": summary["weight_bytes_quantized"]}
        rows.append(row)
        if outputs is not None:
            outputs[preset] = out
        align = "" if row["alignment"] is None else f"  alignment {row['alignment']:5.1f}%"
        log(f"  {preset:18s} PSNR {row['psnr_db']:6.2f} dB{align}  ({seconds:.1f}s)")
    return rows
