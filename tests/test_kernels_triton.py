"""Triton kernels vs the torch reference, on the CPU through TRITON_INTERPRET=1 (set by conftest.py).

Every kernel: the fused activation quantize (the one-pass flat kernel, plain and persistent with prefetch; the
two-pass chunk kernel; the legacy whole-row kernel), both Hadamard precisions, every code order (natural, parity,
perm32) with code sums; the pointer and persistent TMA GEMMs for int8 / int4 (per channel, group 64/128) / fp8
weights, symmetric and asymmetric, and the swapped W4A8 GEMMs (signed and raw-nibble; parity or perm32 codes, or
natural codes on split16 weights); fp16 / bf16 / fp32 in and out, odd sizes (M = 1, 7, 129), extreme tokens (one
1000x the rest, one all zero), outputs poisoned before each run.

What the interpreter cannot show (checked on the GPU by bench/bench_linear.py instead): the bf16 hi/lo split of
the Hadamard product (the interpreter's bf16 dot is broken, so the kernel uses an fp32 dot there; the fp16 fast
path is emulated by rounding to fp16 then an fp32 dot), the hardware fp8 conversion (the interpreter's truncates,
so the kernel rounds to the e4m3 grid itself there), speed.
"""
import dataclasses

import pytest
import torch

triton = pytest.importorskip("triton")

from viditq.kernels import dispatch, reference  # noqa: E402
from viditq.kernels import triton_act_quant as taq  # noqa: E402
from viditq.kernels import triton_gemm as tg  # noqa: E402
from viditq.kernels import triton_ops  # noqa: E402
from viditq.kernels.types import QuantizedWeight  # noqa: E402

HAS_FP8 = hasattr(torch, "float8_e4m3fn")
fp8_only = pytest.mark.skipif(not HAS_FP8, reason="this torch build has no float8_e4m3fn dtype")


