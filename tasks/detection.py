"""COCO object detection and instance segmentation: an mmdet detector on Lightning.

``DetectionTask`` is :class:`tasks.openmmlab.OpenMMLabTask` over an mmdet config
(``configs/mmdet/*.py``); ``CocoDataModule`` builds mmdet's ``CocoDataset`` with the config's
pipelines from ``<root>/<ann_file>`` and ``<root>/<data_prefix.img>`` (for COCO 2017:
``annotations/instances_{train,val}2017.json``, ``train2017/``, ``val2017/``), or from the
embedded shapes dataset when ``root`` is null.

Metrics are COCO's box and mask AP (AP, AP50, AP75, APs, APm, APl) from torchmetrics'
``MeanAveragePrecision`` with the pycocotools backend, against the annotation file itself,
as mmdet's ``CocoMetric`` computes them. On several processes the per-image predictions are
gathered in dataset order, each image once, and evaluated by the first process
(:class:`CocoEvaluation`), so the AP does not depend on the number of processes.

Annotation files are checked before training; these stop the run with an error naming the
file and the id: a missing file, a file that is not COCO instances JSON (missing keys or
fields, duplicate ids, fields of the wrong type), an annotation whose ``image_id`` or
``category_id`` is not listed, an image listed but missing on disk, a class of the config
missing from the categories (or in another order), an annotation without a polygon/RLE mask
when the pipeline loads masks; while loading, an image whose size is not its entry's (an EXIF
orientation, which mmcv applies, turns it). Handled, not errors:

* images without annotations: skipped in training when the config's ``filter_cfg`` says
  ``filter_empty_gt`` (mmdet's COCO configs do); kept in validation, where every detection
  on them is a false positive;
* boxes with zero area, a side under 1 pixel, or entirely outside their image: skipped in
  training (mmdet's rule), with a warning giving their count and ids; in validation they
  stay in the ground truth as the annotation file has them (as ``CocoMetric`` does);
* crowd annotations (``iscrowd: 1``): never training targets (mmdet ignores them); in
  validation, detections matching them count neither as true nor as false positives (COCO's
  rule);
* annotations of categories the config's classes leave out: not used, with a warning.
"""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence
from unittest import mock

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch.utils.data import Dataset

from msmlp.checkpoint import listed
from tasks.base import InputError
from tasks.loading import broadcast, gather_in_order, world
from tasks.openmmlab import OpenMMLabDataModule, OpenMMLabTask, dataset_classes, loads_annotations

__all__ = ['DetectionTask', 'CocoDataModule', 'read_coco', 'check_coco', 'CocoTargets', 'coco_map_metric',
           'coco_map_names', 'predictions', 'CocoEvaluation']

_REQUIRED = {
    'images': ('id', 'file_name', 'height', 'width'),
    'annotations': ('id', 'image_id', 'category_id', 'bbox', 'area'),
    'categories': ('id', 'name'),
}
_SHOWN = 5


# ----- annotation files ----------------------------------------------------------------------
def _join(root: str, path: str) -> str:
    return path if os.path.isabs(path) or not root else os.path.join(root, path)


