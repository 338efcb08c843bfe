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
TOY_STDIT_CONFIG = dict(hidden_size=192, depth=4, num_heads=3, in_channels=3, caption_channels=64,
                        model_max_length=MAX_TOKENS)
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


def caption_features(scenes: List[Scene], dim: int = 64) -> torch.Tensor:
    return encode([s.caption() for s in scenes], text_embedding_table(dim))


def null_features(n: int = 1, dim: int = 64) -> torch.Tensor:
    return encode([""] * n, text_embedding_table(dim))
