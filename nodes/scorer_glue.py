"""ComfyUI's VAE / CLIP_VISION / CLIP objects as the plain callables of quant_core's external scorers.

Duck-typed, with no ComfyUI import (like comfy_glue), so the checks and their messages are tested with small
stand-ins. What is used of each object:
  VAE          decode(latent) -> pictures [..., H, W, 3] in 0..1; latent_channels (checked against the latent)
  CLIP_VISION  encode_image(image [B, H, W, 3], crop=bool) -> output with image_embeds [B, D] (the projected
               CLS token: CLIP's shared image-text space)
  CLIP         tokenize(text); cond_stage_model.set_clip_options / reset_clip_options / encode_token_weights
               and load_model() (what CLIP.encode_from_tokens itself calls), else encode_from_tokens(tokens,
               return_pooled=True) -> (cond, pooled [1, D])

The pooled text output must be *projected* (text_projection of the EOS token: CLIP's shared image-text space,
where image_embeds live). ComfyUI returns it unprojected for SD1.x's CLIP-L and for the CLIP-L of FLUX / SD3
(return_projected_pooled=False; projected only for SD2's OpenCLIP-H, SDXL's CLIP-G and HiDream's CLIP-L), so
the scorer asks for the projected one with the option encode_from_tokens uses for the opposite
(set_clip_options({"projected_pooled": True})). A CLIP-L taken from an SD1.x checkpoint has no text_projection
weights (ComfyUI leaves them empty: zeros), which the zero-embedding check reports.
"""
import logging
from typing import Callable, Optional

import torch

from ..quant_core.sensitivity import ClipScoreScorer, ImageScorer
from ..quant_core.temporal import frames_in_batch

log = logging.getLogger("vidit_q")

PROBE_SIZE = 224  # the probe picture that checks a CLIP vision model at build time
CLIP_PAIRS = ("OpenAI CLIP ViT-L/14: its vision model with clip_l (768-d); OpenCLIP ViT-H/14: clip_vision_h with "
              "SD2's text encoder (1024-d); OpenCLIP ViT-bigG/14: clip_vision_g with clip_g, SDXL's second text "
              "encoder (1280-d)")


def probe_picture() -> torch.Tensor:
    """A fixed picture [1, 224, 224, 3] (colour gradients) to check a CLIP vision model with."""
    ramp = torch.linspace(0.0, 1.0, PROBE_SIZE)
    y, x = torch.meshgrid(ramp, ramp, indexing="ij")
    return torch.stack([x, y, 1.0 - 0.5 * (x + y)], dim=-1)[None]


def _shape(x) -> str:
    return str(tuple(x.shape)) if torch.is_tensor(x) else type(x).__name__


