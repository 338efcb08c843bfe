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

    gparam (int4 only, "two-level" group scales as in QServe's progressive group quantization): uint8
    [N, K // group_size], high nibble = group scale s2 - 1 (s2 in 1..16), low nibble = group zero z (0..15); scale is
    then per output channel [N] and zero None: W[n, k] = scale[n] * s2[n, g] * (q[n, k] - z[n, g]), where q is the
    stored nibble (0..15, i.e. code + 8) and every s2 * (q - z) lies in [-128, 127]. The W4A8 GEMM then turns each
    nibble into that int8 value in registers and accumulates all of K in one int32 sum, as for per-channel weights
    (float group scales make it rescale a partial sum after every group).
    """

    data: torch.Tensor
    scale: torch.Tensor
    zero: Optional[torch.Tensor]
    fmt: str
    in_features: int
    group_size: int = 0
    pack: str = "pairs"
    gparam: Optional[torch.Tensor] = None

    @property
    def out_features(self) -> int:
        return self.data.shape[0]

    @property
    def fmt_tag(self) -> str:
        """fmt, with a non-default int4 byte order appended ("int4:split16"): one string for custom-op schemas."""
        return self.fmt if self.pack == "pairs" else f"{self.fmt}:{self.pack}"


INT4_PACKS = ("pairs", "split16")
# two-level int4: the first level's int8 range; 119 (not 127) leaves room for the second level's rounding, so that
# s2 * (q - z) stays within int8 for almost every weight (the quantizer clamps the rest)
GPARAM_QMAX = 119


def split_gparam(gparam: torch.Tensor):
    """(s2, z) int32 tensors of a QuantizedWeight.gparam."""
    p = gparam.to(torch.int32)
    return (p >> 4) + 1, p & 15


def make_gparam(s2: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """uint8 gparam from group scales s2 (1..16) and zeros z (0..15)."""
    if bool(((s2 < 1) | (s2 > 16) | (z < 0) | (z > 15)).any()):
        raise ValueError("two-level int4 group scales must lie in 1..16 and zeros in 0..15")
    return (((s2.to(torch.int32) - 1) << 4) | z.to(torch.int32)).to(torch.uint8)


def split_fmt_tag(tag: str):
    """(fmt, pack) of a QuantizedWeight.fmt_tag."""
    fmt, _, pack = tag.partition(":")
    pack = pack or "pairs"
    if pack not in INT4_PACKS or (pack != "pairs" and fmt != "int4"):
        raise ValueError(f"unknown weight format tag {tag!r}")
    return fmt, pack
