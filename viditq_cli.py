#!/usr/bin/env python3
"""ComfyUI-ViDiT-Q from the command line (no ComfyUI needed).

    python viditq_cli.py demo --out out/demo     # calibrate, quantize with several presets, compare, report
    python viditq_cli.py quantize --checkpoint PixArt-Sigma-XL-2-1024-MS.safetensors --preset w8a8 \
        --out models/vidit_q/pixart_sigma_w8a8.safetensors   # quantize + save a quantized checkpoint
    python viditq_cli.py load models/vidit_q/pixart_sigma_w8a8.safetensors --forward   # check + describe one
"""
import argparse
import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent
PACKAGE = "viditq"


def _import_package():
    """Import this folder as the package `viditq` (its modules use relative imports, as in custom_nodes/)."""
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)
    return sys.modules[PACKAGE]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="viditq_cli.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the whole pipeline on the built-in tiny PixArt")
    demo.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out/demo"))
    demo.add_argument("--presets", default=None, help="comma-separated preset names (default: a useful set)")
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--cfg", type=float, default=4.5)
    demo.add_argument("--model", default="auto", choices=["auto", "toy", "seeded"],
                      help="auto: the trained toy PixArt when its weights are there, else the seeded outlier model")
    quant = sub.add_parser("quantize", help="quantize a PixArt model and save a quantized .safetensors")
    source = quant.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=pathlib.Path,
                        help="FP16 PixArt-α/Σ .safetensors in the official layout (what UNETLoader reads)")
    source.add_argument("--demo-model", action="store_true",
                        help="the built-in seeded model, calibrated on its stand-in captions")
    quant.add_argument("--preset", default="w8a8")
    quant.add_argument("--plan", type=pathlib.Path, default=None, help="mixed-precision plan JSON (VIDITQ_PLAN)")
    quant.add_argument("--fp-dtype", choices=["source", "keep", "fp16", "bf16"], default="source",
                       help="dtype of the non-quantized layers in the file (source: as in the input checkpoint)")
    quant.add_argument("--out", type=pathlib.Path, required=True)
    load = sub.add_parser("load", help="read and check a quantized .safetensors, build the model, describe it")
    load.add_argument("file", type=pathlib.Path)
    load.add_argument("--device", default="cpu")
    load.add_argument("--forward", action="store_true", help="also run the model once on random input")
    load.add_argument("--json", action="store_true", help="print the description as JSON")
    args = parser.parse_args(argv)

    _import_package()
    if args.command == "quantize":
        return _cmd_quantize(args)
    if args.command == "load":
        return _cmd_load(args)
    from viditq.standalone.pipeline import DEFAULT_PRESETS, format_table, run_demo

    presets = [p.strip() for p in args.presets.split(",")] if args.presets else list(DEFAULT_PRESETS)
    try:
        report = run_demo(args.out, presets, steps=args.steps, cfg=args.cfg, model=args.model)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(report))
    print(f"wrote {args.out / 'compare.png'} and {args.out / 'report.json'}")
    return 0


def _cmd_quantize(args) -> int:
    """Quantize (calibration only for the built-in model: real T5 features are not available here) and save."""
    import torch
    from safetensors.torch import load_file

    from viditq.models.pixart import PixArt, pixart_config_from_state_dict
    from viditq.quant_core import QuantPlan, build_quant_layers, get_preset
    from viditq.quant_core.checkpoint import CheckpointError, save_quantized

    try:
        config = get_preset(args.preset)
        if not config.enabled:
            raise ValueError(f"preset {args.preset!r} quantizes nothing; pick a quantized preset")
        plan = QuantPlan.from_json(args.plan.read_text()) if args.plan else None
        calib, source_dtype = None, torch.float32
        if args.demo_model:
            from viditq.models.tiny_pixart import pseudo_caption
            from viditq.quant_core import Calibrator, describe_model
            from viditq.standalone.pipeline import PROMPTS, build_demo_model
            from viditq.standalone.sampler import sample_euler_cfg

            model = build_demo_model()
            _, _, layers, fingerprint = describe_model(model)
            cal = Calibrator({n: m for n, (m, _) in layers.items()}, num_buckets=4)
            noise = torch.randn(len(PROMPTS), 4, 32, 32, generator=torch.Generator().manual_seed(0))
            with cal, torch.no_grad():
                sample_euler_cfg(model, noise, torch.cat([pseudo_caption(p) for p in PROMPTS]), pseudo_caption(""),
                                 10, 4.5, on_model_call=cal.set_step)
            calib = cal.result(fingerprint, {"steps": 10, "cfg": 4.5, "captions": "stand-in"})
            info = {"source": "built-in demo model"}
        else:
            sd = load_file(str(args.checkpoint))
            for prefix in ("model.diffusion_model.", "model."):
                if any(k.startswith(prefix) for k in sd):
                    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
                    break
            sd.pop("pos_embed", None)  # fixed sin-cos table, recomputed at run time
            counts = {}
            for v in sd.values():
                if v.is_floating_point():
                    counts[v.dtype] = counts.get(v.dtype, 0) + v.numel()
            source_dtype = max(counts, key=counts.get) if counts else torch.float32
            model = PixArt(**pixart_config_from_state_dict(sd))
            model.load_state_dict(sd)
            model.eval()
            info = {"source": args.checkpoint.name}
            print("no calibration (needs real T5 features): rotation without smoothing; for full ViDiT-Q "
                  "calibrate in ComfyUI and save there")
        layers, summary = build_quant_layers(model, config, calib, plan)
        fp_dtype = {"source": source_dtype, "keep": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.fp_dtype]
        out = save_quantized(args.out, model, layers, summary, fp_dtype=fp_dtype, model_info=info)
    except (ValueError, OSError, KeyError, RuntimeError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{summary['preset']}: {summary['layers_quantized']} layers quantized, "
          f"{summary['weight_bytes_fp16'] / 1e6:.1f} MB -> {summary['weight_bytes_quantized'] / 1e6:.1f} MB of "
          f"quantized-layer weights; wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


def _cmd_load(args) -> int:
    import json

    import torch

    from viditq.quant_core.checkpoint import CheckpointError, describe_checkpoint, load_quantized

    try:
        info = describe_checkpoint(args.file)
        model, ckpt = load_quantized(args.file, device=args.device)
    except (CheckpointError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info["model_bytes_in_memory"] = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if args.forward:
        ctx_dim = model.y_embedder.y_proj.fc1.in_features
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, 32, 32, generator=g).to(args.device, ckpt.model_dtype)
        t = torch.tensor([500.0], device=args.device)
        ctx = torch.randn(1, 16, ctx_dim, generator=g).to(args.device, ckpt.model_dtype)
        if ckpt.clock is not None:
            ckpt.clock.set_timesteps(t)
        with torch.no_grad():
            y = model(x, t, ctx).float()
        info["forward"] = {"finite": bool(torch.isfinite(y).all()), "std": float(y.std())}
    if args.json:
        print(json.dumps(info, indent=1, default=str))
    else:
        for key in ("file", "format_version", "tool_version", "family", "variant", "preset", "calibrated",
                    "layers_quantized", "layers_kept_fp", "mean_weight_bits", "bytes", "model_bytes_in_memory",
                    "forward"):
            if info.get(key) is not None:
                print(f"{key:22s} {info[key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
