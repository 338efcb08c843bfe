"""ViDiTQQuantizedSampler: sample the FP16 and the quantized model alike, compare, report."""
import json

from comfy_api.latest import io, ui

from ..quant_core.metrics import compare
from ..quant_core.temporal import frames_in_batch, temporal_metrics
from ..quant_core.visualize import latent_preview, side_by_side
from .comfy_glue import eager_hint, ksample_timed, quant_summary, steady_ms
from .types import sampling_inputs


class ViDiTQQuantizedSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ViDiTQQuantizedSampler",
            display_name="ViDiT-Q Quantized Sampler (compare)",
            category="ViDiT-Q",
            description="Runs the same sampling on the FP16 and the quantized MODEL (same seed and noise) and "
                        "reports how close the results are and how long each took.",
            inputs=[
                io.Model.Input("model_fp"),
                io.Model.Input("model_q"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image"),
                *sampling_inputs(),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01),
                io.Vae.Input("vae", optional=True, tooltip="Decode both results for the comparison image."),
            ],
            outputs=[
                io.Latent.Output(display_name="latent_fp"),
                io.Latent.Output(display_name="latent_q"),
                io.Image.Output(display_name="compare"),
                io.String.Output(display_name="report"),
            ],
            is_output_node=True,  # shows its report even when nothing is connected downstream
        )

    @classmethod
    def execute(cls, model_fp, model_q, positive, negative, latent_image, seed, steps, cfg, sampler_name,
                scheduler, denoise, vae=None) -> io.NodeOutput:
        args = (seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise)
        latent_fp, seconds_fp, calls_fp = ksample_timed(model_fp, *args)
        latent_q, seconds_q, calls_q = ksample_timed(model_q, *args)
        ref, test = latent_fp["samples"], latent_q["samples"]
        # two speed figures: whole sampling runs (loading, the first call's kernel tuning, CUDA graph recording
        # included: what this run cost) and the steady model call (median after the first two calls: what every
        # further step and run costs)
        step_fp, step_q = steady_ms(calls_fp), steady_ms(calls_q)
        report = {**compare(ref, test), "seconds_fp": seconds_fp, "seconds_q": seconds_q,
                  "speedup": seconds_fp / seconds_q if seconds_q > 0 else None,
                  "model_calls": len(calls_q), "ms_per_call_fp": step_fp, "ms_per_call_q": step_q,
                  "speedup_per_call": step_fp / step_q if step_fp and step_q else None}
        hint = eager_hint(model_q, model_fp)
        if hint:
            report["speed_note"] = hint
        summary = quant_summary(model_q)
        report.update({"preset": summary.get("preset"), "plan": summary.get("plan"),
                       "quantization": {k: v for k, v in summary.items() if k not in ("preset", "plan")}})
        # video latents are 5-D [B, C, T, H, W]: temporal consistency vs FP16 (quant_core/temporal.py), frames
        # decoded one by one by a per-image VAE, compare = one frame of comparison per video frame
        video = ref.ndim == 5
        if video:
            report["temporal"] = temporal_metrics(ref, test)
        if vae is not None:
            per_frame = video and getattr(vae, "latent_dim", 2) != 3
            img_fp = vae.decode(frames_in_batch(ref) if per_frame else ref)
            img_q = vae.decode(frames_in_batch(test) if per_frame else test)
            img_fp, img_q = img_fp.reshape(-1, *img_fp.shape[-3:]), img_q.reshape(-1, *img_q.shape[-3:])
            report["image"] = compare(img_fp, img_q)
            if video:
                report["image_temporal"] = temporal_metrics(img_fp, img_q, frames=img_fp.shape[0] // ref.shape[0])
        elif video:
            img_fp, img_q = latent_preview(frames_in_batch(ref)), latent_preview(frames_in_batch(test))
        else:
            img_fp, img_q = latent_preview(ref), latent_preview(test)
        # one error scale for all frames of a video, so the heat map does not flicker by itself
        image = side_by_side(img_fp, img_q, vmax=float((img_fp - img_q).abs().mean(-1).max()) if video else None)
        text = json.dumps(report, indent=1, default=str)
        return io.NodeOutput(latent_fp, latent_q, image, text, ui=ui.PreviewText(text))
