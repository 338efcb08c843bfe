"""OpenSORA inside ComfyUI (in-process): loader + version detection, model sampling mapping, plain-torch parity,
4-frame video calibrate -> quantize -> compare (temporal report), per-frame SD-VAE decode, video saving,
null caption, flow shift, and bad input through the loader node."""
import json

import pytest
import torch
from safetensors.torch import save_file

from comfy_env import conditioning, import_comfyui, requires_comfyui
from viditq.models.opensora import OpenSoraCheckpointError, load_opensora
from viditq.models.opensora.scheduler import iddpm_sigmas, official_flow_shift
from viditq.models.opensora.tiny import build_tiny_temporal_vae_state_dict, save_tiny_opensora
from viditq.models.tiny_pixart import build_tiny_pixart_state_dict

pytestmark = requires_comfyui
HIDDEN = 144
PSNR_BOUND_DB = {"1.0": 40.0, "1.2": 45.0}
FRAMES = {"1.0": 4, "1.2": 16}  # pixel frames giving 4 latent frames (1.2: 17 -> 5 per chunk, ceil(16 / 4) = 4)
CKPT = {"1.0": "tiny-opensora-v1-16x512x512.safetensors", "1.2": "tiny-opensora-stdit3.safetensors"}
VAE12 = "tiny-opensora-vae-v1.2.safetensors"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import_comfyui()
    import folder_paths

    from viditq.nodes import opensora_nodes

    folder = tmp_path_factory.mktemp("opensora_models")
    paths, _ = folder_paths.folder_names_and_paths[opensora_nodes.FOLDER]
    paths.insert(0, str(folder))
    for version, name in CKPT.items():  # caption 4096 x 120 tokens: the stand-in T5 features of comfy_env
        save_tiny_opensora(folder / name, version, hidden=HIDDEN, caption_channels=4096, token_num=120)
    pix = build_tiny_pixart_state_dict(0, hidden=1152, depth=1)
    save_file({k: v.half().contiguous() for k, v in pix.items()}, str(folder / "PixArt-Sigma-XL-2-1024-MS.safetensors"))
    raw = (folder / CKPT["1.0"]).read_bytes()
    (folder / "truncated.safetensors").write_bytes(raw[: len(raw) // 3])
    yield {"folder": folder, "nodes": opensora_nodes}
    paths.remove(str(folder))


def load(env, version, **kw):
    (model,) = env["nodes"].ViDiTQOpenSoraLoader.execute(CKPT[version], **kw).args
    return model


def _args(env, version, model, seed=3, steps=2):
    (latent,) = env["nodes"].EmptyOpenSoraLatent.execute(128, 128, FRAMES[version], 1, version).args
    (negative,) = env["nodes"].OpenSoraNullConditioning.execute(model).args
    return dict(positive=conditioning("a red fox running in snow"), negative=negative, latent_image=latent,
                seed=seed, steps=steps, cfg=7.0, sampler_name="euler", scheduler="normal")


def test_loader_wires_versions_onto_comfy_model_sampling(env):
    import comfy.model_base

    m10, m12 = load(env, "1.0"), load(env, "1.2")
    assert type(m10.model.diffusion_model).__name__ == "STDiT"
    assert type(m12.model.diffusion_model).__name__ == "ComfySTDiT3"
    assert m10.model.model_type == comfy.model_base.ModelType.EPS
    assert m12.model.model_type == comfy.model_base.ModelType.FLOW
    # IDDPM's linear betas are ComfyUI's discrete schedule table
    assert torch.allclose(m10.model.model_sampling.sigmas.double(), iddpm_sigmas(), rtol=1e-4)
    assert m12.model.model_sampling.multiplier == 1000 and m12.model.model_sampling.shift == 1.0
    for m in (m10, m12):
        assert m.model.latent_format.latent_dimensions == 3
    assert m10.model.diffusion_model.space_scale == 1.0  # "...16x512x512" file, no pos_embed table


@pytest.mark.parametrize("version", ["1.0", "1.2"])
def test_comfy_model_matches_plain_torch(env, version):
    model = load(env, version)
    plain, _ = load_opensora(env["folder"] / CKPT[version])
    x = torch.randn(2, 4, 3, 8, 8)
    ctx = torch.cat([conditioning("a")[0][0], conditioning("")[0][0]])
    t = torch.tensor([800.0, 120.0])
    dm = model.model.diffusion_model
    with torch.no_grad():
        a = plain(x, t, ctx)
        b = dm(x.to(dm.dtype), t, ctx.to(dm.dtype)).float()
    sign = 1.0 if version == "1.0" else -1.0  # ComfyUI flow models predict noise - x0
    assert (a - sign * b).norm() / a.norm() < 1e-3


@pytest.mark.parametrize("version", ["1.0", "1.2"])
def test_video_calibrate_quantize_compare(env, version):
    import nodes as comfy_nodes

    from viditq.nodes.calibrate import ViDiTQCalibrate
    from viditq.nodes.quantize import ViDiTQQuantize
    from viditq.nodes.sampler import ViDiTQQuantizedSampler

    model = load(env, version)
    a = _args(env, version, model)
    assert a["latent_image"]["samples"].shape == (1, 4, 4, 16, 16)
    (calib,) = ViDiTQCalibrate.execute(model, **a, timestep_buckets=4).args
    assert calib.branches_seen() == ["cond", "uncond"]
    assert set(calib.groups.values()) == {"self_attn", "temporal_attn", "cross_attn", "mlp"}
    (model_q,) = ViDiTQQuantize.execute(model, "w8a8", calib, None, "auto").args
    latent_fp, latent_q, image, text = ViDiTQQuantizedSampler.execute(model, model_q, **a, denoise=1.0).args
    report = json.loads(text)
    assert latent_fp["samples"].shape == latent_q["samples"].shape == (1, 4, 4, 16, 16)
    assert torch.isfinite(latent_q["samples"]).all()
    assert report["preset"] == "w8a8" and report["psnr_db"] > PSNR_BOUND_DB[version], report
    tm = report["temporal"]
    assert tm["frames"] == 4 and 0 < tm["frame_diff_rel_l2"] < 0.05 and tm["frame_cosine_abs_diff"] < 0.01
    assert image.shape == (4, 128, 3 * 128 + 8, 3)  # one FP | quantized | error frame per video frame
    assert report["quantization"]["variant"] == f"opensora_v{version.replace('.', '_')}"
    # the quantized MODEL runs in the stock KSampler; the FP one is unchanged
    (out,) = comfy_nodes.common_ksampler(model_q, 3, 2, 7.0, "euler", "normal", a["positive"], a["negative"],
                                         a["latent_image"])
    assert torch.allclose(out["samples"], latent_q["samples"])
    (fp_again,) = comfy_nodes.common_ksampler(model, 3, 2, 7.0, "euler", "normal", a["positive"], a["negative"],
                                              a["latent_image"])
    assert torch.equal(fp_again["samples"], latent_fp["samples"])


def test_text_kv_rule_option_through_the_loader(env):
    from viditq.nodes.quantize import ViDiTQQuantize

    (q_default,) = ViDiTQQuantize.execute(load(env, "1.0"), "w8a8", None, None, "auto").args
    (q_kv_fp,) = ViDiTQQuantize.execute(load(env, "1.0", text_kv="keep_fp"), "w8a8", None, None, "auto").args
    a, b = q_default.model_options["vidit_q"], q_kv_fp.model_options["vidit_q"]
    assert b["variant"] == "opensora_v1_0+text_kv_fp" and a["layers_quantized"] - b["layers_quantized"] == 2
    assert not any(k.endswith("kv_linear") for k in q_kv_fp.object_patches)


@pytest.fixture(scope="module")
def sd_vae(env):
    return _random_sd_vae()


def _random_sd_vae():
    """ComfyUI's stock SD VAE (AutoencoderKL, the sd-vae-ft-ema architecture) with seeded random weights."""
    import comfy.sd

    return comfy.sd.VAE(sd=_random_sd_vae_state_dict())


def _random_sd_vae_state_dict():
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoencoderKL(ddconfig=ddconfig, embed_dim=4).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) * (0.5 / max(1, s[1:].numel()) ** 0.5) if len(s) > 1 else
          (torch.ones(s) if "norm" in k and k.endswith("weight") else torch.zeros(s)) for k, s in shapes.items()}
    return sd


