"""Architecture rules: which linears of a DiT are quantized, which stay FP, and each layer's group.

A new DiT family is one new rules module registered in FAMILIES.
"""
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch.nn as nn

GROUPS = ("self_attn", "cross_attn", "temporal_attn", "mlp")


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class ArchRules:
    family: str
    # (regex on the module name inside the diffusion model, group); the first match wins
    quantized: Tuple[Tuple[str, str], ...]
    # the module names that must stay floating point, for the docs and the error messages
    kept_fp: Tuple[str, ...]
    # model -> variant name (e.g. "pixart_sigma") or None when the model is not of this family
    detect: Callable[[nn.Module], Optional[str]]

    def group_of(self, name: str) -> Optional[str]:
        for pattern, group in self.quantized:
            if re.fullmatch(pattern, name):
                return group
        return None


def _families() -> List[ArchRules]:
    from . import opensora, pixart

    # OpenSORA first: an STDiT 1.0 also has PixArt's blocks.N.attn / cross_attn / mlp (plus attn_temp)
    return [opensora.RULES, opensora.RULES_TEXT_KV_FP, pixart.RULES]


def find_rules(model: nn.Module) -> Tuple[ArchRules, str]:
    """The rules and variant for a diffusion model; a clear error for anything we do not support."""
    for rules in _families():
        variant = rules.detect(model)
        if variant:
            return rules, variant
    supported = ", ".join(dict.fromkeys(r.family for r in _families()))
    raise UnsupportedModelError(
        f"ViDiT-Q does not support this model ({type(model).__name__}); supported DiT families: {supported}. "
        "Load a PixArt-α/Σ checkpoint with the UNETLoader (and the T5 text encoder with CLIPLoader type 'pixart'), "
        "or an OpenSORA 1.0/1.2 checkpoint with the ViDiT-Q OpenSORA Loader."
    )


Lookup = Callable[[str, nn.Module], nn.Module]


def quantizable_layers(model: nn.Module, rules: ArchRules, lookup: Optional[Lookup] = None
                       ) -> "OrderedDict[str, Tuple[nn.Linear, str]]":
    """name -> (linear module, group) for every linear the rules quantize, in model order.

    lookup(name, module) may return the original module where a wrapper (e.g. ComfyUI's object patch of
    another quantized clone) currently stands in the tree.
    """
    out: Dict[str, Tuple[nn.Linear, str]] = OrderedDict()
    for name, module in model.named_modules():
        group = rules.group_of(name)
        if group is not None and lookup is not None:
            module = lookup(name, module)
        if group is not None and isinstance(module, nn.Linear):
            out[name] = (module, group)
    if not out:
        raise UnsupportedModelError(f"no quantizable linear layers found for family {rules.family}")
    return out
