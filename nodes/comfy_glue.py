"""The few places that touch ComfyUI internals: the diffusion model inside a MODEL, and sampling."""
import statistics
import time
from typing import Dict, List, Optional, Tuple

import torch

from ..quant_core.quant_linear import QuantLinear, TimestepSwitchLinear

PREFIX = "diffusion_model."


def diffusion_model(patcher) -> torch.nn.Module:
    return patcher.get_model_object("diffusion_model")


def set_inference_dtype(model_config, n_params: int, weight_dtype, dtype=None) -> torch.dtype:
    """Choose the inference dtype as ComfyUI's loaders do (the asked one, else what the device supports for a model
    of this size and weight dtype), set it and its manual cast on the model config, and return it."""
    import comfy.model_management as mm

    supported = list(model_config.supported_inference_dtypes)
    if dtype is None:
        dtype = mm.unet_dtype(model_params=n_params, supported_dtypes=supported, weight_dtype=weight_dtype)
    manual_cast = mm.unet_manual_cast(dtype, mm.get_torch_device(), supported)
    model_config.set_inference_dtype(dtype, manual_cast)
    return dtype


def fp_lookup(patcher):
    """Resolve each layer to the linear this MODEL would run: through other clones' module swaps, with the
    original weights (ComfyUI patches weights in place while a clone is loaded) plus this MODEL's own weight
    patches (LoRA and the like) applied, so quantization sees exactly what sampling the FP MODEL would use."""
    def lookup(name, module):
        module = patcher.get_model_object(PREFIX + name)
        if not isinstance(module, torch.nn.Linear):
            return module
        tensors, changed = {}, False
        for attr in ("weight", "bias"):
            value = getattr(module, attr)
            key = f"{PREFIX}{name}.{attr}"
            if value is None:
                continue
            backup = patcher.backup.get(key)
            if backup is not None:
                value, changed = backup.weight, True
            if key in patcher.patches:
                import comfy.lora

                value = comfy.lora.calculate_weight(patcher.patches[key], value.float().clone(), key).to(value.dtype)
                changed = True
            tensors[attr] = value
        if not changed:
            return module
        linear = torch.nn.Linear(module.in_features, module.out_features, bias="bias" in tensors, device="meta")
        for attr, value in tensors.items():
            setattr(linear, attr, torch.nn.Parameter(value.detach(), requires_grad=False))
        return linear

    return lookup


def ensure_not_quantized(patcher, what: str) -> None:
    if any(isinstance(v, (QuantLinear, TimestepSwitchLinear)) for v in patcher.object_patches.values()):
        raise ValueError(f"{what} needs the FP16 MODEL, but this MODEL is already quantized by ViDiT-Q; "
                         "connect the loader's output instead")


def quant_summary(patcher) -> Dict:
    """What ViDiTQQuantize recorded on this MODEL (empty for a plain model)."""
    return dict(patcher.model_options.get("vidit_q", {}))


def ksample(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, denoise=1.0
            ) -> Tuple[Dict, float]:
    """Stock KSampler semantics (progress bar, previews); returns the latent dict and wall seconds."""
    out, seconds, _ = ksample_timed(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                    denoise, time_calls=False)
    return out, seconds


TIMER_KEY = "vidit_q_call_timer"


def ksample_timed(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, denoise=1.0,
                  time_calls=True) -> Tuple[Dict, float, List[float]]:
    """ksample, plus the milliseconds of every diffusion-model call (CUDA events around each call on a GPU: no
    synchronization inside the loop, so the timing does not slow the sampling it measures; wall clock elsewhere)."""
    import comfy.model_management
    import comfy.patcher_extension
    import nodes as comfy_nodes

    device = comfy.model_management.get_torch_device()
    marks = []
    if time_calls:
        cuda = device.type == "cuda"

        def timer(executor, *args, **kwargs):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = executor(*args, **kwargs)
                end.record()
                marks.append((start, end))
            else:
                t = time.perf_counter()
                out = executor(*args, **kwargs)
                marks.append((t, time.perf_counter()))
            return out

        model = model.clone()  # the caller's MODEL keeps its wrappers as they were
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, TIMER_KEY, timer)
    t0 = time.perf_counter()
    (out,) = comfy_nodes.common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                         latent, denoise=denoise)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    ms = [a.elapsed_time(b) if isinstance(a, torch.cuda.Event) else (b - a) * 1e3 for a, b in marks]
    return out, seconds, ms


def _graphed_or_compiled(model) -> bool:
    import comfy.patcher_extension

    from .cuda_graphs import WRAPPER_KEY

    return bool(model.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
                or model.model_options.get("torch_compile_kwargs"))


def eager_hint(model_q, model_fp=None) -> Optional[str]:
    """A note for reports on a CUDA GPU: when the quantized MODEL runs neither from CUDA graphs nor compiled (its
    step is then bound by the host: a few hundred small launches and their Python), or when only it does (the
    speedup then includes what the graphs alone gain)."""
    import comfy.model_management

    if comfy.model_management.get_torch_device().type != "cuda" or not model_q.model_options.get("vidit_q"):
        return None
    if not _graphed_or_compiled(model_q):
        return ("the quantized MODEL runs eagerly, which is host-bound on GPUs (a few hundred small kernel launches "
                "per step): put ViDiT-Q CUDA Graphs (or ViDiT-Q Compile Model) after ViDiT-Q Quantize for its GPU "
                "speed")
    if model_fp is not None and not _graphed_or_compiled(model_fp):
        return ("only the quantized MODEL runs from CUDA graphs / compiled: the speedup includes what that alone "
                "gains; put ViDiT-Q CUDA Graphs on the FP16 MODEL too to compare the quantization alone")
    return None


def steady_ms(call_ms: List[float], skip: int = 2) -> Optional[float]:
    """Median ms of a model call once warm: the first `skip` calls are left out (our kernels tune on the first call
    of a shape, ViDiT-Q CUDA Graphs records on the second)."""
    rest = call_ms[skip:] if len(call_ms) > skip else call_ms
    return statistics.median(rest) if rest else None


def install_range_clock(patcher, clock) -> None:
    """Set `clock` (a per-timestep-range plan's) from model_sampling.timestep(sigma) around every model call.

    An APPLY_MODEL wrapper: it composes with other nodes' wrappers and survives a later unet function wrapper.
    """
    import comfy.patcher_extension

    model_sampling = patcher.get_model_object("model_sampling")

    def set_range(executor, x, t, *args, **kwargs):
        clock.set_timesteps(model_sampling.timestep(t))
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            clock.clear()

    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "vidit_q_timestep_range",
                                 set_range)
