"""Quantize a DiT: build QuantLinear modules for the layers its architecture rules select."""
import json
import logging
import re
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch.nn as nn

from .archs import Lookup, find_rules, quantizable_layers
from .calibration import CalibrationData
from .config import QuantConfig
from .fingerprint import check_fingerprint, model_fingerprint
from .plan import QuantPlan
from .quant_linear import QuantLinear, RangeClock, TimestepSwitchLinear

log = logging.getLogger("vidit_q")


def describe_model(model: nn.Module, lookup: Optional[Lookup] = None) -> Tuple[object, str, "OrderedDict", Dict]:
    """(rules, variant, quantizable layers, fingerprint) of a diffusion model; raises for unsupported models."""
    rules, variant = find_rules(model)
    layers = quantizable_layers(model, rules, lookup)
    return rules, variant, layers, model_fingerprint(model, rules, variant, lookup)


def build_quant_layers(model: nn.Module, config: QuantConfig, calib: Optional[CalibrationData] = None,
                       plan: Optional[QuantPlan] = None, backend: str = "auto", lookup: Optional[Lookup] = None
                       ) -> Tuple["OrderedDict[str, QuantLinear]", Dict]:
    """QuantLinear for every selected layer of `model` (the model itself is not modified) and a summary."""
    _, variant, layers, fingerprint = describe_model(model, lookup)
    if calib is not None:
        check_fingerprint(calib.fingerprint, fingerprint, "calibration")
    if plan is not None:
        check_fingerprint(plan.fingerprint, fingerprint, "mixed-precision plan")
        unknown = set(plan.layers) - set(layers)
        if unknown:
            raise ValueError(f"the plan names layers this model does not have: {sorted(unknown)[:3]}")
    notes = []
    if config.smooth and calib is None:
        notes.append("no calibration given: static smoothing skipped (dynamic per-token quantization with the "
                     "data-free Hadamard rotation only); connect a ViDiTQCalibrate output for full ViDiT-Q")
    out: "OrderedDict[str, QuantLinear]" = OrderedDict()
    bits: Dict[str, float] = {}
    params: Dict[str, int] = {}
    fp_bytes = q_bytes = 0
    # per-timestep-range plans: layers whose bits change with the timestep share one clock (set by the sampler)
    clock = RangeClock(plan.timestep_ranges, plan.num_timesteps) if plan is not None and plan.range_layers else None
    for name, (linear, group) in layers.items():
        cfg = plan.config_for(name, config) if plan is not None else config
        range_cfgs = plan.range_configs(name, config) if plan is not None else None
        if range_cfgs is not None:
            q, bits[name] = _switch_layer(linear, name, range_cfgs, calib, backend, clock)
        else:
            if not cfg.enabled or any(re.fullmatch(p, name) for p in cfg.keep_fp):
                continue
            absmax = calib.channel_absmax(name) if calib is not None else None
            q = QuantLinear.from_linear(linear, name, cfg, absmax, backend)
            bits[name] = cfg.w_bits
        q.meta["group"] = group
        out[name] = q
        params[name] = linear.weight.numel()
        fp_bytes += linear.weight.numel() * 2
        q_bytes += q.weight_bytes()
    for n in notes:
        log.warning("ViDiT-Q: %s", n)
    summary = {
        "preset": config.name,
        "variant": variant,
        "plan": None if plan is None else {"base_preset": plan.base_preset, "budget": plan.budget,
                                           "timestep_ranges": plan.timestep_ranges,
                                           "layers_switching_by_timestep": len(plan.range_layers)},
        "calibrated": calib is not None,
        "layers_quantized": len(out),
        "layers_kept_fp": len(layers) - len(out),
        "mean_weight_bits": (sum(bits.values()) / len(bits)) if bits else 16.0,
        "param_weighted_weight_bits": (sum(bits[n] * params[n] for n in bits) / sum(params.values())) if bits
        else 16.0,
        "weight_bytes_fp16": fp_bytes,
        "weight_bytes_quantized": q_bytes,
        "fingerprint": fingerprint,
        "notes": notes,
    }
    return out, summary


def _switch_layer(linear: nn.Linear, name: str, configs, calib: Optional[CalibrationData], backend: str,
                  clock: "RangeClock") -> Tuple[TimestepSwitchLinear, float]:
    """One kernel-path variant per distinct config of the layer's timestep ranges, switched by the clock."""
    variants, index, choice = [], {}, []
    for cfg in configs:
        key = json.dumps(cfg.to_dict(), sort_keys=True)
        if key not in index:
            index[key] = len(variants)
            if not cfg.enabled or any(re.fullmatch(p, name) for p in cfg.keep_fp):
                variants.append(linear)  # floating point in this range
            else:
                absmax = calib.channel_absmax(name) if calib is not None else None
                variants.append(QuantLinear.from_linear(linear, name, cfg, absmax, backend))
        choice.append(index[key])
    switch = TimestepSwitchLinear(variants, choice, clock, name)
    switch.meta.update(name=name, w_bits_by_range=[c.w_bits if c.enabled else 16 for c in configs])
    mean_bits = sum(switch.meta["w_bits_by_range"]) / len(configs)
    return switch, mean_bits


def replace_layers(model: nn.Module, new_layers: Dict[str, nn.Module]) -> Dict[str, nn.Module]:
    """Swap modules in place (for plain-torch use); returns the modules replaced, to restore them. Every name is
    resolved before anything is swapped, so a name that is not in the model leaves the model as it was."""
    targets = []
    for name, module in new_layers.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if not hasattr(parent, attr):
            raise AttributeError(f"{type(model).__name__} has no '{name}': these layers were made for another model")
        targets.append((name, parent, attr, module))
    old = {}
    for name, parent, attr, module in targets:
        old[name] = getattr(parent, attr)
        setattr(parent, attr, module)
    return old
