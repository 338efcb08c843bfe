"""The main job without ComfyUI: calibrate, quantize with several presets, sample FP16 vs each, report."""
import json
import pathlib
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..models.pixart import PixArt, pixart_config_from_state_dict
from ..models.tiny_pixart import build_tiny_pixart_state_dict, pseudo_caption
from ..quant_core import Calibrator, build_quant_layers, describe_model, get_preset, replace_layers
from ..quant_core.metrics import compare
from ..quant_core.visualize import abs_error, latent_preview, side_by_side
from .sampler import sample_euler_cfg

DEFAULT_PRESETS = ("w8a8", "w8a8-naive", "w6a6", "w4a8", "w4a8-g128", "w4a4")
PROMPTS = ("a red cube on a blue floor", "a small yellow ball in the sky")


def build_demo_model(seed: int = 0, depth: int = 2, hidden: int = 1152) -> PixArt:
    """The built-in model: a seeded PixArt-Σ-architecture DiT with DiT-like outliers (models/tiny_pixart.py)."""
    sd = build_tiny_pixart_state_dict(seed, hidden=hidden, depth=depth)
    model = PixArt(**pixart_config_from_state_dict(sd))
    model.load_state_dict(sd)
    return model.eval()


@torch.no_grad()
def run_demo(out_dir: pathlib.Path, presets: Sequence[str] = DEFAULT_PRESETS, steps: int = 20, cfg: float = 4.5,
             latent_size: int = 32, seed: int = 0, depth: int = 2, model: Optional[PixArt] = None,
             log=print) -> Dict:
    for p in presets:
        get_preset(p)  # unknown names fail before any work
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model or build_demo_model(seed, depth)
    conds = torch.cat([pseudo_caption(p) for p in PROMPTS])
    uncond = pseudo_caption("")
    noise = torch.randn(len(PROMPTS), 4, latent_size, latent_size, generator=torch.Generator().manual_seed(seed))

    def sample(m):
        t0 = time.perf_counter()
        out = sample_euler_cfg(m, noise, conds, uncond, steps, cfg)
        return out, time.perf_counter() - t0

    _, variant, layers, fingerprint = describe_model(model)
    calibrator = Calibrator({n: m for n, (m, _) in layers.items()}, num_buckets=4)
    t0 = time.perf_counter()
    with calibrator:
        sample_euler_cfg(model, noise, conds, uncond, steps, cfg, on_model_call=calibrator.set_step)
    calib = calibrator.result(fingerprint, {"steps": steps, "cfg": cfg, "seed": seed})
    log(f"calibrated {len(layers)} linears of a {depth}-block {variant} in {time.perf_counter() - t0:.1f}s")

    ref, seconds_fp = sample(model)
    rows: List[Dict] = []
    previews = []
    for name in presets:
        layers_q, summary = build_quant_layers(model, get_preset(name), calib)
        originals = replace_layers(model, layers_q)
        try:
            out, seconds_q = sample(model)
        finally:
            replace_layers(model, originals)
        row = {"preset": name, **compare(ref, out), "seconds_fp": seconds_fp, "seconds_q": seconds_q,
               "weight_bytes_fp16": summary["weight_bytes_fp16"],
               "weight_bytes_quantized": summary["weight_bytes_quantized"]}
        rows.append(row)
        previews.append(latent_preview(out[:1]))
        log(f"  {name:10s} PSNR {row['psnr_db']:6.2f} dB  rel-L2 {row['rel_l2']:.4f}  cos {row['cosine']:.5f}")
    save_comparison(out_dir / "compare.png", latent_preview(ref[:1]), previews, list(presets))
    report = {"model": f"tiny {variant} (seeded, {depth} blocks, outlier statistics)", "steps": steps, "cfg": cfg,
              "latent": [len(PROMPTS), 4, latent_size, latent_size], "fingerprint": fingerprint,
              "compare_png": "rows = presets in order; columns = FP16 | quantized | error heat map (latent previews)",
              "rows": rows}
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
    lines = [f"{'preset':12s} {'PSNR dB':>8s} {'rel-L2':>8s} {'cosine':>8s} {'weights MB':>11s} {'s (q)':>7s}"]
    for r in report["rows"]:
        lines.append(f"{r['preset']:12s} {r['psnr_db']:8.2f} {r['rel_l2']:8.4f} {r['cosine']:8.5f} "
                     f"{r['weight_bytes_quantized'] / 1e6:11.1f} {r['seconds_q']:7.2f}")
    return "\n".join(lines)
