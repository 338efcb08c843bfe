"""GPU only: the fused producer + per-token quantize kernels (kernels/triton_prologue_quant.py) against their byte
floor and against what Inductor generates for the same torch code (what the compiled model ran before).

For each DiT shape (PixArt 512 / 1024 px and STDiT 16x512^2 token counts, K = 1152 LayerNorm+modulate, K = 4608
GELU): checks the kernel against the torch reference first, then times (median of CUDA-graph replays,
do_bench_cudagraph: the kernels alone, without the host's launch cost):
  ours      the Triton kernel (one read of x, int8 / fp8 codes + fp32 scales written)
  inductor  torch.compile of the same torch expression (reference twin), tuned as the e2e bench tunes it
  eager     the torch reference, eager
  aq_plain  (prologue "none" only) triton_act_quant's per-token quantize without rotation, the kernel unfused
            unrotated layers call in eager
  aq_mma    (rotated rows, prologue "none") triton_act_quant's tensor-core Hadamard kernels (VIDITQ_AQ_PQ=0): what
            rotated layers ran before the transform kernel; aq_tuned: that module's tuner with "pq" offered too
and the tuner's time for every candidate config, and the byte floor (x read once + codes + scales written, at the measured copy bandwidth).

    python bench/bench_prologue.py --out bench/results                   # unrotated and rotated (block 128)
    python bench/bench_prologue.py --out bench/results --had 128         # rotated rows only
Rows of earlier runs that this run does not measure are kept in the JSON (with the command that made them).
"""
import argparse
import json
import os
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _viditq import import_viditq  # noqa: E402

viditq = import_viditq()
from viditq.kernels import reference  # noqa: E402
from viditq.kernels import triton_act_quant as taq  # noqa: E402
from viditq.kernels import triton_prologue_quant as tpq  # noqa: E402

SHAPES = [  # (M, K, prologue): tokens of a CFG batch of 2
    (2048, 1152, "norm_modulate"), (2048, 4608, "gelu_tanh"),
    (8192, 1152, "norm_modulate"), (8192, 4608, "gelu_tanh"),
    (32768, 1152, "norm_modulate"), (32768, 4608, "gelu_tanh"),
    (8192, 1152, "none"), (32768, 1152, "none"), (8192, 4608, "none"),  # the plain per-token quantize
    (8191, 1152, "norm_modulate"), (1, 4608, "gelu_tanh"), (129, 1152, "none"),  # odd sizes: correctness
]


def copy_bandwidth() -> float:
    import triton.testing

    a = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=10, rep=50, return_mode="median")
    return 2 * a.numel() / (ms * 1e-3)


