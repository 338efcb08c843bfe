"""ViDiTQSaveQuantized / ViDiTQLoadQuantized: quantized checkpoints in ComfyUI's models/vidit_q folder.

Save writes what the quantized MODEL runs (QuantLinear tensors + the non-quantized layers) to one .safetensors.
Load builds the PixArt (or OpenSORA) model on the meta device (no weights allocated), installs the stored
QuantLinear modules and assigns the non-quantized tensors: the FP16 weights of the quantized layers never exist.
OpenSORA has no ComfyUI detection, so its file records the OpenSORA loader's info (version, sizes, the text-kv
rule option) and the model is built from that. The result is a plain ModelPatcher that works in every sampler;
its quantized layers are also listed as object patches (as ViDiTQQuantize's clones are), so our nodes recognise
it as quantized.
"""
import json
import logging
import os
import pathlib
from typing import Dict, Optional

import torch

import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from ..kernels import BACKENDS
from ..quant_core import QuantLinear
from ..quant_core.checkpoint import (CheckpointError, TimestepSwitchLinear, install_quantized, read_quantized,
                                     save_quantized)
from ..quant_core.fusions import fusion_patches
from .comfy_glue import PREFIX, quant_summary, set_inference_dtype
from .opensora_comfy import INFO_KEY, quantized_opensora_model

log = logging.getLogger("vidit_q")

