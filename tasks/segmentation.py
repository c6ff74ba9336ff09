"""ADE20K semantic segmentation: an mmseg ``EncoderDecoder`` (UperNet) on the shared adapter.

:class:`SegmentationTask` is :class:`tasks.openmmlab.OpenMMLabTask` with mmseg's scope, the
ADE20K metrics (mIoU, mAcc, aAcc accumulated over the whole split, as mmseg's ``IoUMetric``),
optional multi-scale + flip test-time augmentation (the config's ``tta_pipeline`` and mmseg's
``SegTTAModel``), a switch between whole-image and sliding-window inference, and drawing:
``predict`` writes a colour overlay per image and the raw label map.

:class:`ADE20KDataModule` builds mmseg's ``ADE20KDataset`` with the config's pipelines from an
``ADEChallengeData2016`` folder (``images/{training,validation}/*.jpg``,
``annotations/{training,validation}/*.png``) or, with no ``root``, from the embedded scenes
(:mod:`tasks.embedded.ade20k`). Before anything is trained it checks that every image has its
label map and every label map its image, and while loading that each label map is an 8-bit
single-channel map (not a JPEG) of its image's size whose values are classes (or 255, ignored),
and that its image has no EXIF orientation (read turned, it would not overlap its label map):
each error names the file.
"""
from __future__ import annotations

import copy
import inspect
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image, ImageDraw
from torchmetrics.classification import MulticlassConfusionMatrix

from msmlp.checkpoint import listed
from msmlp.mm import class_palette
from tasks.base import InputError
from tasks.embedded import ensure_dataset
from tasks.openmmlab import (IMAGE_SUFFIXES, OpenMMLabDataModule, OpenMMLabTask, dataset_classes, dataset_type,
                             leaf_datasets, loads_annotations, prediction_name, without_annotations)

__all__ = ['SegmentationTask', 'ADE20KDataModule', 'SegmentationMetrics', 'CheckSegLabels',
           'check_image_label_pairs', 'class_subset_note', 'class_palette', 'draw_overlay']

DEFAULT_CONFIG = 'mmseg/msmlp-mini_upernet_ade20k-scenes-128x128.py'
IGNORE_INDEX = 255
EXIF_ORIENTATION = 0x0112
LABEL_MODES = ('L', 'P')  # 8-bit single-channel PNGs: grey or palette (indices are the labels)


