"""Building blocks shared by STDiT (OpenSORA 1.0) and STDiT3 (OpenSORA 1.2), in the ComfyUI model style.

Every layer that owns weights is built from `operations` (ComfyUI's comfy.ops classes when ComfyUI builds the
model, so its weight casting / offloading applies; plain torch.nn when `operations` is None), and takes the
`dtype` / `device` keywords ComfyUI passes. Module names follow the official checkpoints, so the state dicts
load as they are. Nothing here imports ComfyUI.
"""
import math
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...kernels.dispatch import frame_attention

TORCH_OPS = SimpleNamespace(Linear=nn.Linear, LayerNorm=nn.LayerNorm, Conv3d=nn.Conv3d)


def ops_or_torch(operations):
    return TORCH_OPS if operations is None else operations


def cast_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.to(dtype=x.dtype, device=x.device)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """GLIDE/DiT sinusoidal embedding of (possibly fractional) timesteps: [cos | sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.reshape(-1, 1).float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """MAE-style 1-D sin-cos embedding [N, dim] = [sin(pos * w) | cos(pos * w)], w_k = 10000^(-2k/dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0))
    out = pos.reshape(-1, 1).double() * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1).float()


def sincos_2d(dim: int, h: int, w: int, scale: float = 1.0, base_size: Optional[int] = None,
              device=None) -> torch.Tensor:
    """[h * w, dim] 2-D sin-cos embedding, tokens row-major (h outer); first half encodes the column (w)
    coordinate, second half the row (h) coordinate, as the official OpenSORA tables. Coordinates are
    arange / scale, stretched to base_size / size when base_size is given (OpenSORA 1.2)."""
    gh = torch.arange(h, dtype=torch.float64, device=device) / scale
    gw = torch.arange(w, dtype=torch.float64, device=device) / scale
    if base_size is not None:
        gh = gh * (base_size / h)
        gw = gw * (base_size / w)
    rows, cols = torch.meshgrid(gh, gw, indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)


