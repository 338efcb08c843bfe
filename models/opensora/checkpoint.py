"""Reading official OpenSORA checkpoints: file -> state dict -> version -> architecture -> model.

Accepted files: `.safetensors`, and `.pth` / `.pt` / `.ckpt` through `torch.load(weights_only=True)` only (no
pickled code runs). Training wrappers (`ema`, `model`, `state_dict`, `module` and a `module.` key prefix) are
unwrapped. Every failure names the file and what was expected. Nothing here imports ComfyUI.
"""
import logging
import math
import os
import re
from typing import Dict, Optional, Tuple

import torch

from .stdit import STDiT
from .stdit3 import STDiT3

log = logging.getLogger("vidit_q")

VERSIONS = ("1.0", "1.2")
VARIANTS = {"1.0": "opensora_v1_0", "1.2": "opensora_v1_2"}
# keys the official loaders ignore (computed tables) or that we recompute when absent
IGNORED_KEYS = ("pos_embed", "pos_embed_temporal")
OPTIONAL_KEYS = ("rope.freqs",)
SAFETENSORS_EXT = (".safetensors", ".sft")
TORCH_EXT = (".pth", ".pt", ".ckpt", ".bin")
HEAD_DIM = 72  # STDiT-XL/2 (1152 / 16) and STDiT3-3B/2 (1872 / 26)


class OpenSoraCheckpointError(ValueError):
    pass


def _name(path) -> str:
    return os.path.basename(str(path)) or str(path)


