"""Fuse the elementwise producers of quantized layers' inputs into their quantize kernel.

Per DiT block (PixArt-α/Σ, OpenSORA STDiT / STDiT3, ComfyUI's PixArt):
  * fc2's input GELU(fc1(x)): the MLP's `act` becomes Identity and fc2 applies the GELU in its quantize;
  * qkv's and fc1's input LayerNorm(x) * (1 + scale) + shift: the block arms the layer with shift / scale
    (models/fused_input.modulated_input) and passes the residual x; the layer normalizes, modulates and
    quantizes in one pass (kernels/triton_prologue_quant.py).
So neither the GELU output nor the modulated LayerNorm output is written to memory in bf16, and each is read once
(Inductor's own fusion of the same work read rows 2-3 times: bench/NOTES_e2e.md). Layers with dynamic scales and
symmetric int8 / fp8 / int4 weights fuse (QuantLinear.fusable), rotated ones too: the kernel applies the
block Hadamard after the smoothing vector (ViDiT-Q's full activation side in the one pass); the rest run as before.

The attention outputs' projections (attn.proj, cross_attn.proj) have no producer to fuse, but under torch.compile
their quantize also runs in our kernel ("none" prologue, 1.1x its byte floor against Inductor's 2.6-4.5x; the
PixArt step: 7.10 -> 6.59 ms at 512 px, bench/NOTES_e2e.md session 12). In eager they keep the plain path, whose
cached launch plan costs less host time. VIDITQ_FUSE_PLAIN=0 leaves them plain under compile too.

The blocks' gated residual adds after attn.proj, cross_attn.proj and mlp.fc2 (x + gate * y) run in those layers'
GEMM epilogue (models/fused_input.gated_residual arms them): the layer's output is not written on its own and no
elementwise kernel reads it back. VIDITQ_FUSE_RESIDUAL=0 turns that off.

VIDITQ_FUSE=0 turns this off (for A/B measurements and debugging). The numerics differ from the unfused path only
in not rounding the producer's output to bf16 before quantizing (the fused path is the more exact one).
"""
import os
from typing import Callable, Dict, Optional

import torch.nn as nn

from .quant_linear import QuantLinear

FUSE_ENV = "VIDITQ_FUSE"
FUSE_PLAIN_ENV = "VIDITQ_FUSE_PLAIN"
FUSE_RESIDUAL_ENV = "VIDITQ_FUSE_RESIDUAL"
_PLAIN_INPUTS = ("attn.proj", "cross_attn.proj")  # fed by attention: nothing to fuse in front of the quantize
_COMFY_PIXART_BLOCK = ("comfy.ldm.pixart.pixartms", "PixArtMSBlock")


def _env_flag(name: str, default: str) -> bool:
    v = os.environ.get(name, "").strip().lower() or default
    if v not in ("0", "1", "off", "on"):
        raise ValueError(f"{name} must be 0 or 1, got {v!r}")
    return v in ("1", "on")


def fusion_enabled() -> bool:
    return _env_flag(FUSE_ENV, "1")


def _gelu_kind(mlp: nn.Module) -> Optional[str]:
    """'gelu_tanh' / 'gelu' when mlp computes fc2(GELU(fc1(x))) with nothing else in between at inference."""
    act = getattr(mlp, "act", None)
    if type(act) is not nn.GELU:
        return None
    for extra in ("drop1", "norm", "drop"):  # timm / ComfyUI Mlp: Dropout / Identity there, no-ops at inference
        m = getattr(mlp, extra, None)
        if m is not None and not isinstance(m, (nn.Identity, nn.Dropout)):
            return None
    return "gelu_tanh" if act.approximate == "tanh" else "gelu"


def _plain_layernorm(norm: nn.Module) -> Optional[float]:
    """eps of a LayerNorm without affine weights over the last dim (what the kernel computes), else None."""
    if not isinstance(norm, nn.LayerNorm) or getattr(norm, "weight", None) is not None:
        return None
    if getattr(norm, "bias", None) is not None or len(norm.normalized_shape) != 1:
        return None
    return float(norm.eps)


def _is_comfy_pixart_block(block: nn.Module) -> bool:
    t = type(block)
    return (t.__module__, t.__name__) == _COMFY_PIXART_BLOCK


def _block_inputs(block: nn.Module):
    """(layer path, norm attribute) pairs of the block's modulated LayerNorm inputs, or ()."""
    spec = getattr(block, "fused_inputs", None)
    if spec is not None:
        return tuple(spec)
    if _is_comfy_pixart_block(block) and getattr(block.attn, "sr_ratio", 1) == 1:
        return (("attn.qkv", "norm1"), ("mlp.fc1", "norm2"))
    return ()


