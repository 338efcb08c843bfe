"""ViDiTQCompileModel: torch.compile a (quantized or not) MODEL's diffusion model, through ComfyUI's own compile
wrapper (comfy_api.torch_helpers.set_torch_compile_wrapper), on a clone.

Our quantized linears and attention are torch.library custom ops under torch.compile (kernels/custom_ops.py), so a
quantized PixArt compiles with fullgraph=True: Inductor fuses everything between them (LayerNorm + modulate, GELU,
gate + residual) and, with mode "reduce-overhead", replays the step from CUDA graphs.

First calls: our Triton kernels time their launch candidates on the first call of each shape, and build a few
device constants (the ±1 Hadamard blocks) on first use. Compiled code runs the custom ops for real, so in the
default modes that first call does this as in eager. Under "reduce-overhead", Inductor's CUDA graph trees run every
new graph (every new shape) once as a warm-up before recording it, so no tuning happens inside a capture (measured:
0 of 18 tunings); but the warm-up allocates from the CUDA graphs' private memory pool, and a constant cached there
fails cudagraph trees' check "Detected N tensor(s) in the cudagraph pool not tracked as outputs" (H200, W8A8 fp8
PixArt). So with "reduce-overhead" this node runs the first call of each input shape once uncompiled
(torch.compiler.set_stance("force_eager")) before the compiled one: tuning and constants happen outside any pool.
"""
import logging

import torch
from comfy_api.latest import io

log = logging.getLogger("vidit_q")

MODES = {  # combo value -> torch.compile mode
    "default": None,
    "max-autotune-no-cudagraphs": "max-autotune-no-cudagraphs",
    "reduce-overhead": "reduce-overhead",
}
# cudagraphs: Dynamo traces the model and torch's CUDA graph trees replay it, with no Inductor code generation: the
# eager kernels without their Python launch cost, after a compile of seconds instead of Inductor's tens of seconds.
# aot_eager / eager: debugging (trace only).
COMPILE_BACKENDS = ("inductor", "cudagraphs", "aot_eager", "eager")
GRAPH_BACKENDS = ("cudagraphs",)
PREWARM_KEY = "vidit_q_eager_first_call"
# Inductor options that made the fused activation quantize (LayerNorm+modulate+quantize, GELU+quantize) faster on
# an H200 (bench/NOTES_e2e.md, run 4: 0.325 -> 0.253 ms per block at 1024 px, 9 % per step; fp16 unchanged):
# tuned reduction block sizes, and rows of K = 1152 / 4608 kept in registers where that measures faster
TUNE_OPTIONS = {"coordinate_descent_tuning": True, "triton.multi_kernel": 1}


def _shape_key(args, kwargs):
    """What makes a new graph (and new kernel tunings): shapes, dtypes and devices of the tensor arguments."""
    return tuple((tuple(v.shape), v.dtype, v.device.type) for v in (*args, *kwargs.values())
                 if isinstance(v, torch.Tensor))


KERNEL_QUANT_KEY = "vidit_q_kernel_quantize"


def kernel_quantize_wrapper(executor, *args, **kwargs):
    """APPLY_MODEL wrapper for backends without Inductor: the model traced inside it quantizes every activation in
    our Triton kernel (kernels.dispatch.compile_quant), as eager does; torch's quantize would run unfused there."""
    from ..kernels.dispatch import compile_quant

    with compile_quant("kernel"):
        return executor(*args, **kwargs)


def eager_first_call_wrapper():
    """APPLY_MODEL wrapper: the first call of each input shape runs once uncompiled (its output dropped), then the
    compiled model runs. `wrapper.warmed` holds the shapes seen."""
    warmed = set()

    def wrapper(executor, *args, **kwargs):
        key = _shape_key(args, kwargs)
        if key not in warmed:
            with torch.compiler.set_stance("force_eager"):
                executor(*args, **kwargs)
            warmed.add(key)
        return executor(*args, **kwargs)

    wrapper.warmed = warmed
    return wrapper


class ViDiTQCompileModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ViDiTQCompileModel",
            display_name="ViDiT-Q Compile Model",
            category="ViDiT-Q",
            description="torch.compile the MODEL's diffusion model (a ViDiT-Q quantized one or any other) when it "
                        "samples, through ComfyUI's own compile wrapper, on a clone (the input MODEL is untouched). "
                        "The quantized layers and attention are opaque custom ops, so the model compiles without "
                        "graph breaks (fullgraph) and Inductor fuses the elementwise work around them. ComfyUI's "
                        "stock TorchCompileModel node works with quantized models too now (inductor); this node adds "
                        "the mode (reduce-overhead = CUDA graphs, the fastest) and fullgraph. The first sampling run "
                        "compiles (tens of seconds); a new resolution or batch size compiles again.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("mode", options=list(MODES), default="default",
                               tooltip="default: Inductor; max-autotune-no-cudagraphs: Inductor with GEMM/conv "
                                       "autotuning (slow compile); reduce-overhead: Inductor + CUDA graphs (removes "
                                       "the Python launch overhead: the fastest for quantized models; one graph per "
                                       "shape, more memory; each new shape first runs once uncompiled)."),
                io.Boolean.Input("fullgraph", default=True,
                                 tooltip="Fail instead of silently splitting the model at code torch.compile cannot "
                                         "trace (a graph break)."),
                io.Boolean.Input("tune_fusions", default=True, optional=True,
                                 tooltip="Inductor: tune the fused kernels (coordinate descent over block sizes, "
                                         "persistent-vs-looped reductions timed): faster quantized steps, longer "
                                         "first compile."),
                io.Combo.Input("backend", options=list(COMPILE_BACKENDS), default="inductor", optional=True,
                               tooltip="inductor: generated fused kernels (the mode applies). cudagraphs: no code "
                                       "generation, the model's own kernels replayed from CUDA graphs: removes the "
                                       "Python launch cost (most of an uncompiled quantized step) after a compile "
                                       "of seconds; each new shape first runs once uncompiled. aot_eager / eager: "
                                       "debugging, trace only. The mode applies to inductor only."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, mode="default", fullgraph=True, backend="inductor", tune_fusions=True
                ) -> io.NodeOutput:
        from comfy.patcher_extension import WrappersMP
        from comfy_api.torch_helpers import set_torch_compile_wrapper

        if mode not in MODES:
            raise ValueError(f"ViDiT-Q Compile Model: unknown mode {mode!r}; expected one of {list(MODES)}")
        if backend not in COMPILE_BACKENDS:
            raise ValueError(f"ViDiT-Q Compile Model: unknown backend {backend!r}; expected one of "
                             f"{list(COMPILE_BACKENDS)}")
        compile_mode = MODES[mode]
        if backend != "inductor" and compile_mode is not None:
            log.info("ViDiT-Q Compile Model: mode %s applies to Inductor only; backend %s ignores it", mode, backend)
            compile_mode = None
        graphs = mode == "reduce-overhead" or backend in GRAPH_BACKENDS
        if graphs and not torch.cuda.is_available():
            log.info("ViDiT-Q Compile Model: CUDA graphs (reduce-overhead / cudagraphs) have no effect without a "
                     "CUDA device")
        options = None
        if backend == "inductor" and tune_fusions:  # torch.compile takes a mode or options: the mode's as options
            from torch._inductor import list_mode_options

            options = {**(list_mode_options(compile_mode) if compile_mode else {}), **TUNE_OPTIONS}
            compile_mode = None
        compiled = model.clone()
        set_torch_compile_wrapper(model=compiled, backend=backend, mode=compile_mode, options=options,
                                  fullgraph=bool(fullgraph))
        compiled.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, PREWARM_KEY)
        compiled.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, KERNEL_QUANT_KEY)
        if backend != "inductor":
            compiled.add_wrapper_with_key(WrappersMP.APPLY_MODEL, KERNEL_QUANT_KEY, kernel_quantize_wrapper)
        if graphs and hasattr(torch.compiler, "set_stance"):
            compiled.add_wrapper_with_key(WrappersMP.APPLY_MODEL, PREWARM_KEY, eager_first_call_wrapper())
        log.info("ViDiT-Q: diffusion model will be compiled at first use (backend %s, mode %s, fullgraph %s)",
                 backend, mode, bool(fullgraph))
        return io.NodeOutput(compiled)
