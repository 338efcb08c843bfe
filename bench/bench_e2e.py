#!/usr/bin/env python3
"""End-to-end speed of a PixArt-Σ-size DiT per denoising step: bf16 vs ViDiT-Q variants vs peers, in ONE run.

GPU only (never run in CI). The model is the plain-torch PixArt of models/pixart.py in the official layout (ComfyUI
is not needed; ComfyUI runs the same modules), 28 blocks, hidden 1152, 16 heads (head dim 72), 300 T5 tokens,
random weights with the seeded outlier statistics of models/tiny_pixart.py, bf16, batch 2 (CFG), 512 and 1024 px
(latents 64 and 128 -> 1024 and 4096 tokens).

Variants (all in one process, same inputs):
  fp16                  bf16 baseline (cuBLAS + torch SDPA)
  fp16_attn_fp8         bf16 linears + our fp8 attention (isolates the attention)
  w8a8_int8, w8a8_fp8   our QuantLinear (rotation, no calibration: speed does not depend on it), linears only
  w8a8_fp8_attn         w8a8_fp8 + our fp8 attention
  w8a8_full             w8a8_fp8_attn + elementwise fusion (LayerNorm+modulate, GELU, gate+residual) by
                        torch.compile of each block around our kernels (regional compile)
  w4a8_plan             W4A8 with the MLP at 8 bits (plan), linears only
  w8a8_fp8_norot        w8a8_fp8 without the Hadamard rotation (smoothing only; fp8 needs it least)
  w8a8_fp8_compile      w8a8_fp8, blocks compiled with our calls as custom ops (no graph breaks)
  w8a8_fp8_norot_compile  the same without rotation, the activation quantize written in torch under compile so
                        Inductor fuses it into its producer (LayerNorm+modulate, GELU): no bf16 activation round trip
  w8a8_sq_compile       int8 SmoothQuant-style (w8a8-smoothquant: smoothing, no rotation), compiled the same way
  w8a8_sq_kcompile      the same with our fused Triton quantize kept under compile (VIDITQ_COMPILE_QUANT=kernel)
  w8a8_sq_fused / _fcompile / w8a8_fp8_norot_fcompile  with quant_core/fusions.py (GELU, LayerNorm+modulate
                        inside our quantize kernel), eager / compiled
  w8a8_sq_fpcompile     w8a8_sq_fcompile + the attention projections' quantize in that kernel (VIDITQ_FUSE_PLAIN=1)
  w8a8_sq_frcompile     + the gated residual adds in the GEMM epilogues: every fusion, the default (also for fp8
                        without rotation: w8a8_fp8_norot_frcompile)
  w8a8_compile          ViDiT-Q W8A8 int8 (smoothing + rotation), compiled, no fusions (the rotated quantize on
                        its own, whichever act-quant kernel the tuner picks)
  w8a8_frcompile        the same with every fusion: the rotation runs inside the producer's quantize kernel
                        (LayerNorm+modulate / GELU / plain, then the block Hadamard as a transform); w8a8_fp8_frcompile
                        the same with fp8
  fp16_strided          fp16 with the channel-strided residual stream ComfyUI's own PixArt keeps
  torchao_int8          torchao Int8DynamicActivationInt8WeightConfig (eager), same linears
  torchao_int8_compile  the same, blocks compiled (torch.compile)
  torchao_fp8           torchao Float8DynamicActivationFloat8WeightConfig(PerRow) (eager)
  comfy_fp8_fast_equiv  ComfyUI's fp8_e4m3fn_fast path re-implemented (ComfyUI is not on the GPU machine): fp8
                        e4m3 weights with a per-tensor scale, static per-tensor input scale, torch._scaled_mm
                        (comfy/ops.py fp8_linear), same linears
  fp16_compile          bf16 with the blocks compiled (what torch.compile alone gives; reference for the above)
  w8a8_cudagraphs / w8a8_sq_cudagraphs / fp16_cudagraphs  the eager model (every fusion for ours) through
                        torch.compile(backend="cudagraphs", fullgraph=True) of the whole model, each new shape run
                        once eagerly first: ViDiTQCompileModel's cudagraphs backend (no Inductor code generation);
                        its "eager" column is what one call costs a ComfyUI user, graph replay included
  fp16_stepgraphs / w8a8_stepgraphs / w8a8_sq_stepgraphs  the eager model through kernels/step_graph.StepGraphs
                        (ViDiTQCudaGraphs: our own capture and replay, no Dynamo); "eager" = one call, replay included
  w8a8_fp8_stepgraphs   the same for ViDiT-Q W8A8 with fp8 e4m3 codes (w8a8-fp8) and every fusion
  w4a8_stepgraphs / w4a8_plan_stepgraphs  the same for W4A8 with every fusion: all linears at 4 bits / the MLP at 8
  w4a8_g128_stepgraphs / w4a8_g128fast_stepgraphs  all linears int4 in groups of 128: float group scales
                        (w4a8-g128) / two-level integer group scales (w4a8-g128-fast)
Every variant is checked first (output rel error vs bf16, finite), then timed: one step as the median of many
eager calls after warm-up (CUDA events), the same from a CUDA-graph replay where capture works, and a 20-step Euler
CFG run (wall). A torch.profiler breakdown (kernel time by kind, per block) for fp16 and the best variant, and an
attention micro-benchmark (SDPA backends vs ours, error vs fp32) come with it.
Writes <out>/e2e_<gpu>.json, <out>/e2e_<gpu>.png and prints a short table last; the JSON is rewritten after every
variant, so a run cut short keeps what it measured.

    python bench/bench_e2e.py --out bench/results          # the full run (about 6-8 minutes on an H200)
    python bench/bench_e2e.py --attention-quality          # CPU: PSNR cost of the quantized attention
"""
import argparse
import copy
import dataclasses
import gc
import json
import os
import pathlib
import statistics
import sys
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parent.parent
T_START = time.time()

ALL_VARIANTS = ["fp16", "fp16_attn_fp8", "w8a8_int8", "w8a8_fp8", "w8a8_fp8_attn", "torchao_int8", "torchao_fp8",
                "comfy_fp8_fast_equiv", "w4a8_plan", "w8a8_fp8_norot", "fp16_compile", "w8a8_fp8_compile",
                "w8a8_fp8_norot_compile", "w8a8_sq_compile", "w8a8_sq_kcompile", "w8a8_full", "torchao_int8_compile",
                "w8a8_sq_fused", "w8a8_sq_fcompile", "w8a8_fp8_norot_fcompile", "fp16_strided", "w8a8_sq_fpcompile",
                "w8a8_sq_frcompile", "w8a8_fp8_norot_frcompile", "w8a8_compile", "w8a8_frcompile",
                "w8a8_fp8_frcompile", "fp16_cudagraphs", "w8a8_cudagraphs", "w8a8_sq_cudagraphs", "fp16_stepgraphs",
                "w8a8_stepgraphs", "w8a8_sq_stepgraphs", "w4a8_stepgraphs", "w4a8_plan_stepgraphs",
                "w4a8_g128_stepgraphs", "w4a8_g128fast_stepgraphs", "w8a8_fp8_stepgraphs"]
STEPGRAPHS = {"fp16_stepgraphs", "w8a8_stepgraphs", "w8a8_fp8_stepgraphs", "w8a8_sq_stepgraphs", "w4a8_stepgraphs",
              "w4a8_plan_stepgraphs", "w4a8_g128_stepgraphs", "w4a8_g128fast_stepgraphs"}