class Mlp(nn.Module):
    """timm-style MLP (fc1 -> GELU(tanh) -> fc2), the layout of the official `mlp` and `y_proj` modules."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, operations=None, dtype=None, device=None):
        super().__init__()
        ops = ops_or_torch(operations)
        self.fc1 = ops.Linear(d_in, d_hidden, bias=True, dtype=dtype, device=device)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = ops.Linear(d_hidden, d_out, bias=True, dtype=dtype, device=device)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TimestepEmbedder(nn.Module):
    """t -> sinusoid(256) -> Linear -> SiLU -> Linear (keys mlp.0 / mlp.2). Also the 1.2 fps embedder."""

    def __init__(self, hidden: int, freq_dim: int = 256, operations=None, dtype=None, device=None):
        super().__init__()
        ops = ops_or_torch(operations)
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(ops.Linear(freq_dim, hidden, bias=True, dtype=dtype, device=device), nn.SiLU(),
                                 ops.Linear(hidden, hidden, bias=True, dtype=dtype, device=device))

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(dtype))


class CaptionEmbedder(nn.Module):
    """T5 features -> hidden (y_proj MLP); `y_embedding` is the learned null caption used for CFG."""

    def __init__(self, caption_channels: int, hidden: int, token_num: int, operations=None, dtype=None, device=None):
        super().__init__()
        self.y_proj = Mlp(caption_channels, hidden, hidden, operations, dtype, device)
        self.register_buffer("y_embedding", torch.zeros(token_num, caption_channels, dtype=dtype, device=device))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.y_proj(y)


class PatchEmbed3D(nn.Module):
    """[B, C, T, H, W] -> [B, T' * H' * W', hidden] (Conv3d with kernel = stride = patch; pads to a multiple)."""

    def __init__(self, patch, in_ch: int, hidden: int, operations=None, dtype=None, device=None):
        super().__init__()
        ops = ops_or_torch(operations)
        self.patch = tuple(patch)
        self.proj = ops.Conv3d(in_ch, hidden, kernel_size=self.patch, stride=self.patch, dtype=dtype, device=device)

    def forward(self, x):
        pt, ph, pw = self.patch
        t, h, w = x.shape[-3:]
        x = F.pad(x, (0, (-w) % pw, 0, (-h) % ph, 0, (-t) % pt))
        return self.proj(x).flatten(2).transpose(1, 2)


class RMSNorm(nn.Module):
    """LLaMA/T5 RMSNorm over the last dim (computed in fp32), the official q_norm / k_norm of STDiT3."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return cast_like(self.weight, x) * xf.to(x.dtype)


class RotaryEmbedding1D(nn.Module):
    """RoPE over the sequence axis with interleaved pairs ((x0, x1) rotate together), as rotary-embedding-torch
    does for STDiT3's temporal attention. `freqs` is stored in the official checkpoints as `rope.freqs`."""

    def __init__(self, head_dim: int, theta: float = 10000.0, dtype=None, device=None):
        super().__init__()
        freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim)
        self.register_buffer("freqs", freqs.to(device=device, dtype=dtype or torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., N, head_dim]; position n rotates by n * freqs."""
        n = x.shape[-2]
        ang = torch.arange(n, device=x.device, dtype=torch.float32)[:, None] * self.freqs.float().to(x.device)[None]
        ang = ang.repeat_interleave(2, dim=-1)
        xf = x.float()
        pairs = xf.unflatten(-1, (-1, 2))
        rot = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        return (xf * ang.cos() + rot * ang.sin()).to(x.dtype)


class Attention(nn.Module):
    """Self-attention over the token axis of [B, N, C]: fused qkv, optional RMS q/k norm and RoPE."""

    def __init__(self, hidden: int, heads: int, qk_norm: bool = False, operations=None, dtype=None, device=None):
        super().__init__()
        ops = ops_or_torch(operations)
        self.heads = heads
        self.head_dim = hidden // heads
        self.qkv = ops.Linear(hidden, 3 * hidden, bias=True, dtype=dtype, device=device)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, dtype=dtype, device=device)
            self.k_norm = RMSNorm(self.head_dim, dtype=dtype, device=device)
        else:
            self.q_norm = self.k_norm = None
        self.proj = ops.Linear(hidden, hidden, bias=True, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, rope: Optional[RotaryEmbedding1D] = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    def frames_forward(self, x: torch.Tensor, frames: int, rope: Optional[RotaryEmbedding1D] = None) -> torch.Tensor:
        """Temporal attention: every spatial position attends over its own frames. x [B, T * S, C] holds the tokens
        frame-major (the residual stream's own order) and the output keeps that order, so no rearrange copies the
        stream to (B S) T C and back: the linears are per token, and the attention reads and writes through strides
        (kernels.dispatch.frame_attention: one Triton launch for short sequences, SDPA otherwise)."""
        b, n, c = x.shape
        s = n // frames
        qkv = self.qkv(x).reshape(b, frames, s, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 4, 1, 5).unbind(0)  # [B, S, H, T, D] views
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        out = frame_attention(q, k, v)  # [B, S, H, T, D] stored as [B, T, S, H, D]
        return self.proj(out.permute(0, 3, 1, 2, 4).reshape(b, n, c))


class CrossAttention(nn.Module):
    """Video tokens attend to the caption tokens of their own sample (q_linear / kv_linear / proj)."""

    def __init__(self, hidden: int, heads: int, operations=None, dtype=None, device=None):
        super().__init__()
        ops = ops_or_torch(operations)
        self.heads = heads
        self.head_dim = hidden // heads
        self.q_linear = ops.Linear(hidden, hidden, bias=True, dtype=dtype, device=device)
        self.kv_linear = ops.Linear(hidden, 2 * hidden, bias=True, dtype=dtype, device=device)
        self.proj = ops.Linear(hidden, hidden, bias=True, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: [B, N, C]; y: [B, M, C] embedded caption; mask: [B, M] (True/1 = real token) or None."""
        b, n, c = x.shape
        h, d = self.heads, self.head_dim
        q = self.q_linear(x).reshape(b, n, h, d).transpose(1, 2)
        k, v = self.kv_linear(y).reshape(b, -1, 2, h, d).permute(2, 0, 3, 1, 4)
        attn_mask = None
        if mask is not None:
            attn_mask = mask.to(device=x.device).bool().reshape(b, 1, 1, -1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class T2IFinalLayer(nn.Module):
    """PixArt-style final layer: LayerNorm, shift/scale from scale_shift_table + t, then the linear."""

    def __init__(self, hidden: int, num_patch: int, out_ch: int, operations=None, dtype=None, device=None):
        super().__init__()
        ops = ops_or_torch(operations)
        self.norm_final = ops.LayerNorm(hidden, elementwise_affine=False, eps=1e-6, dtype=dtype, device=device)
        self.linear = ops.Linear(hidden, num_patch * out_ch, bias=True, dtype=dtype, device=device)
        self.scale_shift_table = nn.Parameter(torch.zeros(2, hidden, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (cast_like(self.scale_shift_table, x)[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def unpatchify(x: torch.Tensor, grid, patch, out_ch: int, size) -> torch.Tensor:
    """[B, N_t * N_h * N_w, p_t * p_h * p_w * C] -> [B, C, T, H, W] cropped to the input size."""
    b = x.shape[0]
    nt, nh, nw = grid
    pt, ph, pw = patch
    x = x.reshape(b, nt, nh, nw, pt, ph, pw, out_ch)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, out_ch, nt * pt, nh * ph, nw * pw)
    t, h, w = size
    return x[:, :, :t, :h, :w]


def as_caption(context: torch.Tensor) -> torch.Tensor:
    """ComfyUI gives [B, M, C]; the official code [B, 1, M, C]."""
    return context.squeeze(1) if context.ndim == 4 else context


def match_batch(y: torch.Tensor, b: int) -> torch.Tensor:
    if y.shape[0] == b:
        return y
    if b % y.shape[0]:
        raise ValueError(f"caption batch {y.shape[0]} does not divide the video batch {b}")
    return y.repeat(b // y.shape[0], *([1] * (y.ndim - 1)))
