"""A small synthetic dataset in the ADE20K layout, written once for ``msmlp fit --task seg``.

The layout and label encoding are ADEChallengeData2016's, so the real loaders read it
unchanged::

    <root>/images/{training,validation}/ADE_{split}_{i:08d}.jpg        RGB JPEG
    <root>/annotations/{training,validation}/ADE_{split}_{i:08d}.png   8-bit label map

A label value ``v`` in 1..150 is ADE20K class ``v - 1``; 0 is "other" (unlabelled), which
``reduce_zero_label`` turns into the ignore index 255. Scenes are outdoor views with five
ADE20K classes (:data:`CLASSES`): sky above a wavy horizon, grass below it, and buildings
(grey, with windows), trees (disc and trunk) and tents (triangles) standing on it. As in
ADE20K, a thin unlabelled border surrounds each object and some scenes hold an unlabelled
blob. Image sizes vary, as ADE20K's do.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

__all__ = ['DIRNAME', 'CLASSES', 'ADE20K_INDEX', 'SPLIT_SIZES', 'make_scene', 'write']

DIRNAME = 'ade20k-scenes-v1'
# Class name -> its index among ADE20K's 150 classes (the label map stores index + 1).
ADE20K_INDEX: Dict[str, int] = {'building': 1, 'sky': 2, 'tree': 4, 'grass': 9, 'tent': 114}
CLASSES: Tuple[str, ...] = tuple(ADE20K_INDEX)
SPLIT_SIZES = {'training': 240, 'validation': 40}
OTHER = 0
SIZES = ((96, 128), (112, 144), (128, 128), (128, 160), (112, 112))  # (H, W), ADE-like aspect ratios

PathLike = Union[str, os.PathLike]


def _value(name: str) -> int:
    return ADE20K_INDEX[name] + 1


def _noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    return rng.normal(0, sigma, shape)


def _background(rng: np.random.Generator, h: int, w: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sky over grass, split by a wavy horizon. Returns (image float HxWx3, labels, horizon per column)."""
    xs = np.arange(w)
    horizon = (h * rng.uniform(0.4, 0.6) + rng.uniform(2, 6) * np.sin(xs * rng.uniform(0.03, 0.09)
                                                                     + rng.uniform(0, 6.3))).astype(int)
    rows = np.arange(h)[:, None]
    is_sky = rows < horizon[None, :]
    sky_top, sky_low = np.array([90, 150, 225]), np.array([185, 215, 245])
    t = (rows / h)[..., None]
    sky = sky_top * (1 - t) + sky_low * t + _noise(rng, (h, w, 3), 4)
    grass_colour = np.array([70, 140, 50]) + rng.uniform(-15, 15, 3)
    grass = grass_colour + _noise(rng, (h, w, 1), 14) + _noise(rng, (h, w, 3), 5)
    image = np.where(is_sky[..., None], sky, grass)
    labels = np.where(is_sky, _value('sky'), _value('grass')).astype(np.uint8)
    return image, labels, horizon


def _object_mask(rng: np.random.Generator, kind: str, h: int, w: int, base_y: int, x: int) -> Image.Image:
    """A binary mask (mode 'L', 255 inside) of one object standing at (x, base_y)."""
    mask = Image.new('L', (w, h), 0)
    draw = ImageDraw.Draw(mask)
    s = min(h, w)
    if kind == 'building':
        bw, bh = rng.uniform(0.18, 0.35) * w, rng.uniform(0.3, 0.55) * h
        draw.rectangle([x - bw / 2, base_y - bh, x + bw / 2, base_y], fill=255)
    elif kind == 'tree':
        r = rng.uniform(0.09, 0.15) * s
        trunk = rng.uniform(0.08, 0.14) * s
        draw.rectangle([x - r / 4, base_y - trunk, x + r / 4, base_y], fill=255)
        draw.ellipse([x - r, base_y - trunk - 2 * r, x + r, base_y - trunk + 1], fill=255)
    else:  # tent
        half, th = rng.uniform(0.1, 0.18) * w, rng.uniform(0.15, 0.3) * h
        draw.polygon([(x - half, base_y), (x + half, base_y), (x + rng.uniform(-0.3, 0.3) * half, base_y - th)],
                     fill=255)
    return mask