def test_frames_decoded_one_by_one_by_the_stock_sd_vae(env, sd_vae):
    vae = sd_vae
    latent = torch.randn(2, 4, 3, 4, 4)
    with torch.inference_mode():
        (frames,) = env["nodes"].OpenSoraVAEDecode.execute({"samples": latent}, vae).args
        assert frames.shape == (6, 32, 32, 3)
        one = vae.decode(latent[1, :, 2][None])  # video 1, frame 2 on its own
    assert torch.allclose(frames[5], one[0], atol=1e-4)


def test_quantized_sampler_decodes_video_with_vae(env, sd_vae):
    from viditq.nodes.quantize import ViDiTQQuantize
    from viditq.nodes.sampler import ViDiTQQuantizedSampler

    model = load(env, "1.0")
    a = _args(env, "1.0", model, steps=1)
    a["latent_image"] = {"samples": torch.zeros(1, 4, 3, 4, 4)}
    (model_q,) = ViDiTQQuantize.execute(model, "w8a8", None, None, "auto").args
    with torch.inference_mode():
        _, _, image, text = ViDiTQQuantizedSampler.execute(model, model_q, **a, denoise=1.0,
                                                           vae=sd_vae).args
    report = json.loads(text)
    assert image.shape == (3, 32, 3 * 32 + 8, 3)
    assert report["image_temporal"]["frames"] == 3 and "frame_diff_rel_l2" in report["image_temporal"]
    assert report["image"]["psnr_db"] > 20


