"""Run presets on the evaluation models and score them: the quality table behind every claim we make."""
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from ..models.pixart import PixArt, pixart_config_from_state_dict
from ..models.tiny_pixart import build_tiny_pixart_state_dict, pseudo_caption
from ..quant_core import Calibrator, build_quant_layers, describe_model, get_preset, replace_layers
from ..quant_core.metrics import psnr_db
from ..standalone.sampler import sample_euler_cfg
from .analyzers import alignment, fidelity_to_data
from .toy_models import caption_features, load_toy_pixart, null_features
from .toy_world import all_image_scenes

PRESETS = ["w8a8-naive", "w8a8-pertoken", "w8a8-smoothquant", "w8a8-quarot", "w8a8", "w8a8-fp8", "w6a6",
           "w4a8", "w4a8-g128", "w4a8+plan", "w4a4"]


@dataclass
class EvalModel:
    name: str
    model: torch.nn.Module
    cond: torch.Tensor
    uncond: torch.Tensor
    noise: torch.Tensor
    scenes: Optional[list] = None  # toy-world scenes: enables the analyzers


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


def toy_pixart(n_captions: int = 30) -> Optional[EvalModel]:
    model = load_toy_pixart()
    if model is None:
        return None
    scenes = all_image_scenes()[:: max(1, len(all_image_scenes()) // n_captions)][:n_captions]
    noise = torch.randn(len(scenes), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return EvalModel("trained-toy-pixart", model, caption_features(scenes), null_features(1), noise, scenes)


def evaluation_models() -> List[EvalModel]:
    return [m for m in (seeded_pixart(), toy_pixart()) if m is not None]


def _score(em: EvalModel, out: torch.Tensor, ref: torch.Tensor) -> Dict:
    row = {"psnr_db": psnr_db(ref, out), "alignment": None, "fidelity": None, "temporal": None}
    if em.scenes is not None:
        imgs = out.clamp(-1, 1)
        row["alignment"] = sum(alignment(i, s) for i, s in zip(imgs, em.scenes)) / len(em.scenes)
        row["fidelity"] = sum(fidelity_to_data(i, s) for i, s in zip(imgs, em.scenes)) / len(em.scenes)
    return row


@torch.no_grad()
def evaluate(em: EvalModel, presets: List[str], steps: int = 20, cfg: float = 4.5,
             make_plan: Optional[Callable] = None, log=print, outputs: Optional[Dict] = None) -> List[Dict]:
    """One row per preset (fp16 first). make_plan(model, calib, sample_fn) -> QuantPlan for 'w4a8+plan'.
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
            if make_plan is None:
                log(f"  {preset}: skipped (no planner available)")
                continue
            base = preset.split("+")[0]
            plan = make_plan(em.model, calib, sample)
        q_layers, summary = build_quant_layers(em.model, get_preset(base), calib, plan)
        old = replace_layers(em.model, q_layers)
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
