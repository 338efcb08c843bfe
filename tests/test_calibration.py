"""Calibration hooks: per-timestep buckets, separate CFG branches, ComfyUI's flattened text tokens."""
import pytest
import torch
import torch.nn as nn

from viditq.quant_core.calibration import COND, TOKEN_ABSMAX_MAX, TOKENS, UNCOND, Calibrator, bucket_of


def test_bucket_mapping_covers_the_timestep_axis():
    t = torch.tensor([0.0, 249.9, 250.0, 999.0, 1000.0])
    assert bucket_of(t, 4).tolist() == [0, 0, 1, 3, 3]
    assert bucket_of(t, 1).tolist() == [0] * 5


def test_cfg_branches_are_calibrated_separately():
    layer = nn.Linear(8, 4)
    cal = Calibrator({"l": layer}, num_buckets=2)
    x = torch.ones(4, 5, 8)
    x[:2] *= 10.0  # rows 0-1 conditional, 10x larger than the unconditional rows 2-3
    with cal:
        cal.set_step(torch.full((4,), 900.0), [COND, COND, UNCOND, UNCOND])
        layer(x)
        cal.set_step(torch.full((4,), 100.0), [UNCOND, UNCOND, COND, COND])
        layer(x * 2)
    a = cal.absmax["l"]
    assert torch.allclose(a[1, COND], torch.full((8,), 10.0))
    assert torch.allclose(a[1, UNCOND], torch.full((8,), 1.0))
    assert torch.allclose(a[0, UNCOND], torch.full((8,), 20.0))
    assert torch.allclose(a[0, COND], torch.full((8,), 2.0))
    st = cal.token_stats["l"]
    assert st[1, COND, TOKENS] == 10 and st[1, COND, TOKEN_ABSMAX_MAX] == 10.0
    data = cal.result({"family": "x"})
    assert torch.allclose(data.channel_absmax("l"), torch.full((8,), 20.0))
    assert data.branches_seen() == ["cond", "uncond"]


def test_flattened_text_tokens_are_split_per_batch_row():
    layer = nn.Linear(3, 3)
    cal = Calibrator({"kv": layer}, num_buckets=1)
    y = torch.cat([torch.full((1, 6, 3), 5.0), torch.full((1, 6, 3), 1.0)], dim=1)  # ComfyUI: [1, B*T, C]
    with cal:
        cal.set_step(torch.tensor([10.0, 10.0]), [COND, UNCOND])
        layer(y)
    assert torch.allclose(cal.absmax["kv"][0, COND], torch.full((3,), 5.0))
    assert torch.allclose(cal.absmax["kv"][0, UNCOND], torch.full((3,), 1.0))


def test_hooks_do_not_change_outputs_and_are_removed():
    layer = nn.Linear(6, 6)
    x = torch.randn(2, 3, 6)
    ref = layer(x)
    cal = Calibrator({"l": layer})
    with cal:
        cal.set_step(torch.tensor([5.0, 5.0]))
        assert torch.equal(layer(x), ref)
    assert not layer._forward_pre_hooks


def test_misuse_is_reported():
    layer = nn.Linear(2, 2)
    cal = Calibrator({"l": layer, "unused": nn.Linear(2, 2)})
    with cal:
        with pytest.raises(RuntimeError, match="set_step"):
            layer(torch.zeros(1, 2))
        cal.set_step(torch.tensor([1.0]))
        layer(torch.zeros(1, 2))
        with pytest.raises(ValueError):
            cal.set_step(torch.tensor([1.0]), [COND, UNCOND])
    with pytest.raises(RuntimeError, match="no input"):
        cal.result({})
