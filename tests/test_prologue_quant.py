"""kernels/triton_prologue_quant.py (CPU interpreter) against its torch twin reference.prologue_quantize."""
import pytest
import torch

from viditq.kernels import reference
from viditq.kernels import triton_prologue_quant as tpq


def _inputs(m, k, dtype, seed, batch=2):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 3).to(dtype)
    ada = (torch.randn(batch, 6, k, generator=g) * 0.5).to(dtype)  # as the blocks' [B, 6, C] adaLN table
    shift, scale = ada.chunk(6, dim=1)[0], ada.chunk(6, dim=1)[1]  # [B, 1, K] non-contiguous views
    mult = torch.rand(k, generator=g) + 0.5
    return x, shift, scale, mult


def _check(a, r, fmt):
    """Scales equal to fp32 rounding; codes equal except where the value sits within a hair of a rounding tie
    (the kernel's LayerNorm / GELU differ from torch's in the last bits)."""
    torch.testing.assert_close(a.scale, r.scale, rtol=2e-5, atol=0)
    qa, qr = a.q.float(), r.q.float()
    diff = (qa - qr).abs()
    if fmt == "int8":
        assert diff.max() <= 1
    else:
        mx = torch.maximum(qa.abs(), qr.abs())  # one e4m3 step: 2^(e - 3) in the binade [2^e, 2^(e+1)) of the larger
        step = torch.where(mx >= 2.0 ** -6, torch.exp2(torch.floor(torch.log2(mx.clamp_min(2.0 ** -6))) - 3), 2.0 ** -9)
        assert (diff <= step).all()
    assert (diff > 0).float().mean() < 2e-3, f"{(diff > 0).float().mean():.2e} of codes differ"


@pytest.mark.parametrize("prologue", ["none", "gelu_tanh", "gelu", "norm_modulate"])
@pytest.mark.parametrize("m,k", [(1, 1152), (7, 72), (130, 96), (64, 1152), (6, 4608)])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_prologue_quant_matches_reference(prologue, m, k, fmt):
    dtype = torch.bfloat16 if fmt == "int8" else torch.float16
    rows = m if m < 2 else m // 2 if m % 2 == 0 else m
    batch = m // rows
    x, shift, scale, mult = _inputs(m, k, dtype, seed=m * 31 + k, batch=batch)
    args = (x, prologue, shift, scale, rows, 1e-6, mult, fmt, 448 if fmt == "fp8" else 127)
    a = tpq.prologue_quantize(*args)
    r = reference.prologue_quantize(*args)
    _check(a, r, fmt)


