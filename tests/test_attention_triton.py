"""Quantized attention kernel (Triton, under TRITON_INTERPRET=1) vs its torch twin, and the twin vs exact attention."""
import pytest
import torch

from viditq.kernels import reference_attention as ra
from viditq.kernels import triton_attention as ta


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _qkv(b, h, nq, nk, d, seed, dtype=torch.float32, scale_k=1.5):
    """q as a strided view out of a fused qkv projection ([B, N, 3, H, D] -> [B, H, N, D]), k/v separate."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, nq, 3, h, d, generator=g)[:, :, 0].transpose(1, 2)
    kv = torch.randn(b, nk, 2, h, d, generator=g)
    k, v = kv[:, :, 0].transpose(1, 2) * scale_k, kv[:, :, 1].transpose(1, 2)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("mode", ta.MODES)
@pytest.mark.parametrize("shape", [(1, 2, 40, 40, 72), (2, 1, 33, 70, 16), (1, 1, 32, 64, 64)])
def test_kernel_matches_its_torch_twin(mode, shape):
    b, h, nq, nk, d = shape
    q, k, v = _qkv(b, h, nq, nk, d, seed=sum(shape))
    (bm, bn, _, _), = ta._INTERP_CONFIGS
    out = ta.attention(q, k, v, mode)
    twin = ra.attention_reference(q, k, v, mode, block_n=bn)
    assert out.shape == (b, h, nq, d) and torch.isfinite(out).all()
    assert _rel(out, twin) < 1e-5  # same codes, same block order: fp32 rounding only
    # the result is a view of a [B, N, H, D] tensor: the DiT's transpose(1, 2).reshape(B, N, H*D) is free
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_k_smoothing_with_a_channel_offset_and_a_partial_last_block(mode):
    """Keys with a large common per-channel offset (a k bias): smoothing removes it before the codes are made, the
    padded rows of the last, partial key block take no part in its scale, and the result matches the twin."""
    q, k, v = _qkv(1, 2, 40, 70, 72, seed=5)
    k = k + torch.linspace(-6.0, 6.0, 72)
    (_, bn, _, _), = ta._INTERP_CONFIGS
    out = ta.attention(q, k, v, mode)
    assert _rel(out, ra.attention_reference(q, k, v, mode, block_n=bn)) < 1e-5
    exact = ra.attention_exact(q, k, v)
    assert _rel(out, exact) < {"fp8": 0.1, "int8": 0.03}[mode]


def test_bf16_inputs_and_the_error_of_each_mode():
    q, k, v = _qkv(1, 2, 64, 96, 72, seed=7, dtype=torch.bfloat16)
    exact = ra.attention_exact(q.float(), k.float(), v.float())
    bounds = {"fp8": 0.10, "int8": 0.03, "int8_fp8pv": 0.06, "fp8_bf16pv": 0.09}
    for mode, bound in bounds.items():
        out = ta.attention(q, k, v, mode)
        assert out.dtype == torch.bfloat16
        err = _rel(out, exact)
        assert 1e-4 < err < bound, (mode, err)  # quantized (not a silent bf16 path), and not broken


def test_twin_error_is_a_quantization_error():
    """The twin against exact attention: fp8 (3 mantissa bits) errs more than int8 Q K^T; a broken scale would not
    stay under these bounds, and an unquantized path would be far below them."""
    q, k, v = _qkv(2, 2, 128, 128, 72, seed=3)
    exact = ra.attention_exact(q, k, v)
    errs = {m: _rel(ra.attention_reference(q, k, v, m), exact) for m in ra.MODES}
    assert errs["int8"] < errs["int8_fp8pv"] < errs["fp8"] < 0.1
    assert errs["int8"] > 1e-3


def test_outlier_channels_and_large_logits_stay_finite():
    """A key channel 60x the rest: fp8 (a floating-point grid) keeps every channel's relative precision, int8 with
    one scale per key block loses the small channels (measured 0.11 vs 0.21 here); peaky logits stay finite."""
    q, k, v = _qkv(1, 1, 48, 80, 72, seed=11)
    k[..., 5] *= 60.0
    exact = ra.attention_exact(q, k, v)
    errs = {}
    for mode in ("fp8", "int8"):
        out = ta.attention(q, k, v, mode)
        assert torch.isfinite(out).all()
        errs[mode] = _rel(out, exact)
    assert errs["fp8"] < 0.15 and errs["int8"] < 0.3 and errs["fp8"] < errs["int8"]
    out = ta.attention(q * 30.0, k, v, "fp8")  # logits in the thousands: exp2 of the running max stays finite
    assert torch.isfinite(out).all()


def test_head_split_and_bad_input():
    assert ta.head_split(72) == (64, 32, 64, 16)
    assert ta.head_split(64) == (64, 0, 64, 0)
    assert ta.head_split(16) == (32, 0, 16, 0)
    q, k, v = _qkv(1, 1, 8, 8, 16, seed=0)
    with pytest.raises(ValueError, match="mode"):
        ta.attention(q, k, v, "int4")
    with pytest.raises(ValueError, match="expected"):
        ta.attention(q, k[:, :, :, :8], v, "fp8")
    with pytest.raises(ValueError, match="mode"):
        ra.attention_reference(q, k, v, "fp16")
