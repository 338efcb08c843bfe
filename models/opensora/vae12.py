"""OpenSORA 1.2 video VAE, temporal half (`VAE_Temporal_SD`), in plain torch with the official key layout.

The 1.2 VAE is a pipeline: a per-frame SDXL VAE (`spatial_vae.module.*`, diffusers layout; latents x 0.18215 as
OpenSORA's VideoAutoencoderKL scales them) followed by a causal 3-D conv VAE over time (`temporal_vae.*`,
MAGVIT-v2 style) that turns every 17 frames of spatial latents into 5, then (z - shift) / scale per channel.
This module is the temporal half; nodes/opensora_comfy.py puts it behind a ComfyUI VAE together with
ComfyUI's own SD/SDXL VAE for the spatial half.

Causal convolutions pad only the past (time_pad = k_t - 1 zeros in front) and pad space symmetrically;
upsampling in time is a conv to t_stride x channels followed by depth-to-time. Decoding a chunk of r latent
frames gives 4 r frames, of which the first (4 - n % 4) % 4 are the encoder's front padding of an n-frame clip
and are dropped. Nothing here imports ComfyUI.
"""
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

MICRO_FRAMES = 17  # pixel frames per temporal-VAE chunk
MICRO_LATENT = 5  # latent frames per chunk
SPATIAL_SCALE = 0.18215  # OpenSORA's VideoAutoencoderKL scale, also for the SDXL VAE of 1.2
SHIFT = (-0.10, 0.34, 0.27, 0.98)
SCALE = (3.85, 2.32, 2.33, 3.06)


class CausalConv3d(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel=3, stride=(1, 1, 1), bias=True):
        super().__init__()
        kernel = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
        kt, kh, kw = kernel
        self.pad = (kw // 2, kw // 2, kh // 2, kh // 2, kt - 1 + (1 - stride[0]), 0)
        self.conv = nn.Conv3d(c_in, c_out, kernel, stride=stride, bias=bias)

    def forward(self, x):
        return self.conv(F.pad(x, self.pad))


class ResBlock3d(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int = 32):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = CausalConv3d(c_in, c_out, 3, bias=False)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = CausalConv3d(c_out, c_out, 3, bias=False)
        self.conv3 = CausalConv3d(c_in, c_out, 1, bias=False) if c_in != c_out else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.conv3 is None else self.conv3(x))


class TemporalEncoder(nn.Module):
    def __init__(self, channels=4, latent=8, filters=128, blocks=4, mults=(1, 2, 2, 4),
                 time_down=(False, True, True), groups=32):
        super().__init__()
        self.blocks, self.time_down = blocks, tuple(time_down)
        self.conv_in = CausalConv3d(channels, filters, 3, bias=False)
        self.block_res_blocks = nn.ModuleList()
        self.conv_blocks = nn.ModuleList()
        prev = filters
        for i, m in enumerate(mults):
            f = filters * m
            items = nn.ModuleList()
            for _ in range(blocks):
                items.append(ResBlock3d(prev, f, groups))
                prev = f
            self.block_res_blocks.append(items)
            if i < len(mults) - 1:
                self.conv_blocks.append(CausalConv3d(prev, f, 3, stride=(2, 1, 1)) if self.time_down[i]
                                        else nn.Identity())
                prev = f
        self.res_blocks = nn.ModuleList(ResBlock3d(prev, f, groups) for _ in range(blocks))
        self.norm1 = nn.GroupNorm(groups, f)
        self.conv2 = CausalConv3d(f, latent, 1)

    def forward(self, x):
        x = self.conv_in(x)
        for i, items in enumerate(self.block_res_blocks):
            for block in items:
                x = block(x)
            if i < len(self.conv_blocks):
                x = self.conv_blocks[i](x)
        for block in self.res_blocks:
            x = block(x)
        return self.conv2(F.silu(self.norm1(x)))