# whole model through torch.compile(backend="cudagraphs") (ViDiTQCompileModel's no-codegen backend)
CUDAGRAPHS = {"fp16_cudagraphs", "w8a8_cudagraphs", "w8a8_sq_cudagraphs"}
COMPILED = {"w8a8_compile", "w8a8_frcompile", "w8a8_fp8_frcompile", "w8a8_full", "torchao_int8_compile", "fp16_compile", "w8a8_fp8_compile", "w8a8_fp8_norot_compile",
            "w8a8_sq_compile", "w8a8_sq_kcompile", "w8a8_sq_fcompile", "w8a8_fp8_norot_fcompile",
            "w8a8_sq_fpcompile", "w8a8_sq_frcompile", "w8a8_fp8_norot_frcompile"}
# our variants: (preset, config changes, quantized attention, compiled, activation quantize under compile)
OURS = {"w8a8_int8": ("w8a8", {}, None, False, None), "w8a8_fp8": ("w8a8-fp8", {}, None, False, None),
        "w8a8_fp8_attn": ("w8a8-fp8", {}, "fp8", False, None), "w4a8_plan": ("w4a8", {}, None, False, None),
        "w8a8_fp8_norot": ("w8a8-fp8", {"rotate": False}, None, False, None),
        "w8a8_fp8_compile": ("w8a8-fp8", {}, None, True, "kernel"),
        "w8a8_fp8_norot_compile": ("w8a8-fp8", {"rotate": False}, None, True, "torch"),
        "w8a8_sq_compile": ("w8a8-smoothquant", {}, None, True, "torch"),
        "w8a8_sq_kcompile": ("w8a8-smoothquant", {}, None, True, "kernel"),
        "w8a8_full": ("w8a8-fp8", {}, "fp8", True, "kernel"),
        # with quant_core/fusions.py: GELU and LayerNorm+modulate run inside our quantize kernel (the rows above
        # are without it, as measured before it existed)
        "w8a8_sq_fused": ("w8a8-smoothquant", {}, None, False, None),
        "w8a8_sq_fcompile": ("w8a8-smoothquant", {}, None, True, "torch"),
        "w8a8_fp8_norot_fcompile": ("w8a8-fp8", {"rotate": False}, None, True, "torch"),
        # and the attention projections' quantize in our prologue kernel too (VIDITQ_FUSE_PLAIN=1)
        "w8a8_sq_fpcompile": ("w8a8-smoothquant", {}, None, True, "torch"),
        # and the gated residual adds in the GEMM epilogues (every fusion: the default since session 12)
        "w8a8_sq_frcompile": ("w8a8-smoothquant", {}, None, True, "torch"),
        "w8a8_fp8_norot_frcompile": ("w8a8-fp8", {"rotate": False}, None, True, "torch"),
        # ViDiT-Q's own presets (smoothing + rotation): unfused, and with the rotation in the fused kernel
        "w8a8_compile": ("w8a8", {}, None, True, "kernel"),
        "w8a8_frcompile": ("w8a8", {}, None, True, "kernel"),
        "w8a8_fp8_frcompile": ("w8a8-fp8", {}, None, True, "kernel"),
        "w8a8_cudagraphs": ("w8a8", {}, None, False, None),
        "w8a8_sq_cudagraphs": ("w8a8-smoothquant", {}, None, False, None),
        "w8a8_stepgraphs": ("w8a8", {}, None, False, None),
        "w8a8_sq_stepgraphs": ("w8a8-smoothquant", {}, None, False, None),
        "w8a8_fp8_stepgraphs": ("w8a8-fp8", {}, None, False, None),
        "w4a8_stepgraphs": ("w4a8", {}, None, False, None),  # every linear at 4 bits
        "w4a8_plan_stepgraphs": ("w4a8", {}, None, False, None),
        "w4a8_g128_stepgraphs": ("w4a8-g128", {}, None, False, None),
        "w4a8_g128fast_stepgraphs": ("w4a8-g128-fast", {}, None, False, None)}
FUSED = {"w8a8_stepgraphs", "w8a8_sq_stepgraphs", "w8a8_fp8_stepgraphs", "w4a8_stepgraphs", "w4a8_plan_stepgraphs",
         "w4a8_g128_stepgraphs", "w4a8_g128fast_stepgraphs", "w8a8_cudagraphs", "w8a8_sq_cudagraphs", "w8a8_frcompile", "w8a8_fp8_frcompile", "w8a8_sq_fused", "w8a8_sq_fcompile", "w8a8_fp8_norot_fcompile", "w8a8_sq_fpcompile", "w8a8_sq_frcompile",
         "w8a8_fp8_norot_frcompile"}
# the fusion switches each fused variant installs with (the names keep what they measured when they were added)
FUSE_SWITCHES = {"w8a8_sq_fcompile": {"VIDITQ_FUSE_PLAIN": "0", "VIDITQ_FUSE_RESIDUAL": "0"},
                 "w8a8_fp8_norot_fcompile": {"VIDITQ_FUSE_PLAIN": "0", "VIDITQ_FUSE_RESIDUAL": "0"},
                 "w8a8_sq_fpcompile": {"VIDITQ_FUSE_PLAIN": "1", "VIDITQ_FUSE_RESIDUAL": "0"}}


def _parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--resolutions", default="512,1024", help="pixels; latent = px / 8")
    p.add_argument("--variants", default=",".join(ALL_VARIANTS))
    p.add_argument("--depth", type=int, default=28)
    p.add_argument("--tokens", type=int, default=300, help="T5 tokens (PixArt-Σ: 300)")
    p.add_argument("--reps", type=int, default=25, help="timed calls per measurement (median)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps of the sampling run")
    p.add_argument("--budget-s", type=float, default=330.0, help="skip what would start after this many seconds")
    p.add_argument("--compile-reserve-s", type=float, default=90.0,
                   help="a compiled variant starts only with this much budget left")
    p.add_argument("--full-tune", action="store_true",
                   help="let the kernel tuners time every candidate (default: a short list, to fit a device lease)")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--no-attn-bench", action="store_true", help="skip the attention micro-benchmark")
    p.add_argument("--inductor-options", default="",
                   help="torch.compile options for every compiled variant, e.g. "
                        "coordinate_descent_tuning=true,triton.multi_kernel=1")
    p.add_argument("--no-launch-bench", action="store_true", help="skip the host launch-overhead micro-benchmark")
    p.add_argument("--run-tag", default="", help="written into every row (several device runs merged later)")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="CPU: merge result files of several runs (rows keep their run tag and their own run's fp16 "
                        "baseline) into --out/e2e_<gpu>.json + .png and print the table")
    p.add_argument("--smoke", action="store_true", help="CPU, 1 block, tiny shapes: checks this script only")
    p.add_argument("--attention-quality", action="store_true",
                   help="CPU: PSNR cost of quantized attention on the evaluation models, then exit")
    return p.parse_args()


ARGS = _parse()

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402


def _import_pkg():
    from _viditq import import_viditq  # bench/_viditq.py, beside this script

    import_viditq()


_import_pkg()
from viditq.models.pixart import PixArt, pixart_config_from_state_dict  # noqa: E402
from viditq.models.tiny_pixart import build_tiny_pixart_state_dict  # noqa: E402
from viditq.quant_core import (QuantPlan, build_quant_layers, describe_model, get_preset,  # noqa: E402
                               install_quant_layers, replace_layers)
