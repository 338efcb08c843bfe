"""OpenSORA rules: STDiT (1.0) and STDiT3 (1.2), official module names (models/opensora, nodes/opensora_*).

Quantized (per output channel, so the fused qkv needs no splitting), by group:
  self_attn     spatial self-attention: 1.0 `blocks.N.attn`, 1.2 `spatial_blocks.N.attn`
  temporal_attn temporal self-attention: 1.0 `blocks.N.attn_temp`, 1.2 `temporal_blocks.N.attn`
  cross_attn    cross-attention to the caption (q_linear, kv_linear, proj) in both block kinds
  mlp           fc1 / fc2 in both block kinds
Kept FP as the official ViDiT-Q configs do: x/t/y embedders (incl. the caption projection y_proj), the 1.2 fps
embedder, t_block (adaLN-single), the final layer; norms, scale-shift tables and RoPE have no GEMM.

Rule option `keep_text_kv_fp`: the cross-attention text K/V projection (`kv_linear`) reads the T5 caption,
whose few huge channels make per-token activation quantization coarse; it is the same for every step, so
keeping it FP costs little. The official OpenSORA configs quantize it (default False); PixArt-Σ's W8A8 config
keeps it FP. The option is set per model (`set_rule_options`, the OpenSORA loader's `text_kv` input) and is
part of the variant name, so a calibration made under the other setting is rejected by its fingerprint.
"""
from typing import Optional

import torch.nn as nn

from . import ArchRules

OPTION_ATTR = "viditq_keep_text_kv_fp"
_STDIT = r"blocks\.\d+"
_STDIT3 = r"(spatial_blocks|temporal_blocks)\.\d+"


def set_rule_options(model: nn.Module, keep_text_kv_fp: bool = False) -> None:
    """Attach the OpenSORA rule options to a diffusion model (read by detect())."""
    setattr(model, OPTION_ATTR, bool(keep_text_kv_fp))


def base_variant(model: nn.Module) -> Optional[str]:
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks) and all(
            hasattr(blocks[0], a) for a in ("attn", "attn_temp", "cross_attn", "mlp")):
        return "opensora_v1_0"
    sb, tb = getattr(model, "spatial_blocks", None), getattr(model, "temporal_blocks", None)
    if isinstance(sb, nn.ModuleList) and isinstance(tb, nn.ModuleList) and len(sb) and len(sb) == len(tb) and all(
            hasattr(sb[0], a) for a in ("attn", "cross_attn", "mlp")):
        return "opensora_v1_2"
    return None


def _detect(keep_kv_fp: bool):
    def detect(model: nn.Module) -> Optional[str]:
        variant = base_variant(model)
        if variant is None or bool(getattr(model, OPTION_ATTR, False)) != keep_kv_fp:
            return None
        return variant + ("+text_kv_fp" if keep_kv_fp else "")

    return detect


def _rules(keep_kv_fp: bool) -> ArchRules:
    cross = r"cross_attn\.(q_linear|proj)" if keep_kv_fp else r"cross_attn\.(q_linear|kv_linear|proj)"
    kept = ("x_embedder", "t_embedder", "fps_embedder", "t_block", "y_embedder", "final_layer")
    return ArchRules(
        family="opensora",
        quantized=(
            (_STDIT + r"\.attn\.(qkv|proj)", "self_attn"),
            (_STDIT + r"\.attn_temp\.(qkv|proj)", "temporal_attn"),
            (r"spatial_blocks\.\d+\.attn\.(qkv|proj)", "self_attn"),
            (r"temporal_blocks\.\d+\.attn\.(qkv|proj)", "temporal_attn"),
            (rf"({_STDIT}|{_STDIT3})\.{cross}", "cross_attn"),
            (rf"({_STDIT}|{_STDIT3})\.mlp\.(fc1|fc2)", "mlp"),
        ),
        kept_fp=kept + ((r"cross_attn.kv_linear",) if keep_kv_fp else ()),
        detect=_detect(keep_kv_fp),
    )


RULES = _rules(False)
RULES_TEXT_KV_FP = _rules(True)
