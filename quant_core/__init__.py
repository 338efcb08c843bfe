"""The ViDiT-Q method in plain torch: configs, quantizers, calibration, balancing, QuantLinear, rules, metrics."""
from .apply import build_quant_layers, describe_model, replace_layers
from .archs import UnsupportedModelError
from .calibration import BRANCH_NAMES, COND, UNCOND, CalibrationData, Calibrator
from .checkpoint import CheckpointError, load_quantized, read_quantized, save_quantized
from .config import PRESET_NAMES, PRESETS, QuantConfig, get_preset
from .fingerprint import FingerprintMismatch
from .fusions import fusion_patches, install_quant_layers
from .metrics import compare
from .plan import QuantPlan
from .planner import PlannerSettings, PlanResult, TorchRunner, allocate_bits, plan_mixed_precision
from .quant_linear import QuantLinear, RangeClock, TimestepSwitchLinear, range_clock_of

__all__ = [
    "BRANCH_NAMES", "COND", "CalibrationData", "Calibrator", "FingerprintMismatch", "PRESETS", "PRESET_NAMES",
    "QuantConfig", "QuantLinear", "QuantPlan", "UNCOND", "UnsupportedModelError", "build_quant_layers",
    "compare", "describe_model", "fusion_patches", "get_preset", "install_quant_layers", "replace_layers",
    "PlanResult", "PlannerSettings", "RangeClock", "TimestepSwitchLinear", "TorchRunner", "allocate_bits",
    "plan_mixed_precision", "range_clock_of",
    "CheckpointError", "load_quantized", "read_quantized", "save_quantized",
]
