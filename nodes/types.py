"""Custom ComfyUI socket types of this plugin (public interface: keep the names stable)."""
import comfy.samplers
from comfy_api.latest import io

CalibType = io.Custom("VIDITQ_CALIB")
PlanType = io.Custom("VIDITQ_PLAN")
# an external scorer: damage(FP16 run, test run) replacing one of the planner's built-in proxies (quant_core.sensitivity)
ScorerType = io.Custom("VIDITQ_SCORER")


def sampling_inputs() -> list:
    """seed, steps, cfg, sampler_name, scheduler: the stock KSampler's widgets, in its order."""
    return [
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
        io.Int.Input("steps", default=20, min=1, max=10000),
        io.Float.Input("cfg", default=4.5, min=0.0, max=100.0, step=0.1, round=0.01),
        io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler"),
        io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal"),
    ]
