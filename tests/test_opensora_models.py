"""OpenSORA 1.0 STDiT / 1.2 STDiT3 in plain torch: official key layout, checkpoint loading, version detection,
bad files, scheduler mapping, and FP vs W8A8 sampling of a tiny 4-frame video (no ComfyUI needed)."""
import copy

import pytest
import torch
from safetensors.torch import save_file

from viditq.models.opensora import OpenSoraCheckpointError, detect_version, load_opensora, read_state_dict
from viditq.models.opensora.scheduler import (iddpm_betas, iddpm_sigmas, latent_frames, official_flow_shift,
                                              sample_flow_euler_cfg, shift_sigma)
from viditq.models.opensora.tiny import build_tiny_opensora_state_dict, save_tiny_opensora
from viditq.models.tiny_pixart import build_tiny_pixart_state_dict, pseudo_caption
from viditq.quant_core import (Calibrator, FingerprintMismatch, build_quant_layers, describe_model, get_preset,
                               replace_layers)
from viditq.quant_core.archs import find_rules
from viditq.quant_core.archs.opensora import set_rule_options
from viditq.quant_core.metrics import compare
from viditq.quant_core.temporal import temporal_metrics
from viditq.standalone.sampler import sample_euler_cfg

TOKENS, CAPTION = 16, 256
HIDDEN = 144  # two 72-wide heads, as STDiT-XL/2's head width
# W8A8 with calibration must stay above these; a broken method (e.g. w8a8-naive on 1.0) falls below
PSNR_BOUND_DB = {"1.0": 40.0, "1.2": 50.0}

# Official key names, read from hpcaitech/Open-Sora (v1.0.0 opensora/models/stdit/stdit.py, v1.2.0 stdit3.py,
# layers/blocks.py): written out here so a layout change in our model code cannot pass unnoticed.
OFFICIAL_10 = [
    "x_embedder.proj.weight", "x_embedder.proj.bias", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.bias",
    "t_block.1.weight", "y_embedder.y_proj.fc1.weight", "y_embedder.y_proj.fc2.bias", "y_embedder.y_embedding",
    "blocks.1.scale_shift_table", "blocks.1.attn.qkv.weight", "blocks.1.attn.proj.bias",
    "blocks.1.attn_temp.qkv.bias", "blocks.1.attn_temp.proj.weight", "blocks.1.cross_attn.q_linear.weight",
    "blocks.1.cross_attn.kv_linear.bias", "blocks.1.cross_attn.proj.weight", "blocks.1.mlp.fc1.weight",
    "blocks.1.mlp.fc2.bias", "final_layer.linear.weight", "final_layer.scale_shift_table"]
OFFICIAL_12 = [
    "x_embedder.proj.weight", "t_embedder.mlp.0.weight", "fps_embedder.mlp.0.weight", "fps_embedder.mlp.2.bias",
    "t_block.1.bias", "y_embedder.y_proj.fc1.weight", "y_embedder.y_embedding", "rope.freqs",
    "spatial_blocks.1.scale_shift_table", "spatial_blocks.1.attn.qkv.weight", "spatial_blocks.1.attn.q_norm.weight",
    "spatial_blocks.1.attn.k_norm.weight", "spatial_blocks.1.attn.proj.bias",
    "spatial_blocks.1.cross_attn.kv_linear.weight", "spatial_blocks.1.mlp.fc2.weight",
    "temporal_blocks.1.attn.qkv.bias", "temporal_blocks.1.attn.q_norm.weight", "temporal_blocks.1.cross_attn.proj.bias",
    "temporal_blocks.1.mlp.fc1.weight", "temporal_blocks.1.scale_shift_table", "final_layer.linear.bias",
    "final_layer.scale_shift_table"]


