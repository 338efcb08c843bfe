"""QuantLinear: stored low-bit weights, kernel path vs simulation vs float."""
import pytest
import torch
import torch.nn as nn

from viditq.quant_core import PRESETS, QuantLinear, get_preset


def _linear(k=256, n=96, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    return lin


@pytest.mark.parametrize("preset,bound", [("w8a8", 0.02), ("w8a8-fp8", 0.06), ("w6a6", 0.08), ("w4a8", 0.15),
                                          ("w4a8-g128", 0.12), ("w4a4", 0.3)])
@torch.no_grad()
def test_quant_linear_close_to_float_and_to_its_simulation(preset, bound):
    lin = _linear()
    x = torch.randn(3, 17, 256)
    x[..., 7] *= 30
    ref = lin(x)
    q = QuantLinear.from_linear(lin, "blocks.0.mlp.fc1", get_preset(preset), act_absmax=x.abs().amax((0, 1)))
    out = q(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    rel = float((out - ref).norm() / ref.norm())
    assert rel < bound
    q.set_simulate(True)
    sim = q(x)
    assert float((sim - out).norm() / ref.norm()) < 1e-4


def test_quant_linear_stores_only_quantized_weights():
    lin = _linear(256, 128)
    q4 = QuantLinear.from_linear(lin, "l", get_preset("w4a8"))
    assert not any(p.dtype.is_floating_point and p.shape == lin.weight.shape for p in q4.buffers())
    assert q4.qweight.dtype == torch.uint8 and q4.qweight.numel() == 128 * 128
    assert q4.weight_bytes() < lin.weight.numel() * 2 / 3.5
    assert len(list(q4.parameters())) == 0


def test_half_precision_inputs_keep_their_dtype():
    lin = _linear()
    q = QuantLinear.from_linear(lin, "l", get_preset("w8a8"))
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    assert q(x).dtype == torch.bfloat16


def test_static_preset_without_calibration_is_a_clear_error():
    with pytest.raises(ValueError, match="needs a calibration"):
        QuantLinear.from_linear(_linear(), "l", get_preset("w8a8-naive"))


def test_every_preset_builds():
    lin = _linear()
    for name, cfg in PRESETS.items():
        if not cfg.enabled:
            continue
        q = QuantLinear.from_linear(lin, "l", cfg, act_absmax=torch.ones(256))
        assert torch.isfinite(q(torch.randn(2, 256))).all(), name


def test_group_size_falls_back_for_layers_it_does_not_divide():
    from viditq.quant_core.quant_linear import layer_group_size

    assert layer_group_size(1152, 128) == 128 and layer_group_size(192, 128) == 64
    assert layer_group_size(96, 128) == 32 and layer_group_size(100, 128) == 0
    q = QuantLinear.from_linear(_linear(192, 40), "l", get_preset("w4a8-g128"))
    assert q.group_size == 64 and q.w_scale.shape == (40, 3)


@torch.no_grad()
def test_int4_weights_kept_in_the_kernels_byte_order(monkeypatch):
    """int4 layers keep their codes in the "split16" byte order the W4A8 GEMM unpacks in natural column order
    (VIDITQ_W4_PACK=pairs: the files' order); the layer computes the same either way, and file_qweight gives the
    files' bytes. Layers the kernels cannot take that way (K % 64, groups of 16) keep "pairs"."""
    from viditq.kernels.reference import dequantize_weight, pack_int4, unpack_int4

    lin = _linear(256, 40)
    x = torch.randn(5, 256)
    q = QuantLinear.from_linear(lin, "l", get_preset("w4a8"))
    monkeypatch.setenv("VIDITQ_W4_PACK", "pairs")
    p = QuantLinear.from_linear(lin, "l", get_preset("w4a8"))
    monkeypatch.delenv("VIDITQ_W4_PACK")
    assert (q.w_pack, p.w_pack) == ("split16", "pairs") and "split16" in repr(q)
    assert not torch.equal(q.qweight, p.qweight) and torch.equal(q.file_qweight(), p.qweight)
    codes = unpack_int4(p.qweight)
    assert torch.equal(q.file_qweight(), pack_int4(codes))
    # byte 16b + i holds column 32b + i (low nibble) and 32b + 16 + i (high nibble)
    assert torch.equal((q.qweight[:, 17] & 15).to(torch.int8) - 8, codes[:, 33])
    assert torch.equal((q.qweight[:, 17] >> 4).to(torch.int8) - 8, codes[:, 49])
    assert torch.equal(dequantize_weight(q.quantized_weight()), dequantize_weight(p.quantized_weight()))
    assert torch.equal(q(x), p(x))
    assert QuantLinear.from_linear(_linear(96, 8), "l", get_preset("w4a8")).w_pack == "pairs"
    assert QuantLinear.from_linear(_linear(256, 8), "l", get_preset("w8a8")).w_pack == "pairs"
    monkeypatch.setenv("VIDITQ_W4_PACK", "nibbles")
    with pytest.raises(ValueError, match="VIDITQ_W4_PACK"):
        QuantLinear.from_linear(lin, "l", get_preset("w4a8"))
