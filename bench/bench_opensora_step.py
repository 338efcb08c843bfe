"""One OpenSORA-1.0-size denoising step, FP16 vs ViDiT-Q W8A8 (GPU only; never run in CI; notes only).

STDiT-XL/2 (hidden 1152, depth 28, 16 heads), a 16 x 512 x 512 video (latent [2 (CFG), 4, 16, 64, 64]), 120
caption tokens of 4096 channels; random weights from the seeded builder (models/opensora/tiny.py at full size,
with its DiT-like outlier channels). W8A8 uses a calibration from one FP16 forward of the same step (static
smoothing + Hadamard). Reports the median step time (CUDA events), peak memory, linear weight bytes and the
W8A8 output error vs FP16; writes bench/results/opensora_step_<gpu>.json.

    python bench/bench_opensora_step.py                 # about 1-2 minutes on an H100/H200
    python bench/bench_opensora_step.py --backend torch # the torch reference path (no Triton)
    python bench/bench_opensora_step.py --preset w8a8-smoothquant,w4a8-g128-fast,w4a8   # several presets, one run
    python bench/bench_opensora_step.py --dry           # CPU, tiny shapes: checks this script only
    python bench/bench_opensora_step.py --compile-presets w8a8,w8a8-smoothquant   # + compiled rows
"""
import argparse
import json
import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=512, help="pixels (latent = size / 8)")
    p.add_argument("--depth", type=int, default=28)
    p.add_argument("--hidden", type=int, default=1152)
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument("--preset", default="w8a8", help="one preset or several, comma-separated (one FP16 baseline)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--dry", action="store_true", help="CPU, tiny shapes (checks the script)")
    p.add_argument("--profile", action="store_true", help="per compiled row: one step's costliest kernels")
    p.add_argument("--compile-presets", default="",
                   help="also time these presets (and FP16) with every block torch.compiled (Inductor, tuned "
                        "fusions), e.g. w8a8,w8a8-smoothquant; preset@kernel / preset@torch sets "
                        "VIDITQ_COMPILE_QUANT for that row (default auto)")
    return p.parse_args()


def _import_pkg():
    from _viditq import import_viditq  # bench/_viditq.py, beside this script

    import_viditq()


def _time(fn, reps, warmup, cuda):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _graph_ms(step, reps, ref):
    """(median ms of a CUDA-graph replay of the step, rel. error of the replayed output vs `ref`): the GPU time a
    step takes once the host is out of the way (what ViDiTQCompileModel's reduce-overhead mode gives)."""
    from _viditq import capture_graph  # bench/_viditq.py, beside this script

    g, out = capture_graph(step)
    g.replay()
    torch.cuda.synchronize()
    err = float((out.float() - ref).norm() / ref.norm())
    ms = _time(g.replay, reps, 2, True) * 1e3
    del g, out
    torch.cuda.empty_cache()
    return ms, err


def _graph_fields(step, reps, ref, cuda):
    if not cuda:
        return {}
    try:
        ms, err = _graph_ms(step, reps, ref)
        return {"ms_graph": ms, "graph_rel_err_vs_fp": err}
    except Exception as e:  # a step that cannot be captured says why
        return {"ms_graph": None, "graph_error": f"{type(e).__name__}: {str(e)[:200]}"}