def read_state_dict(path) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped; clear errors for missing, truncated or foreign files."""
    path = str(path)
    if not os.path.isfile(path):
        raise OpenSoraCheckpointError(f"OpenSORA checkpoint {path!r} does not exist")
    low = path.lower()
    if low.endswith(SAFETENSORS_EXT):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for truncated / corrupt headers
            raise OpenSoraCheckpointError(
                f"cannot read {_name(path)} as safetensors ({type(e).__name__}: {e}); the file is truncated or "
                "not a safetensors file: download it again (expected an OpenSORA STDiT/STDiT3 checkpoint)") from None
    elif low.endswith(TORCH_EXT):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise OpenSoraCheckpointError(
                f"cannot read {_name(path)} with torch.load(weights_only=True) ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); the file is truncated, corrupt or contains pickled "
                "objects other than tensors (expected an OpenSORA STDiT/STDiT3 state dict)") from None
        sd = _unwrap(obj, path)
    else:
        raise OpenSoraCheckpointError(
            f"{_name(path)}: unsupported file type; expected .safetensors or .pth/.pt (an OpenSORA checkpoint)")
    if not sd:
        raise OpenSoraCheckpointError(f"{_name(path)} holds no tensors (expected an OpenSORA STDiT/STDiT3 checkpoint)")
    return sd


def _unwrap(obj, path) -> Dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            for key in ("ema", "model", "state_dict", "module"):
                if isinstance(obj.get(key), dict):
                    obj = obj[key]
                    break
            else:
                break
    if not isinstance(obj, dict):
        raise OpenSoraCheckpointError(f"{_name(path)} does not hold a state dict (got {type(obj).__name__})")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def detect_version(sd: Dict[str, torch.Tensor], path="checkpoint") -> str:
    """'1.0' (STDiT) or '1.2' (STDiT3) from the key layout; a clear error for anything else."""
    keys = set(sd)
    name = _name(path)
    if "spatial_blocks.0.attn.qkv.weight" in keys and "temporal_blocks.0.attn.qkv.weight" in keys:
        return "1.2"
    if "blocks.0.attn_temp.qkv.weight" in keys:
        if any(k.startswith(("fl_embedder.", "t_block_temp.", "csize_embedder.")) for k in keys):
            raise OpenSoraCheckpointError(
                f"{name} is an OpenSORA 1.1 (STDiT2) checkpoint, which is not supported; expected OpenSORA 1.0 "
                "(STDiT-XL/2, keys blocks.N.attn_temp.*) or 1.2 (STDiT3-XL/2, keys spatial_blocks.N / "
                "temporal_blocks.N)")
        return "1.0"
    if any(k.startswith("temporal_vae.") for k in keys):
        raise OpenSoraCheckpointError(
            f"{name} is the OpenSORA 1.2 video VAE, not a diffusion model: load it with the ViDiT-Q OpenSORA VAE "
            "Loader; this loader expects STDiT (1.0) or STDiT3 (1.2) weights")
    if "blocks.0.attn.qkv.weight" in keys and "blocks.0.cross_attn.q_linear.weight" in keys:
        raise OpenSoraCheckpointError(
            f"{name} looks like a PixArt (image DiT) checkpoint: it has blocks.N.attn / cross_attn but no temporal "
            "attention (blocks.N.attn_temp or temporal_blocks.N). Load PixArt with ComfyUI's UNETLoader; the "
            "OpenSORA loader expects STDiT (1.0) or STDiT3 (1.2) weights")
    sample = ", ".join(sorted(keys)[:4])
    raise OpenSoraCheckpointError(
        f"{name}: unknown key layout (e.g. {sample}); expected an OpenSORA 1.0 STDiT checkpoint "
        "(blocks.N.attn_temp.qkv.weight) or an OpenSORA 1.2 STDiT3 checkpoint (spatial_blocks.N / temporal_blocks.N)")


def _heads(hidden: int, head_dim: Optional[int] = None) -> int:
    if head_dim:
        return hidden // head_dim
    if hidden % HEAD_DIM == 0:
        return hidden // HEAD_DIM
    return max(1, hidden // 64)


def _space_scale_from_pos_embed(pos: torch.Tensor) -> Optional[float]:
    """The official 1.0 checkpoints may carry the fixed `pos_embed` table of their training size; token 1 sits
    at column 1 / space_scale, and the slowest sine of the column half reads that coordinate back."""
    pos = pos.reshape(-1, pos.shape[-1]).double()
    dim = pos.shape[-1]
    if pos.shape[0] < 2 or dim < 8:
        return None
    quarter = dim // 4
    omega = 1.0 / 10000 ** ((quarter - 1) / quarter)
    val = float(pos[1, quarter - 1])
    if not -1.0 < val < 1.0:
        return None
    coord = math.asin(val) / omega
    if coord <= 1e-6:
        return None
    return round(1.0 / coord, 3)


def config_from_state_dict(sd: Dict[str, torch.Tensor], version: str, path="checkpoint") -> Dict:
    """Constructor arguments of STDiT / STDiT3 read from an official state dict."""
    name = _name(path)
    try:
        hidden = sd["t_block.1.weight"].shape[1]
        pw = sd["x_embedder.proj.weight"]
        if pw.ndim != 5:
            raise OpenSoraCheckpointError(f"{name}: x_embedder.proj.weight has shape {tuple(pw.shape)}; expected a "
                                          "Conv3d weight [hidden, C, pt, ph, pw] (OpenSORA STDiT/STDiT3)")
        cfg = dict(hidden_size=hidden, in_channels=pw.shape[1], patch_size=tuple(pw.shape[2:]),
                   caption_channels=sd["y_embedder.y_proj.fc1.weight"].shape[1],
                   mlp_ratio=sd[("blocks" if version == "1.0" else "spatial_blocks") + ".0.mlp.fc1.weight"].shape[0]
                   / hidden,
                   pred_sigma=sd["final_layer.linear.weight"].shape[0] == 2 * pw.shape[1] * int(
                       pw.shape[2] * pw.shape[3] * pw.shape[4]))
        if "y_embedder.y_embedding" in sd:
            cfg["model_max_length"] = sd["y_embedder.y_embedding"].shape[0]
    except KeyError as e:
        raise OpenSoraCheckpointError(f"{name}: key {e.args[0]!r} is missing; expected a complete OpenSORA "
                                      f"{version} checkpoint") from None
    if version == "1.0":
        cfg["depth"] = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        cfg["num_heads"] = _heads(hidden)
        if "pos_embed" in sd:
            scale = _space_scale_from_pos_embed(sd["pos_embed"])
            if scale:
                cfg["space_scale"] = scale
    elif version == "1.2":
        cfg["depth"] = len({k.split(".")[1] for k in sd if k.startswith("spatial_blocks.")})
        qn = sd.get("spatial_blocks.0.attn.q_norm.weight")
        cfg["qk_norm"] = qn is not None
        cfg["num_heads"] = _heads(hidden, qn.shape[0] if qn is not None else (
            2 * sd["rope.freqs"].shape[0] if "rope.freqs" in sd else None))
    else:
        raise OpenSoraCheckpointError(f"unknown OpenSORA version {version!r}; expected one of {VERSIONS}")
    return cfg


def model_class(version: str):
    return {"1.0": STDiT, "1.2": STDiT3}[version]


def check_keys(model: torch.nn.Module, sd: Dict[str, torch.Tensor], version: str, path="checkpoint") -> None:
    """Raise when the checkpoint lacks weights the model needs, or has weights of the wrong shape."""
    name = _name(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd and k not in OPTIONAL_KEYS]
    if missing:
        raise OpenSoraCheckpointError(
            f"{name} is missing {len(missing)} weights of an OpenSORA {version} "
            f"{'STDiT' if version == '1.0' else 'STDiT3'} model (e.g. {', '.join(missing[:3])}); is it the "
            "right version (loader 'version' input) and a complete file?")
    wrong = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in expected.items() if k in sd and
             sd[k].shape != v.shape]
    if wrong:
        k, got, want = wrong[0]
        raise OpenSoraCheckpointError(f"{name}: {k} has shape {got}, expected {want} for OpenSORA {version}")
    extra = [k for k in sd if k not in expected and k not in IGNORED_KEYS]
    if extra:
        log.warning("ViDiT-Q: %s has %d keys the OpenSORA %s model does not use (e.g. %s)", name, len(extra),
                    version, ", ".join(extra[:3]))


def state_dict_for_model(sd: Dict[str, torch.Tensor], model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The checkpoint's tensors the model has (drops ignored tables)."""
    expected = model.state_dict()
    return {k: v for k, v in sd.items() if k in expected}


