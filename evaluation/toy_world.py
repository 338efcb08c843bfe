"""A procedural world of coloured shapes, for training and scoring toy text-to-image / text-to-video DiTs.

A scene is one shape (circle, square, triangle) of one colour at one of five positions on a grey background;
in video the shape moves in a straight line between two positions. Captions are built from a fixed vocabulary,
so a tiny frozen "text encoder" (a seeded word-embedding table with outlier channels, like T5's) suffices.
"""
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

SHAPES = ("circle", "square", "triangle")
COLOURS: Dict[str, Tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.9, 0.1), "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0),
}
POSITIONS: Dict[str, Tuple[float, float]] = {  # (x, y) centre as a fraction of the image
    "left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "center": (0.5, 0.5),
}
BACKGROUND = (0.5, 0.5, 0.5)
WORDS = ["<pad>", "a", "at", "the", "moving", "from", "to"] + list(SHAPES) + list(COLOURS) + list(POSITIONS)
MAX_TOKENS = 10
SIZE_FRACTION = 0.36  # shape diameter / image side


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    position: str
    end_position: Optional[str] = None  # video: where the shape arrives on the last frame

    def caption(self) -> str:
        if self.end_position:
            return f"a {self.colour} {self.shape} moving from {self.position} to {self.end_position}"
        return f"a {self.colour} {self.shape} at the {self.position}"


def all_image_scenes() -> List[Scene]:
    return [Scene(s, c, p) for s in SHAPES for c in COLOURS for p in POSITIONS]


def all_video_scenes() -> List[Scene]:
    return [Scene(s, c, p, e) for s in SHAPES for c in COLOURS for p in POSITIONS for e in POSITIONS if e != p]


def random_scene(rng: random.Random, video: bool = False) -> Scene:
    pos = rng.choice(list(POSITIONS))
    end = rng.choice([p for p in POSITIONS if p != pos]) if video else None
    return Scene(rng.choice(SHAPES), rng.choice(list(COLOURS)), pos, end)


def _mask(shape: str, cx: float, cy: float, size: int) -> torch.Tensor:
    r = SIZE_FRACTION * size / 2
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    dx, dy = xs - cx * size, ys - cy * size
    if shape == "circle":
        return (dx ** 2 + dy ** 2) <= r ** 2
    if shape == "square":
        return (dx.abs() <= r * 0.886) & (dy.abs() <= r * 0.886)  # same area as the circle
    # upward triangle inscribed in the radius-1.2r circle
    rr = r * 1.2
    top, base = -rr, rr * 0.5
    inside_y = (dy >= top) & (dy <= base)
    half_width = (dy - top) / (base - top) * rr * 0.866
    return inside_y & (dx.abs() <= half_width)


def render(scene: Scene, size: int = 32, t: float = 0.0) -> torch.Tensor:
    """[3, size, size] in [-1, 1]; t in [0, 1] moves a video scene from its start to its end position."""
    cx, cy = POSITIONS[scene.position]
    if scene.end_position:
        ex, ey = POSITIONS[scene.end_position]
        cx, cy = cx + (ex - cx) * t, cy + (ey - cy) * t
    img = torch.tensor(BACKGROUND).view(3, 1, 1).expand(3, size, size).clone()
    m = _mask(scene.shape, cx, cy, size)
    img[:, m] = torch.tensor(COLOURS[scene.colour]).view(3, 1)
    return img * 2 - 1


def render_video(scene: Scene, frames: int = 8, size: int = 32) -> torch.Tensor:
    """[frames, 3, size, size] in [-1, 1]."""
    return torch.stack([render(scene, size, i / max(1, frames - 1)) for i in range(frames)])


def tokenize(caption: str) -> torch.Tensor:
    ids = [WORDS.index(w) for w in caption.split()][:MAX_TOKENS]
    return torch.tensor(ids + [0] * (MAX_TOKENS - len(ids)))


def text_embedding_table(dim: int = 64, seed: int = 1234) -> torch.Tensor:
    """The frozen toy text encoder: a seeded embedding per word, with T5-like outlier channels."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(len(WORDS), dim, generator=g) * 0.3
    table[:, :2] += torch.tensor([4.0, -6.0])
    table[0] = 0.0  # padding (and the empty prompt) carries nothing
    return table


def encode(captions: List[str], table: torch.Tensor) -> torch.Tensor:
    """[B, MAX_TOKENS, dim] caption features, position added so word order matters."""
    ids = torch.stack([tokenize(c) if c else torch.zeros(MAX_TOKENS, dtype=torch.long) for c in captions])
    feats = table[ids]
    pos = torch.sin(torch.arange(MAX_TOKENS)[:, None] * (torch.arange(table.shape[1])[None] + 1) * 0.37)
    return feats + 0.5 * pos[None] * (ids[..., None] > 0)