@pytest.mark.parametrize("prologue", ["none", "gelu_tanh", "norm_modulate"])
@pytest.mark.parametrize("m,k,had", [(1, 1152, 128), (7, 1152, 128), (5, 96, 32), (130, 4608, 128), (3, 80, 16),
                                     (2, 1536, 512)])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_rotated_prologue_matches_reference(prologue, m, k, had, fmt):
    """The block Hadamard (fast Walsh-Hadamard transform in the kernel) against the reference's fp32 matmul, with
    the smoothing x signs vector in front, as ViDiT-Q's rotated layers call it; outputs poisoned first."""
    dtype = torch.bfloat16 if fmt == "int8" else torch.float16
    rows = m if m < 2 or m % 2 else m // 2
    x, shift, scale, mult = _inputs(m, k, dtype, seed=m * 7 + k + had, batch=m // rows)
    mult = mult * torch.where(torch.rand(k, generator=torch.Generator().manual_seed(k)) < 0.5, -1.0, 1.0)
    x[0, :3] = torch.tensor([900.0, -900.0, 0.0])  # an outlier channel, which the rotation spreads over its block
    args = (x, prologue, shift, scale, rows, 1e-6, mult, fmt, 448 if fmt == "fp8" else 127)
    a = tpq.prologue_quantize(*args, had_block=had)
    r = reference.prologue_quantize(*args, had_block=had)
    assert a is not None
    _check(a, r, fmt)
    plain = reference.prologue_quantize(*args)  # the rotation really ran: without it the codes differ
    assert (plain.q.float() - r.q.float()).abs().max() > 1


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_rotated_chunked_gelu_kernel(fmt):
    x, _, _, mult = _inputs(5, 256, torch.bfloat16, seed=5)
    x[1] = 0  # all-zero token
    tpq.tuner.force = (2, 4, 64)
    try:
        a = tpq.prologue_quantize(x, "gelu_tanh", mult=mult, fmt=fmt, qmax=448 if fmt == "fp8" else 127,
                                  had_block=32)
    finally:
        tpq.tuner.force = None
    r = reference.prologue_quantize(x, "gelu_tanh", mult=mult, fmt=fmt, qmax=448 if fmt == "fp8" else 127,
                                    had_block=32)
    _check(a, r, fmt)
    assert (a.q[1].float() == 0).all() and torch.isfinite(a.scale).all()


def test_rotation_blocks_the_kernel_cannot_take():
    """Blocks that are not whole within both row pieces (or not a power of two) give None: the caller then runs the
    reference or another kernel."""
    assert tpq.had_supported(1152, 128) and tpq.had_supported(4608, 128) and tpq.had_supported(72, 8)
    assert not tpq.had_supported(1152, 256)  # K is not a multiple
    assert not tpq.had_supported(96, 64)  # 96 = 64 + 32: the second piece is half a block
    assert not tpq.had_supported(1152, 96) and not tpq.had_supported(2048, 1024)
    assert tpq.prologue_quantize(torch.randn(4, 96), "none", had_block=64) is None


def test_row_pieces():
    """Rows split into two power-of-two pieces: none padded where K is such a sum (the DiT widths)."""
    assert tpq.pieces(1152) == (1024, 128) and tpq.pieces(4608) == (4096, 512) and tpq.pieces(1024) == (1024, 0)
    assert tpq.pieces(72) == (64, 16) and tpq.pieces(1000) == (512, 512) and tpq.pieces(5) == (16, 0)


def test_norm_modulate_uses_each_rows_sample_and_extremes():
    k, rows = 160, 5
    x, shift, scale, _ = _inputs(3 * rows, k, torch.bfloat16, seed=3, batch=3)
    x[2] = 0  # all-zero token: LN gives 0, the output is shift_b
    x[7] *= 1000  # one huge token
    for mult in (None, torch.linspace(0.5, 2, k)):
        a = tpq.prologue_quantize(x, "norm_modulate", shift, scale, rows, 1e-6, mult)
        r = reference.prologue_quantize(x, "norm_modulate", shift, scale, rows, 1e-6, mult)
        _check(a, r, "int8")
    # the modulation really is per sample: swapping the samples' vectors changes the second sample's codes
    swapped = tpq.prologue_quantize(x, "norm_modulate", shift.flip(0), scale.flip(0), rows)
    plain = tpq.prologue_quantize(x, "norm_modulate", shift, scale, rows)
    assert torch.equal(swapped.q[rows:2 * rows], plain.q[rows:2 * rows])  # the middle sample keeps its vectors
    assert not torch.equal(swapped.q[:rows], plain.q[:rows])


@pytest.mark.parametrize("prologue", ["gelu_tanh", "gelu"])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_chunked_gelu_kernel(prologue, fmt):
    """The two-pass chunked kernel the tuner may pick for wide rows (forced here: the interpreter never tunes)."""
    x, _, _, mult = _inputs(9, 200, torch.bfloat16, seed=11)
    x[3, :4] = torch.tensor([-1e4, 1e4, 0.0, 3.0])
    tpq.tuner.force = (2, 4, 64)
    try:
        a = tpq.prologue_quantize(x, prologue, mult=mult, fmt=fmt, qmax=448 if fmt == "fp8" else 127)
    finally:
        tpq.tuner.force = None
    r = reference.prologue_quantize(x, prologue, mult=mult, fmt=fmt, qmax=448 if fmt == "fp8" else 127)
    _check(a, r, fmt)


def test_gelu_extremes_and_zero_token():
    k = 200
    x = torch.randn(9, k).to(torch.bfloat16)
    x[0] = 0
    x[1, :5] = torch.tensor([-1e4, 1e4, -30.0, 30.0, 1e-3])
    a = tpq.prologue_quantize(x, "gelu_tanh")
    r = reference.prologue_quantize(x, "gelu_tanh")
    _check(a, r, "int8")
    assert torch.isfinite(a.scale).all() and (a.q[0] == 0).all()


def test_bad_shapes_are_refused():
    x = torch.randn(6, 32)
    with pytest.raises(ValueError, match="whole samples"):
        tpq.prologue_quantize(x, "norm_modulate", torch.zeros(2, 32), torch.zeros(2, 32), 4)
    with pytest.raises(ValueError, match="one vector per sample"):
        tpq.prologue_quantize(x, "norm_modulate", torch.zeros(4, 32), torch.zeros(4, 32), 3)
    with pytest.raises(ValueError, match="unknown prologue"):
        tpq.prologue_quantize(x, "relu")


@pytest.mark.parametrize("prologue,m,k,had,chunked,group", [("norm_modulate", 7, 1152, 128, False, 0),
                                                            ("gelu_tanh", 6, 4608, 0, False, 0),
                                                            ("none", 130, 96, 32, False, 0),
                                                            ("gelu_tanh", 9, 256, 64, True, 0),
                                                            ("gelu", 5, 192, 0, True, 0),
                                                            ("norm_modulate", 7, 1152, 128, False, 128),
                                                            ("gelu_tanh", 9, 256, 64, True, 64),
                                                            ("none", 5, 192, 0, False, 64)])
def test_perm32_codes_and_row_sums_for_w4a8(prologue, m, k, had, chunked, group):
    """perm32 (the W4A8 GEMM's layout for "pairs" weights): the same codes as the natural order, each 32-channel
    block written as its 16 even then its 16 odd channels, and each row's code sum in qsum (per group of channels
    for group-wise weights); sums alone (split16 weights): the natural order with the same sums."""
    rows = m if m % 2 else m // 2
    x, shift, scale, mult = _inputs(m, k, torch.bfloat16, seed=m + k, batch=m // rows)
    x[0, :2] = torch.tensor([500.0, -500.0])
    x[m - 1] = 0  # an all-zero token (norm_modulate: its codes are the shift's)
    args = (x, prologue, shift, scale, rows, 1e-6, mult, "int8", 127, had)
    tpq.tuner.force = (2, 4, 64) if chunked else None
    try:
        a = tpq.prologue_quantize(*args, perm32=True, sum_group=group)
        nat = tpq.prologue_quantize(*args, sums=True, sum_group=group)  # for split16 weights: natural order
        plain = tpq.prologue_quantize(*args)
    finally:
        tpq.tuner.force = None
    r = reference.prologue_quantize(*args)
    _check(plain, r, "int8")
    assert torch.equal(a.scale, plain.scale)
    want = plain.q.reshape(m, k // 32, 16, 2).transpose(2, 3).reshape(m, k)
    assert torch.equal(a.q, want)
    assert not torch.equal(a.q, plain.q)  # the order really changed
    g = group or k
    assert a.qsum.shape == (m, k // g) and a.qsum.dtype == torch.int32
    assert torch.equal(a.qsum, plain.q.to(torch.int32).reshape(m, k // g, g).sum(-1))
    assert torch.equal(nat.q, plain.q) and torch.equal(nat.scale, plain.scale) and torch.equal(nat.qsum, a.qsum)
    with pytest.raises(ValueError, match="perm32"):
        tpq.prologue_quantize(x, prologue, shift, scale, rows, 1e-6, mult, "fp8", 448, had, perm32=True)


def test_group_sums_that_do_not_fit_give_none():
    """Groups the row pieces do not hold whole (or not a power of two >= 32): None, the caller's general path."""
    assert tpq.group_sums_supported(1152, 128) and tpq.group_sums_supported(4608, 64)
    assert not tpq.group_sums_supported(1152, 256) and not tpq.group_sums_supported(96, 64)
    assert not tpq.group_sums_supported(128, 16) and not tpq.group_sums_supported(192, 96)
    assert tpq.prologue_quantize(torch.randn(3, 96), "none", perm32=True, sum_group=64) is None
