"""OpenSORA 1.2 STDiT3 (STDiT3-XL/2, also the 3B/2 width) with the official state-dict key layout.

The network alternates `spatial_blocks[i]` (self-attention over the tokens of one frame) and
`temporal_blocks[i]` (self-attention over the frames of one spatial position, with RoPE on q/k); both kinds
have RMS q/k norms, cross-attention to the T5 caption and an MLP, modulated (adaLN-single) by `t_block` of
timestep + fps embeddings. Trained with rectified flow: x_t = (1 - t) x0 + t noise, t = timestep / 1000, and
the model predicts the velocity v = x0 - noise (first C of its 2C output channels; the rest is unused).
forward() returns that velocity; the ComfyUI glue negates it into ComfyUI's flow convention (noise - x0).

Image/video conditioning (`x_mask`, the t=0 branch) is not implemented: text-to-video only. The spatial
positional table uses the official scale (sqrt(height * width) / input_sq_size) and base size
(round(sqrt(tokens per frame))); height/width default to the latent size x 8. Nothing here imports ComfyUI.
"""
import torch
import torch.nn as nn

from .common import (Attention, CaptionEmbedder, CrossAttention, Mlp, PatchEmbed3D, RotaryEmbedding1D,
                     T2IFinalLayer, TimestepEmbedder, as_caption, cast_like, match_batch, ops_or_torch,
                     sincos_2d, unpatchify)
from .. import fused_input
from ..fused_input import gated_residual, modulated_input

VAE_SPATIAL_FACTOR = 8


class STDiT3Block(nn.Module):
    fused_inputs = (("attn.qkv", "norm1"), ("mlp.fc1", "norm2"))  # as models/pixart.PixArtBlock
    fused_residuals = ("attn.proj", "cross_attn.proj", "mlp.fc2")

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True, temporal=False,
                 operations=None, dtype=None, device=None):
        super().__init__()
        ops = ops_or_torch(operations)
        kw = dict(operations=operations, dtype=dtype, device=device)
        self.temporal = temporal
        self.norm1 = ops.LayerNorm(hidden, elementwise_affine=False, eps=1e-6, dtype=dtype, device=device)
        self.attn = Attention(hidden, heads, qk_norm=qk_norm, **kw)
        self.cross_attn = CrossAttention(hidden, heads, **kw)
        self.norm2 = ops.LayerNorm(hidden, elementwise_affine=False, eps=1e-6, dtype=dtype, device=device)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio), hidden, **kw)
        self.scale_shift_table = nn.Parameter(torch.zeros(6, hidden, dtype=dtype, device=device))

    def forward(self, x, y, t, frames: int, rope=None, mask=None):
        x = fused_input.block_input(x)
        b, n, c = x.shape
        s = n // frames
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            cast_like(self.scale_shift_table, x)[None] + t.reshape(b, 6, -1)).chunk(6, dim=1)
        x_m = modulated_input(self.attn.qkv, self.norm1, x, shift_msa, scale_msa)
        if self.temporal:  # over the frames of each spatial position, tokens left in place
            x = gated_residual(self.attn.proj, x, gate_msa, self.attn.frames_forward, x_m, frames, rope)
        else:
            x = gated_residual(self.attn.proj, x, gate_msa, self.attn, x_m.reshape(b * frames, s, c))
        x = gated_residual(self.cross_attn.proj, x, None, self.cross_attn, x, y, mask)
        return gated_residual(self.mlp.fc2, x, gate_mlp, self.mlp,
                              modulated_input(self.mlp.fc1, self.norm2, x, shift_mlp, scale_mlp))


class STDiT3(nn.Module):
    """forward(x [B, C, T, H, W], timesteps [B] in 0..1000, context [B, M, caption_channels]) -> velocity."""

    version = "1.2"

    def __init__(self, hidden_size=1152, depth=28, num_heads=16, patch_size=(1, 2, 2), in_channels=4,
                 caption_channels=4096, model_max_length=300, mlp_ratio=4.0, pred_sigma=True, qk_norm=True,
                 input_sq_size=512, dtype=None, device=None, operations=None, **kwargs):
        super().__init__()
        ops = ops_or_torch(operations)
        kw = dict(operations=operations, dtype=dtype, device=device)
        self.dtype = dtype
        self.hidden_size, self.depth, self.num_heads = hidden_size, depth, num_heads
        self.patch_size = tuple(patch_size)
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if pred_sigma else in_channels
        self.input_sq_size = input_sq_size
        self.rope = RotaryEmbedding1D(hidden_size // num_heads, device=device)
        self.x_embedder = PatchEmbed3D(self.patch_size, in_channels, hidden_size, **kw)
        self.t_embedder = TimestepEmbedder(hidden_size, **kw)
        self.fps_embedder = TimestepEmbedder(hidden_size, **kw)
        self.t_block = nn.Sequential(nn.SiLU(), ops.Linear(hidden_size, 6 * hidden_size, bias=True, dtype=dtype,
                                                           device=device))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, model_max_length, **kw)
        self.spatial_blocks = nn.ModuleList(
            STDiT3Block(hidden_size, num_heads, mlp_ratio, qk_norm, temporal=False, **kw) for _ in range(depth))
        self.temporal_blocks = nn.ModuleList(
            STDiT3Block(hidden_size, num_heads, mlp_ratio, qk_norm, temporal=True, **kw) for _ in range(depth))
        self.final_layer = T2IFinalLayer(hidden_size, self.patch_size[0] * self.patch_size[1] * self.patch_size[2],
                                         self.out_channels, **kw)

    def forward(self, x, timesteps, context, mask=None, fps=24.0, height=None, width=None, **kwargs):
        b, _, t_in, h_in, w_in = x.shape
        pt, ph, pw = self.patch_size
        nt, nh, nw = -(-t_in // pt), -(-h_in // ph), -(-w_in // pw)
        s = nh * nw
        dtype = x.dtype
        height = float(height if height is not None else h_in * VAE_SPATIAL_FACTOR)
        width = float(width if width is not None else w_in * VAE_SPATIAL_FACTOR)
        scale = (height * width) ** 0.5 / self.input_sq_size
        pos = sincos_2d(self.hidden_size, nh, nw, scale, base_size=round(s ** 0.5), device=x.device).to(dtype)
        h = (self.x_embedder(x).reshape(b, nt, s, -1) + pos[None, None]).reshape(b, nt * s, -1)
        t = match_batch(self.t_embedder(timesteps.reshape(-1), dtype), b)
        fps_t = torch.as_tensor(fps, dtype=torch.float32, device=x.device).reshape(-1)
        t = t + match_batch(self.fps_embedder(fps_t, dtype), b)
        t_mlp = self.t_block(t)
        y = self.y_embedder(match_batch(as_caption(context).to(dtype), b))
        if mask is not None:
            mask = match_batch(mask.reshape(mask.shape[0], -1), b)
        for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks):
            h = spatial(h, y, t_mlp, nt, None, mask)
            h = temporal(h, y, t_mlp, nt, self.rope, mask)
        h = self.final_layer(h, t)
        out = unpatchify(h, (nt, nh, nw), self.patch_size, self.out_channels, (t_in, h_in, w_in))
        return out[:, : self.in_channels]
