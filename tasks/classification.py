"""Image classification: an MS-MLP (any timm model) on an ImageNet-style folder.

``ImageFolderDataModule`` reads ``<root>/train/<class>/*`` and ``<root>/val/<class>/*`` (any
common image format; grayscale, palette and RGBA images are converted to RGB) with timm's
ImageNet transforms. ``ClassificationTask`` trains with the released MS-MLP recipe: its
defaults are the ImageNet-1K recipe of ``msmlp_tiny`` (see ``configs/cls/*.yaml``).

An image that cannot be read stops the run with an error naming the file (nothing is
skipped silently); the last checkpoint is kept for resuming.

Training batches come from :class:`tasks.loading.ResumableLoader` (the same order and
augmentations on any number of workers, resumable mid-epoch); validation and test see every
image once on any number of processes, and their loss, top-1 and top-5 are summed over
processes, so they do not depend on the process count.
"""
from __future__ import annotations

import csv
import glob
import os
import unicodedata
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import timm
import torch
from lightning.pytorch import Callback, LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, auto_augment, create_transform
from timm.data.transforms import _str_to_pil_interpolation
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from torchvision.datasets.folder import IMG_EXTENSIONS

import msmlp  # registers the msmlp_* models with timm
from msmlp.checkpoint import imagenet_class_names, listed, run_model_args
from msmlp.export import OutputError, check_writable
from tasks.base import BaseTask, InputError, nested_root_hint, starting_weights_needed
from tasks.embedded import ensure_dataset
from tasks.loading import (ResumableLoader, absolute_root, check_full_batch, check_loader_args, eval_loader,
                           gather_in_order, worker_args, world)

__all__ = ['ClassificationTask', 'ImageFolderDataModule', 'ImageFiles', 'load_rgb', 'scan_image_folder',
           'find_images']

_EMA_PREFIX = 'ema.'


