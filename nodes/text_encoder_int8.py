"""ViDiTQTextEncoderInt8: weight-only int8 for the T5 text encoder (optional; beyond the paper).

T5-XXL (4.7 B parameters, 9.5 GB in fp16) dominates PixArt's pipeline memory. This node swaps every Linear of
the T5 encoder for Int8WeightOnlyLinear: int8 weights with one float32 scale per output channel (symmetric, the
same quantizer as the DiT's weights), dequantized to the activation dtype inside forward. Activations stay in
floating point, so the embeddings stay close to FP16 (the node reports the error on a probe prompt). The token
embedding and the layer norms stay FP. Like ViDiTQQuantize it returns a clone (object patches): the input CLIP
stays usable.

The torch part (Int8WeightOnlyLinear, quantize_linears_int8) needs no ComfyUI; the node class is created on
first access, so importing this module never imports ComfyUI.
"""
import logging
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant_core.quantizers import quantize_weight

log = logging.getLogger("vidit_q")
DEFAULT_PROBE = "a photo of a red fox sitting in fresh snow at sunrise, highly detailed, 35mm"
FLOAT_WEIGHTS = (torch.float32, torch.float16, torch.bfloat16)


class Int8WeightOnlyLinear(nn.Module):
    """y = x @ (q * scale)^T + bias with q int8 [N, K] and scale float32 [N]; computes in x's dtype (the weight is
    dequantized per call: one layer's FP weight exists at a time, only while that layer runs)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None):
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.ndim != 2 or scale.shape != qweight.shape[:1]:
            raise ValueError("Int8WeightOnlyLinear needs an int8 [N, K] weight and a [N] scale")
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale.float())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, device=None) -> "Int8WeightOnlyLinear":
        w = linear.weight.detach()
        if w.dtype not in FLOAT_WEIGHTS:
            raise ValueError(f"weights of dtype {w.dtype} (e.g. fp8 checkpoints) are already smaller than int8 "
                             "weight-only; use the encoder as it is")
        qw = quantize_weight(w, bits=8, fmt="int", granularity="channel", symmetric=True)
        bias = linear.bias
        out = cls(qw.data, qw.scale, None if bias is None else bias.detach())
        return out if device is None else out.to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight.device != x.device:  # ComfyUI may move the model after patching (low-VRAM paths)
            self.to(x.device)
        dtype = x.dtype if x.dtype in FLOAT_WEIGHTS else torch.float32
        # dequantize in float32 and round once to the compute dtype, as a stored FP16/BF16 weight would be
        w = (self.qweight.float() * self.scale[:, None]).to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), w, bias)

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale, self.bias) if t is not None)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, w=int8 per channel (weight-only)"


def quantize_linears_int8(module: nn.Module, prefix: str = "",
                          lookup: Optional[Callable[[str, nn.Module], nn.Module]] = None,
                          device=None) -> Dict[str, Int8WeightOnlyLinear]:
    """Int8WeightOnlyLinear for every nn.Linear under `module` (the module is not modified); keys are
    prefix + the module's name. lookup(full_name, module) may return the module a patcher would really run."""
    out: Dict[str, Int8WeightOnlyLinear] = {}
    for name, m in module.named_modules():
        full = f"{prefix}{name}" if name else prefix.rstrip(".")
        if lookup is not None and name:
            m = lookup(full, m)
        if isinstance(m, Int8WeightOnlyLinear):
            raise ValueError(f"{full} is already int8 (weight-only): connect the FP16 text encoder instead")
        if isinstance(m, nn.Linear):
            out[full] = Int8WeightOnlyLinear.from_linear(m, device)
    if not out:
        raise ValueError("no Linear layers found to quantize")
    return out


def fp_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (module.weight, module.bias) if t is not None)


# ---- the ComfyUI node (built on first access, so that this module imports without ComfyUI) -----------------
def _t5_modules(cond_stage_model: nn.Module) -> Dict[str, nn.Module]:
    import comfy.text_encoders.t5

    return {name: m for name, m in cond_stage_model.named_modules() if isinstance(m, comfy.text_encoders.t5.T5)}


