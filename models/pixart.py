"""PixArt-α / PixArt-Σ in plain torch, with the official state-dict key layout.

Used where ComfyUI is absent (the one-command pipeline, tests, benchmarks). Module names match the official
checkpoints and ComfyUI's `comfy/ldm/pixart`, so the same architecture rules and checkpoints apply to both;
a test checks both give the same output on the same weights. KV compression (PixArt-Σ 4K) is not supported.
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fused_input
from .fused_input import gated_residual, modulated_input


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = torch.arange(dim // 2, device=pos.device, dtype=pos.dtype) / (dim / 2.0)
    out = pos.reshape(-1)[:, None] * (1.0 / 10000 ** omega)[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, h: int, w: int, pe_interpolation: float, base_size: int, device, dtype) -> torch.Tensor:
    gh, gw = torch.meshgrid(
        torch.arange(h, device=device, dtype=dtype) / (h / base_size) / pe_interpolation,
        torch.arange(w, device=device, dtype=dtype) / (w / base_size) / pe_interpolation,
        indexing="ij",
    )
    return torch.cat([sincos_1d(dim // 2, gw), sincos_1d(dim // 2, gh)], dim=1)


class Mlp(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.freq_dim = freq_dim

    def forward(self, t, dtype):
        return self.mlp(timestep_embedding(t, self.freq_dim).to(dtype))


class SizeEmbedder(TimestepEmbedder):
    def forward(self, s: torch.Tensor, bs: int, dtype):
        if s.ndim == 1:
            s = s[:, None]
        if s.shape[0] != bs:
            s = s.repeat(bs // s.shape[0], 1)
        b, d = s.shape
        emb = self.mlp(timestep_embedding(s.reshape(-1), self.freq_dim).to(dtype))
        return emb.reshape(b, d * emb.shape[-1])


class Attention(nn.Module):
    # attention function hook: fn(q, k, v) with [B, H, N, D] in and out; None = SDPA (quant_core.attention sets it)
    attn_fn = None

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, hidden * 3)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = (self.attn_fn or F.scaled_dot_product_attention)(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class CrossAttention(nn.Module):
    attn_fn = None  # as Attention.attn_fn

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_linear = nn.Linear(hidden, hidden)
        self.kv_linear = nn.Linear(hidden, hidden * 2)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x, y):
        b, n, c = x.shape
        h, d = self.heads, c // self.heads
        q = self.q_linear(x).reshape(b, n, h, d).transpose(1, 2)
        k, v = self.kv_linear(y).reshape(b, -1, 2, h, d).permute(2, 0, 3, 1, 4)
        out = (self.attn_fn or F.scaled_dot_product_attention)(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class PixArtBlock(nn.Module):
    # (layer, its LayerNorm): inputs the forward builds with modulated_input (quant_core/fusions.py may fuse them)
    fused_inputs = (("attn.qkv", "norm1"), ("mlp.fc1", "norm2"))
    # layers whose gated residual add the forward routes through gated_residual (fusions.py may fuse it)
    fused_residuals = ("attn.proj", "cross_attn.proj", "mlp.fc2")

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.cross_attn = CrossAttention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio), hidden)
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden) / hidden ** 0.5)

    def forward(self, x, y, t):
        x = fused_input.block_input(x)
        b = x.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None].to(x.dtype) + t.reshape(b, 6, -1)
        ).chunk(6, dim=1)
        x = gated_residual(self.attn.proj, x, gate_msa, self.attn,
                           modulated_input(self.attn.qkv, self.norm1, x, shift_msa, scale_msa))
        x = gated_residual(self.cross_attn.proj, x, None, self.cross_attn, x, y)
        return gated_residual(self.mlp.fc2, x, gate_mlp, self.mlp,
                              modulated_input(self.mlp.fc1, self.norm2, x, shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out_ch: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_ch)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden) / hidden ** 0.5)

    def forward(self, x, t):
        shift, scale = (self.scale_shift_table[None].to(x.dtype) + t[:, None]).chunk(2, dim=1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_ch: int, hidden: int):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, hidden, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class CaptionEmbedder(nn.Module):
    def __init__(self, caption_channels: int, hidden: int, token_num: int):
        super().__init__()
        self.y_proj = Mlp(caption_channels, hidden, hidden)
        self.register_buffer("y_embedding", torch.randn(token_num, caption_channels) / caption_channels ** 0.5)

    def forward(self, y):
        return self.y_proj(y)


class PixArt(nn.Module):
    """PixArt-α (micro_condition=True) or PixArt-Σ. forward(x, t, context) returns eps, like ComfyUI's."""

    def __init__(self, hidden_size=1152, depth=28, num_heads=16, patch_size=2, in_channels=4,
                 caption_channels=4096, model_max_length=120, micro_condition=False, mlp_ratio=4.0,
                 pe_interpolation: Optional[float] = None):
        super().__init__()
        self.hidden_size, self.depth, self.num_heads = hidden_size, depth, num_heads
        self.patch_size, self.in_channels, self.out_channels = patch_size, in_channels, in_channels * 2
        self.micro_conditioning = micro_condition
        self.pe_interpolation = pe_interpolation
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, model_max_length)
        if micro_condition:
            self.csize_embedder = SizeEmbedder(hidden_size // 3)
            self.ar_embedder = SizeEmbedder(hidden_size // 3)
        self.blocks = nn.ModuleList(PixArtBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    @property
    def image_model(self) -> str:
        return "pixart_alpha" if self.micro_conditioning else "pixart_sigma"

    def forward(self, x, timesteps, context, c_size=None, c_ar=None):
        b, _, h, w = x.shape
        p = self.patch_size
        c_res = (h + w) // 2
        # as ComfyUI's for latents >= 64; clamped so smaller latents do not divide by zero
        pe_interp = self.pe_interpolation or max(1, round(c_res / (512 / 8.0)))
        base = max(64, round(c_res / 64) * 64) // p
        pos = sincos_2d(self.hidden_size, h // p, w // p, pe_interp, base, x.device, x.dtype)
        x = self.x_embedder(x) + pos[None]
        t = self.t_embedder(timesteps, x.dtype)
        if self.micro_conditioning:
            if c_size is None:
                c_size = torch.tensor([h * 8, w * 8], dtype=x.dtype, device=x.device).repeat(b, 1)
            if c_ar is None:
                c_ar = torch.tensor([h / w], dtype=x.dtype, device=x.device).repeat(b, 1)
            t = t + torch.cat([self.csize_embedder(c_size, b, x.dtype), self.ar_embedder(c_ar, b, x.dtype)], 1)
        t0 = self.t_block(t)
        if context.ndim == 4:
            context = context.squeeze(1)
        y = self.y_embedder(context.to(x.dtype))
        for block in self.blocks:
            x = block(x, y, t0)
        x = self.final_layer(x, t)
        x = x.reshape(b, h // p, w // p, p, p, self.out_channels)
        x = torch.einsum("nhwpqc->nchpwq", x).reshape(b, self.out_channels, h, w)
        return x[:, : self.in_channels]


def pixart_config_from_state_dict(sd: dict) -> dict:
    """Architecture hyper-parameters from an official PixArt state dict (as ComfyUI's detection reads it)."""
    if "t_block.1.weight" not in sd:
        raise ValueError("not a PixArt checkpoint: key 't_block.1.weight' is missing")
    hidden = sd["t_block.1.weight"].shape[1]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    return dict(
        hidden_size=hidden,
        depth=depth,
        num_heads=16 if hidden % 16 == 0 else max(1, hidden // 72),  # ComfyUI fixes 16 heads
        in_channels=sd["x_embedder.proj.weight"].shape[1],
        patch_size=sd["x_embedder.proj.weight"].shape[2],
        caption_channels=sd["y_embedder.y_proj.fc1.weight"].shape[1],
        model_max_length=sd["y_embedder.y_embedding"].shape[0] if "y_embedder.y_embedding" in sd else 120,
        micro_condition="ar_embedder.mlp.0.weight" in sd,
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
    )