def test_null_caption_and_flow_shift(env):
    m10, m12 = load(env, "1.0"), load(env, "1.2")
    (neg,) = env["nodes"].OpenSoraNullConditioning.execute(m10).args
    assert torch.equal(neg[0][0][0], m10.model.diffusion_model.y_embedder.y_embedding.float())
    latent = {"samples": torch.zeros(1, 4, 15, 30, 53)}  # 240 x 424 px, 51 frames
    (shifted,) = env["nodes"].OpenSoraFlowShift.execute(m12, latent).args
    ms = shifted.get_model_object("model_sampling")
    assert ms.shift == pytest.approx(official_flow_shift(240, 424, 15)) and m12.model.model_sampling.shift == 1.0
    assert float(ms.calculate_denoised(torch.tensor(0.5), torch.ones(1), torch.zeros(1))) == -0.5  # flow (CONST)
    (manual,) = env["nodes"].OpenSoraFlowShift.execute(m12, latent, 3.0).args
    assert manual.get_model_object("model_sampling").shift == 3.0
    with pytest.raises(ValueError, match="1.2"):
        env["nodes"].OpenSoraFlowShift.execute(m10, latent)


def test_save_video_formats_and_fallback(env, tmp_path, monkeypatch):
    import imageio.v3 as iio

    nodes_mod = env["nodes"]
    frames = torch.rand(5, 33, 47, 3)  # odd size: padded for mp4
    u8 = nodes_mod.to_uint8_frames(frames)
    for fmt in ("webp", "gif"):
        path, note = nodes_mod.write_video(u8, str(tmp_path / f"clip_{fmt}"), fmt, 8.0)
        assert note is None and path.endswith("." + fmt)
        from PIL import Image

        with Image.open(path) as im:
            assert im.n_frames == 5
    if nodes_mod._has_module("imageio_ffmpeg") or nodes_mod._has_module("av"):
        path, note = nodes_mod.write_video(u8, str(tmp_path / "clip"), "mp4", 8.0)
        assert path.endswith(".mp4") and note is None
        assert len(iio.imread(path, plugin="pyav" if nodes_mod._has_module("av") else None)) == 5
    monkeypatch.setattr(nodes_mod, "_has_module", lambda name: False)
    path, note = nodes_mod.write_video(u8, str(tmp_path / "fallback"), "mp4", 8.0)
    assert path.endswith(".webp") and "imageio-ffmpeg" in note
    with pytest.raises(ValueError, match="format"):
        nodes_mod.write_video(u8, str(tmp_path / "x"), "avi", 8.0)


