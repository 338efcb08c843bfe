"""A tiny PixArt built from a seed, in the official key layout, with DiT-like activation statistics.

Trained DiTs feed their linears very uneven channels; random weights alone would not, and any quantizer would
look good. So the generator plants the two kinds of imbalance ViDiT-Q is built for:
  * static outlier channels: a few channels of every block's `scale_shift_table` (adaLN shift/scale) are large,
    so after `norm * (1 + scale) + shift` the qkv/fc1 inputs have the same few channels 40-80x the rest at every
    timestep (the time-invariant part that static smoothing absorbs);
  * time-varying outlier channels: `t_block` rows for a few other channels are large, so their shift follows
    the timestep embedding and moves from step to step (the part the Hadamard rotation spreads);
  * a few MLP hidden units with large fc1 rows (big post-GELU values into fc2), large residual-stream channels
    from the patch embedder bias (into cross-attn q), and caption features with T5-like outlier channels.
Everything else is scaled like a usual initialisation. ComfyUI's detection fixes hidden=1152 and 16 heads;
smaller hidden sizes are for fast tests of the plain-torch model only.
"""
import hashlib
from typing import Dict

import torch


def _outlier_channels(gen: torch.Generator, n: int, count: int) -> torch.Tensor:
    return torch.randperm(n, generator=gen)[:count]


def build_tiny_pixart_state_dict(seed: int = 0, hidden: int = 1152, depth: int = 2, caption_channels: int = 4096,
                                 token_num: int = 120, micro_condition: bool = False, outliers: bool = True,
                                 mlp_ratio: float = 4.0, in_channels: int = 4, patch: int = 2
                                 ) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    def linear(prefix, d_in, d_out, gain=1.0):
        sd[prefix + ".weight"] = randn(d_out, d_in, std=gain / d_in ** 0.5)
        sd[prefix + ".bias"] = randn(d_out, std=0.02)

    sd: Dict[str, torch.Tensor] = {}
    hid_mlp = int(hidden * mlp_ratio)
    n_out = max(4, hidden // 144)
    static_ch = _outlier_channels(g, hidden, n_out)
    timed_ch = _outlier_channels(g, hidden, n_out)

    sd["x_embedder.proj.weight"] = randn(hidden, in_channels, patch, patch, std=1 / (in_channels * patch * patch) ** 0.5)
    sd["x_embedder.proj.bias"] = randn(hidden, std=0.02)
    linear("t_embedder.mlp.0", 256, hidden)
    linear("t_embedder.mlp.2", hidden, hidden)
    linear("t_block.1", hidden, 6 * hidden, gain=0.5)
    linear("y_embedder.y_proj.fc1", caption_channels, hidden)
    linear("y_embedder.y_proj.fc2", hidden, hidden)
    sd["y_embedder.y_embedding"] = randn(token_num, caption_channels, std=1 / caption_channels ** 0.5)
    if micro_condition:
        for name in ("csize_embedder", "ar_embedder"):
            linear(f"{name}.mlp.0", 256, hidden // 3)
            linear(f"{name}.mlp.2", hidden // 3, hidden // 3)
    if outliers:
        sd["x_embedder.proj.bias"][static_ch[:2]] = 12.0
        sd["y_embedder.y_proj.fc2.weight"][timed_ch[:3]] *= 15.0
        w = sd["t_block.1.weight"].view(6, hidden, hidden)
        for chunk in (0, 3):  # shift_msa, shift_mlp follow the timestep on the timed channels
            w[chunk, timed_ch] *= 120.0

    for i in range(depth):
        b = f"blocks.{i}"
        linear(f"{b}.attn.qkv", hidden, 3 * hidden)
        linear(f"{b}.attn.proj", hidden, hidden)
        linear(f"{b}.cross_attn.q_linear", hidden, hidden)
        linear(f"{b}.cross_attn.kv_linear", hidden, 2 * hidden)
        linear(f"{b}.cross_attn.proj", hidden, hidden)
        linear(f"{b}.mlp.fc1", hidden, hid_mlp)
        linear(f"{b}.mlp.fc2", hid_mlp, hidden, gain=0.5)
        table = randn(6, hidden, std=0.1)
        table[2] += 0.3  # gates: blocks contribute, the residual stream stays bounded
        table[5] += 0.3
        if outliers:
            sign = torch.where(torch.rand(n_out, generator=g) < 0.5, -1.0, 1.0)
            mag = 40.0 + 40.0 * torch.rand(n_out, generator=g)
            table[0, static_ch] = sign * mag  # shift_msa
            table[3, static_ch] = -sign * mag  # shift_mlp
            table[1, static_ch] = 2.0  # scale_msa
            big_units = _outlier_channels(g, hid_mlp, max(4, hid_mlp // 288))
            sd[f"{b}.mlp.fc1.weight"][big_units] *= 16.0
        sd[f"{b}.scale_shift_table"] = table

    linear("final_layer.linear", hidden, patch * patch * in_channels * 2, gain=0.5)
    sd["final_layer.scale_shift_table"] = randn(2, hidden, std=1 / hidden ** 0.5)
    return sd


def pseudo_caption(prompt: str, tokens: int = 120, channels: int = 4096, outliers: bool = True) -> torch.Tensor:
    """Deterministic stand-in for T5 features of `prompt`: [1, tokens, channels], with T5-like outlier channels.

    Only for models built by this module (no text encoder can be downloaded here); an empty prompt gives the
    "unconditional" embedding.
    """
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little") % (2 ** 63)
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(1, tokens, channels, generator=g) * 0.15
    if outliers:
        y[..., :3] += torch.tensor([6.0, -8.0, 5.0])
    return y
