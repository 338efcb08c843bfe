"""ComfyUI for the integration tests: found through COMFYUI_PATH, otherwise those tests are skipped."""
import os
import pathlib
import sys

import pytest
import torch
from safetensors.torch import save_file

from viditq.models.tiny_pixart import build_tiny_pixart_state_dict, pseudo_caption

COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")
SKIP_REASON = ("COMFYUI_PATH is not set: the ComfyUI integration tests need a ComfyUI checkout "
               "(see README, 'Tests'); .ci/run sets it when /opt/ComfyUI exists")
requires_comfyui = pytest.mark.skipif(not COMFYUI_PATH, reason=SKIP_REASON)

# ComfyUI's PixArt detection fixes hidden 1152 / 16 heads and reads depth and token count from the keys.
TINY_CHECKPOINT = "tiny_pixart_sigma.safetensors"


def import_comfyui():
    """Import ComfyUI in-process on the CPU (as `python main.py --cpu` would)."""
    if COMFYUI_PATH not in sys.path:
        sys.path.insert(0, COMFYUI_PATH)
    from comfy.cli_args import args

    if not torch.cuda.is_available():
        args.cpu = True
    import comfy.model_management  # noqa: F401
    import nodes  # noqa: F401  (ComfyUI's nodes.py)


def write_tiny_checkpoint(folder: pathlib.Path, depth: int = 1, seed: int = 0) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    sd = build_tiny_pixart_state_dict(seed, hidden=1152, depth=depth)
    path = folder / TINY_CHECKPOINT
    save_file({k: v.to(torch.float16).contiguous() for k, v in sd.items()}, str(path))
    return path


def conditioning(prompt: str):
    """ComfyUI CONDITIONING holding stand-in T5 features (a T5-XXL cannot be downloaded here)."""
    return [[pseudo_caption(prompt), {}]]
