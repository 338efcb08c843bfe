"""PixArt-α / PixArt-Σ rules (official module names, as in ComfyUI's comfy/ldm/pixart).

Quantized: every block linear. Kept FP: x/t/y embedders (incl. caption projection y_proj), t_block (adaLN
timestep MLP), micro-condition embedders (csize/ar), the final layer; norms and scale_shift_tables have no GEMM.
"""
from typing import Optional

import torch.nn as nn

from . import ArchRules


def detect(model: nn.Module) -> Optional[str]:
    blocks = getattr(model, "blocks", None)
    if not (hasattr(model, "t_block") and hasattr(model, "y_embedder") and isinstance(blocks, nn.ModuleList)):
        return None
    if len(blocks) == 0 or not all(hasattr(blocks[0], a) for a in ("attn", "cross_attn", "mlp")):
        return None
    if hasattr(blocks[0], "attn_temp"):  # OpenSORA 1.0 STDiT shares PixArt's block names, plus temporal attention
        return None
    return "pixart_alpha" if getattr(model, "micro_conditioning", False) else "pixart_sigma"


RULES = ArchRules(
    family="pixart",
    quantized=(
        (r"blocks\.\d+\.attn\.(qkv|proj)", "self_attn"),
        (r"blocks\.\d+\.cross_attn\.(q_linear|kv_linear|proj)", "cross_attn"),
        (r"blocks\.\d+\.mlp\.(fc1|fc2)", "mlp"),
    ),
    kept_fp=("x_embedder", "t_embedder", "t_block", "y_embedder", "csize_embedder", "ar_embedder", "final_layer"),
    detect=detect,
)
