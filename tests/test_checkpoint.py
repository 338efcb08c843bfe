"""Quantized checkpoints in plain torch: bit-identical round trips, no FP weights on load, bad input, atomic saves."""
import hashlib
import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import viditq
from helpers import calibrate, sample, text_pair, tiny_pixart
from viditq.models.tiny_pixart import build_tiny_pixart_state_dict
from viditq.quant_core import QuantLinear, QuantPlan, build_quant_layers, get_preset, replace_layers
from viditq.quant_core import checkpoint as ckpt_mod
from viditq.quant_core.checkpoint import (CheckpointError, load_quantized, read_header, read_quantized,
                                          save_quantized)

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return tiny_pixart()


@pytest.fixture(scope="module")
def calib(model):
    return calibrate(model, steps=2)


def _inputs():
    cond, uncond = text_pair()
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    return x, torch.tensor([640.0, 35.0]), torch.cat([cond, uncond])


def _run(m, clock=None):
    x, t, ctx = _inputs()
    if clock is not None:
        clock.set_timesteps(t)
    with torch.no_grad():
        return m(x, t, ctx)


def _save(model, layers, summary, path, **kw):
    """Save with the quantized layers swapped in (as a plain-torch user has them), then restore the FP model."""
    old = replace_layers(model, layers)
    try:
        return save_quantized(path, model, layers, summary, **kw)
    finally:
        replace_layers(model, old)


def _quantized_output(model, layers, clock=None):
    old = replace_layers(model, layers)
    try:
        return _run(model, clock)
    finally:
        replace_layers(model, old)


ASYM_W4 = get_preset("w4a8").replace(name="w4a8-asym", w_symmetric=False)


@pytest.mark.parametrize("preset", ["w8a8", "w8a8-naive", "w8a8-fp8", "w6a6", "w4a8", "w4a8-g128", "w4a8-asym",
                                    "w4a8-g128-fast"])
def test_round_trip_is_bit_identical(model, calib, tmp_path, preset):
    config = ASYM_W4 if preset == "w4a8-asym" else get_preset(preset)
    layers, summary = build_quant_layers(model, config, calib)
    ref = _quantized_output(model, layers)
    path = _save(model, layers, summary, tmp_path / f"{preset}.safetensors")
    loaded, ckpt = load_quantized(path)
    assert torch.equal(_run(loaded), ref)
    for name, q in layers.items():  # every stored tensor comes back exactly, with its attributes
        got = loaded.get_submodule(name)
        # the loaded layer, or (where quant_core/fusions.py fuses it) its fused view sharing its tensors
        assert isinstance(got, QuantLinear) and (got is ckpt.layers[name] or got.qweight is ckpt.layers[name].qweight)
        for attr in ckpt_mod.LAYER_TENSORS:
            a, b = getattr(q, attr), getattr(got, attr)
            assert (a is None) == (b is None) and (a is None or (a.dtype == b.dtype and torch.equal(a, b))), attr
        assert (got.w_fmt, got.group_size, got.had_block, got.a_bits, got.act_fmt, got.w_pack) == \
               (q.w_fmt, q.group_size, q.had_block, q.a_bits, q.act_fmt, q.w_pack)
        if q.w_fmt == "int4":  # the file holds the "pairs" byte order whatever the layer keeps in memory
            with safe_open(str(path), "pt") as f:
                assert torch.equal(f.get_tensor(f"{name}.qweight"), q.file_qweight())
    if config.w_bits == 4:
        assert any(q.w_pack == "split16" for q in layers.values())
    fp_keys = {k for k in model.state_dict() if not k.startswith(tuple(n + "." for n in layers))}
    for k in fp_keys:
        assert torch.equal(loaded.state_dict()[k], model.state_dict()[k]), k
    header = ckpt.header
    assert header["preset"] == config.name and header["family"] == "pixart" and header["variant"] == "pixart_sigma"
    assert header["fingerprint"] == summary["fingerprint"] and header["tool_version"] == viditq.__version__
    assert header["format_version"] == ckpt_mod.FORMAT_VERSION
    # two-level group scales (w_gparam) need a format-2 reader; every other file stays readable by format 1
    two_level = any(getattr(q, "w_gparam", None) is not None for q in layers.values())
    assert two_level == (config.w_group_scale == "int8")
    assert header["min_reader_version"] == (2 if two_level else 1)


