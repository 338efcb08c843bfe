"""Data passed between the quantize and GEMM kernels (shared by the torch reference and Triton)."""
from dataclasses import dataclass
from typing import Optional

import torch

# Largest magnitude of float8 e4m3fn: the per-token fp8 scale maps a token's abs-max onto it.
FP8_E4M3_MAX = 448.0
# A token whose abs-max is below this quantizes to zeros with a harmless non-zero scale.
SCALE_EPS = 1e-12
# Largest Hadamard block the fused quantize kernel transforms (triton_prologue_quant._fwht's stages).
MAX_FUSED_HAD = 512


@dataclass
class QuantizedActivation:
    """Activations quantized per token: x[m, :] ~= q[m, :] * scale[m]."""

    q: torch.Tensor  # [M, K] int8 (values in [-qmax, qmax]) or float8_e4m3fn
    scale: torch.Tensor  # [M] float32
    qsum: Optional[torch.Tensor] = None  # [M, K // sum_group] int32 sums of q (asymmetric weights need them)


@dataclass
class QuantizedWeight:
    """A weight stored quantized. W[n, k] ~= scale[n, g(k)] * (q[n, k] - zero[n, g(k)]).

    fmt:
      "int8": data int8 [N, K] (also used for 6-bit and lower: values stay in [-qmax, qmax])
      "int4": data uint8 [N, K // 2], two values per byte, offset-binary (value = nibble - 8), in one of two
              byte orders (`pack`):
                "pairs"   (files, the default): low nibble = column 2j, high nibble = column 2j+1;
                "split16" (in memory, K % 64 == 0; quant_linear.QuantLinear): within every 32 columns 32b..32b+31,
                          byte 16b+i holds column 32b+i (low nibble) and column 32b+16+i (high nibble), so that
                          the W4A8 GEMM's register unpack yields columns in natural order (kernels/triton_gemm.py)
      "fp8":  data float8_e4m3fn [N, K]
    group_size 0 means one scale per output channel (scale/zero shape [N]); otherwise [N, K // group_size].
    """

    data: torch.Tensor
    scale: torch.Tensor
    zero: Optional[torch.Tensor]
    fmt: str
    in_features: int
    group_size: int = 0
    pack: str = "pairs"

    @property
    def out_features(self) -> int:
        return self.data.shape[0]

    @property
    def fmt_tag(self) -> str:
        """fmt, with a non-default int4 byte order appended ("int4:split16"): one string for custom-op schemas."""
        return self.fmt if self.pack == "pairs" else f"{self.fmt}:{self.pack}"


INT4_PACKS = ("pairs", "split16")


def split_fmt_tag(tag: str):
    """(fmt, pack) of a QuantizedWeight.fmt_tag."""
    fmt, _, pack = tag.partition(":")
    pack = pack or "pairs"
    if pack not in INT4_PACKS or (pack != "pairs" and fmt != "int4"):
        raise ValueError(f"unknown weight format tag {tag!r}")
    return fmt, pack
