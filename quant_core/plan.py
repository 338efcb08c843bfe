"""Mixed-precision plans (the VIDITQ_PLAN type): per-layer bit widths for one model, shareable as JSON."""
import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .config import QuantConfig

PLAN_FORMAT = 1


@dataclass
class QuantPlan:
    fingerprint: Dict
    layers: Dict[str, Dict]  # layer name -> {"w_bits": 4|6|8|16, "a_bits": 8, ...} overrides of the preset
    base_preset: str = "w4a8"
    budget: Dict = field(default_factory=dict)  # what it was planned for and what it met
    info: Dict = field(default_factory=dict)
    # Per-timestep-range plans: the model's timestep axis [0, num_timesteps) is cut into `timestep_ranges` equal
    # ranges (range 0 = the cleanest, as calibration buckets); range_layers[layer][r] overrides `layers` there.
    timestep_ranges: int = 1
    range_layers: Dict[str, List[Dict]] = field(default_factory=dict)
    num_timesteps: float = 1000.0

    def __post_init__(self):
        if self.timestep_ranges < 1:
            raise ValueError("a plan needs timestep_ranges >= 1")
        bad = [n for n, per in self.range_layers.items() if len(per) != self.timestep_ranges]
        if bad:
            raise ValueError(f"plan layer {bad[0]!r} lists {len(self.range_layers[bad[0]])} timestep ranges, "
                             f"expected {self.timestep_ranges}")

    def config_for(self, layer: str, base: QuantConfig, time_range: Optional[int] = None) -> QuantConfig:
        """The base config with this layer's overrides (bits, group size, ...), in one timestep range if given."""
        over = dict(self.layers.get(layer) or {})
        if time_range is not None and layer in self.range_layers:
            over.update(self.range_layers[layer][time_range])
        return base.replace(**over) if over else base

    def range_configs(self, layer: str, base: QuantConfig) -> Optional[List[QuantConfig]]:
        """One config per timestep range for a layer whose bits change with the timestep, else None."""
        if layer not in self.range_layers:
            return None
        return [self.config_for(layer, base, r) for r in range(self.timestep_ranges)]

    def to_json(self) -> str:
        return json.dumps({"format": PLAN_FORMAT, "fingerprint": self.fingerprint, "base_preset": self.base_preset,
                           "layers": self.layers, "timestep_ranges": self.timestep_ranges,
                           "num_timesteps": self.num_timesteps, "range_layers": self.range_layers,
                           "budget": self.budget, "info": self.info}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "QuantPlan":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not a ViDiT-Q plan: invalid JSON ({e})") from None
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT or "layers" not in d:
            raise ValueError(f"not a ViDiT-Q plan of format {PLAN_FORMAT}")
        return cls(fingerprint=d.get("fingerprint", {}), layers=d["layers"], base_preset=d.get("base_preset", "w4a8"),
                   budget=d.get("budget", {}), info=d.get("info", {}),
                   timestep_ranges=int(d.get("timestep_ranges", 1)), range_layers=d.get("range_layers", {}),
                   num_timesteps=float(d.get("num_timesteps", 1000.0)))
