"""Our nodes inside ComfyUI (in-process): stock PixArt loading, calibrate -> quantize -> compare, bad input."""
import json

import pytest
import torch
import torch.nn as nn

from comfy_env import conditioning, import_comfyui, requires_comfyui, write_tiny_checkpoint
from viditq.models.pixart import PixArt, pixart_config_from_state_dict
from viditq.quant_core import FingerprintMismatch, UnsupportedModelError

pytestmark = requires_comfyui
PSNR_BOUND_DB = 50.0  # as in test_pixart_quant: w8a8 passes it, w8a8-naive does not


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    import_comfyui()
    import comfy.sd

    path = write_tiny_checkpoint(tmp_path_factory.mktemp("diffusion_models"))
    model = comfy.sd.load_diffusion_model(str(path))
    return {"model": model, "path": path}


@pytest.fixture(scope="module")
def nodes_mod():
    import_comfyui()
    from viditq.nodes.calibrate import ViDiTQCalibrate
    from viditq.nodes.quantize import ViDiTQQuantize
    from viditq.nodes.sampler import ViDiTQQuantizedSampler

    return ViDiTQCalibrate, ViDiTQQuantize, ViDiTQQuantizedSampler


def _args(seed=3, steps=2):
    latent = {"samples": torch.zeros(1, 4, 64, 64)}
    return dict(positive=conditioning("a red cube"), negative=conditioning(""), latent_image=latent, seed=seed,
                steps=steps, cfg=4.5, sampler_name="euler", scheduler="normal")


def _ksample(model, a):
    import nodes

    (out,) = nodes.common_ksampler(model, a["seed"], a["steps"], a["cfg"], a["sampler_name"], a["scheduler"],
                                   a["positive"], a["negative"], a["latent_image"])
    return out["samples"]


def test_comfyui_detects_and_loads_the_tiny_official_layout(loaded):
    model = loaded["model"]
    assert type(model.model).__name__ == "PixArt"
    assert type(model.model.model_config).__name__ == "PixArtSigma"
    dm = model.model.diffusion_model
    assert len(dm.blocks) == 1 and dm.hidden_size == 1152


def test_plain_torch_pixart_matches_comfyui(loaded):
    from safetensors.torch import load_file

    sd = {k: v.float() for k, v in load_file(str(loaded["path"])).items()}
    ours = PixArt(**pixart_config_from_state_dict(sd))
    ours.load_state_dict(sd)
    theirs = loaded["model"].model.diffusion_model
    x = torch.randn(2, 4, 64, 64)
    t = torch.tensor([800.0, 120.0])
    ctx = torch.cat([conditioning("a")[0][0], conditioning("")[0][0]])
    with torch.no_grad():
        a, b = ours(x, t, ctx), theirs(x.to(theirs.dtype), t, ctx.to(theirs.dtype)).float()
    assert (a - b).norm() / b.norm() < 1e-3


def test_calibrate_quantize_compare_end_to_end(loaded, nodes_mod):
    calibrate, quantize, qsampler = nodes_mod
    model = loaded["model"]
    a = _args()
    fp_before = _ksample(model, a)
    (calib,) = calibrate.execute(model, **a, timestep_buckets=4).args
    assert calib.branches_seen() == ["cond", "uncond"] and len(calib.absmax) == 7
    (model_q,) = quantize.execute(model, "w8a8", calib, None, "auto").args
    assert model_q is not model
    out = qsampler.execute(model, model_q, **a, denoise=1.0)
    latent_fp, latent_q, image, text = out.args
    report = json.loads(text)
    for key in ("psnr_db", "rel_l2", "cosine", "seconds_fp", "seconds_q", "preset"):
        assert key in report
    assert report["preset"] == "w8a8" and report["psnr_db"] > PSNR_BOUND_DB
    # one timed diffusion-model call per step (cond and uncond batched), steady medians of both models
    assert report["model_calls"] == a["steps"], report
    assert report["ms_per_call_fp"] > 0 and report["ms_per_call_q"] > 0
    assert report["speedup_per_call"] == pytest.approx(report["ms_per_call_fp"] / report["ms_per_call_q"])
    from comfy.patcher_extension import WrappersMP
    assert not model_q.get_wrappers(WrappersMP.APPLY_MODEL, "vidit_q_call_timer")  # the timer lives on a clone
    assert image.ndim == 4 and image.shape[-1] == 3 and image.shape[2] > 2 * image.shape[1]
    # the quantized clone really runs different (quantized) linears, and the FP16 MODEL is unchanged
    assert not torch.equal(latent_fp["samples"], latent_q["samples"])
    assert torch.equal(_ksample(model, a), fp_before)
    assert torch.equal(latent_fp["samples"], fp_before)
    (naive_q,) = quantize.execute(model, "w8a8-naive", calib, None, "auto").args
    naive = json.loads(qsampler.execute(model, naive_q, **a, denoise=1.0).args[3])
    assert naive["psnr_db"] < PSNR_BOUND_DB < report["psnr_db"]