FOLDER = "vidit_q"  # models/vidit_q (extra_model_paths.yaml may add more folders under this name)
EXTENSIONS = {".safetensors"}
FP_DTYPES = {"keep": None, "fp16": torch.float16, "bf16": torch.bfloat16}
LOAD_DTYPES = {"default": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def register_folder() -> None:
    """Make models/vidit_q a ComfyUI model folder (idempotent; keeps folders added by extra_model_paths.yaml)."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER in folder_paths.folder_names_and_paths:
        paths, exts = folder_paths.folder_names_and_paths[FOLDER]
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[FOLDER] = (paths, set(exts) | EXTENSIONS)
    else:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], set(EXTENSIONS))


register_folder()


QUANT_TYPES = tuple(t for t in (QuantLinear, TimestepSwitchLinear) if t is not None)


def quantized_layers(model) -> Dict[str, torch.nn.Module]:
    """name inside the diffusion model -> QuantLinear (or TimestepSwitchLinear), for a MODEL quantized (or
    loaded) by ViDiT-Q."""
    return {k[len(PREFIX):]: v for k, v in model.object_patches.items()
            if k.startswith(PREFIX) and isinstance(v, QUANT_TYPES)}


def save_model(model, path: pathlib.Path, fp_dtype: Optional[torch.dtype] = None,
               extra_metadata: Optional[Dict[str, str]] = None) -> pathlib.Path:
    """Save a ViDiT-Q quantized MODEL (ModelPatcher) to `path`; refuses anything else."""
    layers = quantized_layers(model)
    summary = quant_summary(model)
    if not layers or not summary:
        raise ValueError("ViDiT-Q Save Quantized needs a MODEL quantized by ViDiT-Q Quantize (or loaded by ViDiT-Q "
                         "Load Quantized); this MODEL has no ViDiT-Q quantized layers. An FP16 model is saved with "
                         "ComfyUI's ModelSave.")
    family = (summary.get("fingerprint") or {}).get("family")
    if family not in ("pixart", "opensora"):
        raise ValueError(f"ViDiT-Q Save Quantized: quantized {family} checkpoints are not supported (PixArt and "
                         "OpenSORA ones are); quantize this model in the graph instead")
    opensora_info = model.model_options.get(INFO_KEY)
    if family == "opensora" and not opensora_info:
        raise ValueError("ViDiT-Q Save Quantized: this OpenSORA MODEL carries no loader info (its version and "
                         "config); load the model with ViDiT-Q OpenSORA Loader, then quantize and save it")
    lost = [k for k in model.patches if k.startswith(PREFIX) and k[len(PREFIX):].rpartition(".")[0] in layers]
    if lost:
        log.warning("ViDiT-Q: %d weight patches (LoRA etc.) target quantized layers and do not run on this MODEL; "
                    "they are not saved either (apply them before ViDiT-Q Quantize)", len(lost))
    # Make the shared model tree hold exactly what this MODEL runs (its own weight patches applied, nobody else's),
    # as ComfyUI's own checkpoint savers do.
    comfy.model_management.load_models_gpu([model], force_patch_weights=True)
    base = model.model
    info = {"comfy_model_config": type(base.model_config).__name__,
            "comfy_model_type": getattr(base.model_type, "name", str(base.model_type)),
            "comfy_unet_dtype": str(base.get_dtype()).replace("torch.", ""),
            "comfy_manual_cast_dtype": None if base.manual_cast_dtype is None
            else str(base.manual_cast_dtype).replace("torch.", "")}
    if family == "opensora":
        info["opensora"] = dict(opensora_info)
    return save_quantized(path, base.diffusion_model, layers, summary, fp_dtype=fp_dtype, model_info=info,
                          extra_metadata=extra_metadata)


def load_model(path, backend: str = "auto", dtype: Optional[torch.dtype] = None):
    """A ModelPatcher for a quantized checkpoint (PixArt or OpenSORA), built without the quantized layers' FP16
    weights."""
    ckpt = read_quantized(path, device="cpu", backend=backend)
    if ckpt.family == "pixart":
        model = _pixart_model(ckpt, path, dtype)
    elif ckpt.family == "opensora":
        model = _opensora_model(ckpt, path, dtype)
    else:
        raise CheckpointError(path, f"holds a {ckpt.family} model; ViDiT-Q Load Quantized builds pixart and opensora")
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    model.device = offload_device
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
    for name, layer in ckpt.layers.items():  # the same modules the tree holds: marks the MODEL as quantized
        patcher.add_object_patch(PREFIX + name, layer)
    for name, obj in fusion_patches(model.diffusion_model, ckpt.layers).items():  # quant_core/fusions.py
        patcher.add_object_patch(PREFIX + name, obj)
    patcher.model_options["vidit_q"] = ckpt.summary()
    if ckpt.family == "opensora":  # (checked by _opensora_model)
        patcher.model_options[INFO_KEY] = dict(ckpt.header["model"]["opensora"])
    if ckpt.clock is not None:  # a per-timestep-range plan: its layers need the timestep of every call
        from .comfy_glue import install_range_clock

        install_range_clock(patcher, ckpt.clock)
    log.info("ViDiT-Q: loaded %s (%s %s, %d quantized layers, %.1f MB of DiT weights)", pathlib.Path(path).name,
             ckpt.family, ckpt.header.get("preset"), len(ckpt.layers), patcher.model_size() / 1e6)
    return patcher


def _pixart_model(ckpt, path, dtype):
    """The PixArt BaseModel ComfyUI detects from the stored shapes, on the meta device, filled from the file."""
    shapes = ckpt.shape_dict()
    model_config = comfy.model_detection.model_config_from_unet(shapes, "")
    if model_config is None:
        raise CheckpointError(path, "ComfyUI does not recognise the model in this file (PixArt keys are missing)")
    expected = ckpt.header["model"].get("comfy_model_config")
    if expected and type(model_config).__name__ != expected:
        raise CheckpointError(path, f"ComfyUI detects a {type(model_config).__name__} in this file, but it was "
                                    f"saved from a {expected}")
    set_inference_dtype(model_config, comfy.utils.calculate_parameters(shapes), ckpt.weight_dtype, dtype)
    model = model_config.get_model(shapes, "", device=torch.device("meta"))  # allocates no weights
    install_quantized(model.diffusion_model, ckpt, convert=model_config.process_unet_state_dict)
    return model


def _opensora_model(ckpt, path, dtype):
    """The OpenSORA model built from the loader info the file records, on the meta device, filled from the file."""
    info = ckpt.header["model"].get("opensora")
    if not info:
        raise CheckpointError(path, "holds an OpenSORA model without its config (version, sizes); save it again "
                                    "with this version of ViDiT-Q Save Quantized")
    try:
        model = quantized_opensora_model(info, ckpt.shape_dict(), ckpt.weight_dtype, dtype)
    except ValueError as e:
        raise CheckpointError(path, str(e)) from None
    install_quantized(model.diffusion_model, ckpt)
    return model


def _output_path(filename_prefix: str, overwrite: bool) -> pathlib.Path:
    out_dir = folder_paths.get_folder_paths(FOLDER)[0]
    if overwrite:
        target = os.path.abspath(os.path.join(out_dir, os.path.normpath(filename_prefix) + ".safetensors"))
        if os.path.commonpath((os.path.abspath(out_dir), target)) != os.path.abspath(out_dir):
            raise ValueError(f"filename_prefix {filename_prefix!r} points outside the {FOLDER} models folder")
        return pathlib.Path(target)
    folder, filename, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, os.path.abspath(out_dir))
    return pathlib.Path(folder) / f"{filename}_{counter:05}_.safetensors"


class ViDiTQSaveQuantized(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ViDiTQSaveQuantized",
            display_name="ViDiT-Q Save Quantized",
            category="ViDiT-Q",
            description="Saves a quantized PixArt or OpenSORA MODEL (from ViDiT-Q Quantize) to models/vidit_q as one "
                        ".safetensors: integer weights, scales, smoothing/rotation vectors and the non-quantized "
                        "layers. Load it with ViDiT-Q Load Quantized: no calibration and no FP16 weights needed.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL output of ViDiT-Q Quantize."),
                io.String.Input("filename_prefix", default="pixart_w8a8",
                                tooltip="Inside models/vidit_q; subfolders allowed."),
                io.Boolean.Input("overwrite", default=False, optional=True,
                                 tooltip="Off: number the files like ComfyUI's savers (name_00001_). On: write "
                                         "exactly <prefix>.safetensors, replacing it only once the new file is "
                                         "complete."),
                io.Combo.Input("fp_dtype", options=list(FP_DTYPES), default="keep", optional=True,
                               tooltip="dtype of the non-quantized layers in the file (keep: as the model has them, "
                                       "bit-identical reload)."),
            ],
            outputs=[io.String.Output(display_name="quant_name")],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, filename_prefix, overwrite=False, fp_dtype="keep") -> io.NodeOutput:
        from comfy.cli_args import args

        extra = {}
        hidden = getattr(cls, "hidden", None)
        if hidden is not None and not args.disable_metadata:
            if hidden.prompt is not None:
                extra["prompt"] = json.dumps(hidden.prompt)
            for key, value in (hidden.extra_pnginfo or {}).items():
                extra[key] = json.dumps(value)
        path = save_model(model, _output_path(filename_prefix, overwrite), FP_DTYPES[fp_dtype], extra)
        name = os.path.relpath(path, folder_paths.get_folder_paths(FOLDER)[0]).replace(os.sep, "/")
        text = f"saved {name} ({path.stat().st_size / 1e6:.1f} MB) in {path.parent}"
        return io.NodeOutput(name, ui=ui.PreviewText(text))


class ViDiTQLoadQuantized(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ViDiTQLoadQuantized",
            display_name="ViDiT-Q Load Quantized",
            category="ViDiT-Q",
            description="Loads a quantized checkpoint from models/vidit_q as a MODEL for any sampler. Only the "
                        "quantized weights and the non-quantized layers are read; no calibration is needed.",
            inputs=[
                io.Combo.Input("quant_name", options=folder_paths.get_filename_list(FOLDER)),
                io.Combo.Input("backend", options=list(BACKENDS), default="auto", optional=True,
                               tooltip="auto: Triton kernels on CUDA GPUs, torch reference elsewhere."),
                io.Combo.Input("weight_dtype", options=list(LOAD_DTYPES), default="default", optional=True,
                               tooltip="dtype of the non-quantized layers and of the computation (default: as "
                                       "ComfyUI picks for the stored dtype on this device)."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def fingerprint_inputs(cls, quant_name, backend="auto", weight_dtype="default"):
        """Reload when the file changes (a save with overwrite=true replaces it under the same name)."""
        path = folder_paths.get_full_path(FOLDER, quant_name)
        if path is None:
            return quant_name
        st = os.stat(path)
        return f"{quant_name}:{st.st_mtime_ns}:{st.st_size}:{backend}:{weight_dtype}"

    @classmethod
    def execute(cls, quant_name, backend="auto", weight_dtype="default") -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(FOLDER, quant_name)
        return io.NodeOutput(load_model(path, backend, LOAD_DTYPES[weight_dtype]))
