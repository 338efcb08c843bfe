"""Quantized attention as a model option: the plain-torch PixArt hook, its quality cost on top of W8A8, and the
ComfyUI path (forward patches installed by ViDiTQQuantize, attention mode in the sampler's report)."""
import json

import pytest
import torch

from comfy_env import conditioning, import_comfyui, requires_comfyui, write_tiny_checkpoint
from helpers import calibrate, sample, tiny_pixart
from viditq.quant_core import build_quant_layers, compare, get_preset, replace_layers
from viditq.quant_core.attention import (ATTENTION_MODES, attention_forward_patches, make_attention_fn,
                                         set_pixart_attention)

STEPS = 6
COST_BOUND_DB = 1.0  # the target: quantized attention costs <= 1 dB PSNR on top of W8A8 linears


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([700.0, 300.0]), torch.randn(2, 16, 256, generator=g)


def test_hook_off_is_sdpa_and_each_mode_stays_close():
    model = tiny_pixart()
    x, t, ctx = _inputs()
    with torch.no_grad():
        ref = model(x, t, ctx)
        assert set_pixart_attention(model, "fp8") == 2 * len(model.blocks)  # self + cross attention per block
        outs = {}
        for mode in ATTENTION_MODES[1:]:
            set_pixart_attention(model, mode)
            outs[mode] = model(x, t, ctx)
        set_pixart_attention(model, "off")
        assert torch.equal(model(x, t, ctx), ref)
    for mode, out in outs.items():
        psnr = compare(ref, out)["psnr_db"]
        assert 25.0 < psnr < 120.0, (mode, psnr)  # quantized (differs), and close
    assert make_attention_fn("off") is None
    with pytest.raises(ValueError, match="attention mode"):
        set_pixart_attention(model, "fp4")


def test_attention_cost_on_top_of_w8a8_is_within_one_db():
    model = tiny_pixart()
    calib = calibrate(model)
    ref = sample(model, STEPS)
    q, _ = build_quant_layers(model, get_preset("w8a8"), calib)
    old = replace_layers(model, q)
    try:
        psnr = {"off": compare(ref, sample(model, STEPS))["psnr_db"]}
        for mode in ATTENTION_MODES[1:]:
            set_pixart_attention(model, mode)
            psnr[mode] = compare(ref, sample(model, STEPS))["psnr_db"]
            set_pixart_attention(model, "off")
    finally:
        replace_layers(model, old)
    # int8 (int8 Q K^T with K smoothing, bf16 P V) meets the target; fp8 (fp8 P V: 3 mantissa bits on P and V)
    # does not on this model (measured ~5 dB at 20 steps, bench/NOTES_e2e.md): bounded so a broken kernel fails
    assert psnr["off"] - psnr["int8"] <= COST_BOUND_DB, psnr
    assert psnr["off"] - psnr["fp8"] <= 8.0 and psnr["fp8"] > 45.0, psnr


def test_forward_patches_need_pixart_attention_modules():
    assert attention_forward_patches(torch.nn.Linear(4, 4), "off") == {}
    with pytest.raises(ValueError, match="no PixArt attention modules"):
        attention_forward_patches(torch.nn.Sequential(torch.nn.Linear(4, 4)), "fp8")


@requires_comfyui
def test_comfyui_quantize_node_attention_option(tmp_path):
    """ComfyUI's PixArt with ViDiTQQuantize(attention=fp8): the patched forwards give what the plain-torch model
    with the same weights and hook gives, the input MODEL is untouched, and the report names the mode."""
    import_comfyui()
    import comfy.sd
    from safetensors.torch import load_file
    from viditq.models.pixart import PixArt, pixart_config_from_state_dict
    from viditq.nodes.quantize import ViDiTQQuantize
    from viditq.nodes.sampler import ViDiTQQuantizedSampler

    path = write_tiny_checkpoint(tmp_path / "diffusion_models")
    model = comfy.sd.load_diffusion_model(str(path))
    (model_q,) = ViDiTQQuantize.execute(model, "fp16", None, None, "auto", "fp8").args
    assert model_q is not model
    assert model_q.model_options["vidit_q"]["attention"] == "fp8"
    patched = [k for k in model_q.object_patches if k.endswith(".forward")]
    assert len(patched) == 2  # one block: self + cross attention

    sd = {k: v.float() for k, v in load_file(str(path)).items()}
    ours = PixArt(**pixart_config_from_state_dict(sd))
    ours.load_state_dict(sd)
    set_pixart_attention(ours, "fp8")
    x = torch.randn(2, 4, 64, 64)  # ComfyUI's PixArt needs latents >= 64
    t = torch.tensor([800.0, 120.0])
    ctx = torch.cat([conditioning("a")[0][0], conditioning("")[0][0]])
    dm = model.model.diffusion_model
    with torch.no_grad():
        plain = dm(x.to(dm.dtype), t, ctx.to(dm.dtype)).float()
        model_q.patch_model()
        try:
            theirs = dm(x.to(dm.dtype), t, ctx.to(dm.dtype)).float()
        finally:
            model_q.unpatch_model()
        unpatched = dm(x.to(dm.dtype), t, ctx.to(dm.dtype)).float()
        a = ours(x, t, ctx)
    assert torch.equal(unpatched, plain)  # the FP MODEL is back to its own attention
    assert not torch.equal(theirs, plain)
    assert (a - theirs).norm() / theirs.norm() < 2e-2  # same quantized attention (fp16 vs fp32 weights aside)

    args = dict(positive=conditioning("a red cube"), negative=conditioning(""),
                latent_image={"samples": torch.zeros(1, 4, 64, 64)}, seed=3, steps=2, cfg=4.5, sampler_name="euler",
                scheduler="normal", denoise=1.0)
    (model_w8,) = ViDiTQQuantize.execute(model, "fp16", None, None, "auto", "int8").args
    report = json.loads(ViDiTQQuantizedSampler.execute(model, model_w8, **args).args[3])
    assert report["quantization"]["attention"] == "int8"
    assert report["quantization"]["attention_modules"] == 2
    assert report["psnr_db"] > 25.0
