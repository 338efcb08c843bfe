"""ViDiTQCompileModel in ComfyUI (in-process): a quantized tiny PixArt compiled through ComfyUI's own compile
wrapper samples exactly as the eager quantized MODEL, in one graph (fullgraph), and the input MODEL is untouched.

On the CPU the node runs with the test backend aot_eager (Dynamo + AOTAutograd, no code generation): Inductor would
compile C++ for the whole model, too slow for CI; tests/test_compile.py covers Inductor on a small case."""
import pytest
import torch
from torch._dynamo.utils import counters

from comfy_env import conditioning, import_comfyui, requires_comfyui, write_tiny_checkpoint

pytestmark = requires_comfyui


@pytest.fixture(scope="module")
def comfy_model(tmp_path_factory):
    import_comfyui()
    import comfy.sd

    path = write_tiny_checkpoint(tmp_path_factory.mktemp("diffusion_models"))
    return comfy.sd.load_diffusion_model(str(path))


def _ksample(model, steps=1):
    import nodes

    (out,) = nodes.common_ksampler(model, 3, steps, 4.5, "euler", "normal", conditioning("a red cube"),
                                   conditioning(""), {"samples": torch.zeros(1, 4, 64, 64)})
    return out["samples"]


def _has_compile_wrapper(model):
    from comfy.patcher_extension import WrappersMP
    from comfy_api.torch_helpers.torch_compile import COMPILE_KEY

    return bool(model.get_wrappers(WrappersMP.APPLY_MODEL, COMPILE_KEY))


@pytest.mark.parametrize("attention,mode,backend,preset", [("int8", "default", "aot_eager", "w8a8"),
                                                           ("off", "reduce-overhead", "aot_eager", "w8a8"),
                                                           ("off", "default", "cudagraphs", "w8a8-smoothquant")])
def test_compile_node_samples_like_eager_in_one_graph(comfy_model, attention, mode, backend, preset, monkeypatch):
    """aot_eager ignores the mode; reduce-overhead and the cudagraphs backend add the wrapper that runs each new
    shape once uncompiled. (cudagraphs on the CPU: Dynamo + AOTAutograd trace, torch skips the graphs for CPU
    tensors and runs the traced graph.)"""
    from comfy.patcher_extension import WrappersMP
    from viditq.nodes.compile_model import KERNEL_QUANT_KEY, PREWARM_KEY, ViDiTQCompileModel
    from viditq.nodes.quantize import ViDiTQQuantize

    if attention == "off":
        # ComfyUI's own attention on the CPU is sub-quadratic attention, which asks psutil for free memory: not
        # traceable (fullgraph fails in ComfyUI's code, not ours). On GPUs ComfyUI picks PyTorch SDPA; use it here.
        import comfy.ldm.modules.attention as comfy_attention
        import comfy.ldm.pixart.blocks as pixart_blocks

        monkeypatch.setattr(pixart_blocks, "optimized_attention", comfy_attention.attention_pytorch)
    (model_q,) = ViDiTQQuantize.execute(comfy_model, preset, None, None, "auto", attention).args
    eager = _ksample(model_q)
    torch._dynamo.reset()
    counters.clear()
    try:
        (model_c,) = ViDiTQCompileModel.execute(model_q, mode, True, backend).args
        assert model_c is not model_q and _has_compile_wrapper(model_c) and not _has_compile_wrapper(model_q)
        assert model_c.model_options["torch_compile_kwargs"]["fullgraph"] is True
        prewarm = model_c.get_wrappers(WrappersMP.APPLY_MODEL, PREWARM_KEY)
        assert len(prewarm) == (1 if mode == "reduce-overhead" or backend == "cudagraphs" else 0)
        assert model_c.model_options["torch_compile_kwargs"]["backend"] == backend
        # backends without Inductor quantize in our kernel (unrotated int8 layers too: bit-equal to eager below)
        assert bool(model_c.get_wrappers(WrappersMP.APPLY_MODEL, KERNEL_QUANT_KEY)) == (backend != "inductor")
        compiled = _ksample(model_c)
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
        assert torch.equal(compiled, eager)
        if prewarm:
            assert len(prewarm[0].warmed) == 1  # one input shape (cond + uncond in one batch), run once uncompiled
        if attention == "off":  # (the int8 case skips this: its CPU attention twin is the slow part)
            counters.clear()
            assert torch.equal(_ksample(model_q), eager)  # the input MODEL still runs eagerly
            assert not counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()


def test_compile_node_modes_map_to_torch_compile(comfy_model):
    from viditq.nodes.compile_model import ViDiTQCompileModel

    expected = {"default": None, "max-autotune-no-cudagraphs": "max-autotune-no-cudagraphs",
                "reduce-overhead": "reduce-overhead"}
    for mode, torch_mode in expected.items():  # torch.compile is lazy: nothing compiles until sampling
        (m,) = ViDiTQCompileModel.execute(comfy_model, mode, False, tune_fusions=False).args
        kwargs = m.model_options["torch_compile_kwargs"]
        assert (kwargs["backend"], kwargs["mode"], kwargs["fullgraph"]) == ("inductor", torch_mode, False)
        assert kwargs["options"] is None
        # tuned fusions (the default): the mode goes in as its options (torch.compile takes one or the other)
        (m,) = ViDiTQCompileModel.execute(comfy_model, mode, False).args
        kwargs = m.model_options["torch_compile_kwargs"]
        assert kwargs["mode"] is None and kwargs["options"]["coordinate_descent_tuning"] is True
        assert kwargs["options"].get("triton.cudagraphs", False) == (mode == "reduce-overhead")
    (m,) = ViDiTQCompileModel.execute(comfy_model, "reduce-overhead", True, "aot_eager").args
    assert m.model_options["torch_compile_kwargs"]["mode"] is None  # modes are Inductor's
    (m,) = ViDiTQCompileModel.execute(comfy_model, "max-autotune-no-cudagraphs", True, "cudagraphs").args
    kwargs = m.model_options["torch_compile_kwargs"]
    assert (kwargs["backend"], kwargs["mode"], kwargs["options"]) == ("cudagraphs", None, None)
    with pytest.raises(ValueError, match="unknown backend"):
        ViDiTQCompileModel.execute(comfy_model, "default", True, "tensorrt")
    assert "torch_compile_kwargs" not in comfy_model.model_options
    with pytest.raises(ValueError, match="unknown mode"):
        ViDiTQCompileModel.execute(comfy_model, "max-speed", True)
    schema = ViDiTQCompileModel.define_schema()
    assert schema.node_id == "ViDiTQCompileModel" and "TorchCompileModel" in schema.description
