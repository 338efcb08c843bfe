"""ViDiTQQuantize: MODEL -> a clone whose quantizable linears are patched with QuantLinear."""
import logging

from comfy_api.latest import io

from ..kernels import BACKENDS
from ..quant_core import PRESET_NAMES, build_quant_layers, get_preset
from ..quant_core.attention import ATTENTION_MODES, attention_forward_patches
from ..quant_core.fusions import fusion_patches
from ..quant_core.quant_linear import range_clock_of
from .comfy_glue import PREFIX, diffusion_model, ensure_not_quantized, fp_lookup, install_range_clock
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
                io.Combo.Input("attention", options=list(ATTENTION_MODES), default="off", optional=True,
                               tooltip="Quantized attention (beyond the paper): fp8 = fp8 QK^T and PV (Ada/Hopper); "
                                       "int8 = int8 QK^T, bf16 PV; softmax stays fp32. off = the model's own."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, preset, calib=None, plan=None, backend="auto", attention="off") -> io.NodeOutput:
        config = get_preset(preset)
        if not config.enabled and attention == "off":
            log.info("ViDiT-Q: preset fp16 leaves the model as it is")
            return io.NodeOutput(model)
        ensure_not_quantized(model, "ViDiT-Q Quantize")
        if config.enabled:
            layers, summary = build_quant_layers(diffusion_model(model), config, calib, plan, backend,
                                                 lookup=fp_lookup(model))
        else:  # fp16 linears, quantized attention only
            layers, summary = {}, {"preset": preset, "plan": None, "layers_quantized": 0}
        # the attention option: forward patches of the attention modules (ComfyUI's PixArt passes no
        # transformer_options to optimized_attention, so the optimized_attention_override hook cannot reach it)
        attn_patches = attention_forward_patches(diffusion_model(model), attention, backend)
        summary["attention"] = attention
        summary["attention_modules"] = len(attn_patches)
        quantized = model.clone()
        for name, layer in layers.items():
            quantized.add_object_patch(PREFIX + name, layer)
        for name, fn in attn_patches.items():
            quantized.add_object_patch(PREFIX + name, fn)
        # GELU and LayerNorm+modulate fused into the quantize of the layers they feed (quant_core/fusions.py)
        for name, obj in fusion_patches(diffusion_model(model), layers).items():
            quantized.add_object_patch(PREFIX + name, obj)
        clock = range_clock_of(layers)
        if clock is not None:  # a per-timestep-range plan: tell its layers the timestep range of every call
            install_range_clock(quantized, clock)
        if plan is not None and plan.base_preset != preset:
            log.warning("ViDiT-Q: the plan was made with preset %s and is applied with %s (its bits are kept)",
                        plan.base_preset, preset)
        quantized.model_options["vidit_q"] = summary
        if layers:
            log.info("ViDiT-Q: %s quantized %d linears (%.1f MB -> %.1f MB of weights)%s", preset,
                     summary["layers_quantized"], summary["weight_bytes_fp16"] / 1e6,
                     summary["weight_bytes_quantized"] / 1e6, "" if calib is not None else " without calibration")
        if attn_patches:
            log.info("ViDiT-Q: %s attention in %d attention modules", attention, len(attn_patches))
        return io.NodeOutput(quantized)