from viditq.models import fused_input  # noqa: E402
from viditq.kernels.step_graph import StepGraphs  # noqa: E402
from viditq.quant_core.attention import set_pixart_attention  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# CPU: quality cost of the quantized attention
# ---------------------------------------------------------------------------------------------------------------
def attention_quality(steps: int = 20):
    """PSNR vs FP of W8A8 (calibrated ViDiT-Q) with attention off / fp8 / int8, and of FP linears with each
    attention, on the evaluation models (seeded 1152x2 PixArt: head dim 72; trained toy: 64) and the tests' tiny
    PixArt (head dim 16). The torch twin of the kernel runs the same quantization on the CPU."""
    sys.path.insert(0, str(ROOT / "tests"))
    from viditq.evaluation.quality import seeded_pixart, toy_pixart
    from viditq.quant_core import Calibrator, compare
    from viditq.standalone.sampler import sample_euler_cfg
    from helpers import noise, text_pair, tiny_pixart

    models = []
    tp = tiny_pixart()
    c, u = text_pair()
    models.append(("tests.helpers.tiny_pixart (256x2, d=16)", tp, noise(), c, u))
    for em in (seeded_pixart(), toy_pixart()):
        if em is not None:
            models.append((em.name, em.model, em.noise, em.cond, em.uncond))
    rows = []
    for name, model, x, cond, uncond in models:
        t0 = time.time()

        def sample(hook=None):
            return sample_euler_cfg(model, x, cond, uncond, steps, 4.5, on_model_call=hook)

        _, _, layers, fp = describe_model(model)
        cal = Calibrator({n: m for n, (m, _) in layers.items()}, num_buckets=4)
        with cal:
            sample(cal.set_step)
        calib = cal.result(fp)
        ref = sample()
        row = {"model": name, "steps": steps}
        for attn in ("fp8", "int8"):
            set_pixart_attention(model, attn, "torch")
            row[f"fp_linears+attn_{attn}"] = compare(ref, sample())["psnr_db"]
            set_pixart_attention(model, "off")
        q, _ = build_quant_layers(model, get_preset("w8a8"), calib, None, "torch")
        old = install_quant_layers(model, q)
        try:
            row["w8a8"] = compare(ref, sample())["psnr_db"]
            for attn in ("fp8", "int8"):
                set_pixart_attention(model, attn, "torch")
                row[f"w8a8+attn_{attn}"] = compare(ref, sample())["psnr_db"]
                set_pixart_attention(model, "off")
        finally:
            replace_layers(model, old)
        for attn in ("fp8", "int8"):
            row[f"cost_db_attn_{attn}_on_w8a8"] = row["w8a8"] - row[f"w8a8+attn_{attn}"]
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    out = pathlib.Path(ARGS.out) / "attention_quality.json"
    out.write_text(json.dumps({"command": "python bench/bench_e2e.py --attention-quality", "rows": rows}, indent=1))
    print(f"wrote {out}")


if ARGS.attention_quality:
    attention_quality(ARGS.steps)
    sys.exit(0)


def merge_runs(paths):
    global RESULT, GPU, GPU_TAG
    runs = [json.loads(pathlib.Path(p).read_text()) for p in paths]
    tags = [r["rows"][0].get("run") if r["rows"] else None for r in runs]
    base = dict(runs[0])
    base["runs"] = []
    for p, r, tag in zip(paths, runs, tags):  # an already merged file brings its own list of runs
        base["runs"] += r.get("runs") or [{"file": pathlib.Path(p).name, "command": r["command"],
                                           "elapsed_s": r.get("elapsed_s"), "tag": tag}]
    if any(isinstance(r["command"], dict) for r in runs):  # a merged file keeps its commands by run tag
        base["command"] = {}
        for r, tag in zip(runs, tags):
            base["command"].update(r["command"] if isinstance(r["command"], dict) else {tag or "?": r["command"]})
    else:
        base["command"] = " ; ".join(r["command"] for r in runs)
    base["rows"] = []
    measured = {(y["variant"], y["resolution"]) for r in runs for y in r["rows"] if y.get("ms_per_step")}
    last_skip = {}
    for r in runs:  # a skipped row only where no run measured it, and then only the last run's
        for x in r["rows"]:
            if not x.get("ms_per_step"):
                last_skip[(x["variant"], x["resolution"])] = x
    for r in runs:
        # every measured row (with its own run's fp16 speedup)
        base["rows"] += [x for x in r["rows"] if x.get("ms_per_step") or (
            (x["variant"], x["resolution"]) not in measured and last_skip.get((x["variant"], x["resolution"])) is x)]
        for key in ("attention_microbench", "launch_overhead"):
            if r.get(key):
                base[key] = r[key]
        for key in ("profile", "compile_and_graphs", "setup"):
            base.setdefault(key, {})
            base[key] = {**base.get(key, {}), **r.get(key, {})}
        base["notes"] = list(dict.fromkeys(base.get("notes", []) + r.get("notes", [])))
    RESULT = base
    GPU = base["gpu"]
    GPU_TAG = GPU.lower().replace(" ", "_").replace("-", "_")

if not torch.cuda.is_available() and not ARGS.smoke and not ARGS.merge:
    print("bench_e2e.py measures GPU speed and needs a CUDA GPU; none found (use --attention-quality for the "
          "CPU quality part).")
    sys.exit(2)

from viditq.kernels import triton_attention  # noqa: E402
from viditq.kernels.reference_attention import attention_exact  # noqa: E402
from viditq.standalone.sampler import sample_euler_cfg  # noqa: E402

SMOKE = ARGS.smoke
if SMOKE:  # the script's logic on the CPU: torch reference kernels, tiny shapes, no graphs
    os.environ["VIDITQ_BACKEND"] = "torch"
    ARGS.depth, ARGS.tokens, ARGS.reps, ARGS.steps = 1, 16, 2, 2
    ARGS.resolutions, ARGS.no_profile = "64", False
    ARGS.out = str(pathlib.Path(ARGS.out) / "smoke") if ARGS.out == str(ROOT / "bench" / "results") else ARGS.out
DEV = torch.device("cpu" if SMOKE else "cuda")
DTYPE = torch.bfloat16
GPU = "cpu-smoke" if SMOKE or ARGS.merge else torch.cuda.get_device_name(DEV)
GPU_TAG = GPU.lower().replace(" ", "_").replace("-", "_")
OUT = pathlib.Path(ARGS.out)
OUT.mkdir(parents=True, exist_ok=True)
HIDDEN, HEADS, CAPTION = 1152, 16, 4096
RESOLUTIONS = [int(r) for r in ARGS.resolutions.split(",") if r]
VARIANTS = [v for v in ARGS.variants.split(",") if v]
def _option_value(v: str):
    return {"true": True, "false": False}.get(v.lower(), int(v) if v.isdigit() else v)


INDUCTOR_OPTIONS = {kv.split("=")[0]: _option_value(kv.split("=")[1]) for kv in ARGS.inductor_options.split(",") if kv}
MODEL_NAME = f"pixart_sigma_xl2 ({ARGS.depth}x{HIDDEN}, random weights)"
def _command() -> str:
    argv, out, skip = sys.argv[1:], [], False
    for a in argv:  # the output folder is where the device wrote, not part of the measurement
        if skip:
            skip = False
            continue
        if a == "--out":
            skip = True
            continue
        if not a.startswith("--out="):
            out.append(a)
    return "python bench/bench_e2e.py" + "".join(" " + a for a in out)


RESULT = {"gpu": GPU, "command": _command(),
          "torch": torch.__version__, "rows": [], "attention_microbench": [], "profile": {}, "notes": [],
          "compile_and_graphs": {}, "setup": {}}
try:
    import triton

    RESULT["triton"] = triton.__version__
except Exception:  # pragma: no cover
    pass


def elapsed() -> float:
    return time.time() - T_START


def log(msg: str) -> None:
    print(f"[{elapsed():6.1f}s] {msg}", flush=True)


