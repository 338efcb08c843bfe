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