# ----- metrics -----------------------------------------------------------------------------
class SegmentationMetrics(MulticlassConfusionMatrix):
    """mIoU, mAcc and aAcc over a whole split, as mmseg's ``IoUMetric`` computes them.

    A torchmetrics confusion matrix summed over every pixel of every image (``ignore_index``
    pixels left out; in distributed runs it is summed over processes). From it, per class:
    intersection = diagonal, label area = row sums, predicted area = column sums, union =
    label + predicted - intersection; IoU = intersection / union, Acc = intersection /
    label area. ``mIoU`` and ``mAcc`` average over the classes where they are defined (a
    class neither labelled nor predicted has no IoU; one never labelled has no Acc), ``aAcc``
    is all correct pixels over all labelled pixels. Values are fractions (mmseg prints
    percentages).
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, **kwargs: Any) -> None:
        super().__init__(num_classes=num_classes, ignore_index=ignore_index, validate_args=False, **kwargs)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """``preds``: class indices (or ``(N, C, ...)`` scores); ``target``: class indices."""
        if preds.is_floating_point():
            preds = preds.argmax(dim=1)
        if preds.shape != target.shape:
            raise ValueError(f'predictions of shape {tuple(preds.shape)} for labels of shape {tuple(target.shape)}')
        target = target.long()
        for name, values, allowed in (('labels', target, self.ignore_index), ('predictions', preds, None)):
            bad = (values < 0) | (values >= self.num_classes)
            if allowed is not None:
                bad &= values != allowed
            if bad.any():
                raise ValueError(f'{name} hold values {values[bad].unique()[:10].tolist()} outside the '
                                 f'{self.num_classes} classes' + (f' (other than {allowed})' if allowed is not None else ''))
        super().update(preds.long(), target)

    def per_class(self) -> Dict[str, torch.Tensor]:
        """``IoU`` and ``Acc`` per class (NaN where undefined), and the pixel areas."""
        confmat = self.confmat.double()
        intersect = confmat.diag()
        label_area, pred_area = confmat.sum(1), confmat.sum(0)
        union = label_area + pred_area - intersect
        return dict(IoU=intersect / union, Acc=intersect / label_area, intersect=intersect, union=union,
                    label_area=label_area, pred_area=pred_area)

    def compute(self) -> Dict[str, torch.Tensor]:
        return self.summary(self.per_class())

    @staticmethod
    def summary(parts: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """mIoU, mAcc and aAcc from :meth:`per_class`."""
        return dict(mIoU=parts['IoU'].nanmean(), mAcc=parts['Acc'].nanmean(),
                    aAcc=parts['intersect'].sum() / parts['label_area'].sum())


# ----- data checks -------------------------------------------------------------------------
def _files(folder: Path, suffixes: Sequence[str]) -> Dict[str, Path]:
    """Files under ``folder`` ending in ``suffixes``, by relative path without the suffix: as
    mmseg lists them (mmengine's ``list_dir_or_file``), recursively, hidden folders included,
    hidden files not."""
    found = {}
    for parent, _, names in os.walk(folder, followlinks=True):
        for name in names:
            for suffix in suffixes:
                if name.endswith(suffix) and not name.startswith('.'):
                    path = Path(parent) / name
                    found[str(path.relative_to(folder))[:-len(suffix)]] = path
    return found


def check_image_label_pairs(img_dir: Path, ann_dir: Path, img_suffix: str = '.jpg',
                            seg_map_suffix: str = '.png') -> int:
    """Check that every image has its label map and every label map its image.

    Returns the number of pairs. Raises :class:`InputError` naming the files otherwise, and
    when the image folder holds images with another suffix (mmseg would skip them silently).
    """
    for folder, what in ((img_dir, 'images'), (ann_dir, 'label maps')):
        if not folder.is_dir():
            raise InputError(f'{what} folder not found: {folder}. An ADE20K root (ADEChallengeData2016) holds '
                             'images/{training,validation}/*.jpg and annotations/{training,validation}/*.png')
    images = _files(img_dir, (img_suffix,))
    labels = _files(ann_dir, (seg_map_suffix,))
    other = {*IMAGE_SUFFIXES, *(suffix.upper() for suffix in IMAGE_SUFFIXES)} - {img_suffix}
    skipped = [p for k, p in _files(img_dir, tuple(other)).items() if k not in images]
    if skipped:
        raise InputError(f'{len(skipped)} images in {img_dir} do not end in {img_suffix!r} and would be skipped: '
                         f'{listed(sorted(skipped), limit=5)}. Convert them, or set the dataset\'s img_suffix')
    unlabelled = [p for k, p in images.items() if k not in labels]
    if unlabelled:
        raise InputError(f'{len(unlabelled)} images have no label map ({ann_dir}/<name>{seg_map_suffix}): '
                         f'{listed(sorted(unlabelled), limit=5)}')
    orphans = [p for k, p in labels.items() if k not in images]
    if orphans:
        raise InputError(f'{len(orphans)} label maps have no image ({img_dir}/<name>{img_suffix}): '
                         f'{listed(sorted(orphans), limit=5)}')
    return len(images)


class CheckSegLabels:
    """A pipeline step after ``LoadAnnotations``: the label map must be an 8-bit single-channel
    map, not a JPEG, of its image's size whose values are classes (after ``reduce_zero_label``
    and any class subset's ``label_map``) or the ignore index, and its image must have no EXIF
    orientation. Raises :class:`InputError` naming the file.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def __call__(self, results: dict) -> dict:
        path = results.get('seg_map_path', '<label map>')
        seg = results['gt_seg_map']
        self._check_mode(path)
        self._check_orientation(results.get('img_path'), path)
        if seg.ndim != 2:
            raise InputError(f'label map {path} has {seg.shape[-1]} channels: ADE20K label maps are 8-bit '
                             'single-channel PNGs of class indices (not colour images)')
        height, width = results['ori_shape'][:2]
        if seg.shape != (height, width):
            raise InputError(f'label map {path} is {seg.shape[1]}x{seg.shape[0]} (WxH) but its image '
                             f'{results.get("img_path")} is {width}x{height}')
        bad = (seg >= self.num_classes) & (seg != self.ignore_index)
        if bad.any():
            # Values outside the classes passed reduce_zero_label (-1) and any class subset's
            # label_map (which maps only the dataset's own classes) unchanged: report them as stored.
            label_map = results.get('label_map')
            stored = len(label_map) if label_map else self.num_classes
            values = np.unique(seg[bad]).astype(np.int64)
            if results.get('reduce_zero_label'):
                found, valid = (values + 1).tolist(), f'0 = other, 1..{stored} = the classes'
            else:
                found, valid = values.tolist(), f'0..{stored - 1}'
            raise InputError(f'label map {path} holds values above the class count {stored} (other than '
                             f'{self.ignore_index}, ignored): {found[:10]}; valid values: {valid}')
        return results

    @staticmethod
    def _check_mode(path: str) -> None:
        # mmseg casts what it reads to uint8: a 16-bit map would wrap around silently.
        try:
            with Image.open(path) as image:
                mode, file_format = image.mode, image.format
        except (OSError, ValueError) as err:
            raise InputError(f'cannot read label map {path}: {err}') from None
        if file_format == 'JPEG':
            raise InputError(f'label map {path} is a JPEG: lossy compression changes class indices along every '
                             'edge; save label maps as PNG')
        if mode not in LABEL_MODES and mode != 'RGB' and mode != 'RGBA':
            raise InputError(f'label map {path} is a {mode!r} image: ADE20K label maps are 8-bit single-channel '
                             'PNGs of class indices')

    @staticmethod
    def _check_orientation(img_path: Optional[str], label_path: str) -> None:
        # mmcv reads images turned by their EXIF orientation but label maps as stored: the two
        # would no longer overlap (silently so for square images and half turns).
        try:
            with Image.open(img_path) as image:
                orientation = image.getexif().get(EXIF_ORIENTATION, 1)
        except (OSError, ValueError, TypeError, AttributeError):
            return  # unreadable images are reported by the loader
        if orientation not in (1, None):
            raise InputError(f'image {img_path} has EXIF orientation {orientation}: it is read turned, its label '
                             f'map {label_path} as stored; save the image with the turn applied '
                             '(PIL.ImageOps.exif_transpose) if the labels follow the turned view, or without the '
                             'orientation tag if they follow the stored pixels')

    def __repr__(self) -> str:
        return f'{type(self).__name__}(num_classes={self.num_classes}, ignore_index={self.ignore_index})'


def _insert_label_checks(pipeline: list, check: CheckSegLabels) -> list:
    """``pipeline`` with ``check`` after every ``LoadAnnotations`` (also inside ``TestTimeAug``)."""
    check_step = dict(type=CheckSegLabels, num_classes=check.num_classes, ignore_index=check.ignore_index)
    out = []
    for step in pipeline:
        step = copy.copy(step)
        if isinstance(step, dict) and 'transforms' in step:
            # TestTimeAug: each group holds alternatives (one view per combination), so the
            # check is a group of its own after the group that loads the annotations.
            groups = []
            for group in step['transforms']:
                groups.append(group)
                if any(loads_annotations(s) for s in group):
                    groups.append([copy.copy(check_step)])
            step['transforms'] = groups
        out.append(step)
        if loads_annotations(step):
            out.append(copy.copy(check_step))
    return out


# ----- drawing -----------------------------------------------------------------------------
def draw_overlay(image: np.ndarray, labels: np.ndarray, classes: Sequence[str], palette: np.ndarray,
                 alpha: float = 0.5) -> Image.Image:
    """The RGB ``image`` with ``labels`` (class indices, ``IGNORE_INDEX`` left bare) blended in
    their class colours, and a legend of the classes present."""
    colours = np.zeros_like(image)
    known = labels < len(classes)
    colours[known] = palette[labels[known]]
    blended = image.astype(np.float32)
    blended[known] = (1 - alpha) * blended[known] + alpha * colours[known]
    overlay = Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))

    present = [int(c) for c in np.unique(labels[known])]
    row = 12
    legend_w = 8 + 6 * max((len(classes[c]) for c in present), default=0) + 16
    canvas = Image.new('RGB', (overlay.width + legend_w, max(overlay.height, row * len(present) + 4)), 'white')
    canvas.paste(overlay, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, c in enumerate(present):
        x, y = overlay.width + 4, 2 + i * row
        draw.rectangle([x, y, x + 9, y + 9], fill=tuple(int(v) for v in palette[c]))
        draw.text((x + 13, y - 1), classes[c], fill='black')
    return canvas


# ----- task --------------------------------------------------------------------------------
class SegmentationTask(OpenMMLabTask):
    """Semantic segmentation with an mmseg model (UperNet on MS-MLP by default).

    Args:
        config: The mmseg config (a path, or relative to ``configs/``). The default is the
            small embedded-default model; ``mmseg/msmlp-{t,s,b}_upernet_8xb2-160k_ade20k-512x512.py``
            are the ADE20K recipes.
        cfg_options: Overrides merged into the config (mmengine's dotted keys).
        pretrained: A backbone checkpoint replacing ``model.backbone.init_cfg``; ``''`` trains
            the backbone from scratch.
        predict_dir: Where ``predict`` writes its PNGs (default ``<default_root_dir>/predictions``).
        inference: ``'whole'`` or ``'slide'`` to override the config's ``model.test_cfg.mode``;
            sliding windows are the training crop (``crop_size``) with the config's stride, or
            2/3 of the crop (341 for 512) when the config has none.
        tta: Multi-scale + flip evaluation (validate, test, predict) with the config's
            ``tta_pipeline`` and mmseg's ``SegTTAModel`` (softmax averaged over the views).
        overlay_alpha: Opacity of the class colours in the predicted overlays.
        num_threads: PyTorch's intra-op CPU threads (None: PyTorch's default).
    """

    scope = 'mmseg'

    def __init__(self, config: str = DEFAULT_CONFIG, cfg_options: Optional[Dict[str, Any]] = None,
                 pretrained: Optional[str] = None, predict_dir: Optional[str] = None,
                 inference: Optional[str] = None, tta: bool = False, overlay_alpha: float = 0.5,
                 num_threads: Optional[int] = None):
        super().__init__(config=config, cfg_options=cfg_options, pretrained=pretrained, predict_dir=predict_dir,
                         num_threads=num_threads)

    def config_changes(self) -> List[str]:
        inference = self.hparams.get('inference')
        return super().config_changes() + ([f'inference={inference}'] if inference is not None else [])

    def configure_models(self) -> None:
        super().configure_models()
        inference = self.hparams.get('inference')
        if inference is not None:
            self.cfg.model.test_cfg = self._test_cfg(inference)
            self.model.test_cfg = copy.deepcopy(self.cfg.model.test_cfg)
        if self.tta and not self.cfg.get('tta_pipeline'):
            raise InputError(f'tta=True needs a tta_pipeline in the config {self.hparams["config"]}')
        self.num_classes = int(self.model.decode_head.num_classes)

    def _test_cfg(self, mode: str):
        from mmengine.config import ConfigDict
        if mode == 'whole':
            return ConfigDict(mode='whole')
        if mode != 'slide':
            raise InputError(f"inference must be 'whole' or 'slide', got {mode!r}")
        crop = self.cfg.get('crop_size') or self.cfg.model.data_preprocessor.get('size')
        if not crop:
            raise InputError("inference='slide' needs the config's crop_size (the sliding window)")
        stride = (self.cfg.model.get('test_cfg') or {}).get('stride') or tuple(2 * c // 3 for c in crop)
        return ConfigDict(mode='slide', crop_size=tuple(crop), stride=tuple(stride))

    @property
    def tta(self) -> bool:
        return bool(self.hparams.get('tta', False))

    @property
    def tta_model(self):
        """mmseg's ``SegTTAModel`` around ``self.model`` (not a sub-module: no duplicate weights)."""
        if self.__dict__.get('_tta_model') is None:
            from mmseg.models import SegTTAModel
            self.__dict__['_tta_model'] = SegTTAModel(module=self.model)
        return self.__dict__['_tta_model']

    def forward_test(self, batch) -> list:
        return self.tta_model.test_step(batch) if self.tta else self.model.test_step(batch)

    def check_classes(self, classes: Sequence[str]) -> None:
        if len(classes) != self.num_classes:
            raise InputError(f'the model predicts {self.num_classes} classes (decode_head.num_classes in '
                             f'{self.hparams["config"]}) but the dataset has {len(classes)}: {list(classes)[:10]}')
        self.palette = class_palette(classes)

    # ----- metrics -----------------------------------------------------------------------
    def configure_metrics(self) -> None:
        self.val_metrics = SegmentationMetrics(self.num_classes)
        self.test_metrics = SegmentationMetrics(self.num_classes)

    def update_metrics(self, metrics: SegmentationMetrics, outputs: list, batch: dict) -> None:
        for sample in outputs:
            pred = sample.pred_sem_seg.data.squeeze(0)
            target = sample.gt_sem_seg.data.squeeze(0).to(pred.device)
            try:
                metrics.update(pred, target)
            except ValueError as err:
                raise InputError(f'{sample.get("seg_map_path", sample.img_path)}: {err}') from None

    def compute_metrics(self, metrics: SegmentationMetrics) -> Dict[str, float]:
        with metrics.sync_context():  # the confusion matrix summed over processes, for the table too
            parts = metrics.per_class()
        values = {k: float(v) for k, v in metrics.summary(parts).items()}
        if self.trainer is not None and not self.trainer.sanity_checking and self.trainer.state.fn != 'fit':
            rank_zero_info(self.class_table(parts))
        return values

    def class_table(self, parts: Dict[str, torch.Tensor]) -> str:
        """Per-class IoU and Acc (percent) from ``SegmentationMetrics.per_class()``, for the
        classes present in labels or predictions."""
        classes = self.classes or [str(i) for i in range(self.num_classes)]
        width = max(len(c) for c in classes)
        lines = [f'{"class":<{width}}    IoU    Acc']
        for i, name in enumerate(classes):
            if parts['union'][i] > 0:
                lines.append(f'{name:<{width}}  {100 * parts["IoU"][i]:5.2f}  {100 * parts["Acc"][i]:5.2f}')
        return '\n'.join(lines)

    # ----- drawing -----------------------------------------------------------------------
    def draw(self, data_sample, out_file: str) -> None:
        """A colour overlay at ``out_file`` and the label map at ``<dir>/labels/<name>.png`` in
        the dataset's own encoding (:meth:`label_values`)."""
        import mmcv
        classes = self.classes or [str(i) for i in range(self.num_classes)]
        palette = getattr(self, 'palette', None)
        if palette is None or len(palette) != len(classes):
            palette = self.palette = class_palette(classes)
        image = mmcv.imread(data_sample.img_path, channel_order='rgb')
        labels = data_sample.pred_sem_seg.data.squeeze(0).cpu().numpy().astype(np.int64)
        if labels.shape != image.shape[:2]:
            raise RuntimeError(f'prediction {labels.shape} does not match image {data_sample.img_path} {image.shape[:2]}')
        draw_overlay(image, labels, classes, palette, self.hparams.get('overlay_alpha', 0.5)).save(out_file)
        raw = self.label_values()[labels]
        if raw.max() > 255:
            raise InputError(f'label values up to {raw.max()} do not fit an 8-bit label PNG')
        label_dir = Path(out_file).parent / 'labels'
        label_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(raw.astype(np.uint8), mode='L').save(label_dir / Path(out_file).name)

    def prediction_files(self, out_dir: Path, img_path: str) -> List[Path]:
        return [*super().prediction_files(out_dir, img_path), out_dir / 'labels' / prediction_name(img_path)]

    def label_values(self) -> np.ndarray:
        """The label-map value of each predicted class: the inverse of what the dataset does on
        loading (a class subset's ``label_map``, then ``reduce_zero_label``), so the written maps
        read like the dataset's own: ADE20K's index + 1, 0 being "other"."""
        dataset_cfg = leaf_datasets(self.cfg.test_dataloader.dataset)[0]
        dataset_cls = dataset_type(self.cfg, self.scope, dataset_cfg)
        reduce_zero_label = dataset_cfg.get('reduce_zero_label', _dataset_default(dataset_cls, 'reduce_zero_label'))
        classes = list(self.classes or range(self.num_classes))
        original = list(getattr(dataset_cls, 'METAINFO', {}).get('classes') or [])
        # As mmseg's BaseSegDataset.get_label_map: a subset of the dataset's classes is remapped.
        subset = classes != original and original and set(classes) <= set(original)
        values = np.array([original.index(c) for c in classes] if subset else range(len(classes)), dtype=np.int64)
        return values + 1 if reduce_zero_label else values

    def on_predict_end(self) -> None:
        super().on_predict_end()
        where = self._predict_dir().resolve()
        rank_zero_info(f'[msmlp] colour overlays: {where}/<image>.png; label maps in the dataset\'s encoding '
                       f'(ADE20K: class index + 1, 0 = other): {where}/labels/<image>.png')


# ----- data --------------------------------------------------------------------------------
def _dataset_default(dataset_cls, name: str):
    for cls in getattr(dataset_cls, '__mro__', ()):
        params = inspect.signature(cls.__init__).parameters
        if name in params and params[name].default is not inspect.Parameter.empty:
            return params[name].default
    return None


def class_subset_note(dataset_cls, classes: Sequence[str], ignore_index: int) -> Optional[str]:
    """What happens to the pixels of the dataset's other classes when the config trains a subset
    of them (mmseg's ``label_map`` sends them to the ignore index); None for no subset."""
    original = list(getattr(dataset_cls, 'METAINFO', {}).get('classes') or [])
    left_out = [c for c in original if c not in set(classes)]
    if not left_out or not set(classes) <= set(original):
        return None
    return (f'the config trains {len(classes)} of the {len(original)} classes of {dataset_cls.__name__}: label-map '
            f'pixels of the other {len(left_out)} ({listed(left_out, 5)}) are ignored ({ignore_index}) in training '
            'and evaluation')


class ADE20KDataModule(OpenMMLabDataModule):
    """mmseg's ``ADE20KDataset`` with the config's pipelines.

    Args:
        root: An ``ADEChallengeData2016`` folder (``images/{training,validation}``,
            ``annotations/{training,validation}``); None writes (once) and uses the embedded
            ADE20K-layout scenes.
        batch_size: Training images per device (default: the config's).
        num_workers: Loader processes (default: the config's).
        predict_images: An image file, a folder or a glob for ``predict`` (default: the
            validation images).
        config: An mmseg config; by default the task's.
        cfg_options: Overrides merged into ``config`` (only with ``config``).
    """

    scope = 'mmseg'
    # mmseg trains on an InfiniteSampler: every batch is full. A last batch of one image would
    # stop UperNet's batch norm after its global pooling at the end of an epoch.
    full_train_batches = True
    embedded_layout = 'images/{training,validation} and annotations/{training,validation}'

    def embedded_root(self) -> Path:
        return ensure_dataset('ade20k')

    def _tta(self) -> bool:
        task = getattr(self.trainer, 'lightning_module', None) if self.trainer is not None else None
        return bool(getattr(task, 'tta', False))

    def prepare_dataset_cfg(self, split: str, dataset_cfg) -> None:
        if split != 'train' and self._tta():
            dataset_cfg['pipeline'] = copy.deepcopy(self.cfg.tta_pipeline)
        dataset_cls = dataset_type(self.cfg, self.scope, dataset_cfg)
        classes = dataset_classes(self.cfg, self.scope, dataset_cfg)
        ignore_index = dataset_cfg.get('ignore_index', _dataset_default(dataset_cls, 'ignore_index'))
        note = class_subset_note(dataset_cls, classes, ignore_index)
        said = self.__dict__.setdefault('_notes', set())
        if note and note not in said:
            said.add(note)
            rank_zero_info(f'[msmlp] {note}')
        dataset_cfg['pipeline'] = _insert_label_checks(list(dataset_cfg['pipeline']),
                                                       CheckSegLabels(len(classes), ignore_index))
        if dataset_cfg.get('ann_file'):
            return  # a split file lists the images; the loader reports missing ones
        root = Path(dataset_cfg['data_root'])
        prefix = dataset_cfg.get('data_prefix') or {}
        img_dir = root / prefix.get('img_path', '')
        if not img_dir.is_dir():
            self.explain_missing('images folder', str(img_dir), str(root), prefix.get('img_path', ''))
        img_suffix = dataset_cfg.get('img_suffix', _dataset_default(dataset_cls, 'img_suffix'))
        seg_suffix = dataset_cfg.get('seg_map_suffix', _dataset_default(dataset_cls, 'seg_map_suffix'))
        count = check_image_label_pairs(img_dir, root / prefix.get('seg_map_path', ''), img_suffix, seg_suffix)
        if count == 0:
            raise InputError(f'no {img_suffix} images in {img_dir}')

    def predict_pipeline(self) -> list:
        if self._tta():
            return without_annotations(self.cfg.tta_pipeline)
        return super().predict_pipeline()
