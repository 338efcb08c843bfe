"""Small builders shared by the tests (tiny models, calibration runs)."""
import torch
from torch.utils._pytree import tree_flatten as _tree_flatten

from viditq.models.pixart import PixArt, pixart_config_from_state_dict
from viditq.models.tiny_pixart import build_tiny_pixart_state_dict, pseudo_caption
from viditq.quant_core import Calibrator, describe_model
from viditq.standalone.sampler import sample_euler_cfg

TOKENS, CAPTION = 16, 256


def tiny_pixart(seed=0, hidden=256, depth=2, outliers=True, micro_condition=False):
    sd = build_tiny_pixart_state_dict(seed, hidden=hidden, depth=depth, caption_channels=CAPTION, token_num=TOKENS,
                                      outliers=outliers, micro_condition=micro_condition)
    model = PixArt(**pixart_config_from_state_dict(sd))
    model.load_state_dict(sd)
    return model.eval()


def text_pair():
    return pseudo_caption("a red cube", TOKENS, CAPTION), pseudo_caption("", TOKENS, CAPTION)


def noise(size=16, batch=1, seed=1):
    return torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(seed))


def sample(model, steps=4, cfg=4.5, x=None, hook=None):
    cond, uncond = text_pair()
    return sample_euler_cfg(model, noise() if x is None else x, cond, uncond, steps, cfg, on_model_call=hook)


def calibrate(model, steps=4, buckets=4):
    _, _, layers, fingerprint = describe_model(model)
    cal = Calibrator({n: m for n, (m, _) in layers.items()}, num_buckets=buckets)
    with cal:
        sample(model, steps, hook=cal.set_step)
    return cal.result(fingerprint)


# A stand-in for CUDA graph capture (kernels/step_graph.StepGraphs' `capture`) for CPU tests: "capturing" runs the
# call on the static input buffers, and each replay runs it again, writing into the captured outputs as a replay
# does. So a replay computes on whatever the buffers hold: stale inputs would show.
class FakeGraph:
    def __init__(self, run):
        self.run, self.replays = run, 0
        self.out = run()

    def replay(self):
        self.replays += 1
        for dst, src in zip(_tree_flatten(self.out)[0], _tree_flatten(self.run())[0]):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)


def fake_capture(run):
    g = FakeGraph(run)
    return g, g.out