def vae_decoder(vae, who: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """latent -> pictures [N, H, W, 3] float on the CPU (video frames flattened into N; a per-image VAE, such as
    the SD VAE of OpenSORA 1.0, decodes a video latent frame by frame, as OpenSoraVAEDecode does)."""
    if not callable(getattr(vae, "decode", None)):
        raise ValueError(f"{who}: the vae input has no decode(); connect a VAE (e.g. from VAELoader)")

    @torch.no_grad()
    def decode(latent: torch.Tensor) -> torch.Tensor:
        if latent.ndim == 5 and getattr(vae, "latent_dim", 2) != 3:
            latent = frames_in_batch(latent)
        try:
            img = vae.decode(latent)
        except RuntimeError as e:
            if isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            raise ValueError(f"{who}: the VAE could not decode the sampled latent {tuple(latent.shape)} ({e}); "
                             "connect the VAE of this model (PixArt-Σ: the SDXL VAE, PixArt-α and OpenSORA 1.0: "
                             "the SD VAE)") from e
        if not torch.is_tensor(img) or img.ndim < 4 or img.shape[-1] != 3:
            raise ValueError(f"{who}: the VAE decoded to {_shape(img)}, not pictures [..., H, W, 3]")
        return img.detach().reshape(-1, *img.shape[-3:]).float().cpu()

    return decode


def clip_image_encoder(clip_vision, who: str, crop: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """pictures [N, H, W, 3] -> CLIP image embeddings [N, D] (CLIP_VISION.encode_image(...).image_embeds)."""
    if not callable(getattr(clip_vision, "encode_image", None)):
        raise ValueError(f"{who}: the clip_vision input has no encode_image(); connect a CLIP vision model "
                         "(CLIPVisionLoader)")
    model = getattr(clip_vision, "model", None)
    if model is not None and type(model).__name__.lower().startswith("dinov2"):
        raise ValueError(f"{who}: this CLIP_VISION is a DINOv2 image encoder, which has no text side; load a CLIP "
                         f"vision model ({CLIP_PAIRS})")

    @torch.no_grad()
    def encode(images: torch.Tensor) -> torch.Tensor:
        out = clip_vision.encode_image(images, crop=crop)
        emb = getattr(out, "image_embeds", None)
        if emb is None and isinstance(out, dict):
            emb = out.get("image_embeds")
        if not torch.is_tensor(emb):
            raise ValueError(f"{who}: the CLIP vision model gave no image_embeds (its projected image embedding); "
                             f"load a CLIP vision model ({CLIP_PAIRS})")
        return emb.detach().reshape(emb.shape[0], -1).float().cpu()

    return encode


def _projected_pooled(clip, tokens, who: str):
    """The pooled text output in CLIP's shared space (see the module docstring), or None."""
    stage = getattr(clip, "cond_stage_model", None)
    if all(callable(getattr(stage, f, None)) for f in ("set_clip_options", "reset_clip_options",
                                                       "encode_token_weights")):
        stage.reset_clip_options()
        stage.set_clip_options({"projected_pooled": True})
        try:
            if callable(getattr(clip, "load_model", None)):
                clip.load_model()
            with torch.no_grad():
                out = stage.encode_token_weights(tokens)
        finally:
            stage.reset_clip_options()
    else:
        log.warning("%s: this CLIP object has no cond_stage_model options; using encode_from_tokens' pooled output, "
                    "which may be unprojected (then the CLIP score is not meaningful)", who)
        with torch.no_grad():
            out = clip.encode_from_tokens(tokens, return_pooled=True)
    return out[1] if isinstance(out, (tuple, list)) and len(out) > 1 else None


def clip_text_embedding(clip, text: str, who: str) -> torch.Tensor:
    """The pooled (projected) CLIP text embedding [D] of the prompt."""
    if not text or not text.strip():
        raise ValueError(f"{who}: the prompt text is empty; type the prompt the positive conditioning was encoded "
                         "from (the CLIP score measures how well the pictures match it)")
    if not (callable(getattr(clip, "tokenize", None)) and (callable(getattr(clip, "encode_from_tokens", None))
                                                            or hasattr(clip, "cond_stage_model"))):
        raise ValueError(f"{who}: the clip input has no tokenize() / encode_from_tokens(); connect a CLIP text "
                         "encoder (CLIPLoader)")
    pooled = _projected_pooled(clip, clip.tokenize(text), who)
    if not torch.is_tensor(pooled):
        raise ValueError(f"{who}: this text encoder gives no pooled text embedding (a T5 encoder, such as the one "
                         "PixArt and OpenSORA condition on, has none); load the text half of a CLIP with "
                         f"CLIPLoader, type stable_diffusion ({CLIP_PAIRS})")
    pooled = pooled.detach().float().cpu().reshape(pooled.shape[0] if pooled.ndim > 1 else 1, -1)[0]
    if not torch.isfinite(pooled).all() or float(pooled.norm()) == 0.0:
        raise ValueError(f"{who}: the text encoder's pooled embedding is zero or not finite: its text projection is "
                         "probably missing (the CLIP inside an SD1.x checkpoint has no text_projection weights and "
                         "ComfyUI leaves them empty); load, with CLIPLoader, a CLIP text encoder file that has "
                         "text_projection.weight (a CLIPTextModelWithProjection export, e.g. SD3's clip_l)")
    return pooled


def check_clip_pair(encode: Callable[[torch.Tensor], torch.Tensor], text_embeds: torch.Tensor, who: str) -> int:
    """Encode a probe picture: the vision model works and embeds into the text embedding's space."""
    emb = encode(probe_picture())
    if emb.shape[0] != 1 or not torch.isfinite(emb).all():
        raise ValueError(f"{who}: the CLIP vision model gave {_shape(emb)} non-finite or batch-mismatched "
                         "embeddings for a probe picture")
    if float(emb.norm()) == 0.0:
        raise ValueError(f"{who}: the CLIP vision model's image embedding is zero: its visual projection is "
                         "probably missing from the file; load a complete CLIP vision model")
    dv, dt = emb.shape[-1], text_embeds.shape[-1]
    if dv != dt:
        raise ValueError(f"{who}: the CLIP vision model embeds pictures in {dv} dimensions but the text encoder's "
                         f"pooled embedding has {dt}: these two models are not a CLIP pair. Use the two halves of "
                         f"one CLIP ({CLIP_PAIRS})")
    return dv


def _short(text: str, n: int = 40) -> str:
    """One line of at most n ASCII characters (the heat map's font may have no other glyphs)."""
    text = " ".join(text.split()).encode("ascii", "replace").decode()
    return text if len(text) <= n else text[:n - 3] + "..."


def build_clip_scorer(clip_vision, clip, vae, text: str, damage: str = "score_change", crop: bool = True,
                      who: str = "ViDiT-Q CLIP Scorer") -> ClipScoreScorer:
    """A text-alignment scorer from the graph's models: CLIP score of the decoded pictures vs the prompt."""
    decode = vae_decoder(vae, who)
    encode = clip_image_encoder(clip_vision, who, crop)
    text_embeds = clip_text_embedding(clip, text, who)
    dim = check_clip_pair(encode, text_embeds, who)
    kind = "change" if damage == "score_change" else "drop"
    scorer = ClipScoreScorer(decode, encode, text_embeds, damage,
                             label=f'CLIP score {kind} vs FP16 ({dim}-d CLIP, prompt "{_short(text)}")')
    scorer.latent_channels = getattr(vae, "latent_channels", None)
    return scorer


IMAGE_LABELS = {"ssim": "1 - SSIM of the decoded pictures vs FP16",
                "psnr": "MSE (PSNR) of the decoded pictures vs FP16",
                "clip_image": "CLIP image-embedding drift (1 - cos) of the decoded pictures vs FP16"}


def build_image_scorer(vae, kind: str = "ssim", clip_vision=None, crop: bool = True,
                       who: str = "ViDiT-Q Image Scorer") -> ImageScorer:
    """A visual-fidelity scorer on the decoded pictures (SSIM, PSNR, or CLIP image-embedding drift)."""
    decode = vae_decoder(vae, who)
    encode: Optional[Callable] = None
    label = IMAGE_LABELS.get(kind, kind)
    if kind == "clip_image":
        if clip_vision is None:
            raise ValueError(f"{who}: metric clip_image needs a CLIP vision model: connect CLIPVisionLoader's "
                             "output to clip_vision (or pick ssim / psnr)")
        encode = clip_image_encoder(clip_vision, who, crop)
        label += f" ({encode(probe_picture()).shape[-1]}-d)"
    scorer = ImageScorer(decode, kind, encode, label=label)
    scorer.latent_channels = getattr(vae, "latent_channels", None)
    return scorer


def check_scorer_for(scorer, metric: str, socket: str, latent: torch.Tensor, who: str = "ViDiT-Q Planner") -> None:
    """A scorer connected to the planner's `socket` must replace that socket's metric and fit the latent."""
    from ..quant_core.sensitivity import METRIC_TITLES, scorer_label

    got = getattr(scorer, "metric", None)
    if not callable(scorer) or got is None:
        raise ValueError(f"{who}: {socket} must come from a ViDiT-Q scorer node (CLIP Scorer or Image Scorer)")
    if got != metric:
        raise ValueError(f"{who}: the {socket} input got a {METRIC_TITLES.get(got, got)} scorer "
                         f"({scorer_label(scorer)}); connect it to {got}_scorer instead")
    channels = getattr(scorer, "latent_channels", None)
    if channels is not None and latent.ndim >= 4 and latent.shape[1] != channels:
        raise ValueError(f"{who}: the VAE of the {socket} takes {channels}-channel latents but this latent has "
                         f"{latent.shape[1]} channels; connect the VAE of this model to the scorer")