def test_quantize_without_calibration_says_so(loaded, nodes_mod, caplog):
    _, quantize, _ = nodes_mod
    with caplog.at_level("WARNING", logger="vidit_q"):
        (model_q,) = quantize.execute(loaded["model"], "w8a8", None, None, "auto").args
    assert "no calibration" in caplog.text
    assert model_q.model_options["vidit_q"]["calibrated"] is False


def test_bad_inputs_are_clear_errors(loaded, nodes_mod, tmp_path):
    import comfy.model_patcher
    import comfy.sd

    calibrate, quantize, _ = nodes_mod
    model = loaded["model"]
    with pytest.raises(ValueError, match="unknown preset"):
        quantize.execute(model, "w3a3", None, None, "auto")
    (model_q,) = quantize.execute(model, "w8a8", None, None, "auto").args
    with pytest.raises(ValueError, match="already quantized"):
        quantize.execute(model_q, "w8a8", None, None, "auto")
    with pytest.raises(ValueError, match="already quantized"):
        calibrate.execute(model_q, **_args())
    other = comfy.sd.load_diffusion_model(str(write_tiny_checkpoint(tmp_path, seed=5)))
    (calib_other,) = calibrate.execute(other, **_args(steps=1)).args
    with pytest.raises(FingerprintMismatch, match="different checkpoint"):
        quantize.execute(model, "w8a8", calib_other, None, "auto")

    class NotADiT(nn.Module):
        def __init__(self):
            super().__init__()
            self.diffusion_model = nn.Sequential(nn.Linear(4, 4))

    fake = comfy.model_patcher.ModelPatcher(NotADiT(), torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(UnsupportedModelError, match="PixArt"):
        quantize.execute(fake, "w8a8", None, None, "auto")


def test_quantize_sees_the_models_own_weight_patches(loaded, nodes_mod):
    """A LoRA-style weight patch on the FP MODEL is what gets quantized (not the bare base weights)."""
    import comfy.model_management

    _, quantize, _ = nodes_mod
    model = loaded["model"]
    # ComfyUI's add_patches only accepts keys of the live state dict: unload the quantized clones of the
    # tests above (their object patches stand in the tree while they stay loaded)
    comfy.model_management.unload_all_models()
    patched = model.clone()
    key = "diffusion_model.blocks.0.mlp.fc1.weight"
    # a plain "diff" patch (the live module may be another clone's QuantLinear, so the shape is spelled out)
    patched.add_patches({key: (torch.full((4 * 1152, 1152), 0.05),)}, 1.0, 1.0)
    (q_plain,) = quantize.execute(model, "w8a8", None, None, "auto").args
    (q_patched,) = quantize.execute(patched, "w8a8", None, None, "auto").args
    name = key[: -len(".weight")]
    from viditq.kernels.reference import dequantize_weight

    w_plain = dequantize_weight(q_plain.object_patches[name].quantized_weight())
    w_patched = dequantize_weight(q_patched.object_patches[name].quantized_weight())
    assert not torch.allclose(w_plain, w_patched)
    assert q_plain.model_options["vidit_q"]["fingerprint"]["weights"] != \
        q_patched.model_options["vidit_q"]["fingerprint"]["weights"]
