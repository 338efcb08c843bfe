"""The main job without ComfyUI: calibrate, quantize with several presets, sample FP16 vs each, report.

Runs on the trained toy PixArt (evaluation/weights, real pictures of coloured shapes, scored by the toy-world
analyzers) when it is there, else on the seeded tiny PixArt with DiT-like outliers (latent previews)."""
import json
import pathlib
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..evaluation.quality import SEEDED_PROMPTS as PROMPTS
from ..evaluation.quality import EvalModel, evaluate, seeded_pixart, toy_pixart
from ..quant_core import get_preset
from ..quant_core.visualize import abs_error, latent_preview, side_by_side

DEFAULT_PRESETS = ("w8a8", "w8a8-naive", "w6a6", "w4a8", "w4a8-g128", "w4a4")
MODELS = ("auto", "toy", "seeded")


def build_demo_model() -> torch.nn.Module:
    """The seeded outlier model itself (captions: PROMPTS through models.tiny_pixart.pseudo_caption)."""
    return seeded_pixart().model


def demo_model(which: str = "auto", n_captions: int = 4) -> EvalModel:
    if which not in MODELS:
        raise ValueError(f"unknown demo model {which!r}; choose one of {MODELS}")
    if which in ("auto", "toy"):
        toy = toy_pixart(n_captions)
        if toy is not None:
            return toy
        if which == "toy":
            raise ValueError("the trained toy model is missing (evaluation/weights/toy_pixart.safetensors)")
    return seeded_pixart()


def _viewable(em: EvalModel, x: torch.Tensor) -> torch.Tensor:
    """[B, H, W, 3] in 0..1: pixel-space toy images as they are, latents as previews."""
    if em.scenes is not None:
        return F_interp(((x.clamp(-1, 1) + 1) / 2).float())
    return latent_preview(x)


def F_interp(img: torch.Tensor, scale: int = 4) -> torch.Tensor:
    return torch.nn.functional.interpolate(img, scale_factor=scale, mode="nearest").permute(0, 2, 3, 1)


@torch.no_grad()
def run_demo(out_dir: pathlib.Path, presets: Sequence[str] = DEFAULT_PRESETS, steps: int = 20, cfg: float = 4.5,
             model: str = "auto", log=print, em: Optional[EvalModel] = None) -> Dict:
    for p in presets:
        get_preset(p)  # unknown names fail before any work
    out_dir.mkdir(parents=True, exist_ok=True)
    em = em or demo_model(model)
    log(f"model: {em.name}; calibrating and sampling {len(presets)} presets, {steps} steps")
    outputs: Dict[str, torch.Tensor] = {}
    rows = evaluate(em, list(presets), steps=steps, cfg=cfg, log=log, outputs=outputs)
    ref = _viewable(em, outputs["fp16"][:1])
    save_comparison(out_dir / "compare.png", ref, [_viewable(em, outputs[p][:1]) for p in presets], list(presets))
    report = {"model": em.name, "steps": steps, "cfg": cfg, "latent": list(em.noise.shape),
              "compare_png": "rows = presets in order; columns = FP16 | quantized | error heat map", "rows": rows}
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    return report


def save_comparison(path: pathlib.Path, ref: torch.Tensor, outs: List[torch.Tensor], labels: List[str]) -> None:
    """One row per preset: FP16 | quantized | error heat map on a scale shared by all rows, labelled."""
    vmax = max(float(abs_error(ref, o).max()) for o in outs)
    grid = torch.cat([side_by_side(ref, o, vmax=vmax)[0] for o in outs], dim=0)
    img = Image.fromarray((grid.numpy() * 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(img)
    row_h = ref.shape[1]
    for i, label in enumerate(labels):
        draw.text((4, i * row_h + 4), f"{label}  (FP16 | quantized | error)", fill=(255, 255, 255))
    img.save(path)


def format_table(report: Dict) -> str:
    lines = [f"{'preset':12s} {'PSNR dB':>8s} {'align %':>8s} {'weights MB':>11s} {'seconds':>8s}"]
    for r in report["rows"]:
        align = "-" if r["alignment"] is None else f"{r['alignment']:.1f}"
        lines.append(f"{r['preset']:12s} {r['psnr_db']:8.2f} {align:>8s} {r['weight_bytes'] / 1e6:11.2f} "
                     f"{r['seconds']:8.2f}")
    return "\n".join(lines)
