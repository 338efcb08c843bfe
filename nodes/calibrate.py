"""ViDiTQCalibrate: run real sampling with hooks on every quantizable linear -> VIDITQ_CALIB."""
import logging

from comfy_api.latest import io

from ..quant_core import COND, UNCOND, Calibrator, describe_model
from .comfy_glue import diffusion_model, ensure_not_quantized, fp_lookup, ksample
from .types import CalibType, sampling_inputs

log = logging.getLogger("vidit_q")


class ViDiTQCalibrate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ViDiTQCalibrate",
            display_name="ViDiT-Q Calibrate",
            category="ViDiT-Q",
            description="Samples once with the FP16 model and records each quantizable linear's input channel "
                        "ranges per timestep bucket and per CFG branch. Feed it to ViDiT-Q Quantize / Planner.",
            inputs=[
                io.Model.Input("model", tooltip="The FP16 PixArt model (from UNETLoader)."),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image"),
                *sampling_inputs(),
                io.Int.Input("timestep_buckets", default=4, min=1, max=64, optional=True,
                             tooltip="Equal ranges of the model's timestep axis that get separate statistics."),
            ],
            outputs=[CalibType.Output(display_name="calib")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler,
                timestep_buckets=4) -> io.NodeOutput:
        ensure_not_quantized(model, "ViDiT-Q Calibrate")
        _, variant, layers, fingerprint = describe_model(diffusion_model(model), fp_lookup(model))
        calibrator = Calibrator({n: m for n, (m, _) in layers.items()}, num_buckets=timestep_buckets,
                                groups={n: g for n, (_, g) in layers.items()})
        model_sampling = model.get_model_object("model_sampling")
        work = model.clone()
        previous = work.model_options.get("model_function_wrapper")

        def wrapper(apply_model, args):
            x, sigma, cond_or_uncond = args["input"], args["timestep"], args["cond_or_uncond"]
            rows = x.shape[0] // max(1, len(cond_or_uncond))
            branches = [COND if c == 0 else UNCOND for c in cond_or_uncond for _ in range(rows)]
            calibrator.set_step(model_sampling.timestep(sigma), branches)
            if previous is not None:
                return previous(apply_model, args)
            return apply_model(x, sigma, **args["c"])

        work.set_model_unet_function_wrapper(wrapper)
        with calibrator:
            ksample(work, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image)
        calib = calibrator.result(fingerprint, {
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler_name, "scheduler": scheduler,
            "latent_shape": list(latent_image["samples"].shape), "model_calls": calibrator.calls})
        log.info("ViDiT-Q: calibrated %d layers of %s over %d model calls (%s)", len(layers), variant,
                 calibrator.calls, ", ".join(calib.branches_seen()))
        return io.NodeOutput(calib)