def compiled_rows(result, args, model, layers, calib, step, ref, fp_s, cuda, presets):
    """FP16 and each preset with every block compiled (regional compile: the 28 blocks share one graph)."""
    import torch._dynamo

    from viditq.quant_core import build_quant_layers, get_preset, install_quant_layers, replace_layers
    from viditq.quant_core.metrics import compare

    options = None if args.dry else {"coordinate_descent_tuning": True, "triton.multi_kernel": 1}
    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    fp_c = None
    import os

    for spec in ["fp16"] + presets:
        # "w8a8-smoothquant@kernel": VIDITQ_COMPILE_QUANT for this row; "@nofuse" / "@torch+nofuse": VIDITQ_FUSE=0;
        # "@nores": VIDITQ_FUSE_RESIDUAL=0 (the gated residual adds outside the GEMM epilogue)
        preset, _, opts = spec.partition("@")
        opts = opts.split("+") if opts else []
        quant_mode = next((o for o in opts if o not in ("nofuse", "nores")), "auto")
        os.environ["VIDITQ_COMPILE_QUANT"] = quant_mode
        os.environ["VIDITQ_FUSE"] = "0" if "nofuse" in opts else "1"
        os.environ["VIDITQ_FUSE_RESIDUAL"] = "0" if "nores" in opts else "1"
        t0 = time.perf_counter()
        old = None
        try:
            if preset != "fp16":
                q, _ = build_quant_layers(model, get_preset(preset), calib, backend=args.backend)
                old = install_quant_layers(model, q)
            for blk in model.blocks:
                blk.compile(options=options, backend="inductor" if cuda else "aot_eager")
            out = step().float()
            first_s = time.perf_counter() - t0
            ms = _time(step, args.reps, args.warmup, cuda) * 1e3
            row = {"variant": spec, "compiled": True, "ms_per_step": ms, "speedup_vs_fp16": fp_s * 1e3 / ms,
                   "first_call_s": first_s, "psnr_db": compare(ref, out)["psnr_db"] if preset != "fp16" else None}
            if preset == "fp16":
                fp_c = ms
            elif fp_c:
                row["speedup_vs_fp16_compiled"] = fp_c / ms
            row.update(_graph_fields(step, args.reps, ref, cuda))
            if args.profile and cuda:
                row["top_kernels_ms"] = _top_kernels(step)
                row["host_top_ms"] = _top_host_ops(step)
        except Exception as e:  # a failed variant is a row saying why, never a lost run
            row = {"variant": spec, "compiled": True, "ms_per_step": None,
                   "error": f"{type(e).__name__}: {str(e)[:300]}"}
        finally:
            for blk in model.blocks:
                blk._compiled_call_impl = None  # back to eager (nn.Module.compile sets this)
            if old is not None:
                replace_layers(model, old)
            torch._dynamo.reset()
            os.environ.pop("VIDITQ_COMPILE_QUANT", None)
            os.environ.pop("VIDITQ_FUSE", None)
            os.environ.pop("VIDITQ_FUSE_RESIDUAL", None)
        result["rows"].append(row)
        print(f"compiled {spec}: {row}", flush=True)


def _top_kernels(step, top=14):
    """{kernel name: ms} of one step's 14 costliest GPU kernels (torch.profiler), and their total."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    rows = sorted(events, key=lambda e: -getattr(e, "device_time_total", 0))[:top]
    out = {e.key[:90]: round(getattr(e, "device_time_total", 0) / 1e3, 3) for e in rows}
    # all kernels' time: against the step's wall time it separates GPU-bound from host-bound steps
    out["(all kernels)"] = round(sum(getattr(e, "device_time_total", 0) for e in events) / 1e3, 3)
    return out


def _top_host_ops(step, top=12):
    """{op: self CPU ms} of one step's 12 costliest host-side ops (torch.profiler): where a host-bound step's time
    goes."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return {f"{e.key[:80]} (x{e.count})": round(e.self_cpu_time_total / 1e3, 3) for e in events}