def read_coco(path: str) -> dict:
    """The parsed COCO instances file ``path``; ``InputError`` naming the file and the id on
    a missing file, a file that is not COCO instances JSON, duplicate ids, or an annotation
    whose image or category is not listed."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f'annotation file not found: {path}')
    stat = os.stat(path)
    return _read_coco(path, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=4)
def _read_coco(path: str, mtime: int, size: int) -> dict:
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(f'{path} is not a COCO annotation file: not valid JSON ({err})') from None
    if not isinstance(data, dict):
        raise InputError(f'{path} is not a COCO annotation file: it holds a JSON {type(data).__name__}, '
                         'not an object with images, annotations and categories')
    missing = [key for key in _REQUIRED if not isinstance(data.get(key), list)]
    if missing:
        raise InputError(f'{path} is not a COCO instances file: it has no {" / ".join(missing)} list '
                         f'(keys found: {sorted(data)})')
    for key, fields in _REQUIRED.items():
        for index, item in enumerate(data[key]):
            lacking = [f for f in fields if not isinstance(item, dict) or f not in item]
            if lacking:
                which = f'id {item["id"]}' if isinstance(item, dict) and 'id' in item else f'entry {index}'
                raise InputError(f'{path}: {key} {which} lacks {", ".join(lacking)}')
        seen, duplicates = set(), []
        for item in data[key]:
            if item['id'] in seen:
                duplicates.append(item['id'])
            seen.add(item['id'])
        if duplicates:
            raise InputError(f'{path}: {key} ids are not unique: {listed(duplicates, _SHOWN)}')
    for img in data['images']:
        for side in ('width', 'height'):
            if not _is_number(img[side], integer=True) or img[side] <= 0:
                raise InputError(f'{path}: image {img["id"]} has {side} {img[side]!r}, not a whole number of '
                                 'pixels > 0')
    images = {img['id']: img for img in data['images']}
    category_ids = {cat['id'] for cat in data['categories']}
    for ann in data['annotations']:
        if ann['image_id'] not in images:
            raise InputError(f'{path}: annotation {ann["id"]} refers to image_id {ann["image_id"]!r}, '
                             'which is not in its images list')
        if ann['category_id'] not in category_ids:
            raise InputError(f'{path}: annotation {ann["id"]} has category_id {ann["category_id"]!r}, which is not '
                             f'in its categories list (ids {sorted(category_ids)})')
        if not _is_number(ann['area']) or ann['area'] < 0:
            raise InputError(f'{path}: annotation {ann["id"]} has area {ann["area"]!r}, not a number >= 0')
        bbox = ann['bbox']
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise InputError(f'{path}: annotation {ann["id"]} has bbox {bbox!r}, not [x, y, width, height]')
        if ann.get('iscrowd', 0) not in (0, 1):
            raise InputError(f'{path}: annotation {ann["id"]} has iscrowd {ann["iscrowd"]!r}, not 0 or 1')
        problem = _segmentation_problem(ann.get('segmentation'), images[ann['image_id']])
        if problem:
            raise InputError(f'{path}: annotation {ann["id"]} has {problem}')
    return data


def _is_number(value: Any, integer: bool = False) -> bool:
    """A JSON number (not a string, not a boolean); with ``integer``, a whole one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return not integer or float(value).is_integer()


def _segmentation_problem(segmentation: Any, image: dict) -> str:
    """What is wrong with a COCO ``segmentation`` field ('' if nothing): polygons are a list of
    ``[x1, y1, x2, y2, ...]`` lists, RLE a ``{'counts', 'size': [height, width]}`` of its image."""
    if segmentation is None:
        return ''
    if isinstance(segmentation, list):
        if any(_is_number(p) for p in segmentation):
            return ('a flat segmentation list [x1, y1, ...]: COCO polygons are a list of polygons '
                    '[[x1, y1, x2, y2, ...], ...]')
        for polygon in segmentation:
            if not isinstance(polygon, list) or not all(_is_number(v) for v in polygon):
                return f'a polygon that is not a list of numbers: {str(polygon)[:60]}'
        return ''
    if isinstance(segmentation, dict) and 'counts' in segmentation and 'size' in segmentation:
        if list(segmentation['size']) != [image['height'], image['width']]:
            return (f'an RLE mask of size {segmentation["size"]} (height, width) on image {image["id"]} of '
                    f'{image["height"]}x{image["width"]}')
        return ''
    return f'segmentation {str(segmentation)[:60]}, neither polygons nor an RLE with counts and size'


def _skipped_in_training(ann: dict, image: dict) -> bool:
    """mmdet ``CocoDataset.parse_data_info``'s rule for annotations it drops (and boxes with
    NaN or infinite values, which that rule lets through)."""
    x, y, w, h = ann['bbox']
    if not all(math.isfinite(v) for v in ann['bbox']):
        return True
    inside_w = max(0, min(x + w, image['width']) - max(x, 0))
    inside_h = max(0, min(y + h, image['height']) - max(y, 0))
    return inside_w * inside_h == 0 or ann['area'] <= 0 or w < 1 or h < 1


def _malformed_box(ann: dict, image: dict) -> bool:
    """A box with a NaN or infinite value, a negative side, or entirely outside its image."""
    x, y, w, h = ann['bbox']
    if not all(math.isfinite(v) for v in ann['bbox']) or w < 0 or h < 0:
        return True
    return x >= image['width'] or y >= image['height'] or x + w <= 0 or y + h <= 0


