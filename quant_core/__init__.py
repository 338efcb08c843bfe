"""The ViDiT-Q method in plain torch: configs, quantizers, calibration, balancing, QuantLinear, rules, metrics."""
from .apply import build_quant_layers, describe_model, replace_layers
from .archs import UnsupportedModelError
from .calibration import BRANCH_NAMES, COND, UNCOND, CalibrationData, Calibrator
from .config import PRESET_NAMES, PRESETS, QuantConfig, get_preset
from .fingerprint import FingerprintMismatch
from .metrics import compare
from .plan import QuantPlan
from .quant_linear import QuantLinear

__all__ = [
    "BRANCH_NAMES", "COND", "CalibrationData", "Calibrator", "FingerprintMismatch", "PRESETS", "PRESET_NAMES",
    "QuantConfig", "QuantLinear", "QuantPlan", "UNCOND", "UnsupportedModelError", "build_quant_layers",
    "compare", "describe_model", "get_preset", "replace_layers",
]