def _preset_row(args, model, calib, step, ref, fp_s, cuda, preset):
    """One preset quantized from the shared calibration, timed eagerly and from a graph, then the FP16 layers put
    back; a preset that fails is a row saying why."""
    from viditq.quant_core import build_quant_layers, get_preset, install_quant_layers, replace_layers
    from viditq.quant_core.metrics import compare

    fp_layers = None
    try:
        qlayers, summary = build_quant_layers(model, get_preset(preset), calib, backend=args.backend)
        fp_layers = install_quant_layers(model, qlayers)
        del qlayers
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        out = step().float()
        q_s = _time(step, args.reps, args.warmup, cuda)
        cmp = compare(ref, out)
        row = {"variant": preset, "compiled": False, "ms_per_step": q_s * 1e3, "speedup_vs_fp16": fp_s / q_s,
               "psnr_db": cmp["psnr_db"], "output_vs_fp": cmp,
               "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
               "linear_weight_bytes_fp16": summary["weight_bytes_fp16"],
               "linear_weight_bytes_quantized": summary["weight_bytes_quantized"],
               "layers_quantized": summary["layers_quantized"]}
        if args.profile and cuda:
            row["top_kernels_ms"] = _top_kernels(step)
            row["host_top_ms"] = _top_host_ops(step)
        row.update(_graph_fields(step, args.reps, ref, cuda))
    except Exception as e:
        row = {"variant": preset, "compiled": False, "ms_per_step": None,
               "error": f"{type(e).__name__}: {str(e)[:300]}"}
    finally:
        if fp_layers is not None:
            replace_layers(model, fp_layers)
    print(f"{preset}: {({k: v for k, v in row.items() if k not in ('output_vs_fp', 'top_kernels_ms', 'host_top_ms')})}",
          flush=True)
    return row


