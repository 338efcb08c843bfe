"""ViDiTQClipScorer / ViDiTQImageScorer: external scorers for ViDiTQPlanner built from models in the graph."""
from comfy_api.latest import io

from ..quant_core.sensitivity import CLIP_DAMAGES, IMAGE_DAMAGES
from .scorer_glue import build_clip_scorer, build_image_scorer
from .types import ScorerType

CROP = ["center", "none"]


class ViDiTQClipScorer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ViDiTQClipScorer",
            display_name="ViDiT-Q CLIP Scorer (text alignment)",
            category="ViDiT-Q",
            description="Scores text alignment for ViDiT-Q Planner with a CLIP model instead of the built-in proxy "
                        "(the CFG guidance direction): each planner run's latent is decoded with the VAE and its "
                        "CLIP score against the prompt (100 x cosine of the image and text embeddings, every "
                        "frame of a video) is compared with the FP16 run's. Connect to the planner's text_scorer.",
            inputs=[
                io.ClipVision.Input("clip_vision", tooltip="The vision half of a CLIP (CLIPVisionLoader), e.g. "
                                    "OpenAI's ViT-L/14 (with clip_l) or clip_vision_g (with clip_g)."),
                io.Clip.Input("clip", tooltip="The text half of the same CLIP (CLIPLoader, type stable_diffusion), "
                              "e.g. clip_l.safetensors; not the T5 the DiT is conditioned on."),
                io.Vae.Input("vae", tooltip="The VAE of the planned model: decodes each run's latent."),
                io.String.Input("text", multiline=True, default="",
                                tooltip="The prompt the planner's positive conditioning was encoded from."),
                io.Combo.Input("damage", options=list(CLIP_DAMAGES), default="score_change",
                               tooltip="score_change: squared change of the CLIP score vs FP16, either way (ranks "
                                       "stably with one prompt and seed); score_drop: only a lower score counts."),
                io.Combo.Input("crop", options=CROP, default="center",
                               tooltip="How pictures are fitted to the CLIP input size (as CLIPVisionEncode)."),
            ],
            outputs=[ScorerType.Output(display_name="scorer")],
        )

    @classmethod
    def execute(cls, clip_vision, clip, vae, text, damage="score_change", crop="center") -> io.NodeOutput:
        return io.NodeOutput(build_clip_scorer(clip_vision, clip, vae, text, damage, crop == "center"))


class ViDiTQImageScorer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ViDiTQImageScorer",
            display_name="ViDiT-Q Image Scorer (visual fidelity)",
            category="ViDiT-Q",
            description="Scores visual fidelity for ViDiT-Q Planner on decoded pictures instead of the built-in "
                        "latent error: SSIM or PSNR of each run's decoded pictures vs the FP16 run's, or how far "
                        "their CLIP image embeddings moved. Connect to the planner's visual_scorer.",
            inputs=[
                io.Vae.Input("vae", tooltip="The VAE of the planned model: decodes each run's latent."),
                io.Combo.Input("metric", options=list(IMAGE_DAMAGES), default="ssim",
                               tooltip="ssim: 1 - SSIM; psnr: mean squared error of the pictures; clip_image: "
                                       "1 - cosine of CLIP image embeddings (needs clip_vision)."),
                io.Combo.Input("crop", options=CROP, default="center", tooltip="For clip_image (as CLIPVisionEncode)."),
                io.ClipVision.Input("clip_vision", optional=True, tooltip="A CLIP vision model, for clip_image."),
            ],
            outputs=[ScorerType.Output(display_name="scorer")],
        )

    @classmethod
    def execute(cls, vae, metric="ssim", crop="center", clip_vision=None) -> io.NodeOutput:
        return io.NodeOutput(build_image_scorer(vae, metric, clip_vision, crop == "center"))
