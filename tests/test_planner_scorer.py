"""External scorers for the planner (quant_core.sensitivity ClipScoreScorer / ImageScorer, nodes/scorer_glue.py)
with small deterministic stand-ins for ComfyUI's VAE, CLIP_VISION and CLIP: same methods, tiny torch modules."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import conftest  # noqa: F401  (registers the package `viditq`)
from helpers import calibrate, tiny_pixart
from test_planner import LOW, STEPS, one_thread, sample_fn  # noqa: F401  (one_thread: autouse fixture)
from viditq.nodes.scorer_glue import (build_clip_scorer, build_image_scorer, check_scorer_for, clip_image_encoder,
                                      clip_text_embedding, vae_decoder)
from viditq.quant_core import PlannerSettings, TorchRunner, describe_model
from viditq.quant_core.planner import allocate_plan, sensitivity_sweep
from viditq.quant_core.sensitivity import ClipScoreScorer, ImageScorer, Trace

RANGES = 2
PROMPT = "a red cube"


# -- stand-ins for ComfyUI's objects ------------------------------------------------------------------------------
def _seeded(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


class FakeVAE:
    """As comfy.sd.VAE: decode(latent [B, C, h, w]) -> IMAGE [B, 4h, 4w, 3] in 0..1; a fixed 1x1 colour mix."""

    def __init__(self, channels=4, seed=0):
        self.latent_channels = channels
        self.mix = _seeded(3, channels, seed=seed, scale=0.6)
        self.calls = 0

    def decode(self, latent):
        self.calls += 1
        x = torch.einsum("oc,bchw->bohw", self.mix, latent.float())  # a RuntimeError for other channel counts
        return torch.sigmoid(F.interpolate(x, scale_factor=4, mode="nearest")).movedim(1, -1)


class Output:
    """As comfy.clip_vision.Output."""

    def __getitem__(self, key):
        return getattr(self, key)


class FakeClipVision:
    """As comfy.clip_vision.ClipVisionModel: encode_image(image [B, H, W, 3], crop) -> .image_embeds [B, dim]."""

    def __init__(self, dim=32, seed=1, zero_projection=False):
        self.model = torch.nn.Linear(3 * 16 * 16, dim, bias=False)
        with torch.no_grad():
            self.model.weight.copy_(_seeded(dim, 3 * 16 * 16, seed=seed, scale=0.05))
            if zero_projection:
                self.model.weight.zero_()
        self.crops = []

    @torch.no_grad()
    def encode_image(self, image, crop=True):
        self.crops.append(crop)
        x = image[..., :3].movedim(-1, 1).float()
        if crop:
            s = min(x.shape[-2:])
            top, left = (x.shape[-2] - s) // 2, (x.shape[-1] - s) // 2
            x = x[..., top:top + s, left:left + s]
        x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
        out = Output()
        out.image_embeds = self.model((x - 0.5).flatten(1))
        out.last_hidden_state = out.image_embeds[:, None]
        return out


class FakeTextStage:
    """As SD1ClipModel (cond_stage_model): unprojected pooled output unless set_clip_options asks for the
    projected one, as ComfyUI's SD1 CLIP-L does; projection None: a T5-like encoder without a pooled output."""

    def __init__(self, dim, seed, projection="trained"):
        self.embed = _seeded(256, dim, seed=seed)
        self.proj = None if projection == "none" else (
            torch.zeros(dim, dim) if projection == "zero" else _seeded(dim, dim, seed=seed + 1, scale=dim ** -0.5))
        self.projected = False

    def reset_clip_options(self):
        self.projected = False

    def set_clip_options(self, options):
        self.projected = options.get("projected_pooled", self.projected)

    def encode_token_weights(self, tokens):
        ids = torch.tensor([t for t, _ in tokens["l"][0]])
        h = self.embed[ids]
        if self.proj is None:
            return h[None], None
        pooled = h.mean(0, keepdim=True)
        return h[None], pooled @ self.proj.T if self.projected else pooled


class FakeClip:
    """As comfy.sd.CLIP: tokenize(text), encode_from_tokens(tokens, return_pooled), cond_stage_model, load_model."""

    def __init__(self, dim=32, seed=2, projection="trained"):
        self.cond_stage_model = FakeTextStage(dim, seed, projection)

    def tokenize(self, text):
        return {"l": [[(ord(c) % 256, 1.0) for c in text]]}

    def load_model(self):
        return None

    def encode_from_tokens(self, tokens, return_pooled=False):
        self.cond_stage_model.reset_clip_options()
        cond, pooled = self.cond_stage_model.encode_token_weights(tokens)
        return (cond, pooled) if return_pooled else cond


