"""Quantizer math: round-trip error bounds, packing, per-token dynamic scales."""
import pytest
import torch

from viditq.kernels.reference import dequantize_activation, dequantize_weight, pack_int4, quantize_activation, unpack_int4
from viditq.quant_core.quantizers import fake_quantize_activation, quantize_weight


def _rand_weight(n=48, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[3, 5] = 25.0  # one outlier weight: per-channel scales keep it to its own row
    return w


@pytest.mark.parametrize("bits,granularity,group", [(8, "channel", 0), (6, "channel", 0), (4, "channel", 0),
                                                    (4, "group", 64), (4, "group", 128), (8, "group", 32)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_weight_round_trip_within_half_step(bits, granularity, group, symmetric):
    w = _rand_weight()
    q = quantize_weight(w, bits=bits, granularity=granularity, group_size=group, symmetric=symmetric)
    err = (dequantize_weight(q) - w).abs()
    step = q.scale if q.group_size == 0 else q.scale.repeat_interleave(q.group_size, 1)
    step = step[:, None] if step.ndim == 1 else step
    assert torch.all(err <= step / 2 + 1e-6), float((err - step / 2).max())
    # per-channel: the outlier row's coarse scale does not leak into other rows
    others = torch.cat([err[:3], err[4:]])
    assert others.max() < err[3].max() or bits == 8


def test_weight_storage_is_real_low_bit():
    w = _rand_weight(64, 256)
    q8, q4 = quantize_weight(w, bits=8), quantize_weight(w, bits=4)
    assert q8.data.dtype == torch.int8 and q8.data.shape == (64, 256)
    assert q4.fmt == "int4" and q4.data.dtype == torch.uint8 and q4.data.shape == (64, 128)
    assert q4.data.numel() * q4.data.element_size() == w.numel() // 2


def test_per_tensor_weights_share_one_scale():
    q = quantize_weight(_rand_weight(), bits=8, granularity="tensor")
    assert torch.all(q.scale == q.scale[0])
    assert q.scale[0] == pytest.approx(25.0 / 127, rel=1e-6)


def test_fp8_weights_relative_error():
    w = _rand_weight()
    q = quantize_weight(w, bits=8, fmt="fp8")
    assert q.data.dtype == torch.float8_e4m3fn
    deq = dequantize_weight(q)
    big = w.abs() > q.scale[:, None] * 2 ** -6 * 8  # normal range of e4m3
    rel = ((deq - w).abs() / w.abs())[big]
    assert rel.max() <= 2 ** -4 + 1e-6


def test_int4_pack_round_trip_full_range():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    with pytest.raises(ValueError):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))


def test_per_token_scales_track_a_token_whose_range_changes_100x():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, generator=g)
    x[2] *= 100.0
    a = quantize_activation(x)
    ratio = a.scale[2] / a.scale[[0, 1, 3]].mean()
    assert 30 < ratio < 300
    rel = (dequantize_activation(a) - x).norm(dim=1) / x.norm(dim=1)
    assert rel.max() < 0.01  # every token keeps int8 precision, the large one included
    # a per-tensor scale would crush the small tokens
    static = quantize_activation(x, static_scale=x.abs().max() / 127)
    rel_static = (dequantize_activation(static) - x).norm(dim=1) / x.norm(dim=1)
    assert rel_static[0] > 10 * rel[0]


def test_zero_token_and_low_bit_activations():
    x = torch.randn(3, 32)
    x[1] = 0
    a = quantize_activation(x, qmax=7)
    assert torch.all(a.q[1] == 0) and torch.isfinite(a.scale).all()
    assert a.q.abs().max() <= 7
    y = fake_quantize_activation(x, bits=4)
    assert y.shape == x.shape and torch.all(y[1] == 0)


def test_fp8_activations():
    x = torch.randn(5, 64) * 30
    a = quantize_activation(x, fmt="fp8")
    assert a.q.dtype == torch.float8_e4m3fn
    assert torch.allclose(a.q.float().abs().amax(1), torch.full((5,), 448.0))
    assert ((dequantize_activation(a) - x).norm() / x.norm()) < 0.05


def test_asymmetric_activation_sums_for_zero_points():
    x = torch.randn(6, 128)
    a = quantize_activation(x, sum_group=32)
    assert a.qsum.shape == (6, 4)
    assert torch.equal(a.qsum, a.q.to(torch.int32).reshape(6, 4, 32).sum(-1))
