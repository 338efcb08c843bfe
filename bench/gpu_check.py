#!/usr/bin/env python3
"""GPU check of every fast path against the torch reference (never run in CI): QuantLinear on its first call (full
path) and on its cached launch plan, for each preset and a few token counts; and a small quantized PixArt under
torch.compile(mode="reduce-overhead") in a fresh process (device constants first built inside Inductor's CUDA-graph
warm-up), compared with eager. Prints a table and writes <out>/gpu_check_<gpu>.json.

    python bench/gpu_check.py --out bench/results
"""
import argparse
import dataclasses
import json
import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from _viditq import import_viditq  # noqa: E402

import_viditq()
from viditq.kernels import reference  # noqa: E402
from viditq.models.pixart import PixArt, pixart_config_from_state_dict  # noqa: E402
from viditq.models.tiny_pixart import build_tiny_pixart_state_dict  # noqa: E402
from viditq.quant_core import build_quant_layers, get_preset, install_quant_layers, replace_layers  # noqa: E402
from viditq.quant_core.quant_linear import QuantLinear  # noqa: E402


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def reference_linear(layer, x):
    w = layer.quantized_weight()
    sg = (w.group_size or w.in_features) if w.zero is not None else 0
    a = reference.quantize_activation(x, layer.act_mult, layer.had_block, layer.act_fmt, layer.act_qmax,
                                      layer.static_scale, sg)
    return reference.quantized_matmul(a, w, layer.bias, torch.float64).reshape(*x.shape[:-1], w.out_features)


PRESETS = None  # --presets: only these


def _presets(names):
    return [p for p in names if PRESETS is None or p in PRESETS]


def check_layers(rows):
    g = torch.Generator().manual_seed(0)
    for k, n in ((1152, 4608), (4608, 1152)):
        lin = torch.nn.Linear(k, n).cuda().to(torch.bfloat16)
        absmax = (torch.rand(k, generator=g) * 4 + 0.5).cuda()
        for preset in _presets(("w8a8", "w8a8-fp8", "w8a8-smoothquant", "w4a8", "w4a8-g128", "w4a8-g128-fast")):
            layer = QuantLinear.from_linear(lin, f"blocks.0.mlp.fc{1 if k == 1152 else 2}", get_preset(preset), absmax,
                                            "auto").cuda()
            for m in (7, 2048, 2000, 2048):  # 2000 and the second 2048 run the bucket's plan
                x = (torch.randn(m, k, generator=g) * 2).cuda().to(torch.bfloat16)
                err = rel_err(layer(x), reference_linear(layer, x))
                plans = len(getattr(layer.qweight, "_viditq_plans", {}))
                rows.append({"check": "QuantLinear", "preset": preset, "K": k, "N": n, "M": m, "rel_err": err,
                             "plans": plans, "ok": err < (0.03 if "fp8" in preset else 0.01)})


def small_pixart(seed: int):
    """A 2-block PixArt at hidden 1152 in bf16 on the GPU, its inputs (x, t, context) and the generator used."""
    sd = build_tiny_pixart_state_dict(0, hidden=1152, depth=2, caption_channels=4096, token_num=120)
    model = PixArt(**pixart_config_from_state_dict(sd))
    model.load_state_dict(sd)
    model = model.cuda().to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 64, 64, generator=g).cuda().to(torch.bfloat16)
    ctx = torch.randn(2, 120, 4096, generator=g).cuda().to(torch.bfloat16)
    return model, (x, torch.tensor([500.0, 500.0]).cuda(), ctx), g


