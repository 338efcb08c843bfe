"""QuantLinear: a linear layer whose weight is stored quantized, run through the kernels.

forward: x -> (fused) x * mult -> block Hadamard -> per-token quantize -> low-bit GEMM -> dequant + bias.
Smoothing and rotation are folded into the stored weight at construction; `mult` carries the activation side.
With simulate=True (fake quant, for research and sensitivity sweeps) the same math runs in float through the
torch reference with a cached dequantized weight.
"""
import copy
import os
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..kernels.reference import dequantize_weight, repack_int4
from ..kernels.types import INT4_PACKS, QuantizedWeight
from .balancing import balance, balance_activation, hadamard_block_for, rotation_signs, smoothing_vector
from .calibration import bucket_of
from .config import QuantConfig
from .quantizers import fake_quantize_activation, quantize_weight


W4_PACK_ENV = "VIDITQ_W4_PACK"  # split16 (default) | pairs: the in-memory byte order of int4 weights


def int4_memory_pack(in_features: int, group_size: int = 0) -> str:
    """The byte order a QuantLinear keeps int4 codes in (kernels.types.QuantizedWeight.pack): "split16" where the
    W4A8 GEMM takes it (K % 64 == 0, groups of >= 32 columns): the kernel's register unpack then yields columns in
    natural order, so the activation codes need no reordering (a plain store in the quantize kernel, which the
    perm32 order made ~2x slower: bench/NOTES_e2e.md, session 17). VIDITQ_W4_PACK=pairs keeps the files' order
    (the activation-reordering "perm32" / "parity" paths, for comparison)."""
    env = os.environ.get(W4_PACK_ENV, "split16").strip().lower() or "split16"
    if env not in INT4_PACKS:
        raise ValueError(f"{W4_PACK_ENV} must be one of {', '.join(INT4_PACKS)}, got {env!r}")
    return env if in_features % 64 == 0 and (not group_size or group_size >= 32) else "pairs"


def layer_group_size(in_features: int, wanted: int) -> int:
    """The group size a layer can use: `wanted` when it divides in_features, else the largest power of two
    below it (and >= 32) that does, else 0 (per channel). PixArt's 1152 / 4608 take 128 as they are."""
    g = wanted
    while g >= 32:
        if in_features % g == 0:
            return g
        g //= 2
    return 0


