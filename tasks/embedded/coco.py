"""A small synthetic dataset in the COCO layout, written once for ``msmlp fit --task det``.

The files are real COCO instance annotations, so mmdet's ``CocoDataset`` and ``CocoMetric``
read them unchanged::

    <folder>/annotations/instances_train.json   COCO instances (polygon masks)
    <folder>/annotations/instances_val.json
    <folder>/train/000000.jpg ...               RGB JPEG
    <folder>/val/000000.jpg ...

Each image shows one to four coloured shapes of three categories (:data:`CLASSES`: circle,
square, triangle; any colour, size and rotation, not overlapping) on a noisy gradient. Every
shape is annotated with its polygon, box (``[x, y, w, h]``) and polygon area. Image sizes vary
(112 to 160 pixels a side).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw

__all__ = ['DIRNAME', 'CLASSES', 'SPLIT_SIZES', 'write', 'make_image']

DIRNAME = 'coco-shapes-v1'
CLASSES: Tuple[str, ...] = ('circle', 'square', 'triangle')
SPLIT_SIZES = {'train': 320, 'val': 64}
SIZES = ((128, 128), (112, 144), (144, 112), (128, 160), (160, 128))  # (H, W)
RADIUS = (10, 30)  # circumradius of a shape, pixels


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> List[Tuple[float, float]]:
    corners = {'circle': 32, 'square': 4, 'triangle': 3}[kind]
    if kind == 'square':
        r *= 0.85  # a square's circumradius looks larger than a circle's of the same radius
    return [(cx + r * math.cos(angle + 2 * math.pi * k / corners), cy + r * math.sin(angle + 2 * math.pi * k / corners))
            for k in range(corners)]


def _area(points: List[Tuple[float, float]]) -> float:
    xs, ys = np.array(points).T
    return float(abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))) / 2)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    start, end = rng.uniform(40, 215, 3), rng.uniform(40, 215, 3)
    t = np.linspace(0, 1, w)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, h)[:, None, None]
    image = start * (1 - t) + end * t + rng.normal(0, 12, (h, w, 3))
    return np.broadcast_to(image, (h, w, 3)).copy()


def _colour(rng: np.random.Generator, behind: np.ndarray) -> Tuple[int, int, int]:
    """A saturated colour that stands out from the background colour ``behind``."""
    for _ in range(50):
        colour = rng.uniform(0, 255, 3)
        colour[rng.integers(3)] = rng.choice([rng.uniform(0, 40), rng.uniform(215, 255)])
        if np.abs(colour - behind).sum() > 150:
            break
    return tuple(int(c) for c in colour)


def make_image(rng: np.random.Generator) -> Tuple[np.ndarray, List[Dict]]:
    """One image: (uint8 HxWx3 RGB, [{'category': name, 'polygon': [(x, y), ...]}, ...])."""
    h, w = SIZES[rng.integers(len(SIZES))]
    image = _background(rng, h, w)
    canvas = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    placed: List[Tuple[float, float, float]] = []
    objects = []
    for _ in range(rng.integers(1, 5)):
        for _attempt in range(30):
            r = rng.uniform(*RADIUS)
            cx, cy = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
            if all(math.hypot(cx - x, cy - y) > r + q + 3 for x, y, q in placed):
                break
        else:
            continue
        kind = CLASSES[rng.integers(len(CLASSES))]
        points = _polygon(kind, cx, cy, r, rng.uniform(0, 2 * math.pi))
        behind = image[int(cy), int(cx)]
        draw.polygon(points, fill=_colour(rng, behind))
        placed.append((cx, cy, r))
        objects.append(dict(category=kind, polygon=points))
    return np.asarray(canvas), objects


def _annotation(obj: Dict, ann_id: int, image_id: int, h: int, w: int) -> Dict:
    points = [(min(max(x, 0.), w), min(max(y, 0.), h)) for x, y in obj['polygon']]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, y0 = min(xs), min(ys)
    return dict(id=ann_id, image_id=image_id, category_id=CLASSES.index(obj['category']) + 1,
                segmentation=[[round(c, 2) for p in points for c in p]], area=round(_area(points), 2),
                bbox=[round(x0, 2), round(y0, 2), round(max(xs) - x0, 2), round(max(ys) - y0, 2)], iscrowd=0)


def write(folder: Path, split_sizes: Dict[str, int] = None, seed: int = 0) -> None:
    """Write the dataset into ``folder`` (which exists and is empty)."""
    folder = Path(folder)
    (folder / 'annotations').mkdir(parents=True, exist_ok=True)
    categories = [dict(id=i + 1, name=name, supercategory='shape') for i, name in enumerate(CLASSES)]
    ann_id = 1
    for split_index, (split, count) in enumerate((split_sizes or SPLIT_SIZES).items()):
        rng = np.random.default_rng([seed, split_index])
        (folder / split).mkdir()
        images, annotations = [], []
        for i in range(count):
            pixels, objects = make_image(rng)
            h, w = pixels.shape[:2]
            name = f'{i:06d}.jpg'
            Image.fromarray(pixels).save(folder / split / name, quality=92)
            images.append(dict(id=i + 1, file_name=name, height=h, width=w))
            for obj in objects:
                annotations.append(_annotation(obj, ann_id, i + 1, h, w))
                ann_id += 1
        coco = dict(info=dict(description=f'msmlp embedded shapes ({split})', version=DIRNAME), licenses=[],
                    images=images, annotations=annotations, categories=categories)
        (folder / 'annotations' / f'instances_{split}.json').write_text(json.dumps(coco))