def check_fused(rows):
    """quant_core/fusions.py on the GPU: each fused layer (prologue kernel + GEMM) against the torch reference of
    the same math, and a PixArt step fused vs unfused (they differ only by the bf16 rounding the fused path skips)."""
    from viditq.quant_core import fusion_patches

    model, (x, t, ctx), g = small_pixart(seed=2)
    for preset in _presets(("w8a8-smoothquant", "w8a8-fp8-norot", "w8a8", "w8a8-fp8", "w4a8", "w4a8-g128",
                            "w4a8-g128-fast")):
        cfg = dataclasses.replace(get_preset("w8a8-fp8"), rotate=False) if preset == "w8a8-fp8-norot" \
            else get_preset(preset)
        layers, _ = build_quant_layers(model, cfg, None, None, "auto")
        for name, view in fusion_patches(model, layers).items():
            if not isinstance(view, QuantLinear):
                continue
            for m in (2048, 2000):
                rows_ps = m // 2
                h = (torch.randn(m, view.in_features, generator=g) * 2).cuda().to(torch.bfloat16)
                ada = (torch.randn(2, 6, view.in_features, generator=g) * 0.3).cuda().to(torch.bfloat16)
                pro = "norm_modulate" if view.norm_eps is not None else (view.input_act or "none")
                xf = reference.apply_prologue(h, pro, ada[:, 0:1], ada[:, 1:2], rows_ps, view.norm_eps or 1e-6)
                a = reference.quantize_activation(xf, view.act_mult, view.had_block, view.act_fmt, view.act_qmax)
                ref = reference.quantized_matmul(a, view.quantized_weight(), view.bias, torch.float64)
                res = gate = None
                if view.fuse_residual:  # the block's gated residual add in the GEMM epilogue
                    res = (torch.randn(m, view.out_features, generator=g) * float(ref.std())).cuda().to(h.dtype)
                    gate = torch.randn(2, 1, view.out_features, generator=g).cuda().to(h.dtype)
                    view.arm_residual(res, gate, rows_ps)
                    ref = reference.residual_add(ref, torch.float64, res, gate.reshape(2, -1), rows_ps)
                if view.norm_eps is not None:
                    view.arm_norm_modulate(ada[:, 0:1], ada[:, 1:2], rows_ps)
                y = view(h)
                err = rel_err(y, ref)
                rows.append({"check": "fused layer", "preset": preset, "layer": name, "prologue": pro, "M": m,
                             "had_block": view.had_block,
                             "residual": res is not None, "rel_err": err,
                             "ok": err < (0.03 if "fp8" in preset else 0.01)})
        with torch.no_grad():
            fp = model(x, t, ctx)
            old = replace_layers(model, layers)
            unfused = model(x, t, ctx)
            replace_layers(model, old)
            old = install_quant_layers(model, layers)
            fused = model(x, t, ctx)
            replace_layers(model, old)
        # the two quantized models differ by code flips where the unfused path's bf16 rounding moved a value across
        # a rounding boundary; what counts is that fusing does not move the result further from the bf16 model
        err, e_fused, e_unfused = rel_err(fused, unfused), rel_err(fused, fp), rel_err(unfused, fp)
        rows.append({"check": "fused vs unfused PixArt step", "preset": preset, "rel_err": err,
                     "rel_err_fused_vs_bf16": e_fused, "rel_err_unfused_vs_bf16": e_unfused,
                     "ok": e_fused <= 1.1 * e_unfused + 1e-3})


def check_compiled(rows):
    model, (x, t, ctx), _ = small_pixart(seed=1)
    for preset in ("w8a8", "w8a8-smoothquant"):
        layers, _ = build_quant_layers(model, get_preset(preset), None, None, "auto")
        old = install_quant_layers(model, layers)
        torch._dynamo.reset()
        try:
            compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
            t0 = time.time()
            with torch.no_grad():
                outs = [compiled(x, t, ctx).clone() for _ in range(4)]
                eager = model(x, t, ctx)
            rows.append({"check": "compile reduce-overhead", "preset": preset, "seconds": round(time.time() - t0, 1),
                         "rel_err_vs_eager": rel_err(outs[-1], eager),
                         "replays_equal": all(torch.equal(outs[1], o) for o in outs[2:]),
                         "ok": rel_err(outs[-1], eager) < 0.05 and all(torch.equal(outs[1], o) for o in outs[2:])})
        except Exception as e:
            rows.append({"check": "compile reduce-overhead", "preset": preset, "ok": False,
                         "error": f"{type(e).__name__}: {str(e)[:500]}"})
        # kernels/step_graph.StepGraphs (ViDiTQCudaGraphs): eager, record, then replays on fresh inputs == eager
        try:
            from viditq.kernels.step_graph import StepGraphs

            sg = StepGraphs(model)
            errs = []
            with torch.no_grad():
                for i in range(5):
                    xi, ti = x + 0.1 * i, t.flip(0) if i % 2 else t
                    errs.append(rel_err(sg(xi, ti, ctx), model(xi, ti, ctx)))
            rows.append({"check": "StepGraphs replay vs eager", "preset": preset, "stats": dict(sg.stats),
                         "max_rel_err": max(errs), "ok": max(errs) == 0.0 and sg.stats["replayed"] == 3})
        except Exception as e:
            rows.append({"check": "StepGraphs replay vs eager", "preset": preset, "ok": False,
                         "error": f"{type(e).__name__}: {str(e)[:500]}"})
        # backend "cudagraphs" (ViDiTQCompileModel's no-codegen option): eager first, as the node's wrapper does
        torch._dynamo.reset()
        try:
            with torch.no_grad():
                eager = model(x, t, ctx)
                compiled = torch.compile(model, backend="cudagraphs", fullgraph=True)
                t0 = time.time()
                first = compiled(x, t, ctx).clone()
                seconds = time.time() - t0
                outs = [compiled(x, t, ctx).clone() for _ in range(3)]
            e = rel_err(outs[-1], eager)
            rows.append({"check": "compile backend cudagraphs", "preset": preset, "first_call_s": round(seconds, 2),
                         "rel_err_vs_eager": e, "replays_equal": all(torch.equal(first, o) for o in outs),
                         "ok": e < 0.05 and all(torch.equal(outs[0], o) for o in outs[1:])})
        except Exception as e:
            rows.append({"check": "compile backend cudagraphs", "preset": preset, "ok": False,
                         "error": f"{type(e).__name__}: {str(e)[:500]}"})
        finally:
            torch._dynamo.reset()
            replace_layers(model, old)


