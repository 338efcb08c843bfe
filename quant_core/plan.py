"""Mixed-precision plans (the VIDITQ_PLAN type): per-layer bit widths for one model, shareable as JSON."""
import json
from dataclasses import dataclass, field
from typing import Dict

from .config import QuantConfig

PLAN_FORMAT = 1


@dataclass
class QuantPlan:
    fingerprint: Dict
    layers: Dict[str, Dict]  # layer name -> {"w_bits": 4|6|8|16, "a_bits": 8, ...} overrides of the preset
    base_preset: str = "w4a8"
    budget: Dict = field(default_factory=dict)  # what it was planned for and what it met
    info: Dict = field(default_factory=dict)

    def config_for(self, layer: str, base: QuantConfig) -> QuantConfig:
        """The base config with this layer's overrides (bits, group size, ...)."""
        over = self.layers.get(layer)
        return base.replace(**over) if over else base

    def to_json(self) -> str:
        return json.dumps({"format": PLAN_FORMAT, "fingerprint": self.fingerprint, "base_preset": self.base_preset,
                           "layers": self.layers, "budget": self.budget, "info": self.info}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "QuantPlan":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not a ViDiT-Q plan: invalid JSON ({e})") from None
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT or "layers" not in d:
            raise ValueError(f"not a ViDiT-Q plan of format {PLAN_FORMAT}")
        return cls(fingerprint=d.get("fingerprint", {}), layers=d["layers"], base_preset=d.get("base_preset", "w4a8"),
                   budget=d.get("budget", {}), info=d.get("info", {}))
