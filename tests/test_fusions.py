"""quant_core/fusions.py: GELU and LayerNorm+modulate moved into the quantize of the layers they feed.

Fused and unfused models must agree (they differ only in the fused path not rounding the producer's output to the
model dtype before quantizing), the patches must restore cleanly, compile fullgraph, and leave alone what they
cannot fuse (static scales, asymmetric weights, temporal STDiT3 blocks). Rotated layers fuse too: the
kernel runs the block Hadamard after the prologue. ComfyUI's own PixArt block: see the
ComfyUI test at the end."""
import copy
import dataclasses

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

from comfy_env import conditioning, import_comfyui, requires_comfyui, write_tiny_checkpoint
from helpers import calibrate, tiny_pixart
from viditq.kernels import dispatch
from viditq.models.opensora import load_opensora
from viditq.models.opensora.tiny import save_tiny_opensora
from viditq.quant_core import build_quant_layers, fusion_patches, get_preset, install_quant_layers, replace_layers
from viditq.quant_core.fusions import FUSE_ENV, FUSE_PLAIN_ENV, FUSE_RESIDUAL_ENV


def _pixart_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 8, 8, generator=g).to(dtype), torch.tensor([700.0, 300.0]),
            torch.randn(2, 16, 256, generator=g).to(dtype))


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _fused_layers(model):
    """(names of the layers with the GELU fused, names with the LayerNorm fused) as installed in model ("none"
    views, which only change the compiled path, are left out)."""
    mods = dict(model.named_modules())
    gelu = sorted(n for n, q in mods.items() if getattr(q, "input_act", None) not in (None, "none"))
    norm = sorted(n for n, q in mods.items() if getattr(q, "norm_eps", None) is not None)
    return gelu, norm


def _config(preset):
    if preset == "w8a8-fp8-norot":  # fp8 weights and activations, unrotated
        return dataclasses.replace(get_preset("w8a8-fp8"), rotate=False)
    return get_preset(preset)


@pytest.mark.parametrize("preset", ["w8a8-smoothquant", "w8a8-fp8-norot", "w8a8", "w8a8-fp8", "w4a8", "w4a8-g128"])
def test_pixart_fused_matches_unfused_and_restores(preset):
    model = tiny_pixart(depth=2)
    args = _pixart_inputs()
    with torch.no_grad():
        fp = model(*args)
        layers, _ = build_quant_layers(model, _config(preset))
        old = replace_layers(model, layers)
        unfused = model(*args)
        replace_layers(model, old)
        old = install_quant_layers(model, layers)
        gelu, norm = _fused_layers(model)
        assert gelu == [f"blocks.{i}.mlp.fc2" for i in range(2)]
        assert norm == sorted(f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "mlp.fc1"))
        assert all(isinstance(b.mlp.act, nn.Identity) for b in model.blocks)
        assert model.blocks[0].mlp.fc2.qweight is layers["blocks.0.mlp.fc2"].qweight  # a view, no weight copy
        fused = model(*args)
        assert all(getattr(q, "_armed", None) is None for q in model.modules())  # every arming was consumed
        replace_layers(model, old)
        assert _fused_layers(model) == ([], [])
        assert all(q.input_act is None and q.norm_eps is None for q in layers.values())  # layers stay plain
        again = replace_layers(model, layers)  # so installing them without the patches stays correct
        assert torch.equal(model(*args), unfused)
        replace_layers(model, again)
        assert all(isinstance(b.mlp.act, nn.GELU) for b in model.blocks)
        assert torch.equal(model(*args), fp)  # FP model back exactly
    assert _rel(fused, unfused) < 3e-3, _rel(fused, unfused)
    assert _rel(fused, fp) < (0.25 if preset.startswith("w4") else 0.1)  # int4 weights on a tiny random model


def test_what_cannot_fuse_is_left_alone(monkeypatch):
    model = tiny_pixart(depth=1)
    asym, _ = build_quant_layers(model, dataclasses.replace(get_preset("w4a8"), w_symmetric=False))  # zero points
    assert fusion_patches(model, asym) == {}
    static, _ = build_quant_layers(model, get_preset("w8a8-naive"), calibrate(model, steps=1))  # static scales
    assert fusion_patches(model, static) == {}
    sq, _ = build_quant_layers(model, get_preset("w8a8-smoothquant"))
    proj = {"blocks.0.attn.proj", "blocks.0.cross_attn.proj"}  # "none" views, used under compile only
    assert set(fusion_patches(model, sq)) == {"blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2",
                                              "blocks.0.mlp.act"} | proj
    del sq["blocks.0.mlp.fc1"]  # a layer left FP: nothing to fuse into
    assert set(fusion_patches(model, sq)) == {"blocks.0.attn.qkv", "blocks.0.mlp.fc2", "blocks.0.mlp.act"} | proj
    monkeypatch.setenv(FUSE_ENV, "0")
    assert fusion_patches(model, sq) == {}
    monkeypatch.setenv(FUSE_ENV, "maybe")
    with pytest.raises(ValueError, match=FUSE_ENV):
        fusion_patches(model, sq)


