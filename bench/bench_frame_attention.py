"""Temporal (frame) attention on the GPU: our one-launch kernel vs torch SDPA (GPU only; never run in CI).

For video-DiT shapes (B = 2 for CFG, S spatial positions, H = 16 heads of 72, T frames) it first checks the kernel
against exact fp32 attention (odd shapes too), then times CUDA-graph replays of
  sdpa          SDPA on contiguous [B*S, H, T, D] tensors (the attention kernel alone, cuDNN / flash);
  sdpa_copies   SDPA fed from the qkv output's [B, S, H, T, D] views: the reshape copies in and the copy back to
                the tokens' order (what the model's fallback runs, and about what the official rearranges cost);
  ours          kernels/triton_frame_attention.py on the same views (no copies);
and the byte floor (q, k, v read once, the output written once, at the measured copy bandwidth).
Writes bench/results/frame_attention_<gpu>.json and prints a table.

    python bench/bench_frame_attention.py --out bench/results
"""
import argparse
import json
import pathlib
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _viditq import ROOT, import_viditq  # noqa: E402

SHAPES = [  # (B, T, S, H, D, what)
    (2, 16, 1024, 16, 72, "OpenSORA-1.0 16x512^2"),
    (2, 16, 4096, 16, 72, "16 frames at 1024^2"),
    (2, 32, 1024, 16, 72, "32 frames at 512^2"),
    (2, 8, 2304, 16, 72, "OpenSORA-1.2 short clip"),
    (2, 51, 1024, 16, 72, "OpenSORA-1.2 ~4 s (51 latent frames)"),
]
CHECK_SHAPES = [(1, 5, 7, 3, 72), (2, 17, 33, 16, 72), (1, 64, 5, 2, 64), (2, 1, 9, 4, 72), (1, 12, 3, 2, 40)]


def _qkv(b, t, s, h, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(b, t, s, 3, h, d, device="cuda", generator=g).to(dtype)
    return qkv.permute(3, 0, 2, 4, 1, 5).unbind(0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_frame_attention.py needs a CUDA GPU")
    import triton

    import_viditq()
    from viditq.kernels import triton_frame_attention as tfa
    from viditq.kernels.reference_attention import attention_exact, frame_attention_reference

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    bench = lambda fn: triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")  # noqa: E731
    src = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    bw = 2 * src.numel() / (bench(lambda: dst.copy_(src)) * 1e-3)  # bytes read + written per second

    checks = []
    for shape in CHECK_SHAPES + [s[:5] for s in SHAPES[:1]]:
        q, k, v = _qkv(*shape, dtype, seed=sum(shape))
        out = tfa.frame_attention(q, k, v, tfa.new_output(q).fill_(float("nan")))
        torch.cuda.synchronize()
        ref = attention_exact(q.float(), k.float(), v.float())
        err = float((out.float() - ref).abs().max() / ref.abs().max())
        ok = bool(torch.isfinite(out).all()) and err < 0.02
        checks.append({"shape": list(shape), "max_err_rel": err, "correct": ok, "config": list(tfa.last_config)})
        print(f"check {shape}: max err / max |out| {err:.2e} {'ok' if ok else 'WRONG'}", flush=True)

    rows = []
    for b, t, s, h, d, what in SHAPES:
        q, k, v = _qkv(b, t, s, h, d, dtype)
        qc, kc, vc = (x.reshape(b * s, h, t, d) for x in (q, k, v))  # contiguous copies
        out = tfa.frame_attention(q, k, v)
        ref = frame_attention_reference(q, k, v)
        err = float((out.float() - ref.float()).abs().max() / ref.float().abs().max())
        floor_ms = 4 * q.numel() * q.element_size() / bw * 1e3
        times = {"sdpa": bench(lambda: F.scaled_dot_product_attention(qc, kc, vc)),
                 "sdpa_copies": bench(lambda: frame_attention_reference(q, k, v)),
                 "ours": bench(lambda: tfa.frame_attention(q, k, v, out))}
        for variant, ms in times.items():
            rows.append({"B": b, "T": t, "S": s, "H": h, "D": d, "what": what, "variant": variant, "ms": ms,
                         "floor_ms": floor_ms, "x_floor": ms / floor_ms, "speedup_vs_sdpa": times["sdpa"] / ms,
                         "correct": err < 0.02, **({"config": list(tfa.last_config), "max_err_vs_sdpa": err}
                                                    if variant == "ours" else {})})
        print(f"{what}: " + ", ".join(f"{k} {v * 1e3:.1f} us" for k, v in times.items()) +
              f"; floor {floor_ms * 1e3:.1f} us; err vs SDPA {err:.1e}; config {tfa.last_config}", flush=True)

    gpu = torch.cuda.get_device_name()
    result = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "dtype": args.dtype,
              "copy_bandwidth_GBps": bw / 1e9, "command": "python bench/bench_frame_attention.py --out bench/results",
              "checks": checks, "rows": rows}
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"frame_attention_{gpu.replace(' ', '_').lower()}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"\n{'shape':<38} {'sdpa us':>9} {'+copies':>9} {'ours':>9} {'x floor':>8} {'vs sdpa':>8}")
    for i in range(0, len(rows), 3):
        r0, r1, r2 = rows[i:i + 3]
        print(f"{r0['what']:<38} {r0['ms'] * 1e3:>9.1f} {r1['ms'] * 1e3:>9.1f} {r2['ms'] * 1e3:>9.1f} "
              f"{r2['x_floor']:>8.2f} {r2['speedup_vs_sdpa']:>7.2f}x")
    print(f"checks: {sum(c['correct'] for c in checks)} of {len(checks)} correct; wrote {path}")


if __name__ == "__main__":
    main()
