#!/usr/bin/env python3
"""GPU only: the hot kernels of a quantized OpenSORA / PixArt step, each tuned first and then launched once inside
the NVTX range "prof", for Nsight Compute to read their hardware counters (what limits each: tensor pipe, shared
memory, DRAM, issue, stalls). Without ncu it prints each kernel's CUDA-graph time.

    ncu --clock-control none --nvtx --nvtx-include "prof/" --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section WarpStateStats \
        --section Occupancy python bench/profile_kernels.py
Kernel order in ncu's report = the order of the labels this script prints.
"""
import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _viditq import import_viditq  # noqa: E402

import_viditq()
from viditq.kernels import triton_gemm as tgemm  # noqa: E402
from viditq.kernels import triton_prologue_quant as tpq  # noqa: E402
from viditq.quant_core.quantizers import quantize_weight  # noqa: E402

GEMMS = [  # (M, K, N): OpenSORA 16x512^2 qkv / fc2 / proj, PixArt 1024 px proj
    (32768, 1152, 3456), (32768, 4608, 1152), (32768, 1152, 1152), (8192, 1152, 1152)]
PROLOGUES = [(32768, 1152, "norm_modulate", 128), (32768, 4608, "gelu_tanh", 128), (32768, 1152, "none", 128),
             (32768, 1152, "norm_modulate", 0)]


def gemm_case(m, k, n, fmt):
    g = torch.Generator(device="cuda").manual_seed(m + n)
    w = quantize_weight(torch.randn(n, k, device="cuda", generator=g) * 0.05, fmt="fp8" if fmt == "fp8" else "int")
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    a = tpq.prologue_quantize(x, "none", fmt=fmt, qmax=448 if fmt == "fp8" else 127)
    bias = torch.zeros(n, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    return lambda: tgemm.quantized_matmul(a, w, bias, torch.bfloat16, out=out)


def prologue_case(m, k, pro, had):
    g = torch.Generator(device="cuda").manual_seed(m + k)
    x = (torch.randn(m, k, device="cuda", generator=g) * 2).to(torch.bfloat16)
    ada = (torch.randn(2, 6, k, device="cuda", generator=g) * 0.3).to(torch.bfloat16)
    mult = torch.rand(k, device="cuda", generator=g) + 0.5
    return lambda: tpq.prologue_quantize(x, pro, ada[:, 0:1], ada[:, 1:2], m // 2, 1e-6, mult, "int8", 127, had)


def main():
    import triton.testing

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fmts", default="int8,fp8")
    p.add_argument("--only", default="gemm,prologue")
    args = p.parse_args()
    cases = []
    if "gemm" in args.only:
        for fmt in args.fmts.split(","):
            for m, k, n in GEMMS:
                cases.append((f"gemm {fmt} {m}x{k}x{n}", gemm_case(m, k, n, fmt), lambda: tgemm.last_config))
    if "prologue" in args.only:
        for m, k, pro, had in PROLOGUES:
            cases.append((f"quantize {pro} had{had} {m}x{k}", prologue_case(m, k, pro, had),
                          lambda: tpq.last_config))
    rows = []
    for label, fn, cfg in cases:
        fn()  # tunes (outside the NVTX range)
        torch.cuda.synchronize()
        c = cfg()
        us = triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3
        rows.append((label, c, us))
    torch.cuda.synchronize()
    for i, (label, fn, _) in enumerate(cases):
        torch.cuda.nvtx.range_push("prof")
        fn()
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    print("\nprofiled, in order:")
    for i, (label, c, us) in enumerate(rows):
        print(f"  {i}: {label:<44} {us:8.1f} us  config {c}")


if __name__ == "__main__":
    main()
