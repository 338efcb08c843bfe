"""Quantized checkpoints inside ComfyUI (in-process): save/load nodes, stock KSampler, no FP weights, bad input."""
import hashlib
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from comfy_env import conditioning, import_comfyui, requires_comfyui, write_tiny_checkpoint
from viditq.quant_core import QuantLinear, QuantPlan
from viditq.quant_core import checkpoint as ckpt_mod
from viditq.quant_core.checkpoint import CheckpointError

pytestmark = requires_comfyui
LATENT = 48  # the smallest square latent ComfyUI's PixArt position embedding accepts (round(48 / 64) = 1)


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    import_comfyui()
    import comfy.sd

    path = write_tiny_checkpoint(tmp_path_factory.mktemp("diffusion_models"))
    from viditq.nodes import checkpoint_nodes
    from viditq.nodes.quantize import ViDiTQQuantize

    return {"model": comfy.sd.load_diffusion_model(str(path)), "nodes": checkpoint_nodes, "quantize": ViDiTQQuantize}


@pytest.fixture()
def folder(comfy, tmp_path, monkeypatch):
    """models/vidit_q pointed at a temporary folder (never the ComfyUI checkout's own)."""
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "vidit_q", ([str(tmp_path)], {".safetensors"}))
    return tmp_path


def _ksample(model, steps=1, seed=5):
    import nodes

    latent = {"samples": torch.zeros(1, 4, LATENT, LATENT)}
    (out,) = nodes.common_ksampler(model, seed, steps, 4.5, "euler", "normal", conditioning("a red cube"),
                                   conditioning(""), latent)
    return out["samples"]


def _quantized(comfy, preset="w4a8", mixed=True):
    model = comfy["model"]
    plan = None
    if mixed:  # the mlp at 8 bits, the rest at 4: both packings in one file
        from viditq.nodes.comfy_glue import diffusion_model, fp_lookup
        from viditq.quant_core import describe_model

        _, _, layers, fingerprint = describe_model(diffusion_model(model), fp_lookup(model))
        plan = QuantPlan(fingerprint=fingerprint, layers={n: {"w_bits": 8} for n in layers if ".mlp." in n})
    (model_q,) = comfy["quantize"].execute(model, preset, None, plan, "auto").args
    return model_q


def test_save_then_load_gives_bit_identical_sampling(comfy, folder):
    nodes_mod = comfy["nodes"]
    model_q = _quantized(comfy)
    ref = _ksample(model_q)
    out = nodes_mod.ViDiTQSaveQuantized.execute(model_q, "pixart/test_w4a8")
    (name,) = out.args
    assert name == "pixart/test_w4a8_00001_.safetensors" and (folder / name).is_file()
    assert name in nodes_mod.ViDiTQLoadQuantized.define_schema().inputs[0].options
    (loaded,) = nodes_mod.ViDiTQLoadQuantized.execute(name).args
    assert torch.equal(_ksample(loaded), ref)
    # it is a quantized MODEL like ViDiTQQuantize's: summary, QuantLinear in the tree, refused where FP is needed
    summary = loaded.model_options["vidit_q"]
    assert summary["preset"] == "w4a8" and summary["checkpoint"] == "test_w4a8_00001_.safetensors"
    assert summary["fingerprint"] == model_q.model_options["vidit_q"]["fingerprint"]
    dm = loaded.model.diffusion_model
    # quantized layers; where the 8-bit MLPs fuse (quant_core/fusions.py), the GELU moved into fc2's quantize
    # (mlp.act -> Identity) and the block's forward that arms fc1 with the LayerNorm + modulate
    patched = {n: dm.get_submodule(n[len("diffusion_model."):]) for n in loaded.object_patches
               if not n.endswith(".forward")}
    assert all(isinstance(m, QuantLinear) or (n.endswith(".mlp.act") and isinstance(m, torch.nn.Identity))
               for n, m in patched.items()), {n: type(m).__name__ for n, m in patched.items()}
    assert sum(isinstance(m, QuantLinear) for m in patched.values()) >= 4
    with pytest.raises(ValueError, match="already quantized"):
        comfy["quantize"].execute(loaded, "w8a8", None, None, "auto")
    assert loaded.model_size() < comfy["model"].model_size() * 0.6
    # saving the loaded MODEL again gives the same tensors (and numbering continues)
    (name2,) = nodes_mod.ViDiTQSaveQuantized.execute(loaded, "pixart/test_w4a8").args
    assert name2.endswith("_00002_.safetensors")
    from safetensors.torch import load_file

    a, b = load_file(str(folder / name)), load_file(str(folder / name2))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loaded_model_in_the_compare_sampler(comfy, folder):
    from viditq.nodes.sampler import ViDiTQQuantizedSampler

    nodes_mod = comfy["nodes"]
    path = nodes_mod.save_model(_quantized(comfy, "w8a8", mixed=False), folder / "w8a8.safetensors")
    (loaded,) = nodes_mod.ViDiTQLoadQuantized.execute(path.name, "torch", "default").args
    latent = {"samples": torch.zeros(1, 4, LATENT, LATENT)}
    out = ViDiTQQuantizedSampler.execute(comfy["model"], loaded, conditioning("a red cube"), conditioning(""), latent,
                                         3, 1, 4.5, "euler", "normal", 1.0)
    report = json.loads(out.args[3])
    assert report["preset"] == "w8a8" and report["quantization"]["checkpoint"] == "w8a8.safetensors"
    assert report["psnr_db"] > 30


