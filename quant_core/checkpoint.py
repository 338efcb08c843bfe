"""Quantized checkpoints: one .safetensors file holding a ViDiT-Q quantized DiT (format 1).

Tensors (the state dict of the quantized model, as `model.state_dict()` gives it once the QuantLinear modules are
installed; absent optional tensors are simply not stored):
  <layer>.qweight       int8 [N, K] (int8 and 6-bit codes), uint8 [N, K/2] (int4, two per byte, offset-binary:
                        low nibble = column 2j, the "pairs" order, whatever order QuantLinear keeps in memory:
                        QuantLinear.file_qweight) or float8_e4m3fn [N, K] (fp8)
  <layer>.w_scale       float32 [N] per output channel, or [N, K/group_size]
  <layer>.w_zero        float32, same shape as w_scale (asymmetric weights only)
  <layer>.w_gparam      uint8 [N, K/group_size] (two-level int4 only, format 2: high nibble = integer group scale
                        - 1, low nibble = group zero; w_scale is then per output channel [N]; kernels/types.py)
  <layer>.bias          [N] in the model's dtype
  <layer>.act_mult      float32 [K]: smoothing 1/s times the rotation's random signs (folded activation side)
  <layer>.static_scale  float32 scalar: static per-tensor activation scale (the naive baseline only)
  every other tensor    the non-quantized layers (embedders, t_block, final layer, norms, tables) under their
                        official keys, in their dtype
Metadata (safetensors string map):
  vidit_q.format        "2"             format version of the writer
  vidit_q.min_reader    "1" or "2"      the oldest reader format that can load this file: 2 when a layer has
                                        two-level group scales (w_gparam), else 1 (format 1 readers load the rest)
  vidit_q.header        JSON (below)
  vidit_q.header_sha256 sha256 of the header string: a file edited after saving is refused
  prompt / workflow     (ComfyUI saves only) the graph that made it, as ComfyUI's own savers store it
Header JSON: format_version, min_reader_version, method, tool, tool_version, family, variant, fingerprint (of the
FP16 model it was quantized from), preset, plan, quant_config, summary, model {model_dtype, weight_dtype, ...},
layers {name: {kind: "quant", in_features, out_features, w_fmt, group_size, had_block, a_bits, act_fmt, tensors,
meta}}, fp_tensors [names]. A layer of a per-timestep-range plan is {kind: "switch", in_features, out_features,
choice, num_ranges, num_timesteps, variants: [quant entries, or {kind: "fp", tensors: [weight, bias]}], meta}, its
tensors under <layer>.variants.<i>.*.

Saving writes a temporary file in the target folder, checks it, and renames it over the target: a failed save
never leaves a half file and never touches a previous file of the same name. Loading builds QuantLinear directly
from the stored tensors (install_quantized fills a model built on the meta device), so the FP16 weights of the
quantized layers never exist in memory.
"""
import contextlib
import hashlib
import json
import logging
import os
import pathlib
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .. import __version__ as TOOL_VERSION
from ..kernels.types import QuantizedWeight
from .archs import UnsupportedModelError, find_rules, quantizable_layers
from .config import PRESETS
from . import quant_linear as _ql
from .quant_linear import QuantLinear

# per-timestep-range plans (TimestepSwitchLinear) are newer than format 1's first draft; tolerate their absence
TimestepSwitchLinear = getattr(_ql, "TimestepSwitchLinear", None)
RangeClock = getattr(_ql, "RangeClock", None)

log = logging.getLogger("vidit_q")

FORMAT_VERSION = 2  # 2: two-level int4 group scales (w_gparam); everything else is as in format 1
MIN_READER_VERSION = 1  # what this writer's files need from a reader (2 where a layer has w_gparam: _min_reader)
READABLE_VERSIONS = (1, 2)  # formats this reader understands (older ones get a migration here when they exist)
METHOD = "ViDiT-Q"
TOOL = "ComfyUI-ViDiT-Q"
KEY_FORMAT = "vidit_q.format"
KEY_MIN_READER = "vidit_q.min_reader"
KEY_HEADER = "vidit_q.header"
KEY_SHA = "vidit_q.header_sha256"
RESERVED_KEYS = (KEY_FORMAT, KEY_MIN_READER, KEY_HEADER, KEY_SHA)