def _without_polygon(ann: dict) -> bool:
    """Polygon segmentation of which no polygon has 3 points (mmdet ignores such an instance)."""
    polygons = ann.get('segmentation')
    return isinstance(polygons, list) and not any(len(p) >= 6 and len(p) % 2 == 0 for p in polygons)


def check_coco(ann_file: str, img_dir: str, classes: Sequence[str], needs_masks: bool = False,
               training: bool = False) -> Dict[str, List]:
    """Check a COCO instances file against its images and the classes a config trains.

    Raises ``InputError`` (naming the file and the id) for everything :func:`read_coco`
    refuses, images missing under ``img_dir``, classes not among the categories or in
    another order than the file lists them (mmdet would mislabel them), and annotations
    without a mask when ``needs_masks``. Warns about annotations training skips or ignores,
    and about malformed boxes and polygons in an evaluation split (scored as the file has them).

    Returns:
        ids by kind: ``'skipped'`` (boxes training skips: zero area, outside, NaN), ``'crowd'``,
        ``'unannotated'`` (images), ``'malformed'`` (NaN, negative-size or outside boxes),
        ``'no_polygon'`` (masks without a polygon of 3 points, when ``needs_masks``).
    """
    data = read_coco(ann_file)
    names = [cat['name'] for cat in data['categories']]
    absent = [c for c in classes if c not in names]
    if absent:
        raise InputError(f'{ann_file}: {len(absent)} of the config\'s classes are not among its {len(names)} '
                         f'categories: {listed(map(repr, absent), _SHOWN)} (its categories: '
                         f'{listed(map(repr, names), _SHOWN)})')
    in_file_order = [n for n in names if n in set(classes)]
    if list(classes) != in_file_order:
        at = next(i for i, (ours, theirs) in enumerate(zip(classes, in_file_order)) if ours != theirs)
        raise InputError(f'{ann_file}: the config lists its {len(classes)} classes in another order than the file\'s '
                         f'categories: class {at} is {classes[at]!r} in the config, {in_file_order[at]!r} in the '
                         'file; mmdet numbers labels in the file\'s order, so set metainfo.classes in that order')
    missing = [img for img in data['images'] if not os.path.isfile(os.path.join(img_dir, img['file_name']))]
    if missing:
        shown = ', '.join(f'{os.path.join(img_dir, img["file_name"])} (image id {img["id"]})'
                          for img in missing[:_SHOWN])
        raise InputError(f'{len(missing)} image(s) listed in {ann_file} are missing on disk: {shown}'
                         + (' ...' if len(missing) > _SHOWN else ''))
    images = {img['id']: img for img in data['images']}
    wanted = {cat['id'] for cat in data['categories'] if cat['name'] in set(classes)}
    report: Dict[str, List] = {'skipped': [], 'crowd': [], 'unannotated': [], 'malformed': [], 'no_polygon': []}
    annotated, unused = set(), []
    for ann in data['annotations']:
        if ann['category_id'] not in wanted:
            unused.append(ann)
            continue
        annotated.add(ann['image_id'])
        if ann.get('iscrowd'):
            report['crowd'].append(ann['id'])
        if _malformed_box(ann, images[ann['image_id']]):
            report['malformed'].append(ann['id'])
        if _skipped_in_training(ann, images[ann['image_id']]):
            report['skipped'].append(ann['id'])
        elif needs_masks and not ann.get('segmentation'):
            raise InputError(f'{ann_file}: annotation {ann["id"]} has no segmentation, but the pipeline loads '
                             'masks (LoadAnnotations with_mask=True)')
        elif needs_masks and _without_polygon(ann):
            report['no_polygon'].append(ann['id'])
    report['unannotated'] = [i for i in images if i not in annotated]
    _warn_about(ann_file, report, training)
    if unused:
        by_id = {cat['id']: cat['name'] for cat in data['categories']}
        others = sorted({by_id[ann['category_id']] for ann in unused})
        rank_zero_warn(f'{ann_file}: {len(unused)} annotation(s) of categories the config does not train '
                       f'({listed(others, _SHOWN)}) are not used: metainfo.classes lists {len(classes)} of '
                       f'the file\'s {len(names)} categories')
    return report