def resolve_version(sd, version: str = "auto", path="checkpoint") -> str:
    detected = detect_version(sd, path)
    if version in (None, "", "auto"):
        return detected
    if version not in VERSIONS:
        raise OpenSoraCheckpointError(f"unknown OpenSORA version {version!r}; expected auto or one of {VERSIONS}")
    if version != detected:
        raise OpenSoraCheckpointError(
            f"{_name(path)} is an OpenSORA {detected} checkpoint by its keys, but version {version} was requested; "
            f"set the loader's version to auto or {detected}")
    return version


def build_model(sd: Dict[str, torch.Tensor], version: str = "auto", path="checkpoint", dtype=torch.float32,
                overrides: Optional[Dict] = None) -> Tuple[torch.nn.Module, Dict]:
    """A plain-torch STDiT / STDiT3 with the checkpoint's weights (no ComfyUI), and its config."""
    version = resolve_version(sd, version, path)
    cfg = config_from_state_dict(sd, version, path)
    cfg.update(overrides or {})
    model = model_class(version)(**cfg)
    check_keys(model, sd, version, path)
    model.load_state_dict(state_dict_for_model(sd, model), strict=False)
    return model.to(dtype).eval(), {"version": version, "variant": VARIANTS[version], **cfg}


def load_opensora(path, version: str = "auto", dtype=torch.float32, overrides: Optional[Dict] = None):
    """Plain-torch loader: (model, info) from an official OpenSORA checkpoint file."""
    sd = read_state_dict(path)
    model, info = build_model(sd, version, path, dtype, overrides)
    if info["version"] == "1.0" and "space_scale" not in (overrides or {}) and "pos_embed" not in sd:
        guess = default_space_scale(path)
        model.space_scale = guess
        info["space_scale"] = guess
    return model, info


def default_space_scale(path) -> float:
    """Official 1.0 configs: space_scale 0.5 for the 16x256x256 checkpoints, 1.0 for 16x512x512."""
    return 0.5 if re.search(r"(^|[^0-9])256x256", _name(path)) else 1.0