def _paint(rng: np.random.Generator, kind: str, image: np.ndarray, inside: np.ndarray) -> None:
    h, w = inside.shape
    if kind == 'building':
        colour = np.full(3, rng.uniform(110, 170)) + rng.uniform(-10, 10, 3)
        fill = colour + _noise(rng, (h, w, 3), 4)
        windows = ((np.arange(h)[:, None] // 4) % 3 == 0) & ((np.arange(w)[None, :] // 4) % 3 == 0)
        fill = np.where(windows[..., None], fill * 0.45, fill)
    elif kind == 'tree':
        fill = np.array([30, 85, 25]) + rng.uniform(-10, 10, 3) + _noise(rng, (h, w, 3), 10)
    else:
        fill = np.array([235, 125, 35]) + rng.uniform(-15, 15, 3) + _noise(rng, (h, w, 3), 6)
    image[inside] = fill[inside]


def _border(inside: np.ndarray) -> np.ndarray:
    """The one-pixel ring just outside ``inside`` (4-neighbourhood)."""
    grown = inside.copy()
    grown[1:] |= inside[:-1]
    grown[:-1] |= inside[1:]
    grown[:, 1:] |= inside[:, :-1]
    grown[:, :-1] |= inside[:, 1:]
    return grown & ~inside


def make_scene(rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """One scene: (uint8 HxWx3 RGB image, uint8 HxW label map in ADE20K encoding)."""
    h, w = SIZES[rng.integers(len(SIZES))]
    image, labels, horizon = _background(rng, h, w)
    for _ in range(rng.integers(1, 4)):
        kind = ('building', 'tree', 'tent')[rng.integers(3)]
        x = int(rng.uniform(0.1, 0.9) * w)
        base_y = min(h - 1, int(horizon[x] + rng.uniform(0.05, 0.3) * h))
        inside = np.asarray(_object_mask(rng, kind, h, w, base_y, x)) > 0
        _paint(rng, kind, image, inside)
        labels[inside] = _value(kind)
        labels[_border(inside)] = OTHER
    if rng.random() < 0.3:  # an object ADE20K would leave unlabelled
        mask = Image.new('L', (w, h), 0)
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.1) * min(h, w)
        ImageDraw.Draw(mask).ellipse([cx - 1.6 * r, cy - r, cx + 1.6 * r, cy + r], fill=255)
        inside = np.asarray(mask) > 0
        image[inside] = np.array([170, 60, 170]) + _noise(rng, (int(inside.sum()), 3), 8)
        labels[inside] = OTHER
    return np.clip(image, 0, 255).astype(np.uint8), labels


def write(folder: PathLike, split_sizes: Optional[Dict[str, int]] = None, seed: int = 0) -> None:
    """Write the dataset into ``folder`` (the entry point of :func:`tasks.embedded.ensure_dataset`)."""
    folder = Path(folder)
    split_sizes = split_sizes or SPLIT_SIZES
    for split_index, (split, count) in enumerate(split_sizes.items()):
        rng = np.random.default_rng([seed, split_index])
        img_dir, ann_dir = folder / 'images' / split, folder / 'annotations' / split
        img_dir.mkdir(parents=True, exist_ok=True)
        ann_dir.mkdir(parents=True, exist_ok=True)
        for i in tqdm(range(count), desc=f'ade20k {split}', leave=False):
            image, labels = make_scene(rng)
            stem = f'ADE_{"train" if split == "training" else "val"}_{i + 1:08d}'
            Image.fromarray(image).save(img_dir / f'{stem}.jpg', quality=92)
            Image.fromarray(labels, mode='L').save(ann_dir / f'{stem}.png')
