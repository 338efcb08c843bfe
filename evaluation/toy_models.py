"""The trained toy models: configuration, loading from the shipped safetensors, and sampling helpers."""
import json
import pathlib
from typing import Dict, List, Optional

import torch
from safetensors.torch import load_file

from ..models.pixart import PixArt
from .toy_world import MAX_TOKENS, Scene, encode, text_embedding_table

WEIGHTS_DIR = pathlib.Path(__file__).resolve().parent / "weights"
TOY_PIXART_FILE = WEIGHTS_DIR / "toy_pixart.safetensors"
TOY_PIXART_CONFIG = dict(hidden_size=192, depth=6, num_heads=3, patch_size=2, in_channels=3, caption_channels=64,
                         model_max_length=MAX_TOKENS, micro_condition=False)
IMAGE_SIZE = 32
TOY_STDIT_FILE = WEIGHTS_DIR / "toy_stdit.safetensors"
# the toy PixArt's width and depth, so its weights initialise the spatial part (as OpenSORA 1.0 starts from
# PixArt-α); space_scale 0.5 (OpenSORA 1.0's 256 px setting) gives the toy PixArt's positional table at 32 px
TOY_STDIT_CONFIG = dict(hidden_size=192, depth=6, num_heads=3, in_channels=3, caption_channels=64,
                        model_max_length=MAX_TOKENS, space_scale=0.5)
VIDEO_FRAMES = 8


def build_toy_pixart(config: Optional[Dict] = None) -> PixArt:
    return PixArt(**(config or TOY_PIXART_CONFIG))


def load_toy_pixart(path: pathlib.Path = TOY_PIXART_FILE) -> Optional[PixArt]:
    """The trained toy PixArt (fp32 copy of the shipped fp16 weights), or None when it is not there."""
    if not path.exists():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    config = json.loads(meta["config"]) if "config" in meta else TOY_PIXART_CONFIG
    model = build_toy_pixart(config)
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval()


def build_toy_stdit(config: Optional[Dict] = None):
    from ..models.opensora.stdit import STDiT

    return STDiT(**(config or TOY_STDIT_CONFIG))


def load_toy_stdit(path: pathlib.Path = TOY_STDIT_FILE):
    """The trained toy STDiT (OpenSORA 1.0 architecture, text-to-video of moving shapes), or None."""
    if not path.exists():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    model = build_toy_stdit(json.loads(meta["config"]) if "config" in meta else None)
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval()


def stdit_init_from_pixart(stdit, pixart_state: Dict[str, torch.Tensor]) -> List[str]:
    """Initialise an STDiT from a PixArt state dict of the same width, as OpenSORA 1.0 initialises STDiT from
    PixArt-α: every PixArt weight is copied (the 2-D patch embedding becomes the (1, 2, 2) 3-D one), and each
    temporal attention's output projection is zeroed, so the STDiT starts as the image model run frame by
    frame (exactly at the toy's 32 px, where TOY_STDIT_CONFIG's space_scale gives PixArt's positional table).
    Returns the STDiT keys left at their fresh initialisation (the temporal attentions' qkv)."""
    own = stdit.state_dict()
    new = {}
    for k, v in pixart_state.items():
        if k not in own or k == "y_embedder.y_embedding":  # the toy's null caption is zero features, not this
            continue
        if k == "x_embedder.proj.weight" and v.ndim == 4:
            v = v.unsqueeze(2)
        if v.shape != own[k].shape:
            raise ValueError(f"{k}: PixArt {tuple(v.shape)} vs STDiT {tuple(own[k].shape)}")
        new[k] = v.to(own[k].dtype)
    for k in own:
        if ".attn_temp.proj." in k:
            new[k] = torch.zeros_like(own[k])
    stdit.load_state_dict(new, strict=False)
    return sorted(k for k in own if k not in new and k != "y_embedder.y_embedding")


def spread(scenes: List[Scene], n: int) -> List[Scene]:
    """n scenes taken at an even stride through `scenes` (all of them when n >= len(scenes)): the captions the
    training log and the quality table score. For the 360 video scenes, n = 120 (stride 3) visits every shape,
    colour and start/end pair; strides sharing a factor with 20 (the start/end pairs per shape and colour, e.g.
    n = 60 or 12) skip start/end pairs."""
    return scenes[:: max(1, len(scenes) // n)][:n]


def caption_features(scenes: List[Scene], dim: int = 64) -> torch.Tensor:
    return encode([s.caption() for s in scenes], text_embedding_table(dim))


def null_features(n: int = 1, dim: int = 64) -> torch.Tensor:
    return encode([""] * n, text_embedding_table(dim))