def test_plain_inputs_through_the_prologue_kernel(monkeypatch):
    """The attention projections get "none" views (on by default; VIDITQ_FUSE_PLAIN=0: not); in eager they run the
    plain path, so the numbers are the same either way."""
    model = tiny_pixart(depth=2)
    args = _pixart_inputs()
    layers, _ = build_quant_layers(model, get_preset("w8a8-smoothquant"))
    plain_names = {f"blocks.{i}.{r}" for i in range(2) for r in ("attn.proj", "cross_attn.proj")}
    with torch.no_grad():
        patches = fusion_patches(model, layers)
        assert {n for n, p in patches.items() if getattr(p, "input_act", None) == "none"} == plain_names
        old = install_quant_layers(model, layers)
        with_views = model(*args)
        replace_layers(model, old)
        monkeypatch.setenv(FUSE_PLAIN_ENV, "0")
        assert not any(getattr(v, "input_act", None) == "none" for v in fusion_patches(model, layers).values())
        old = install_quant_layers(model, layers)
        without = model(*args)
        replace_layers(model, old)
    assert torch.equal(with_views, without)
    monkeypatch.setenv(FUSE_PLAIN_ENV, "yes")
    with pytest.raises(ValueError, match=FUSE_PLAIN_ENV):
        fusion_patches(model, layers)


def test_residual_adds_fused_into_the_gemm(monkeypatch):
    """attn.proj, cross_attn.proj and mlp.fc2 add the block's gated residual in their GEMM epilogue: same output as
    the separate add (to bf16 rounding), every arming consumed, and VIDITQ_FUSE_RESIDUAL=0 leaves the adds alone."""
    model = tiny_pixart(depth=2)
    args = _pixart_inputs()
    layers, _ = build_quant_layers(model, get_preset("w8a8-smoothquant"))
    res_names = {f"blocks.{i}.{r}" for i in range(2) for r in ("attn.proj", "cross_attn.proj", "mlp.fc2")}
    calls = []
    with torch.no_grad():
        patches = fusion_patches(model, layers)
        assert {n for n, v in patches.items() if getattr(v, "fuse_residual", False)} == res_names
        old = install_quant_layers(model, layers)
        for n in res_names:  # the GEMM really gets the residual (no separate add)
            layer = model.get_submodule(n)
            orig = layer._forward_fused
            layer._forward_fused = (lambda o, n: lambda *a: (calls.append((n, a[-1] is not None)), o(*a))[1])(orig, n)
        fused = model(*args)
        assert all(getattr(q, "_armed_res", None) is None for q in model.modules())
        replace_layers(model, old)
        monkeypatch.setenv(FUSE_RESIDUAL_ENV, "0")
        assert not any(getattr(v, "fuse_residual", False) for v in fusion_patches(model, layers).values())
        old = install_quant_layers(model, layers)
        separate = model(*args)
        replace_layers(model, old)
    assert sorted(calls) == sorted((n, True) for n in res_names)
    assert _rel(fused, separate) < 1e-5, _rel(fused, separate)


def test_simulated_and_reference_paths_agree():
    """simulate=True runs the prologue in torch then fake-quantizes: the same numbers as the fused reference."""
    model = tiny_pixart(depth=1)
    args = _pixart_inputs()
    layers, _ = build_quant_layers(model, get_preset("w8a8-smoothquant"))
    old = install_quant_layers(model, layers)
    try:
        with torch.no_grad():
            fused = model(*args)
            for q in layers.values():
                q.set_simulate(True)
            sim = model(*args)
    finally:
        replace_layers(model, old)
    assert _rel(sim, fused) < 1e-4, _rel(sim, fused)


