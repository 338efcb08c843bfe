"""ViDiTQQuantize: MODEL -> a clone whose quantizable linears are patched with QuantLinear."""
import logging

from comfy_api.latest import io

from ..kernels import BACKENDS
from ..quant_core import PRESET_NAMES, build_quant_layers, get_preset
from .comfy_glue import PREFIX, diffusion_model, ensure_not_quantized, fp_lookup
from .types import CalibType, PlanType

log = logging.getLogger("vidit_q")


class ViDiTQQuantize(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ViDiTQQuantize",
            display_name="ViDiT-Q Quantize DiT",
            category="ViDiT-Q",
            description="Quantizes the DiT's block linears (weights stored as int8/int4/fp8, activations "
                        "quantized per token at run time). The input MODEL is left untouched.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("preset", options=PRESET_NAMES, default="w8a8"),
                CalibType.Input("calib", optional=True,
                                tooltip="From ViDiT-Q Calibrate; enables static channel smoothing."),
                PlanType.Input("plan", optional=True, tooltip="Mixed-precision plan (per-layer bits)."),
                io.Combo.Input("backend", options=list(BACKENDS), default="auto", optional=True,
                               tooltip="auto: Triton kernels on CUDA GPUs, torch reference elsewhere."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, preset, calib=None, plan=None, backend="auto") -> io.NodeOutput:
        config = get_preset(preset)
        if not config.enabled:
            log.info("ViDiT-Q: preset fp16 leaves the model as it is")
            return io.NodeOutput(model)
        ensure_not_quantized(model, "ViDiT-Q Quantize")
        layers, summary = build_quant_layers(diffusion_model(model), config, calib, plan, backend,
                                             lookup=fp_lookup(model))
        quantized = model.clone()
        for name, layer in layers.items():
            quantized.add_object_patch(PREFIX + name, layer)
        quantized.model_options["vidit_q"] = summary
        log.info("ViDiT-Q: %s quantized %d linears (%.1f MB -> %.1f MB of weights)%s", preset,
                 summary["layers_quantized"], summary["weight_bytes_fp16"] / 1e6,
                 summary["weight_bytes_quantized"] / 1e6, "" if calib is not None else " without calibration")
        return io.NodeOutput(quantized)
