"""torch.compile with our quantized layers (issue 8): QuantLinear, TimestepSwitchLinear and the quantized attention
trace with fullgraph=True (our kernel calls are the custom ops viditq::quant_linear / viditq::quantized_attention),
compiled outputs equal eager ones, eager calls bypass the custom ops, and the ops pass torch.library.opcheck.

CPU only: aot_eager everywhere, Inductor (C++) for one small case when a compiler is there. The Triton path of the
ops runs under the interpreter (TRITON_INTERPRET=1, set by conftest) by forcing the dispatcher to Triton.
"""
import shutil

import pytest
import torch
from torch._dynamo.utils import counters

from helpers import tiny_pixart
from viditq.kernels import custom_ops, dispatch
from viditq.quant_core import build_quant_layers, get_preset, replace_layers
from viditq.quant_core.attention import quantized_attention, set_pixart_attention
from viditq.quant_core.quant_linear import QuantLinear, RangeClock, TimestepSwitchLinear

K, N = 256, 128
# int8 per channel, int4 in groups of 128, fp8 (the reference runs fp8 on the CPU), static per-tensor activations
PRESETS = ["w8a8", "w4a8-g128", "w8a8-fp8", "w8a8-naive"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _layer(preset="w8a8", seed=0, backend="auto"):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g) / K ** 0.5)
    absmax = torch.rand(K, generator=g) + 0.5  # a calibration: smoothing, and the static scale of w8a8-naive
    return QuantLinear.from_linear(lin, f"layer{seed}", get_preset(preset), absmax, backend).eval()


def _x(*lead, seed=1):
    return torch.randn(*lead, K, generator=torch.Generator().manual_seed(seed))


def _ops_in(graph_module):
    return [str(n.target) for n in graph_module.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("preset", PRESETS)
def test_quant_linear_is_one_custom_op_and_compiles_fullgraph(preset, monkeypatch):
    monkeypatch.setenv(dispatch.COMPILE_QUANT_ENV, "kernel")  # the fused quantize + GEMM op (torch quantize below)
    layer, x = _layer(preset), _x(2, 7)
    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    assert _ops_in(explained.graphs[0]) == ["viditq.quant_linear.default"]  # nothing of Triton or the reference
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(x), layer(x))
    # grad mode: the op's output is a constant for autograd (as the Triton kernels' in eager), no backward formula
    # needed to compile
    y = compiled(x)
    assert torch.equal(y, layer(x)) and not y.requires_grad


def test_layer_moves_to_the_input_device_under_compile():
    """QuantLinear moves itself to x's device (ComfyUI low-VRAM paths): Dynamo traces the move as a module side
    effect (fullgraph, no break) and recompiles once for the new devices. The meta device stands in for a GPU."""
    layer, x = _layer(), _x(2, 5).to("meta")
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for _ in range(3):
            y = compiled(x)
            assert y.device.type == "meta" and y.shape == (2, 5, N)
    assert all(t.device.type == "meta" for t in layer.buffers())
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]


def test_simulated_layer_compiles():
    """Fake-quant mode (planner sweeps) is plain torch and traces too (its cached dequantized weight: one
    recompile after the first call)."""
    layer, x = _layer(), _x(2, 5)
    layer.set_simulate(True)
    with torch.no_grad():
        ref = layer(x)
        layer.set_simulate(True)  # drop the cache: the compiled run fills it itself
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(x), ref) and torch.equal(compiled(x), ref)


def test_eager_calls_do_not_go_through_the_custom_op(monkeypatch):
    layer, x = _layer(), _x(3)
    ref = layer(x)

    def forbidden(*args):
        raise AssertionError("eager call dispatched through the custom op")

    monkeypatch.setattr(custom_ops, "quant_linear", forbidden)
    monkeypatch.setattr(custom_ops, "quantized_attention", forbidden)
    assert torch.equal(layer(x), ref)
    q = torch.randn(1, 2, 8, 16)
    quantized_attention(q, q, q, "int8")


def test_backend_is_resolved_at_run_time_inside_the_op(monkeypatch):
    """The layer's backend reaches the dispatcher unchanged, and the choice (VIDITQ_BACKEND, device) is made when
    the op runs, not baked into the graph: forcing Triton (interpreter) after compiling switches the kernel."""
    layer, x = _layer("w8a8", backend="torch"), _x(2, 16)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    asked = []
    real = dispatch.resolve_backend

    def spy(requested, device):
        asked.append(requested)
        return real(requested, device)

    monkeypatch.setattr(dispatch, "resolve_backend", spy)
    with torch.no_grad():
        ref = compiled(x)
    assert asked == ["torch"] and torch.equal(ref, layer(x))

    from viditq.kernels import triton_ops

    launched = []
    triton_linear = triton_ops.quant_linear
    monkeypatch.setattr(triton_ops, "quant_linear", lambda *a: launched.append(1) or triton_linear(*a))
    monkeypatch.setattr(dispatch, "resolve_backend", lambda requested, device: "triton")
    with torch.no_grad():
        tri_eager = layer(x)
        tri_compiled = compiled(x)
    assert len(launched) == 2  # the Triton kernels ran (interpreter), eager and compiled
    assert torch.equal(tri_compiled, tri_eager)
    assert (tri_eager - ref).abs().max() < 1e-3 * ref.abs().max()
    assert counters["stats"]["unique_graphs"] == 1  # no recompile for the backend switch


