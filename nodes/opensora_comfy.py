"""OpenSORA wired into ComfyUI: latent formats, supported-model configs, BaseModel, and the checkpoint loader.

ComfyUI has no OpenSORA, so there is no auto-detection entry; `load_opensora_patcher` does what
comfy.sd.load_diffusion_model does for known families: pick the inference dtype, build the model with
ComfyUI's `operations` (casting / offloading), load the official weights and wrap them in a ModelPatcher.
Video latents are 5-D [B, C, T, H, W] (ComfyUI's video-latent layout).
"""
import logging
import os
from typing import Dict, Tuple

import torch

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.supported_models_base
import comfy.utils

from ..models.opensora import checkpoint as ckpt
from ..models.opensora.scheduler import IDDPM_SAMPLING_SETTINGS
from ..models.opensora.stdit import STDiT
from ..models.opensora.stdit3 import STDiT3
from ..models.opensora import vae12
from ..quant_core.archs.opensora import set_rule_options
from ..quant_core.temporal import frames_in_batch
from .comfy_glue import set_inference_dtype

log = logging.getLogger("vidit_q")

WEIGHT_DTYPES = {"default": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class OpenSora10Latent(comfy.latent_formats.SD15):
    """SD-VAE latents, one per frame (OpenSORA 1.0 encodes each frame with sd-vae-ft-ema, x 0.18215)."""
    latent_dimensions = 3

    def __init__(self):
        super().__init__()
        self.taesd_decoder_name = None  # TAESD previews decode images; Latent2RGB handles 5-D latents


class OpenSora12Latent(comfy.latent_formats.LatentFormat):
    """OpenSORA 1.2 video-VAE latents: the model sees (z - shift) / scale per channel (official values)."""
    latent_channels = 4
    latent_dimensions = 3
    shift = (-0.10, 0.34, 0.27, 0.98)
    scale = (3.85, 2.32, 2.33, 3.06)

    def _stats(self, latent):
        view = (1, -1) + (1,) * (latent.ndim - 2)
        return (torch.tensor(self.shift, device=latent.device, dtype=latent.dtype).view(view),
                torch.tensor(self.scale, device=latent.device, dtype=latent.dtype).view(view))

    def process_in(self, latent):
        shift, scale = self._stats(latent)
        return (latent - shift) / scale

    def process_out(self, latent):
        shift, scale = self._stats(latent)
        return latent * scale + shift


class ComfySTDiT3(STDiT3):
    """STDiT3 in ComfyUI's flow convention: ComfyUI's flow models predict noise - x0; OpenSORA's x0 - noise."""

    def forward(self, x, timesteps, context, **kwargs):
        return -super().forward(x, timesteps, context, **kwargs)


class OpenSoraModel(comfy.model_base.BaseModel):
    """BaseModel for STDiT / STDiT3 (text conditioning via c_crossattn, as every DiT in ComfyUI)."""


class _OpenSoraConfig(comfy.supported_models_base.BASE):
    unet_extra_config = {}
    memory_usage_factor = 1.0
    supported_inference_dtypes = [torch.float16, torch.bfloat16, torch.float32]
    vae_key_prefix = ["vae."]
    text_encoder_key_prefix = ["text_encoders."]
    model_type_enum = comfy.model_base.ModelType.EPS
    unet_class = STDiT

    def get_model(self, state_dict, prefix="", device=None):
        return OpenSoraModel(self, model_type=self.model_type_enum, device=device, unet_model=self.unet_class).eval()


class OpenSora10(_OpenSoraConfig):
    """OpenSORA 1.0 STDiT-XL/2: IDDPM, linear betas 1e-4..0.02 (ComfyUI's name: sqrt_linear), eps."""
    unet_config = {"image_model": "opensora_v1_0"}
    sampling_settings = dict(IDDPM_SAMPLING_SETTINGS)
    latent_format = OpenSora10Latent
    model_type_enum = comfy.model_base.ModelType.EPS
    unet_class = STDiT


class OpenSora12(_OpenSoraConfig):
    """OpenSORA 1.2 STDiT3-XL/2: rectified flow, timestep = 1000 * sigma, shift from OpenSoraFlowShift."""
    unet_config = {"image_model": "opensora_v1_2"}
    sampling_settings = {"shift": 1.0, "multiplier": 1000}
    latent_format = OpenSora12Latent
    model_type_enum = comfy.model_base.ModelType.FLOW
    unet_class = ComfySTDiT3


CONFIGS = {"1.0": OpenSora10, "1.2": OpenSora12}


def load_opensora_patcher(path: str, version: str = "auto", weight_dtype: str = "default",
                          keep_text_kv_fp: bool = False, space_scale: float = 0.0
                          ) -> Tuple[comfy.model_patcher.ModelPatcher, Dict]:
    """MODEL (ModelPatcher) from an official OpenSORA checkpoint; version auto-detected from the keys."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"unknown weight_dtype {weight_dtype!r}; expected one of {list(WEIGHT_DTYPES)}")
    sd = ckpt.read_state_dict(path)
    version = ckpt.resolve_version(sd, version, path)
    cfg = ckpt.config_from_state_dict(sd, version, path)
    if version == "1.0":
        if space_scale and space_scale > 0:
            cfg["space_scale"] = float(space_scale)
        elif "space_scale" not in cfg:
            cfg["space_scale"] = ckpt.default_space_scale(path)
    config = CONFIGS[version]({**CONFIGS[version].unet_config, **cfg})

    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    unet_dtype = set_inference_dtype(config, comfy.utils.calculate_parameters(sd), comfy.utils.weight_dtype(sd),
                                     WEIGHT_DTYPES[weight_dtype])
    model = config.get_model(sd, "")
    model = model.to(offload_device)
    ckpt.check_keys(model.diffusion_model, sd, version, path)
    model.load_model_weights(ckpt.state_dict_for_model(sd, model.diffusion_model), "")
    set_rule_options(model.diffusion_model, keep_text_kv_fp)
    info = {"version": version, "variant": ckpt.VARIANTS[version], "dtype": str(unet_dtype),
            "keep_text_kv_fp": bool(keep_text_kv_fp), **cfg}
    log.info("ViDiT-Q: loaded OpenSORA %s (%s, depth %d, hidden %d) from %s", version, info["variant"],
             cfg["depth"], cfg["hidden_size"], path)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
    patcher.model_options[INFO_KEY] = info  # what ViDiT-Q Save Quantized stores to build the model again
    return patcher, info


INFO_KEY = "vidit_q_opensora"
_INFO_ONLY = ("version", "variant", "dtype", "keep_text_kv_fp")  # info entries that are not constructor arguments


def quantized_opensora_model(info: Dict, shapes: Dict, weight_dtype, dtype=None):
    """An OpenSoraModel on the meta device (no weights allocated) from the loader's info as a quantized checkpoint
    stores it, with the ViDiT-Q rule options it was quantized under; the caller fills it (install_quantized)."""
    version = info.get("version")
    if version not in CONFIGS:
        raise ValueError(f"unknown OpenSORA version {version!r} in the checkpoint's model info")
    cfg = {k: v for k, v in info.items() if k not in _INFO_ONLY}
    if "patch_size" in cfg:
        cfg["patch_size"] = tuple(cfg["patch_size"])  # (JSON made it a list)
    config = CONFIGS[version]({**CONFIGS[version].unet_config, **cfg})
    set_inference_dtype(config, comfy.utils.calculate_parameters(shapes), weight_dtype, dtype)
    model = config.get_model({}, "", device=torch.device("meta"))
    set_rule_options(model.diffusion_model, bool(info.get("keep_text_kv_fp")))  # the quantizable set it was saved with
    return model


def opensora_version_of(patcher) -> str:
    """'1.0' / '1.2' for a MODEL from the OpenSORA loader, else a clear error."""
    model = getattr(patcher, "model", None)
    dm = getattr(model, "diffusion_model", None)
    version = getattr(dm, "version", None) if isinstance(dm, (STDiT, STDiT3)) else None
    if version is None:
        raise ValueError("this node needs an OpenSORA MODEL from the ViDiT-Q OpenSORA Loader; got "
                         f"{type(dm).__name__ if dm is not None else type(patcher).__name__}")
    return version


SPATIAL_PREFIX, TEMPORAL_PREFIX = "spatial_vae.module.", "temporal_vae."


class OpenSora12VAE:
    """The OpenSORA 1.2 video VAE as a ComfyUI VAE (decode / encode of 5-D latents, like ComfyUI's video VAEs).

    Spatial half: ComfyUI's own SD/SDXL VAE (comfy.sd.VAE, diffusers keys converted by ComfyUI); temporal half:
    models/opensora/vae12.TemporalVAE. Latents here are the raw temporal-VAE latents; the model-side
    normalisation (z - shift) / scale is the OpenSora12Latent format's, as ComfyUI splits it for every model."""

    latent_dim = 3
    latent_channels = 4
    downscale_ratio = 8
    upscale_ratio = 8
    output_channels = 3

    def __init__(self, spatial: "comfy.sd.VAE", temporal: vae12.TemporalVAE):
        self.spatial = spatial
        self.temporal = temporal.eval()
        self.device = comfy.model_management.vae_device()
        self.offload_device = comfy.model_management.vae_offload_device()
        self.dtype = comfy.model_management.vae_dtype(self.device, [torch.bfloat16, torch.float32])
        self.output_device = comfy.model_management.intermediate_device()
        self.temporal.to(self.offload_device, self.dtype)

    def spacial_compression_decode(self):
        return 8

    def spacial_compression_encode(self):
        return 8

    def temporal_compression_decode(self):
        return vae12.MICRO_FRAMES / vae12.MICRO_LATENT

    def _run_temporal(self, fn, x):
        self.temporal.to(self.device)
        try:
            with torch.inference_mode():
                return fn(x.to(self.device, self.dtype)).float()
        finally:
            self.temporal.to(self.offload_device)

    def decode(self, samples: torch.Tensor, vae_options={}) -> torch.Tensor:
        """[B, 4, T, H, W] -> IMAGE frames [B, F, 8H, 8W, 3] (F = 17 per 5 latent frames, 4 r - 3 for the rest)."""
        if samples.ndim != 5:
            raise ValueError(f"the OpenSORA 1.2 VAE decodes 5-D video latents, got shape {tuple(samples.shape)}")
        b = samples.shape[0]
        x_z = self._run_temporal(lambda z: vae12.decode_latents(self.temporal, z), samples)
        images = self.spatial.decode(frames_in_batch(x_z) / vae12.SPATIAL_SCALE)
        return images.reshape(b, -1, *images.shape[-3:]).to(self.output_device)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """IMAGE frames [F, H, W, C] (one video) -> [1, 4, T, H/8, W/8] (posterior means, 17-frame chunks)."""
        x_z = self.spatial.encode(pixels[..., :3]) * vae12.SPATIAL_SCALE  # [F, 4, h, w]
        x_z = x_z.movedim(0, 1).unsqueeze(0)
        chunks = [x_z[:, :, i:i + vae12.MICRO_FRAMES] for i in range(0, x_z.shape[2], vae12.MICRO_FRAMES)]
        return torch.cat([self._run_temporal(self.temporal.encode, c) for c in chunks], dim=2).to(self.output_device)


def load_opensora_vae(path: str) -> OpenSora12VAE:
    """ComfyUI VAE from the official OpenSORA 1.2 VAE checkpoint (hpcai-tech/OpenSora-VAE-v1.2 model.safetensors)."""
    sd = ckpt.read_state_dict(path)
    name = os.path.basename(path)
    temporal_sd = {k[len(TEMPORAL_PREFIX):]: v for k, v in sd.items() if k.startswith(TEMPORAL_PREFIX)}
    spatial_sd = {k[len(SPATIAL_PREFIX):]: v for k, v in sd.items() if k.startswith(SPATIAL_PREFIX)}
    if not temporal_sd or not spatial_sd:
        what = "a PixArt/OpenSORA DiT" if "t_block.1.weight" in sd else "not the OpenSORA 1.2 VAE"
        raise ckpt.OpenSoraCheckpointError(
            f"{name} is {what}: expected the OpenSORA 1.2 VAE (keys spatial_vae.module.* for the SDXL VAE and "
            f"temporal_vae.* for VAE_Temporal_SD; found {len(spatial_sd)} and {len(temporal_sd)})")
    try:
        cfg = vae12.temporal_config_from_state_dict(temporal_sd)
        temporal = vae12.TemporalVAE(**cfg)
        temporal.load_state_dict({k: v.float() for k, v in temporal_sd.items()}, strict=True)
    except (KeyError, RuntimeError) as e:
        raise ckpt.OpenSoraCheckpointError(f"{name}: the temporal VAE weights do not match VAE_Temporal_SD "
                                           f"({str(e).splitlines()[0]})") from None
    spatial = comfy.sd.VAE(sd=spatial_sd)
    if getattr(spatial, "latent_dim", 2) != 2 or spatial.latent_channels != 4:
        raise ckpt.OpenSoraCheckpointError(f"{name}: spatial_vae.module.* is not a 4-channel image VAE (SDXL VAE)")
    for key, default in (("scale", vae12.SCALE), ("shift", vae12.SHIFT)):
        if key in sd and not torch.allclose(sd[key].float().flatten(), torch.tensor(default)):
            log.warning("ViDiT-Q: %s stores latent %s %s, but the OpenSORA 1.2 latent format uses the official %s",
                        name, key, sd[key].flatten().tolist(), default)
    log.info("ViDiT-Q: loaded the OpenSORA 1.2 VAE from %s (temporal filters %d)", path, cfg["filters"])
    return OpenSora12VAE(spatial, temporal)