def tiny_path(tmp_path, version, name=None, **kw):
    kw.setdefault("hidden", HIDDEN)
    kw.setdefault("caption_channels", CAPTION)
    kw.setdefault("token_num", TOKENS)
    return save_tiny_opensora(tmp_path / (name or f"tiny_{version}.safetensors"), version, **kw)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("opensora")
    return {v: load_opensora(tiny_path(d, v))[0] for v in ("1.0", "1.2")}


def video_noise(frames=4, size=16, seed=1):
    return torch.randn(1, 4, frames, size, size, generator=torch.Generator().manual_seed(seed))


def run(model, version, steps=2, hook=None, cfg=7.0):
    cond, uncond = pseudo_caption("a red cube", TOKENS, CAPTION), pseudo_caption("", TOKENS, CAPTION)
    if version == "1.0":
        return sample_euler_cfg(model, video_noise(), cond, uncond, steps, cfg, on_model_call=hook)
    return sample_flow_euler_cfg(model, video_noise(), cond, uncond, steps, cfg, shift=2.0, on_model_call=hook)


@pytest.mark.parametrize("version,keys", [("1.0", OFFICIAL_10), ("1.2", OFFICIAL_12)])
def test_official_key_layout(version, keys):
    sd = build_tiny_opensora_state_dict(version, hidden=HIDDEN, depth=2, caption_channels=CAPTION, token_num=TOKENS)
    missing = [k for k in keys if k not in sd]
    assert not missing
    assert sd["x_embedder.proj.weight"].shape == (HIDDEN, 4, 1, 2, 2)
    assert sd["final_layer.linear.weight"].shape == (2 * 4 * 4, HIDDEN)  # learned sigma: 2C out, patch 1x2x2
    assert sd["t_block.1.weight"].shape == (6 * HIDDEN, HIDDEN)
    if version == "1.2":
        assert sd["rope.freqs"].shape == (36,) and sd["spatial_blocks.0.attn.q_norm.weight"].shape == (72,)


def test_checkpoints_load_in_both_formats_with_config_from_keys(tmp_path):
    p10 = tiny_path(tmp_path, "1.0", depth=3, pos_embed_grid=(16, 32, 32), space_scale=0.5)
    m10, info = load_opensora(p10)
    assert info["version"] == "1.0" and info["depth"] == 3 and info["num_heads"] == 2
    assert info["space_scale"] == 0.5  # read back from the official fixed pos_embed table
    assert len(m10.blocks) == 3 and not hasattr(m10, "pos_embed")
    # .pth through torch.load(weights_only=True), wrapped as training checkpoints are
    sd = build_tiny_opensora_state_dict("1.2", hidden=HIDDEN, caption_channels=CAPTION, token_num=TOKENS)
    torch.save({"ema": {"module." + k: v for k, v in sd.items()}}, tmp_path / "wrapped.pth")
    m12, info = load_opensora(tmp_path / "wrapped.pth")
    assert info["version"] == "1.2" and info["num_heads"] == 2 and info["qk_norm"]
    assert torch.equal(m12.spatial_blocks[0].attn.qkv.weight, sd["spatial_blocks.0.attn.qkv.weight"])
    # no pos_embed table: the official configs' scale by file name
    assert load_opensora(tiny_path(tmp_path, "1.0", "OpenSora-v1-HQ-16x256x256.safetensors"))[1]["space_scale"] == 0.5
    assert load_opensora(tiny_path(tmp_path, "1.0", "OpenSora-v1-HQ-16x512x512.safetensors"))[1]["space_scale"] == 1.0


