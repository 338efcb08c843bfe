"""Does Triton's automatic warp specialization (`tl.range(..., warp_specialize=True)`) run on this GPU? (GPU only)

Why: the K = 1152 GEMMs keep the tensor cores 59-63 % busy (ncu, bench/NOTES_kernels.md); a producer warp group
running ahead of the MMA + epilogue groups is what would hide the per-tile cost. Triton 3.6 compiles these forms
for sm_90a (TTGIR `ttg.warp_specialize`, one TMA producer + two consumer groups, setmaxnreg 232), but on the lent
H200 (torch 2.11, Triton 3.6, 2026-11-26) every form hung: the kernel never finished within 30 s (the plain TMA
kernel of the same shape: 155 us). Until this probe prints OK for a form, no warp-specialized kernel goes into the
tuner's candidates (a hang there would hang the user's sampler).

    python bench/probe_warp_specialize.py            # each form in its own process, 30 s limit each
Forms: inner (one tile per program, the K loop specialized), outer_const / outer_rt (persistent, the tile loop
specialized, step constexpr / runtime). int8 codes, 8192 x 1152 x 1152, checked against a float matmul.
"""
import subprocess
import sys
import time

FORMS = ("inner", "outer_const", "outer_rt")


def run_form(variant: str):
    import torch
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    @triton.jit
    def _ids(tile, N, BN: tl.constexpr):
        npn = tl.cdiv(N, BN)
        return tile // npn, tile % npn

    @triton.jit
    def k_outer(a_desc, b_desc, C, AS, M, N, K, NP, NPC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                BK: tl.constexpr, CONST: tl.constexpr):
        num_tiles = tl.cdiv(M, BM) * tl.cdiv(N, BN)
        step = NPC if CONST else NP
        for tile in tl.range(tl.program_id(0), num_tiles, step, warp_specialize=True):
            pm, pn = _ids(tile, N, BN)
            acc = tl.zeros((BM, BN), tl.int32)
            for ki in range(tl.cdiv(K, BK)):
                acc = tl.dot(a_desc.load([pm * BM, ki * BK]), b_desc.load([pn * BN, ki * BK]).T, acc,
                             out_dtype=tl.int32)
            om = pm * BM + tl.arange(0, BM)
            on = pn * BN + tl.arange(0, BN)
            out = acc.to(tl.float32) * tl.load(AS + om)[:, None]
            tl.store(C + om[:, None] * N + on[None, :], out.to(tl.bfloat16))

    @triton.jit
    def k_inner(a_desc, b_desc, C, AS, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pm, pn = _ids(tl.program_id(0), N, BN)
        acc = tl.zeros((BM, BN), tl.int32)
        for ki in tl.range(0, tl.cdiv(K, BK), warp_specialize=True):
            acc = tl.dot(a_desc.load([pm * BM, ki * BK]), b_desc.load([pn * BN, ki * BK]).T, acc, out_dtype=tl.int32)
        om = pm * BM + tl.arange(0, BM)
        on = pn * BN + tl.arange(0, BN)
        out = acc.to(tl.float32) * tl.load(AS + om)[:, None]
        tl.store(C + om[:, None] * N + on[None, :], out.to(tl.bfloat16))

    M, K, N, BM, BN, BK = 8192, 1152, 1152, 128, 128, 128
    a = torch.randint(-100, 100, (M, K), dtype=torch.int8, device="cuda")
    b = torch.randint(-100, 100, (N, K), dtype=torch.int8, device="cuda")
    s = torch.rand(M, device="cuda")
    c = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    ad = TensorDescriptor(a, [M, K], [K, 1], [BM, BK])
    bd = TensorDescriptor(b, [N, K], [K, 1], [BN, BK])
    nsm = torch.cuda.get_device_properties(0).multi_processor_count
    if variant == "inner":
        def fn():
            k_inner[((M // BM) * (N // BN),)](ad, bd, c, s, M, N, K, BM=BM, BN=BN, BK=BK, num_warps=4, num_stages=3)
    else:
        def fn():
            k_outer[(nsm,)](ad, bd, c, s, M, N, K, nsm, NPC=nsm, BM=BM, BN=BN, BK=BK, CONST=variant == "outer_const",
                            num_warps=4, num_stages=3)
    fn()
    torch.cuda.synchronize()
    ref = (a.float() @ b.float().T) * s[:, None]
    err = ((c.float() - ref).norm() / ref.norm()).item()
    t = triton.testing.do_bench(fn, warmup=5, rep=30)
    print(f"OK err {err:.1e} {t * 1e3:.1f} us", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        run_form(sys.argv[1])
        sys.exit(0)
    for form in FORMS:
        t0 = time.time()
        try:
            r = subprocess.run([sys.executable, __file__, form], capture_output=True, text=True, timeout=30)
            ok = [ln for ln in r.stdout.splitlines() if ln.startswith("OK")]
            status = ok[0] if ok else f"failed (rc {r.returncode}): {r.stderr.strip()[-200:]}"
        except subprocess.TimeoutExpired:
            status = "HUNG (no result within 30 s)"
        print(f"{form:12s} {status}   [{time.time() - t0:.0f} s]", flush=True)
