"""OpenSORA nodes: loader, empty video latent, per-frame decode, null caption, flow shift, video saving.

Checkpoints live in ComfyUI's `models/opensora` folder (registered here through folder_paths; extra paths can
be added in extra_model_paths.yaml under `opensora`).
"""
import logging
import os
from typing import Optional, Tuple

import numpy as np
import torch

import comfy.model_management
import comfy.model_sampling
import folder_paths
from comfy_api.latest import io, ui

from ..models.opensora.checkpoint import VERSIONS
from ..models.opensora.scheduler import latent_frames, official_flow_shift
from ..quant_core.temporal import frames_in_batch
from .comfy_glue import diffusion_model
from .opensora_comfy import WEIGHT_DTYPES, load_opensora_patcher, load_opensora_vae, opensora_version_of

log = logging.getLogger("vidit_q")

FOLDER = "opensora"
EXTENSIONS = {".safetensors", ".sft", ".pth", ".pt", ".ckpt"}
VIDEO_FORMATS = ("mp4", "webp", "gif")


def register_folder() -> None:
    """models/opensora as a ComfyUI model folder (idempotent)."""
    path = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER in folder_paths.folder_names_and_paths:
        paths, exts = folder_paths.folder_names_and_paths[FOLDER]
        if path not in paths:
            paths.append(path)
        if isinstance(exts, set):
            exts.update(EXTENSIONS)
    else:
        folder_paths.folder_names_and_paths[FOLDER] = ([path], set(EXTENSIONS))


register_folder()


class ViDiTQOpenSoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ViDiTQOpenSoraLoader",
            display_name="ViDiT-Q OpenSORA Loader",
            category="ViDiT-Q/OpenSORA",
            description="Loads an official OpenSORA checkpoint (1.0 STDiT-XL/2 or 1.2 STDiT3-XL/2; .safetensors, or "
                        ".pth read with weights_only) from models/opensora as a MODEL for the stock samplers.",
            inputs=[
                io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list(FOLDER)),
                io.Combo.Input("version", options=["auto", *VERSIONS], default="auto",
                               tooltip="auto: detected from the checkpoint's keys."),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default"),
                io.Combo.Input("text_kv", options=["quantize", "keep_fp"], default="quantize", optional=True,
                               tooltip="ViDiT-Q rule option: keep the cross-attention text K/V projection in FP "
                                       "(it reads T5's outlier channels; the official OpenSORA configs quantize "
                                       "it)."),
                io.Float.Input("space_scale", default=0.0, min=0.0, max=8.0, step=0.05, optional=True,
                               tooltip="OpenSORA 1.0 positional scale; 0 = auto (from the checkpoint's table, "
                                       "else 0.5 for *256x256* files, 1.0 otherwise)."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, ckpt_name, version="auto", weight_dtype="default", text_kv="quantize",
                space_scale=0.0) -> io.NodeOutput:
        path = folder_paths.get_full_path(FOLDER, ckpt_name)
        if path is None:
            raise FileNotFoundError(f"OpenSORA checkpoint {ckpt_name!r} not found in the models/{FOLDER} folders "
                                    f"({', '.join(folder_paths.get_folder_paths(FOLDER))})")
        patcher, _ = load_opensora_patcher(path, version, weight_dtype, text_kv == "keep_fp", space_scale)
        return io.NodeOutput(patcher)


class ViDiTQOpenSoraVAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ViDiTQOpenSoraVAELoader",
            display_name="ViDiT-Q OpenSORA 1.2 VAE Loader",
            category="ViDiT-Q/OpenSORA",
            description="Loads the OpenSORA 1.2 video VAE (hpcai-tech/OpenSora-VAE-v1.2 model.safetensors, from "
                        "models/opensora): SDXL VAE per frame + causal temporal VAE (17 frames <-> 5 latent frames).",
            inputs=[io.Combo.Input("vae_name", options=folder_paths.get_filename_list(FOLDER))],
            outputs=[io.Vae.Output()],
        )

    @classmethod
    def execute(cls, vae_name) -> io.NodeOutput:
        path = folder_paths.get_full_path(FOLDER, vae_name)
        if path is None:
            raise FileNotFoundError(f"OpenSORA VAE {vae_name!r} not found in the models/{FOLDER} folders")
        return io.NodeOutput(load_opensora_vae(path))


class EmptyOpenSoraLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EmptyOpenSoraLatent",
            display_name="Empty OpenSORA Latent",
            category="ViDiT-Q/OpenSORA",
            description="An empty 5-D video latent [batch, 4, latent frames, height/8, width/8]. 1.0: one latent per "
                        "frame (SD VAE); 1.2: the video VAE's 17 frames -> 5 latent frames.",
            inputs=[
                io.Int.Input("width", default=512, min=16, max=4096, step=16),
                io.Int.Input("height", default=512, min=16, max=4096, step=16),
                io.Int.Input("frames", default=16, min=1, max=1024),
                io.Int.Input("batch_size", default=1, min=1, max=64),
                io.Combo.Input("version", options=list(VERSIONS), default="1.0"),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, width, height, frames, batch_size, version="1.0") -> io.NodeOutput:
        t = latent_frames(frames, version)
        samples = torch.zeros(batch_size, 4, t, height // 8, width // 8,
                              device=comfy.model_management.intermediate_device())
        return io.NodeOutput({"samples": samples})


def decode_video(vae, samples: torch.Tensor) -> torch.Tensor:
    """IMAGE frames [B * T, H, W, 3] of a video latent: a per-image VAE (SD) decodes each frame; a video VAE
    decodes the 5-D latent."""
    if samples.ndim == 5 and getattr(vae, "latent_dim", 2) != 3:
        samples = frames_in_batch(samples)
    images = vae.decode(samples)
    return images.reshape(-1, *images.shape[-3:])


class OpenSoraVAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OpenSoraVAEDecode",
            display_name="OpenSORA VAE Decode (frames)",
            category="ViDiT-Q/OpenSORA",
            description="Decodes a 5-D video latent into an IMAGE batch of frames (videos one after another). With "
                        "the stock SD VAE (OpenSORA 1.0) each frame is decoded on its own.",
            inputs=[io.Latent.Input("samples"), io.Vae.Input("vae")],
            outputs=[io.Image.Output(display_name="frames")],
        )

    @classmethod
    def execute(cls, samples, vae) -> io.NodeOutput:
        return io.NodeOutput(decode_video(vae, samples["samples"]))


class OpenSoraNullConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OpenSoraNullConditioning",
            display_name="OpenSORA Null Caption (negative)",
            category="ViDiT-Q/OpenSORA",
            description="The checkpoint's learned null caption (y_embedding), which the official sampler uses as "
                        "the unconditional branch of CFG. Connect it to `negative`.",
            inputs=[io.Model.Input("model")],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        opensora_version_of(model)
        y = diffusion_model(model).y_embedder.y_embedding.detach().float().cpu().clone()
        return io.NodeOutput([[y[None], {}]])