def main():
    args = _parse()
    if args.dry:
        args.frames, args.size, args.depth, args.hidden, args.reps, args.warmup = 4, 128, 2, 144, 2, 1
    elif not torch.cuda.is_available():
        sys.exit("bench_opensora_step.py needs a CUDA GPU (use --dry to check the script on the CPU)")
    _import_pkg()
    from viditq.models.opensora.stdit import STDiT
    from viditq.models.opensora.tiny import build_tiny_opensora_state_dict
    from viditq.models.tiny_pixart import pseudo_caption
    from viditq.quant_core import Calibrator, describe_model

    cuda = not args.dry
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float32 if args.dry else {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    heads = args.hidden // 72
    t0 = time.perf_counter()
    sd = build_tiny_opensora_state_dict("1.0", seed=0, hidden=args.hidden, depth=args.depth, caption_channels=4096,
                                        token_num=120)
    with torch.device("meta"):
        model = STDiT(hidden_size=args.hidden, depth=args.depth, num_heads=heads, caption_channels=4096,
                      model_max_length=120)
    model.load_state_dict(sd, assign=True)
    del sd
    model = model.to(device=device, dtype=dtype).eval()
    build_s = time.perf_counter() - t0

    lat = args.size // 8
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, args.frames, lat, lat, generator=g).to(device, dtype)
    t = torch.tensor([500.0, 500.0], device=device)
    ctx = torch.cat([pseudo_caption("a red fox running in snow"), pseudo_caption("")]).to(device, dtype)

    def step():
        with torch.inference_mode():
            return model(x, t, ctx)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ref = step().float()
    fp_s = _time(step, args.reps, args.warmup, cuda)
    fp_peak = torch.cuda.max_memory_allocated() if cuda else None
    from viditq.models import fused_input  # the channel-strided residual ComfyUI's own DiTs keep: FP16 as such

    fused_input.CONTIGUOUS_RESIDUAL = False
    try:
        fp_strided_s = _time(step, args.reps, args.warmup, cuda)
    finally:
        fused_input.CONTIGUOUS_RESIDUAL = True
    import os  # the temporal attention through torch SDPA (copies in and out) instead of the frame kernel

    os.environ["VIDITQ_FRAME_ATTENTION"] = "sdpa"
    try:
        fp_sdpa_s = _time(step, args.reps, args.warmup, cuda)
    finally:
        os.environ.pop("VIDITQ_FRAME_ATTENTION")

    _, variant, layers, fingerprint = describe_model(model)
    cal = Calibrator({n: m for n, (m, _) in layers.items()}, num_buckets=4)
    with cal:
        cal.set_step(t.cpu(), [0, 1])
        step()
    calib = cal.result(fingerprint)
    presets = [p for p in args.preset.split(",") if p]
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "dry" if args.dry else torch.cuda.get_device_name().replace(" ", "_").lower()
    path = out_dir / f"opensora_step_{name}.json"
    fused_input.CONTIGUOUS_RESIDUAL = False  # FP16 as ComfyUI lays out its residual, replayed from a graph too
    try:
        fp_strided_graph = _graph_fields(step, args.reps, ref, cuda)
    finally:
        fused_input.CONTIGUOUS_RESIDUAL = True
    fp_graph = _graph_fields(step, args.reps, ref, cuda)
    result = {
        "gpu": torch.cuda.get_device_name() if cuda else "cpu (dry run)",
        "torch": torch.__version__,
        "model": {"variant": variant, "hidden": args.hidden, "depth": args.depth, "heads": heads,
                  "video": [args.frames, args.size, args.size], "latent": list(x.shape), "dtype": str(dtype),
                  "tokens": args.frames * (lat // 2) ** 2},
        "preset": args.preset, "backend": args.backend,
        "seconds_per_step_fp": fp_s,
        "seconds_per_step_fp_strided_residual": fp_strided_s,
        "seconds_per_step_fp_sdpa_temporal": fp_sdpa_s,
        "peak_memory_bytes_fp": fp_peak,
        "build_seconds": build_s,
        "notes": "random weights with planted outlier channels; one step at t=500 with CFG batch 2; calibration "
                 "from the same step; every preset row is measured against this run's fp16 row",
        "rows": [{"variant": "fp16", "compiled": False, "ms_per_step": fp_s * 1e3, "speedup_vs_fp16": 1.0,
                  **fp_graph},
                 {"variant": "fp16_strided", "compiled": False, "ms_per_step": fp_strided_s * 1e3,
                  "speedup_vs_fp16": fp_s / fp_strided_s, **fp_strided_graph},
                 {"variant": "fp16_sdpa_temporal", "compiled": False, "ms_per_step": fp_sdpa_s * 1e3,
                  "speedup_vs_fp16": fp_s / fp_sdpa_s}],
    }
    for preset in presets:  # one FP16 model and calibration serve every preset of the run
        result["rows"].append(_preset_row(args, model, calib, step, ref, fp_s, cuda, preset))
        if not args.dry:  # rewritten after every preset: a run cut short keeps what it measured
            path.write_text(json.dumps(result, indent=1))
    first = next((r for r in result["rows"][3:] if r.get("ms_per_step")), None)
    if first:  # the first preset's figures at the top level, as before
        result.update({"seconds_per_step_q": first["ms_per_step"] / 1e3, "speedup": first["speedup_vs_fp16"],
                       "peak_memory_bytes_q": first.get("peak_memory_bytes"),
                       "linear_weight_bytes_fp16": first.get("linear_weight_bytes_fp16"),
                       "linear_weight_bytes_quantized": first.get("linear_weight_bytes_quantized"),
                       "layers_quantized": first.get("layers_quantized"), "output_vs_fp": first.get("output_vs_fp"),
                       "eager_q_top_kernels_ms": first.get("top_kernels_ms"),
                       "eager_q_host_top_ms": first.get("host_top_ms")})
    compile_presets = [p for p in args.compile_presets.split(",") if p]
    if compile_presets:
        compiled_rows(result, args, model, layers, calib, step, ref, fp_s, cuda, compile_presets)
    if not args.dry:
        path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"\n{'variant':<24} {'compiled':>8} {'ms/step':>9} {'graph ms':>9} {'kernels ms':>11}")
    for r in result["rows"]:
        kern = (r.get("top_kernels_ms") or {}).get("(all kernels)")
        ms, gms = r.get("ms_per_step"), r.get("ms_graph")
        print(f"{r['variant']:<24} {str(r['compiled']):>8} {ms if ms is None else round(ms, 1)!s:>9} "
              f"{gms if gms is None else round(gms, 1)!s:>9} {kern!s:>11}")
    for r in result["rows"][3:]:
        if r.get("ms_per_step") and not r["compiled"]:
            print(f"{result['model']['variant']} {args.frames}x{args.size}x{args.size}: FP {fp_s * 1e3:.1f} ms/step, "
                  f"{r['variant']} {r['ms_per_step']:.1f} ms/step ({r['speedup_vs_fp16']:.2f}x), "
                  f"PSNR {r['psnr_db']:.1f} dB")
    print("" if args.dry else f"wrote {path}")


if __name__ == "__main__":
    main()
