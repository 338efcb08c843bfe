"""DiT memory benchmark (GPU only; never run in CI): weight bytes and peak allocated memory, FP16 vs quantized.

A PixArt-Σ-size DiT (28 blocks, hidden 1152, T5 features 4096, random weights with the seeded outlier statistics
of models/tiny_pixart.py) in plain torch (models/pixart.py), fp16 on the GPU. For FP16, W8A8, W4A8 and W4A8+plan
(MLP fc1/fc2 at 8 bits, the rest at 4) it measures
  * dit_weight_bytes: every tensor the DiT holds on the GPU (quantized codes, scales, smoothing/rotation vectors,
    biases, the non-quantized layers), with a breakdown by kind;
  * load_peak_bytes: peak allocated while ViDiT-Q's loader builds the model from a quantized .safetensors (the
    model is built on the meta device, so the FP16 weights of quantized layers never exist);
  * peak_bytes: peak allocated during one sampling step at 1024 px (latent 128x128, batch 2 = CFG cond/uncond,
    120 text tokens), weights included; and the step's wall time.
Quantization runs without calibration (rotation only): calibration changes the values of act_mult, not its size.
Writes bench/results/memory_<gpu>.json and prints a table.

    python bench/bench_memory.py                 # the full-size run (about 1-2 minutes on an H100/H200)
    python bench/bench_memory.py --dry           # CPU, 1 block, tiny latent: checks this script only
"""
import argparse
import gc
import json
import os
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=28)
    p.add_argument("--latent", type=int, default=128, help="latent height = width (1024 px = 128)")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument("--variants", default="fp16,w8a8,w4a8,w4a8+plan")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--dry", action="store_true", help="CPU, 1 block, latent 16: checks the script only")
    return p.parse_args()


ARGS = _parse()

import torch  # noqa: E402

if not ARGS.dry and not torch.cuda.is_available():
    print("bench_memory.py measures GPU memory and needs a CUDA GPU; none found. Use --dry to check the script "
          "on the CPU.")
    sys.exit(2)


def _import_pkg():
    from _viditq import import_viditq  # bench/_viditq.py, beside this script

    import_viditq()


_import_pkg()
from viditq.models.pixart import PixArt, pixart_config_from_state_dict  # noqa: E402
from viditq.models.tiny_pixart import build_tiny_pixart_state_dict  # noqa: E402
from viditq.quant_core import QuantLinear, QuantPlan, build_quant_layers, describe_model, get_preset  # noqa: E402
from viditq.kernels import resolve_backend  # noqa: E402
from viditq.quant_core.checkpoint import load_quantized, save_quantized  # noqa: E402

DEV = torch.device("cpu" if ARGS.dry else "cuda")
DTYPE = torch.float16
DEPTH = 1 if ARGS.dry else ARGS.depth
LATENT = 16 if ARGS.dry else ARGS.latent
TOKENS, CAPTION = 120, 4096
MB = 1e6


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def reset_peak():
    gc.collect()
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def allocated() -> int:
    return torch.cuda.memory_allocated() if DEV.type == "cuda" else 0


def peak() -> int:
    return torch.cuda.max_memory_allocated() if DEV.type == "cuda" else 0


def breakdown(model: torch.nn.Module) -> dict:
    """Bytes of the DiT's tensors by kind (views of one storage counted once)."""
    out = {"quantized_codes": 0, "weight_scales_zeros": 0, "act_mult": 0, "static_scales": 0,
           "quantized_layer_bias": 0, "fp_layers": 0}
    kinds = {"qweight": "quantized_codes", "w_scale": "weight_scales_zeros", "w_zero": "weight_scales_zeros",
             "act_mult": "act_mult", "static_scale": "static_scales", "bias": "quantized_layer_bias"}
    quant = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    seen = set()
    for key, t in model.state_dict().items():
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset())
        if ptr in seen:
            continue
        seen.add(ptr)
        parent, _, attr = key.rpartition(".")
        kind = kinds[attr] if parent in quant else "fp_layers"
        out[kind] += t.numel() * t.element_size()
    out["total"] = sum(out.values())
    return out


def step_inputs():
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, 4, LATENT, LATENT, generator=g).to(DEV, DTYPE)
    t = torch.tensor([700.0, 700.0], device=DEV)
    ctx = (torch.randn(2, TOKENS, CAPTION, generator=g) * 0.1).to(DEV, DTYPE)
    return x, t, ctx


@torch.no_grad()
def measure_step(model) -> dict:
    x, t, ctx = step_inputs()
    model(x, t, ctx)  # warm-up: kernel compilation / autotuning, cuDNN/SDPA selection
    sync()
    reset_peak()
    base = allocated()
    t0 = time.perf_counter()
    y = model(x, t, ctx)
    sync()
    seconds = time.perf_counter() - t0
    assert torch.isfinite(y).all(), "non-finite output"
    return {"peak_bytes": peak(), "step_activation_peak_bytes": peak() - base, "step_seconds": seconds}


def fp16_model():
    sd = build_tiny_pixart_state_dict(0, hidden=1152, depth=DEPTH, caption_channels=CAPTION, token_num=TOKENS)
    with torch.device("meta"):
        model = PixArt(**pixart_config_from_state_dict(sd))
    model.load_state_dict({k: v.to(DEV, DTYPE) for k, v in sd.items()}, assign=True)
    del sd
    return model.eval()


def plan_for(model) -> QuantPlan:
    _, _, layers, fingerprint = describe_model(model)
    return QuantPlan(fingerprint=fingerprint, layers={n: {"w_bits": 8} for n in layers if ".mlp." in n},
                     base_preset="w4a8", info={"rule": "mlp fc1/fc2 at 8 bits, attention at 4"})