def _warn_about(ann_file: str, report: Dict[str, List], training: bool) -> None:
    def count(kind):
        return f'{len(report[kind])} annotation(s)', f'(ids {listed(report[kind], _SHOWN)})'
    if training and report['skipped']:
        many, ids = count('skipped')
        rank_zero_warn(f'{ann_file}: {many} with zero area, NaN values or outside their image are skipped in '
                       f'training {ids}')
    if not training and report['malformed']:
        many, ids = count('malformed')
        rank_zero_warn(f'{ann_file}: {many} with NaN or infinite values, negative sizes or outside their image; '
                       f'they are evaluated as the file has them, as CocoMetric does {ids}')
    if report['no_polygon']:
        many, ids = count('no_polygon')
        consequence = ('mmdet ignores these instances in training' if training
                       else 'their masks are empty in the mask AP')
        rank_zero_warn(f'{ann_file}: {many} have no polygon of 3 or more points: {consequence} {ids}')


def _mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO polygon list or RLE as an HxW uint8 mask (as ``COCO.annToMask``)."""
    from pycocotools import mask as mask_utils
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if len(p) >= 6 and len(p) % 2 == 0]
        if not polygons:
            return np.zeros((height, width), np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation.get('counts'), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle)


class CocoTargets:
    """Per-image ground truth of a COCO file in torchmetrics' format, labels numbered as
    mmdet's ``CocoDataset`` numbers them (the file's category order, restricted to ``classes``)."""

    def __init__(self, ann_file: str, classes: Sequence[str], with_masks: bool = True):
        data = read_coco(ann_file)
        self.ann_file = ann_file
        wanted = [cat for cat in data['categories'] if cat['name'] in set(classes)]
        self.cat2label = {cat['id']: i for i, cat in enumerate(wanted)}
        self.images = {img['id']: img for img in data['images']}
        self.with_masks = with_masks
        self.annotations: Dict[int, List[dict]] = {i: [] for i in self.images}
        for ann in data['annotations']:
            if ann['category_id'] in self.cat2label:
                self.annotations[ann['image_id']].append(ann)

    def __call__(self, image_id: int) -> Dict[str, torch.Tensor]:
        image, anns = self.images[image_id], self.annotations[image_id]
        boxes = torch.tensor([a['bbox'] for a in anns], dtype=torch.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        target = dict(boxes=boxes.float(),
                      labels=torch.tensor([self.cat2label[a['category_id']] for a in anns], dtype=torch.long),
                      iscrowd=torch.tensor([int(bool(a.get('iscrowd', 0))) for a in anns], dtype=torch.long),
                      # torchmetrics replaces an area of 0 by the box's or mask's; COCOeval keeps 0
                      area=torch.tensor([float(a['area']) or 1e-9 for a in anns], dtype=torch.float32))
        if self.with_masks:
            h, w = image['height'], image['width']
            masks = [_mask(a['segmentation'], h, w) for a in anns]
            target['masks'] = torch.from_numpy(np.stack(masks)).bool() if masks else torch.zeros(0, h, w, dtype=torch.bool)
        return target


class _SizeChecked(Dataset):
    """An mmdet dataset whose images must have the size their COCO entry gives: the boxes and
    masks are drawn at the entry's size (an image turned by its EXIF orientation, or replaced
    by another, would train on and be scored against misplaced targets without a word)."""

    def __init__(self, dataset: Dataset, ann_files: Sequence[str]):
        self.dataset, self.ann_files = dataset, ' / '.join(dict.fromkeys(ann_files))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        sample = item['data_samples']
        entry = self.dataset.get_data_info(index)
        height, width = sample.ori_shape[:2]
        if entry.get('img_path') == sample.img_path and (entry['height'], entry['width']) != (height, width):
            raise InputError(f"{self.ann_files} gives image {sample.img_path} as {entry['width']}x"
                             f"{entry['height']} (WxH) but the file is {width}x{height}"
                             + _orientation_note(sample.img_path))
        return item

    def __getattr__(self, name: str):
        if name in ('dataset', 'ann_files'):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def _orientation_note(path: str) -> str:
    """Why an image may read in another size than it is stored: its EXIF orientation."""
    try:
        with Image.open(path) as image:
            orientation = image.getexif().get(0x0112, 1)
    except (OSError, ValueError):
        return ''
    if orientation in (1, None):
        return ''
    return (f' (its EXIF orientation {orientation} turns it when read: save it with the rotation applied, '
            'or give the turned size in the annotation file)')


class _WithTargets(_SizeChecked):
    """A size-checked mmdet dataset whose items also carry their COCO ground truth (``'targets'``)
    and their position in the dataset (``'index'``)."""

    def __init__(self, dataset: Dataset, targets: CocoTargets):
        super().__init__(dataset, [targets.ann_file])
        self.targets = targets

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        item['targets'] = self.targets(item['data_samples'].img_id)
        item['index'] = index
        return item

    def __getattr__(self, name: str):
        if name == 'targets':
            raise AttributeError(name)
        return super().__getattr__(name)


# ----- metrics -------------------------------------------------------------------------------
_MAP_NAMES = {'map': 'AP', 'map_50': 'AP50', 'map_75': 'AP75', 'map_small': 'APs', 'map_medium': 'APm',
              'map_large': 'APl'}


def coco_map_metric(iou_types: Sequence[str]):
    """torchmetrics' ``MeanAveragePrecision`` computing exactly what pycocotools' ``COCOeval``
    (and mmdet's ``CocoMetric``) computes: pycocotools backend, and its float64 IoU and recall
    thresholds (torchmetrics' defaults are float32, which moves AP by up to ~1e-3). It never
    synchronises over processes itself (:class:`CocoEvaluation` gathers in dataset order)."""
    from torchmetrics.detection import MeanAveragePrecision
    iou_thresholds = np.linspace(.5, .95, int(np.round((.95 - .5) / .05)) + 1).tolist()
    rec_thresholds = np.linspace(.0, 1., int(np.round(1. / .01)) + 1).tolist()
    return MeanAveragePrecision(iou_type=tuple(iou_types), backend='pycocotools', sync_on_compute=False,
                                iou_thresholds=iou_thresholds, rec_thresholds=rec_thresholds)


def coco_map_names(values: Dict[str, torch.Tensor], iou_types: Sequence[str]) -> Dict[str, float]:
    """torchmetrics' ``MeanAveragePrecision`` results as ``{'bbox_AP': ..., 'segm_AP50': ...}``."""
    out = {}
    for iou_type in iou_types:
        prefix = f'{iou_type}_' if len(iou_types) > 1 else ''
        for key, name in _MAP_NAMES.items():
            out[f'{iou_type}_{name}'] = float(values[prefix + key])
    return out


def _compact(item: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """``item`` with its HxW boolean ``masks`` as COCO RLE (small enough to gather)."""
    if 'masks' not in item:
        return item
    from pycocotools import mask as mask_utils
    masks = item['masks']
    rle = mask_utils.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8))) if len(masks) else []
    return dict(item, masks=(tuple(masks.shape), rle))