def note(msg: str) -> None:
    RESULT["notes"].append(msg)
    log("NOTE " + msg)


def sync():
    if not SMOKE:
        torch.cuda.synchronize()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------------------------
# tuner candidate lists: a short list by default (every candidate is a Triton compile of 1-3 s; the full lists
# cost minutes of device time). Wraps the modules' functions in this process only.
# ---------------------------------------------------------------------------------------------------------------
def restrict_tuners(n_gemm: int = 7, n_act: int = 5):
    from viditq.kernels import triton_act_quant as aq
    from viditq.kernels import triton_gemm as gm

    g0, a0 = gm.candidates, aq.candidates

    def gemm_candidates(*a, **k):
        c = list(g0(*a, **k))
        if any(str(cfg[0]).startswith("swap") for cfg in c):  # W4A8 lists: the module's own order
            return c[:n_gemm]
        # W8A8: the two-programs-per-SM TMA kernels won at M >= 8192 (bench/NOTES_kernels.md), then the
        # three-per-SM ones (session 23), then the rest
        return sorted(c, key=lambda cfg: 0 if cfg[0] in ("tma2", "tmas2", "tma3") else 1)[:n_gemm]

    def act_candidates(*a, **k):
        c = list(a0(*a, **k))
        return c[:n_act]

    gm.candidates = gemm_candidates
    aq.candidates = act_candidates
    RESULT["setup"]["tuner"] = f"short lists: GEMM {n_gemm} candidates (tma2/tmas2/tma3 first), act quantize {n_act}"


# ---------------------------------------------------------------------------------------------------------------
# model and inputs
# ---------------------------------------------------------------------------------------------------------------
def build_fp_model() -> nn.Module:
    sd = build_tiny_pixart_state_dict(0, hidden=HIDDEN, depth=ARGS.depth, caption_channels=CAPTION,
                                      token_num=ARGS.tokens)
    with torch.device("meta"):
        model = PixArt(**pixart_config_from_state_dict(sd))
    model.load_state_dict({k: v.to(DEV, DTYPE) for k, v in sd.items()}, assign=True)
    return model.eval()


def inputs(px: int, t: float = 700.0):
    lat = px // 8
    g = torch.Generator(device="cpu").manual_seed(px)
    x = torch.randn(2, 4, lat, lat, generator=g).to(DEV, DTYPE)
    ts = torch.tensor([t, t], device=DEV)
    ctx = (torch.randn(2, ARGS.tokens, CAPTION, generator=g)).to(DEV, DTYPE)
    return x, ts, ctx


def block_linear_names(model) -> list:
    _, _, layers, _ = describe_model(model)
    return list(layers)


def plan_mlp8(model) -> QuantPlan:
    _, _, layers, fingerprint = describe_model(model)
    return QuantPlan(fingerprint=fingerprint, layers={n: {"w_bits": 8} for n in layers if ".mlp." in n},
                     base_preset="w4a8", info={"rule": "mlp fc1/fc2 at 8 bits, the rest at 4"})


class ComfyFP8Linear(nn.Module):
    """ComfyUI's fp8_e4m3fn_fast linear (comfy/ops.py fp8_linear, 'scale_input' branch), re-implemented: fp8 e4m3
    weight with one per-tensor scale, input multiplied by 1/scale_input and cast to fp8, torch._scaled_mm with
    bias, bf16 out. scale_input is static (a scaled-fp8 checkpoint carries it; here: calibrated once)."""

    def __init__(self, lin: nn.Linear, scale_input: torch.Tensor):
        super().__init__()
        w = lin.weight.detach().float()
        sw = (w.abs().amax() / 448.0).clamp_min(1e-12)
        self.register_buffer("weight", (w / sw).to(torch.float8_e4m3fn))
        self.register_buffer("scale_weight", sw.reshape(()).float())
        self.register_buffer("scale_input", scale_input.reshape(()).float())
        self.register_buffer("bias", None if lin.bias is None else lin.bias.detach().to(DTYPE))

    def forward(self, x):
        shape = x.shape
        xi = (x * (1.0 / self.scale_input).to(x.dtype)).reshape(-1, shape[-1]).to(torch.float8_e4m3fn).contiguous()
        o = torch._scaled_mm(xi, self.weight.t(), out_dtype=x.dtype, bias=self.bias, scale_a=self.scale_input,
                             scale_b=self.scale_weight)
        if isinstance(o, tuple):
            o = o[0]
        return o.reshape(*shape[:-1], -1)


def comfy_fp8_layers(model) -> dict:
    """ComfyFP8Linear for every block linear; scale_input = 2x the input abs-max seen over three timesteps at each
    resolution (a margin so other timesteps do not overflow fp8)."""
    names = block_linear_names(model)
    amax = {n: torch.zeros((), device=DEV) for n in names}
    hooks = []
    for n in names:
        def hook(mod, inp, out, n=n):
            amax[n] = torch.maximum(amax[n], inp[0].detach().abs().amax().float())
        hooks.append(model.get_submodule(n).register_forward_hook(hook))
    with torch.no_grad():
        for px in RESOLUTIONS:
            for t in (999.0, 500.0, 1.0):
                model(*inputs(px, t))
    for h in hooks:
        h.remove()
    return {n: ComfyFP8Linear(model.get_submodule(n), (2 * amax[n] / 448.0).clamp_min(1e-8)) for n in names}


def torchao_model(model, kind: str):
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig,
                                      Int8DynamicActivationInt8WeightConfig, PerRow, quantize_)

    names = set(block_linear_names(model))
    m = copy.deepcopy(model)
    cfg = Int8DynamicActivationInt8WeightConfig() if kind == "int8" else \
        Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    quantize_(m, cfg, filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear) and fqn in names)
    return m


class CudaGraphsModel:
    """torch.compile(model, backend="cudagraphs", fullgraph=True), each new input shape run once eagerly first (as
    ViDiTQCompileModel's wrapper does: kernel tuning and device constants outside the graphs' memory pool)."""

    def __init__(self, model):
        self.model = model
        self.compiled = torch.compile(model, backend="cudagraphs", fullgraph=True)
        self.warmed = set()

    def __call__(self, *args):
        key = tuple((tuple(a.shape), a.dtype) for a in args)
        if key not in self.warmed:
            self.model(*args)
            self.warmed.add(key)
        from viditq.kernels.dispatch import compile_quant

        torch.compiler.cudagraph_mark_step_begin()  # a new step: the last call's outputs may be overwritten
        with compile_quant("kernel"):  # as the node: no Inductor to fuse a torch quantize
            return self.compiled(*args).clone()  # (ComfyUI's apply_model consumes the output at once)


def compile_blocks(model):
    """Regional compilation: each block compiled (the 28 share one compiled graph per shape)."""
    torch._dynamo.config.automatic_dynamic_shapes = False  # one static graph per resolution
    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    for blk in model.blocks:
        blk.compile(options=INDUCTOR_OPTIONS or None)
    return model


class OpaqueKernels:
    """While active, our quantized linear and attention calls are opaque to torch.compile (torch.compiler.disable):
    Dynamo stops at each call (a graph break) and compiles what lies between (LayerNorm + modulate, GELU,
    gate + residual), which Inductor fuses. Patches module attributes of this process only."""

    def __enter__(self):
        import viditq.kernels as kmod
        import viditq.quant_core.attention as amod

        self.saved = [(kmod, "quant_linear", kmod.quant_linear), (amod, "quantized_attention", amod.quantized_attention)]
        for mod, name, fn in self.saved:
            setattr(mod, name, torch.compiler.disable(fn))
        return self

    def __exit__(self, *exc):
        for mod, name, fn in self.saved:
            setattr(mod, name, fn)