def test_loader_bad_inputs_are_clear_errors(env):
    loader = env["nodes"].ViDiTQOpenSoraLoader
    with pytest.raises(OpenSoraCheckpointError, match=r"PixArt-Sigma-XL-2-1024-MS\.safetensors.*PixArt.*UNETLoader"):
        loader.execute("PixArt-Sigma-XL-2-1024-MS.safetensors")
    with pytest.raises(OpenSoraCheckpointError, match=r"truncated\.safetensors.*truncated"):
        loader.execute("truncated.safetensors")
    with pytest.raises(OpenSoraCheckpointError, match="version 1.2 was requested"):
        loader.execute(CKPT["1.0"], version="1.2")
    with pytest.raises(FileNotFoundError, match="models/opensora"):
        loader.execute("missing.safetensors")
    with pytest.raises(ValueError, match="OpenSORA MODEL"):
        import comfy.sd
        from comfy_env import write_tiny_checkpoint

        pix = comfy.sd.load_diffusion_model(str(write_tiny_checkpoint(env["folder"] / "pix")))
        env["nodes"].OpenSoraNullConditioning.execute(pix)


@pytest.fixture(scope="module")
def vae12(env):
    """A tiny OpenSORA 1.2 VAE file: narrow temporal VAE + ComfyUI's SD-VAE architecture as the spatial half."""
    sd = build_tiny_temporal_vae_state_dict(0)
    sd.update({"spatial_vae.module." + k: v.half() for k, v in _random_sd_vae_state_dict().items()})
    save_file({k: v.contiguous() for k, v in sd.items()}, str(env["folder"] / VAE12))
    (vae,) = env["nodes"].ViDiTQOpenSoraVAELoader.execute(VAE12).args
    return vae


def test_opensora_12_vae_decodes_and_encodes_video(env, vae12):
    import nodes as comfy_nodes

    assert vae12.latent_dim == 3
    latent = {"samples": torch.randn(1, 4, 6, 4, 4, generator=torch.Generator().manual_seed(0))}
    with torch.inference_mode():
        (frames,) = env["nodes"].OpenSoraVAEDecode.execute(latent, vae12).args
        (stock,) = comfy_nodes.VAEDecode().decode(vae12, {"samples": latent["samples"][:, :, 5:]})
        (encoded,) = comfy_nodes.VAEEncode().encode(vae12, frames[:5])
    assert frames.shape == (17 + 1, 32, 32, 3) and torch.isfinite(frames).all()  # 5 + 1 latent frames
    assert torch.allclose(stock, frames[17:], atol=1e-5)  # chunks decode independently
    assert encoded["samples"].shape == (1, 4, 2, 4, 4)  # ceil(5 / 4) latent frames


def test_quantized_sampler_on_12_with_its_vae(env, vae12):
    from viditq.nodes.quantize import ViDiTQQuantize
    from viditq.nodes.sampler import ViDiTQQuantizedSampler

    model = load(env, "1.2")
    a = _args(env, "1.2", model, steps=1)
    a["latent_image"] = {"samples": torch.zeros(1, 4, 2, 4, 4)}
    (model_q,) = ViDiTQQuantize.execute(model, "w8a8", None, None, "auto").args
    with torch.inference_mode():
        _, _, image, text = ViDiTQQuantizedSampler.execute(model, model_q, **a, denoise=1.0, vae=vae12).args
    report = json.loads(text)
    assert image.shape == (5, 32, 3 * 32 + 8, 3)  # 2 latent frames -> 4 * 2 - 3 video frames
    assert report["image_temporal"]["frames"] == 5 and report["temporal"]["frames"] == 2


