"""Tiny OpenSORA models (STDiT 1.0 / STDiT3 1.2) built from a seed, in the official key layout, with DiT-like
activation statistics (the same kinds of imbalance as models/tiny_pixart.py, which ViDiT-Q is built for):
  * static outlier channels in every block's `scale_shift_table` shifts (time-invariant; smoothing absorbs them);
  * time-varying outlier channels: large `t_block` rows for other channels, so their shift follows the timestep
    (the part the Hadamard rotation spreads);
  * a few MLP hidden units with large fc1 rows, large residual-stream channels from the patch-embedder bias
    (they reach the cross-attention q and, in 1.0, the un-modulated temporal attention), and a few large caption
    projection rows (into the text k/v projection).
Random weights alone would make any quantizer look good. Used by the tests and the benchmark only.
"""
import os
from typing import Dict, Optional

import torch

from .common import sincos_2d, sincos_1d
from .stdit import STDiT
from .stdit3 import STDiT3
from .vae12 import SCALE, SHIFT, TemporalVAE


def _pick(g: torch.Generator, n: int, count: int) -> torch.Tensor:
    return torch.randperm(n, generator=g)[:count]


def build_tiny_opensora_state_dict(version: str = "1.0", seed: int = 0, hidden: int = 144, depth: int = 2,
                                   caption_channels: int = 256, token_num: int = 16, outliers: bool = True,
                                   in_channels: int = 4, mlp_ratio: float = 4.0, num_heads: Optional[int] = None,
                                   pos_embed_grid: Optional[tuple] = None, space_scale: float = 1.0
                                   ) -> Dict[str, torch.Tensor]:
    """State dict of a seeded STDiT ('1.0') or STDiT3 ('1.2'). hidden should be a multiple of 72 for '1.0'
    (the loader infers 72-wide heads, as in STDiT-XL/2); '1.2' records its head width in the q/k norms.
    pos_embed_grid=(T, H, W) adds the fixed tables official 1.0 checkpoints carry (for the scale detection)."""
    heads = num_heads or max(1, hidden // 72)
    cls = {"1.0": STDiT, "1.2": STDiT3}[version]
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in cls(hidden_size=hidden, depth=depth, num_heads=heads, in_channels=in_channels,
                                             caption_channels=caption_channels, model_max_length=token_num,
                                             mlp_ratio=mlp_ratio).state_dict().items()}
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    sd: Dict[str, torch.Tensor] = {}
    for k, shape in shapes.items():
        if k == "rope.freqs":
            sd[k] = 1.0 / 10000 ** (torch.arange(0, shape[0] * 2, 2).float() / (shape[0] * 2))
        elif k.endswith(("q_norm.weight", "k_norm.weight")):
            sd[k] = 1.0 + randn(*shape, std=0.05)
        elif k.endswith("scale_shift_table"):
            sd[k] = randn(*shape, std=0.1 if shape[0] == 6 else 1 / hidden ** 0.5)
            if shape[0] == 6:
                sd[k][2] += 0.3  # gates: blocks contribute, the residual stream stays bounded
                sd[k][5] += 0.3
        elif k == "y_embedder.y_embedding":
            sd[k] = randn(*shape, std=1 / caption_channels ** 0.5)
        elif k.endswith(".weight"):
            fan_in = 1
            for d in shape[1:]:
                fan_in *= d
            gain = 0.5 if (k.endswith(("mlp.fc2.weight", "final_layer.linear.weight")) or k == "t_block.1.weight") \
                else 1.0
            sd[k] = randn(*shape, std=gain / fan_in ** 0.5)
        elif k.endswith(".bias"):
            sd[k] = randn(*shape, std=0.02)
        else:
            raise AssertionError(f"tiny builder does not know how to fill {k}")

    if outliers:
        n_out = max(4, hidden // 144)
        static_ch, timed_ch = _pick(g, hidden, n_out), _pick(g, hidden, n_out)
        hid_mlp = int(hidden * mlp_ratio)
        sd["x_embedder.proj.bias"][static_ch[:2]] = 12.0
        sd["y_embedder.y_proj.fc2.weight"][timed_ch[:3]] *= 15.0
        w = sd["t_block.1.weight"].view(6, hidden, hidden)
        for chunk in (0, 3):  # shift_msa, shift_mlp follow the timestep on the timed channels
            w[chunk, timed_ch] *= 120.0
        prefixes = [k[: -len(".scale_shift_table")] for k in sd if k.endswith("scale_shift_table") and
                    not k.startswith("final_layer")]
        for b in prefixes:
            table = sd[f"{b}.scale_shift_table"]
            sign = torch.where(torch.rand(n_out, generator=g) < 0.5, -1.0, 1.0)
            mag = 40.0 + 40.0 * torch.rand(n_out, generator=g)
            table[0, static_ch] = sign * mag  # shift_msa
            table[3, static_ch] = -sign * mag  # shift_mlp
            table[1, static_ch] = 2.0  # scale_msa
            sd[f"{b}.mlp.fc1.weight"][_pick(g, hid_mlp, max(4, hid_mlp // 288))] *= 16.0

    if version == "1.0" and pos_embed_grid is not None:
        t, h, w = pos_embed_grid
        sd["pos_embed"] = sincos_2d(hidden, h // 2, w // 2, space_scale)[None]
        sd["pos_embed_temporal"] = sincos_1d(hidden, torch.arange(t).float())[None]
    return sd


def save_tiny_opensora(path, version: str = "1.0", dtype=torch.float16, **kwargs) -> str:
    """Write a tiny checkpoint (.safetensors, or .pth through torch.save) and return its path."""
    from safetensors.torch import save_file

    path = str(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    sd = {k: v.to(dtype).contiguous() for k, v in build_tiny_opensora_state_dict(version, **kwargs).items()}
    if path.endswith(".safetensors"):
        save_file(sd, path)
    else:
        torch.save(sd, path)
    return path


def build_tiny_temporal_vae_state_dict(seed: int = 0, filters: int = 32, blocks: int = 1,
                                       prefix: str = "temporal_vae.") -> Dict[str, torch.Tensor]:
    """Seeded OpenSORA 1.2 temporal VAE (VAE_Temporal_SD layout, narrower: official filters 128, 4 blocks) plus
    the pipeline's scale / shift buffers. The spatial SDXL-VAE half comes from ComfyUI (tests build it there)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in TemporalVAE(filters=filters, blocks=blocks).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        if len(shape) == 1:  # GroupNorm affine and conv biases
            sd[prefix + k] = torch.ones(shape) if (".norm" in k and k.endswith("weight")) else torch.zeros(shape)
        else:
            fan_in = shape[1:].numel()
            sd[prefix + k] = torch.randn(shape, generator=g) * (0.7 / fan_in ** 0.5)
    sd["scale"] = torch.tensor(SCALE).view(1, 4, 1, 1, 1)
    sd["shift"] = torch.tensor(SHIFT).view(1, 4, 1, 1, 1)
    return sd