def compile_probe(model) -> dict:
    """Can torch.compile trace one quantized linear / our attention as they are (fullgraph=True)? The first
    unsupported construct is the precise reason a compiled model breaks its graph there."""
    out = {}
    names = block_linear_names(model)
    x = torch.randn(2, 1024, HIDDEN, device=DEV, dtype=DTYPE)
    layers, _ = build_quant_layers(model, get_preset("w8a8-fp8"), None, None, "auto")
    lin = layers[names[0]]
    lin(x)
    q = torch.randn(2, HEADS, 1024, HIDDEN // HEADS, device=DEV, dtype=DTYPE)
    from viditq.quant_core.attention import quantized_attention

    quantized_attention(q, q, q, "fp8")
    for label, fn, args in (("QuantLinear (w8a8-fp8, Triton)", lin, (x,)),
                            ("quantized_attention fp8 (Triton)", lambda a: quantized_attention(a, a, a, "fp8"), (q,))):
        torch._dynamo.reset()
        t0 = time.time()
        try:
            c = torch.compile(fn, fullgraph=True)
            y = c(*args)
            ref = fn(*args)
            out[label] = {"fullgraph": True, "rel_err_vs_eager": rel_err(y, ref), "seconds": round(time.time() - t0, 1)}
        except Exception as e:
            msg = str(e).strip().splitlines()
            out[label] = {"fullgraph": False, "reason": f"{type(e).__name__}: " + " | ".join(msg[:6])[:700],
                          "seconds": round(time.time() - t0, 1)}
        log(f"compile probe {label}: {out[label]}")
    torch._dynamo.reset()
    return out


# ---------------------------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def time_eager(fn, reps: int) -> float:
    if SMOKE:
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        fn()
        ends[i].record()
    sync()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


@torch.no_grad()
def time_graph(fn, reps: int, ref_out: torch.Tensor):
    """(median ms of a CUDA-graph replay, rel error of the replayed output vs eager) or raises."""
    if SMOKE:
        raise RuntimeError("no CUDA graphs on the CPU")
    from _viditq import capture_graph  # bench/_viditq.py, beside this script

    g, out = capture_graph(fn)
    g.replay()
    sync()
    err = rel_err(out, ref_out)
    ms = time_eager(g.replay, reps)
    del g
    return ms, err


@torch.no_grad()
def run_steps(model, px: int) -> float:
    lat = px // 8
    g = torch.Generator(device="cpu").manual_seed(1)
    noise = torch.randn(1, 4, lat, lat, generator=g).to(DEV, DTYPE)
    cond = torch.randn(1, ARGS.tokens, CAPTION, generator=g).to(DEV, DTYPE)
    uncond = torch.zeros_like(cond)
    sync()
    t0 = time.perf_counter()
    out = sample_euler_cfg(model, noise, cond, uncond, ARGS.steps, 4.5)
    sync()
    if not torch.isfinite(out).all():
        raise RuntimeError("non-finite latent after the sampling run")
    return time.perf_counter() - t0


REFS = {}


@torch.no_grad()
def measure(variant: str, model, px: int, extra: dict) -> dict:
    x, t, ctx = inputs(px)
    fn = lambda: model(x, t, ctx)  # noqa: E731
    row = {"model": MODEL_NAME, "resolution": px, "variant": variant, "ms_per_step": None, "speedup_vs_fp16": None,
           "run": ARGS.run_tag or None}
    row.update(extra)
    t0 = time.time()
    out = fn()  # first call: kernel compiles / tuning
    sync()
    row["first_call_s"] = round(time.time() - t0, 2)
    for _ in range(2):
        out = fn()
    sync()
    if variant == "fp16":
        REFS[px] = out.float().clone()
    ok = bool(torch.isfinite(out).all())
    err = rel_err(out, REFS[px]) if px in REFS else None
    row["rel_err_vs_bf16"] = err
    row["correct"] = ok and (err is None or err < 1.0)  # recorded; only a broken (non-finite / >100%) output stops
    if not row["correct"]:
        row["reason"] = f"output check failed (finite={ok}, rel_err={err})"
        return row
    reps = ARGS.reps if px >= 1024 else ARGS.reps + 15
    row["ms_per_step"] = round(time_eager(fn, reps), 4)
    try:
        ms_g, err_g = time_graph(fn, reps, out)
        row["ms_per_step_graph"] = round(ms_g, 4)
        row["graph_rel_err_vs_eager"] = err_g
    except Exception as e:
        row["ms_per_step_graph"] = None
        row["graph_failure"] = f"{type(e).__name__}: {str(e)[:300]}"
        sync()
    try:
        row["seconds_20_steps"] = round(run_steps(model, px), 3)
    except Exception as e:
        row["seconds_20_steps"] = None
        row["steps_failure"] = f"{type(e).__name__}: {str(e)[:300]}"
    return row


FP16_MS = {}


def finish_row(row: dict) -> None:
    px = row["resolution"]
    if row["variant"] == "fp16" and row.get("ms_per_step"):
        FP16_MS[px] = (row["ms_per_step"], row.get("ms_per_step_graph"))
    base = FP16_MS.get(px)
    if base and row.get("ms_per_step"):
        row["speedup_vs_fp16"] = round(base[0] / row["ms_per_step"], 3)
        if base[1] and row.get("ms_per_step_graph"):
            row["speedup_graph_vs_fp16"] = round(base[1] / row["ms_per_step_graph"], 3)
    RESULT["rows"].append(row)
    log(f"{row['variant']:22s} {px:5d}px  eager {row.get('ms_per_step')} ms  graph {row.get('ms_per_step_graph')} ms"
        f"  x{row.get('speedup_vs_fp16')}  err {row.get('rel_err_vs_bf16')}  {row.get('reason', '')}"
        f"{row.get('graph_failure', '')}")
    write_outputs()


def skipped(variant: str, reason: str):
    for px in RESOLUTIONS:
        finish_row({"model": MODEL_NAME, "resolution": px, "variant": variant, "ms_per_step": None,
                    "speedup_vs_fp16": None, "reason": reason, "run": ARGS.run_tag or None})


# ---------------------------------------------------------------------------------------------------------------
# attention micro-benchmark
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def attention_microbench():
    import triton.testing as tt
    from torch.nn.attention import SDPBackend, sdpa_kernel

    F = torch.nn.functional
    shapes = [("self 512px", 1024, 1024), ("self 1024px", 4096, 4096), ("cross 1024px", 4096, ARGS.tokens)]
    modes = ["fp8", "int8", "int8_fp8pv", "fp8_bf16pv"]
    for name, nq, nk in shapes:
        g = torch.Generator(device="cpu").manual_seed(nq + nk)
        qkv = torch.randn(2, nq, 3, HEADS, HIDDEN // HEADS, generator=g).to(DEV, DTYPE)
        q = qkv[:, :, 0].transpose(1, 2)
        kv = torch.randn(2, nk, 2, HEADS, HIDDEN // HEADS, generator=g).to(DEV, DTYPE) * 1.5
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        ref = attention_exact(q.float(), k.float(), v.float())
        flops = 4.0 * 2 * HEADS * nq * nk * (HIDDEN // HEADS)
        row = {"shape": name, "B": 2, "H": HEADS, "Nq": nq, "Nk": nk, "D": HIDDEN // HEADS, "ms": {}, "rel_err": {},
               "config": {}}
        for label, backend in (("sdpa_default", None), ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                               ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                               ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION)):
            try:
                if backend is None:
                    f = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
                else:
                    def f(backend=backend):
                        with sdpa_kernel(backend):
                            return F.scaled_dot_product_attention(q, k, v)
                o = f()
                row["rel_err"][label] = rel_err(o, ref)
                row["ms"][label] = tt.do_bench(f, warmup=10, rep=50, return_mode="median")
            except Exception as e:
                row["ms"][label] = None
                row["rel_err"][label] = f"{type(e).__name__}: {str(e)[:120]}"
        for mode in modes:
            try:
                o = triton_attention.attention(q, k, v, mode)
                row["rel_err"][mode] = rel_err(o, ref)
                row["ms"][mode] = tt.do_bench(lambda: triton_attention.attention(q, k, v, mode), warmup=10,
                                              rep=50, return_mode="median")
                key = [kk for kk in triton_attention.tuner.best if kk[:4] == (
                    triton_attention._pow2_ceil(nq), triton_attention._pow2_ceil(nk), HIDDEN // HEADS, mode)]
                row["config"][mode] = str(triton_attention.tuner.best.get(key[-1])) if key else None
            except Exception as e:
                row["ms"][mode] = None
                row["rel_err"][mode] = f"{type(e).__name__}: {str(e)[:300]}"
        sd = row["ms"].get("sdpa_default")
        row["tflops"] = {kk: round(flops / (vv * 1e-3) / 1e12, 1) for kk, vv in row["ms"].items() if vv}
        row["speedup_vs_sdpa"] = {kk: round(sd / vv, 3) for kk, vv in row["ms"].items() if vv and sd}
        RESULT["attention_microbench"].append(row)
        log(f"attention {name}: " + ", ".join(f"{kk} {vv:.3f}ms" for kk, vv in row["ms"].items() if vv) +
            " | err " + ", ".join(f"{kk} {vv:.4f}" for kk, vv in row["rel_err"].items() if isinstance(vv, float)))
    write_outputs()


# ---------------------------------------------------------------------------------------------------------------
# host (Python + launch) cost of one linear call: what eager sampling pays per layer when the GPU keeps up
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def launch_overhead(model, tokens: int = 256, calls: int = 300) -> dict:
    """Host microseconds per call (no sync inside the loop; a small M so the GPU never holds the host back) of
    F.linear, our QuantLinear on its cached plan, the same call re-planned every time (what every call cost before
    plans), and the two bare Triton launches of a plan (Triton's own launch cost). Layer: blocks.0.attn.proj."""
    F = torch.nn.functional
    name = [n for n in block_linear_names(model) if n.endswith("attn.proj")][0]
    lin = model.get_submodule(name)
    k, n = lin.in_features, lin.out_features
    x = torch.randn(tokens, k, device=DEV, dtype=DTYPE)
    out = {"layer": name, "tokens": tokens, "K": k, "N": n, "calls": calls}

    def host_us(fn):
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        sync()
        return round((t1 - t0) / calls * 1e6, 2)

    out["F.linear_us"] = host_us(lambda: F.linear(x, lin.weight, lin.bias))
    for preset in ("w8a8", "w8a8-fp8", "w4a8"):
        try:
            layers, _ = build_quant_layers(model, get_preset(preset), None, None, "auto")
            ql = layers[name]
            ql(x)
            out[f"{preset}_plan_us"] = host_us(lambda: ql(x))
            wdata = ql.quantized_weight().data

            def replanned():
                wdata._viditq_plans = {}
                return ql(x)
            out[f"{preset}_replanned_us"] = host_us(replanned)
            plan = next(iter(wdata._viditq_plans.values()))
            q = torch.empty((tokens, k), device=DEV, dtype=plan.qdtype)
            sc = torch.empty((tokens,), device=DEV, dtype=torch.float32)
            qsum = torch.empty((tokens, plan.qsum_cols), device=DEV, dtype=torch.int32) if plan.qsum_cols else None
            c = torch.empty((tokens, n), device=DEV, dtype=DTYPE)
            mv = ql.act_mult if ql.act_mult is not None else sc

            w = ql.quantized_weight()

            def bare():
                plan.aq(x, mv, q, sc, sc if qsum is None else qsum, sc, tokens, 0 if qsum is None else qsum.stride(0))
                plan.gemm(q, sc, qsum, w.data, w.scale, w.scale if w.zero is None else w.zero,
                          sc if ql.bias is None else ql.bias, c, tokens)
            out[f"{preset}_bare_launches_us"] = host_us(bare)
        except Exception as e:
            traceback.print_exc()
            out[f"{preset}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    # a fused layer (LayerNorm + modulate + quantize, GEMM): fc1's view, armed as the block arms it, on its
    # FusedPlan and re-planned every call
    fc1 = [nm for nm in block_linear_names(model) if nm.endswith("mlp.fc1")][0]
    xf = torch.randn(tokens, model.get_submodule(fc1).in_features, device=DEV, dtype=DTYPE)
    ada = torch.randn(2, 6, xf.shape[1], device=DEV, dtype=DTYPE)
    for preset in ("w8a8", "w8a8-smoothquant"):
        try:
            layers, _ = build_quant_layers(model, get_preset(preset), None, None, "auto")
            view = layers[fc1].fused_view(norm_eps=1e-6)

            def fused():
                view.arm_norm_modulate(ada[:, 0:1], ada[:, 1:2], tokens // 2)
                return view(xf)
            fused()
            out[f"fused_fc1_{preset}_plan_us"] = host_us(fused)
            wdata = view.quantized_weight().data

            def fused_replanned():
                wdata._viditq_fused_plans = {}
                return fused()
            out[f"fused_fc1_{preset}_replanned_us"] = host_us(fused_replanned)
        except Exception as e:
            traceback.print_exc()
            out[f"fused_{preset}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    log(f"launch overhead (host us per call): {out}")
    RESULT["launch_overhead"] = out
    write_outputs()
    return out


# ---------------------------------------------------------------------------------------------------------------
# profiler breakdown
# ---------------------------------------------------------------------------------------------------------------
def kernel_kind(name: str) -> str:
    n = name.lower()
    # Inductor-generated, named after what it fused: a quantize has the abs-max reduction (names that only mention
    # our ops, e.g. triton_poi_fused_add_prologue_quant_linear_..., are the pointwise work around them)
    if n.startswith("triton_") and "amax" in n:
        return "inductor_fused_quantize"
    if "_prologue_quant" in n:
        return "prologue_quantize"
    if "_act_quant" in n or "_aq_" in n:
        return "act_quantize"
    if "_attn_fwd" in n or "_kv_prep" in n or "flash" in n or "fmha" in n or "attention" in n or "sdpa" in n \
            or "cudnn" in n and "attn" in n:
        return "attention"
    if "_qgemm" in n or "gemm" in n or "nvjet" in n or "cutlass" in n or "xmma" in n or "_int_mm" in n \
            or "scaled_mm" in n or "cublas" in n or "sm90_" in n or "matmul" in n:
        return "gemm"
    if "layer_norm" in n or "layernorm" in n or "norm" in n:
        return "norm"
    if "gelu" in n:
        return "gelu"
    if n.startswith("triton_") or "fused" in n:
        return "inductor_fused"
    if "elementwise" in n or "vectorized" in n or "copy" in n or "cat" in n or "reduce" in n or "fill" in n:
        return "elementwise_other"
    return "other"


@torch.no_grad()
def profile_step(variant: str, model, px: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    x, t, ctx = inputs(px)
    for _ in range(2):
        model(x, t, ctx)
    sync()
    with profile(activities=[ProfilerActivity.CPU if SMOKE else ProfilerActivity.CUDA]) as prof:
        model(x, t, ctx)
        sync()
    kinds, top = {}, {}
    for ev in prof.key_averages():
        dt = getattr(ev, "self_device_time_total", None)
        if dt is None:
            dt = getattr(ev, "self_cuda_time_total", 0)
        if not dt or ev.key.startswith("ProfilerStep"):
            continue
        if getattr(ev, "device_type", None) is not None and "CUDA" not in str(ev.device_type) and not SMOKE:
            continue
        if SMOKE:
            dt = ev.self_cpu_time_total
        k = kernel_kind(ev.key)
        kinds[k] = kinds.get(k, 0.0) + dt / 1e3
        top[ev.key[:90]] = top.get(ev.key[:90], 0.0) + dt / 1e3
    total = sum(kinds.values())
    res = {"variant": variant, "resolution": px, "kernel_ms_total": round(total, 3),
           "per_block_ms": {k: round(v / ARGS.depth, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
           "share": {k: round(v / total, 3) for k, v in kinds.items()} if total else {},
           "top_kernels_ms": dict(sorted(((k, round(v, 3)) for k, v in top.items()), key=lambda kv: -kv[1])[:14])}
    log(f"profile {variant} {px}px: total kernels {total:.2f} ms; per block " +
        ", ".join(f"{k} {v:.3f}" for k, v in res["per_block_ms"].items()))
    return res


# ---------------------------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------------------------
def write_outputs():
    path = OUT / f"e2e_{GPU_TAG}.json"
    RESULT["elapsed_s"] = round(elapsed(), 1)
    path.write_text(json.dumps(RESULT, indent=1, default=str))
    try:
        plot(OUT / f"e2e_{GPU_TAG}.png")
    except Exception as e:  # the plot must never lose the numbers
        log(f"plot failed: {e}")


def plot(path: pathlib.Path):
    from PIL import Image, ImageDraw

    rows = [r for r in RESULT["rows"] if r.get("speedup_vs_fp16")]
    if not rows:
        return
    variants = list(dict.fromkeys(r["variant"] for r in rows))  # rows of merged runs without a speedup: left out
    res = list(dict.fromkeys(r["resolution"] for r in rows))
    latest = {(r["variant"], r["resolution"]): r for r in rows}  # the last run that measured it
    bar, gap, h = 14, 18, 300
    width = 90 + len(variants) * (len(res) * 2 * bar + gap)
    img = Image.new("RGB", (max(width, 700), h + 150), "white")
    d = ImageDraw.Draw(img)
    # capped: an eager FP16 baseline that is host-bound (512 px) gives eager ratios of 5x; those bars are clipped
    # and carry their value
    top = min(3.0, max(2.0, max(max(r.get("speedup_vs_fp16") or 0, r.get("speedup_graph_vs_fp16") or 0)
                                for r in rows)))
    y0 = h + 20
    d.text((10, 5), f"PixArt-Sigma-size DiT, one step, batch 2 (CFG), bf16 = 1.0 ({GPU}); solid: eager, light: "
                    f"CUDA graph", fill="black")
    colors = {512: ((60, 110, 200), (150, 180, 235)), 1024: ((200, 90, 60), (240, 170, 150))}
    for target, color in ((1.0, "black"), (1.7, (0, 150, 0))):
        yy = y0 - int((h - 20) * target / top)
        d.line([(60, yy), (width, yy)], fill=color)
        d.text((5, yy - 6), f"{target:.1f}x", fill=color)
    for vi, v in enumerate(variants):
        x = 80 + vi * (len(res) * 2 * bar + gap)
        for ri, px in enumerate(res):
            r = latest.get((v, px))
            if r is None:
                continue
            for j, key in enumerate(("speedup_vs_fp16", "speedup_graph_vs_fp16")):
                val = r.get(key)
                xx = x + (ri * 2 + j) * bar
                if not val:
                    d.text((xx, y0 - 12), "-", fill="gray")
                    continue
                bh = int((h - 20) * min(val, top) / top)
                d.rectangle([xx, y0 - bh, xx + bar - 2, y0], fill=colors.get(px, ((90, 90, 90),) * 2)[j])
                if val > top:
                    d.text((xx - 4, y0 - bh - 12), f"{val:.1f}", fill="black")
        d.text((x, y0 + 6 + (vi % 3) * 12), v[:22], fill="black")
    d.text((10, y0 + 50), "bars per variant: " + ", ".join(f"{px}px" for px in res) + " (eager, graph each)",
           fill="black")
    img.save(path)


def print_table():
    print("\nEnd-to-end, one denoising step (batch 2, bf16 baseline), " + GPU)
    print(f"{'variant':22s} {'run':>3s} {'px':>5s} {'ms eager':>9s} {'x fp16':>7s} {'ms graph':>9s} {'x fp16':>7s} "
          f"{'20 steps s':>10s} {'rel err':>8s}  note")
    for r in RESULT["rows"]:
        f = lambda v, fmt: (fmt % v) if isinstance(v, (int, float)) else "-"  # noqa: E731
        print(f"{r['variant']:22s} {str(r.get('run') or '-'):>3s} {r['resolution']:5d} {f(r.get('ms_per_step'), '%9.3f')} "
              f"{f(r.get('speedup_vs_fp16'), '%7.3f')} {f(r.get('ms_per_step_graph'), '%9.3f')} "
              f"{f(r.get('speedup_graph_vs_fp16'), '%7.3f')} {f(r.get('seconds_20_steps'), '%10.3f')} "
              f"{f(r.get('rel_err_vs_bf16'), '%8.4f')}  {(r.get('reason') or r.get('graph_failure') or '')[:60]}")


# ---------------------------------------------------------------------------------------------------------------
def main():
    log(f"{GPU}, torch {torch.__version__}, triton {RESULT.get('triton')}; variants {VARIANTS}; "
        f"resolutions {RESOLUTIONS}")
    if not ARGS.full_tune and not SMOKE:
        restrict_tuners()
    try:
        if not SMOKE and not ARGS.no_attn_bench:
            attention_microbench()
    except Exception as e:
        note(f"attention micro-benchmark failed: {type(e).__name__}: {e}")
        traceback.print_exc()
    model = build_fp_model()
    names = block_linear_names(model)
    RESULT["setup"].update({"inductor_options": INDUCTOR_OPTIONS, "depth": ARGS.depth, "hidden": HIDDEN, "heads": HEADS, "tokens": ARGS.tokens,
                            "quantized_linears": len(names), "dtype": str(DTYPE), "reps": ARGS.reps,
                            "steps": ARGS.steps})
    log(f"built the {ARGS.depth}-block model ({len(names)} block linears)")
    profiles = {}
    if not SMOKE and not ARGS.no_launch_bench:
        try:
            launch_overhead(model)
        except Exception as e:
            note(f"launch overhead bench failed: {type(e).__name__}: {e}")

    def run_variant(v):
        if elapsed() > ARGS.budget_s:
            return skipped(v, f"skipped: the run's time budget ({ARGS.budget_s:.0f}s) was spent")
        if v in COMPILED and elapsed() > ARGS.budget_s - ARGS.compile_reserve_s:
            return skipped(v, f"skipped: less than {ARGS.compile_reserve_s:.0f}s of budget left for a compile")
        t0 = time.time()
        old, target, extra, opaque, env_saved = None, model, {}, None, False
        try:
            if v == "fp16_strided":  # the channel-strided residual stream ComfyUI's own PixArt keeps
                fused_input.CONTIGUOUS_RESIDUAL = False
            elif v in ("fp16", "fp16_compile", "fp16_attn_fp8", "fp16_cudagraphs", "fp16_stepgraphs"):
                target = model if v != "fp16_compile" else compile_blocks(copy.deepcopy(model))
                if v == "fp16_cudagraphs":
                    torch._dynamo.reset()
                    target = CudaGraphsModel(model)
                if v == "fp16_stepgraphs":
                    target = StepGraphs(model)
                if v == "fp16_attn_fp8":
                    set_pixart_attention(model, "fp8")
            elif v in OURS:
                preset, changes, attn, compiled, quant_mode = OURS[v]
                cfg = dataclasses.replace(get_preset(preset), **changes)
                plan = plan_mlp8(model) if v in ("w4a8_plan", "w4a8_plan_stepgraphs") else None
                layers, summary = build_quant_layers(model, cfg, None, plan, "auto")
                switches = FUSE_SWITCHES.get(v, {})
                os.environ.update(switches)
                try:
                    old = (install_quant_layers if v in FUSED else replace_layers)(model, layers)
                finally:
                    for key in switches:
                        os.environ.pop(key, None)
                mods = [q for q in model.modules() if hasattr(q, "input_act")]
                extra = {"preset": preset, "calibrated": False, "quantized_linears": len(layers),
                         "fused_producers": sum(1 for q in mods if q.input_act not in (None, "none")
                                                or q.norm_eps is not None),
                         "plain_in_prologue_kernel": sum(1 for q in mods if q.input_act == "none"),
                         "residual_in_epilogue": sum(1 for q in mods if getattr(q, "fuse_residual", False))}
                if changes:
                    extra["config_changes"] = changes
                if attn:
                    set_pixart_attention(model, attn)
                    extra["attention"] = attn
                if v in STEPGRAPHS:
                    target = StepGraphs(model)
                    extra["fusion"] = "eager fused layers, replayed by kernels/step_graph.StepGraphs"
                if v in CUDAGRAPHS:
                    torch._dynamo.reset()
                    target = CudaGraphsModel(model)
                    extra["fusion"] = "eager fused layers, whole model under torch.compile(backend='cudagraphs')"
                if compiled:
                    env_saved = os.environ.get("VIDITQ_COMPILE_QUANT")
                    os.environ["VIDITQ_COMPILE_QUANT"] = quant_mode
                    if not hasattr(torch.ops.viditq, "quant_linear"):  # no custom ops: our calls opaque instead
                        opaque = OpaqueKernels().__enter__()
                    target = compile_blocks(copy.deepcopy(model))
                    extra["fusion"] = (f"torch.compile per block (Inductor fuses LayerNorm+modulate, GELU, "
                                       f"gate+residual); activation quantize under compile: {quant_mode}")
            elif v == "comfy_fp8_fast_equiv":
                old = replace_layers(model, comfy_fp8_layers(model))
            elif v.startswith("torchao"):
                try:
                    import torchao

                    extra["torchao"] = torchao.__version__
                    target = torchao_model(model, "int8" if "int8" in v else "fp8")
                except Exception as e:
                    return skipped(v, f"torchao unavailable or failed to quantize: {type(e).__name__}: {e}"[:400])
                if v.endswith("_compile"):
                    import torch._inductor.config as inductor_config

                    # torchao's own advice for int8 dynamic under compile: fuse the int_mm with its rescale
                    # (the peer at its best; a process-wide setting, so run this variant last)
                    if hasattr(inductor_config, "force_fuse_int_mm_with_mul") and "int8" in v:
                        inductor_config.force_fuse_int_mm_with_mul = True
                        extra["inductor"] = "force_fuse_int_mm_with_mul"
                    target = compile_blocks(target)
            else:
                return skipped(v, "unknown variant")
            extra["setup_s"] = round(time.time() - t0, 1)
            for px in RESOLUTIONS:
                if elapsed() > ARGS.budget_s + 60:
                    finish_row({"model": MODEL_NAME, "resolution": px, "variant": v, "ms_per_step": None,
                                "speedup_vs_fp16": None, "reason": "skipped: time budget"})
                    continue
                try:
                    finish_row(measure(v, target, px, dict(extra)))
                except Exception as e:
                    traceback.print_exc()
                    finish_row({"model": MODEL_NAME, "resolution": px, "variant": v, "ms_per_step": None,
                                "speedup_vs_fp16": None, "reason": f"{type(e).__name__}: {str(e)[:400]}"})
            if v == "fp16" and not ARGS.no_profile and 1024 in RESOLUTIONS:
                profiles["fp16"] = profile_step("fp16", target, 1024)
            if v in ("w8a8_fp8_attn", "w8a8_full", "w8a8_fp8_compile", "w8a8_fp8_norot_compile", "w8a8_sq_compile",
                     "fp16_compile", "w8a8_sq_fcompile", "w8a8_sq_fpcompile", "w8a8_sq_frcompile",
                     "w8a8_frcompile", "w8a8_stepgraphs", "w4a8_stepgraphs", "w4a8_plan_stepgraphs",
                     "w4a8_g128fast_stepgraphs") \
                    and not ARGS.no_profile and 1024 in RESOLUTIONS \
                    and elapsed() < ARGS.budget_s:
                try:
                    profiles[v] = profile_step(v, target, 1024)
                except Exception as e:
                    note(f"profile of {v} failed: {e}")
            RESULT["profile"] = profiles
            write_outputs()
        except Exception as e:
            traceback.print_exc()
            skipped(v, f"setup failed: {type(e).__name__}: {str(e)[:400]}")
        finally:
            if opaque is not None:
                opaque.__exit__(None, None, None)
            if env_saved is not False:
                os.environ.pop("VIDITQ_COMPILE_QUANT", None)
                if env_saved is not None:
                    os.environ["VIDITQ_COMPILE_QUANT"] = env_saved
            set_pixart_attention(model, "off")
            fused_input.CONTIGUOUS_RESIDUAL = True
            if old is not None:
                replace_layers(model, old)
            if target is not model:
                del target
            gc.collect()
            if not SMOKE:
                torch.cuda.empty_cache()
            if v in COMPILED:
                torch._dynamo.reset()

    probed = False
    for v in VARIANTS:
        if v in COMPILED and not probed and not SMOKE and elapsed() < ARGS.budget_s - ARGS.compile_reserve_s:
            probed = True
            try:
                RESULT["compile_and_graphs"]["probe_fullgraph"] = compile_probe(model)
            except Exception as e:
                note(f"compile probe failed: {type(e).__name__}: {e}")
            gc.collect()
            torch.cuda.empty_cache()
        run_variant(v)
        if v in COMPILED:
            RESULT["compile_and_graphs"][v] = {
                "graph_breaks": _graph_breaks(),
                "rows": [{k: r.get(k) for k in ("resolution", "ms_per_step", "ms_per_step_graph", "graph_failure",
                                                "reason")} for r in RESULT["rows"] if r["variant"] == v]}
            write_outputs()
    # what graphs and compile did for our layers, in words
    for r in RESULT["rows"]:
        if r.get("graph_failure"):
            note(f"CUDA graph capture failed for {r['variant']} at {r['resolution']}px: {r['graph_failure']}")
    RESULT["tuner"] = {"attention": {str(k): str(v) for k, v in triton_attention.tuner.best.items()}}
    write_outputs()
    print_table()


def _graph_breaks():
    try:
        from torch._dynamo.utils import counters

        gb = dict(counters.get("graph_break", {}))
        counters.clear()
        return {k[:200]: v for k, v in list(gb.items())[:12]}
    except Exception as e:
        return f"unavailable: {e}"


if __name__ == "__main__":
    if ARGS.merge:
        merge_runs(ARGS.merge)
        write_outputs()
        print_table()
    else:
        main()