def _expand(item: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The inverse of :func:`_compact`."""
    if 'masks' not in item:
        return item
    from pycocotools import mask as mask_utils
    shape, rle = item['masks']
    masks = torch.from_numpy(mask_utils.decode(rle)).permute(2, 0, 1) if rle else torch.zeros(shape)
    return dict(item, masks=masks.bool().reshape(shape))


class CocoEvaluation:
    """COCO AP of a whole split, the same on any number of processes.

    Each process keeps its images' predictions and ground truth (masks as RLE) with their
    index in the dataset; :meth:`compute` gathers them in dataset order, each image once,
    evaluates them on the first process with :func:`coco_map_metric` and gives every process
    the result (as mmengine's evaluator collects results before ``CocoMetric`` runs).
    """

    def __init__(self, iou_types: Sequence[str]) -> None:
        self.iou_types = tuple(iou_types)
        self.records: List[tuple] = []

    def update(self, indices: Sequence[int], preds: Sequence[dict], targets: Sequence[dict]) -> None:
        for index, pred, target in zip(indices, preds, targets):
            self.records.append((int(index), (_compact(pred), _compact(target))))

    def reset(self) -> None:
        self.records = []

    def compute(self) -> Dict[str, float]:
        ordered = gather_in_order(self.records, to_rank=0)
        values = None
        if world()[1] == 0:
            metric = coco_map_metric(self.iou_types)
            for pred, target in ordered:
                metric.update([_expand(pred)], [_expand(target)])
            values = coco_map_names(metric.compute(), self.iou_types)
        return broadcast(values)


def predictions(data_samples: Sequence, with_masks: bool) -> List[Dict[str, torch.Tensor]]:
    """mmdet ``DetDataSample`` predictions in torchmetrics' format (on the CPU)."""
    out = []
    for sample in data_samples:
        pred = sample.pred_instances
        item = dict(boxes=pred.bboxes.detach().float().cpu(), scores=pred.scores.detach().float().cpu(),
                    labels=pred.labels.detach().long().cpu())
        if with_masks:
            masks = pred.masks
            masks = masks.to_tensor(torch.bool, 'cpu') if hasattr(masks, 'to_tensor') else torch.as_tensor(masks)
            item['masks'] = masks.detach().bool().cpu()
        out.append(item)
    return out


# ----- task ----------------------------------------------------------------------------------
class DetectionTask(OpenMMLabTask):
    """An mmdet detector (Mask R-CNN, Cascade Mask R-CNN, ...) from an mmdet config.

    Args:
        config: The mmdet config (``configs/mmdet/*.py`` or any path).
        cfg_options: Overrides merged into the config (mmengine dotted keys).
        pretrained: Backbone checkpoint replacing ``model.backbone.init_cfg``; ``''`` for none.
        predict_dir: Where ``predict`` writes its PNGs (default ``<default_root_dir>/predictions``).
        num_threads: PyTorch's intra-op CPU threads (None: PyTorch's default; see OpenMMLabTask).
        score_thr: Detections drawn by ``predict`` score at least this.
    """

    scope = 'mmdet'
    runtime_args = ('predict_dir', 'num_threads', 'score_thr')

    def __init__(self, config: str = 'mmdet/mask-rcnn_msmlp-mini_fpn_shapes.py',
                 cfg_options: Optional[Dict[str, Any]] = None, pretrained: Optional[str] = None,
                 predict_dir: Optional[str] = None, num_threads: Optional[int] = None, score_thr: float = 0.3):
        if not 0 <= score_thr <= 1:
            raise InputError(f'model.score_thr={score_thr}: detection scores are in 0..1 (a higher one draws nothing)')
        super().__init__(config, cfg_options, pretrained, predict_dir, num_threads)
        self.score_thr = score_thr
        self._visualizer = None

    @property
    def with_masks(self) -> bool:
        return bool(getattr(self.model, 'with_mask', False))

    @property
    def iou_types(self) -> tuple:
        return ('bbox', 'segm') if self.with_masks else ('bbox',)

    def configure_metrics(self) -> None:
        self.val_metrics, self.test_metrics = CocoEvaluation(self.iou_types), CocoEvaluation(self.iou_types)

    def setup(self, stage: str) -> None:
        precision = str(self.trainer.precision)
        if self.trainer.strategy.root_device.type == 'cpu' and not precision.startswith('32'):
            # under CPU autocast the decoded boxes stay bfloat16 (CUDA's autocast runs the
            # decoder's exp in float32, mmdet#9727), and mmcv's CPU NMS reads float32 alone (not float64)
            given = f'{precision} (or 16-mixed, which Lightning runs as bf16-mixed on the CPU)' \
                if precision == 'bf16-mixed' else precision
            raise InputError(f'trainer.precision={given}: detection on the CPU runs in 32-true only '
                             "(mmcv's CPU NMS takes float32 boxes); drop --trainer.precision")
        super().setup(stage)

    def check_classes(self, classes: Sequence[str]) -> None:
        heads = getattr(self.model, 'roi_head', None) or getattr(self.model, 'bbox_head', None)
        counts = {m.num_classes for m in (heads.modules() if heads is not None else ())
                  if isinstance(getattr(m, 'num_classes', None), int)}
        if counts and counts != {len(classes)}:
            raise InputError(f'the model\'s heads predict {sorted(counts)} classes but the data has {len(classes)} '
                             f'({list(classes)}); set num_classes in the config\'s heads')

    def update_metrics(self, metrics, outputs: list, batch: dict) -> None:
        if 'targets' not in batch:
            raise RuntimeError('evaluation batches carry no targets: build the data with CocoDataModule')
        targets = batch['targets']
        if isinstance(targets, dict):  # pseudo_collate turned the list of dicts into a dict of lists
            targets = [dict(zip(targets, values)) for values in zip(*targets.values())]
        metrics.update(batch['index'], predictions(outputs, self.with_masks), list(targets))

    def compute_metrics(self, metrics: CocoEvaluation) -> Dict[str, float]:
        return metrics.compute()

    def draw(self, data_sample, out_file: str) -> None:
        import mmcv
        from mmdet.visualization import DetLocalVisualizer
        with every_process_draws():
            if self._visualizer is None:
                self._visualizer = DetLocalVisualizer(name=f'msmlp-det-{id(self)}')
            self._visualizer.dataset_meta = dict(classes=tuple(self.classes or ()))
            image = mmcv.imread(data_sample.img_path, channel_order='rgb')
            self._visualizer.add_datasample(Path(out_file).stem, image, data_sample.cpu(), draw_gt=False,
                                            show=False, out_file=out_file, pred_score_thr=self.score_thr)


@contextmanager
def every_process_draws():
    """mmengine's visualizer draws on the main process only (its methods are ``master_only``,
    no-ops elsewhere); predict gives each process its own share of the images to draw."""
    import mmengine.dist.utils
    with mock.patch.object(mmengine.dist.utils, 'is_main_process', lambda group=None: True):
        yield


# ----- data ----------------------------------------------------------------------------------
def _loads_masks(pipeline: Sequence) -> bool:
    return any(loads_annotations(t) and t.get('with_mask') for t in pipeline or ())


class CocoDataModule(OpenMMLabDataModule):
    """COCO-format instance data with the mmdet config's pipelines.

    Args:
        root: The dataset folder the config's ``ann_file`` and ``data_prefix`` are relative
            to (COCO 2017: ``annotations/instances_{train,val}2017.json``, ``train2017/``,
            ``val2017/``); null writes (once) and uses the embedded shapes dataset.
        batch_size: Training images per device (default: the config's, 2 for COCO).
        num_workers: Loader processes (default: the config's).
        predict_images: An image, a folder or a glob for ``predict`` (default: the val images).
        config: An mmdet config; by default the task's.
        cfg_options: Overrides merged into ``config`` (only with ``config``).
    """

    scope = 'mmdet'
    embedded_layout = 'annotations/instances_{train,val}.json'

    def __init__(self, root: Optional[str] = None, batch_size: Optional[int] = None,
                 num_workers: Optional[int] = None, predict_images: Optional[str] = None,
                 config: Optional[str] = None, cfg_options: Optional[Dict[str, Any]] = None):
        super().__init__(root, batch_size, num_workers, predict_images, config, cfg_options)
        self.ann_files: Dict[str, str] = {}
        self.train_ann_files: List[str] = []  # every leaf dataset's (a ConcatDataset has several)
        self.masks: Dict[str, bool] = {}

    def embedded_root(self) -> Path:
        from tasks.embedded import ensure_dataset
        return ensure_dataset('coco')

    def prepare_dataset_cfg(self, split: str, dataset_cfg) -> None:
        root = dataset_cfg['data_root']
        ann_file = _join(root, dataset_cfg['ann_file'])
        img_dir = _join(root, (dataset_cfg.get('data_prefix') or {}).get('img', ''))
        if not os.path.isfile(ann_file):
            self.explain_missing('annotation file', ann_file, root, dataset_cfg['ann_file'])
        self.masks[split] = _loads_masks(dataset_cfg.get('pipeline'))
        check_coco(ann_file, img_dir, dataset_classes(self.cfg, self.scope, dataset_cfg),
                   needs_masks=self.masks[split], training=split == 'train')
        self.ann_files[split] = ann_file
        if split == 'train':
            self.train_ann_files.append(ann_file)

    def wrap_dataset(self, split: str, dataset: Dataset) -> Dataset:
        if split == 'train':
            return _SizeChecked(dataset, self.train_ann_files)
        return _WithTargets(dataset, CocoTargets(self.ann_files[split], dataset.metainfo['classes'],
                                                self.masks[split]))
