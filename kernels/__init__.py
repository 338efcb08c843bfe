"""Low-bit kernels behind one call per operation; Triton on CUDA, torch reference elsewhere."""
from . import reference
from .dispatch import BACKENDS, prologue_quant_linear, quant_linear, quantize_activation, resolve_backend
from .reference import block_hadamard, dequantize_weight, hadamard_matrix, pack_int4, unpack_int4
from .types import FP8_E4M3_MAX, MAX_FUSED_HAD, QuantizedActivation, QuantizedWeight

__all__ = [
    "BACKENDS", "FP8_E4M3_MAX", "MAX_FUSED_HAD", "QuantizedActivation", "QuantizedWeight", "block_hadamard",
    "dequantize_weight", "hadamard_matrix", "pack_int4", "prologue_quant_linear", "quant_linear",
    "quantize_activation", "reference", "resolve_backend", "unpack_int4",
]