def test_fused_pixart_compiles_fullgraph(monkeypatch):
    """One graph, no breaks; each fused layer is one viditq.prologue_quant_linear, the others keep their ops
    (quantize in torch + viditq.quantized_matmul); compiled equals eager."""
    monkeypatch.setenv(dispatch.COMPILE_QUANT_ENV, "torch")
    torch._dynamo.reset()
    counters.clear()
    model = tiny_pixart(depth=1)
    layers, _ = build_quant_layers(model, get_preset("w8a8-smoothquant"))
    old = install_quant_layers(model, layers)
    try:
        args = _pixart_inputs()
        explained = torch._dynamo.explain(model)(*args)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
        ops = [str(n.target) for n in explained.graphs[0].graph.nodes if n.op == "call_function"]
        # qkv, fc1 (norm_modulate), fc2 (gelu), attn.proj and cross_attn.proj ("none")
        assert ops.count("viditq.prologue_quant_linear.default") == 5
        assert ops.count("viditq.quantized_matmul.default") == 2  # cross-attention q and kv
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            assert torch.equal(compiled(*args), model(*args))
            assert all(getattr(q, "_armed", None) is None for q in model.modules())
    finally:
        replace_layers(model, old)
        torch._dynamo.reset()


def test_prologue_quant_linear_op_passes_opcheck():
    from viditq.kernels import custom_ops
    from viditq.kernels.reference import quantize_activation

    x = torch.randn(2, 5, 32)
    ada = torch.randn(2, 6, 32).chunk(6, dim=1)
    w = torch.randn(24, 32)
    wq = quantize_activation(w)  # per-row int8 codes + scales: a per-output-channel int8 weight
    res, gate = torch.randn(10, 24), torch.randn(2, 24)
    for args in ((x, "norm_modulate", ada[0], ada[1], 5, 1e-6, wq.q, wq.scale, None, None, torch.randn(24),
                  torch.rand(32) + 0.5, "int8", 32, 0, "int8", 127, "auto", res, gate, 5, 16),
                 (x, "gelu_tanh", None, None, 0, 1e-6, wq.q, wq.scale, None, None, None, None, "int8", 32, 0, "int8",
                  127, "auto", None, None, 0, 0)):
        result = torch.library.opcheck(custom_ops.prologue_quant_linear, args)
        assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("version", ["1.0", "1.2"])
def test_opensora_fused_matches_unfused(version, tmp_path):
    path = save_tiny_opensora(tmp_path / f"tiny_{version}.safetensors", version, dtype=torch.float32, hidden=144,
                              depth=2, caption_channels=256, token_num=16)
    model = load_opensora(path)[0].eval()
    g = torch.Generator().manual_seed(2)
    x, t, ctx = torch.randn(2, 4, 3, 8, 8, generator=g), torch.tensor([800.0, 200.0]), torch.randn(2, 16, 256,
                                                                                                   generator=g)
    with torch.no_grad():
        layers, _ = build_quant_layers(model, get_preset("w8a8-smoothquant"))
        old = replace_layers(model, layers)
        unfused = model(x, t, ctx)
        replace_layers(model, old)
        old = install_quant_layers(model, layers)
        fused = model(x, t, ctx)
        gelu, norm = _fused_layers(model)
        residual = sorted(n for n, m in model.named_modules() if getattr(m, "fuse_residual", False))
        replace_layers(model, old)
    # the temporal attention keeps the tokens in place (Attention.frames_forward), so its qkv takes the LayerNorm
    # fusion (1.2) and its proj the gated residual add, as the spatial ones do
    if version == "1.0":
        assert len(gelu) == 2 and len(norm) == 4 and len(residual) == 8
        assert "blocks.1.attn_temp.proj" in residual
    else:
        assert len(gelu) == 4 and len(norm) == 8 and len(residual) == 12
        assert "temporal_blocks.0.attn.qkv" in norm and "temporal_blocks.0.attn.proj" in residual
    assert _rel(fused, unfused) < 3e-3, _rel(fused, unfused)