def main():
    import triton.testing

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "results"))
    p.add_argument("--fmts", default="int8,fp8")
    p.add_argument("--had", default="0,128", help="Hadamard blocks to run (0: no rotation)")
    p.add_argument("--prologues", default="none,gelu_tanh,norm_modulate", help="prologues to run")
    args = p.parse_args()
    hads = [int(h) for h in args.had.split(",")]
    bw = copy_bandwidth()
    rows = []
    torch._inductor.config.coordinate_descent_tuning = True
    torch._inductor.config.triton.multi_kernel = 1
    for fmt in args.fmts.split(","):
        qmax = 448 if fmt == "fp8" else 127
        for (m, k, pro), had in [(sh, h) for h in hads for sh in SHAPES if sh[2] in args.prologues.split(",")]:
            g = torch.Generator(device="cuda").manual_seed(m + k)
            x = (torch.randn(m, k, device="cuda", generator=g) * 2).to(torch.bfloat16)
            rows_per_sample = m // 2 if m % 2 == 0 else m
            ada = (torch.randn(m // rows_per_sample, 6, k, device="cuda", generator=g) * 0.3).to(torch.bfloat16)
            shift, scale = ada[:, 0:1], ada[:, 1:2]
            mult = torch.rand(k, device="cuda", generator=g) + 0.5
            fargs = (x, pro, shift, scale, rows_per_sample, 1e-6, mult, fmt, qmax, had)
            a = tpq.prologue_quantize(*fargs)
            r = reference.prologue_quantize(*fargs)
            diff = (a.q.float() - r.q.float()).abs()
            tol = 1 if fmt == "int8" else None
            # the GPU's tanh GELU uses the hardware tanh (rel. error 2^-11, triton_prologue_quant._HW_TANH): its
            # scales and codes are held to that, the rest to fp32 rounding (codes differ at ties only)
            hw = pro == "gelu_tanh"
            ok = bool(torch.allclose(a.scale, r.scale, rtol=1e-3 if hw else 1e-4, atol=0))
            frac = float((diff > 0).float().mean())
            ok = ok and frac < (2e-2 if hw else 2e-3) and (tol is None or float(diff.max()) <= tol)
            row = {"M": m, "K": k, "prologue": pro, "fmt": fmt, "had": had, "correct": ok, "codes_differ": frac,
                   "config": list(tpq.last_config)}
            if m >= 2048 and m % 2 == 0:
                # CUDA-graph replays: kernel time only (eager timing here is the host's launch path)
                ours = triton.testing.do_bench_cudagraph(lambda: tpq.prologue_quantize(*fargs), rep=30,
                                                         return_mode="median")

                hmat = reference.hadamard_matrix(max(had, 1), x.device)  # made here: no host copy in the graph

                def torch_twin(x, shift, scale, mult):
                    xf = reference.apply_prologue(x, pro, shift, scale, rows_per_sample, 1e-6) * mult
                    if had:
                        xf = (xf.reshape(m, k // had, had) @ hmat).reshape(m, k)
                    y = reference.quantize_activation(xf, None, 0, fmt, qmax)
                    return y.q, y.scale

                comp = torch.compile(torch_twin, fullgraph=True)
                comp(x, shift, scale, mult)
                ind = triton.testing.do_bench_cudagraph(lambda: comp(x, shift, scale, mult), rep=30,
                                                        return_mode="median")
                eager = triton.testing.do_bench_cudagraph(lambda: torch_twin(x, shift, scale, mult), rep=10,
                                                          return_mode="median")
                floor = (m * k * (x.element_size() + 1) + m * 4) / bw * 1e3
                row.update(ms=round(ours, 5), inductor_ms=round(ind, 5), eager_ms=round(eager, 5),
                           floor_ms=round(floor, 5), x_floor=round(ours / floor, 2),
                           inductor_x_floor=round(ind / floor, 2), speedup_vs_inductor=round(ind / ours, 2))
                if pro == "none" and not had:
                    taq.quantize_activation(x, mult, 0, fmt, qmax)
                    row["aq_plain_ms"] = round(triton.testing.do_bench_cudagraph(
                        lambda: taq.quantize_activation(x, mult, 0, fmt, qmax), rep=30, return_mode="median"), 5)
                if pro == "none" and had:
                    for name, pq in (("aq_tuned", "1"), ("aq_mma", "0")):
                        os.environ[taq._PQ_ENV] = pq
                        taq.quantize_activation(x, mult, had, fmt, qmax)
                        row[name + "_ms"] = round(triton.testing.do_bench_cudagraph(
                            lambda: taq.quantize_activation(x, mult, had, fmt, qmax), rep=30, return_mode="median"),
                            5)
                        row[name + "_config"] = str(taq.last_config)
                    os.environ.pop(taq._PQ_ENV)
                torch._dynamo.reset()
                row["tuner_us"] = {str(c): round(t * 1e3, 2) for c, t in
                                   next((v for kk, v in tpq.tuner.timings.items()
                                         if kk[0] == k and kk[4] == tpq.PROLOGUES[pro] and kk[6] == fmt
                                         and kk[1] == tpq.m_bucket(m) and kk[7] == had), {}).items()}
            rows.append(row)
            print(json.dumps(row), flush=True)
    gpu = torch.cuda.get_device_name()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"prologue_{gpu.lower().replace(' ', '_').replace('-', '_')}.json"
    command = "python bench/bench_prologue.py " + " ".join(sys.argv[1:])
    for r in rows:
        r["command"] = command
    new_keys = {_row_key(r) for r in rows}
    kept = []
    if path.exists():  # an earlier run's rows that this one did not measure
        old = json.loads(path.read_text())
        kept = [dict(r, command=r.get("command", old.get("command"))) for r in old.get("rows", [])
                if _row_key(r) not in new_keys]
    path.write_text(json.dumps({"gpu": gpu, "command": command, "torch": torch.__version__,
                                "triton": __import__("triton").__version__,
                                "copy_bandwidth_GBps": round(bw / 1e9, 1), "rows": kept + rows}, indent=1))
    print("\n| M | K | prologue | had | fmt | ok | ours ms | x floor | config | Inductor ms | x floor | eager ms | "
          "aq_plain ms | aq_mma ms | aq_tuned ms |")
    for r in rows:
        if "ms" in r:
            print(f"| {r['M']} | {r['K']} | {r['prologue']} | {r['had']} | {r['fmt']} | {r['correct']} | "
                  f"{r['ms']:.4f} | {r['x_floor']} | {r['config']} | {r['inductor_ms']:.4f} | "
                  f"{r['inductor_x_floor']} | {r['eager_ms']:.4f} | {r.get('aq_plain_ms', '–')} | "
                  f"{r.get('aq_mma_ms', '–')} | {r.get('aq_tuned_ms', '–')} {r.get('aq_tuned_config', '')} |")
        else:
            print(f"| {r['M']} | {r['K']} | {r['prologue']} | {r['had']} | {r['fmt']} | {r['correct']} | – | | | | |")


def _row_key(r):
    return (r["M"], r["K"], r["prologue"], r["fmt"], r.get("had", 0))


if __name__ == "__main__":
    main()