def quantize_clip_t5(clip):
    """(clone of `clip` whose T5 encoder linears are int8 weight-only object patches, summary dict)."""
    patcher = clip.patcher
    t5s = _t5_modules(clip.cond_stage_model)
    if not t5s:
        raise ValueError(f"ViDiT-Q T5 int8 needs a T5 text encoder (e.g. CLIPLoader type 'pixart'), but this CLIP "
                         f"holds {type(clip.cond_stage_model).__name__} without one")
    layers: Dict[str, Int8WeightOnlyLinear] = {}
    for name, t5 in t5s.items():
        layers.update(quantize_linears_int8(t5.encoder, prefix=f"{name}.encoder.", device=patcher.offload_device,
                                            lookup=lambda n, m: patcher.get_model_object(n)))
    out = clip.clone()
    before = sum(fp_bytes(patcher.get_model_object(n)) for n in layers)
    after = sum(q.weight_bytes() for q in layers.values())
    for name, q in layers.items():
        out.patcher.add_object_patch(name, q)
    out.patcher.size = max(0, out.patcher.model_size() - before + after)  # ComfyUI plans VRAM with this size
    summary = {"layers": len(layers), "linear_weight_bytes_fp": before, "linear_weight_bytes_int8": after}
    return out, summary


def embedding_error(clip_fp, clip_q, text: str) -> Dict:
    """How far the int8 encoder's embedding of `text` is from the FP one (rel-L2, cosine, max abs)."""
    from ..quant_core.metrics import compare

    tokens = clip_fp.tokenize(text)
    ref = clip_fp.encode_from_tokens(tokens)
    test = clip_q.encode_from_tokens(tokens)
    stats = compare(ref.float(), test.float())
    return {"probe": text, "rel_l2": stats["rel_l2"], "cosine": stats["cosine"],
            "max_abs": float((ref.float() - test.float()).abs().max()), "tokens": int(ref.shape[1])}


def _build_node_class():
    import json

    from comfy_api.latest import io, ui

    class ViDiTQTextEncoderInt8(io.ComfyNode):
        @classmethod
        def define_schema(cls) -> io.Schema:
            return io.Schema(
                node_id="ViDiTQTextEncoderInt8",
                display_name="ViDiT-Q T5 Int8 (weight-only)",
                category="ViDiT-Q",
                description="Stores the T5 text encoder's linear weights as int8 (per-channel scales), halving its "
                            "memory vs FP16; activations stay FP. Reports the embedding error vs the FP encoder on "
                            "a probe prompt. The input CLIP stays usable.",
                inputs=[
                    io.Clip.Input("clip", tooltip="A T5 text encoder (CLIPLoader type 'pixart')."),
                    io.String.Input("probe_text", default=DEFAULT_PROBE, optional=True,
                                    tooltip="Encoded by both encoders to measure the embedding error; empty: skip."),
                ],
                outputs=[io.Clip.Output(), io.String.Output(display_name="report")],
            )

        @classmethod
        def execute(cls, clip, probe_text=DEFAULT_PROBE) -> io.NodeOutput:
            clip_q, report = quantize_clip_t5(clip)
            if probe_text and probe_text.strip():
                report["embedding_error"] = embedding_error(clip, clip_q, probe_text)
            log.info("ViDiT-Q: T5 int8 weight-only on %d linears (%.1f MB -> %.1f MB)%s", report["layers"],
                     report["linear_weight_bytes_fp"] / 1e6, report["linear_weight_bytes_int8"] / 1e6,
                     "" if "embedding_error" not in report else
                     f"; embedding rel-L2 {report['embedding_error']['rel_l2']:.2e} vs FP")
            text = json.dumps(report, indent=1)
            return io.NodeOutput(clip_q, text, ui=ui.PreviewText(text))

    return ViDiTQTextEncoderInt8


def __getattr__(name):
    if name == "ViDiTQTextEncoderInt8":
        cls = _build_node_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