class QuantLinear(nn.Module):
    def __init__(self, qweight: QuantizedWeight, bias: Optional[torch.Tensor], act_mult: Optional[torch.Tensor],
                 had_block: int, a_bits: int, a_format: str, static_scale: Optional[torch.Tensor] = None,
                 backend: str = "auto", meta: Optional[Dict] = None):
        super().__init__()
        self.in_features = qweight.in_features
        self.out_features = qweight.out_features
        self.w_fmt = qweight.fmt
        self.group_size = qweight.group_size
        self.had_block = had_block
        self.a_bits = a_bits
        self.act_fmt = "fp8" if a_format == "fp8" else "int8"
        self.act_qmax = 2 ** (a_bits - 1) - 1
        self.backend = backend
        self.simulate = False
        self.meta = dict(meta or {})
        # int4: the codes in the byte order the kernels read best (int4_memory_pack); files keep "pairs"
        # (checkpoint.py converts), the module's own state_dict holds the buffer as it is (w_pack says which order)
        self.w_pack = int4_memory_pack(self.in_features, self.group_size) if qweight.fmt == "int4" else "pairs"
        data = repack_int4(qweight.data, qweight.pack, self.w_pack) if qweight.fmt == "int4" else qweight.data
        self.register_buffer("qweight", data)
        self.register_buffer("w_scale", qweight.scale)
        self.register_buffer("w_zero", qweight.zero)
        self.register_buffer("w_gparam", qweight.gparam)  # two-level int4 group scales + zeros (types.py)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("act_mult", act_mult)
        self.register_buffer("static_scale", static_scale)
        self._sim_weight: Optional[torch.Tensor] = None
        # fusions (quant_core/fusions.py): work of the layer's producer that runs inside its quantize kernel
        self.input_act: Optional[str] = None  # "gelu_tanh" / "gelu": the MLP's GELU (its act module is Identity);
        # "none": nothing fused; under torch.compile the quantize runs in the prologue kernel (fusions.py)
        self.norm_eps: Optional[float] = None  # set: the block may arm the LayerNorm + adaLN modulate of x
        self._armed = None  # (shift, scale, rows_per_sample) for the next call only
        # the consumer's gated residual add x + gate * y in the GEMM epilogue (models/fused_input.gated_residual)
        self.fuse_residual = False
        self._armed_res = None  # (residual, gate, rows_per_sample) for the next call only

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, name: str, config: QuantConfig,
                    act_absmax: Optional[torch.Tensor] = None, backend: str = "auto") -> "QuantLinear":
        """Quantize `linear` per `config`. act_absmax ([K], from calibration) enables smoothing and static scales."""
        w = linear.weight.detach()
        k = w.shape[1]
        smooth = None
        if config.smooth and act_absmax is not None:
            smooth = smoothing_vector(act_absmax.to(w.device), w, config.smooth_alpha)
        signs, had_block = None, 0
        if config.rotate:
            had_block = hadamard_block_for(k, config.had_block)
            signs = rotation_signs(config.seed, name, k).to(w.device)
        w_hat, mult = balance(w, smooth, signs, had_block)
        granularity, group = config.w_granularity, config.w_group_size
        if granularity == "group" and k % group:
            group = layer_group_size(k, group)
            granularity = "group" if group else "channel"
        qw = quantize_weight(w_hat, bits=config.w_bits, fmt=config.w_format, granularity=granularity,
                             group_size=group, symmetric=config.w_symmetric,
                             group_scale=config.w_group_scale if granularity == "group" else "float")
        static_scale = None
        if config.a_granularity == "tensor_static":
            if act_absmax is None:
                raise ValueError(f"preset {config.name!r} uses static activation scales and needs a calibration")
            static_scale = torch.tensor(float(act_absmax.max()) / (2 ** (config.a_bits - 1) - 1),
                                        device=w.device).clamp_min(1e-12)
        meta = {"name": name, "preset": config.name, "w_bits": config.w_bits, "a_bits": config.a_bits,
                "smoothed": smooth is not None, "rotation_seed": config.seed if config.rotate else None}
        return cls(qw, linear.bias, None if mult is None else mult.float(), had_block, config.a_bits,
                   config.a_format, static_scale, backend, meta)

    # -- run ----------------------------------------------------------------------------------------------
    def quantized_weight(self) -> QuantizedWeight:
        # scales stay fp32 even if someone casts the module (e.g. model.half()): kernels expect fp32
        zero = None if self.w_zero is None else self.w_zero.float()
        return QuantizedWeight(data=self.qweight, scale=self.w_scale.float(), zero=zero, fmt=self.w_fmt,
                               in_features=self.in_features, group_size=self.group_size,
                               pack=getattr(self, "w_pack", "pairs"), gparam=getattr(self, "w_gparam", None))

    def file_qweight(self) -> torch.Tensor:
        """The weight codes in the files' byte order (int4: "pairs", whatever order the layer keeps in memory)."""
        if self.w_fmt != "int4":
            return self.qweight
        return repack_int4(self.qweight, getattr(self, "w_pack", "pairs"), "pairs")

    def set_simulate(self, on: bool) -> None:
        self.simulate = on
        self._sim_weight = None

    def fusable(self) -> bool:
        """Can a producer's elementwise work run in this layer's quantize kernel? (dynamic scales, symmetric int8 /
        fp8 / int4 weights, no rotation or a block Hadamard the kernel's transform covers: what
        kernels/triton_prologue_quant.py and the GEMM alone cover)"""
        return (self.had_block <= kernels.MAX_FUSED_HAD and self.static_scale is None and self.w_zero is None
                and self.w_fmt in ("int8", "fp8", "int4") and self.a_bits == 8)

    def fused_view(self, input_act: Optional[str] = None, norm_eps: Optional[float] = None,
                   residual: bool = False) -> "QuantLinear":
        """The same layer (parameters and buffers shared, not copied) that also runs a producer's work in its
        quantize: `input_act` (the MLP's GELU, whose module must then be Identity) or, with `norm_eps`, the block's
        LayerNorm + modulate when armed; with `residual`, the consumer's gated residual add when armed. A separate
        object, so the plain layer stays correct wherever it is used unfused (quant_core/fusions.py installs views
        next to the patches that make them right)."""
        view = copy.copy(self)  # shares _parameters / _buffers: moving one moves both
        view.input_act, view.norm_eps, view._armed = input_act, norm_eps, None
        view.fuse_residual, view._armed_res = bool(residual), None
        return view

    def arm_norm_modulate(self, shift: torch.Tensor, scale: torch.Tensor, rows_per_sample: int) -> None:
        """The next call gets the block's residual x instead of LayerNorm(x) * (1 + scale) + shift and does that
        itself, fused into the quantize (models/fused_input.modulated_input arms it)."""
        if self.norm_eps is None:
            raise RuntimeError("arm_norm_modulate on a layer without a LayerNorm fusion (fusions.py sets norm_eps)")
        self._armed = (shift, scale, int(rows_per_sample))

    def arm_residual(self, residual: torch.Tensor, gate: Optional[torch.Tensor], rows_per_sample: int) -> None:
        """The next call returns residual + gate * (its output) (gate None: residual + output), the add done in the
        GEMM's epilogue; residual is [B, N, out] (any shape with the output's rows), gate [B, 1, out] per sample of
        rows_per_sample rows (models/fused_input.gated_residual arms it)."""
        if not self.fuse_residual:
            raise RuntimeError("arm_residual on a layer without a residual fusion (fusions.py sets fuse_residual)")
        self._armed_res = (residual, gate, int(rows_per_sample))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        armed, res = self._armed, self._armed_res
        if armed is not None:  # one call only (Dynamo traces this as a module side effect, graph-break free)
            self._armed = None
        if res is not None:
            self._armed_res = None
        prologue = "norm_modulate" if armed is not None else self.input_act
        if prologue == "none" and res is None and not torch.compiler.is_compiling():
            prologue = None  # eager: the plain path's cached launch plan costs less host time per call
        if res is not None and prologue is None:
            prologue = "none"  # the residual add needs the fused path's GEMM call
        if prologue is not None:
            return self._forward_fused(x, prologue, *(armed or (None, None, 0)), res)
        return self._forward_plain(x)

    def _forward_fused(self, x, prologue, shift, scale, rows_per_sample, res=None):
        if self.qweight.device != x.device:
            self.to(x.device)
            self._sim_weight = None
        eps = self.norm_eps if self.norm_eps is not None else 1e-6
        if self.simulate or not self.fusable():  # the prologue in torch, then the layer, then the add, as unfused
            xf = kernels.reference.apply_prologue(x, prologue, shift, scale, rows_per_sample, eps)
            y = self._forward_plain(xf.to(x.dtype).reshape(x.shape))
            if res is None:
                return y
            residual, gate, _ = res
            yr = y.reshape(residual.shape)
            return (residual + (yr if gate is None else gate * yr)).reshape(y.shape)
        if res is not None:  # the output keeps the layer's own shape; gated_residual gives it the residual's
            return kernels.prologue_quant_linear(x, prologue, shift, scale, rows_per_sample, eps,
                                                 self.quantized_weight(), self.bias, self.act_mult, self.act_fmt,
                                                 self.act_qmax, self.backend, *res, had_block=self.had_block)
        return kernels.prologue_quant_linear(x, prologue, shift, scale, rows_per_sample, eps,
                                             self.quantized_weight(), self.bias, self.act_mult, self.act_fmt,
                                             self.act_qmax, self.backend, had_block=self.had_block)

    def _forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        # torch.compile (fullgraph): everything here traces; kernels.quant_linear is one custom op in the graph
        # (kernels/custom_ops.py). The device test is static under Dynamo (it guards on the buffers' devices): when
        # the layer is where x is, nothing is traced for it; otherwise Dynamo traces the move as a module side
        # effect (applied after the call) and the next call recompiles for the new devices.
        if self.qweight.device != x.device:  # ComfyUI may move the model after patching (low-VRAM paths)
            self.to(x.device)
            self._sim_weight = None
        if self.simulate:
            return self._forward_simulated(x)
        return kernels.quant_linear(x, self.quantized_weight(), self.bias, self.act_mult, self.had_block,
                                    self.act_fmt, self.act_qmax, self.static_scale, self.backend)

    def _forward_simulated(self, x: torch.Tensor) -> torch.Tensor:
        if self._sim_weight is None:
            self._sim_weight = dequantize_weight(self.quantized_weight())
        xb = balance_activation(x.float(), self.act_mult, self.had_block)
        xq = fake_quantize_activation(xb, self.a_bits, "fp8" if self.act_fmt == "fp8" else "int",
                                      self.static_scale)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(xq, self._sim_weight, bias).to(x.dtype)

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.w_scale, self.w_zero,
                                                          getattr(self, "w_gparam", None), self.act_mult)
                   if t is not None)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, w={self.w_fmt}"
                f"{'/g' + str(self.group_size) if self.group_size else ''}"
                f"{'/two-level' if getattr(self, 'w_gparam', None) is not None else ''}"
                f"{'/' + getattr(self, 'w_pack', 'pairs') if self.w_fmt == 'int4' else ''}, a={self.act_fmt}:{self.a_bits}b, "
                f"hadamard={self.had_block}, smoothed={self.meta.get('smoothed')}"
                f"{', fused=' + self.input_act if self.input_act else ''}"
                f"{', fused=norm_modulate' if self.norm_eps is not None else ''}"
                f"{', fused=residual' if self.fuse_residual else ''}")