@pytest.mark.parametrize("version", ["1.0", "1.2"])
def test_forward_shapes_padding_and_low_precision(models, version):
    model = models[version]
    ctx = pseudo_caption("x", TOKENS, CAPTION).repeat(2, 1, 1)
    x = torch.randn(2, 4, 3, 10, 14)  # odd-sized grid: padded to the patch, cropped back
    with torch.no_grad():
        out = model(x, torch.tensor([900.0, 10.0]), ctx)
        assert out.shape == x.shape and torch.isfinite(out).all()
        # the official [B, 1, M, C] caption layout and one caption for the whole batch work too
        assert torch.allclose(model(x, torch.tensor([900.0, 10.0]), ctx[:1, None]), out, atol=1e-5)
        bf16 = copy.deepcopy(model).to(torch.bfloat16)  # the fixture's model stays float32
        bf = bf16(x.bfloat16(), torch.tensor([900.0, 10.0]), ctx.bfloat16()).float()
    assert (bf - out).norm() / out.norm() < 0.1


def test_temporal_attention_mixes_frames(models):
    """A change in one frame reaches the other frames (temporal attention) in both versions."""
    ctx = pseudo_caption("x", TOKENS, CAPTION)
    for model in models.values():
        x = torch.randn(1, 4, 4, 8, 8)
        y = x.clone()
        y[:, :, 0] += 1.0
        with torch.no_grad():
            a, b = model(x, torch.tensor([500.0]), ctx), model(y, torch.tensor([500.0]), ctx)
        assert (a[:, :, 3] - b[:, :, 3]).abs().max() > 1e-4


def _calibrate(model, version):
    _, _, layers, fingerprint = describe_model(model)
    cal = Calibrator({n: m for n, (m, _) in layers.items()}, num_buckets=4)
    with cal, torch.no_grad():
        ref = run(model, version, hook=cal.set_step)
    return ref, cal.result(fingerprint)


def _quantized_run(model, version, preset, calib):
    layers, summary = build_quant_layers(model, get_preset(preset), calib)
    old = replace_layers(model, layers)
    try:
        with torch.no_grad():
            return run(model, version), summary
    finally:
        replace_layers(model, old)


@pytest.mark.parametrize("version", ["1.0", "1.2"])
def test_two_step_video_fp_vs_w8a8(models, version):
    model = models[version]
    ref, calib = _calibrate(model, version)
    assert ref.shape == (1, 4, 4, 16, 16) and torch.isfinite(ref).all()
    assert calib.branches_seen() == ["cond", "uncond"]
    out, summary = _quantized_run(model, version, "w8a8", calib)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert summary["layers_quantized"] == (18 if version == "1.0" else 28)  # 2 blocks (x2 kinds in 1.2)
    metrics = compare(ref, out)
    assert metrics["psnr_db"] > PSNR_BOUND_DB[version], metrics
    temporal = temporal_metrics(ref, out)
    assert temporal["frames"] == 4 and temporal["frame_diff_rel_l2"] < 0.05
    if version == "1.0":  # the bound means something: the per-tensor baseline fails it on this model
        naive, _ = _quantized_run(model, version, "w8a8-naive", calib)
        assert compare(ref, naive)["psnr_db"] < PSNR_BOUND_DB[version]


def test_rules_groups_and_text_kv_option(models):
    for version, model in models.items():
        rules, variant, layers, fp = describe_model(model)
        assert rules.family == "opensora" and variant == f"opensora_v{version.replace('.', '_')}"
        groups = {}
        for name, (_, g) in layers.items():
            groups.setdefault(g, []).append(name)
        assert set(groups) == {"self_attn", "temporal_attn", "cross_attn", "mlp"}
        temporal_prefix = "blocks.0.attn_temp." if version == "1.0" else "temporal_blocks.0.attn."
        assert temporal_prefix + "qkv" in groups["temporal_attn"]
        assert not any(k.startswith(("t_block", "x_embedder", "y_embedder", "t_embedder", "fps_embedder",
                                     "final_layer")) for k in layers)
        assert any(k.endswith("cross_attn.kv_linear") for k in layers)
        set_rule_options(model, keep_text_kv_fp=True)
        try:
            _, variant_kv, layers_kv, fp_kv = describe_model(model)
            assert variant_kv == variant + "+text_kv_fp"
            assert not any(k.endswith("kv_linear") for k in layers_kv)
            assert len(layers) - len(layers_kv) == sum(k.endswith("kv_linear") for k in layers)
            with pytest.raises(FingerprintMismatch):  # a calibration made under the other option is refused
                from viditq.quant_core.fingerprint import check_fingerprint
                check_fingerprint(fp, fp_kv, "calibration")
        finally:
            set_rule_options(model, keep_text_kv_fp=False)


