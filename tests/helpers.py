"""Small builders shared by the tests (tiny models, calibration runs)."""
import torch

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