class TemporalDecoder(nn.Module):
    def __init__(self, channels=4, latent=4, filters=128, blocks=4, mults=(1, 2, 2, 4),
                 time_down=(False, True, True), groups=32):
        super().__init__()
        self.time_down = tuple(time_down)
        f = filters * mults[-1]
        self.conv1 = CausalConv3d(latent, f, 3)
        self.res_blocks = nn.ModuleList(ResBlock3d(f, f, groups) for _ in range(blocks))
        levels, ups = [], []
        prev = f
        for i in reversed(range(len(mults))):
            f = filters * mults[i]
            items = nn.ModuleList()
            for _ in range(blocks):
                items.append(ResBlock3d(prev, f, groups))
                prev = f
            levels.insert(0, items)
            if i > 0:
                ups.insert(0, CausalConv3d(prev, prev * 2, 3) if self.time_down[i - 1] else nn.Identity())
        self.block_res_blocks = nn.ModuleList(levels)
        self.conv_blocks = nn.ModuleList(ups)
        self.norm1 = nn.GroupNorm(groups, prev)
        self.conv_out = CausalConv3d(f, channels, 3)

    def forward(self, z):
        x = self.conv1(z)
        for block in self.res_blocks:
            x = block(x)
        for i in reversed(range(len(self.block_res_blocks))):
            for block in self.block_res_blocks[i]:
                x = block(x)
            if i > 0:
                x = self.conv_blocks[i - 1](x)
                if self.time_down[i - 1]:  # depth to time: channel c * 2 + k -> frame t * 2 + k
                    b, c2, t, h, w = x.shape
                    x = x.reshape(b, c2 // 2, 2, t, h, w).permute(0, 1, 3, 2, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)
        return self.conv_out(F.silu(self.norm1(x)))


class TemporalVAE(nn.Module):
    """VAE_Temporal_SD: keys encoder.*, quant_conv.conv.*, post_quant_conv.conv.*, decoder.*."""

    def __init__(self, channels=4, latent=4, filters=128, blocks=4, mults=(1, 2, 2, 4),
                 time_down=(False, True, True), groups=32, encoder=True):
        super().__init__()
        self.time_factor = 2 ** sum(time_down)
        if encoder:
            self.encoder = TemporalEncoder(channels, 2 * latent, filters, blocks, mults, time_down, groups)
            self.quant_conv = CausalConv3d(2 * latent, 2 * latent, 1)
        self.post_quant_conv = CausalConv3d(latent, latent, 1)
        self.decoder = TemporalDecoder(channels, latent, filters, blocks, mults, time_down, groups)

    def front_padding(self, frames: int) -> int:
        return (self.time_factor - frames % self.time_factor) % self.time_factor

    def decode(self, z: torch.Tensor, frames: int) -> torch.Tensor:
        """Latent chunk [B, 4, r, H, W] -> spatial latents of `frames` frames [B, 4, frames, H, W]."""
        x = self.decoder(self.post_quant_conv(z))
        return x[:, :, self.front_padding(frames):]

    def encode(self, x: torch.Tensor, sample: bool = False, generator: Optional[torch.Generator] = None):
        """Spatial latents [B, 4, n, H, W] -> [B, 4, ceil(n / 4), H, W] (posterior mean unless sample=True)."""
        if not hasattr(self, "encoder"):
            raise RuntimeError("this temporal VAE was built without its encoder")
        x = F.pad(x, (0, 0, 0, 0, self.front_padding(x.shape[2]), 0))
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        if not sample:
            return mean
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        return mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)


def chunk_frames(latent_frames: int) -> Sequence[int]:
    """Pixel frames of each 5-latent-frame chunk: 17 per full chunk; a partial chunk of r latent frames gives
    4 r - 3 frames (the same front padding as a full chunk, and 1 frame for a 1-latent-frame image)."""
    full, rest = divmod(latent_frames, MICRO_LATENT)
    return [MICRO_FRAMES] * full + ([4 * rest - 3] if rest else [])


def decode_latents(temporal: TemporalVAE, z: torch.Tensor) -> torch.Tensor:
    """Normalised DiT latents [B, 4, T, H, W] -> spatial (SDXL-VAE, x 0.18215) latents [B, 4, frames, H, W]."""
    outs, start = [], 0
    for frames in chunk_frames(z.shape[2]):
        r = (frames + temporal.front_padding(frames)) // temporal.time_factor
        outs.append(temporal.decode(z[:, :, start:start + r], frames))
        start += r
    return torch.cat(outs, dim=2)


def temporal_config_from_state_dict(sd: Dict[str, torch.Tensor], prefix: str = "") -> Dict:
    """Constructor arguments of TemporalVAE from its keys (official: filters 128, 4 blocks, mults 1,2,2,4)."""
    filters = sd[prefix + "decoder.conv_out.conv.weight"].shape[1]
    latent = sd[prefix + "decoder.conv1.conv.weight"].shape[1]
    channels = sd[prefix + "decoder.conv_out.conv.weight"].shape[0]
    levels = sorted({int(k[len(prefix):].split(".")[2]) for k in sd
                     if k.startswith(prefix + "decoder.block_res_blocks.")})
    mults = []
    for i in levels:
        w = sd[f"{prefix}decoder.block_res_blocks.{i}.0.conv1.conv.weight"]
        mults.append(w.shape[0] // filters)
    blocks = len({k[len(prefix):].split(".")[2] for k in sd if k.startswith(prefix + "decoder.res_blocks.")})
    time_down = tuple(f"{prefix}decoder.conv_blocks.{i}.conv.weight" in sd for i in range(len(mults) - 1))
    groups = 32 if filters % 32 == 0 else max(1, filters // 4)
    return dict(channels=channels, latent=latent, filters=filters, blocks=blocks, mults=tuple(mults),
                time_down=time_down, groups=groups, encoder=(prefix + "encoder.conv_in.conv.weight") in sd)