def _posterize(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's RandAugment posterize, also at 0 bits: the top magnitudes of the released
    ``rand-m9-mstd0.5-inc1`` policy ask for 0 bits, which Pillow 13 refuses ("bits must be
    between or equal to 1 and 8") and older Pillow turned into a black image."""
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


for _name in ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal'):
    if auto_augment.NAME_TO_OP.get(_name) is auto_augment.posterize:
        auto_augment.NAME_TO_OP[_name] = _posterize


# ----- data -------------------------------------------------------------------------------
_16_BIT = ('I;16', 'I;16L', 'I;16B', 'I;16N')  # 16-bit grey; PIL reads 16-bit RGB as 8-bit RGB itself


def load_rgb(path: str) -> Image.Image:
    """Read an image as 8-bit RGB; raise ``InputError`` naming the file if it cannot be read.

    16-bit grey images are scaled by their bit depth (a value v is v / 65535 of full scale,
    as torchvision's ``decode_image`` + ``ToDtype(scale=True)`` read it); 32-bit integer and
    float images, which have no fixed full scale, are refused.
    """
    try:
        with Image.open(path) as image:
            if image.mode in _16_BIT:
                scaled = np.asarray(image, dtype=np.float64) * (255 / 65535)
                return Image.fromarray(np.rint(scaled).astype(np.uint8), mode='L').convert('RGB')
            if image.mode in ('I', 'F'):
                kind = '32-bit integer' if image.mode == 'I' else 'floating-point'
                raise InputError(f'cannot read image {path}: {kind} pixels have no fixed full scale; '
                                 'save it with 8 or 16 bits per channel')
            if image.mode in ('P', 'PA', 'LA') or 'transparency' in image.info:
                image = image.convert('RGBA')  # palette/grey with alpha: via RGBA, as PIL advises
            return image.convert('RGB')
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        if isinstance(err, InputError):
            raise
        raise InputError(f'cannot read image {path}: {err}') from None


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith('.')


def _images_under(folder: Path) -> List[str]:
    """Image files under ``folder``, recursively, following links to folders; a link to a
    folder already listed (a loop, or one folder reached twice) is an ``InputError``, as its
    images would be listed again, endlessly or under another class."""
    found, seen = [], {os.path.realpath(folder): str(folder)}
    for parent, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
        for name in dirs:
            path = os.path.join(parent, name)
            real = os.path.realpath(path)
            if real in seen:
                raise InputError(f'{path} leads to {real}, which is already read as {seen[real]}: each of its '
                                 'images would be read again; remove the link')
            seen[real] = path
        found += [os.path.join(parent, f) for f in sorted(files) if _is_image(f)]
    return found


def class_folders(folder: Path) -> List[str]:
    """Sorted class folder names in ``folder``; ``InputError`` if it is missing or has none."""
    if not folder.is_dir():
        raise InputError(f'data folder not found: {folder}')
    entries = [e for e in folder.iterdir() if not e.name.startswith('.')]
    broken = [e for e in entries if e.is_symlink() and not e.exists()]
    if broken:
        raise InputError(f'{broken[0]} is a broken link (to {os.readlink(broken[0])}): a class folder that '
                         'cannot be read; fix or remove it')
    classes = sorted(e.name for e in entries if e.is_dir())
    for name in classes:
        try:
            name.encode('utf-8')
        except UnicodeEncodeError:  # undecodable bytes: Python keeps them as lone surrogates
            shown = os.fsencode(folder / name).decode('utf-8', errors='backslashreplace')
            raise InputError(f'class folder {shown} has a name that is not valid UTF-8: class names are stored in '
                             'checkpoints and configs as text; rename the folder') from None
    if not classes:
        raise InputError(f'no class folders in {folder}: expected {folder}/<class name>/<images>')
    loose = sorted(e.name for e in entries if e.is_file() and _is_image(e.name))
    if loose:
        rank_zero_warn(f'{folder} holds {len(loose)} image file(s) outside its class folders, which are not read '
                       f'({listed(loose, 3)}): put each in {folder}/<class name>/')
    return classes


def scan_image_folder(folder: Path, classes: Optional[Sequence[str]] = None
                      ) -> Tuple[List[str], List[Tuple[str, int]]]:
    """``(classes, [(image path, class index), ...])`` of an ImageNet-style split folder.

    ``classes`` fixes the class order (the training split's); a folder with a class outside
    it, or a class folder without images, is an ``InputError`` naming the folder.
    """
    found = class_folders(folder)
    classes = list(classes) if classes is not None else found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise InputError(f'{folder} has class folders that the training split lacks: {unknown}')
    index = {name: i for i, name in enumerate(classes)}
    samples = []
    for name in found:
        images = _images_under(folder / name)
        if not images:
            raise InputError(f'empty class folder: {folder / name} holds no image files '
                             f'({", ".join(IMG_EXTENSIONS)})')
        samples += [(path, index[name]) for path in images]
    return classes, samples


def find_images(path: Path) -> List[str]:
    """One image file, every image under a folder, or the images a glob matches (``**``
    included; sorted), as det and seg read theirs."""
    if path.is_file():
        return [str(path)]
    if not path.is_dir() and any(c in str(path) for c in '*?['):
        matched = sorted(p for p in glob.glob(str(path), recursive=True)
                         if _is_image(os.path.basename(p)) and os.path.isfile(p))
        if not matched:
            raise InputError(f'predict_path {str(path)!r}: no image files match ({", ".join(IMG_EXTENSIONS)})')
        return matched
    if not path.is_dir():
        raise InputError(f'predict_path not found: {path}')
    images = _images_under(path)
    if not images:
        raise InputError(f'no image files under predict_path {path} ({", ".join(IMG_EXTENSIONS)})')
    return images


class ImageFiles(Dataset):
    """Image files with targets; ``(image tensor, target)`` per item."""

    def __init__(self, samples: Sequence[Tuple[str, Any]], transform: Any) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Any]:
        path, target = self.samples[index]
        return self.transform(load_rgb(path)), target


class PredictFiles(ImageFiles):
    """Images to predict; ``(image tensor, path, reason)`` per item. An unreadable image is a
    blank one with the reason it cannot be read, so that predicting a large folder does not
    stop at it and lose the other predictions (the run still fails at the end, naming it)."""

    def __init__(self, paths: Sequence[str], transform: Any) -> None:
        super().__init__([(p, p) for p in paths], transform)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, str, str]:
        path = self.samples[index][0]
        try:
            return self.transform(load_rgb(path)), path, ''
        except InputError as err:
            return self.transform(Image.new('RGB', (1, 1))), path, str(err)


