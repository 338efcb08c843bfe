"""Toy world analyzers score right samples high and wrong ones low; baselines are what they claim to be."""
import torch

from viditq.evaluation.analyzers import alignment, analyze, fidelity_to_data, temporal_smoothness
from viditq.evaluation.toy_world import Scene, all_image_scenes, encode, render, render_video, text_embedding_table
from viditq.quant_core import get_preset


def test_analyzer_reads_every_clean_scene():
    for s in all_image_scenes():
        assert alignment(render(s), s) == 100.0, (s, analyze(render(s)))


def test_analyzer_scores_wrong_samples_low():
    s = Scene("circle", "red", "left")
    assert alignment(render(Scene("square", "blue", "right")), s) == 0.0
    assert alignment(render(Scene("circle", "blue", "left")), s) < 70
    blank = torch.zeros(3, 32, 32)  # grey background only: nothing drawn
    assert alignment(blank, s) == 0.0
    noisy = render(s) + 0.15 * torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert alignment(noisy.clamp(-1, 1), s) == 100.0  # mild noise does not fool it
    assert fidelity_to_data(render(s), s) > 90 > fidelity_to_data(noisy, s) > 10


def test_temporal_score_separates_smooth_from_flickering():
    smooth = render_video(Scene("circle", "red", "left", "right"), 8)
    flicker = smooth.clone()
    flicker[3] = render(Scene("circle", "red", "top"))
    frozen = torch.stack([render(Scene("circle", "red", "left"))] * 8)
    assert temporal_smoothness(smooth) > 80
    assert temporal_smoothness(flicker) < 50
    assert temporal_smoothness(frozen) > 80  # a still object is perfectly consistent


def test_caption_features_depend_on_words_and_order():
    t = text_embedding_table()
    a, b, c = encode(["a red circle at the left", "a blue circle at the left", ""], t)
    assert not torch.allclose(a, b) and torch.all(c == 0)


def test_baseline_presets_are_what_they_claim():
    naive, sq, qr, pt, vq = (get_preset(n) for n in
                             ("w8a8-naive", "w8a8-smoothquant", "w8a8-quarot", "w8a8-pertoken", "w8a8"))
    assert naive.a_granularity == "tensor_static" and naive.w_granularity == "tensor"
    assert not naive.smooth and not naive.rotate
    assert sq.smooth and not sq.rotate and sq.a_granularity == "token"
    assert qr.rotate and not qr.smooth and qr.a_granularity == "token"
    assert not pt.smooth and not pt.rotate and pt.a_granularity == "token"
    assert vq.smooth and vq.rotate and vq.a_granularity == "token"


def test_stdit_initialised_from_pixart_is_the_image_model_frame_by_frame():
    from viditq.evaluation.toy_models import build_toy_pixart, build_toy_stdit, caption_features, stdit_init_from_pixart

    torch.manual_seed(0)
    pixart, stdit = build_toy_pixart().eval(), build_toy_stdit().eval()
    fresh = stdit_init_from_pixart(stdit, pixart.state_dict())
    assert fresh and all(".attn_temp.qkv." in k for k in fresh)
    scenes = all_image_scenes()[:2]
    x = torch.randn(2, 3, 32, 32)  # the toy size: there the two positional tables agree (space_scale 0.5)
    t = torch.tensor([20.0, 700.0])
    with torch.no_grad():
        img = pixart(x, t, caption_features(scenes))
        vid = stdit(x[:, :, None].expand(2, 3, 3, 32, 32).contiguous(), t, caption_features(scenes))
    assert torch.allclose(vid, img[:, :, None].expand_as(vid), atol=1e-4)


def test_scored_video_captions_cover_every_start_end_pair():
    from viditq.evaluation.toy_models import spread
    from viditq.evaluation.toy_world import all_video_scenes

    scenes = spread(all_video_scenes(), 120)
    assert len(set(scenes)) == 120
    assert len({(s.position, s.end_position) for s in scenes}) == 20
    assert len({(s.shape, s.colour) for s in scenes}) == 18
