"""Frame (temporal) attention: the Triton kernel under TRITON_INTERPRET=1 against exact fp32 attention, its dispatch and
custom op, and the video blocks that use it (tokens left in place) against the rearranged computation they replace."""
import pytest
import torch
import torch.nn.functional as F

from viditq.kernels import custom_ops, dispatch
from viditq.kernels import triton_frame_attention as tfa
from viditq.kernels.reference_attention import attention_exact, frame_attention_reference
from viditq.models.opensora.common import Attention, RotaryEmbedding1D


def _qkv(b, t, s, h, d, dtype, seed):
    """q, k, v as the [B, S, H, T, D] views a fused qkv projection of frame-major tokens gives."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, t, s, 3, h, d, generator=g).to(dtype)
    return qkv.permute(3, 0, 2, 4, 1, 5).unbind(0)


def _check(out, q, k, v):
    ref = attention_exact(q.float(), k.float(), v.float())
    # P is rounded to the input dtype for the second product (as flash attention does), the output once more
    tol = (0.02 if q.dtype == torch.bfloat16 else 0.003) * float(v.float().abs().max())
    err = float((out.float() - ref).abs().max())
    assert torch.isfinite(out).all() and err <= tol, (err, tol)


@pytest.mark.parametrize("shape", [(2, 16, 3, 4, 72), (1, 5, 7, 2, 40), (1, 1, 2, 2, 64), (2, 17, 1, 3, 24),
                                   (1, 64, 2, 2, 72), (3, 7, 5, 1, 80), (1, 3, 2, 2, 20)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_matches_exact_attention(shape, dtype):
    b, t, s, h, d = shape
    q, k, v = _qkv(b, t, s, h, d, dtype, seed=sum(shape))
    out = tfa.new_output(q).fill_(float("nan"))  # poisoned: every value must be written
    assert tfa.supported(q, k, v)
    res = tfa.frame_attention(q, k, v, out)
    assert res is out and out.shape == (b, s, h, t, d)
    assert tfa._alignment(q, k, v, out) == (8 if d % 8 == 0 else 1)  # 16-byte rows: vector loads on the GPU
    _check(out, q, k, v)
    # stored frame-major: the block's permute(0, 3, 1, 2, 4).reshape(B, T * S, C) is free
    assert out.permute(0, 3, 1, 2, 4).is_contiguous()


@pytest.mark.parametrize("config", [(1, 4, 4), (2, 2, 4), (4, 1, 4), (1, 1, 1), (2, 4, 8)])
def test_every_gpu_config_with_a_partial_last_program(config):
    """The GPU candidates (sequences x heads per program): 7 sequences leave the last program partly empty."""
    q, k, v = _qkv(1, 16, 7, 4, 72, torch.bfloat16, seed=3)
    tfa.tuner.force = config
    try:
        out = tfa.frame_attention(q, k, v, tfa.new_output(q).fill_(float("nan")))
    finally:
        tfa.tuner.force = None
    _check(out, q, k, v)


def test_extreme_tokens():
    """A key 1000x the rest (one frame dominates its softmax), an all-zero query (uniform weights) and an all-zero
    value sequence."""
    q, k, v = (x.clone() for x in _qkv(1, 16, 3, 2, 72, torch.float16, seed=9))
    k[0, 1, 0, 5] *= 1000
    q[0, 2, 1, 3] = 0
    v[0, 0, 1] = 0
    out = tfa.frame_attention(q, k, v)
    _check(out, q, k, v)
    assert torch.allclose(out[0, 2, 1, 3].float(), v[0, 2, 1].float().mean(0), atol=2e-3)
    assert out[0, 0, 1].abs().max() == 0


def test_other_layouts_and_what_the_kernel_refuses():
    # contiguous [B*S, H, T, D] tensors (as RoPE returns them) seen as [B, S, H, T, D]
    q, k, v = (torch.randn(6, 2, 9, 72).to(torch.bfloat16).reshape(2, 3, 2, 9, 72) for _ in range(3))
    _check(tfa.frame_attention(q, k, v), q, k, v)
    assert not tfa.supported(*(torch.randn(1, 2, 2, tfa.MAX_T + 1, 16, dtype=torch.bfloat16),) * 3)  # too long
    assert not tfa.supported(*(torch.randn(1, 2, 2, 8, 16),) * 3)  # fp32: SDPA
    assert not tfa.supported(*(torch.randn(1, 2, 2, 8, 32, dtype=torch.bfloat16)[..., ::2],) * 3)  # strided D


def test_dispatch_and_reference_paths_agree_on_layout():
    q, k, v = _qkv(2, 8, 3, 2, 40, torch.float32, seed=4)
    ref = frame_attention_reference(q, k, v)  # CPU tensors: what dispatch runs
    out = dispatch.frame_attention(q, k, v)
    assert torch.equal(out, ref) and out.stride() == ref.stride() == tfa.new_output(q).stride()
    assert torch.allclose(out, attention_exact(q, k, v), atol=1e-5)
    result = torch.library.opcheck(custom_ops.frame_attention, (q, k, v, "auto"))
    assert all(r == "SUCCESS" for r in result.values()), result


def test_env_forces_sdpa(monkeypatch):
    q, k, v = _qkv(1, 16, 3, 2, 72, torch.bfloat16, seed=6)
    monkeypatch.setattr(dispatch, "resolve_backend", lambda backend, device: "triton")  # as on a GPU
    calls = []
    monkeypatch.setattr(tfa, "frame_attention", lambda *a: calls.append(1) or frame_attention_reference(*a))
    dispatch.frame_attention(q, k, v)
    assert calls == [1]
    monkeypatch.setenv(dispatch.FRAME_ATTENTION_ENV, "sdpa")
    dispatch.frame_attention(q, k, v)
    assert calls == [1]
    monkeypatch.setenv(dispatch.FRAME_ATTENTION_ENV, "bogus")
    with pytest.raises(ValueError, match="VIDITQ_FRAME_ATTENTION"):
        dispatch.frame_attention(q, k, v)


@pytest.mark.parametrize("rope", [False, True])
def test_frames_forward_equals_the_rearranged_attention(rope):
    """Attention.frames_forward (tokens left frame-major) = the official rearrange to (B S) T C, attention over the
    frames, rearrange back."""
    torch.manual_seed(0)
    b, t, s, c, heads = 2, 5, 6, 48, 4
    attn = Attention(c, heads, qk_norm=rope).eval()
    rp = RotaryEmbedding1D(c // heads) if rope else None
    x = torch.randn(b, t * s, c)
    with torch.no_grad():
        new = attn.frames_forward(x, t, rp)
        x_t = x.reshape(b, t, s, c).transpose(1, 2).reshape(b * s, t, c)
        old = attn(x_t, rp).reshape(b, s, t, c).transpose(1, 2).reshape(b, t * s, c)
    assert torch.allclose(new, old, atol=1e-5), float((new - old).abs().max())


def test_sdpa_fallback_matches_exact():
    q, k, v = _qkv(1, 12, 2, 2, 24, torch.float32, seed=1)
    o = F.scaled_dot_product_attention(*(x.reshape(2, 2, 12, 24) for x in (q, k, v))).reshape(1, 2, 2, 12, 24)
    assert torch.allclose(frame_attention_reference(q, k, v), o, atol=1e-6)
