"""kernels/step_graph.StepGraphs on the CPU, with a stand-in for CUDA graph capture that records the call on the
static input buffers and re-runs it at each replay (writing into the captured outputs, as a replay does): the
signature logic, the eager first call, the input copies, the output copies and the eager fallbacks."""
import logging

import pytest
import torch

from viditq.kernels.step_graph import StepGraphs

from helpers import fake_capture


def model(x, t, context=None, extra=None, scale=1.0):
    y = torch.tanh(x * t[:, None]) + context.mean() * scale
    if extra is not None:
        y = y + extra["bias"]
    return {"out": y, "aux": [y.sum(-1)]}


def _inputs(seed, n=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, n, generator=g), torch.rand(2, generator=g), torch.randn(4, 5, generator=g),
            {"bias": torch.randn(n, generator=g)})


def test_first_call_eager_second_captures_then_replays_with_fresh_inputs():
    sg = StepGraphs(model, capture=fake_capture)
    for i in range(5):
        x, t, ctx, extra = _inputs(i)
        got = sg(x, t, ctx, extra=extra, scale=2.0)
        want = model(x, t, ctx, extra=extra, scale=2.0)
        assert torch.equal(got["out"], want["out"]) and torch.equal(got["aux"][0], want["aux"][0])
    assert sg.stats == {"eager": 1, "captured": 1, "replayed": 3}
    # the caller owns what it gets: changing it does not change the next replay
    got["out"].fill_(1e9)
    x, t, ctx, extra = _inputs(9)
    assert torch.equal(sg(x, t, ctx, extra=extra, scale=2.0)["out"], model(x, t, ctx, extra=extra, scale=2.0)["out"])


def test_signature_changes_make_new_graphs_up_to_max_graphs(caplog):
    sg = StepGraphs(model, max_graphs=2, capture=fake_capture)
    calls = [(_inputs(0, 3), 1.0), (_inputs(1, 3), 1.0), (_inputs(2, 5), 1.0), (_inputs(3, 5), 1.0),
             (_inputs(4, 3), 3.0), (_inputs(5, 3), 3.0), (_inputs(6, 3), 3.0)]
    with caplog.at_level(logging.WARNING, logger="vidit_q"):
        for (x, t, ctx, extra), s in calls:
            assert torch.equal(sg(x, t, ctx, extra=extra, scale=s)["out"], model(x, t, ctx, extra=extra, scale=s)["out"])
    # shape 3 and shape 5 get graphs; scale=3.0 (another non-tensor value) would be a third: eager, with a warning
    assert len(sg.graphs) == 2 and sg.stats["captured"] == 2 and sg.stats["eager"] == 5
    assert "more than 2 input signatures" in caplog.text
    x, t, ctx, extra = _inputs(7, 3)
    sg(x.t().contiguous().t(), t, ctx, extra=extra)  # other strides: another signature (eager first)
    assert sg.stats["eager"] == 6


@pytest.mark.parametrize("why", ["unhashable", "grad", "devices"])
def test_calls_that_cannot_be_graphed_run_eagerly(why):
    sg = StepGraphs(lambda x, opt: x * 2 + (len(opt) if isinstance(opt, dict) else 0), capture=fake_capture)
    x = torch.randn(3)
    if why == "unhashable":
        opt = {"hook": [object(), {1, 2}]}  # a set is unhashable
    elif why == "grad":
        x.requires_grad_(True)
        opt = 0
    else:
        opt = torch.zeros(1, device="meta")
    for _ in range(3):
        if why == "devices":
            y = sg(x, opt)
        else:
            y = sg(x, opt)
            assert torch.allclose(y, x * 2 + (len(opt) if isinstance(opt, dict) else 0))
    assert sg.stats == {"eager": 3, "captured": 0, "replayed": 0}


def test_default_capture_needs_cuda_tensors():
    """With the real CUDA capture, CPU calls always run eagerly (nothing captured, same results)."""
    sg = StepGraphs(model)
    for i in range(3):
        x, t, ctx, extra = _inputs(i)
        assert torch.equal(sg(x, t, ctx, extra=extra)["out"], model(x, t, ctx, extra=extra)["out"])
    assert sg.stats == {"eager": 3, "captured": 0, "replayed": 0}
