"""ViDiTQCudaGraphs in ComfyUI (in-process, CPU): a quantized tiny PixArt sampled through the node's wrapper gives
what the eager quantized MODEL gives, with CUDA graph capture replaced by the CPU stand-in of tests/helpers.py (the
first step eager, the second recorded, the rest replayed on fresh inputs); with the real capture on the CPU every
call runs eagerly; the input MODEL is untouched; a MODEL already compiled with CUDA graphs is refused."""
import pytest
import torch

from comfy_env import conditioning, import_comfyui, requires_comfyui, write_tiny_checkpoint
from helpers import fake_capture

pytestmark = requires_comfyui


@pytest.fixture(scope="module")
def fp_model(tmp_path_factory):
    import_comfyui()
    import comfy.sd

    path = write_tiny_checkpoint(tmp_path_factory.mktemp("diffusion_models"))
    return comfy.sd.load_diffusion_model(str(path))


@pytest.fixture(scope="module")
def quantized(fp_model):
    from viditq.nodes.quantize import ViDiTQQuantize

    return ViDiTQQuantize.execute(fp_model, "w8a8-smoothquant", None, None, "auto", "off").args[0]


def _ksample(model, steps=4, seed=3):
    import nodes

    (out,) = nodes.common_ksampler(model, seed, steps, 4.5, "euler", "normal", conditioning("a red cube"),
                                   conditioning(""), {"samples": torch.zeros(1, 4, 64, 64)})
    return out["samples"]


