"""Static-dynamic channel balancing: exact invariance without quantization, determinism, outlier reduction."""
import pytest
import torch

from viditq.kernels.reference import block_hadamard, hadamard_matrix
from viditq.quant_core.balancing import (balance, balance_activation, hadamard_block_for, rotation_signs,
                                         smoothing_vector)


@pytest.mark.parametrize("n", [1, 2, 8, 128])
def test_hadamard_is_orthonormal_and_symmetric(n):
    h = hadamard_matrix(n, dtype=torch.float64)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(h, h.T)


def test_hadamard_block_sizes_for_dit_dims():
    assert hadamard_block_for(1152, 128) == 128  # 9 * 128
    assert hadamard_block_for(4608, 128) == 128
    assert hadamard_block_for(4608, 512) == 512
    assert hadamard_block_for(3456, 256) == 128  # 27 * 128
    assert hadamard_block_for(100, 128) == 4
    with pytest.raises(ValueError):
        block_hadamard(torch.zeros(2, 96), 64)


@pytest.mark.parametrize("k", [1152, 96, 100])
@pytest.mark.parametrize("smooth,rotate", [(True, True), (True, False), (False, True)])
def test_balancing_leaves_the_float_output_unchanged(k, smooth, rotate):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(7, k, generator=g, dtype=torch.float64)
    x[:, 3] *= 50  # an outlier channel
    w = torch.randn(33, k, generator=g, dtype=torch.float64)
    s = smoothing_vector(x.abs().amax(0), w, 0.5).double() if smooth else None
    signs = rotation_signs(0, "layer", k).double() if rotate else None
    block = hadamard_block_for(k, 128) if rotate else 0
    w_hat, mult = balance(w, s, signs, block)
    x_hat = balance_activation(x.float(), None if mult is None else mult.float(), block)
    ref = x @ w.T
    got = x_hat.double() @ w_hat.double().T
    assert (got - ref).norm() / ref.norm() < 1e-5


def test_rotation_is_deterministic_per_seed_and_layer():
    a = rotation_signs(0, "blocks.0.attn.qkv", 1152)
    assert torch.equal(a, rotation_signs(0, "blocks.0.attn.qkv", 1152))
    assert not torch.equal(a, rotation_signs(0, "blocks.1.attn.qkv", 1152))
    assert not torch.equal(a, rotation_signs(1, "blocks.0.attn.qkv", 1152))
    assert set(a.unique().tolist()) == {-1.0, 1.0}


def test_smoothing_and_rotation_flatten_outlier_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 256, generator=g)
    x[:, :4] *= 80
    w = torch.randn(64, 256, generator=g) * 0.05

    def outlier_ratio(t):
        ch = t.abs().amax(0)
        return float(ch.max() / ch.median())

    s = smoothing_vector(x.abs().amax(0), w, 0.5)
    _, mult = balance(w, s, rotation_signs(0, "l", 256), 128)
    balanced = balance_activation(x, mult, 128)
    assert outlier_ratio(x) > 40
    assert outlier_ratio(balanced) < 4


def test_unseen_channels_are_not_scaled():
    s = smoothing_vector(torch.tensor([0.0, 4.0]), torch.ones(3, 2), 0.5)
    assert s[0] == 1.0 and s[1] == pytest.approx(2.0)