class OpenSoraFlowShift(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OpenSoraFlowShift",
            display_name="OpenSORA 1.2 Flow Shift",
            category="ViDiT-Q/OpenSORA",
            description="Sets OpenSORA 1.2's rectified-flow timestep transform for this latent's size: shift = "
                        "sqrt(H*W / 512^2) * sqrt(latent frames) (pixels = latent x 8), as the official sampler.",
            inputs=[io.Model.Input("model"), io.Latent.Input("latent"),
                    io.Float.Input("shift", default=0.0, min=0.0, max=100.0, step=0.01, optional=True,
                                   tooltip="0 = the official value for the latent; otherwise this shift.")],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, latent, shift=0.0) -> io.NodeOutput:
        if opensora_version_of(model) != "1.2":
            raise ValueError("OpenSORA Flow Shift applies to OpenSORA 1.2 (rectified flow); OpenSORA 1.0 uses IDDPM")
        x = latent["samples"]
        if x.ndim != 5:
            raise ValueError(f"expected a 5-D video latent [B, C, T, H, W], got shape {tuple(x.shape)}")
        value = shift if shift > 0 else official_flow_shift(x.shape[-2] * 8, x.shape[-1] * 8, x.shape[2])

        class ModelSampling(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
            pass

        sampling = ModelSampling(model.model.model_config)
        sampling.set_parameters(shift=value, multiplier=1000)
        patched = model.clone()
        patched.add_object_patch("model_sampling", sampling)
        log.info("ViDiT-Q: OpenSORA 1.2 flow shift %.3f", value)
        return io.NodeOutput(patched)


def to_uint8_frames(images: torch.Tensor) -> np.ndarray:
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected IMAGE frames [N, H, W, C], got shape {tuple(images.shape)}")
    x = images[..., :3] if images.shape[-1] != 1 else images.expand(*images.shape[:-1], 3)
    return (x.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def write_video(frames: np.ndarray, path_no_ext: str, fmt: str, fps: float) -> Tuple[str, Optional[str]]:
    """Write uint8 frames [N, H, W, 3]; returns (path written, note). mp4 uses imageio's ffmpeg plugin
    (imageio-ffmpeg) or, without it, its PyAV plugin (PyAV ships with ComfyUI); when neither is installed it
    falls back to animated webp and says so in the note."""
    import imageio.v3 as iio

    if fmt not in VIDEO_FORMATS:
        raise ValueError(f"unknown video format {fmt!r}; expected one of {VIDEO_FORMATS}")
    note = None
    if fmt == "mp4":
        h, w = frames.shape[1:3]
        if h % 2 or w % 2:  # yuv420p needs even sizes
            frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        path = path_no_ext + ".mp4"
        if _has_module("imageio_ffmpeg"):
            import imageio.v2 as iio2

            iio2.mimwrite(path, list(frames), fps=fps, codec="libx264", quality=8, macro_block_size=1)
            return path, None
        if _has_module("av"):
            iio.imwrite(path, frames, plugin="pyav", codec="libx264", fps=fps)
            return path, None
        note = ("mp4 needs imageio-ffmpeg (pip install imageio-ffmpeg) or PyAV; neither is installed, so the video "
                "was saved as animated webp instead")
        log.warning("ViDiT-Q: %s", note)
        fmt = "webp"
    path = f"{path_no_ext}.{fmt}"
    duration = 1000.0 / max(fps, 1e-3)
    kwargs = {"lossless": True} if fmt == "webp" else {}
    iio.imwrite(path, list(frames), duration=duration, loop=0, **kwargs)
    return path, note


class ViDiTQSaveVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ViDiTQSaveVideo",
            display_name="ViDiT-Q Save Video",
            category="ViDiT-Q/OpenSORA",
            description="Saves IMAGE frames as one video (mp4 / webp / gif) in the output folder.",
            inputs=[
                io.Image.Input("images"),
                io.String.Input("filename_prefix", default="vidit_q/video"),
                io.Float.Input("fps", default=8.0, min=0.1, max=240.0, step=0.1),
                io.Combo.Input("format", options=list(VIDEO_FORMATS), default="mp4",
                               tooltip="mp4 needs imageio-ffmpeg or PyAV; otherwise webp is written instead."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images, filename_prefix, fps, format="mp4") -> io.NodeOutput:
        frames = to_uint8_frames(images)
        folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory(), frames.shape[2], frames.shape[1])
        path, note = write_video(frames, os.path.join(folder, f"{filename}_{counter:05}_"), format, fps)
        if note:
            log.warning("ViDiT-Q Save Video: %s", note)
        return io.NodeOutput(ui=ui.PreviewVideo([ui.SavedResult(os.path.basename(path), subfolder,
                                                                 io.FolderType.output)]))