# -- the test model ----------------------------------------------------------------------------------------------
def settings(**changes):
    d = dict(budget=5.0, timestep_ranges=RANGES, granularity="block", evaluate=False)
    d.update(changes)
    return PlannerSettings(**d)


@pytest.fixture(scope="module")
def env(one_thread):
    model = tiny_pixart()
    calib = calibrate(model, steps=STEPS)
    _, _, layers, fp = describe_model(model)
    runner = TorchRunner(model, sample_fn())
    base = sensitivity_sweep(layers, fp, runner, LOW, calib, settings())
    return dict(model=model, calib=calib, layers=layers, fp=fp, runner=runner, base=base)


def spy_on(scorer):
    """Record every evaluation (reference, test trace, damage) of a scorer object."""
    seen = []
    real = scorer.evaluate

    def evaluate(ref, test):
        damage, metrics = real(ref, test)
        seen.append((ref, test, damage))
        return damage, metrics

    scorer.evaluate = evaluate
    return seen


def column(sweep, metric):
    return sweep.damage[:, sweep.metrics.index(metric)]


def own_units(sweep, metric):
    return [i for i, u in enumerate(sweep.units) if u.metric == metric]


# -- the sweep uses the scorer -------------------------------------------------------------------------------------
def test_clip_scorer_replaces_the_text_proxy_in_the_sweep(env):
    vae, vision, clip = FakeVAE(), FakeClipVision(), FakeClip()
    scorer = build_clip_scorer(vision, clip, vae, PROMPT)
    assert isinstance(scorer, ClipScoreScorer) and scorer.metric == "text" and scorer.latent_channels == 4
    seen = spy_on(scorer)
    vae.calls = 0
    sweep = sensitivity_sweep(env["layers"], env["fp"], env["runner"], LOW, env["calib"],
                              settings(scorers={"text": scorer}))
    base = env["base"]
    trials = len(sweep.units) * RANGES
    # called for every trial and for the uniform low-bit run (twice there: damage, then the report numbers)
    assert len({id(t) for _, t, _ in seen}) == trials + 1 and len(seen) == trials + 2
    # the FP16 reference is decoded once, every run once
    assert vae.calls == 1 + trials + 1 and all(ref is sweep.reference for ref, _, _ in seen)
    order = [(ui, r) for r in sorted(range(RANGES), reverse=True) for ui in range(len(sweep.units))]
    text = sweep.metrics.index("text")
    assert [sweep.damage[ui, text, r].item() for ui, r in order] == [d for _, _, d in seen[:trials]]
    assert sweep.uniform_damage["text"] == seen[-1][2] > 0
    # it changes the metric it replaces, and only that one
    assert torch.equal(column(sweep, "visual"), column(base, "visual"))
    assert not torch.allclose(column(sweep, "text"), column(base, "text"))
    cross, vis = own_units(sweep, "text"), own_units(sweep, "visual")
    assert cross and not torch.allclose(sweep.score[cross], base.score[cross])
    assert torch.equal(sweep.score[vis], base.score[vis])
    # the damage is the squared change of the CLIP score, recomputed here from the stand-ins themselves
    _, test, damage = seen[0]
    text_emb = clip.cond_stage_model.embed[[ord(c) for c in PROMPT]].mean(0) @ clip.cond_stage_model.proj.T

    def cosines(latent):
        e = vision.encode_image(FakeVAE().decode(latent)).image_embeds.double()
        return F.cosine_similarity(e, text_emb.double()[None])

    expected = float(((cosines(test.final) - cosines(sweep.reference.final)) ** 2).mean())
    assert damage == pytest.approx(expected, rel=1e-6) and damage > 0
    assert sweep.uniform_metrics["clip_score_fp16"] == pytest.approx(
        100 * float(cosines(sweep.reference.final).mean()), rel=1e-6)
    env["clip_sweep"], env["clip_scorer"] = sweep, scorer


def test_the_scorer_uses_the_projected_text_embedding():
    """ComfyUI's SD1 CLIP-L returns its pooled output unprojected from encode_from_tokens: the scorer asks for
    the projected one (CLIP's shared image-text space), and restores the encoder's options."""
    clip = FakeClip()
    emb = clip_text_embedding(clip, PROMPT, "test")
    stage = clip.cond_stage_model
    unprojected = clip.encode_from_tokens(clip.tokenize(PROMPT), return_pooled=True)[1][0]
    assert torch.allclose(emb, unprojected @ stage.proj.T) and not torch.allclose(emb, unprojected)
    assert stage.projected is False


