"""The embedded classification dataset: coloured shapes in the ImageNet-folder layout.

``train/<class>/*.png`` and ``val/<class>/*.png``, four classes (chance is 0.25). Each
image is one bright shape of random colour, size, position and tilt (up to 15 degrees) on
a random dark background, with pixel noise, so only the shape identifies the class.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

__all__ = ['DIRNAME', 'CLASSES', 'IMAGES_PER_CLASS', 'IMAGE_SIZE', 'write']

DIRNAME = 'imagenet-shapes-v2'
CLASSES = ('circle', 'cross', 'square', 'triangle')
IMAGES_PER_CLASS = {'train': 400, 'val': 100}
IMAGE_SIZE = 32
_SUPERSAMPLE = 4  # draw large, then downscale: anti-aliased edges
_SEED = 20220213
_MAX_TILT = math.radians(15)


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list:
    if kind == 'square':
        corners = [(1, 1), (-1, 1), (-1, -1), (1, -1)]
        points = [(x * r * 0.8, y * r * 0.8) for x, y in corners]
    elif kind == 'triangle':
        points = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    else:  # cross: a plus sign of arm half-width w
        w = r * 0.33
        points = [(w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w), (-w, -r), (w, -r), (w, -w),
                  (r, -w), (r, w), (w, w)]
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in points]


def _colours(rng: np.random.Generator) -> tuple:
    """A dark background and a bright foreground colour."""
    return tuple(int(v) for v in rng.integers(0, 90, size=3)), tuple(int(v) for v in rng.integers(150, 256, size=3))


def draw_shape(kind: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """One RGB image of shape ``kind``."""
    big = size * _SUPERSAMPLE
    bg, fg = _colours(rng)
    radius = rng.uniform(0.22, 0.42) * big
    cx, cy = rng.uniform(radius, big - radius, size=2)
    image = Image.new('RGB', (big, big), bg)
    draw = ImageDraw.Draw(image)
    if kind == 'circle':
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fg)
    else:
        draw.polygon(_polygon(kind, cx, cy, radius, rng.uniform(-_MAX_TILT, _MAX_TILT)), fill=fg)
    pixels = np.asarray(image.resize((size, size), Image.LANCZOS), dtype=np.float32)
    pixels += rng.normal(0, 8, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write(folder: Path) -> None:
    """Write the dataset into ``folder`` (deterministic: the same files every time)."""
    rng = np.random.default_rng(_SEED)
    jobs = [(split, kind, i) for split, n in IMAGES_PER_CLASS.items() for kind in CLASSES for i in range(n)]
    for split, kind, i in tqdm(jobs, desc='shapes dataset', unit='img'):
        out = Path(folder) / split / kind
        out.mkdir(parents=True, exist_ok=True)
        draw_shape(kind, rng).save(out / f'{kind}_{i:04d}.png')