def test_sampling_round_trip_and_plan_with_fp_layer(model, calib, tmp_path):
    names = list(build_quant_layers(model, get_preset("w4a8"), calib)[0])
    plan_layers = {n: {"w_bits": 8} for n in names if ".mlp." in n}
    plan_layers[names[0]] = {"w_bits": 16}  # kept FP by the plan: stored as an ordinary FP tensor
    plan = QuantPlan(fingerprint=calib.fingerprint, layers=plan_layers, base_preset="w4a8")
    layers, summary = build_quant_layers(model, get_preset("w4a8"), calib, plan)
    assert names[0] not in layers and {q.w_fmt for q in layers.values()} == {"int4", "int8"}
    old = replace_layers(model, layers)
    try:
        ref = sample(model, steps=3)
        path = save_quantized(tmp_path / "plan.safetensors", model, layers, summary)
    finally:
        replace_layers(model, old)
    loaded, ckpt = load_quantized(path)
    assert isinstance(loaded.get_submodule(names[0]), torch.nn.Linear)
    assert torch.equal(sample(loaded, steps=3), ref)
    assert ckpt.header["plan"]["base_preset"] == "w4a8"


@pytest.mark.skipif(ckpt_mod.TimestepSwitchLinear is None, reason="no per-timestep-range plans in this version")
def test_timestep_range_plan_round_trip(model, calib, tmp_path):
    names = list(build_quant_layers(model, get_preset("w4a8"), calib)[0])
    plan = QuantPlan(fingerprint=calib.fingerprint, layers={}, base_preset="w4a8", timestep_ranges=2,
                     range_layers={names[1]: [{"w_bits": 8}, {"w_bits": 4}], names[2]: [{"w_bits": 16}, {"w_bits": 8}]})
    layers, summary = build_quant_layers(model, get_preset("w4a8"), calib, plan)
    clock = layers[names[1]].clock
    ref = _quantized_output(model, layers, clock)
    path = _save(model, layers, summary, tmp_path / "ranges.safetensors")
    loaded, ckpt = load_quantized(path)
    assert ckpt.clock is not None and ckpt.clock is loaded.get_submodule(names[2]).clock
    assert torch.equal(_run(loaded, ckpt.clock), ref)


class _Allocations(TorchDispatchMode):
    """Records the shape of every floating tensor an op returns off the meta device, and the bytes of the
    distinct storages behind them (views of one buffer count once)."""

    def __init__(self):
        super().__init__()
        self.shapes = []
        self.bytes = 0
        self._storages = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta and t.is_floating_point():
                self.shapes.append(tuple(t.shape))
                storage = t.untyped_storage()
                if storage.data_ptr() not in self._storages:
                    self._storages.add(storage.data_ptr())
                    self.bytes += storage.nbytes()
        return out


def test_loading_never_materializes_fp_weights_of_quantized_layers(model, tmp_path):
    layers, summary = build_quant_layers(model, get_preset("w8a8"), None)
    path = _save(model, layers, summary, tmp_path / "w8a8.safetensors")
    other_shapes = {tuple(v.shape) for k, v in model.state_dict().items()
                    if not k.startswith(tuple(n + "." for n in layers))}
    quant_shapes = {(q.out_features, q.in_features) for q in layers.values()} - other_shapes
    assert quant_shapes  # qkv, kv, fc1, fc2 have shapes no FP layer has
    with _Allocations() as alloc:
        loaded, _ = load_quantized(path)
    assert not quant_shapes & set(alloc.shapes), "an FP weight of a quantized layer was allocated while loading"
    fp_bytes_quantized_layers = sum(q.in_features * q.out_features * 4 for q in layers.values())
    # what may be allocated: aligned copies of the file's own FP tensors (checkpoint.read_quantized), and small
    # temporaries; not anything of the size of the quantized layers' FP weights
    file_fp_bytes = sum(v.numel() * v.element_size() for k, v in model.state_dict().items()
                        if not k.startswith(tuple(n + "." for n in layers)))
    assert alloc.bytes < file_fp_bytes + fp_bytes_quantized_layers / 2
    assert _run(loaded).isfinite().all()


# ---- bad input --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_file(model, tmp_path_factory):
    layers, summary = build_quant_layers(model, get_preset("w4a8"), None)
    path = _save(model, layers, summary, tmp_path_factory.mktemp("good") / "good.safetensors")
    return path