LAYER_TENSORS = ("qweight", "w_scale", "w_zero", "w_gparam", "bias", "act_mult", "static_scale")
REQUIRED_LAYER_TENSORS = ("qweight", "w_scale")
W_DTYPES = {"int8": torch.int8, "int4": torch.uint8, "fp8": torch.float8_e4m3fn}
ACT_FORMATS = ("int8", "fp8")
LAYER_FIELDS = {"in_features": int, "out_features": int, "w_fmt": str, "group_size": int, "had_block": int,
                "a_bits": int, "act_fmt": str, "tensors": list}
_DTYPES = {str(d).replace("torch.", ""): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A quantized checkpoint that cannot be used; the message names the file and the problem."""

    def __init__(self, path: PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"ViDiT-Q checkpoint {self.path}: {problem}")


# ---- saving ------------------------------------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _majority_dtype(tensors: Iterable[torch.Tensor]) -> Optional[torch.dtype]:
    """The floating dtype holding most elements (what ComfyUI calls a state dict's weight dtype)."""
    counts: Dict[torch.dtype, int] = {}
    for t in tensors:
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else None


def _jsonable(obj):
    if isinstance(obj, torch.dtype):
        return _dtype_name(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def _quant_entry(q: QuantLinear, prefix: str, tensors: Dict[str, torch.Tensor]) -> Dict:
    present = []
    for attr in LAYER_TENSORS:
        t = q.file_qweight() if attr == "qweight" else getattr(q, attr, None)  # int4: the files' byte order
        if t is None:
            continue
        tensors[f"{prefix}{attr}"] = _cpu(t)
        present.append(attr)
    return {"kind": "quant", "in_features": q.in_features, "out_features": q.out_features, "w_fmt": q.w_fmt,
            "group_size": int(q.group_size or 0), "had_block": int(q.had_block), "a_bits": q.a_bits,
            "act_fmt": q.act_fmt, "tensors": present, "meta": dict(q.meta)}


def _fp_linear_entry(linear: nn.Linear, prefix: str, tensors: Dict[str, torch.Tensor]) -> Dict:
    present = []
    for attr in ("weight", "bias"):
        t = getattr(linear, attr)
        if t is not None:
            tensors[f"{prefix}{attr}"] = _cpu(t)
            present.append(attr)
    return {"kind": "fp", "in_features": linear.in_features, "out_features": linear.out_features, "tensors": present}


def _layer_entry(name: str, module: nn.Module, tensors: Dict[str, torch.Tensor]) -> Dict:
    """The metadata entry of one quantized layer; its tensors go into `tensors` under `name.`."""
    if isinstance(module, QuantLinear):
        return _quant_entry(module, name + ".", tensors)
    if TimestepSwitchLinear is not None and isinstance(module, TimestepSwitchLinear):
        variants = []
        for i, v in enumerate(module.variants):
            prefix = f"{name}.variants.{i}."
            if isinstance(v, QuantLinear):
                variants.append(_quant_entry(v, prefix, tensors))
            elif isinstance(v, nn.Linear):
                variants.append(_fp_linear_entry(v, prefix, tensors))
            else:
                raise TypeError(f"layer {name}: variant {i} is a {type(v).__name__}, which cannot be saved")
        return {"kind": "switch", "in_features": module.in_features, "out_features": module.out_features,
                "choice": list(module.choice), "num_ranges": module.clock.num_ranges,
                "num_timesteps": float(module.clock.num_timesteps), "variants": variants, "meta": dict(module.meta)}
    raise TypeError(f"layer {name} is a {type(module).__name__}, not a ViDiT-Q quantized layer")


def _entry_biases(module: nn.Module) -> List[torch.Tensor]:
    mods = list(module.variants) if hasattr(module, "variants") else [module]
    return [m.bias for m in mods if getattr(m, "bias", None) is not None]


def collect_tensors(model: nn.Module, layers: Dict[str, nn.Module], fp_dtype: Optional[torch.dtype] = None
                    ) -> Tuple["OrderedDict[str, torch.Tensor]", List[str], "OrderedDict[str, Dict]", Dict]:
    """(tensors to store, names of the FP tensors, per-layer entries, dtype info) for `model` + `layers`.

    `model` is the diffusion model, either still holding its FP linears (ComfyUI object patches) or with the
    quantized modules already swapped in (replace_layers): the quantized layers' entries are skipped either way.
    `layers`: name -> QuantLinear (or TimestepSwitchLinear of a per-timestep-range plan).
    """
    if not layers:
        raise ValueError("nothing to save: no quantized layers were given")
    tensors: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    prefixes = tuple(name + "." for name in layers)
    fp_names: List[str] = []
    source = []
    for key, value in model.state_dict().items():
        if key.startswith(prefixes):
            continue
        if value.is_meta:
            raise ValueError(f"tensor {key} of the model has no data (meta device): nothing to save")
        source.append(value)
        t = value.to(fp_dtype) if (fp_dtype is not None and value.is_floating_point()) else value
        tensors[key] = _cpu(t)
        fp_names.append(key)
    entries: "OrderedDict[str, Dict]" = OrderedDict()
    for name, module in layers.items():
        entries[name] = _layer_entry(name, module, tensors)
        source.extend(_entry_biases(module))
    dtypes = {"model_dtype": _dtype_name(_majority_dtype(source) or torch.float32),
              "weight_dtype": _dtype_name(_majority_dtype(tensors[k] for k in fp_names) or torch.float32)}
    return tensors, fp_names, entries, dtypes


def _min_reader(entries: Dict[str, Dict]) -> int:
    """The oldest reader format that loads these layers: 2 for two-level int4 group scales (w_gparam), else 1."""
    def uses_gparam(entry):
        return "w_gparam" in (entry.get("tensors") or ()) or any(uses_gparam(v) for v in entry.get("variants", ()))
    return 2 if any(uses_gparam(e) for e in entries.values()) else MIN_READER_VERSION


def build_header(summary: Dict, fp_names: List[str], entries: Dict[str, Dict], dtypes: Dict,
                 model_info: Optional[Dict] = None) -> Dict:
    fingerprint = dict(summary.get("fingerprint") or {})
    if not fingerprint.get("family"):
        raise ValueError("the quantization summary carries no model fingerprint (family, layers, weights); "
                         "quantize with build_quant_layers / ViDiT-Q Quantize")
    preset = summary.get("preset")
    config = PRESETS[preset].to_dict() if preset in PRESETS else None
    return {
        "format_version": FORMAT_VERSION,
        "min_reader_version": _min_reader(entries),
        "method": METHOD,
        "tool": TOOL,
        "tool_version": TOOL_VERSION,
        "family": fingerprint["family"],
        "variant": fingerprint.get("variant"),
        "fingerprint": fingerprint,
        "preset": preset,
        "plan": summary.get("plan"),
        "quant_config": config,
        "summary": summary,
        "model": {**dtypes, **(model_info or {})},
        "layers": entries,
        "fp_tensors": fp_names,
    }


def encode_metadata(header: Dict, extra_metadata: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), default=_jsonable)
    metadata = {str(k): str(v) for k, v in (extra_metadata or {}).items() if k not in RESERVED_KEYS}
    metadata.update({KEY_FORMAT: str(header["format_version"]), KEY_MIN_READER: str(header["min_reader_version"]),
                     KEY_HEADER: text, KEY_SHA: hashlib.sha256(text.encode()).hexdigest()})
    return metadata


def _write_safetensors(tensors: Dict[str, torch.Tensor], path: str, metadata: Dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata)


def atomic_write(path: PathLike, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> pathlib.Path:
    """Write to a temporary file beside `path`, check it, then rename it over `path` (never a half file)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        _write_safetensors(tensors, str(tmp), metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _, keys = _open_header(tmp)  # what landed on disk must read back complete before it replaces anything
        if set(keys) != set(tensors):
            raise OSError(f"the written file holds {len(keys)} tensors instead of {len(tensors)}")
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        state = "the previous file is unchanged" if path.exists() else "no file was written"
        raise CheckpointError(path, f"saving failed ({type(e).__name__}: {e}); {state}") from e
    with contextlib.suppress(OSError):  # make the rename durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def save_quantized(path: PathLike, model: nn.Module, layers: Dict[str, QuantLinear], summary: Dict, *,
                   fp_dtype: Optional[torch.dtype] = None, model_info: Optional[Dict] = None,
                   extra_metadata: Optional[Dict[str, str]] = None) -> pathlib.Path:
    """Save a quantized diffusion model: `layers` and `summary` as build_quant_layers returned them.

    fp_dtype casts the non-quantized layers (e.g. torch.float16); None keeps each in its dtype (bit-identical
    round trip). model_info lands in the header's "model" entry; extra_metadata in the safetensors metadata.
    """
    tensors, fp_names, entries, dtypes = collect_tensors(model, layers, fp_dtype)
    header = build_header(summary, fp_names, entries, dtypes, model_info)
    out = atomic_write(path, tensors, encode_metadata(header, extra_metadata))
    log.info("ViDiT-Q: saved %d quantized layers (%s) to %s (%.1f MB)", len(layers), summary.get("preset"), out,
             out.stat().st_size / 1e6)
    return out


# ---- loading -----------------------------------------------------------------------------------------------------
def _open_header(path: PathLike) -> Tuple[Dict[str, str], List[str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {}), list(f.keys())
    except Exception as e:  # safetensors raises its own error type for short or corrupt files
        raise CheckpointError(path, f"not a readable .safetensors file (truncated or corrupted?): {e}") from None


def _check_versions(path: PathLike, header: Dict) -> None:
    version, min_reader = header.get("format_version"), header.get("min_reader_version", header.get("format_version"))
    if not isinstance(version, int) or not isinstance(min_reader, int):
        raise CheckpointError(path, f"the metadata names no valid format version ({version!r})")
    written_by = f"{header.get('tool', TOOL)} {header.get('tool_version', '?')}"
    if min_reader > FORMAT_VERSION:
        raise CheckpointError(path, f"written in checkpoint format {version} by {written_by}, which needs a reader of "
                                    f"format {min_reader} or newer; this is {TOOL} {TOOL_VERSION} (reads format "
                                    f"{FORMAT_VERSION}): update {TOOL} to "
                                    f"{header.get('tool_version', 'a newer version')} or later")
    if version > FORMAT_VERSION:
        log.info("ViDiT-Q: %s is checkpoint format %d (%s); reading it as format %d (it allows readers of format %d)",
                 path, version, written_by, FORMAT_VERSION, min_reader)
    elif version not in READABLE_VERSIONS:
        raise CheckpointError(path, f"written in checkpoint format {version} by {written_by}; this is {TOOL} "
                                    f"{TOOL_VERSION}, which reads formats {min(READABLE_VERSIONS)}-"
                                    f"{max(READABLE_VERSIONS)}: quantize and save the model again with this version")


def read_header(path: PathLike) -> Tuple[Dict, List[str], Dict[str, str]]:
    """(header, tensor names, raw metadata) of a quantized checkpoint, validated; reads no tensor data."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    metadata, keys = _open_header(path)
    text = metadata.get(KEY_HEADER)
    if text is None:
        raise CheckpointError(path, "not a ViDiT-Q quantized checkpoint (its metadata has no 'vidit_q.header'); "
                                    "an FP16 PixArt checkpoint loads with ComfyUI's UNETLoader")
    if hashlib.sha256(text.encode()).hexdigest() != metadata.get(KEY_SHA):
        raise CheckpointError(path, "the metadata does not match its checksum: the file was modified after saving "
                                    "(tampered or damaged); save it again from the quantized model")
    try:
        header = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(path, f"the metadata is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "the metadata header is not a JSON object")
    _check_versions(path, header)
    if metadata.get(KEY_FORMAT) != str(header["format_version"]):
        raise CheckpointError(path, f"format version {metadata.get(KEY_FORMAT)!r} outside the header disagrees with "
                                    f"{header['format_version']} inside it: the metadata was edited")
    for field_name, kind in (("family", str), ("fingerprint", dict), ("layers", dict), ("fp_tensors", list),
                             ("model", dict), ("summary", dict)):
        if not isinstance(header.get(field_name), kind):
            raise CheckpointError(path, f"the metadata lacks a valid '{field_name}' entry")
    if not header["layers"]:
        raise CheckpointError(path, "the metadata lists no quantized layers")
    return header, keys, metadata


def _layer_tensor_names(path, name: str, entry, prefix: str) -> List[str]:
    """Tensor names an entry lists (recursively for switch layers), after checking the entry's structure."""
    if not isinstance(entry, dict):
        raise CheckpointError(path, f"layer {name}: its metadata entry is not an object")
    kind = entry.get("kind", "quant")
    if kind == "switch":
        variants, choice = entry.get("variants"), entry.get("choice")
        if TimestepSwitchLinear is None:
            raise CheckpointError(path, f"layer {name} switches bits by timestep range, which this version of "
                                        f"{TOOL} cannot run")
        if not isinstance(variants, list) or not variants or not isinstance(choice, list) \
                or len(choice) != entry.get("num_ranges") or any(not isinstance(c, int) or not 0 <= c < len(variants)
                                                                for c in choice):
            raise CheckpointError(path, f"layer {name}: invalid timestep-range switch (variants/choice/num_ranges)")
        names = []
        for i, v in enumerate(variants):
            if isinstance(v, dict) and v.get("kind") == "switch":
                raise CheckpointError(path, f"layer {name}: nested switch layers are not supported")
            names += _layer_tensor_names(path, name, v, f"{prefix}variants.{i}.")
        return names
    tensors = entry.get("tensors")
    allowed, required = {"quant": (LAYER_TENSORS, REQUIRED_LAYER_TENSORS), "fp": (("weight", "bias"), ("weight",))
                         }.get(kind, (None, None))
    if allowed is None:
        raise CheckpointError(path, f"layer {name}: unknown layer kind {kind!r} (known: quant, fp, switch)")
    if not isinstance(tensors, list) or not set(required) <= set(tensors) or not set(tensors) <= set(allowed):
        raise CheckpointError(path, f"layer {name}: the metadata lists invalid tensors {tensors!r}")
    return [f"{prefix}{t}" for t in tensors]


def _validate_quant(path, name: str, entry: Dict, t: Dict[str, torch.Tensor]) -> None:
    def bad(problem):
        raise CheckpointError(path, f"layer {name}: {problem}")

    for field_name, kind in LAYER_FIELDS.items():
        if not isinstance(entry.get(field_name), kind):
            bad(f"attribute '{field_name}' is missing or not a {kind.__name__}")
    n, k, fmt, g = entry["out_features"], entry["in_features"], entry["w_fmt"], entry["group_size"]
    if fmt not in W_DTYPES:
        bad(f"unknown weight format {fmt!r} (known: {', '.join(W_DTYPES)})")
    if entry["act_fmt"] not in ACT_FORMATS or entry["a_bits"] not in (4, 6, 8):
        bad(f"unsupported activation format {entry['act_fmt']}:{entry['a_bits']} bits")
    hb = entry["had_block"]
    if hb < 0 or (hb > 1 and (hb & (hb - 1) or k % hb)):
        bad(f"Hadamard block {hb} does not divide in_features {k} as a power of two")
    if g < 0 or (g and k % g):
        bad(f"group size {g} does not divide in_features {k}")
    q = t["qweight"]
    want_shape = (n, k // 2) if fmt == "int4" else (n, k)
    if q.dtype != W_DTYPES[fmt] or tuple(q.shape) != want_shape:
        bad(f"qweight is {q.dtype} {list(q.shape)} but a {fmt} weight of {n}x{k} is {W_DTYPES[fmt]} {list(want_shape)}")
    scale_shape = (n, k // g) if g else (n,)
    if "w_gparam" in t:
        gp = t["w_gparam"]
        if fmt != "int4" or not g or "w_zero" in t:
            bad("two-level group scales (w_gparam) need int4 group-wise weights without w_zero")
        if gp.dtype != torch.uint8 or tuple(gp.shape) != scale_shape:
            bad(f"w_gparam is {gp.dtype} {list(gp.shape)}, expected uint8 {list(scale_shape)}")
        scale_shape = (n,)  # the first level: one float scale per output channel
    for attr in ("w_scale", "w_zero"):
        if attr in t and (tuple(t[attr].shape) != scale_shape or not t[attr].is_floating_point()):
            bad(f"{attr} is {t[attr].dtype} {list(t[attr].shape)}, expected a float tensor of {list(scale_shape)}")
    for attr, shape in (("bias", (n,)), ("act_mult", (k,))):
        if attr in t and tuple(t[attr].shape) != shape:
            bad(f"{attr} has shape {list(t[attr].shape)}, expected {list(shape)}")
    if "static_scale" in t and t["static_scale"].numel() != 1:
        bad("static_scale must hold one value")


class _FPVariantLinear(nn.Linear):
    """The floating-point variant of a timestep-switched layer; runs in the activations' dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.weight.to(x.dtype), bias)


def _build_layer(path, name: str, entry: Dict, prefix: str, get: Callable[[str], torch.Tensor], backend: str,
                 clocks: Dict) -> nn.Module:
    kind = entry.get("kind", "quant")
    t = {attr: get(prefix + attr) for attr in entry.get("tensors", ())}
    if kind == "quant":
        _validate_quant(path, name, entry, t)
        qw = QuantizedWeight(data=t["qweight"], scale=t["w_scale"], zero=t.get("w_zero"), fmt=entry["w_fmt"],
                             in_features=entry["in_features"], group_size=entry["group_size"],
                             gparam=t.get("w_gparam"))
        return QuantLinear(qw, t.get("bias"), t.get("act_mult"), entry["had_block"], entry["a_bits"],
                           "fp8" if entry["act_fmt"] == "fp8" else "int", t.get("static_scale"), backend,
                           entry.get("meta") or {})
    if kind == "fp":
        w = t["weight"]
        n, k = entry.get("out_features"), entry.get("in_features")
        if w.ndim != 2 or tuple(w.shape) != (n, k) or ("bias" in t and tuple(t["bias"].shape) != (n,)):
            raise CheckpointError(path, f"layer {name}: FP variant weight {list(w.shape)} is not {n}x{k}")
        linear = _FPVariantLinear(k, n, bias="bias" in t, device="meta", dtype=w.dtype)
        linear.weight = nn.Parameter(w, requires_grad=False)
        if "bias" in t:
            linear.bias = nn.Parameter(t["bias"], requires_grad=False)
        return linear
    key = (int(entry["num_ranges"]), float(entry.get("num_timesteps", 1000.0)))
    clock = clocks.setdefault(key, RangeClock(*key))  # one clock per model: the sampler sets it once per call
    variants = [_build_layer(path, name, v, f"{prefix}variants.{i}.", get, backend, clocks)
                for i, v in enumerate(entry["variants"])]
    switch = TimestepSwitchLinear(variants, entry["choice"], clock, name)
    switch.meta.update(entry.get("meta") or {})
    return switch


@dataclass
class QuantizedCheckpoint:
    """What a quantized file holds, read and checked: build a model from it with install_quantized."""

    path: pathlib.Path
    header: Dict
    fp_state: Dict[str, torch.Tensor]
    layers: "OrderedDict[str, nn.Module]"  # QuantLinear, or TimestepSwitchLinear for per-timestep-range plans
    clock: Optional[object] = None  # the RangeClock the sampler sets, when some layer switches by timestep

    @property
    def family(self) -> str:
        return self.header["family"]

    @property
    def variant(self) -> str:
        return self.header.get("variant") or ""

    @property
    def model_dtype(self) -> torch.dtype:
        return _DTYPES.get(self.header["model"].get("model_dtype"), torch.float32)

    @property
    def weight_dtype(self) -> torch.dtype:
        return _DTYPES.get(self.header["model"].get("weight_dtype"), torch.float32)

    def shape_dict(self) -> Dict[str, torch.Tensor]:
        """The FP model's state dict as meta tensors (official keys and shapes): what detection code reads."""
        out = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in self.fp_state.items()}
        for name, q in self.layers.items():
            out[name + ".weight"] = torch.empty(q.out_features, q.in_features, dtype=self.weight_dtype, device="meta")
            biases = _entry_biases(q)
            if biases:
                out[name + ".bias"] = torch.empty(q.out_features, dtype=biases[0].dtype, device="meta")
        return out

    def summary(self) -> Dict:
        """The quantization summary (as ViDiTQQuantize records it on a MODEL), plus where it was loaded from."""
        return {**self.header["summary"], "checkpoint": self.path.name,
                "checkpoint_format": self.header["format_version"], "tool_version": self.header.get("tool_version")}


def read_quantized(path: PathLike, device: Union[str, torch.device] = "cpu", backend: str = "auto",
                   family: Optional[str] = None) -> QuantizedCheckpoint:
    """Read and check a quantized checkpoint; QuantLinear modules are built from the stored tensors directly."""
    path = pathlib.Path(path)
    header, keys, _ = read_header(path)
    if family is not None and header["family"] != family:
        raise CheckpointError(path, f"holds a {header['family']} model ({header.get('variant')}), but this loader "
                                    f"builds {family} models")
    entries: Dict[str, Dict] = header["layers"]
    expected = set(header["fp_tensors"])
    for name, entry in entries.items():
        expected.update(_layer_tensor_names(path, name, entry, name + "."))
    missing = sorted(expected - set(keys))
    if missing:
        raise CheckpointError(path, f"{len(missing)} tensor(s) listed in the metadata are missing from the file "
                                    f"(e.g. {', '.join(missing[:3])}): the file is incomplete or was edited")
    unexpected = sorted(set(keys) - expected)
    if unexpected:
        raise CheckpointError(path, f"holds {len(unexpected)} tensor(s) its metadata does not list "
                                    f"(e.g. {', '.join(unexpected[:3])}): the file was edited")
    from safetensors import safe_open

    layers: "OrderedDict[str, nn.Module]" = OrderedDict()
    clocks: Dict = {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            def aligned(key):
                # CPU tensors of a file start wherever the file puts them (8-byte alignment); the CPU GEMMs pick
                # their code path by alignment, so an unaligned FP weight computes (slightly) different sums than
                # the saved model did. A copy gets the allocator's 64-byte alignment: bit-identical reloads. (The
                # quantized layers' codes are dequantized or read by our kernels: their alignment does not matter.)
                t = f.get_tensor(key)
                return t.clone() if t.device.type == "cpu" and t.data_ptr() % 64 else t

            fp_state = {k: aligned(k) for k in header["fp_tensors"]}
            for name, entry in entries.items():
                layers[name] = _build_layer(path, name, entry, name + ".", f.get_tensor, backend, clocks)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(path, f"could not read the tensors ({type(e).__name__}: {e})") from None
    if len(clocks) > 1:
        raise CheckpointError(path, "layers disagree on the timestep ranges they switch at")
    return QuantizedCheckpoint(path=path, header=header, fp_state=fp_state, layers=layers,
                               clock=next(iter(clocks.values()), None))


def _shape_stub(module: nn.Module) -> nn.Module:
    if not isinstance(module, nn.Linear) and hasattr(module, "in_features") and hasattr(module, "out_features"):
        return nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
    return module


def layer_shapes_digest(model: nn.Module) -> Tuple[str, str, int, str]:
    """(family, variant, number of quantizable layers, layers digest) of a model whose quantizable linears may be
    QuantLinear: the architecture part of fingerprint.model_fingerprint, which needs no FP weights."""
    rules, variant = find_rules(model)
    layers = quantizable_layers(model, rules, lambda name, m: _shape_stub(m))
    shapes = [(name, list(m.weight.shape)) for name, (m, _) in layers.items()]
    return rules.family, variant, len(shapes), hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]


def install_quantized(model: nn.Module, ckpt: QuantizedCheckpoint, dtype: Optional[torch.dtype] = None,
                      convert: Optional[Callable[[Dict], Dict]] = None) -> nn.Module:
    """Fill `model` (built from ckpt.shape_dict(), typically on the meta device) from the checkpoint.

    The quantized layers are replaced by the checkpoint's QuantLinear modules; the other tensors are assigned
    (not copied), cast to dtype, or, when dtype is None, to the dtype the built model gives them, as
    load_state_dict's copy would. convert(state_dict) may rename keys first (ComfyUI's process_unet_state_dict).
    Checks that every tensor is filled and that the layer shapes match the stored fingerprint.
    """
    path = ckpt.path
    for name, q in ckpt.layers.items():
        parent_name, _, attr = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, attr)
        except AttributeError:
            raise CheckpointError(path, f"layer {name} does not exist in the {type(model).__name__} built from this "
                                        "file's shapes") from None
        if isinstance(old, nn.Linear) and (old.in_features, old.out_features) != (q.in_features, q.out_features):
            raise CheckpointError(path, f"layer {name} is {q.in_features}->{q.out_features} in the file but "
                                        f"{old.in_features}->{old.out_features} in the model")
        setattr(parent, attr, q)
    state = dict(ckpt.fp_state)
    if convert is not None:
        state = convert(state)
    current = model.state_dict(keep_vars=True)
    qprefixes = tuple(name + "." for name in ckpt.layers)
    unexpected = sorted(k for k in state if k not in current)
    if unexpected:
        raise CheckpointError(path, f"holds tensors the {ckpt.variant or ckpt.family} model has no place for "
                                    f"(e.g. {', '.join(unexpected[:3])}): wrong model family or an edited file")
    to_load = {}
    for key, value in state.items():
        target = current[key]
        if tuple(target.shape) != tuple(value.shape):
            raise CheckpointError(path, f"tensor {key} has shape {list(value.shape)}, the model expects "
                                        f"{list(target.shape)}")
        want = (dtype or target.dtype) if value.is_floating_point() else target.dtype
        to_load[key] = value.to(want)
    missing = sorted(k for k in current if k not in to_load and not k.startswith(qprefixes))
    if missing:
        raise CheckpointError(path, f"{len(missing)} tensor(s) of the model are not in the file "
                                    f"(e.g. {', '.join(missing[:3])})")
    model.load_state_dict(to_load, strict=False, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(path, f"{len(left)} tensor(s) of the model got no data (e.g. {left[0]})")
    try:
        family, variant, count, digest = layer_shapes_digest(model)
    except UnsupportedModelError as e:
        raise CheckpointError(path, f"the model built from this file is not supported: {e}") from None
    fp = ckpt.header["fingerprint"]
    if (family, digest) != (fp.get("family"), fp.get("layers")) or variant != fp.get("variant"):
        raise CheckpointError(path, f"the layers in the file ({variant}, {count} quantizable layers) do not match "
                                    f"its fingerprint ({fp.get('variant')}, {fp.get('num_layers')} layers): the file "
                                    "was edited or is damaged")
    return model


def _plain_builder(ckpt: QuantizedCheckpoint) -> Callable[[Dict], nn.Module]:
    if ckpt.family != "pixart":
        raise CheckpointError(ckpt.path, f"holds a {ckpt.family} model; the plain-torch loader builds: pixart")
    from ..models.pixart import PixArt, pixart_config_from_state_dict

    model_info = ckpt.header["model"]

    def build(shapes: Dict) -> nn.Module:
        return PixArt(**pixart_config_from_state_dict(shapes), pe_interpolation=model_info.get("pe_interpolation"))

    return build


def load_quantized(path: PathLike, device: Union[str, torch.device] = "cpu", backend: str = "auto",
                   dtype: Optional[torch.dtype] = None, build_model: Optional[Callable[[Dict], nn.Module]] = None
                   ) -> Tuple[nn.Module, QuantizedCheckpoint]:
    """(model, checkpoint) in plain torch: the model is built on the meta device from the stored shapes (the
    plain-torch PixArt of models/pixart.py unless build_model is given) and filled from the file, so only the
    quantized weights and the non-quantized layers are ever allocated. dtype defaults to the saved model's."""
    ckpt = read_quantized(path, device=device, backend=backend)
    build = build_model or _plain_builder(ckpt)
    with torch.device("meta"):
        model = build(ckpt.shape_dict())
    install_quantized(model, ckpt, dtype=dtype or ckpt.model_dtype)
    from .apply import replace_layers
    from .fusions import fusion_patches

    replace_layers(model, fusion_patches(model, ckpt.layers))
    return model.eval(), ckpt


def describe_checkpoint(path: PathLike) -> Dict:
    """A short summary of a quantized file for people (CLI `load`), from its header alone."""
    header, keys, _ = read_header(path)
    s = header["summary"]
    return {"file": str(path), "bytes": pathlib.Path(path).stat().st_size, "format_version": header["format_version"],
            "tool_version": header.get("tool_version"), "family": header["family"], "variant": header.get("variant"),
            "preset": header.get("preset"), "plan": header.get("plan"), "calibrated": s.get("calibrated"),
            "layers_quantized": len(header["layers"]), "layers_kept_fp": s.get("layers_kept_fp"),
            "mean_weight_bits": s.get("mean_weight_bits"), "weight_bytes_fp16": s.get("weight_bytes_fp16"),
            "weight_bytes_quantized": s.get("weight_bytes_quantized"), "fp_tensors": len(header["fp_tensors"]),
            "model": header["model"], "fingerprint": header["fingerprint"]}
