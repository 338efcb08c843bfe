"""QuantConfig and the named presets (data in presets.json, not code)."""
import dataclasses
import json
import pathlib
from dataclasses import dataclass, field
from typing import Dict, List

_PRESETS_FILE = pathlib.Path(__file__).with_name("presets.json")

W_GRANULARITIES = ("channel", "group", "tensor")
A_GRANULARITIES = ("token", "tensor_static")
FORMATS = ("int", "fp8")
GROUP_SCALES = ("float", "int8")


@dataclass(frozen=True)
class QuantConfig:
    name: str = "custom"
    description: str = ""
    w_bits: int = 8  # 16 = keep the layer in floating point
    w_format: str = "int"
    w_granularity: str = "channel"
    w_group_size: int = 0
    w_symmetric: bool = True
    w_group_scale: str = "float"  # int4 groups: "float" scales, or "int8": two-level (quantizers.quantize_weight)
    a_bits: int = 8
    a_format: str = "int"
    a_granularity: str = "token"
    smooth: bool = False
    smooth_alpha: float = 0.5
    rotate: bool = False
    had_block: int = 128  # largest Hadamard block; the layer uses the largest power of two <= this dividing K
    seed: int = 0  # rotation signs are drawn from (seed, layer name): deterministic and saved with the model
    keep_fp: List[str] = field(default_factory=list)  # extra regexes of layer names kept in floating point

    def __post_init__(self):
        problems = []
        if self.w_bits not in (4, 6, 8, 16):
            problems.append(f"w_bits must be 4, 6, 8 or 16, got {self.w_bits}")
        if self.a_bits not in (4, 6, 8, 16):
            problems.append(f"a_bits must be 4, 6, 8 or 16, got {self.a_bits}")
        if self.w_format not in FORMATS or self.a_format not in FORMATS:
            problems.append(f"formats must be one of {FORMATS}")
        if "fp8" in (self.w_format, self.a_format) and (self.w_format, self.a_format, self.w_bits, self.a_bits) != (
                "fp8", "fp8", 8, 8):
            problems.append("fp8 is supported as W8A8 with both weights and activations in fp8")
        if self.w_granularity not in W_GRANULARITIES:
            problems.append(f"w_granularity must be one of {W_GRANULARITIES}")
        if self.w_granularity == "group" and self.w_group_size <= 0:
            problems.append("w_granularity 'group' needs w_group_size > 0")
        if self.w_group_scale not in GROUP_SCALES:
            problems.append(f"w_group_scale must be one of {GROUP_SCALES}")
        if self.w_group_scale == "int8" and (self.w_bits != 4 or self.w_format != "int"
                                             or self.w_granularity != "group"):
            problems.append("w_group_scale 'int8' (two-level group scales) is for int4 group-wise weights")
        if self.a_granularity not in A_GRANULARITIES:
            problems.append(f"a_granularity must be one of {A_GRANULARITIES}")
        if self.w_bits < 16 and self.a_bits == 16:
            problems.append("weight-only quantization is not supported: use a_bits 8")
        if problems:
            raise ValueError(f"invalid quantization config {self.name!r}: " + "; ".join(problems))

    @property
    def enabled(self) -> bool:
        return self.w_bits < 16

    def replace(self, **changes) -> "QuantConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict) -> "QuantConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown quantization config fields: {sorted(unknown)}")
        return cls(**d)


def load_presets() -> Dict[str, QuantConfig]:
    raw = json.loads(_PRESETS_FILE.read_text())
    return {name: QuantConfig.from_dict({"name": name, **fields}) for name, fields in raw.items()}


PRESETS: Dict[str, QuantConfig] = load_presets()
PRESET_NAMES = list(PRESETS)


def get_preset(name: str) -> QuantConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available presets: {', '.join(PRESET_NAMES)}")
    return PRESETS[name]
