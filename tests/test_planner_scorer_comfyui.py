"""External scorers inside ComfyUI (in-process): the node schemas, ViDiT-Q CLIP Scorer / Image Scorer built from
ComfyUI's own CLIP_VISION, CLIP and VAE classes (tiny seeded ones: a 2-layer CLIP ViT, a 2-layer SD1-style CLIP
text encoder with ComfyUI's real tokenizer, a TAESD decoder), and the planner node running with them on the tiny
PixArt checkpoint."""
import asyncio
import json

import pytest
import torch

from comfy_env import conditioning, import_comfyui, requires_comfyui, write_tiny_checkpoint

pytestmark = requires_comfyui
PROMPT = "a red cube"
TEXT_CFG = {"hidden_act": "quick_gelu", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
            "num_hidden_layers": 2, "max_position_embeddings": 77, "vocab_size": 49408, "layer_norm_eps": 1e-5,
            "bos_token_id": 0, "eos_token_id": 49407, "projection_dim": 32, "model_type": "clip_text_model"}
# the widgets of ViDiTQPlanner, in order: what saved workflows' widgets_values map onto (must not shift)
PLANNER_WIDGETS = ["seed", "steps", "cfg", "sampler_name", "scheduler", "budget", "budget_unit", "timestep_ranges",
                   "per_range_plan", "granularity", "low_preset", "filename_prefix"]


def _seeded_state_dict(shapes: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in shapes.items():
        s = torch.Size(s)
        if "norm" in k and k.endswith("weight"):
            out[k] = torch.ones(s)
        elif k.endswith("bias") or len(s) == 0:
            out[k] = torch.zeros(s)
        elif len(s) == 1:
            out[k] = torch.randn(s, generator=g) * 0.02
        else:
            out[k] = torch.randn(s, generator=g) * s[1:].numel() ** -0.5
    return out


def tiny_clip_vision(folder, dim=32, seed=0):
    """comfy.clip_vision.ClipVisionModel from a tiny CLIP ViT config (projection_dim = dim), seeded weights."""
    import comfy.clip_vision

    cfg = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 32,
           "image_size": 32, "intermediate_size": 64, "layer_norm_eps": 1e-5, "model_type": "clip_vision_model",
           "num_attention_heads": 2, "num_channels": 3, "num_hidden_layers": 2, "patch_size": 8,
           "projection_dim": dim}
    path = folder / f"tiny_clip_vision_{dim}.json"
    path.write_text(json.dumps(cfg))
    vision = comfy.clip_vision.ClipVisionModel(str(path))
    missing, unexpected = vision.load_sd(_seeded_state_dict({k: v.shape for k, v in vision.get_sd().items()}, seed))
    assert not missing and not unexpected
    return vision


