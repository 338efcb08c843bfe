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