class RangeClock:
    """The timestep range of the model call in progress, shared by the TimestepSwitchLinear of one model.

    The sampler side sets it before each model call (ComfyUI: a model wrapper from model_sampling.timestep(sigma);
    plain torch: pass `set_step` as the sampler's on_model_call hook) and clears it afterwards, so a call that
    bypasses the wrapper is an error instead of silently running the previous step's bits.
    """

    def __init__(self, num_ranges: int, num_timesteps: float = 1000.0):
        self.num_ranges = num_ranges
        self.num_timesteps = num_timesteps
        self.current: Optional[int] = None

    def set_timesteps(self, timesteps: torch.Tensor) -> int:
        """Range of the batch's first row (samplers evaluate every row of a call at the same timestep)."""
        t = torch.as_tensor(timesteps).reshape(-1)[:1].detach().float().cpu()
        self.current = int(bucket_of(t, self.num_ranges, self.num_timesteps)[0])
        return self.current

    def set_step(self, timesteps: torch.Tensor, branches=None) -> None:  # the standalone sampler's hook signature
        self.set_timesteps(timesteps)

    def clear(self) -> None:
        self.current = None


class TimestepSwitchLinear(nn.Module):
    """A linear whose implementation depends on the timestep range: variants[choice[range]] runs.

    Used for per-timestep-range plans (each variant a QuantLinear on the kernel path) and by the planner's
    sensitivity sweep (variants = the FP linear and a fake-quant QuantLinear; `choice` changes per trial).
    """

    def __init__(self, variants, choice, clock: RangeClock, name: str = ""):
        super().__init__()
        if len(choice) != clock.num_ranges:
            raise ValueError(f"{len(choice)} range choices for a clock of {clock.num_ranges} ranges")
        self.variants = nn.ModuleList(variants)
        self.choice = list(choice)
        self.clock = clock
        self.name = name
        first = variants[0]
        self.in_features, self.out_features = first.in_features, first.out_features
        self.meta = dict(getattr(first, "meta", {}) or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch.compile: Dynamo reads clock.current as a Python int and guards on it (and on `choice`), so a
        # compiled model holds one graph per timestep range it has run (a recompile the first time each range
        # comes, later calls pick the cached graph of the current range; never a stale variant). With 4 ranges
        # that is 4 graphs, within Dynamo's default recompile limit (8).
        r = self.clock.current
        if r is None:
            raise RuntimeError(
                f"ViDiT-Q: layer {self.name or '?'} switches bits by timestep range but no timestep was set for "
                "this model call; sample through the model wrapper ViDiT-Q Quantize installs (plain torch: pass "
                "RangeClock.set_step as the sampler's on_model_call hook)")
        return self.variants[self.choice[r]](x)

    def weight_bytes(self) -> int:
        """Bytes of every stored variant that is used in some range (all of them live in memory)."""
        used = set(self.choice)
        return sum(v.weight_bytes() for i, v in enumerate(self.variants) if i in used and hasattr(v, "weight_bytes"))

    def extra_repr(self) -> str:
        return f"name={self.name}, choice={self.choice}"


def range_clock_of(layers) -> Optional[RangeClock]:
    """The clock the sampler must set for these layers (None when no layer switches by timestep)."""
    for module in layers.values():
        if isinstance(module, TimestepSwitchLinear):
            return module.clock
    return None