def tiny_clip(seed=1):
    """comfy.sd.CLIP of ComfyUI's SD1 CLIP classes (SD1Tokenizer, SD1ClipModel) with a 32-wide text model."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    class TinyClipL(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            # return_projected_pooled=False, as ComfyUI's SD1 CLIP-L (SD1CheckpointClipModel)
            super().__init__(device=device, dtype=dtype, model_options=model_options,
                             textmodel_json_config=dict(TEXT_CFG), return_projected_pooled=False)

    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    target.params = {"clip_model": TinyClipL}
    clip = comfy.sd.CLIP(target)
    sd = _seeded_state_dict({k: v.shape for k, v in clip.cond_stage_model.state_dict().items()}, seed)
    missing, unexpected = clip.load_sd(sd, full_model=True)
    assert not missing and not unexpected
    return clip


def tiny_vae(seed=2):
    """comfy.sd.VAE holding a TAESD (ComfyUI detects it from the keys) with seeded weights."""
    import comfy.sd
    import comfy.taesd.taesd

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in comfy.taesd.taesd.TAESD().state_dict().items()}
    sd = _seeded_state_dict(shapes, seed)
    sd["vae_scale"], sd["vae_shift"] = torch.tensor(1.0), torch.tensor(0.0)
    return comfy.sd.VAE(sd=sd)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import_comfyui()
    import comfy.sd
    import folder_paths

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_planner.one_thread
    previous_out = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path_factory.mktemp("output")))
    from viditq.nodes.calibrate import ViDiTQCalibrate
    from viditq.nodes.planner import _SWEEP_CACHE, ViDiTQPlanner
    from viditq.nodes.scorers import ViDiTQClipScorer, ViDiTQImageScorer

    folder = tmp_path_factory.mktemp("models")
    model = comfy.sd.load_diffusion_model(str(write_tiny_checkpoint(folder)))
    args = dict(positive=conditioning(PROMPT), negative=conditioning(""),
                latent_image={"samples": torch.zeros(1, 4, 40, 40)}, seed=3, steps=2, cfg=4.5,
                sampler_name="euler", scheduler="normal")
    (calib,) = ViDiTQCalibrate.execute(model, **args, timestep_buckets=2).args
    yield dict(model=model, args=args, calib=calib, folder=folder, planner=ViDiTQPlanner, clip_node=ViDiTQClipScorer,
               image_node=ViDiTQImageScorer, vision=tiny_clip_vision(folder), clip=tiny_clip(), vae=tiny_vae())
    _SWEEP_CACHE.clear()
    folder_paths.set_output_directory(previous_out)
    torch.set_num_threads(previous_threads)


def plan_args():
    return dict(budget=5.0, budget_unit="avg_bits", timestep_ranges=2, per_range_plan=False, granularity="block",
                low_preset="w4a8", filename_prefix="")


def test_node_schemas_expose_the_scorer_inputs_without_shifting_widgets(env):
    from comfy_api.latest import io

    from viditq.nodes.extension import ViDiTQExtension

    schema = env["planner"].GET_SCHEMA()
    inputs = {i.id: i for i in schema.inputs}
    for name in ("text_scorer", "visual_scorer"):
        assert inputs[name].optional and inputs[name].io_type == "VIDITQ_SCORER"
    widget_inputs = tuple(t.Input for t in (io.Int, io.Float, io.String, io.Combo, io.Boolean))
    assert [i.id for i in schema.inputs if isinstance(i, widget_inputs)] == PLANNER_WIDGETS
    nodes = {cls.GET_SCHEMA().node_id: cls for cls in asyncio.run(ViDiTQExtension().get_node_list())}
    for node_id, sockets in (("ViDiTQClipScorer", ["clip_vision", "clip", "vae"]),
                             ("ViDiTQImageScorer", ["vae", "clip_vision"])):
        s = nodes[node_id].GET_SCHEMA()
        assert [o.io_type for o in s.outputs] == ["VIDITQ_SCORER"]
        assert [i.id for i in s.inputs if not isinstance(i, widget_inputs)] == sockets
    assert {i.id for i in nodes["ViDiTQImageScorer"].GET_SCHEMA().inputs if i.optional} == {"clip_vision"}


def test_clip_scorer_node_on_comfyui_models(env):
    (scorer,) = env["clip_node"].execute(env["vision"], env["clip"], env["vae"], PROMPT).args
    assert scorer.metric == "text" and scorer.latent_channels == 4
    # ComfyUI's SD1 CLIP gives the pooled output unprojected; the scorer uses the text_projection of it
    clip = env["clip"]
    _, pooled = clip.encode_from_tokens(clip.tokenize(PROMPT), return_pooled=True)
    proj = clip.cond_stage_model.clip_l.transformer.text_projection.weight.float()
    projected = torch.nn.functional.normalize(pooled[0].float() @ proj.T, dim=0)
    assert torch.allclose(scorer.text.float(), projected, atol=1e-5)
    assert not torch.allclose(scorer.text.float(), torch.nn.functional.normalize(pooled[0].float(), dim=0),
                              atol=1e-2)
    with pytest.raises(ValueError, match=r"embeds pictures in 48 dimensions but the text encoder's pooled "
                                         r"embedding has 32: these two models are not a CLIP pair"):
        env["clip_node"].execute(tiny_clip_vision(env["folder"], dim=48), env["clip"], env["vae"], PROMPT)
    with pytest.raises(ValueError, match="clip_image needs a CLIP vision model"):
        env["image_node"].execute(env["vae"], "clip_image")
    # ComfyUI's VAE.decode refuses a 5-D video latent with a per-image VAE: the scorers decode it frame by frame
    from viditq.nodes.scorer_glue import vae_decoder

    assert vae_decoder(env["vae"], "test")(torch.randn(1, 4, 3, 8, 8)).shape == (3, 64, 64, 3)


def test_planner_node_scores_with_the_connected_scorers(env):
    a = env["args"]
    plain = env["planner"].execute(env["model"], **a, **plan_args(), calib=env["calib"]).args[0]
    (text_scorer,) = env["clip_node"].execute(env["vision"], env["clip"], env["vae"], PROMPT).args
    (visual_scorer,) = env["image_node"].execute(env["vae"], "clip_image", "center", env["vision"]).args
    # with the planner's own vae connected too: the visual scorer decodes, the planner does not (one decode per run)
    out = env["planner"].execute(env["model"], **a, **plan_args(), calib=env["calib"], vae=env["vae"],
                                 text_scorer=text_scorer, visual_scorer=visual_scorer)
    plan, heat, _ = out.args
    info = plan.info["planner"]
    assert not info["sweep_reused"] and info["runs"] == 1 + 3 * 2 + 1 + 2
    assert info["scorers"] == {"visual": "external: " + visual_scorer.label, "text": "external: " + text_scorer.label}
    assert "CLIP score change vs FP16" in out.ui["text"][0] and "CLIP image-embedding drift" in out.ui["text"][0]
    ev = plan.info["evaluation"]
    assert {"clip_score", "clip_score_fp16", "clip_image_cosine"} <= set(ev["plan"]) & set(ev["uniform_low"])
    assert "image_ssim" not in ev["plan"]  # no decode through the planner's vae
    assert plain.info["planner"]["scorers"]["text"].startswith("built-in proxy")
    assert heat.ndim == 4 and float(heat.std()) > 0.05
    # each scorer changed the sensitivity of its own metric's units
    for unit, row in plan.info["sensitivity"].items():
        assert row["score_by_range"] != plain.info["sensitivity"][unit]["score_by_range"], unit
    # the same scorers again with another budget: the sweep is reused (the scorer nodes' outputs are cached)
    again = env["planner"].execute(env["model"], **a, **dict(plan_args(), budget=5.5), calib=env["calib"],
                                   vae=env["vae"], text_scorer=text_scorer, visual_scorer=visual_scorer).args[0]
    assert again.info["planner"]["sweep_reused"] and again.info["planner"]["scorers"] == info["scorers"]
    assert again.info["sensitivity"] == {u: dict(r, bits_by_range=again.info["sensitivity"][u]["bits_by_range"])
                                         for u, r in plan.info["sensitivity"].items()}


def test_planner_node_refuses_a_misconnected_scorer(env):
    (text_scorer,) = env["clip_node"].execute(env["vision"], env["clip"], env["vae"], PROMPT).args
    with pytest.raises(ValueError, match="visual_scorer input got a text alignment scorer .* connect it to "
                                         "text_scorer"):
        env["planner"].execute(env["model"], **env["args"], **plan_args(), visual_scorer=text_scorer)
    wide = dict(env["args"], latent_image={"samples": torch.zeros(1, 16, 16, 16)})
    with pytest.raises(ValueError, match="takes 4-channel latents but this latent has 16 channels"):
        env["planner"].execute(env["model"], **wide, **plan_args(), text_scorer=text_scorer)
