"""ViDiTQCudaGraphs: the MODEL's diffusion model replayed from CUDA graphs (kernels/step_graph.py), no compile.

An uncompiled quantized step is host-bound (a few hundred small Triton launches and their Python); a replay costs
the GPU time alone. The first sampling step of each input shape runs eagerly (our kernels tune there), the second
captures, the rest replay. Like ComfyUI's compile wrapper, an APPLY_MODEL wrapper swaps the diffusion model for the
graphed one during each call, on a clone of the MODEL.

What a replay does not see: anything the diffusion model reads besides its tensor arguments. transformer_options
is passed at capture and not compared afterwards (ComfyUI rebuilds it every step with fresh uuids, so comparing it
would capture every run anew). The one piece of Python state our own layers read, the timestep range of a
per-timestep-range plan (TimestepSwitchLinear's clock), is part of each graph's signature, so every range gets its
own graphs instead of replaying the bits of the range that was recorded first. Calls with attention patches
(patches / patches_replace) or a ControlNet run eagerly, as do calls on a CPU and calls while ComfyUI streams the
weights (lowvram). When ComfyUI loads or detaches the model (its weights may move), the graphs are dropped and
recorded again.
"""
import logging
import weakref

import torch
from comfy_api.latest import io

from ..kernels.step_graph import StepGraphs
from ..quant_core.quant_linear import TimestepSwitchLinear

log = logging.getLogger("vidit_q")
WRAPPER_KEY = "vidit_q_cuda_graphs"
GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")
CAPTURE = None  # tests: a stand-in for CUDA graph capture (kernels/step_graph.StepGraphs' `capture`)


class GraphedDiffusionModel(torch.nn.Module):
    """Stands in for BaseModel.diffusion_model during a call: plain calls go through StepGraphs, attribute reads
    (dtype, ...) to the real module."""

    def __init__(self, module: torch.nn.Module, max_graphs: int):
        super().__init__()
        self.module = module
        self.options = {}
        # Clocks of per-timestep-range plans (the object patches are applied by now: the wrapper runs inside a
        # loaded model's call, and a reload drops this stand-in). Which variant a TimestepSwitchLinear runs is
        # Python state a replay would freeze, so the ranges go into the signature: up to one graph per shape and
        # range, hence max_graphs input shapes x the ranges.
        clocks = {id(m.clock): m.clock for m in module.modules() if isinstance(m, TimestepSwitchLinear)}
        self.clocks = list(clocks.values())
        ranges = 1
        for c in self.clocks:
            ranges *= c.num_ranges
        self.graphs = StepGraphs(self._run, max_graphs=max_graphs * ranges, capture=CAPTURE)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)

    def _run(self, x, t, context, extra, ranges=()):
        return self.module(x, t, context=context, control=None, transformer_options=self.options, **extra)

    def forward(self, x, t, context=None, control=None, transformer_options=None, **extra):
        opts = transformer_options if transformer_options is not None else {}
        if control is not None or opts.get("patches") or opts.get("patches_replace"):
            return self.module(x, t, context=context, control=control, transformer_options=opts, **extra)
        self.options = opts  # read by the eager warm-up and the capture only
        ranges = tuple(c.current for c in self.clocks)  # (None when unset: the layer then raises, eagerly)
        return self.graphs(x, t, context, extra, ranges)


def cuda_graphs_wrapper(max_graphs: int):
    """APPLY_MODEL wrapper: the BaseModel's diffusion model swapped for its graphed stand-in during the call (one
    stand-in, and so one set of graphs, per diffusion model module). `wrapper.graphed` maps them."""
    graphed = weakref.WeakKeyDictionary()

    def wrapper(executor, *args, **kwargs):
        base = executor.class_obj
        if getattr(base, "model_lowvram", False):  # weights move in and out per call: a graph would read stale ones
            return executor(*args, **kwargs)
        module = base.diffusion_model
        stand_in = graphed.get(module)
        if stand_in is None:
            stand_in = graphed[module] = GraphedDiffusionModel(module, max_graphs)
        base.diffusion_model = stand_in
        try:
            return executor(*args, **kwargs)
        finally:
            base.diffusion_model = module

    def reset(*_args, **_kwargs):
        """ComfyUI (re)loaded or detached the model: its weights may live elsewhere now, so record anew."""
        graphed.clear()

    wrapper.graphed, wrapper.reset = graphed, reset
    return wrapper


class ViDiTQCudaGraphs(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ViDiTQCudaGraphs",
            display_name="ViDiT-Q CUDA Graphs",
            category="ViDiT-Q",
            description="Replay the MODEL's diffusion model from CUDA graphs (on a clone): no compile, and an "
                        "uncompiled quantized model then runs at its GPU speed instead of its Python launch speed. "
                        "The first step of each resolution / batch size runs normally, the second records, the rest "
                        "replay. Use it last in the model chain (a model changed after a graph was recorded is not "
                        "seen); attention patches and ControlNets run without graphs. Needs a CUDA GPU (elsewhere "
                        "the model runs as before).",
            inputs=[
                io.Model.Input("model"),
                io.Int.Input("max_graphs", default=4, min=1, max=64, optional=True,
                             tooltip="At most this many recorded input shapes (each holds its own activation "
                                     "memory); further shapes run without graphs. A per-timestep-range plan "
                                     "records each shape once per timestep range."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, max_graphs=4) -> io.NodeOutput:
        from comfy.patcher_extension import WrappersMP

        kwargs = model.model_options.get("torch_compile_kwargs") or {}
        options = kwargs.get("options") or {}
        if kwargs and (kwargs.get("mode") in GRAPH_COMPILE_MODES or kwargs.get("backend") == "cudagraphs"
                       or options.get("triton.cudagraphs")):
            raise ValueError("ViDiT-Q CUDA Graphs: this MODEL is already compiled with CUDA graphs (mode "
                             f"{kwargs.get('mode')}, backend {kwargs.get('backend')}); use one or the other")
        if not torch.cuda.is_available():
            log.info("ViDiT-Q CUDA Graphs: no CUDA device; the model runs without graphs")
        from comfy.patcher_extension import CallbacksMP

        graphed = model.clone()
        graphed.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY)
        wrapper = cuda_graphs_wrapper(int(max_graphs))
        graphed.add_wrapper_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY, wrapper)
        for event in (CallbacksMP.ON_LOAD, CallbacksMP.ON_DETACH):  # new weight addresses: drop the graphs
            graphed.remove_callbacks_with_key(event, WRAPPER_KEY)
            graphed.add_callback_with_key(event, WRAPPER_KEY, wrapper.reset)
        return io.NodeOutput(graphed)