def _linear_args(layer, x, backend="auto"):
    w = layer.quantized_weight()
    return (x, w.data, w.scale, w.zero, w.gparam, layer.bias, layer.act_mult, layer.static_scale, w.fmt_tag,
            w.in_features, w.group_size, layer.had_block, layer.act_fmt, layer.act_qmax, backend)


def _opcheck(op, args):
    result = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("preset", ["w8a8", "w4a8-g128", "w4a8-g128-fast"])
def test_quant_linear_op_passes_opcheck(preset):
    layer = _layer(preset)
    _opcheck(custom_ops.quant_linear, _linear_args(layer, _x(2, 5)))
    _opcheck(custom_ops.quant_linear, _linear_args(layer, _x(2, 5).requires_grad_()))


def test_attention_op_passes_opcheck():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (40, 24, 24))
    _opcheck(custom_ops.quantized_attention, (q, k, v, "int8", "auto"))
    _opcheck(custom_ops.quantized_attention, (q.transpose(1, 2).contiguous().transpose(1, 2), k, v, "fp8", "auto"))


def test_triton_outputs_have_the_fake_layout(monkeypatch):
    """The ops promise fixed output strides (Inductor asserts them); the Triton kernels (interpreter) write exactly
    that layout, so the GPU path never pays a copy; opcheck passes on the Triton path too."""
    monkeypatch.setattr(dispatch, "resolve_backend", lambda requested, device: "triton")
    layer, x = _layer("w8a8"), _x(2, 16)
    y = dispatch.quant_linear_impl(x, layer.quantized_weight(), layer.bias, layer.act_mult, layer.had_block)
    assert y.shape == (2, 16, N) and y.is_contiguous()
    q = torch.randn(1, 2, 32, 16)
    out = dispatch.quantized_attention_impl(q, q, q, "int8")
    fake = custom_ops._quantized_attention_fake(q, q, q, "int8", "auto")
    assert out.shape == fake.shape and out.stride() == fake.stride()
    _opcheck(custom_ops.quant_linear, _linear_args(layer, x))
    _opcheck(custom_ops.quantized_attention, (q, q, q, "int8", "auto"))


def test_timestep_switch_linear_guards_on_the_range():
    """Dynamo reads clock.current as a constant and guards on it: one graph per range seen, and switching the range
    after compiling runs the other variant (a recompile the first time, then the cached graph), never a stale one."""
    w8, w4 = _layer("w8a8"), _layer("w4a8")
    clock = RangeClock(4)
    switch = TimestepSwitchLinear([w8, w4], [0, 0, 1, 1], clock, "layer")
    compiled = torch.compile(switch, fullgraph=True, backend="aot_eager")
    x = _x(2, 5)
    with torch.no_grad():
        expect = {0: w8(x), 1: w4(x)}
        assert not torch.equal(expect[0], expect[1])
        for r in (0, 3, 1, 2, 0, 3):
            clock.current = r
            assert torch.equal(compiled(x), expect[switch.choice[r]]), r
    assert counters["stats"]["unique_graphs"] == 4  # ranges 0, 3, 1, 2: one graph each, revisits hit the cache
    clock.clear()
    with pytest.raises(RuntimeError, match="no timestep was set"):  # fullgraph wraps it in Dynamo's Unsupported
        compiled(x)


def _pixart_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([700.0, 300.0]), torch.randn(2, 16, 256, generator=g)


@pytest.fixture(scope="module")
def pixart_w8a8():
    model = tiny_pixart(depth=1)
    layers, _ = build_quant_layers(model, get_preset("w8a8"))
    replace_layers(model, layers)
    return model


@pytest.mark.parametrize("attention", ["off", "int8"])
def test_quantized_pixart_compiles_fullgraph(pixart_w8a8, attention):
    model = pixart_w8a8
    set_pixart_attention(model, attention)
    try:
        args = _pixart_inputs()
        explained = torch._dynamo.explain(model)(*args)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
        ops = _ops_in(explained.graphs[0])
        assert ops.count("viditq.quant_linear.default") == 7  # qkv, proj, q, kv, proj, fc1, fc2
        assert ops.count("viditq.quantized_attention.default") == (0 if attention == "off" else 2)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            assert torch.equal(compiled(*args), model(*args))
    finally:
        set_pixart_attention(model, "off")