def _block_residuals(block: nn.Module):
    """Paths of the layers whose gated residual add the block's forward routes through gated_residual, or ()."""
    spec = getattr(block, "fused_residuals", None)
    if spec is not None:
        return tuple(spec)
    if _is_comfy_pixart_block(block) and getattr(block.attn, "sr_ratio", 1) == 1:
        return ("attn.proj", "cross_attn.proj", "mlp.fc2")  # as our forward below routes them
    return ()


def _only_dropout_after(block: nn.Module, rel: str) -> bool:
    """Is `rel` (attn.proj / cross_attn.proj / mlp.fc2) followed by nothing but Dropout / Identity in its module?"""
    owner = block.get_submodule(rel.rsplit(".", 1)[0])
    after = getattr(owner, "proj_drop" if rel.endswith("proj") else "drop2", None)
    return after is None or isinstance(after, (nn.Identity, nn.Dropout))


def fusion_patches(model: nn.Module, layers: Dict[str, nn.Module]) -> Dict[str, object]:
    """The patches {path: object} that fuse producers into the quantize of `layers` (new QuantLinear modules for
    `model`), and the blocks' gated residual adds into their GEMM epilogue: fused views of the layers
    (QuantLinear.fused_view; `layers` themselves are not changed), the MLPs' `act` -> Identity and, for ComfyUI's
    PixArt blocks, their `forward` (ComfyUI's own, with modulated_input and gated_residual). Install them together
    with `layers`, after them; empty when VIDITQ_FUSE=0."""
    if not fusion_enabled():
        return {}
    patches: Dict[str, object] = {}
    plain_on, residual_on = _env_flag(FUSE_PLAIN_ENV, "1"), _env_flag(FUSE_RESIDUAL_ENV, "1")
    for bname, block in model.named_modules():
        prefix = bname + "." if bname else ""
        views: Dict[str, dict] = {}  # layer path -> fused_view arguments

        def fusable(rel):
            layer = layers.get(prefix + rel)
            return isinstance(layer, QuantLinear) and layer.fusable()

        for rel, norm_attr in _block_inputs(block):
            eps = _plain_layernorm(getattr(block, norm_attr, None))
            if fusable(rel) and eps is not None:
                views.setdefault(rel, {})["norm_eps"] = eps
        kind = _gelu_kind(getattr(block, "mlp", None)) if fusable("mlp.fc2") else None
        if kind is not None:
            views.setdefault("mlp.fc2", {})["input_act"] = kind
            patches[prefix + "mlp.act"] = nn.Identity()
        if plain_on and _block_inputs(block):
            for rel in _PLAIN_INPUTS:
                if fusable(rel):
                    views.setdefault(rel, {}).setdefault("input_act", "none")
        if residual_on:
            for rel in _block_residuals(block):
                if fusable(rel) and _only_dropout_after(block, rel):
                    views.setdefault(rel, {})["residual"] = True
        for rel, kw in views.items():
            patches[prefix + rel] = layers[prefix + rel].fused_view(**kw)
        if views and _is_comfy_pixart_block(block):
            patches[prefix + "forward"] = _comfy_pixart_block_forward(block)
    return patches


def _comfy_pixart_block_forward(block: nn.Module) -> Callable:
    """ComfyUI's PixArtMSBlock.forward (comfy/ldm/pixart/pixartms.py) with the modulated inputs through
    modulated_input; a test checks it against the original on the real class."""
    from ..models import fused_input
    from ..models.fused_input import gated_residual, modulated_input

    def forward(x, y, t, mask=None, HW=None, **kwargs):
        x = fused_input.block_input(x)  # ComfyUI's patch embedding leaves x channel-strided
        b = x.shape[0]
        table = block.scale_shift_table[None].to(dtype=x.dtype, device=x.device)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (table + t.reshape(b, 6, -1)).chunk(6, 1)
        x = gated_residual(block.attn.proj, x, gate_msa, lambda h: block.attn(h, HW=HW),
                           modulated_input(block.attn.qkv, block.norm1, x, shift_msa, scale_msa))
        x = gated_residual(block.cross_attn.proj, x, None, block.cross_attn, x, y, mask)
        return gated_residual(block.mlp.fc2, x, gate_mlp, block.mlp,
                              modulated_input(block.mlp.fc1, block.norm2, x, shift_mlp, scale_mlp))

    forward.vidit_q_fused = True
    return forward


def install_quant_layers(model: nn.Module, layers: Dict[str, nn.Module]) -> Dict[str, object]:
    """Plain torch: swap `layers` into `model` with their fusions; returns what was replaced (replace_layers(model,
    old) restores the model, fusions included)."""
    from .apply import replace_layers

    return replace_layers(model, {**layers, **fusion_patches(model, layers)})