@requires_comfyui
def test_comfyui_pixart_block_forward_patch(tmp_path):
    """The patched forward of ComfyUI's PixArtMSBlock equals ComfyUI's own (unquantized: the unfused branch of
    modulated_input), and with quantized layers the fused model matches the unfused one."""
    import_comfyui()
    import comfy.sd

    from viditq.quant_core.fusions import _comfy_pixart_block_forward

    patcher = comfy.sd.load_diffusion_model(str(write_tiny_checkpoint(tmp_path, depth=1)))
    dm = copy.deepcopy(patcher.model.diffusion_model).float()
    block = dm.blocks[0]
    g = torch.Generator().manual_seed(0)
    x, y, t = torch.randn(2, 64, 1152, generator=g), torch.randn(2, 12, 1152, generator=g), torch.randn(2, 6 * 1152,
                                                                                                    generator=g)
    with torch.no_grad():
        assert torch.equal(_comfy_pixart_block_forward(block)(x, y, t, HW=(8, 8)), block(x, y, t, HW=(8, 8)))
    layers, _ = build_quant_layers(dm, get_preset("w8a8-smoothquant"))
    patches = fusion_patches(dm, layers)
    assert set(patches) == {"blocks.0.forward", "blocks.0.mlp.act", "blocks.0.attn.qkv", "blocks.0.mlp.fc1",
                            "blocks.0.mlp.fc2", "blocks.0.attn.proj", "blocks.0.cross_attn.proj"}
    xin = torch.randn(2, 4, 64, 64, generator=g)  # ComfyUI positional tables need >= 64
    ts = torch.tensor([700.0, 300.0])
    ctx = torch.cat([conditioning("a")[0][0], conditioning("")[0][0]]).float()
    with torch.no_grad():
        old = replace_layers(dm, layers)
        unfused = dm(xin, ts, ctx)
        replace_layers(dm, old)
        old = install_quant_layers(dm, layers)
        fused = dm(xin, ts, ctx)
        replace_layers(dm, old)
    assert _rel(fused, unfused) < 3e-3, _rel(fused, unfused)


def test_fused_layer_on_the_triton_path(monkeypatch):
    """The dispatcher's Triton route (prologue kernel + GEMM kernel, CPU interpreter) matches the reference route."""
    model = tiny_pixart(depth=1)
    layers, _ = build_quant_layers(model, get_preset("w8a8-smoothquant"))
    patches = fusion_patches(model, layers)
    qkv, fc2 = patches["blocks.0.attn.qkv"], patches["blocks.0.mlp.fc2"]
    g = torch.Generator().manual_seed(5)
    x, h = torch.randn(2, 9, 256, generator=g), torch.randn(2, 9, fc2.in_features, generator=g)
    ada = (torch.randn(2, 6, 256, generator=g) * 0.3).chunk(6, dim=1)
    with torch.no_grad():
        qkv.arm_norm_modulate(ada[0], ada[1], 9)
        ref_qkv, ref_fc2 = qkv(x), fc2(h)
        monkeypatch.setattr(dispatch, "resolve_backend", lambda requested, device: "triton")
        qkv.arm_norm_modulate(ada[0], ada[1], 9)
        tri_qkv, tri_fc2 = qkv(x), fc2(h)
    assert _rel(tri_qkv, ref_qkv) < 1e-3 and _rel(tri_fc2, ref_fc2) < 1e-3


@requires_comfyui
def test_comfyui_quantize_node_installs_the_fusions(tmp_path, monkeypatch):
    import_comfyui()
    import comfy.sd

    from viditq.nodes.quantize import ViDiTQQuantize

    patcher = comfy.sd.load_diffusion_model(str(write_tiny_checkpoint(tmp_path, depth=1)))
    (fused,) = ViDiTQQuantize.execute(patcher, "w8a8-smoothquant", None, None, "auto").args
    keys = set(fused.object_patches)
    assert {"diffusion_model.blocks.0.forward", "diffusion_model.blocks.0.mlp.act"} <= keys
    assert getattr(fused.object_patches["diffusion_model.blocks.0.mlp.fc2"], "input_act", None) == "gelu_tanh"
    monkeypatch.setenv(FUSE_ENV, "0")
    (plain,) = ViDiTQQuantize.execute(patcher, "w8a8-smoothquant", None, None, "auto").args
    assert "diffusion_model.blocks.0.mlp.act" not in plain.object_patches


def test_install_with_a_foreign_layer_name_leaves_the_model_untouched():
    """Layers built for another model (one name this model lacks) raise before anything is swapped."""
    model = tiny_pixart(depth=2)
    layers, _ = build_quant_layers(model, get_preset("w8a8"))
    before = {n: id(m) for n, m in model.named_modules()}
    bad = {**layers, "blocks.0.attn.no_such_layer": next(iter(layers.values()))}
    with pytest.raises(AttributeError, match="no_such_layer"):
        install_quant_layers(model, bad)
    assert {n: id(m) for n, m in model.named_modules()} == before
    with pytest.raises(AttributeError):
        replace_layers(model, {"blocks.99.mlp.fc1": nn.Linear(2, 2)})
    assert {n: id(m) for n, m in model.named_modules()} == before
