"""Model fingerprints: every artifact (calibration, plan, quantized model) names the model it was made for."""
import hashlib
import json
from typing import Dict, Optional

import torch
import torch.nn as nn

from .archs import ArchRules, Lookup, quantizable_layers


class FingerprintMismatch(ValueError):
    pass


def model_fingerprint(model: nn.Module, rules: ArchRules, variant: str, lookup: Optional[Lookup] = None) -> Dict:
    """Architecture, layer shapes and a hash of a fixed sample of each quantizable weight."""
    layers = quantizable_layers(model, rules, lookup)
    shapes = [(name, list(m.weight.shape)) for name, (m, _) in layers.items()]
    h = hashlib.sha256()
    with torch.no_grad():
        for _, (m, _) in layers.items():
            flat = m.weight.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu()
            h.update(sample.numpy().tobytes())
    return {
        "family": rules.family,
        "variant": variant,
        "layers": hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16],
        "num_layers": len(shapes),
        "weights": h.hexdigest()[:16],
    }


def check_fingerprint(expected: Dict, actual: Dict, what: str) -> None:
    """Raise a clear error when an artifact was made for another model."""
    if not expected:
        raise FingerprintMismatch(f"the {what} carries no model fingerprint; recreate it with this version")
    if expected.get("family") != actual.get("family") or expected.get("layers") != actual.get("layers"):
        raise FingerprintMismatch(
            f"the {what} was made for another model architecture ({expected.get('variant')}, "
            f"{expected.get('num_layers')} quantizable layers) but this model is {actual.get('variant')} with "
            f"{actual.get('num_layers')}; run it again on this model"
        )
    if expected.get("weights") != actual.get("weights"):
        raise FingerprintMismatch(
            f"the {what} was made for a different checkpoint of the same architecture ({actual.get('variant')}); "
            "its statistics do not apply to these weights: run it again on this model"
        )