def check_video(rows):
    """Tiny STDiT (1.0) and STDiT3 (1.2) on the GPU in bf16: the frame attention kernel (temporal attention with the
    tokens in place) against SDPA on copies, eager and quantized; and the quantized model under
    torch.compile(mode="reduce-overhead") against eager."""
    import os
    import tempfile

    from viditq.models.opensora.checkpoint import load_opensora
    from viditq.models.opensora.tiny import save_tiny_opensora

    for version in ("1.0", "1.2"):
        with tempfile.TemporaryDirectory() as tmp:
            path = save_tiny_opensora(os.path.join(tmp, "t.safetensors"), version, hidden=288, depth=2,
                                      caption_channels=256, token_num=16)
            model = load_opensora(path, dtype=torch.bfloat16)[0].cuda().eval()
        g = torch.Generator().manual_seed(3)
        x = torch.randn(2, 4, 13, 16, 16, generator=g).cuda().bfloat16()
        t = torch.tensor([700.0, 300.0], device="cuda")
        ctx = torch.randn(2, 16, 256, generator=g).cuda().bfloat16()
        for preset in (None, "w8a8", "w8a8-smoothquant"):
            old = None
            if preset:
                layers, _ = build_quant_layers(model, get_preset(preset), None, None, "auto")
                old = install_quant_layers(model, layers)
            try:
                with torch.no_grad():
                    ours = model(x, t, ctx)
                    os.environ["VIDITQ_FRAME_ATTENTION"] = "sdpa"
                    try:
                        sdpa = model(x, t, ctx)
                    finally:
                        os.environ.pop("VIDITQ_FRAME_ATTENTION")
                err = rel_err(ours, sdpa)
                rows.append({"check": f"STDiT {version} frame attention vs SDPA", "preset": preset or "bf16",
                             "rel_err": err, "ok": bool(torch.isfinite(ours).all()) and err < 0.02})
                if preset:
                    torch._dynamo.reset()
                    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
                    with torch.no_grad():
                        outs = [compiled(x, t, ctx).clone() for _ in range(4)]
                    e = rel_err(outs[-1], ours)
                    rows.append({"check": f"STDiT {version} compile reduce-overhead", "preset": preset,
                                 "rel_err_vs_eager": e, "ok": e < 0.05 and all(torch.equal(outs[1], o)
                                                                              for o in outs[2:])})
            except Exception as e:
                rows.append({"check": f"STDiT {version}", "preset": preset or "bf16", "ok": False,
                             "error": f"{type(e).__name__}: {str(e)[:500]}"})
            finally:
                torch._dynamo.reset()
                if old is not None:
                    replace_layers(model, old)


class _Printed(list):
    """The rows, each printed as it comes (a run cut short by its time limit still shows what it checked)."""

    def append(self, r):
        super().append(r)
        print({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--only", default="compiled,video,layers,fused", help="which checks, in this order")
    p.add_argument("--presets", default="", help="layers / fused checks: only these presets (comma-separated)")
    args = p.parse_args()
    global PRESETS
    PRESETS = set(args.presets.split(",")) if args.presets else None
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA GPU")
    rows = _Printed()
    checks = {"compiled": check_compiled, "layers": check_layers, "fused": check_fused, "video": check_video}
    for name in args.only.split(","):  # compiled first: no device constant exists yet in this process
        checks[name](rows)
    gpu = torch.cuda.get_device_name()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu_check_{gpu.lower().replace(' ', '_').replace('-', '_')}.json"
    path.write_text(json.dumps({"gpu": gpu, "torch": torch.__version__,
                                "command": "python bench/gpu_check.py " + " ".join(sys.argv[1:]),
                                "rows": list(rows)}, indent=1))
    bad = [r for r in rows if not r["ok"]]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} checks passed on {gpu}; wrote {path}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