def _rewrite(src, dst, edit_header=None, drop=(), reseal=True, edit_metadata=None):
    with safe_open(str(src), "pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
    if edit_header is not None:
        header = json.loads(metadata[ckpt_mod.KEY_HEADER])
        edit_header(header)
        text = json.dumps(header, sort_keys=True, separators=(",", ":"))
        metadata[ckpt_mod.KEY_HEADER] = text
        if reseal:
            metadata[ckpt_mod.KEY_SHA] = hashlib.sha256(text.encode()).hexdigest()
    if edit_metadata is not None:
        edit_metadata(metadata)
    save_file(tensors, str(dst), metadata=metadata)
    return dst


def _error(path, **kw) -> str:
    with pytest.raises(CheckpointError) as e:
        load_quantized(path, **kw)
    assert str(path) in str(e.value)
    return str(e.value)


def test_truncated_and_foreign_files(good_file, tmp_path):
    data = good_file.read_bytes()
    for size in (len(data) // 2, len(data) - 1, 6):
        bad = tmp_path / f"truncated_{size}.safetensors"
        bad.write_bytes(data[:size])
        assert "truncated or corrupted" in _error(bad)
    plain = tmp_path / "fp16_model.safetensors"
    save_file({k: v.half() for k, v in build_tiny_pixart_state_dict(0, hidden=64, depth=1, caption_channels=64,
                                                                     token_num=4).items()}, str(plain))
    assert "not a ViDiT-Q quantized checkpoint" in _error(plain)
    assert "no such file" in _error(tmp_path / "missing.safetensors")


def test_tampered_metadata(good_file, tmp_path):
    def set_preset(h):
        h["preset"] = "w8a8"

    msg = _error(_rewrite(good_file, tmp_path / "a.safetensors", set_preset, reseal=False))
    assert "modified after saving" in msg
    # even with a recomputed checksum, inconsistent contents are caught
    name = None

    def wrong_shape(h):
        nonlocal name
        name = next(iter(h["layers"]))
        h["layers"][name]["w_fmt"] = "int8"

    msg = _error(_rewrite(good_file, tmp_path / "b.safetensors", wrong_shape))
    assert f"layer {name}" in msg and "qweight is torch.uint8" in msg

    def wrong_fingerprint(h):
        h["fingerprint"]["layers"] = "0" * 16

    assert "do not match its fingerprint" in _error(_rewrite(good_file, tmp_path / "c.safetensors",
                                                             wrong_fingerprint))

    def outer_version(m):
        m[ckpt_mod.KEY_FORMAT] = "7"

    assert "was edited" in _error(_rewrite(good_file, tmp_path / "d.safetensors", edit_metadata=outer_version))

    def not_json(m):
        m[ckpt_mod.KEY_HEADER] = "{broken"
        m[ckpt_mod.KEY_SHA] = hashlib.sha256(b"{broken").hexdigest()

    assert "not valid JSON" in _error(_rewrite(good_file, tmp_path / "e.safetensors", edit_metadata=not_json))


def test_two_level_tensors_that_contradict_the_layer(model, tmp_path):
    """w_gparam on a layer that cannot have it, or of the wrong shape / dtype: refused, naming the layer."""
    layers, summary = build_quant_layers(model, get_preset("w4a8-g128-fast"), None)
    path = _save(model, layers, summary, tmp_path / "fast.safetensors")
    name = next(n for n, q in layers.items() if q.w_gparam is not None)
    with safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for edit, problem in ((lambda t: t[:, :-1], "w_gparam is torch.uint8"),
                          (lambda t: t.to(torch.int32), "w_gparam is torch.int32")):
        bad = dict(tensors)
        bad[f"{name}.w_gparam"] = edit(tensors[f"{name}.w_gparam"]).contiguous()
        save_file(bad, str(tmp_path / "bad.safetensors"), metadata=metadata)
        msg = _error(tmp_path / "bad.safetensors")
        assert f"layer {name}" in msg and problem in msg

    def gparam_on_int8(h):
        h["layers"][name]["w_fmt"] = "int8"

    tensors8 = dict(tensors)
    q = layers[name]
    tensors8[f"{name}.qweight"] = torch.zeros(q.out_features, q.in_features, dtype=torch.int8)
    save_file(tensors8, str(tmp_path / "src8.safetensors"), metadata=metadata)
    msg = _error(_rewrite(tmp_path / "src8.safetensors", tmp_path / "c.safetensors", gparam_on_int8))
    assert "two-level group scales (w_gparam) need int4" in msg


def test_missing_and_extra_tensors(good_file, tmp_path):
    with safe_open(str(good_file), "pt") as f:
        keys = list(f.keys())
    qkey = next(k for k in keys if k.endswith(".qweight"))
    fpkey = "t_block.1.weight"
    for key in (qkey, fpkey):
        msg = _error(_rewrite(good_file, tmp_path / "missing.safetensors", drop=(key,)))
        assert "missing" in msg and key in msg

    with safe_open(str(good_file), "pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    tensors["blocks.0.attn.qkv.weight"] = torch.zeros(3)
    save_file(tensors, str(tmp_path / "extra.safetensors"), metadata=metadata)
    assert "does not list" in _error(tmp_path / "extra.safetensors")


def test_wrong_model_family(model, tmp_path):
    layers, summary = build_quant_layers(model, get_preset("w8a8"), None)
    foreign = {**summary, "fingerprint": {**summary["fingerprint"], "family": "sd3", "variant": "sd3_medium"}}
    path = _save(model, layers, foreign, tmp_path / "sd3.safetensors")
    assert "holds a sd3 model" in _error(path)
    with pytest.raises(CheckpointError, match="holds a sd3 model .* this loader builds pixart models"):
        read_quantized(path, family="pixart")


def _write_with_versions(model, path, version, min_reader):
    layers, summary = build_quant_layers(model, get_preset("w8a8"), None)
    old = replace_layers(model, layers)
    try:
        tensors, fp_names, entries, dtypes = ckpt_mod.collect_tensors(model, layers)
    finally:
        replace_layers(model, old)
    header = ckpt_mod.build_header(summary, fp_names, entries, dtypes)
    header.update(format_version=version, min_reader_version=min_reader, tool_version="9.9.0")
    return ckpt_mod.atomic_write(path, tensors, ckpt_mod.encode_metadata(header))


def test_other_format_versions(model, tmp_path):
    newer_readable = _write_with_versions(model, tmp_path / "v2ok.safetensors", 2, 1)
    loaded, ckpt = load_quantized(newer_readable)  # a newer writer that stays readable by format-1 readers
    assert ckpt.header["format_version"] == 2 and _run(loaded).isfinite().all()
    msg = _error(_write_with_versions(model, tmp_path / "v3.safetensors", 3, 3))
    assert "needs a reader of format 3" in msg and "9.9.0" in msg
    msg = _error(_write_with_versions(model, tmp_path / "v0.safetensors", 0, 0))
    assert "checkpoint format 0" in msg and "reads formats 1-2" in msg


def test_failed_save_never_destroys_the_previous_file(model, good_file, tmp_path, monkeypatch):
    target = tmp_path / "model.safetensors"
    target.write_bytes(good_file.read_bytes())
    before = hashlib.sha256(target.read_bytes()).hexdigest()
    layers, summary = build_quant_layers(model, get_preset("w8a8"), None)

    def crash_mid_write(tensors, path, metadata):  # half a file on disk, then the disk fills up
        with open(path, "wb") as f:
            f.write(b"\x00" * 1000)
        raise OSError(28, "No space left on device")

    def silent_garbage(tensors, path, metadata):  # a writer that "succeeds" but leaves a broken file
        with open(path, "wb") as f:
            f.write(b"garbage")

    for writer in (crash_mid_write, silent_garbage):
        monkeypatch.setattr(ckpt_mod, "_write_safetensors", writer)
        with pytest.raises(CheckpointError, match="previous file is unchanged") as e:
            _save(model, layers, summary, target)
        assert str(target) in str(e.value)
        assert hashlib.sha256(target.read_bytes()).hexdigest() == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temp files left
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="no file was written"):
        monkeypatch.setattr(ckpt_mod, "_write_safetensors", crash_mid_write)
        _save(model, layers, summary, tmp_path / "new.safetensors")
    assert not (tmp_path / "new.safetensors").exists()
    monkeypatch.undo()
    _save(model, layers, summary, target)  # a good save replaces it
    assert read_header(target)[0]["preset"] == "w8a8"


def test_save_refuses_what_it_cannot_describe(model, tmp_path):
    layers, summary = build_quant_layers(model, get_preset("w8a8"), None)
    target = tmp_path / "never.safetensors"
    with pytest.raises(ValueError, match="no quantized layers"):
        save_quantized(target, model, {}, summary)
    with pytest.raises(ValueError, match="fingerprint"):
        save_quantized(target, model, layers, {**summary, "fingerprint": {}})
    with pytest.raises(TypeError, match="not a ViDiT-Q quantized layer"):
        save_quantized(target, model, {"blocks.0.attn.qkv": torch.nn.Linear(2, 2)}, summary)
    assert not target.exists()


def test_cli_quantize_and_load(tmp_path, capsys):
    src = tmp_path / "fp16.safetensors"
    sd = build_tiny_pixart_state_dict(0, hidden=128, depth=1, caption_channels=64, token_num=8)
    save_file({k: v.half().contiguous() for k, v in sd.items()}, str(src))
    out = tmp_path / "q" / "w4a8.safetensors"
    r = subprocess.run([sys.executable, str(ROOT / "viditq_cli.py"), "quantize", "--checkpoint", str(src),
                        "--preset", "w4a8", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and out.is_file()
    header = read_header(out)[0]
    assert header["model"]["weight_dtype"] == "float16" and header["preset"] == "w4a8"
    spec = importlib.util.spec_from_file_location("viditq_cli_for_tests", ROOT / "viditq_cli.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)  # the rest in-process (the package is already imported as `viditq`)
    assert cli.main(["load", str(out), "--forward", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers_quantized"] == 7 and info["forward"]["finite"] and info["variant"] == "pixart_sigma"
    assert cli.main(["load", str(src)]) == 2
    err = capsys.readouterr().err
    assert "not a ViDiT-Q quantized checkpoint" in err and str(src) in err