def make_x(m, k, dtype, seed=0, extreme=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * (torch.rand(k, generator=g) * 3 + 0.2)
    if extreme and m > 1:
        x[0] *= 1000.0  # one token 1000x larger than the rest
        x[m // 2] = 0.0  # an all-zero token
    return x.to(dtype)


def make_w(n, k, fmt, group=0, asym=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (n, k // group) if group else (n,)
    scale = torch.rand(shape, generator=g) * 0.02 + 0.002
    zero = None
    if fmt == "int8":
        data = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        if asym:
            zero = torch.randint(-20, 21, shape, generator=g).float() + 0.25
    elif fmt == "int4":
        data = reference.pack_int4(torch.randint(-8, 8, (n, k), generator=g))
        if asym:
            zero = torch.randint(-3, 4, shape, generator=g).float()
    else:
        data = (torch.randn(n, k, generator=g) * 60).clamp(-448, 448).to(torch.float8_e4m3fn)
    return QuantizedWeight(data=data, scale=scale, zero=zero, fmt=fmt, in_features=k, group_size=group)


def rel_err(y, r):
    y, r = y.double(), r.double()
    assert torch.isfinite(y).all(), "non-finite output (unwritten or overflowed)"
    return ((y - r).norm() / r.norm().clamp_min(1e-30)).item()


OUT_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


# --------------------------------------------------------------------------------------------------------------
# fused activation quantize
def _poisoned(m, k, fmt, sum_group):
    q = torch.full((m, k), -128, dtype=torch.int8) if fmt == "int8" else \
        torch.full((m, k), float("nan")).to(torch.float8_e4m3fn)
    scale = torch.full((m,), float("nan"))
    qsum = torch.full((m, k // sum_group), -2 ** 31, dtype=torch.int32) if sum_group else None
    return q, scale, qsum


def _pick(k, had, sg, m, mode, perm=0, static=False):
    cands = taq.candidates(k, had, sg, bool(sg) and sg == k, m, perm, static)
    by = {"flat": [c for c in cands if c[0] == "flat" and not c[5]],
          "flat_pf": [c for c in cands if c[0] == "flat" and c[5]],
          "chunk": [c for c in cands if c[0] == "chunk"],
          "row": [c for c in cands if c[0] == "row"],
          "pq": [c for c in cands if c[0] == "pq"]}
    return (by[mode] or by["chunk"])[0]


def _run_aq(x, mult, had, fmt, qmax, static, sg, mode, prec=None, perm=False):
    """Run the kernel in `mode` ('flat', 'flat_pf', 'chunk', 'row', 'pq') into poisoned buffers ('pq': the whole-row
    transform kernel of triton_prologue_quant, offered for dynamic scales, no parity split; else 'chunk')."""
    k = x.shape[-1]
    m = x.reshape(-1, k).shape[0]
    bufs = _poisoned(m, k, fmt, sg)
    taq.tuner.force = _pick(k, had, sg, m, mode, taq.PERM_MODES[perm], static is not None)
    try:
        a = taq.quantize_activation(x, mult, had, fmt, qmax, static, sg, out=bufs, prec=prec, perm=perm)
    finally:
        taq.tuner.force = None
    assert a is not None
    return a


def _check_aq(a, r, fmt, had, exact):
    assert torch.isfinite(a.scale).all(), "scale not fully written"
    torch.testing.assert_close(a.scale, r.scale, rtol=2e-6, atol=0)
    if fmt == "int8":
        assert (a.q != -128).all(), "codes not fully written (or out of range)"
        dq = (a.q.int() - r.q.int()).abs()
        if exact:
            assert dq.max().item() == 0
        else:  # the rotation is summed in another order: a code may move by one at a rounding tie
            assert dq.max().item() <= 1 and (dq > 0).float().mean().item() < 5e-3
    else:
        qa, qr = a.q.float(), r.q.float()
        assert torch.isfinite(qa).all(), "fp8 codes not fully written"
        dq = (qa - qr).abs()
        if exact:
            assert dq.max().item() == 0
        else:  # at most one e4m3 step apart, rarely
            assert (dq <= 0.13 * torch.maximum(qa.abs(), qr.abs()) + 2.0 ** -9).all()
            assert (dq > 0).float().mean().item() < 5e-3
    # dequantized activations agree, which a wrong scale or rotation would not
    da, dr = reference.dequantize_activation(a), reference.dequantize_activation(r)
    assert rel_err(da, dr) < 2e-3
    if r.qsum is not None:
        assert (a.qsum != -2 ** 31).all(), "qsum not fully written"
        m, k = a.q.shape
        g = k // a.qsum.shape[1]
        torch.testing.assert_close(a.qsum, a.q.int().reshape(m, k // g, g).sum(-1, dtype=torch.int32))
        assert (a.qsum - r.qsum).abs().max().item() <= (0 if exact else g)


AQ_CASES = [
    # (M, K, dtype, had_block, mult, fmt, qmax, static, sum_group)
    (1, 64, torch.float16, 0, False, "int8", 127, False, 0),
    (7, 192, torch.bfloat16, 64, True, "int8", 127, False, 0),
    (129, 192, torch.float16, 16, True, "int8", 31, False, 64),
    (7, 192, torch.float32, 4, False, "int8", 7, False, 192),
    (129, 1152, torch.bfloat16, 128, True, "int8", 127, False, 128),
    (7, 1152, torch.float16, 128, False, "int8", 127, True, 0),
    (7, 4608, torch.bfloat16, 128, True, "int8", 127, False, 0),
    (7, 1152, torch.bfloat16, 0, True, "int8", 31, False, 1152),
    (3, 192, torch.bfloat16, 0, False, "int8", 127, True, 64),
]


@pytest.mark.parametrize("mode", ["flat", "flat_pf", "chunk", "pq"])
@pytest.mark.parametrize("case", AQ_CASES, ids=lambda c: f"M{c[0]}K{c[1]}-{str(c[2])[6:]}-h{c[3]}-q{c[6]}-s{c[8]}")
def test_act_quant_int8(case, mode):
    m, k, dt, had, use_mult, fmt, qmax, static, sg = case
    x = make_x(m, k, dt, seed=m + k)
    mult = torch.rand(k) + 0.5 if use_mult else None
    ss = torch.tensor(0.04) if static else None
    a = _run_aq(x, mult, had, fmt, qmax, ss, sg, mode)
    r = reference.quantize_activation(x, mult, had, fmt, qmax, ss, sg)
    _check_aq(a, r, fmt, had, exact=had <= 1)


@pytest.mark.parametrize("case", [AQ_CASES[1], AQ_CASES[4], AQ_CASES[7]], ids=["h64", "h128-s128", "rowsum"])
def test_act_quant_legacy_row_kernel(case, monkeypatch):
    """The previous whole-row kernel, still a tuner candidate on the GPU."""
    monkeypatch.setenv(taq._LEGACY_ENV, "1")
    m, k, dt, had, use_mult, fmt, qmax, static, sg = case
    x = make_x(m, k, dt, seed=k)
    mult = torch.rand(k) + 0.5 if use_mult else None
    a = _run_aq(x, mult, had, fmt, qmax, None, sg, "row")
    _check_aq(a, reference.quantize_activation(x, mult, had, fmt, qmax, None, sg), fmt, had, exact=had <= 1)


@fp8_only
@pytest.mark.parametrize("mode", ["flat", "chunk", "pq"])
@pytest.mark.parametrize("m,k,dt,had,use_mult,static", [
    (7, 192, torch.bfloat16, 0, False, False), (129, 192, torch.float16, 64, True, False),
    (1, 1152, torch.float32, 128, True, False), (7, 192, torch.bfloat16, 0, True, True)])
def test_act_quant_fp8(m, k, dt, had, use_mult, static, mode):
    x = make_x(m, k, dt, seed=3)
    mult = torch.rand(k) + 0.5 if use_mult else None
    ss = torch.tensor(0.05) if static else None
    a = _run_aq(x, mult, had, "fp8", 127, ss, 0, mode)
    r = reference.quantize_activation(x, mult, had, "fp8", 127, ss, 0)
    _check_aq(a, r, "fp8", had, exact=had <= 1)


@pytest.mark.parametrize("mode", ["flat", "flat_pf", "chunk"])
@pytest.mark.parametrize("m,k,dt,had", [(129, 1152, torch.bfloat16, 128), (7, 192, torch.float32, 64),
                                        (33, 256, torch.float16, 16)])
def test_act_quant_fast_precision(m, k, dt, had, mode):
    """prec="fast" (one fp16 product after a power-of-two prescale): the scale is the rotated abs-max to ~1e-3, and a
    code may differ from the fp32 reference's only where the reference value, on the kernel's own scale, lies
    within 0.05 of a rounding tie (a wrong rotation, scale or rounding moves codes everywhere)."""
    x = make_x(m, k, dt, seed=11)
    mult = torch.rand(k) + 0.5
    a = _run_aq(x, mult, had, "int8", 127, None, 0, mode, prec="fast")
    r = reference.quantize_activation(x, mult, had, "int8", 127, None, 0)
    assert torch.isfinite(a.scale).all() and (a.q != -128).all()
    torch.testing.assert_close(a.scale, r.scale, rtol=1e-3, atol=0)
    y = reference.block_hadamard(x.float() * mult, had)  # the fp32 rotated values
    v = y / a.scale[:, None]
    dist_to_tie = ((v - v.floor()) - 0.5).abs()
    diff = a.q.int() != torch.round(v).clamp(-127, 127).int()
    assert (a.q.int() - torch.round(v).clamp(-127, 127).int()).abs().max().item() <= 1
    assert diff.float().mean().item() < 0.03
    assert (dist_to_tie[diff] < 0.05).all(), "a code moved away from a rounding tie"
    # (1e-4 scale differences and the near-tie moves together: a few 1e-3 of the dequantized values at most)
    assert rel_err(reference.dequantize_activation(a), reference.dequantize_activation(r)) < 6e-3


@pytest.mark.parametrize("mode,perm", [(md, pm) for md in ("flat", "chunk") for pm in ("parity", "perm32")]
                         + [("pq", "perm32"), ("pq", False)])
@pytest.mark.parametrize("m,k,had,sg", [(7, 256, 64, 256), (129, 1152, 128, 128), (1, 192, 0, 64)])
def test_act_quant_code_orders(m, k, had, sg, perm, mode):
    """The W4A8 layer's code orders, with the code sums the raw-nibble GEMMs use (natural order: split16 weights;
    "pq": the whole-row transform kernel's W4A8 store)."""
    x = make_x(m, k, torch.bfloat16, seed=k + m)
    mult = torch.rand(k) + 0.5
    if mode == "pq":
        cands = taq.candidates(k, had, sg, sg == k, m, taq.PERM_MODES[perm], False)
        assert any(c[0] == "pq" for c in cands)
    a = _run_aq(x, mult, had, "int8", 127, None, sg, mode, perm=perm)
    r = reference.quantize_activation(x, mult, had, "int8", 127, None, sg)
    rq = _perm_codes(r.q, perm)
    assert (a.q != -128).all(), "codes not fully written"
    dq = (a.q.int() - rq.int()).abs()
    assert dq.max().item() <= (0 if had <= 1 else 1) and (dq > 0).float().mean().item() < 5e-3
    torch.testing.assert_close(a.scale, r.scale, rtol=2e-6, atol=0)
    assert (a.qsum != -2 ** 31).all(), "qsum not fully written"
    qn = _unperm_codes(a.q, perm).int()  # the sums are over natural channel groups
    torch.testing.assert_close(a.qsum, qn.reshape(m, k // sg, sg).sum(-1, dtype=torch.int32))


def _perm_codes(q, perm):
    if perm in (True, "parity"):
        return torch.cat([q[:, 0::2], q[:, 1::2]], dim=1)
    if perm == "perm32":
        m, k = q.shape
        return q.reshape(m, k // 32, 16, 2).transpose(2, 3).reshape(m, k)
    return q


def _unperm_codes(q, perm):
    m, k = q.shape
    if perm in (True, "parity"):
        return torch.stack([q[:, : k // 2], q[:, k // 2:]], dim=-1).reshape(m, k)
    if perm == "perm32":
        return q.reshape(m, k // 32, 2, 16).transpose(2, 3).reshape(m, k)
    return q


def test_act_quant_leading_dims_and_empty():
    x = make_x(2 * 5, 128, torch.float16).reshape(2, 5, 128)
    a = taq.quantize_activation(x, None, 16, "int8", 127, None, 0)
    r = reference.quantize_activation(x, None, 16, "int8", 127, None, 0)
    assert a.q.shape == (10, 128)
    _check_aq(a, r, "int8", 16, exact=False)
    e = taq.quantize_activation(torch.zeros(0, 64), None, 0, "int8", 127, None, 0)
    assert e.q.shape == (0, 64) and e.scale.shape == (0,)


def test_act_quant_unsupported_returns_none():
    x = torch.randn(3, 96)
    assert taq.quantize_activation(x, None, 64, "int8", 127, None, 0) is None  # 96 % 64
    assert taq.quantize_activation(x, None, 0, "int8", 127, None, 48) is None  # group not a power of two
    assert taq.quantize_activation(x, None, 0, "int4", 7, None, 0) is None
    # triton_ops falls back to the reference for those
    a = triton_ops.quantize_activation(x, None, 0, "int8", 127, None, 48)
    r = reference.quantize_activation(x, None, 0, "int8", 127, None, 48)
    assert torch.equal(a.q, r.q) and torch.equal(a.qsum, r.qsum)


# --------------------------------------------------------------------------------------------------------------
# GEMMs with the fused epilogue
GEMM_CASES = [
    # (M, N, K, weight fmt, group, asym, out dtype, bias)
    (1, 72, 192, "int8", 0, False, torch.float16, True),
    (7, 200, 192, "int8", 0, True, torch.float32, False),
    (129, 72, 256, "int8", 64, False, torch.bfloat16, True),
    (7, 72, 256, "int8", 128, True, torch.float32, True),
    (7, 72, 192, "int4", 0, False, torch.float32, True),
    (129, 200, 192, "int4", 0, True, torch.float16, True),
    (7, 72, 256, "int4", 64, False, torch.float32, False),
    (1, 200, 256, "int4", 64, True, torch.bfloat16, True),
    (129, 72, 256, "int4", 128, True, torch.float32, True),
    (7, 72, 256, "int4", 128, False, torch.float16, True),
]


def _run_gemm(a, w, bias, out_dtype, kind, monkeypatch, a_perm=False):
    monkeypatch.setenv("VIDITQ_GEMM_KINDS", kind)
    m, n = a.q.shape[0], w.out_features
    out = torch.full((m, n), float("nan"), dtype=out_dtype)
    y = tg.quantized_matmul(a, w, bias, out_dtype, out=out, a_perm=a_perm)
    assert y is not None and y.data_ptr() == out.data_ptr()
    assert y.dtype == out_dtype and y.shape == (m, n)
    return y


@pytest.mark.parametrize("kind", ["ptr", "tma", "tmas", "tma2", "tma3"])
@pytest.mark.parametrize("case", GEMM_CASES,
                         ids=lambda c: f"M{c[0]}N{c[1]}K{c[2]}-{c[3]}-g{c[4]}-{'as' if c[5] else 's'}-{str(c[6])[6:]}")
def test_gemm_int(case, kind, monkeypatch):
    m, n, k, fmt, group, asym, odt, has_bias = case
    w = make_w(n, k, fmt, group, asym, seed=m + n)
    x = make_x(m, k, torch.float32, seed=k) * (0.01 if odt == torch.float16 else 1.0)  # fp16 out: stay finite
    sg = (group or k) if asym else 0
    a = reference.quantize_activation(x, None, 0, "int8", 127, None, sg)
    bias = (torch.randn(n) * 0.5).to(odt) if has_bias else None
    y = _run_gemm(a, w, bias, odt, kind, monkeypatch)
    exact = reference.quantized_matmul(a, w, bias, torch.float64)
    assert rel_err(y, exact) < OUT_TOL[odt]
    if asym:  # the zero-point correction matters: dropping it would be far off
        w0 = QuantizedWeight(w.data, w.scale, None, w.fmt, w.in_features, w.group_size)
        assert rel_err(reference.quantized_matmul(a, w0, bias, torch.float64), exact) > max(10 * OUT_TOL[odt], 0.05)


def test_persistent_grid_holds_only_resident_programs(monkeypatch):
    """A persistent kind asks for 2 or 3 programs per SM; the grid is cut to what one SM holds of the compiled kernel
    (registers in blocks of 256 per warp, shared memory + 1 KB per block), as on an H100: 64K registers, 228 KB."""
    import types

    monkeypatch.setattr(tg, "_sm_limits", lambda dev: (65536, 233472))
    def kern(regs, shared):  # what a compiled Triton kernel reports once loaded
        return types.SimpleNamespace(n_regs=regs, metadata=types.SimpleNamespace(shared=shared))

    assert tg.resident_per_sm(kern(168, 57360), 4, "cuda:0", 3) == 3   # 64 x 128, two stages
    assert tg.resident_per_sm(kern(238, 57360), 4, "cuda:0", 3) == 2   # the same with the residual epilogue
    assert tg.resident_per_sm(kern(128, 81944), 4, "cuda:0", 3) == 2   # three stages: shared memory for two
    assert tg.resident_per_sm(kern(255, 106520), 4, "cuda:0", 2) == 2
    assert tg.resident_per_sm(kern(255, 150000), 8, "cuda:0", 2) == 1
    assert tg.resident_per_sm(kern(0, 0), 4, "cuda:0", 3) == 3          # nothing known: as asked
    monkeypatch.setattr(tg, "_sm_limits", lambda dev: None)             # the interpreter
    assert tg.resident_per_sm(kern(255, 106520), 4, "cpu", 3) == 3
    assert tg._programs_per_sm("tma3") == 3 and tg._programs_per_sm("swapts2") == 2
    assert tg._programs_per_sm("tmas") == 1


@fp8_only
@pytest.mark.parametrize("kind", ["ptr", "tma", "tmas"])
@pytest.mark.parametrize("m,n,k,odt", [(1, 72, 192, torch.bfloat16), (129, 200, 192, torch.float32),
                                       (7, 72, 1152, torch.float16)])
def test_gemm_fp8(m, n, k, odt, kind, monkeypatch):
    w = make_w(n, k, "fp8", seed=m)
    x = make_x(m, k, torch.float32, seed=2) * (0.01 if odt == torch.float16 else 1.0)
    a = reference.quantize_activation(x, None, 0, "fp8", 127, None, 0)
    bias = torch.randn(n).to(odt)
    y = _run_gemm(a, w, bias, odt, kind, monkeypatch)
    assert rel_err(y, reference.quantized_matmul(a, w, bias, torch.float64)) < OUT_TOL[odt]


@pytest.mark.parametrize("kind", ["ptr", "tma", "tmas"])
@pytest.mark.parametrize("m,n,k,fmt,gate_rows,odt", [(7, 72, 192, "int8", 7, torch.bfloat16),
                                                     (130, 200, 192, "int8", 65, torch.float16),
                                                     (129, 72, 256, "fp8", 0, torch.bfloat16),
                                                     (6, 72, 192, "int8", -1, torch.float32),
                                                     (96, 72, 192, "int8", 32, torch.float32)])
def test_gemm_residual_epilogue(m, n, k, fmt, gate_rows, odt, kind, monkeypatch):
    """out = residual + gate_b * (GEMM + bias) in the epilogue: per-sample gates (gate_rows rows each; 32: whole
    32-row tiles per sample, the one-gate-row-per-tile path), no gate (0), one gate row for all samples (-1);
    checked against the fp64 reference and against the unfused add."""
    if fmt == "fp8" and not HAS_FP8:
        pytest.skip("this torch build has no float8_e4m3fn dtype")
    monkeypatch.setenv("VIDITQ_GEMM_KINDS", kind)
    w = make_w(n, k, fmt, seed=m)
    a = reference.quantize_activation(make_x(m, k, torch.float32, seed=5) * 0.05, None, 0,
                                      "fp8" if fmt == "fp8" else "int8", 127, None, 0)
    bias = torch.randn(n).to(odt)
    plain = reference.quantized_matmul(a, w, bias, torch.float64)
    res = (torch.randn(m, n) * float(plain.std())).to(odt)  # as large as the layer's output
    rows = gate_rows if gate_rows > 0 else m
    gate = None if gate_rows == 0 else torch.randn(1 if gate_rows < 0 else m // rows, n).to(odt)
    out = torch.full((m, n), float("nan"), dtype=odt)
    y = tg.quantized_matmul(a, w, bias, odt, out=out, residual=res, gate=gate, res_rows=rows)
    assert y is not None and y.data_ptr() == out.data_ptr() and not y.isnan().any()
    exact = reference.quantized_matmul(a, w, bias, torch.float64, res, gate, rows)
    assert rel_err(y, exact) < OUT_TOL[odt]
    g = 1.0 if gate is None else gate.double().repeat_interleave(rows if gate.shape[0] > 1 else m, 0)
    assert rel_err(exact, res.double() + g * plain) < 1e-12
    assert rel_err(y, plain) > 0.1  # the residual really was added


def test_gemm_residual_refusals():
    w = make_w(72, 192, "int8")
    a = reference.quantize_activation(make_x(6, 192, torch.float32), None, 0, "int8", 127, None, 0)
    with pytest.raises(ValueError, match="residual of shape"):
        tg.quantized_matmul(a, w, None, torch.float32, residual=torch.zeros(5, 72))
    with pytest.raises(ValueError, match="gate of shape"):
        tg.quantized_matmul(a, w, None, torch.float32, residual=torch.zeros(6, 72), gate=torch.zeros(4, 72),
                            res_rows=3)
    w4 = make_w(72, 192, "int4")
    assert tg.quantized_matmul(a, w4, None, torch.float32, residual=torch.zeros(6, 144)[:, ::2]) is None  # strided
    res, gate = torch.randn(6, 72), torch.randn(2, 72)
    y = triton_ops.quantized_matmul(a, w4, None, torch.float32, res, gate, 3)
    assert rel_err(y, reference.quantized_matmul(a, w4, None, torch.float64, res, gate, 3)) < 1e-5


@pytest.mark.parametrize("kind", ["ptr", "tma"])
def test_gemm_realistic_shape(kind, monkeypatch):
    """PixArt qkv (K=1152 -> N=3456; N=1152 for the slower-to-interpret TMA kernel), 129 tokens (a partial row
    tile), bf16 out; W8A8 on one kernel, W4A8 on the other."""
    m, k, n = 129, 1152, (3456 if kind == "ptr" else 1152)
    a = reference.quantize_activation(make_x(m, k, torch.bfloat16), None, 0, "int8", 127, None, 0)
    bias = torch.randn(n).to(torch.bfloat16)
    for fmt in ("int8",) if kind == "ptr" else ("int4",):
        w = make_w(n, k, fmt)
        y = _run_gemm(a, w, bias, torch.bfloat16, kind, monkeypatch)
        assert rel_err(y, reference.quantized_matmul(a, w, bias, torch.float64)) < OUT_TOL[torch.bfloat16]


W4_KINDS = {"parity": ["swap", "swapt", "swapts", "swapt2", "ptr", "tma"],
            "perm32": ["swap", "swapt", "swapts", "swapt2"],
            "split16": ["swap", "swapt", "swapts", "swapt2", "swapt3"]}  # weights repacked, codes in natural order


@pytest.mark.parametrize("layout,kind", [(lay, kd) for lay, kinds in W4_KINDS.items() for kd in kinds])
@pytest.mark.parametrize("m,n,k,group,asym,sums", [(7, 72, 256, 0, False, True), (33, 40, 256, 128, True, True),
                                                  (129, 72, 192, 0, False, False), (1, 40, 256, 64, True, True)])
def test_w4a8_layouts(m, n, k, group, asym, sums, layout, kind, monkeypatch):
    """W4A8 on reordered activation codes: the swapped kernels (int4 weights unpacked in registers as the wgmma's A
    operand; raw nibbles minus 8 * code sums when the sums are given, sign-corrected nibbles otherwise; perm32: one
    dot per K step) and the parity-split pointer / TMA kernels; split16: the weights in that byte order, the codes in
    natural order (what perm32 computes, the permutation moved to the weights); the oracle is the exact GEMM of the
    natural codes."""
    w = make_w(n, k, "int4", group, asym, seed=m + n)
    x = make_x(m, k, torch.float32, seed=k)
    sg = (group or k) if (asym or sums) else 0
    r = reference.quantize_activation(x, None, 0, "int8", 127, None, sg)
    want = reference.quantized_matmul(r, w, None, torch.float64)
    a = type(r)(q=_perm_codes(r.q, layout).contiguous(), scale=r.scale, qsum=r.qsum)
    a_perm = layout
    if layout == "split16":
        w = dataclasses.replace(w, data=reference.repack_int4(w.data, "pairs", "split16"), pack="split16")
        assert torch.equal(reference.weight_codes(w), reference.weight_codes(make_w(n, k, "int4", group, asym,
                                                                                    seed=m + n)))
        a_perm = False
        with pytest.raises(ValueError, match="natural order"):
            tg.quantized_matmul(a, w, None, torch.float32, a_perm="perm32")
    monkeypatch.setenv("VIDITQ_GEMM_KINDS", kind)
    cands = tg.candidates(m, n, k, True, group, True, True, 2 if layout == "split16" else taq.PERM_MODES[layout])
    assert all(c[0] == kind for c in cands)
    y = _run_gemm(a, w, None, torch.float32, kind, monkeypatch, a_perm=a_perm)
    assert rel_err(y, want) < 1e-5


@pytest.mark.parametrize("kind", W4_KINDS["perm32"])
@pytest.mark.parametrize("m,n,k,group,gate_rows,odt", [(8, 72, 256, 0, 4, torch.bfloat16),
                                                       (33, 40, 256, 128, -1, torch.float32),
                                                       (64, 72, 192, 0, 32, torch.float16),
                                                       (7, 40, 256, 0, 0, torch.float32)])
def test_w4a8_residual_epilogue(m, n, k, group, gate_rows, odt, kind, monkeypatch):
    """The swapped W4A8 kernels with the block's gated residual add in their epilogue (the tile turned back to
    tokens x channels first): per-sample gates (32: whole token tiles per sample, one gate row per tile), one gate
    for all (-1), no gate (0); against the fp64 reference on natural-order codes; outputs poisoned."""
    w = make_w(n, k, "int4", group, seed=m)
    r = reference.quantize_activation(make_x(m, k, torch.float32, seed=3) * 0.05, None, 0, "int8", 127, None,
                                      group or k)
    a = type(r)(q=_perm_codes(r.q, "perm32").contiguous(), scale=r.scale, qsum=r.qsum)
    bias = torch.randn(n).to(odt)
    plain = reference.quantized_matmul(r, w, bias, torch.float64)
    res = (torch.randn(m, n) * float(plain.std())).to(odt)
    rows = gate_rows if gate_rows > 0 else m
    gate = None if gate_rows == 0 else torch.randn(1 if gate_rows < 0 else m // rows, n).to(odt)
    monkeypatch.setenv("VIDITQ_GEMM_KINDS", kind)
    out = torch.full((m, n), float("nan"), dtype=odt)
    y = tg.quantized_matmul(a, w, bias, odt, out=out, residual=res, gate=gate, res_rows=rows, a_perm="perm32")
    assert y is not None and y.data_ptr() == out.data_ptr() and tg.last_config[0] == kind
    assert rel_err(y, reference.quantized_matmul(r, w, bias, torch.float64, res, gate, rows)) < OUT_TOL[odt]
    assert rel_err(y, plain) > 0.1  # the residual really was added


def test_gemm_k4608_small_tile(monkeypatch):
    """fc2-like K=4608 with the small-M candidate (BLOCK_K=128, BLOCK_M=16), an odd N."""
    m, k, n = 7, 4608, 40
    a = reference.quantize_activation(make_x(m, k, torch.float16), None, 0, "int8", 127, None, k)
    w = make_w(n, k, "int8", asym=True)
    monkeypatch.setenv("VIDITQ_GEMM_KINDS", "ptr")
    tg.tuner.force = ("ptr", 16, 64, 128, 1, 1, 4)
    try:
        out = torch.full((m, n), float("nan"), dtype=torch.float32)
        y = tg.quantized_matmul(a, w, None, torch.float32, out=out)
    finally:
        tg.tuner.force = None
    assert rel_err(y, reference.quantized_matmul(a, w, None, torch.float64)) < 1e-5


def test_gemm_unsupported_combos():
    a8 = reference.quantize_activation(torch.randn(3, 192), None, 0, "int8", 127, None, 0)
    assert tg.quantized_matmul(a8, make_w(8, 192, "int8", group=48), None, torch.float32) is None
    assert tg.quantized_matmul(a8, make_w(8, 192, "int8", asym=True), None, torch.float32) is None  # no qsum
    if HAS_FP8:
        assert tg.quantized_matmul(a8, make_w(8, 192, "fp8"), None, torch.float32) is None
        af = reference.quantize_activation(torch.randn(3, 192), None, 0, "fp8", 127, None, 0)
        assert tg.quantized_matmul(af, make_w(8, 192, "int8"), None, torch.float32) is None


# --------------------------------------------------------------------------------------------------------------
# the whole layer: fused quantize + GEMM through triton_ops, the call dispatch makes on CUDA
@pytest.mark.parametrize("dt,fmt,group,asym,had,layout", [
    (torch.float16, "int8", 0, True, 128, ""), (torch.bfloat16, "int4", 0, False, 64, "auto"),
    (torch.bfloat16, "int4", 128, True, 0, "parity"), (torch.float32, "int8", 64, False, 16, ""),
    (torch.float16, "int4", 64, False, 128, "perm32")])
def test_quant_linear_end_to_end(dt, fmt, group, asym, had, layout, monkeypatch):
    if layout:
        monkeypatch.setenv("VIDITQ_W4_LAYOUT", layout)
    b, t, k, n = 2, 33, 256, 72
    x = (make_x(b * t, k, torch.float32, seed=9) * (0.01 if dt == torch.float16 else 1.0)).to(dt).reshape(b, t, k)
    w = make_w(n, k, fmt, group, asym)
    mult = torch.rand(k) + 0.5
    bias = torch.randn(n).to(dt)
    sg = (group or k) if asym else 0
    y = triton_ops.quant_linear(x, w, bias, mult, had, "int8", 127, None, sg)
    assert y is not None and y.shape == (b * t, n) and y.dtype == dt
    # oracle: the reference quantize then the exact GEMM of those codes
    r = reference.quantized_matmul(reference.quantize_activation(x, mult, had, "int8", 127, None, sg), w, bias,
                                   torch.float64)
    assert rel_err(y, r) < max(OUT_TOL[dt], 3e-3)  # a code may differ by one at a rounding tie


@fp8_only
def test_quant_linear_fp8_end_to_end():
    x = make_x(9, 192, torch.bfloat16)
    w = make_w(40, 192, "fp8")
    y = triton_ops.quant_linear(x, w, None, None, 64, "fp8", 127, None, 0)
    r = reference.quantized_matmul(reference.quantize_activation(x, None, 64, "fp8", 127, None, 0), w, None,
                                   torch.float64)
    assert rel_err(y, r) < 1e-2


@pytest.mark.parametrize("fmt,group,asym,had,static", [
    ("int8", 0, True, 128, False), ("int4", 0, False, 64, False), ("int4", 64, True, 0, False),
    ("int8", 0, False, 16, True), pytest.param("fp8", 0, False, 64, False, marks=fp8_only)])
def test_quant_linear_plan_reuse(fmt, group, asym, had, static, monkeypatch):
    """The second call at a token bucket runs the layer's cached plan (no checks, no tuning), with the same results
    as the full path, for another token count in the bucket; an env var that changes the kernels makes a new plan."""
    k, n = 256, 72
    w = make_w(n, k, fmt, group, asym)
    mult = torch.rand(k) + 0.5
    bias = torch.randn(n).to(torch.bfloat16)
    ss = torch.tensor([0.05]) if static else None
    sg = (group or k) if asym else 0
    act = "fp8" if fmt == "fp8" else "int8"

    def check(m, seed):
        x = make_x(m, k, torch.float32, seed=seed).to(torch.bfloat16)
        y = triton_ops.quant_linear(x, w, bias, mult, had, act, 127, ss, sg)
        r = reference.quantized_matmul(reference.quantize_activation(x, mult, had, act, 127, ss, sg), w, bias,
                                       torch.float64)
        assert rel_err(y, r) < (1e-2 if fmt == "fp8" else max(OUT_TOL[torch.bfloat16], 3e-3))

    check(7, 1)
    assert len(w.data._viditq_plans) == 1
    monkeypatch.setattr(triton_ops._gemm, "supported", lambda *a: pytest.fail("the full path ran again"))
    check(5, 2)  # bucket 8 again: the plan
    check(8, 3)
    monkeypatch.undo()
    monkeypatch.setenv("VIDITQ_GEMM_KINDS", "ptr")
    check(6, 4)
    assert len(w.data._viditq_plans) == 2


def test_quant_linear_plan_takes_the_call_tensors():
    """A plan never runs a call it was not made for: a strided multiplier or bias goes the full path, and a weight
    with new scales (same codes) uses the new scales; a plan holds no tensor of the layer, so a dropped weight is
    freed at once (no reference cycle waiting for the garbage collector)."""
    import gc
    import weakref

    k, n = 256, 72
    w = make_w(n, k, "int8")
    mult = torch.rand(k) + 0.5
    bias = torch.randn(n)

    def check(w, mult, bias, seed):
        x = make_x(5, k, torch.float32, seed=seed)
        y = triton_ops.quant_linear(x, w, bias, mult, 16, "int8", 127, None, 0)
        r = reference.quantized_matmul(reference.quantize_activation(x, mult, 16, "int8", 127, None, 0), w, bias,
                                       torch.float64)
        assert rel_err(y, r) < 3e-3

    check(w, mult, bias, 1)  # makes the plan
    assert len(w.data._viditq_plans) == 1
    check(w, (torch.rand(2 * k) + 0.5)[::2], bias, 2)  # strided multiplier
    check(w, mult, torch.randn(2 * n)[::2], 3)  # strided bias
    w2 = QuantizedWeight(data=w.data, scale=w.scale * 3.0, zero=None, fmt="int8", in_features=k)
    check(w2, mult, bias, 4)  # same codes, new scales
    gc.disable()
    try:
        data = weakref.ref(w.data)
        del w, w2
        assert data() is None, "a plan keeps the weight alive"
    finally:
        gc.enable()


@pytest.mark.parametrize("prologue,had,residual,fmt", [
    ("norm_modulate", 128, True, "int8"), ("gelu_tanh", 0, False, "int8"), ("none", 64, True, "int8"),
    ("norm_modulate", 128, True, "int4"), ("gelu_tanh", 0, False, "int4"), ("norm_modulate", 128, True, "int4g128"),
    ("none", 0, False, "int4g64"), ("norm_modulate", 128, True, "int4s16"), ("gelu_tanh", 0, True, "int4g64s16"),
    pytest.param("norm_modulate", 0, True, "fp8", marks=fp8_only)])
def test_fused_layer_plan_reuse(prologue, had, residual, fmt, monkeypatch):
    """triton_ops.prologue_quant_linear (a fused layer: producer + quantize, GEMM + epilogue): the second call at a
    token bucket runs the cached FusedPlan, with the same results as the full path (per-sample adaLN vectors, the
    rotation, the gated residual); a call of another kind (no residual) makes its own plan. int4 weights: the
    quantize writes perm32 codes (split16 weights, "s16": natural-order codes) + row sums for the swapped W4A8
    kernel, whose epilogue adds the residual."""
    k, n, rows = 256, 72, 2
    split16 = fmt.endswith("s16")
    fmt = fmt[:-3] if split16 else fmt
    group = int(fmt[5:]) if fmt.startswith("int4g") else 0
    fmt = "int4" if group else fmt
    w = make_w(n, k, fmt, group)
    if split16:
        w = dataclasses.replace(w, data=reference.repack_int4(w.data, "pairs", "split16"), pack="split16")
    act = "fp8" if fmt == "fp8" else "int8"
    mult = torch.rand(k) + 0.5
    bias = torch.randn(n).to(torch.bfloat16)

    def check(m, seed, with_res):
        g = torch.Generator().manual_seed(seed)
        x = make_x(m, k, torch.float32, seed=seed).to(torch.bfloat16)
        ada = torch.randn(m // rows, 6, k, generator=g).to(torch.bfloat16)
        res = gate = None
        if with_res:
            res = torch.randn(m, n, generator=g).to(torch.bfloat16)
            gate = torch.randn(m // rows, n, generator=g).to(torch.bfloat16)
        y = triton_ops.prologue_quant_linear(x, prologue, ada[:, 0:1], ada[:, 1:2], rows, 1e-6, w, bias, mult, act,
                                             127, had, res, gate, rows)
        a = reference.prologue_quantize(x, prologue, ada[:, 0:1], ada[:, 1:2], rows, 1e-6, mult, act, 127, had)
        r = reference.quantized_matmul(a, w, bias, torch.float64, res, gate, rows)
        assert y.shape == (m, n) and y.dtype == x.dtype and rel_err(y, r) < (2e-2 if fmt == "fp8" else 1e-2)

    check(8, 1, residual)
    assert len(w.data._viditq_fused_plans) == 1
    if fmt == "int4":
        assert [p.w4 for p in w.data._viditq_fused_plans.values()] == [k // (group or k)]  # code-sum columns
        assert tg.last_config[0].startswith("swap")  # the raw-nibble kernel on perm32 codes
        assert triton_ops._pq.last_config is not None
    monkeypatch.setattr(triton_ops._pq, "prologue_quantize", lambda *a, **kw: pytest.fail("the full path ran again"))
    check(8, 2, residual)  # bucket 8 again: the plan, on new inputs
    check(6, 3, residual)  # 3 samples in the same bucket
    monkeypatch.undo()
    check(8, 4, not residual)  # the other kind of call: its own plan
    assert len(w.data._viditq_fused_plans) == 2


def test_quant_linear_unsupported_is_none():
    x = torch.randn(4, 192)
    assert triton_ops.quant_linear(x, make_w(8, 192, "int8"), None, None, 0, "fp8", 127, None, 0) is None
    assert triton_ops.quant_linear(x, make_w(8, 192, "int8", group=48), None, None, 0, "int8", 127, None, 0) is None
    assert triton_ops.quant_linear(x, make_w(8, 192, "int8"), None, None, 128, "int8", 127, None, 0) is None


def test_dispatch_cpu_uses_reference(monkeypatch):
    """On CPU tensors the dispatcher never reaches Triton; VIDITQ_BACKEND still validates."""
    assert dispatch.resolve_backend("auto", torch.device("cpu")) == "torch"
    assert dispatch.resolve_backend("triton", torch.device("cpu")) == "torch"
    monkeypatch.setenv("VIDITQ_BACKEND", "bogus")
    with pytest.raises(ValueError):
        dispatch.resolve_backend("auto", torch.device("cpu"))


def test_tuner_forced_and_cached():
    t = taq.Tuner("t")
    assert t.pick(("k",), [(1,), (2,)], lambda c: None) == (1,)  # interpreter: the first candidate
    t.force = (2,)
    assert t.pick(("k",), [(1,), (2,)], lambda c: None) == (2,)


def test_graph_tuner_waits_for_queued_work_before_timing(monkeypatch):
    """do_bench_cudagraph's first call runs on a fresh stream that does not wait for the caller's: the tuner must
    synchronize first, or a candidate writes into memory queued kernels still read (seen on the H200 as a corrupted
    reference in a benchmark). GPU calls are stand-ins here; the order of events is what is checked."""
    events = []
    monkeypatch.setattr(taq, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: events.append("sync"))

    def fake_bench(fn, **kw):
        fn()
        return {(1,): 2.0, (2,): 1.0}[events[-1][1]]

    monkeypatch.setattr(taq.triton.testing, "do_bench_cudagraph", fake_bench)
    t = taq.Tuner("t", graph=True)
    assert t.pick(("k",), [(1,), (2,)], lambda c: events.append(("launch", c))) == (2,)
    assert events[0] == "sync"  # before any candidate ran
    assert [e for e in events if e != "sync"] == [("launch", (1,))] * 2 + [("launch", (2,))] * 2


def test_fused_w4a8_falls_back_when_its_kernels_fail(monkeypatch):
    """A perm32 W4A8 kernel that cannot run on some GPU / Triton: the fused layer returns None (said once) and the
    dispatcher's general path gives the right result; VIDITQ_W4_PERM=0 takes natural-order codes instead."""
    k, n, m = 128, 40, 6
    w = make_w(n, k, "int4")
    x = make_x(m, k, torch.float32, seed=9).to(torch.bfloat16)
    r = reference.quantized_matmul(reference.prologue_quantize(x, "gelu_tanh"), w, None, torch.float64)
    real = tg.quantized_matmul

    def broken(*a, **kw):
        if kw.get("a_perm") == "perm32":
            raise RuntimeError("out of resources")
        return real(*a, **kw)

    monkeypatch.setattr(tg, "quantized_matmul", broken)
    assert triton_ops.prologue_quant_linear(x, "gelu_tanh", None, None, 0, 1e-6, w, None) is None
    monkeypatch.setattr(dispatch, "resolve_backend", lambda *a: "triton")
    y = dispatch.prologue_quant_linear(x, "gelu_tanh", None, None, 0, 1e-6, w, None)
    assert rel_err(y, r) < 1e-2
    monkeypatch.setenv("VIDITQ_W4_PERM", "0")
    y = triton_ops.prologue_quant_linear(x, "gelu_tanh", None, None, 0, 1e-6, w, None)
    assert y is not None and rel_err(y, r) < 1e-2 and not tg.last_config[0].startswith("swap")


def test_split16_w4a8_falls_back_to_the_reference_when_its_kernels_fail(monkeypatch, caplog):
    """split16 int4 weights have only the swapped kernels: where those cannot run, the layer's fused and plain
    calls give the reference's result (said once) instead of failing."""
    k, n, m = 128, 40, 6
    w0 = make_w(n, k, "int4")
    w = dataclasses.replace(w0, data=reference.repack_int4(w0.data, "pairs", "split16"), pack="split16")
    x = make_x(m, k, torch.float32, seed=9).to(torch.bfloat16)
    r = reference.quantized_matmul(reference.prologue_quantize(x, "gelu_tanh"), w0, None, torch.float64)
    monkeypatch.setattr(tg, "quantized_matmul", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("no luck")))
    monkeypatch.setattr(dispatch, "resolve_backend", lambda *a: "triton")
    y = dispatch.prologue_quant_linear(x, "gelu_tanh", None, None, 0, 1e-6, w, None)
    assert rel_err(y, r) < 1e-2
    xq = make_x(m, k, torch.float32, seed=10).to(torch.bfloat16)
    rq = reference.quantized_matmul(reference.quantize_activation(xq), w0, None, torch.float64)
    assert rel_err(dispatch.quant_linear(xq, w, None), rq) < 1e-2
    assert "split16" in caplog.text


@pytest.mark.parametrize("group", [0, 64, 128])
def test_gemm_fallback_config_keeps_one_k_block_per_group(group, monkeypatch):
    """Where no listed config fits (no TMA on the GPU at large M for group-wise weights, or a restrictive
    VIDITQ_GEMM_KINDS), the fallback tile must still take one K block per weight group for the swapped kernels
    (BLOCK_K == GROUP_K): a wider block mixes two groups' scales. Run on split16 weights, which only those kernels
    take."""
    monkeypatch.setattr(tg, "INTERPRET", False)  # the GPU's config lists
    every = "ptr,tma,tmas,tma2,tmas2,tma3,swap,swapt,swapts,swapt2,swapts2,swapt3"
    for kinds, tma in (("ptr,tma", True), (every, False)):
        monkeypatch.setenv("VIDITQ_GEMM_KINDS", kinds)
        for m in (7, 600, 2048, 8192):
            cands = tg.candidates(m, 72, 256, True, group, tma, tma, 2)
            assert cands and all(c[0].startswith("swap") for c in cands)
            assert all(c[3] == group for c in cands) if group else all(256 % c[3] == 0 for c in cands)
    monkeypatch.undo()
    k, n, m = 256, 40, 9
    w0 = make_w(n, k, "int4", group, seed=3)
    w = dataclasses.replace(w0, data=reference.repack_int4(w0.data, "pairs", "split16"), pack="split16")
    r = reference.quantize_activation(make_x(m, k, torch.float32, seed=4), None, 0, "int8", 127, None, group or k)
    monkeypatch.setenv("VIDITQ_GEMM_KINDS", "ptr,tma")  # nothing listed fits: the fallback config runs
    y = _run_gemm(r, w, None, torch.float32, "ptr,tma", monkeypatch)
    assert tg.last_config[0] == "swap" and tg.last_config[3] == (group or 64)
    assert rel_err(y, reference.quantized_matmul(r, w0, None, torch.float64)) < 1e-5


def test_slow_layer_note_gives_the_eager_and_the_graph_figure(monkeypatch, caplog):
    """The once-per-shape speed note quotes the benchmark's eager and CUDA-graph figures for the nearest measured
    M, says nothing where the layer is at least as fast as bf16, and points to CUDA graphs where only those are."""
    table = {(2048, 192, 40, "w4a8"): (0.09, 0.71), (8192, 192, 40, "w4a8"): (0.4, 1.2),
             (2048, 192, 48, "w4a8"): (1.3, 1.5)}
    monkeypatch.setattr(triton_ops, "_measured_table", lambda gpu: table)
    monkeypatch.setattr(triton_ops, "_noted", set())  # said once per shape per process: start afresh
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake GPU")
    w = make_w(40, 192, "int4")
    x2 = torch.zeros(2000, 192)
    with caplog.at_level("WARNING", logger="vidit_q.kernels"):
        triton_ops._check_speed(x2, w, 2000, 192, 40, "int8", None)
        assert "0.09x cuBLAS bf16 launched eagerly, 0.71x from a CUDA graph" in caplog.text
        caplog.clear()
        triton_ops._check_speed(torch.zeros(9000, 192), w, 9000, 192, 40, "int8", None)
        assert "1.20x from a CUDA graph" in caplog.text and "ViDiT-Q CUDA Graphs node" in caplog.text
        caplog.clear()
        triton_ops._check_speed(x2, make_w(48, 192, "int4"), 2000, 192, 48, "int8", None)
        assert caplog.text == ""