def _cxx_compiler():
    from torch._inductor import config

    cxx = config.cpp.cxx[0] if isinstance(config.cpp.cxx, (tuple, list)) else config.cpp.cxx
    return shutil.which(cxx or "") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


@pytest.mark.skipif(not _cxx_compiler(), reason="Inductor's CPU backend needs a C++ compiler; none found")
def test_inductor_fuses_around_the_ops():
    """Inductor (C++ on CPU): LayerNorm + modulate -> QuantLinear -> GELU -> QuantLinear -> residual, one graph,
    the quantized calls kept as the custom ops; output equals eager up to float reordering in the fused parts."""
    fc1 = _layer("w8a8", seed=2)
    fc2 = QuantLinear.from_linear(torch.nn.Linear(N, K), "fc2", get_preset("w8a8"))
    norm = torch.nn.LayerNorm(K, elementwise_affine=False)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.norm = fc1, fc2, norm

        def forward(self, x, scale):
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x) * (1 + scale))))

    block = Block().eval()
    x, scale = _x(2, 16), torch.rand(2, 1, K) * 0.1
    compiled = torch.compile(block, fullgraph=True, backend="inductor")
    with torch.no_grad():
        ref, out = block(x, scale), compiled(x, scale)
    assert counters["stats"]["unique_graphs"] == 1
    rel = (out - ref).norm() / ref.norm()
    assert rel < 1e-3, rel


# the activation quantize written in torch under compile (Inductor fuses it into the producer), then the GEMM op
TORCH_QUANT_PRESETS = ["w8a8-smoothquant", "w8a8-naive", "w8a8-fp8", "w4a8-g128"]


@pytest.mark.parametrize("preset", TORCH_QUANT_PRESETS)
def test_torch_quantize_then_gemm_op_under_compile(preset, monkeypatch):
    """VIDITQ_COMPILE_QUANT=torch: the graph holds the quantize as torch ops and one viditq.quantized_matmul; auto
    picks it for layers without rotation and with int8/fp8 weights. Output equals eager (same math, aot_eager)."""
    monkeypatch.setenv(dispatch.COMPILE_QUANT_ENV, "torch")
    layer, x = _layer(preset), _x(2, 7)
    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    ops = _ops_in(explained.graphs[0])
    assert "viditq.quantized_matmul.default" in ops and "viditq.quant_linear.default" not in ops
    assert len(ops) > 3, ops  # the quantize is traced as torch ops
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(x), layer(x))


@pytest.mark.parametrize("preset,torch_quant", [("w8a8-smoothquant", True), ("w8a8-naive", True),
                                                ("w8a8", False), ("w8a8-fp8", False), ("w4a8", False)])
def test_compile_quant_auto_choice(preset, torch_quant, monkeypatch):
    monkeypatch.delenv(dispatch.COMPILE_QUANT_ENV, raising=False)
    layer = _layer(preset)
    assert dispatch._quantize_in_torch(layer.quantized_weight(), layer.had_block) == torch_quant
    monkeypatch.setenv(dispatch.COMPILE_QUANT_ENV, "bogus")
    with pytest.raises(ValueError, match="VIDITQ_COMPILE_QUANT"):
        dispatch._quantize_in_torch(layer.quantized_weight(), layer.had_block)


def test_compile_quant_override_traces_the_kernel_op(monkeypatch):
    """dispatch.compile_quant("kernel") (ViDiTQCompileModel, backends without Inductor) wins over the env var and
    over auto: the traced graph holds the one fused op, no torch quantize; outside it the env var rules again."""
    monkeypatch.setenv(dispatch.COMPILE_QUANT_ENV, "torch")
    layer, x = _layer("w8a8-smoothquant"), _x(2, 7)
    with dispatch.compile_quant("kernel"):
        assert not dispatch._quantize_in_torch(layer.quantized_weight(), layer.had_block)
        explained = torch._dynamo.explain(layer)(x)
    ops = _ops_in(explained.graphs[0])
    assert "viditq.quant_linear.default" in ops and "viditq.quantized_matmul.default" not in ops, ops
    assert dispatch._quantize_in_torch(layer.quantized_weight(), layer.had_block)
    with pytest.raises(ValueError, match="compile_quant"):
        with dispatch.compile_quant("fast"):
            pass
    torch._dynamo.reset()


def test_quantized_matmul_op_opcheck():
    layer, x = _layer("w8a8-smoothquant"), _x(5)
    from viditq.kernels import reference

    w = layer.quantized_weight()
    a = reference.quantize_activation(x, layer.act_mult, 0, "int8", 127, None, 0)
    torch.library.opcheck(custom_ops.quantized_matmul, (a.q, a.scale, a.qsum, w.data, w.scale, w.zero, w.gparam,
                                                        layer.bias, w.fmt, w.in_features, w.group_size, torch.float32,
                                                        "auto"))