class _Shapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta and t.is_floating_point():
                self.shapes.add(tuple(t.shape))
        return out


def test_load_builds_no_fp_weights_for_quantized_layers(comfy, folder):
    nodes_mod = comfy["nodes"]
    path = nodes_mod.save_model(_quantized(comfy, "w8a8", mixed=False), folder / "w8a8.safetensors")
    with _Shapes() as seen:
        loaded = nodes_mod.load_model(path)
    # qkv, kv, fc1, fc2 weights have shapes no FP layer of PixArt has: none of them may exist, even briefly
    quant_only = {(3456, 1152), (2304, 1152), (4608, 1152), (1152, 4608)}
    assert not quant_only & seen.shapes
    assert loaded.model.diffusion_model.blocks[0].mlp.fc1.qweight.dtype == torch.int8


def test_save_refuses_models_not_quantized_by_vidit_q(comfy, folder):
    with pytest.raises(ValueError, match="needs a MODEL quantized by ViDiT-Q Quantize"):
        comfy["nodes"].ViDiTQSaveQuantized.execute(comfy["model"], "plain")
    assert not list(folder.iterdir())


def test_overwrite_replaces_only_after_a_complete_write(comfy, folder, monkeypatch):
    nodes_mod = comfy["nodes"]
    model_q = _quantized(comfy, "w8a8", mixed=False)
    (name,) = nodes_mod.ViDiTQSaveQuantized.execute(model_q, "fixed", True).args
    assert name == "fixed.safetensors"
    before = hashlib.sha256((folder / name).read_bytes()).hexdigest()

    def crash(tensors, path, metadata):
        with open(path, "wb") as f:
            f.write(b"\x00" * 4096)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "_write_safetensors", crash)
    with pytest.raises(CheckpointError, match="No space left.*previous file is unchanged"):
        nodes_mod.ViDiTQSaveQuantized.execute(model_q, "fixed", True)
    assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == before
    assert [p.name for p in folder.iterdir()] == ["fixed.safetensors"]
    with pytest.raises(ValueError, match="outside"):
        nodes_mod.ViDiTQSaveQuantized.execute(model_q, "../escape", True)


def test_load_errors_name_the_file(comfy, folder):
    nodes_mod = comfy["nodes"]
    path = nodes_mod.save_model(_quantized(comfy, "w8a8", mixed=False), folder / "good.safetensors")
    (folder / "cut.safetensors").write_bytes(path.read_bytes()[:100000])
    with pytest.raises(CheckpointError, match="cut.safetensors.*truncated"):
        nodes_mod.ViDiTQLoadQuantized.execute("cut.safetensors")
    fp_file = write_tiny_checkpoint(folder / "fp")
    with pytest.raises(CheckpointError, match="tiny_pixart_sigma.safetensors.*not a ViDiT-Q quantized checkpoint"):
        nodes_mod.load_model(fp_file)
    with pytest.raises(FileNotFoundError):
        nodes_mod.ViDiTQLoadQuantized.execute("nope.safetensors")


def test_save_records_the_graph_like_comfyui_savers(comfy, folder):
    from comfy_api.latest import io
    from safetensors import safe_open

    nodes_mod = comfy["nodes"]
    prompt = {"1": {"class_type": "ViDiTQSaveQuantized", "inputs": {"filename_prefix": "g"}}}
    node = nodes_mod.ViDiTQSaveQuantized.PREPARE_CLASS_CLONE(
        {io.Hidden.prompt: prompt, io.Hidden.extra_pnginfo: {"workflow": {"nodes": []}}})
    (name,) = node.execute(_quantized(comfy, "w8a8", mixed=False), "g", True, "fp16").args
    with safe_open(str(folder / name), "pt") as f:
        meta = f.metadata()
        assert f.get_tensor("t_block.1.weight").dtype == torch.float16  # fp_dtype
    assert json.loads(meta["prompt"]) == prompt and json.loads(meta["workflow"]) == {"nodes": []}
    (loaded,) = nodes_mod.ViDiTQLoadQuantized.execute(name).args  # the graph is outside the sealed header
    assert loaded.model_options["vidit_q"]["preset"] == "w8a8"


@pytest.mark.skipif(ckpt_mod.TimestepSwitchLinear is None, reason="no per-timestep-range plans in this version")
def test_timestep_range_plan_round_trip_in_comfyui(comfy, folder):
    from viditq.nodes.comfy_glue import diffusion_model, fp_lookup
    from viditq.quant_core import describe_model

    nodes_mod = comfy["nodes"]
    model = comfy["model"]
    _, _, layers, fingerprint = describe_model(diffusion_model(model), fp_lookup(model))
    names = list(layers)
    plan = QuantPlan(fingerprint=fingerprint, layers={}, timestep_ranges=2,
                     range_layers={names[0]: [{"w_bits": 8}, {"w_bits": 4}],
                                   names[-1]: [{"w_bits": 16}, {"w_bits": 4}]})
    (model_q,) = comfy["quantize"].execute(model, "w4a8", None, plan, "auto").args
    assert set(nodes_mod.quantized_layers(model_q)) == set(names)  # switch layers are saved too
    ref = _ksample(model_q)
    path = nodes_mod.save_model(model_q, folder / "ranges.safetensors")
    loaded = nodes_mod.load_model(path)  # installs the timestep wrapper itself (without it the layers refuse to run)
    assert torch.equal(_ksample(loaded), ref)
