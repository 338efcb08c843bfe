"""The temporal-consistency metric (quant_core/temporal.py) on synthetic videos: frozen vs flickering."""
import pytest
import torch

from viditq.quant_core.metrics import PSNR_IDENTICAL
from viditq.quant_core.temporal import as_video, frames_in_batch, temporal_metrics


def smooth_video(frames=8, seed=0):
    """[1, 3, T, 16, 16]: a pattern drifting slowly, so consecutive frames are alike but not equal."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 3, 1, 16, 16, generator=g)
    drift = torch.randn(1, 3, 1, 16, 16, generator=g)
    t = torch.linspace(0, 1, frames).view(1, 1, -1, 1, 1)
    return base + 0.3 * t * drift


def test_identical_video_is_perfect():
    v = smooth_video()
    m = temporal_metrics(v, v.clone())
    assert m["frames"] == 8 and m["frame_diff_rel_l2"] == 0 and m["frame_diff_psnr_db"] == PSNR_IDENTICAL
    assert m["frame_cosine_abs_diff"] == 0 and m["frame_cosine_q"] == pytest.approx(m["frame_cosine_fp"])


def test_static_error_does_not_count_as_flicker():
    """An error that is the same in every frame changes no frame-to-frame difference."""
    v = smooth_video()
    static = v + 0.2 * torch.randn(1, 3, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    m = temporal_metrics(v, static)
    assert m["frame_diff_rel_l2"] < 1e-5  # float32 rounding only


def test_flickering_video_scores_worse_than_a_frozen_one():
    ref = smooth_video()
    g = torch.Generator().manual_seed(7)
    noise = 0.2 * torch.randn(ref.shape, generator=g)  # same error size, frame-independent
    flicker = ref + noise
    frozen = ref + noise[:, :, :1]  # the first frame's error held for the whole clip
    f, z = temporal_metrics(ref, flicker), temporal_metrics(ref, frozen)
    assert f["frame_diff_rel_l2"] > 10 * max(z["frame_diff_rel_l2"], 1e-3)
    assert f["frame_diff_psnr_db"] < z["frame_diff_psnr_db"]
    assert f["frame_cosine_q"] < f["frame_cosine_fp"] - 0.01  # a flickering video is less self-similar
    assert f["frame_cosine_abs_diff"] > z["frame_cosine_abs_diff"]
    # a fully frozen video (first frame repeated) against a moving reference: its changes are all wrong
    still = ref[:, :, :1].expand_as(ref)
    s = temporal_metrics(ref, still)
    assert s["frame_diff_rel_l2"] == pytest.approx(1.0) and s["frame_cosine_q"] == pytest.approx(1.0)


def test_layouts_agree():
    """5-D latents and frames-in-batch IMAGE tensors [B*T, H, W, C] give the same numbers."""
    ref, test = torch.randn(2, 4, 5, 6, 6), torch.randn(2, 4, 5, 6, 6)
    five = temporal_metrics(ref, test)
    img_ref = frames_in_batch(ref).permute(0, 2, 3, 1)  # like an IMAGE batch
    img_test = frames_in_batch(test).permute(0, 2, 3, 1)
    flat = temporal_metrics(img_ref, img_test, frames=5)
    for k in ("frame_diff_rel_l2", "frame_cosine_fp", "frame_cosine_q"):
        assert flat[k] == pytest.approx(five[k], rel=1e-9)
    assert as_video(ref).shape == (2, 5, 4 * 36)
    assert torch.equal(frames_in_batch(ref)[6], ref[1, :, 1])  # video 1, frame 1


def test_bad_shapes():
    assert "note" in temporal_metrics(torch.randn(1, 4, 1, 4, 4), torch.randn(1, 4, 1, 4, 4))
    with pytest.raises(ValueError, match="5-D"):
        temporal_metrics(torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match="split"):
        temporal_metrics(torch.randn(6, 4, 4, 3), torch.randn(6, 4, 4, 3), frames=4)
    with pytest.raises(ValueError, match="shapes"):
        temporal_metrics(torch.randn(1, 4, 3, 4, 4), torch.randn(1, 4, 4, 4, 4))