class ImageFolderDataModule(LightningDataModule):
    """ImageNet-style folders: ``<root>/<split>/<class>/<image>``.

    Args:
        root: Dataset folder; ``None`` for the embedded coloured-shapes dataset (written once
            under ``$MSMLP_DATA``).
        train_split, val_split, test_split: Sub-folders used by fit, validate and test.
        predict_path: An image, a folder of images or a glob for ``predict``.
        batch_size: Per device.
        num_workers: Data loading processes.
        image_size: Training crop and evaluation crop size.
        crop_pct: Evaluation resizes to ``image_size / crop_pct`` then center-crops.
        interpolation: Resize interpolation (train and eval).
        scale, ratio: Random-resized-crop area and aspect ranges.
        hflip: Horizontal flip probability.
        color_jitter: Colour jitter strength (timm ignores it when ``auto_augment`` is set,
            as it did in the released code).
        auto_augment: timm auto-augment policy, e.g. ``rand-m9-mstd0.5-inc1``.
        re_prob, re_mode, re_count: Random erasing.
        mean, std: Normalisation.
    """

    def __init__(
            self,
            root: Optional[str] = None,
            train_split: str = 'train',
            val_split: str = 'val',
            test_split: str = 'val',
            predict_path: Optional[str] = None,
            batch_size: int = 128,
            num_workers: int = 8,
            image_size: int = 224,
            crop_pct: float = 224 / 256,
            interpolation: str = 'bicubic',
            scale: Tuple[float, float] = (0.08, 1.0),
            ratio: Tuple[float, float] = (3 / 4, 4 / 3),
            hflip: float = 0.5,
            color_jitter: Optional[float] = 0.4,
            auto_augment: Optional[str] = 'rand-m9-mstd0.5-inc1',
            re_prob: float = 0.25,
            re_mode: str = 'pixel',
            re_count: int = 1,
            mean: Tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
            std: Tuple[float, float, float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        check_loader_args(batch_size, num_workers)
        super().__init__()
        self.save_hyperparameters()
        self.hparams.root = absolute_root(root)
        self._check_transform_args()
        self.batch_size = batch_size
        self.classes: Optional[List[str]] = None
        self.class_folder: Optional[Path] = None  # the folder whose sub-folders named the classes
        self.datasets: Dict[str, ImageFiles] = {}

    @property
    def num_classes(self) -> Optional[int]:
        return len(self.classes) if self.classes is not None else None

    @property
    def root(self) -> Path:
        root = self.hparams.root
        return Path(root).expanduser() if root is not None else ensure_dataset('imagenet')

    def prepare_data(self) -> None:
        if self.hparams.root is None:
            ensure_dataset('imagenet')  # written once, by rank 0 only

    def _check_transform_args(self) -> None:
        """``InputError`` naming the value for options timm would reject only when the first image
        is loaded (or, as ``crop_pct=0``, replace with its default)."""
        hp = self.hparams
        if isinstance(hp.image_size, bool) or hp.image_size < 1:
            raise InputError(f'data.image_size={hp.image_size}: the side of the square model input must be at least 1')
        if not hp.crop_pct > 0:
            raise InputError(f'data.crop_pct={hp.crop_pct}: the evaluation crop as a fraction of the resized '
                             'image must be above 0 (ImageNet: 0.875)')
        interpolations = [*_str_to_pil_interpolation, 'random']
        if hp.interpolation not in interpolations:
            raise InputError(f'data.interpolation={hp.interpolation!r}: one of {", ".join(interpolations)}')
        try:
            self.train_transform()
        except (AssertionError, KeyError, ValueError) as err:
            raise InputError(f'data.auto_augment={hp.auto_augment!r} (or another augmentation option) is refused by '
                             f"timm's create_transform: {err} (policies: rand-m9-mstd0.5-inc1, augmix-m5, "
                             'trivial, original, v0; null for none)') from None

    def train_transform(self) -> Any:
        hp = self.hparams
        return create_transform(
            hp.image_size, is_training=True, scale=tuple(hp.scale), ratio=tuple(hp.ratio), hflip=hp.hflip,
            color_jitter=hp.color_jitter, auto_augment=hp.auto_augment, interpolation=hp.interpolation,
            mean=tuple(hp.mean), std=tuple(hp.std), re_prob=hp.re_prob, re_mode=hp.re_mode, re_count=hp.re_count)

    def eval_transform(self) -> Any:
        hp = self.hparams
        return create_transform(hp.image_size, is_training=False, crop_pct=hp.crop_pct,
                                interpolation=hp.interpolation, mean=tuple(hp.mean), std=tuple(hp.std))

    def _split_folder(self, split: str) -> Path:
        """``root/split``; if missing under an existing root, an ``InputError`` that names what
        the root holds (a missing root is named by ``class_folders``)."""
        folder = self.root / split
        if folder.is_dir() or not self.root.is_dir():
            return folder
        hint = nested_root_hint(self.root, f'{split}/')
        if hint:
            raise InputError(f'data folder not found: {folder}{hint}')
        flag = next(f'--data.{key}' for key in ('train_split', 'val_split', 'test_split') if self.hparams[key] == split)
        present = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith('.'))
        raise InputError(f'data folder not found: {folder} ({self.root} holds the folders {listed(present)}; '
                         f'{flag} names another)')

    def _split(self, split: str, transform: Any) -> ImageFiles:
        _, samples = scan_image_folder(self._split_folder(split), self.classes)
        return ImageFiles(samples, transform)

    def setup(self, stage: str) -> None:
        hp = self.hparams
        if stage == 'predict':
            if not hp.predict_path:  # '' would be the working folder, searched through
                raise InputError('predict needs --data.predict_path <image, folder or glob>'
                                 + (' (it is empty)' if hp.predict_path == '' else ''))
            paths = find_images(Path(hp.predict_path).expanduser())
            self.datasets['predict'] = PredictFiles(paths, self.eval_transform())
            return
        root = self.root
        own_split = hp.test_split if stage == 'test' else hp.val_split
        train = root / hp.train_split
        self.class_folder = self._split_folder(hp.train_split if stage == 'fit' or train.is_dir() else own_split)
        self.classes = class_folders(self.class_folder)
        if stage == 'fit':
            self.datasets['train'] = self._split(hp.train_split, self.train_transform())
        if stage in ('fit', 'validate'):
            self.datasets['val'] = self._split(hp.val_split, self.eval_transform())
        if stage == 'test':
            self.datasets['test'] = self._split(hp.test_split, self.eval_transform())

    def _loader_args(self, split: str, persistent: bool = True) -> Dict[str, Any]:
        workers = self.hparams.num_workers
        return dict(worker_args(workers, self.datasets[split]), persistent_workers=workers > 0 and persistent,
                    pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        train = self.datasets['train']
        check_full_batch(str(self.root / self.hparams.train_split), len(train), self.batch_size)
        return ResumableLoader(train, batch_size=self.batch_size, seed=int(os.environ.get('PL_GLOBAL_SEED', 0)),
                               drop_last=True, **self._loader_args('train'))

    def val_dataloader(self) -> DataLoader:
        return eval_loader(self.datasets['val'], self.batch_size, **self._loader_args('val'))

    def test_dataloader(self) -> DataLoader:
        return eval_loader(self.datasets['test'], self.batch_size, **self._loader_args('test'))

    def predict_dataloader(self) -> DataLoader:
        # Lightning gives each process its share of a plain loader for predict, without repeats.
        return DataLoader(self.datasets['predict'], batch_size=self.batch_size,
                          **self._loader_args('predict', persistent=False))


# ----- model ------------------------------------------------------------------------------
def _check_optimisation_args(lr: float, drop_path_rate: float, mixup_prob: float, mixup_switch_prob: float,
                             mixup_mode: str) -> None:
    """``InputError`` naming the value for options torch or timm would refuse in the first step
    (with a traceback), or, as an unknown ``mixup_mode``, ignore."""
    if not lr >= 0:
        raise InputError(f'model.lr={lr}: the learning rate must be 0 or more')
    if not 0 <= drop_path_rate < 1:
        raise InputError(f'model.drop_path_rate={drop_path_rate}: the stochastic depth of the last block must be '
                         'in [0, 1)')
    for name, value in (('mixup_prob', mixup_prob), ('mixup_switch_prob', mixup_switch_prob)):
        if not 0 <= value <= 1:
            raise InputError(f'model.{name}={value}: a probability, in [0, 1]')
    if mixup_mode not in ('batch', 'pair', 'elem'):
        raise InputError(f"model.mixup_mode={mixup_mode!r}: one of batch, pair, elem (timm's Mixup)")


class ClassificationTask(BaseTask):
    """Image classifier; the defaults are the released ImageNet-1K recipe of MS-MLP-T.

    Args:
        model: A timm model name (``msmlp_tiny``, ``msmlp_small``, ``msmlp_base``, ...).
        num_classes: Classifier outputs; must equal the number of class folders.
        class_names: Class names in output order (taken from the training folders when
            unset, and stored in checkpoints for ``predict``).
        embed_dim, depths: Override the variant's width and depth (a smaller MS-MLP).
        model_args: Other keyword arguments of ``timm.create_model`` (e.g. MS-Swin's
            ``num_heads``, ``window_size``, ``block_pattern``, ``img_size``).
        drop_path_rate: Stochastic depth (0.1 / 0.4 / 0.5 for tiny / small / base).
        pretrained: A checkpoint to start from (released, Lightning, timm or safetensors; a
            path or a URL, downloaded once); a classifier head of another size is dropped.
        lr: Base learning rate at total batch ``lr_batch_size``.
        lr_batch_size: Learning rates scale by total batch / this; ``None``: no scaling.
        weight_decay: AdamW weight decay (none on norms, biases, 1-D parameters, layer scale).
        betas, eps: AdamW.
        warmup_epochs, warmup_lr: Linear warm-up from ``warmup_lr``.
        min_lr: Cosine decay ends here.
        label_smoothing: Label smoothing (inside Mixup's soft targets when Mixup is on).
        mixup_alpha, cutmix_alpha, mixup_prob, mixup_switch_prob, mixup_mode: timm Mixup;
            off when both alphas are 0.
        ema: Keep an exponential moving average of the weights (validated as ``val/top1_ema``).
        ema_decay: Its decay.
        predict_file: Where ``predict`` writes its CSV of the top-5 classes per image (default
            ``<default_root_dir>/predictions.csv``).
    """

    # Run-time options, not properties of the trained model: kept out of the checkpoint's
    # hyper-parameters, which LightningCLI would otherwise apply over the command line when
    # given --ckpt_path.
    runtime_args: Tuple[str, ...] = ('predict_file',)
    # What shapes the weights: a checkpoint's weights fit only the model its values built.
    architecture_args: Tuple[str, ...] = ('model', 'num_classes', 'embed_dim', 'depths', 'model_args')

    def __init__(
            self,
            model: str = 'msmlp_tiny',
            num_classes: int = 1000,
            class_names: Optional[List[str]] = None,
            embed_dim: Optional[int] = None,
            depths: Optional[List[int]] = None,
            model_args: Optional[Dict[str, Any]] = None,
            drop_path_rate: float = 0.1,
            pretrained: Optional[str] = None,
            lr: float = 5e-4,
            lr_batch_size: Optional[int] = 512,
            weight_decay: float = 0.05,
            betas: Tuple[float, float] = (0.9, 0.999),
            eps: float = 1e-8,
            warmup_epochs: float = 20,
            warmup_lr: float = 5e-7,
            min_lr: float = 5e-6,
            label_smoothing: float = 0.1,
            mixup_alpha: float = 0.8,
            cutmix_alpha: float = 1.0,
            mixup_prob: float = 1.0,
            mixup_switch_prob: float = 0.5,
            mixup_mode: str = 'batch',
            ema: bool = False,
            ema_decay: float = 0.9999,
            predict_file: Optional[str] = None,
    ) -> None:
        if class_names is not None and len(class_names) != num_classes:
            raise InputError(f'class_names has {len(class_names)} names but num_classes={num_classes}')
        _check_optimisation_args(lr=lr, drop_path_rate=drop_path_rate, mixup_prob=mixup_prob,
                                 mixup_switch_prob=mixup_switch_prob, mixup_mode=mixup_mode)
        super().__init__(ignore=self.runtime_args)
        self.predict_file = predict_file
        self._predicted: List[Dict[str, Any]] = []
        self._rows: Optional[PredictionRows] = None  # predict_file, from the start of predict

    def configure_models(self) -> None:
        hp = self.hparams
        args = run_model_args(hp)
        try:
            self.model = timm.create_model(hp.model, num_classes=hp.num_classes, drop_path_rate=hp.drop_path_rate,
                                           **args)
        except TypeError as err:  # another timm architecture than the one these arguments are for
            if not args:
                raise
            given = ', '.join(f'{key}={value}' for key, value in args.items())
            nulls = ' '.join(f'--model.{key} null' for key in args if key in ('embed_dim', 'depths'))
            hint = (f'; pass {nulls} (the embedded default sets those of a small MS-MLP)' if nulls
                    else '; remove them from --model.model_args')
            raise InputError(f'{hp.model} does not take the model arguments {given} ({err}){hint}') from err
        if hp.pretrained and starting_weights_needed():
            load = msmlp.load_swin_checkpoint if isinstance(self.model, msmlp.MSSwin) else msmlp.load_pretrained
            load(self.model, msmlp.checkpoint.local_checkpoint(hp.pretrained))
        self.ema = ModelEmaV3(self.model, decay=hp.ema_decay) if hp.ema else None
        if self.ema is not None:
            self.ema.train()  # never run in training; Lightning sets eval mode for validation
            # updated from the model, never by the optimizer (DDP refuses parameters without gradients)
            self.ema.requires_grad_(False)

    def configure_losses(self) -> None:
        hp = self.hparams
        self.mixup = None
        if hp.mixup_alpha > 0 or hp.cutmix_alpha > 0:
            self.mixup = Mixup(mixup_alpha=hp.mixup_alpha, cutmix_alpha=hp.cutmix_alpha, prob=hp.mixup_prob,
                               switch_prob=hp.mixup_switch_prob, mode=hp.mixup_mode,
                               label_smoothing=hp.label_smoothing, num_classes=hp.num_classes)
            self.train_loss = SoftTargetCrossEntropy()
        elif hp.label_smoothing > 0:
            self.train_loss = LabelSmoothingCrossEntropy(smoothing=hp.label_smoothing)
        else:
            self.train_loss = nn.CrossEntropyLoss()

    def configure_metrics(self) -> None:
        n = self.hparams.num_classes
        metrics = {'top1': MulticlassAccuracy(n, top_k=1, average='micro')}
        if n > 5:
            metrics['top5'] = MulticlassAccuracy(n, top_k=5, average='micro')
        self.val_metrics = MetricCollection(metrics, prefix='val/')
        self.test_metrics = self.val_metrics.clone(prefix='test/')
        self.ema_metrics = self.val_metrics.clone(postfix='_ema') if self.ema is not None else None
        # The mean loss over every image of the split, summed over processes (in float64, so
        # that the order of the sums does not show).
        self.val_loss = MeanMetric().set_dtype(torch.float64)
        self.test_loss = MeanMetric().set_dtype(torch.float64)

    # ----- data checks -----------------------------------------------------------------------
    @property
    def class_names(self) -> List[str]:
        names = self.hparams.get('class_names')
        if names:
            return list(names)
        if self.hparams.num_classes == 1000 and self.hparams.get('pretrained'):
            return list(imagenet_class_names())  # the released weights (no folder named their classes)
        return [f'class {i}' for i in range(self.hparams.num_classes)]

    def setup(self, stage: str) -> None:
        data = self.trainer.datamodule if self.trainer is not None else None
        size = getattr(getattr(data, 'hparams', None), 'image_size', None)
        if size:  # Lightning's model summary counts the model's FLOPs on it (in bf16 for bf16-true)
            self.example_input_array = self.trainer.precision_plugin.convert_input(torch.zeros(1, 3, size, size))
        classes = getattr(data, 'classes', None)
        if classes is None:
            return
        where = getattr(data, 'class_folder', None) or 'the data'
        count_differs = len(classes) != self.hparams.num_classes
        names_differ = bool(self.hparams.get('class_names')) and list(self.hparams.class_names) != list(classes)
        if self.checkpoint_path and (count_differs or names_differ):
            raise InputError(f'{where} has the classes {listed(classes, limit=10)}, the checkpoint '
                             f'{self.checkpoint_path} was trained on {listed(self.class_names, limit=10)}: '
                             'give data of those classes, or train on these '
                             f'from its weights with fit --model.pretrained {self.checkpoint_path}'
                             + _normalisation_hint(classes, self.class_names))
        if count_differs:
            raise InputError(f'num_classes differs: the model has num_classes={self.hparams.num_classes} but '
                             f'{where} has {len(classes)} class folders; set --model.num_classes {len(classes)} '
                             f'(or use data with {self.hparams.num_classes} classes)')
        if names_differ:
            raise InputError(f'the class folders of {where} ({listed(classes, limit=10)}) differ from the model\'s '
                             f'class_names ({listed(self.hparams.class_names, limit=10)})'
                             + _normalisation_hint(classes, self.hparams.class_names))
        self.hparams.class_names = [str(c) for c in classes]

    # ----- steps -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        if self.mixup is not None:
            if images.shape[0] % 2:
                raise InputError(f'Mixup in batch mode needs an even batch size, got {images.shape[0]}')
            images, targets = self.mixup(images, targets)
        loss = self.train_loss(self(images), targets)
        self.log('train/loss', loss, prog_bar=True)
        self.log('lr', self.optimizers().param_groups[0]['lr'], prog_bar=True)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here, not in on_train_batch_end: a checkpoint written at the end of this batch (which
        # happens before that hook) must hold the EMA of these very weights.
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)

    def _evaluate(self, batch: Tuple[torch.Tensor, torch.Tensor], metrics: MetricCollection, prefix: str) -> None:
        images, targets = batch
        logits = self(images)
        loss = getattr(self, f'{prefix}_loss')
        loss.update(nn.functional.cross_entropy(logits.double(), targets, reduction='none'))
        self.log(f'{prefix}/loss', loss)
        metrics.update(logits, targets)
        self.log_dict(metrics, prog_bar=True)
        if prefix == 'val' and self.ema is not None:
            self.ema_metrics.update(self.ema.module(images), targets)
            self.log_dict(self.ema_metrics)

    def validation_step(self, batch: Tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, 'val')

    def test_step(self, batch: Tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, 'test')

    def predict_step(self, batch: Tuple[torch.Tensor, ...], batch_idx: int) -> List[Dict[str, Any]]:
        """Top-5 (or all, if fewer) classes per image, printed and returned, and written to
        ``predict_file`` as they come (a stop keeps the rows made). On several processes each
        writes its share as it comes to a file of its own (``predictions.part1-of-2.csv``), and
        at the end the first prints and writes them all, in the order of the images. ``batch``
        is ``(images, paths)``, or ``(images, paths, reasons)`` from :class:`PredictFiles` (an
        image with a reason is unreadable: reported, not predicted)."""
        images, paths, *unread = batch  # (images, paths) from a loader of one's own
        unread = unread[0] if unread else [''] * len(paths)
        probs = self(images).softmax(dim=-1)
        top = probs.topk(min(5, probs.shape[-1]), dim=-1)
        names = self.class_names
        results = []
        for path, reason, values, indices in zip(paths, unread, top.values.tolist(), top.indices.tolist()):
            ranked = [(names[i], p) for i, p in zip(indices, values)]
            results.append({'path': path, 'error': reason} if reason else {'path': path, 'top5': ranked})
        if world()[0] == 1:
            for result in results:
                self._print(_ranking(result))
        if self._rows is not None:
            self._rows.write(results)
        self._predicted.extend(results)
        return results

    def _predict_file(self) -> Path:
        return Path(self.predict_file or Path(self.trainer.default_root_dir) / 'predictions.csv')

    def on_predict_epoch_start(self) -> None:
        self._predicted, self._rows = [], None
        path = self._predict_file()
        try:
            check_writable(str(path))  # before predicting, not after
        except OutputError as err:
            raise InputError(f'model.predict_file: {err}') from None
        dataset = getattr(self.trainer.datamodule, 'datasets', {}).get('predict')
        if dataset is not None and os.path.realpath(path) in {os.path.realpath(p) for p, _ in dataset.samples}:
            raise InputError(f'model.predict_file: {path} is one of the images to predict; name another file')
        processes, rank = world()
        self._rows = PredictionRows(path if processes == 1 else share_file(path, rank, processes))

    def configure_callbacks(self) -> List[Callback]:
        return [_PredictionsKeptOnStop()]

    def on_predict_epoch_end(self) -> None:
        ranked = self._predicted
        if world()[0] > 1:
            dataset = getattr(self.trainer.datamodule, 'datasets', {}).get('predict')
            order = {path: i for i, (path, _) in enumerate(dataset.samples)} if dataset is not None else {}
            ranked = gather_in_order([(order[r['path']] if order else r['path'], r) for r in self._predicted])
            if self.trainer.is_global_zero:
                for result in ranked:
                    self._print(_ranking(result))
        unread = [r['error'] for r in ranked if 'error' in r]
        ranked = [r for r in ranked if 'error' not in r]
        path = self._predict_file()
        self._rows.close()
        if world()[0] > 1:
            if self.trainer.is_global_zero:
                whole = PredictionRows(path)
                whole.write(ranked)
                whole.close()
            self.trainer.strategy.barrier()  # the whole file is written: the shares can go
            self._rows.path.unlink(missing_ok=True)
        if self.trainer.is_global_zero and ranked:
            images = f'{len(ranked)} image' + ('s' if len(ranked) > 1 else '')
            self._print(f'msmlp: wrote the top-{len(ranked[0]["top5"])} classes of {images} to {path.resolve()}')
        if unread:  # every process has them all
            where = f'have no row in {path.resolve()}' if ranked else f'{path.resolve()} was not written'
            raise InputError(f'{len(unread)} of {len(unread) + len(ranked)} images could not be read and {where}; '
                             f'the first: {unread[0]}')

    # ----- checkpoints --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # The EMA weights go beside the model's, so that 'state_dict' is the trained model
        # alone (msmlp.load_pretrained reads it).
        state = checkpoint['state_dict']
        ema = {k: state.pop(k) for k in [k for k in state if k.startswith(_EMA_PREFIX)]}
        if ema:
            checkpoint['ema_state_dict'] = ema

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint['state_dict']
        ema = checkpoint.get('ema_state_dict')
        if self.ema is not None:
            if ema is None:  # EMA switched on when resuming: start it from the model
                ema = {f'{_EMA_PREFIX}module.{k[len("model."):]}': v for k, v in state.items()
                       if k.startswith('model.')}
            state.update(ema)
        if not self.hparams.get('class_names'):
            names = checkpoint.get('hyper_parameters', {}).get('class_names')
            if names:
                self.hparams.class_names = list(names)


def _normalisation_hint(folders: Sequence[str], names: Sequence[str]) -> str:
    """Why names that print alike differ: Unicode composes accents in two ways (macOS file
    systems give decomposed names, NFD), and the two sort apart, so they are not taken as equal."""
    def composed(items):
        return sorted(unicodedata.normalize('NFC', str(item)) for item in items)
    if list(map(str, folders)) == list(map(str, names)) or composed(folders) != composed(names):
        return ''
    form = 'NFC' if all(unicodedata.is_normalized('NFC', str(n)) for n in names) else 'NFD'
    return ('; they differ only in how Unicode composes their accents (NFC or NFD; folders copied from macOS are '
            f'NFD): rename the folders to the model\'s form, unicodedata.normalize({form!r}, name)')


def share_file(path: Path, rank: int, processes: int) -> Path:
    """Where process ``rank`` writes its share of the predictions: ``predictions.part1-of-2.csv``."""
    return path.with_name(f'{path.stem}.part{rank}-of-{processes}{path.suffix}')


class PredictionRows:
    """``predict_file``, written as results come: one row per image, its path, then each ranked
    class with its probability (the file is made at the first predicted image)."""

    def __init__(self, path: Path) -> None:
        self.path, self.count, self.closed, self._file, self._writer = path, 0, False, None, None

    def write(self, results: Sequence[Dict[str, Any]]) -> None:
        for result in results:
            if 'top5' not in result:  # unreadable: no row
                continue
            if self._file is None:
                self._file = open(self.path, 'w', newline='')
                self._writer = csv.writer(self._file)
                ranks = range(1, len(result['top5']) + 1)
                self._writer.writerow(['path', *(column for k in ranks for column in (f'class_{k}', f'prob_{k}'))])
            self._writer.writerow([result['path'], *(v for name, p in result['top5'] for v in (name, f'{p:.6f}'))])
            self.count += 1
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self.closed = True


class _PredictionsKeptOnStop(Callback):
    """Say where the rows of a predict stopped early (Ctrl-C, SIGTERM, an error) are."""

    def on_exception(self, trainer, task: ClassificationTask, exception: BaseException) -> None:
        rows = getattr(task, '_rows', None)
        if trainer.state.fn != 'predict' or rows is None or rows.closed:  # closed: predict went to the end
            return
        rows.close()
        processes, rank = world()
        if rows.count == 0:
            kept = f'no image was predicted before it; {rows.path.resolve()} was not written'
        else:
            kept = f'the rows of the {rows.count} images predicted before it are in {rows.path.resolve()}'
        if processes > 1:  # each process its own share
            task._print(f'msmlp: predict stopped: process {rank} of {processes}: {kept}')
        elif trainer.is_global_zero:
            task._print(f'msmlp: predict stopped: {kept}')


def _ranking(result: Dict[str, Any]) -> str:
    if 'error' in result:
        return f"{result['path']}\n  not predicted: {result['error']}"
    return '\n'.join([result['path']] + [f'  {rank}. {p:.4f}  {name}'
                                          for rank, (name, p) in enumerate(result['top5'], 1)])
