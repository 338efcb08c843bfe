"""Quantized attention as a model option (beyond the ViDiT-Q paper): modes, dispatch, and the hooks into PixArt.

Modes (the ViDiTQQuantize `attention` input):
  off   the model's own attention (SDPA / ComfyUI's optimized attention), bf16 / fp16;
  fp8   Q K^T in fp8 e4m3 (Q per token, K per block of keys), softmax in fp32, P V in fp8 (V per channel);
  int8  Q K^T in int8 (same scales), softmax in fp32, P V in bf16 (works from Ampere on).
The kernel is kernels/triton_attention.py (CUDA); elsewhere its torch twin kernels/reference_attention.py runs the
same quantization (slow, for CPU runs and tests).

Hooks: the plain-torch PixArt (models/pixart.py) takes an `attn_fn` on its attention modules
(`set_pixart_attention`). ComfyUI's PixArt calls `optimized_attention(...)` without `transformer_options`, so
ComfyUI's `optimized_attention_override` hook never reaches it; instead `attention_forward_patches` gives
per-module `forward` replacements (ComfyUI object patches on the MODEL clone, so the input MODEL is untouched) that
run the module's own (possibly quantized) linears around the quantized attention.
"""
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from ..kernels import dispatch as kernels_dispatch
from ..kernels.dispatch import ATTENTION_BLOCK_N

ATTENTION_MODES = ("off", "fp8", "int8")
KERNEL_BLOCK_N = ATTENTION_BLOCK_N  # key block of the torch twin (the CUDA kernel tunes its own: 64 or 128)


def quantized_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str, backend: str = "auto"
                        ) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with quantized products. q [B, H, Nq, D], k/v [B, H, Nk, D] -> [B, H, Nq, D].

    Under torch.compile this is one opaque custom op (viditq::quantized_attention, kernels/custom_ops.py): the
    attention forwards below trace without graph breaks."""
    if mode not in ATTENTION_MODES or mode == "off":
        raise ValueError(f"quantized attention mode must be one of {ATTENTION_MODES[1:]}, got {mode!r}")
    return kernels_dispatch.quantized_attention(q, k, v, mode, backend)


def make_attention_fn(mode: str, backend: str = "auto") -> Optional[Callable]:
    """fn(q, k, v) -> out for `mode` ([B, H, N, D] in and out), or None for 'off'."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"unknown attention mode {mode!r}; expected one of {ATTENTION_MODES}")
    if mode == "off":
        return None

    def attn(q, k, v):
        return quantized_attention(q, k, v, mode, backend)

    attn.vidit_q_attention = mode
    return attn


def set_pixart_attention(model: nn.Module, mode: str, backend: str = "auto") -> int:
    """Plain-torch PixArt (models/pixart.py): route every attention module through `mode` ('off' restores SDPA).
    Returns the number of attention modules set."""
    fn = make_attention_fn(mode, backend)
    n = 0
    for m in model.modules():
        if hasattr(type(m), "attn_fn"):
            m.attn_fn = fn
            n += 1
    if n == 0:
        raise ValueError("this model has no attention hook (expected the PixArt of models/pixart.py)")
    return n


def _self_attention_forward(module: nn.Module, attn: Callable) -> Callable:
    """forward(x, mask=None, HW=None, block_id=None) of ComfyUI's AttentionKVCompress with `attn` inside."""
    cls_forward = type(module).forward

    def forward(x, mask=None, HW=None, block_id=None, **kwargs):
        if mask is not None or getattr(module, "sr_ratio", 1) > 1 or kwargs:  # KV compression / masks: as is
            return cls_forward(module, x, mask=mask, HW=HW, block_id=block_id, **kwargs)
        b, n, c = x.shape
        heads = module.num_heads
        q, k, v = module.qkv(x).reshape(b, n, 3, c).unbind(2)
        q, k = module.q_norm(q), module.k_norm(k)
        q, k, v = (t.reshape(b, n, heads, c // heads).transpose(1, 2) for t in (q, k, v))
        out = attn(q, k, v)
        return module.proj(out.transpose(1, 2).reshape(b, n, c))

    forward.vidit_q_attention = getattr(attn, "vidit_q_attention", True)
    return forward


def _cross_attention_forward(module: nn.Module, attn: Callable) -> Callable:
    """forward(x, cond, mask=None) of ComfyUI's MultiHeadCrossAttention with `attn` inside."""
    cls_forward = type(module).forward

    def forward(x, cond, mask=None, **kwargs):
        if mask is not None or kwargs:
            return cls_forward(module, x, cond, mask=mask, **kwargs)
        b, n, c = x.shape
        heads, d = module.num_heads, c // module.num_heads
        q = module.q_linear(x).reshape(b, n, heads, d).transpose(1, 2)
        k, v = module.kv_linear(cond).reshape(cond.shape[0], -1, 2, heads, d).permute(2, 0, 3, 1, 4)
        out = attn(q, k, v)
        y = module.proj(out.transpose(1, 2).reshape(b, n, c))
        drop = getattr(module, "proj_drop", None)
        return drop(y) if drop is not None else y

    forward.vidit_q_attention = getattr(attn, "vidit_q_attention", True)
    return forward


def attention_forward_patches(diffusion_model: nn.Module, mode: str, backend: str = "auto"
                              ) -> Dict[str, Callable]:
    """{'blocks.i.attn.forward': fn, 'blocks.i.cross_attn.forward': fn, ...} for ComfyUI's PixArt (PixArtMS):
    object patches that run the quantized attention; empty for mode 'off'."""
    attn = make_attention_fn(mode, backend)
    if attn is None:
        return {}
    patches = {}
    for name, m in diffusion_model.named_modules():
        if hasattr(m, "qkv") and hasattr(m, "proj") and hasattr(m, "num_heads") and hasattr(m, "q_norm"):
            patches[name + ".forward"] = _self_attention_forward(m, attn)
        elif hasattr(m, "q_linear") and hasattr(m, "kv_linear") and hasattr(m, "num_heads"):
            patches[name + ".forward"] = _cross_attention_forward(m, attn)
    if not patches:
        raise ValueError("quantized attention: no PixArt attention modules found in this model "
                         "(expected ComfyUI's AttentionKVCompress / MultiHeadCrossAttention)")
    return patches