def test_pixart_rules_do_not_claim_stdit(models):
    assert find_rules(models["1.0"])[0].family == "opensora"


def test_bad_checkpoints_are_clear_errors(tmp_path):
    pix = tmp_path / "PixArt-Sigma-XL-2-1024-MS.safetensors"
    save_file({k: v.contiguous() for k, v in build_tiny_pixart_state_dict(0, hidden=144, depth=1,
                                                                         caption_channels=32).items()}, str(pix))
    with pytest.raises(OpenSoraCheckpointError, match=r"PixArt-Sigma-XL-2-1024-MS\.safetensors.*PixArt.*STDiT"):
        load_opensora(pix)
    odd = tmp_path / "some_unet.safetensors"
    save_file({"input_blocks.0.0.weight": torch.zeros(2, 2), "out.2.bias": torch.zeros(2)}, str(odd))
    with pytest.raises(OpenSoraCheckpointError, match=r"some_unet\.safetensors: unknown key layout.*expected"):
        load_opensora(odd)
    good = tiny_path(tmp_path, "1.0")
    data = open(good, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(OpenSoraCheckpointError, match=r"cut\.safetensors.*truncated"):
        load_opensora(cut)
    torch.save(build_tiny_opensora_state_dict("1.0", hidden=HIDDEN, depth=1, caption_channels=CAPTION,
                                              token_num=TOKENS), tmp_path / "full.pth")
    raw = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(OpenSoraCheckpointError, match=r"cut\.pth.*weights_only=True.*truncated"):
        load_opensora(tmp_path / "cut.pth")
    with pytest.raises(OpenSoraCheckpointError, match=r"tiny_1\.0\.safetensors is an OpenSORA 1\.0 checkpoint.*1\.2"):
        load_opensora(good, version="1.2")
    sd = read_state_dict(good)
    del sd["blocks.1.attn_temp.proj.weight"]
    save_file(sd, str(tmp_path / "holey.safetensors"))
    with pytest.raises(OpenSoraCheckpointError, match=r"holey\.safetensors is missing 1 weights.*attn_temp"):
        load_opensora(tmp_path / "holey.safetensors")
    with pytest.raises(OpenSoraCheckpointError, match="does not exist"):
        load_opensora(tmp_path / "nope.safetensors")
    with pytest.raises(OpenSoraCheckpointError, match="1.1"):
        detect_version({"blocks.0.attn_temp.qkv.weight": 0, "fl_embedder.mlp.0.weight": 0}, "v11.pth")


def test_scheduler_mapping():
    betas = iddpm_betas()
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    assert torch.allclose(betas[1:] - betas[:-1], betas[1:2] - betas[:1])  # linear in beta (ComfyUI: sqrt_linear)
    assert iddpm_sigmas()[-1] == pytest.approx(157.4, rel=1e-3)
    assert [latent_frames(n, "1.0") for n in (1, 16)] == [1, 16]
    assert [latent_frames(n, "1.2") for n in (1, 4, 16, 17, 51, 68, 70)] == [1, 1, 4, 5, 15, 20, 21]
    # official timestep_transform for 240p 9:16, 51 frames: sqrt(240*426/512^2) * sqrt(15)
    assert official_flow_shift(240, 426, 15) == pytest.approx(2.4173, rel=1e-3)
    assert official_flow_shift(512, 512, 1) == 1.0
    assert shift_sigma(0.5, 3.0) == pytest.approx(0.75)
