"""Score toy-world samples: does the image show the requested shape, colour and position (alignment), how close
is it to FP16 and to the clean rendering (fidelity), does a video's object move smoothly (temporal)."""
from typing import Dict, Optional

import torch

from .toy_world import BACKGROUND, COLOURS, POSITIONS, Scene, render

_FILL = {"circle": 0.785, "square": 1.0, "triangle": 0.5}  # foreground area / bounding-box area


def _to01(img: torch.Tensor) -> torch.Tensor:
    return ((img.float() + 1) / 2).clamp(0, 1)


def analyze(img: torch.Tensor) -> Optional[Dict]:
    """What a [3, H, W] image in [-1, 1] shows: shape, colour, position (None when nothing stands out)."""
    x = _to01(img)
    h, w = x.shape[1:]
    bg = torch.tensor(BACKGROUND).view(3, 1, 1)
    # a pixel is foreground when it and its 3x3 neighbourhood differ from the background: lone noisy pixels don't
    smooth = torch.nn.functional.avg_pool2d(x[None], 3, stride=1, padding=1, count_include_pad=False)[0]
    fg = ((x - bg).abs().amax(0) > 0.2) & ((smooth - bg).abs().amax(0) > 0.1)
    if fg.sum() < 0.01 * h * w:
        return None
    colour = x[:, fg].median(dim=1).values
    names = list(COLOURS)
    palette = torch.tensor([COLOURS[n] for n in names])
    colour_name = names[int(((palette - colour[None]) ** 2).sum(1).argmin())]
    ys, xs = torch.nonzero(fg, as_tuple=True)
    cx, cy = (xs.float().mean() + 0.5) / w, (ys.float().mean() + 0.5) / h
    pos_names = list(POSITIONS)
    centres = torch.tensor([POSITIONS[p] for p in pos_names])
    position = pos_names[int(((centres - torch.stack([cx, cy])[None]) ** 2).sum(1).argmin())]
    box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    fill = float(fg.sum()) / float(box)
    shape = min(_FILL, key=lambda s: abs(_FILL[s] - fill))
    return {"shape": shape, "colour": colour_name, "position": position, "centre": (float(cx), float(cy)),
            "fill": fill}


def alignment(img: torch.Tensor, scene: Scene) -> float:
    """Percent of the caption's attributes (shape, colour, position) the image shows."""
    a = analyze(img)
    if a is None:
        return 0.0
    return 100.0 * sum(a[k] == getattr(scene, k) for k in ("shape", "colour", "position")) / 3


def psnr01(ref: torch.Tensor, test: torch.Tensor) -> float:
    """PSNR of two images in [-1, 1], on the [0, 1] scale."""
    mse = float(((_to01(ref) - _to01(test)) ** 2).mean())
    return 99.0 if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def fidelity_to_data(img: torch.Tensor, scene: Scene) -> float:
    """PSNR of the sample against the clean rendering of its own caption."""
    return psnr01(render(scene, img.shape[-1]), img)


def temporal_smoothness(video: torch.Tensor) -> float:
    """0..100: how straight and even the object's path is across frames [F, 3, H, W] (100 = constant velocity,
    object present in every frame with one colour)."""
    found = [analyze(f) for f in video]
    if any(a is None for a in found):
        return 0.0
    c = torch.tensor([a["centre"] for a in found])
    if len(c) < 3:
        return 100.0
    accel = (c[2:] - 2 * c[1:-1] + c[:-2]).norm(dim=1).mean()
    step = (c[1:] - c[:-1]).norm(dim=1).mean().clamp_min(1e-3)
    same_colour = len({a["colour"] for a in found}) == 1
    return float(100.0 * torch.exp(-accel / step)) * (1.0 if same_colour else 0.5)


def video_alignment(video: torch.Tensor, scene: Scene) -> float:
    """Percent of a moving-shape caption a video [F, 3, H, W] shows: shape and colour (middle frame), start
    position (first frame), end position (last frame)."""
    first, mid, last = analyze(video[0]), analyze(video[len(video) // 2]), analyze(video[-1])
    hits = [mid is not None and mid["shape"] == scene.shape, mid is not None and mid["colour"] == scene.colour,
            first is not None and first["position"] == scene.position,
            last is not None and last["position"] == scene.end_position]
    return 100.0 * sum(hits) / 4
