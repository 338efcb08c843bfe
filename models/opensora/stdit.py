"""OpenSORA 1.0 STDiT (STDiT-XL/2) with the official state-dict key layout.

Per block: spatial self-attention (`attn`, over the tokens of one frame), temporal self-attention (`attn_temp`,
over the frames of one spatial position, on the un-modulated residual stream, sharing the spatial gate),
cross-attention to the T5 caption (`cross_attn`), MLP (`mlp`); adaLN-single modulation from `t_block` plus each
block's `scale_shift_table`. Trained with IDDPM (linear betas 1e-4..0.02, 1000 steps, learned sigma): the
official output has 2 * C channels (eps, variance); forward() returns eps only, which is what ComfyUI's EPS
model sampling and our samplers use.

Differences from the official inference code, on purpose: positional tables are computed for the actual
latent size instead of the training `input_size` (identical at the trained size); attention runs through
torch SDPA; the checkpoint's `pos_embed` / `pos_embed_temporal` buffers are not loaded (the official loader
drops them too). Nothing here imports ComfyUI.
"""
from typing import Optional

import torch
import torch.nn as nn

from .common import (Attention, CaptionEmbedder, CrossAttention, Mlp, PatchEmbed3D, T2IFinalLayer, TimestepEmbedder,
                     as_caption, cast_like, match_batch, ops_or_torch, sincos_1d, sincos_2d, unpatchify)
from .. import fused_input
from ..fused_input import gated_residual, modulated_input


class STDiTBlock(nn.Module):
    fused_inputs = (("attn.qkv", "norm1"), ("mlp.fc1", "norm2"))  # as models/pixart.PixArtBlock
    fused_residuals = ("attn.proj", "attn_temp.proj", "cross_attn.proj", "mlp.fc2")

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0, operations=None, dtype=None, device=None):
        super().__init__()
        ops = ops_or_torch(operations)
        kw = dict(operations=operations, dtype=dtype, device=device)
        self.norm1 = ops.LayerNorm(hidden, elementwise_affine=False, eps=1e-6, dtype=dtype, device=device)
        self.attn = Attention(hidden, heads, **kw)
        self.cross_attn = CrossAttention(hidden, heads, **kw)
        self.norm2 = ops.LayerNorm(hidden, elementwise_affine=False, eps=1e-6, dtype=dtype, device=device)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio), hidden, **kw)
        self.scale_shift_table = nn.Parameter(torch.zeros(6, hidden, dtype=dtype, device=device))
        self.attn_temp = Attention(hidden, heads, **kw)

    def forward(self, x, y, t, frames: int, tpe: Optional[torch.Tensor] = None, mask=None):
        x = fused_input.block_input(x)
        b, n, c = x.shape
        s = n // frames
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            cast_like(self.scale_shift_table, x)[None] + t.reshape(b, 6, -1)).chunk(6, dim=1)
        # spatial: the tokens of each frame
        x_s = modulated_input(self.attn.qkv, self.norm1, x, shift_msa, scale_msa).reshape(b * frames, s, c)
        x = gated_residual(self.attn.proj, x, gate_msa, self.attn, x_s)
        # temporal: the frames of each spatial position (residual stream, no modulation), tokens left in place
        x_t = x if tpe is None else (x.reshape(b, frames, s, c) + tpe.reshape(1, frames, 1, c)).reshape(b, n, c)
        x = gated_residual(self.attn_temp.proj, x, gate_msa, self.attn_temp.frames_forward, x_t, frames)
        x = gated_residual(self.cross_attn.proj, x, None, self.cross_attn, x, y, mask)
        return gated_residual(self.mlp.fc2, x, gate_mlp, self.mlp,
                              modulated_input(self.mlp.fc1, self.norm2, x, shift_mlp, scale_mlp))


class STDiT(nn.Module):
    """forward(x [B, C, T, H, W], timesteps [B] in 0..999, context [B, M, caption_channels]) -> eps [B, C, T, H, W]."""

    version = "1.0"

    def __init__(self, hidden_size=1152, depth=28, num_heads=16, patch_size=(1, 2, 2), in_channels=4,
                 caption_channels=4096, model_max_length=120, mlp_ratio=4.0, pred_sigma=True, space_scale=1.0,
                 time_scale=1.0, dtype=None, device=None, operations=None, **kwargs):
        super().__init__()
        ops = ops_or_torch(operations)
        kw = dict(operations=operations, dtype=dtype, device=device)
        self.dtype = dtype
        self.hidden_size, self.depth, self.num_heads = hidden_size, depth, num_heads
        self.patch_size = tuple(patch_size)
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if pred_sigma else in_channels
        self.space_scale, self.time_scale = float(space_scale), float(time_scale)
        self.x_embedder = PatchEmbed3D(self.patch_size, in_channels, hidden_size, **kw)
        self.t_embedder = TimestepEmbedder(hidden_size, **kw)
        self.t_block = nn.Sequential(nn.SiLU(), ops.Linear(hidden_size, 6 * hidden_size, bias=True, dtype=dtype,
                                                           device=device))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, model_max_length, **kw)
        self.blocks = nn.ModuleList(STDiTBlock(hidden_size, num_heads, mlp_ratio, **kw) for _ in range(depth))
        self.final_layer = T2IFinalLayer(hidden_size, self.patch_size[0] * self.patch_size[1] * self.patch_size[2],
                                         self.out_channels, **kw)

    def forward(self, x, timesteps, context, mask=None, **kwargs):
        b, _, t_in, h_in, w_in = x.shape
        pt, ph, pw = self.patch_size
        nt, nh, nw = -(-t_in // pt), -(-h_in // ph), -(-w_in // pw)
        s = nh * nw
        dtype = x.dtype
        pos = sincos_2d(self.hidden_size, nh, nw, self.space_scale, device=x.device).to(dtype)
        tpe = sincos_1d(self.hidden_size, torch.arange(nt, device=x.device) / self.time_scale).to(dtype)[None]
        h = self.x_embedder(x).reshape(b, nt, s, -1) + pos[None, None]
        h = h.reshape(b, nt * s, -1)
        t = self.t_embedder(timesteps.reshape(-1), dtype)
        t = match_batch(t, b)
        t0 = self.t_block(t)
        y = self.y_embedder(match_batch(as_caption(context).to(dtype), b))
        if mask is not None:
            mask = match_batch(mask.reshape(mask.shape[0], -1), b)
        for i, block in enumerate(self.blocks):
            h = block(h, y, t0, nt, tpe if i == 0 else None, mask)
        h = self.final_layer(h, t)
        out = unpatchify(h, (nt, nh, nw), self.patch_size, self.out_channels, (t_in, h_in, w_in))
        return out[:, : self.in_channels]