def test_vae_and_dit_files_in_the_wrong_loader(env, vae12):
    with pytest.raises(OpenSoraCheckpointError, match=r"tiny-opensora-vae-v1\.2\.safetensors is the OpenSORA 1\.2 "
                                                      r"video VAE.*VAE Loader"):
        env["nodes"].ViDiTQOpenSoraLoader.execute(VAE12)
    with pytest.raises(OpenSoraCheckpointError, match=r"tiny-opensora-stdit3\.safetensors is a PixArt/OpenSORA DiT.*"
                                                      r"expected the OpenSORA 1\.2 VAE"):
        env["nodes"].ViDiTQOpenSoraVAELoader.execute(CKPT["1.2"])


@pytest.mark.parametrize("version", ["1.0", "1.2"])
def test_quantized_opensora_save_and_load(env, version, tmp_path, monkeypatch):
    """Save Quantized / Load Quantized round trip for OpenSORA (W4A8, text kv kept FP by the loader option): the
    loaded MODEL samples bit for bit like the quantized one, is the same OpenSORA version with its sampling, and is
    quantized (QuantLinear layers, no FP16 weights for them)."""
    import folder_paths

    from viditq.nodes.checkpoint_nodes import ViDiTQLoadQuantized, ViDiTQSaveQuantized
    from viditq.nodes.opensora_comfy import opensora_version_of
    from viditq.nodes.quantize import ViDiTQQuantize
    from viditq.quant_core import QuantLinear

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "vidit_q", ([str(tmp_path)], {".safetensors"}))
    model = load(env, version, text_kv="keep_fp")
    (model_q,) = ViDiTQQuantize.execute(model, "w4a8", None, None, "auto", "off").args
    a = _args(env, version, model)
    ref = _ksample(model_q, a)
    (name,) = ViDiTQSaveQuantized.execute(model_q, f"opensora/{version}").args
    (loaded,) = ViDiTQLoadQuantized.execute(name).args
    assert opensora_version_of(loaded) == version
    assert torch.equal(loaded.model.model_sampling.sigmas, model.model.model_sampling.sigmas)
    assert type(loaded.model.latent_format) is type(model.model.latent_format)
    assert torch.equal(_ksample(loaded, a), ref)
    dm = loaded.model.diffusion_model
    quantized = [n for n, m in dm.named_modules() if isinstance(m, QuantLinear)]
    assert quantized and len(quantized) == model_q.model_options["vidit_q"]["layers_quantized"]
    assert not any("cross_attn.kv_linear" in n for n in quantized)  # the loader's text_kv option survived the file
    assert loaded.model_size() < model.model_size() * 0.8  # (the tiny model is mostly embedders kept FP)
    # the model is built on the meta device: no FP weights are ever allocated for the layers the file quantizes
    from viditq.nodes.opensora_comfy import INFO_KEY, quantized_opensora_model

    empty = quantized_opensora_model(loaded.model_options[INFO_KEY], {}, torch.float16, torch.float16)
    assert all(t.is_meta for t in empty.diffusion_model.state_dict().values())
    # a MODEL without the loader's info cannot be saved in a form that loads back: said before any file is written
    model_q.model_options.pop(INFO_KEY)
    with pytest.raises(ValueError, match="OpenSORA Loader"):
        ViDiTQSaveQuantized.execute(model_q, "opensora/no_info")
    assert not list(tmp_path.glob("opensora/no_info*"))


def _ksample(model, a):
    import nodes

    (out,) = nodes.common_ksampler(model, a["seed"], a["steps"], a["cfg"], a["sampler_name"], a["scheduler"],
                                   a["positive"], a["negative"], a["latent_image"])
    return out["samples"]
