"""Two-level int4 group scales (QServe-style progressive group quantization, preset `w4a8-g128-fast`): the
quantizer's math and bounds, the swapped W4A8 kernels that turn each nibble into its int8 value in registers (on
the CPU through TRITON_INTERPRET=1, against the fp64 reference), the QuantLinear plain and fused paths, and the
checkpoint round trip (format 2)."""
import dataclasses

import pytest
import torch

from viditq.kernels import reference  # noqa: E402
from viditq.kernels import triton_act_quant as taq  # noqa: E402
from viditq.kernels import triton_gemm as tg  # noqa: E402
from viditq.kernels import triton_ops  # noqa: E402
from viditq.kernels.types import QuantizedWeight, make_gparam, split_gparam  # noqa: E402
from viditq.quant_core import get_preset  # noqa: E402
from viditq.quant_core.config import QuantConfig  # noqa: E402
from viditq.quant_core.quant_linear import QuantLinear  # noqa: E402
from viditq.quant_core.quantizers import quantize_weight  # noqa: E402

from test_kernels_triton import _perm_codes, make_x, rel_err  # noqa: E402


def outlier_weight(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (torch.rand(1, k, generator=g) * 2 + 0.1)
    w[:, 3] *= 15.0  # one input channel far larger: per-channel scales waste most levels on it
    w[1] = 0.0  # an all-zero output channel
    w[2, : k // 2] = 0.0  # a row half zero (whole zero groups)
    return w


def two_level(n, k, group, seed=0):
    return quantize_weight(outlier_weight(n, k, seed), bits=4, granularity="group", group_size=group,
                           group_scale="int8")


# ---- the quantizer --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group", [32, 64, 128])
def test_quantizer_bounds_and_error(group):
    w = outlier_weight(96, 512, seed=group)
    qw = quantize_weight(w, bits=4, granularity="group", group_size=group, group_scale="int8")
    assert qw.fmt == "int4" and qw.zero is None and qw.scale.shape == (96,)
    assert qw.gparam.dtype == torch.uint8 and qw.gparam.shape == (96, 512 // group)
    s2, z = split_gparam(qw.gparam)
    assert int(s2.min()) >= 1 and int(s2.max()) <= 16 and int(z.min()) >= 0 and int(z.max()) <= 15
    v = reference.gparam_int8(qw)  # what the GEMM multiplies: must be exact int8 values
    assert torch.equal(v, v.round()) and v.min() >= -128 and v.max() <= 127
    assert torch.equal(reference.dequantize_weight(qw), v * qw.scale[:, None])
    err = rel_err(reference.dequantize_weight(qw), w)
    per_channel = rel_err(reference.dequantize_weight(quantize_weight(w, bits=4)), w)
    float_groups = rel_err(reference.dequantize_weight(
        quantize_weight(w, bits=4, granularity="group", group_size=group)), w)
    assert err < 0.6 * per_channel  # groups do their job on an outlier channel
    assert err < 1.1 * float_groups  # and the integer second level costs (almost) nothing
    assert torch.equal(reference.dequantize_weight(qw)[1], torch.zeros(512))  # zero stays zero


def test_quantizer_refusals():
    w = torch.randn(8, 256)
    with pytest.raises(ValueError, match="int4"):
        quantize_weight(w, bits=8, granularity="group", group_size=128, group_scale="int8")
    with pytest.raises(ValueError, match="group_scale"):
        quantize_weight(w, bits=4, granularity="group", group_size=128, group_scale="int4")
    with pytest.raises(ValueError, match="multiple of the group size"):
        quantize_weight(w, bits=4, granularity="group", group_size=96, group_scale="int8")
    with pytest.raises(ValueError, match="1..16"):
        make_gparam(torch.tensor([17]), torch.tensor([0]))
    with pytest.raises(ValueError, match="two-level"):
        QuantConfig(w_bits=8, w_group_scale="int8")
    cfg = get_preset("w4a8-g128-fast")
    assert (cfg.w_bits, cfg.w_granularity, cfg.w_group_size, cfg.w_group_scale) == (4, "group", 128, "int8")


# ---- the kernels (interpreter) ---------------------------------------------------------------------------------
LAYOUT_KINDS = [("split16", kd) for kd in ("swap", "swapt", "swapts", "swapt2", "swapt3")] + \
               [("perm32", "swap"), ("parity", "swapt")]


@pytest.mark.parametrize("layout,kind", LAYOUT_KINDS)
@pytest.mark.parametrize("m,n,k,group,odt", [(7, 72, 256, 128, torch.float32), (33, 40, 256, 64, torch.bfloat16),
                                             (1, 40, 512, 256, torch.float16), (129, 72, 256, 32, torch.float32)])
def test_two_level_gemm(m, n, k, group, odt, layout, kind, monkeypatch):
    """One int32 sum over all of K of the in-register int8 values s2 * (q - z), then per-token x per-channel scales:
    equal to the fp64 GEMM of the dequantized weights; no code sums needed; outputs poisoned."""
    w = two_level(n, k, group, seed=m)
    x = make_x(m, k, torch.float32, seed=k)
    r = reference.quantize_activation(x, None, 0, "int8", 127, None, 0)
    bias = torch.randn(n).to(odt)
    want = reference.quantized_matmul(r, w, bias, torch.float64)
    a = type(r)(q=_perm_codes(r.q, layout if layout != "split16" else None).contiguous(), scale=r.scale, qsum=None)
    a_perm = layout
    if layout == "split16":
        w = dataclasses.replace(w, data=reference.repack_int4(w.data, "pairs", "split16"), pack="split16")
        a_perm = False
    monkeypatch.setenv("VIDITQ_GEMM_KINDS", kind)
    cands = tg.candidates(m, n, k, True, 0, True, True, 2 if layout == "split16" else taq.PERM_MODES[layout], group)
    assert cands and all(c[0] == kind and c[3] <= group and group % c[3] == 0 for c in cands)
    out = torch.full((m, n), float("nan"), dtype=odt)
    y = tg.quantized_matmul(a, w, bias, odt, out=out, a_perm=a_perm)
    assert y is not None and y.data_ptr() == out.data_ptr() and tg.last_config[0] == kind
    assert rel_err(y, want) < {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[odt]


def test_two_level_gemm_residual_and_refusals(monkeypatch):
    m, n, k = 33, 72, 256
    w0 = two_level(n, k, 128, seed=5)
    w = dataclasses.replace(w0, data=reference.repack_int4(w0.data, "pairs", "split16"), pack="split16")
    r = reference.quantize_activation(make_x(m, k, torch.float32, seed=9) * 0.1, None, 0, "int8", 127, None, 0)
    plain = reference.quantized_matmul(r, w0, None, torch.float64)
    res = torch.randn(m, n) * float(plain.std())
    gate = torch.randn(3, n)
    monkeypatch.setenv("VIDITQ_GEMM_KINDS", "swapt")
    y = tg.quantized_matmul(r, w, None, torch.float32, residual=res, gate=gate, res_rows=11)
    assert rel_err(y, reference.quantized_matmul(r, w0, None, torch.float64, res, gate, 11)) < 1e-5
    monkeypatch.delenv("VIDITQ_GEMM_KINDS")
    # the unswapped kernels have no two-level unpack: natural codes on "pairs" bytes are not a kernel's job
    assert tg.quantized_matmul(r, w0, None, torch.float32) is None
    assert not tg.supported("fp8", w0)
    assert not tg.supported("int8", two_level(8, 96, 32))  # K % 64: no swapped kernel (the reference runs it)
    assert tg.kernel_zero(w) is w.gparam


# ---- QuantLinear ------------------------------------------------------------------------------------------------
def _layer(k=256, n=72, seed=0):
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(outlier_weight(n, k, seed) * 0.05)
    return QuantLinear.from_linear(lin, "blocks.0.mlp.fc1", get_preset("w4a8-g128-fast"),
                                   act_absmax=torch.rand(k) + 0.5)


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_quant_linear_plain_and_plan(dt):
    """The layer's plain call as dispatch makes it on CUDA (triton_ops.quant_linear): plain codes, no sums, then
    the cached plan; against the reference quantize + the exact GEMM of those codes, and the module's own torch
    path."""
    layer = _layer()
    assert layer.w_pack == "split16" and layer.w_gparam is not None and "two-level" in repr(layer)
    w = layer.quantized_weight()
    x = make_x(2 * 9, 256, torch.float32, seed=2).to(dt)
    want = reference.quantized_matmul(reference.quantize_activation(x, layer.act_mult, layer.had_block), w,
                                      layer.bias, torch.float64)
    got = triton_ops.quant_linear(x, w, layer.bias, layer.act_mult, layer.had_block)  # full path: leaves a plan
    assert len(w.data._viditq_plans) == 1
    again = triton_ops.quant_linear(x, w, layer.bias, layer.act_mult, layer.had_block)  # the plan
    tol = 1e-2 if dt == torch.bfloat16 else 3e-3  # bf16 output; a code may differ by one at a rounding tie
    assert rel_err(got, want) < tol and torch.equal(got, again)
    assert rel_err(layer(x.reshape(2, 9, 256)).reshape(18, -1), want) < tol  # torch path (CPU)
    assert layer.weight_bytes() == sum(t.numel() * t.element_size() for t in
                                       (layer.qweight, layer.w_scale, layer.w_gparam, layer.act_mult))


@pytest.mark.parametrize("prologue", ["gelu_tanh", "norm_modulate"])
def test_quant_linear_fused(prologue):
    """The fused path: the prologue kernel writes plain codes (no sums), the GEMM adds the gated residual."""
    layer = _layer(seed=3)
    assert layer.fusable()
    m, k = 18, 256
    x = make_x(m, k, torch.float32, seed=4, extreme=False)
    shift, scale = torch.randn(2, 1, k) * 0.1, torch.randn(2, 1, k) * 0.1
    res = torch.randn(m, 72)
    gate = torch.randn(2, 72)
    kw = dict(shift=shift, scale=scale, rows_per_sample=9) if prologue == "norm_modulate" else {}
    want = reference.quantized_matmul(
        reference.prologue_quantize(x, prologue, kw.get("shift"), kw.get("scale"), kw.get("rows_per_sample", 0),
                                    1e-6, layer.act_mult, "int8", 127, layer.had_block),
        layer.quantized_weight(), layer.bias, torch.float64, res, gate, 9)
    for _ in range(2):  # full path, then the plan
        y = triton_ops.prologue_quant_linear(x, prologue, kw.get("shift"), kw.get("scale"),
                                             kw.get("rows_per_sample", 0), 1e-6, layer.quantized_weight(), layer.bias,
                                             layer.act_mult, "int8", 127, layer.had_block, res, gate, 9)
        assert y is not None and rel_err(y, want) < 1e-4
    assert getattr(layer.qweight, "_viditq_fused_plans", None)


# ---- the inline PTX's assumption, on compiled code (no GPU needed) ------------------------------------------------
_COMPILE_SCRIPT = r'''
import importlib.util, os, re, sys
os.environ.pop("TRITON_INTERPRET", None)
root = sys.argv[1]
spec = importlib.util.spec_from_file_location("viditq", os.path.join(root, "__init__.py"),
                                              submodule_search_locations=[root])
mod = importlib.util.module_from_spec(spec); sys.modules["viditq"] = mod; spec.loader.exec_module(mod)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from viditq.kernels import triton_gemm as tg
import triton.language as tl


@triton.jit
def _probe(X):
    tl.store(X, 1)


try:  # can this Triton compile for CUDA here at all? (exit 3: no; the test then skips)
    triton.compile(ASTSource(_probe, {"X": "*i32"}, {}), target=GPUTarget("cuda", 90, 32))
except Exception as e:
    print(repr(e)[:300], file=sys.stderr)
    sys.exit(3)
ptrs = {"A": "*i8", "B": "*u8", "C": "*bf16", "AS": "*fp32", "WS": "*fp32", "WZ": "*u8", "QS": "*fp32",
        "BIAS": "*bf16", "RES": "*bf16", "GATE": "*bf16", "GP": "*u8"}
for merge in (True, False):
    for bm, bn in ((128, 128), (32, 128), (64, 64)):
        consts = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, GROUP_M=8, GROUP_K=0, HAS_ZERO=False, HAS_BIAS=True,
                      MAGIC=False, U4=False, MERGE=merge, ASM=True, HAS_RES=False, HAS_GATE=False, GATE_1D=False,
                      G2=128)
        fn = tg._w4_swap_kernel
        sig = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in fn.arg_names}
        k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=4, num_stages=3))
        ops = re.findall(r"g2 operands ([^\n]*)", k.asm["ptx"])
        assert ops, "the two-level inline PTX is not in the kernel"
        for line in ops:
            s2, d = line.split("|")
            assert len(set(s2.split())) == 1 and len(set(d.split())) == 1, line
        print("ok", merge, bm, bn, len(ops))
'''


def test_inline_ptx_packs_one_row_per_register(tmp_path):
    """_int4_halves_g2's inline PTX multiplies a register of four weight bytes by one row's s2: compiled for sm_90a
    (Triton's CUDA backend works without a GPU), each asm instance's four packed s2 (and offset) operands must be
    one register. Skipped where this Triton cannot compile for CUDA here."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    script = tmp_path / "compile_g2.py"
    script.write_text(_COMPILE_SCRIPT)
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(script), str(root)], capture_output=True, text=True, env=env,
                       timeout=600)
    if r.returncode == 3:
        pytest.skip(f"Triton cannot compile for CUDA on this machine: {r.stderr.strip()[-200:]}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("ok") == 6