def test_scorers_are_named_in_the_plan_report_and_heat_map(env):
    sweep, scorer = env["clip_sweep"], env["clip_scorer"]
    result = allocate_plan(sweep, env["layers"], env["runner"], LOW, env["calib"],
                           settings(scorers={"text": scorer}, evaluate=True))
    info = result.plan.info["planner"]
    assert info["scorers"]["text"] == "external: " + scorer.label
    assert scorer.label.startswith("CLIP score change vs FP16 (32-d CLIP") and PROMPT in scorer.label
    assert info["scorers"]["visual"].startswith("built-in proxy")
    ev = result.evaluation
    for row in [ev["plan"], ev["uniform_low"]] + ev["random"]:
        assert {"clip_score", "clip_score_fp16", "clip_score_change"} <= set(row)
        assert row["clip_score_fp16"] == ev["plan"]["clip_score_fp16"]
    assert result.scorers == {"text": scorer.label}
    json.dumps(result.plan.info)
    img = result.heatmap()
    assert img.ndim == 4 and float(img.std()) > 0.05


def test_image_scorer_replaces_the_visual_proxy(env):
    vae = FakeVAE()
    scorer = build_image_scorer(vae, "ssim")
    assert isinstance(scorer, ImageScorer) and scorer.metric == "visual"
    sweep = sensitivity_sweep(env["layers"], env["fp"], env["runner"], LOW, env["calib"],
                              settings(scorers={"visual": scorer}))
    base = env["base"]
    assert torch.equal(column(sweep, "text"), column(base, "text"))
    assert not torch.allclose(column(sweep, "visual"), column(base, "visual"))
    assert (column(sweep, "visual") >= 0).all() and sweep.uniform_damage["visual"] > 0
    assert 0 < sweep.uniform_metrics["scored_image_ssim"] < 1
    # every image metric is a damage: 0 for the FP16 run itself, > 0 for the uniform low-bit one
    ref = sweep.reference
    uniform = Trace(final=ref.final + 0.05 * torch.randn_like(ref.final), steps=[], call_timesteps=[],
                    call_buckets=[])
    for kind in ("ssim", "psnr", "clip_image"):
        s = build_image_scorer(FakeVAE(), kind, FakeClipVision())
        assert s(ref, ref) == pytest.approx(0.0, abs=1e-12) and s(ref, uniform) > 0
    psnr = build_image_scorer(FakeVAE(), "psnr")
    mse = psnr(ref, uniform)
    assert psnr.metrics(ref, uniform)["scored_image_psnr_db"] == pytest.approx(-10 * math.log10(mse))


def test_scorer_sweeps_are_deterministic(env):
    a = build_clip_scorer(FakeClipVision(), FakeClip(), FakeVAE(), PROMPT, damage="score_drop")
    b = build_clip_scorer(FakeClipVision(), FakeClip(), FakeVAE(), PROMPT, damage="score_drop")
    layers = {n: v for n, v in env["layers"].items() if ".cross_attn." in n}
    s1 = sensitivity_sweep(layers, env["fp"], env["runner"], LOW, env["calib"], settings(scorers={"text": a}))
    s2 = sensitivity_sweep(layers, env["fp"], env["runner"], LOW, env["calib"], settings(scorers={"text": b}))
    assert torch.equal(s1.damage, s2.damage) and s1.uniform_damage == s2.uniform_damage
    drop = s1.uniform_metrics["clip_score_fp16"] - s1.uniform_metrics["clip_score"]
    assert s1.uniform_damage["text"] == pytest.approx(max(0.0, drop / 100), rel=1e-9, abs=1e-15)


def test_video_latents_are_scored_frame_by_frame():
    """A per-image VAE (OpenSORA 1.0's SD VAE) decodes a video latent [B, C, T, h, w] frame by frame (ComfyUI's
    VAE.decode refuses 5-D latents), and the CLIP score is the mean over frames (CLIPSIM)."""
    vae = FakeVAE()
    video = _seeded(2, 4, 3, 8, 8, seed=5)
    frames = vae_decoder(vae, "test")(video)
    assert frames.shape == (6, 32, 32, 3)
    assert torch.allclose(frames[4], vae.decode(video[1:2, :, 1])[0])  # video 1, frame 1
    scorer = build_clip_scorer(FakeClipVision(), FakeClip(), vae, PROMPT)
    ref = Trace(final=video, steps=[], call_timesteps=[], call_buckets=[])
    test = Trace(final=video + 0.1 * _seeded(*video.shape, seed=6), steps=[], call_timesteps=[], call_buckets=[])
    damage, metrics = scorer.evaluate(ref, test)
    per_frame = scorer.cosines(test)
    assert per_frame.shape == (6,) and metrics["clip_score"] == pytest.approx(100 * float(per_frame.mean()))
    assert damage == pytest.approx(float(((per_frame - scorer.cosines(ref)) ** 2).mean())) and damage > 0