def _stand_ins(model):
    from comfy.patcher_extension import WrappersMP
    from viditq.nodes.cuda_graphs import WRAPPER_KEY

    wrappers = model.get_wrappers(WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    return wrappers, [s for w in wrappers for s in w.graphed.values()]


@pytest.mark.parametrize("stand_in_capture", [True, False])
def test_cuda_graphs_node_samples_like_eager(quantized, stand_in_capture, monkeypatch):
    from viditq.nodes import cuda_graphs

    if stand_in_capture:
        monkeypatch.setattr(cuda_graphs, "CAPTURE", fake_capture)
    eager = _ksample(quantized)
    (graphed,) = cuda_graphs.ViDiTQCudaGraphs.execute(quantized, 2).args
    assert graphed is not quantized and not _stand_ins(quantized)[0]
    out = _ksample(graphed)
    assert torch.equal(out, eager)
    wrappers, stand_ins = _stand_ins(graphed)
    assert len(wrappers) == 1 and len(stand_ins) == 1
    stats = stand_ins[0].graphs.stats
    # 4 steps, cond + uncond in one call each: eager, record, replay, replay (the CPU: eager 4 times)
    assert stats == ({"eager": 1, "captured": 1, "replayed": 2} if stand_in_capture else
                     {"eager": 4, "captured": 0, "replayed": 0}), stats
    if stand_in_capture:
        # ComfyUI loading the MODEL again (weights may move) drops its graphs: recorded anew, still equal to eager
        ref = _ksample(quantized, seed=5)
        assert torch.equal(_ksample(graphed, seed=5), ref) and torch.equal(_ksample(graphed, seed=5), ref)
        stand_in = [s for s in _stand_ins(graphed)[1]]
        st = stand_in[0].graphs.stats  # (ComfyUI on the CPU loads the model again for every run: 2 replays)
        assert len(stand_in) == 1 and st["eager"] == 1 and st["captured"] == 1 and st["replayed"] in (2, 6), st
    assert torch.equal(_ksample(quantized), eager)  # the input MODEL still runs as before
    if stand_in_capture:  # ComfyUI reloading the model (weights may move) drops the graphs
        from comfy.patcher_extension import CallbacksMP
        from viditq.nodes.cuda_graphs import WRAPPER_KEY

        for cb in graphed.get_all_callbacks(CallbacksMP.ON_LOAD):
            cb(graphed, None, 0, False, True)
        assert not wrappers[0].graphed
        assert graphed.callbacks[CallbacksMP.ON_DETACH][WRAPPER_KEY] == [wrappers[0].reset]


def test_cuda_graphs_node_refuses_graph_compiled_models(quantized):
    from viditq.nodes.compile_model import ViDiTQCompileModel
    from viditq.nodes.cuda_graphs import ViDiTQCudaGraphs

    for mode, backend in (("reduce-overhead", "inductor"), ("default", "cudagraphs")):
        (compiled,) = ViDiTQCompileModel.execute(quantized, mode, True, backend).args
        with pytest.raises(ValueError, match="already compiled with CUDA graphs"):
            ViDiTQCudaGraphs.execute(compiled)
    (compiled,) = ViDiTQCompileModel.execute(quantized, "default", True, "inductor", False).args
    assert ViDiTQCudaGraphs.execute(compiled).args[0] is not compiled  # Inductor without graphs: allowed
    schema = ViDiTQCudaGraphs.define_schema()
    assert schema.node_id == "ViDiTQCudaGraphs"



def _frozen_capture(clocks):
    """The CPU stand-in capture, with the one thing it lacks for this test: a replay runs with the range clocks as
    they were at its capture, as a real CUDA graph (which records kernels, not Python) does."""
    from helpers import FakeGraph

    def capture(run):
        seen = [c.current for c in clocks]
        graph = FakeGraph(run)
        replay = graph.replay

        def frozen_replay():
            now = [c.current for c in clocks]
            for c, r in zip(clocks, seen):
                c.current = r
            try:
                replay()
            finally:
                for c, r in zip(clocks, now):
                    c.current = r

        graph.replay = frozen_replay
        return graph, graph.out

    return capture


def test_per_range_plan_records_each_timestep_range(fp_model, monkeypatch):
    """A per-timestep-range plan switches bits with the timestep, Python state that a replay freezes: each range
    gets its own graphs (even with max_graphs = 1) instead of replaying the bits of the range recorded first."""
    from viditq.nodes import cuda_graphs
    from viditq.nodes.comfy_glue import diffusion_model, fp_lookup
    from viditq.nodes.quantize import ViDiTQQuantize
    from viditq.quant_core import QuantPlan, TimestepSwitchLinear, describe_model

    # (through fp_lookup: a quantized clone may be the one loaded)
    _, _, layers, fingerprint = describe_model(diffusion_model(fp_model), fp_lookup(fp_model))
    plan = QuantPlan(fingerprint, {}, base_preset="w8a8", timestep_ranges=2,
                     range_layers={n: [{"w_bits": 8}, {"w_bits": 4}] for n in layers if n.startswith("blocks.")})
    planned = ViDiTQQuantize.execute(fp_model, "w8a8", None, plan, "auto", "off").args[0]
    switches = [o for o in planned.object_patches.values() if isinstance(o, TimestepSwitchLinear)]
    assert switches
    clocks = list({id(s.clock): s.clock for s in switches}.values())
    monkeypatch.setattr(cuda_graphs, "CAPTURE", _frozen_capture(clocks))

    eager = _ksample(planned, steps=6)
    (graphed,) = cuda_graphs.ViDiTQCudaGraphs.execute(planned, 1).args
    out = _ksample(graphed, steps=6)
    (stand_in,) = _stand_ins(graphed)[1]
    assert stand_in.clocks == clocks
    stats = stand_in.graphs.stats
    assert stats["captured"] == 2 and stats["replayed"] >= 2, stats  # one graph per range
    assert torch.equal(out, eager)

    # what this guards against, shown by the same stand-in: with the ranges left out of the signature, steps of the
    # second range replay the first range's graph and the result changes
    monkeypatch.setattr(cuda_graphs, "TimestepSwitchLinear", type("NoSwitch", (), {}))
    for wrapper in _stand_ins(graphed)[0]:
        wrapper.reset()  # (ComfyUI on the CPU also reloads, and so resets, for every run)
    assert not torch.equal(_ksample(graphed, steps=6), eager)


def test_sampler_report_says_when_a_quantized_model_runs_eagerly_on_a_gpu(quantized, fp_model, monkeypatch):
    import comfy.model_management
    from viditq.nodes import cuda_graphs
    from viditq.nodes.comfy_glue import eager_hint

    assert eager_hint(quantized) is None  # the CPU: nothing to say
    monkeypatch.setattr(comfy.model_management, "get_torch_device", lambda: torch.device("cuda", 0))
    assert "ViDiT-Q CUDA Graphs" in eager_hint(quantized)
    graphed_q = cuda_graphs.ViDiTQCudaGraphs.execute(quantized).args[0]
    assert eager_hint(graphed_q) is None
    assert "FP16 MODEL too" in eager_hint(graphed_q, fp_model)  # graphs on one side only: said
    assert eager_hint(graphed_q, cuda_graphs.ViDiTQCudaGraphs.execute(fp_model).args[0]) is None
    assert eager_hint(fp_model) is None  # not quantized