def main():
    t_start = time.time()
    variants = [v.strip() for v in ARGS.variants.split(",")]
    rows, notes, files = [], [], {}
    tmp = tempfile.mkdtemp(prefix="vidit_q_mem_")
    reset_peak()
    model = fp16_model()
    print(f"built a {DEPTH}-block PixArt-Σ-size DiT in fp16 on {DEV} ({time.time() - t_start:.0f}s)", flush=True)
    fp_row = None
    if "fp16" in variants:
        b = breakdown(model)
        fp_row = {"variant": "fp16", "dit_weight_bytes": b["total"], **measure_step(model), "breakdown": b,
                  "load_peak_bytes": None, "backend": "torch (cuBLAS)" if DEV.type == "cuda" else "torch"}
        rows.append(fp_row)
        print(f"fp16: weights {b['total'] / MB:.1f} MB, step peak {fp_row['peak_bytes'] / MB:.1f} MB", flush=True)
    for v in variants:
        if v == "fp16":
            continue
        preset = v.split("+")[0]
        plan = plan_for(model) if v.endswith("+plan") else None
        t0 = time.time()
        layers, summary = build_quant_layers(model, get_preset(preset), None, plan, ARGS.backend)
        files[v] = save_quantized(os.path.join(tmp, v.replace("+", "_") + ".safetensors"), model, layers, summary)
        del layers
        print(f"{v}: quantized and saved in {time.time() - t0:.0f}s ({files[v].stat().st_size / MB:.1f} MB file)",
              flush=True)
    fp_weight_bytes = fp_row["dit_weight_bytes"] if fp_row else breakdown(model)["total"]
    del model
    reset_peak()
    for v, path in files.items():
        reset_peak()
        before = allocated()
        try:
            qmodel, ckpt = load_quantized(path, device=DEV, backend=ARGS.backend, dtype=DTYPE)
        except Exception as e:
            notes.append(f"{v}: load failed: {type(e).__name__}: {e}")
            continue
        sync()
        load_peak = peak() - before
        b = breakdown(qmodel)
        row = {"variant": v, "dit_weight_bytes": b["total"], "load_peak_bytes": load_peak, "breakdown": b}
        try:
            row.update(measure_step(qmodel))
            row["backend"] = resolve_backend(ARGS.backend, DEV)
        except Exception as e:  # a kernel problem must not hide the weight figures
            notes.append(f"{v}: step with backend {ARGS.backend} failed ({type(e).__name__}: {e}); torch reference")
            for m in qmodel.modules():
                if isinstance(m, QuantLinear):
                    m.backend = "torch"
            row.update(measure_step(qmodel))
            row["backend"] = "torch"
        rows.append(row)
        print(f"{v}: weights {b['total'] / MB:.1f} MB (x{fp_weight_bytes / b['total']:.2f} smaller), load peak "
              f"{load_peak / MB:.1f} MB, step peak {row['peak_bytes'] / MB:.1f} MB", flush=True)
        del qmodel, ckpt
    for r in rows:
        r["weight_reduction_vs_fp16"] = round(fp_weight_bytes / r["dit_weight_bytes"], 3)
        if fp_row:
            r["peak_reduction_vs_fp16"] = round(fp_row["peak_bytes"] / r["peak_bytes"], 3) if r["peak_bytes"] else None
    targets = {"w8a8": 2.0, "w4a8": 3.5}
    for r in rows:
        if r["variant"] in targets:
            b = r["breakdown"]
            overhead = {k: b[k] for k in ("fp_layers", "weight_scales_zeros", "act_mult", "quantized_layer_bias",
                                          "static_scales")}
            codes_only = fp_weight_bytes / max(1, b["quantized_codes"] + b["fp_layers"])
            r["target_reduction"] = targets[r["variant"]]
            r["meets_target"] = r["weight_reduction_vs_fp16"] >= targets[r["variant"]]
            r["what_keeps_it_from_target"] = {
                "bytes_beyond_the_codes": overhead,
                "reduction_with_codes_and_fp_layers_only": round(codes_only, 3),
            }
    gname = torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu-dry"
    slug = "".join(ch if ch.isalnum() else "_" for ch in gname).strip("_").lower()
    doc = {"gpu": gname, "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
           "torch": torch.__version__,
           "model": {"family": "pixart_sigma", "depth": DEPTH, "hidden": 1152, "caption_channels": CAPTION,
                     "tokens": TOKENS, "weights": "random (seeded outlier statistics), fp16"},
           "step": {"latent": [2, 4, LATENT, LATENT], "image_px": LATENT * 8, "cfg_batch": 2},
           "rows": rows, "notes": notes, "seconds": round(time.time() - t_start, 1)}
    if not ARGS.dry:
        out_dir = pathlib.Path(ARGS.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"memory_{slug}.json"
        path.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {path}")
    print(f"\n{'variant':12s} {'weights MB':>11s} {'x vs fp16':>9s} {'load peak MB':>13s} {'step peak MB':>13s} "
          f"{'step s':>7s}")
    for r in rows:
        lp = "-" if r["load_peak_bytes"] is None else f"{r['load_peak_bytes'] / MB:.1f}"
        print(f"{r['variant']:12s} {r['dit_weight_bytes'] / MB:11.1f} {r['weight_reduction_vs_fp16']:9.2f} "
              f"{lp:>13s} {r['peak_bytes'] / MB:13.1f} {r['step_seconds']:7.3f}")
    for n in notes:
        print("note:", n)
    if ARGS.dry:
        print(json.dumps(doc)[:400])


if __name__ == "__main__":
    main()