# -- clear errors --------------------------------------------------------------------------------------------------
def test_mismatched_or_unusable_models_are_clear_errors():
    vae, vision, clip = FakeVAE(), FakeClipVision(dim=32), FakeClip(dim=32)
    with pytest.raises(ValueError, match=r"embeds pictures in 48 dimensions .* pooled embedding has 32: these two "
                                         r"models are not a CLIP pair"):
        build_clip_scorer(FakeClipVision(dim=48), clip, vae, PROMPT)
    with pytest.raises(ValueError, match="no pooled text embedding .* T5"):
        build_clip_scorer(vision, FakeClip(projection="none"), vae, PROMPT)
    with pytest.raises(ValueError, match="text projection is probably missing"):
        build_clip_scorer(vision, FakeClip(projection="zero"), vae, PROMPT)
    with pytest.raises(ValueError, match="visual projection is probably missing"):
        build_clip_scorer(FakeClipVision(zero_projection=True), clip, vae, PROMPT)
    with pytest.raises(ValueError, match="prompt text is empty"):
        build_clip_scorer(vision, clip, vae, "  \n")
    with pytest.raises(ValueError, match="vae input has no decode"):
        build_clip_scorer(vision, clip, object(), PROMPT)
    with pytest.raises(ValueError, match="clip_vision input has no encode_image"):
        build_clip_scorer(object(), clip, vae, PROMPT)
    with pytest.raises(ValueError, match="clip input has no tokenize"):
        build_clip_scorer(vision, object(), vae, PROMPT)

    class Dinov2Model(torch.nn.Module):
        pass

    dino = FakeClipVision()
    dino.model = Dinov2Model()
    with pytest.raises(ValueError, match="DINOv2 image encoder, which has no text side"):
        clip_image_encoder(dino, "test")
    with pytest.raises(ValueError, match="clip_image needs a CLIP vision model"):
        build_image_scorer(vae, "clip_image")
    with pytest.raises(ValueError, match="damage must be one of"):
        build_clip_scorer(vision, clip, vae, PROMPT, damage="drop")


def test_the_planner_refuses_misconnected_scorers():
    latent = torch.zeros(1, 4, 16, 16)
    clip_scorer = build_clip_scorer(FakeClipVision(), FakeClip(), FakeVAE(), PROMPT)
    with pytest.raises(ValueError, match="visual_scorer input got a text alignment scorer .* connect it to "
                                         "text_scorer instead"):
        check_scorer_for(clip_scorer, "visual", "visual_scorer", latent)
    check_scorer_for(clip_scorer, "text", "text_scorer", latent)
    wide = build_image_scorer(FakeVAE(channels=16), "ssim")
    with pytest.raises(ValueError, match="takes 16-channel latents but this latent has 4 channels"):
        check_scorer_for(wide, "visual", "visual_scorer", latent)
    with pytest.raises(ValueError, match="must come from a ViDiT-Q scorer node"):
        check_scorer_for(lambda ref, test: 0.0, "text", "text_scorer", latent)
    # a VAE of another latent format fails when it decodes, naming the latent and the fix
    trace = Trace(final=latent, steps=[], call_timesteps=[], call_buckets=[])
    with pytest.raises(ValueError, match=r"could not decode the sampled latent \(1, 4, 16, 16\).*VAE of this model"):
        wide(trace, trace)


def test_bad_scorer_settings_are_clear_errors():
    with pytest.raises(ValueError, match="scorers are keyed by the metric they replace"):
        PlannerSettings(scorers={"clip": lambda r, t: 0.0}).check(LOW)
    with pytest.raises(ValueError, match="the text scorer is not callable"):
        PlannerSettings(scorers={"text": 3}).check(LOW)
    trace = Trace(final=torch.ones(1, 4, 8, 8), steps=[], call_timesteps=[], call_buckets=[])

    def broken(ref, test):
        return float("nan")

    with pytest.raises(ValueError, match=r"external text scorer \(broken\) returned nan"):
        PlannerSettings(scorers={"text": broken}).damages(trace, trace)
