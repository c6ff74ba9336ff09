"""One Lightning adapter over an OpenMMLab (MMDetection / MMSegmentation) model.

:class:`OpenMMLabTask` builds the model of an mmdet or mmseg config file (plus
``cfg_options`` overrides, mmengine's dotted keys) with the config's own data
preprocessor, and trains it the way mmengine's ``Runner`` does:

* training: ``data_preprocessor(batch, True)``, ``model(**data, mode='loss')``,
  ``model.parse_losses``; Lightning runs backward and the optimizer step;
* validation / test / predict: ``forward_test`` (``model.test_step``, ``mode='predict'``);
* the optimizer is the config's ``optim_wrapper`` built by mmengine's optimizer wrapper
  constructor (AdamW with ``paramwise_cfg``: no weight decay on norms and layer scale),
  gradient clipping from its ``clip_grad``;
* ``param_scheduler`` is built by mmengine and stepped as its ``ParamSchedulerHook`` does
  (iteration-based ones after every optimizer step, epoch-based ones after every epoch),
  so warm-up, steps and poly decay are the config's; their state is saved in checkpoints;
* on the CPU, ``SyncBN`` layers (the Cascade configs' heads) run as plain BatchNorm, which
  is what SyncBN computes on one process (torch's SyncBatchNorm has no CPU kernels for
  several processes); on GPUs they synchronise as configured;
* evaluation sees every image once on any number of processes; subclasses gather what their
  metrics need over processes (:func:`tasks.loading.gather_in_order`) or sum it (torchmetrics),
  so the numbers do not depend on the process count.

:class:`OpenMMLabDataModule` builds the config's ``{train,val,test}_dataloader.dataset``
with ``DATASETS.build`` (the config's pipelines), ``data_root`` from ``root`` (or the
embedded default dataset when ``root`` is None), batches with mmengine's
``pseudo_collate``. By default it takes the config from the task it is trained with.

Subclasses differ only in dataset, metric and drawing. They set ``scope`` (``'mmdet'`` or
``'mmseg'``) and override:

Task
    ``configure_metrics()``: create ``self.val_metrics`` and ``self.test_metrics``.
    ``update_metrics(metrics, outputs, batch)``: feed one batch of predicted data samples.
    ``compute_metrics(metrics) -> dict``: the numbers to log and print (default ``compute()``).
    ``check_classes(classes)``: raise if the model's heads do not fit the dataset's classes.
    ``draw(data_sample, out_file)``: write the PNG of one prediction.
    ``forward_test(batch) -> data samples``: inference for validate/test/predict (default
    ``model.test_step``, i.e. ``mode='predict'``; e.g. test-time augmentation).
    ``runtime_args``: ``__init__`` arguments that are run-time options (output folders,
    thresholds, threads), kept out of the checkpoint's hyper-parameters.
DataModule
    ``embedded_root() -> Path``: write (once) and return the embedded default dataset.
    ``prepare_dataset_cfg(split, dataset_cfg)``: adjust one split's dataset config in
    place (``data_root`` is already set) and check its files, raising clear errors.
    ``wrap_dataset(split, dataset)``: e.g. attach evaluation targets to each item.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import glob
import importlib
import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from msmlp.checkpoint import listed
from tasks.base import BaseTask, InputError, find_config, nested_root_hint, portable_config, starting_weights_needed
from tasks.loading import (ResumableLoader, absolute_root, check_full_batch, check_loader_args, eval_loader,
                           gather_in_order, worker_args)

__all__ = ['OpenMMLabTask', 'OpenMMLabDataModule', 'load_config', 'dataset_type', 'dataset_classes', 'leaf_datasets',
           'loads_annotations', 'without_annotations', 'prediction_name']


# ----- configs ---------------------------------------------------------------------------
def load_config(path: str, cfg_options: Optional[Dict[str, Any]] = None):
    """The mmengine ``Config`` of ``path`` with ``cfg_options`` merged (dotted keys)."""
    from mmengine.config import Config
    file = find_config(path).resolve()
    try:
        cfg = Config.fromfile(str(file))
    except SyntaxError as err:  # mmengine names neither the file nor, through _base_, which one
        broken, err = _unparsable(file) or (file, err)
        raise InputError(f'{broken}: not valid Python: line {err.lineno}: {err.msg}'
                         + (f' (a _base_ of {file})' if broken != file else '')) from err
    except FileNotFoundError as err:
        missing = os.path.normpath(err.filename) if err.filename else '?'
        raise InputError(f'{file}: {err.strerror}: {missing} (its _base_, or a file it reads)') from err
    if cfg_options:
        cfg.merge_from_dict(dict(cfg_options))
    return cfg


def _unparsable(file: Path) -> Optional[Tuple[Path, SyntaxError]]:
    """The first file of ``file``'s ``_base_`` chain (local bases) that is not Python, and why."""
    import ast
    try:
        tree = ast.parse(file.read_text(), filename=str(file))
    except SyntaxError as err:
        return file, err
    except OSError:
        return None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, 'id', None) == '_base_' for t in node.targets):
            try:
                bases = ast.literal_eval(node.value)
            except (ValueError, TypeError):
                return None
            for base in [bases] if isinstance(bases, str) else list(bases):
                if isinstance(base, str) and '::' not in base:
                    found = _unparsable((file.parent / base).resolve())
                    if found:
                        return found
    return None


def _scope(cfg, default: str) -> str:
    from mmengine.registry import init_default_scope
    scope = cfg.get('default_scope', None) or default
    init_default_scope(scope)
    return scope


def _registry(cfg, scope: str):
    """The registry module of ``cfg``'s scope (``scope`` if it names none), made the default scope."""
    return importlib.import_module(f'{_scope(cfg, scope)}.registry')


def dataset_type(cfg, scope: str, dataset_cfg) -> type:
    """The dataset class ``dataset_cfg`` (a dataset of ``cfg``) builds."""
    return _registry(cfg, scope).DATASETS.get(dataset_cfg['type'])


def dataset_classes(cfg, scope: str, dataset_cfg) -> Optional[Tuple[str, ...]]:
    """The classes of ``dataset_cfg`` (a dataset of ``cfg``): its ``metainfo``'s, else its class's."""
    classes = (dataset_cfg.get('metainfo') or {}).get('classes')
    if classes is None:
        classes = getattr(dataset_type(cfg, scope, dataset_cfg), 'METAINFO', {}).get('classes')
    return tuple(classes) if classes is not None else None


@contextlib.contextmanager
def _quiet_mmengine():
    from mmengine.logging import MMLogger
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _plain_state(scheduler) -> dict:
    """A scheduler's state in types ``torch.load(weights_only=True)`` accepts."""
    return {k: dict(v) if isinstance(v, collections.Counter) else v for k, v in scheduler.state_dict().items()}


def _load_plain_state(scheduler, state: dict) -> None:
    current = scheduler.state_dict()
    scheduler.load_state_dict({k: collections.Counter(v) if isinstance(current.get(k), collections.Counter) else v
                               for k, v in state.items()})


# ----- task ------------------------------------------------------------------------------
class OpenMMLabTask(BaseTask):
    """Train, evaluate and run an mmdet/mmseg model with its config's recipe.

    Args:
        config: The mmdet/mmseg config file (a path, or relative to ``configs/``).
        cfg_options: Overrides merged into the config, mmengine's dotted keys
            (``{'model.backbone.drop_path_rate': 0.2}``). YAML lists stay lists: where mmdet
            needs a tuple (image scales), write a config file that inherits the one you change.
        pretrained: A backbone checkpoint (released MS-MLP, Lightning or mmengine) that
            replaces ``model.backbone.init_cfg``; ``''`` trains the backbone from scratch.
        predict_dir: Where ``predict`` writes its PNGs (default: ``<default_root_dir>/predictions``).
        num_threads: PyTorch's intra-op CPU threads for the run (None: PyTorch's default). Small
            models on few cores run several times faster with 1: synchronising threads over
            many small operations costs more than it gains, above all on a busy machine.
    """

    scope = 'mmdet'
    # Run-time options, not properties of the trained model: kept out of the checkpoint's
    # hyper-parameters, which LightningCLI would otherwise apply over the command line when
    # given --ckpt_path.
    runtime_args: Tuple[str, ...] = ('predict_dir', 'num_threads')

    def __init__(self, config: str, cfg_options: Optional[Dict[str, Any]] = None,
                 pretrained: Optional[str] = None, predict_dir: Optional[str] = None,
                 num_threads: Optional[int] = None):
        super().__init__(ignore=self.runtime_args)
        self.predict_dir = predict_dir
        self.num_threads = num_threads
        self.classes: Optional[Sequence[str]] = None
        self.param_schedulers: List[Any] = []
        self._scheduler_state: Optional[list] = None
        self._predictions_written = 0
        self._unread: List[Tuple[int, str]] = []  # (index, reason) of the images predict could not read

    # ----- building ----------------------------------------------------------------------
    def configure_models(self) -> None:
        """``self.cfg`` (the merged config) and ``self.model`` (built, weights initialised)."""
        hp = self.hparams
        hp['config'] = portable_config(hp['config'])  # what the checkpoint records
        self.cfg = load_config(hp['config'], hp.get('cfg_options'))
        if hp.get('pretrained') is not None:
            self.cfg.model.backbone.init_cfg = (dict(type='Pretrained', checkpoint=hp['pretrained'])
                                                if hp['pretrained'] else None)
        registry = _registry(self.cfg, self.scope)
        model_cfg = copy.deepcopy(self.cfg.model)
        if not starting_weights_needed():
            model_cfg.backbone.init_cfg = None
        elif hp.get('pretrained') and '://' not in hp['pretrained'] and not os.path.isfile(hp['pretrained']):
            raise InputError(f"model.pretrained: checkpoint not found: {hp['pretrained']} (a backbone checkpoint "
                             "file or URL; --model.pretrained '' trains the backbone from scratch)")
        self.model = registry.MODELS.build(model_cfg)
        init = model_cfg.backbone.get('init_cfg')
        with _quiet_mmengine():  # mmengine logs the initialisation of every parameter
            self.model.init_weights()
        if init and init.get('type') == 'Pretrained':
            rank_zero_info(f'[msmlp] backbone weights: {init["checkpoint"]}')

    def configure_metrics(self) -> None:
        """Create ``self.val_metrics`` and ``self.test_metrics``."""
        self.val_metrics = self.test_metrics = None

    def configure_callbacks(self) -> list:
        """No model summary table: Lightning counts FLOPs only on images alone, which an
        OpenMMLab detector or segmentor does not take, so its table would say "0 FLOPs"; the
        run's first line gives the parameters."""
        from lightning.pytorch.callbacks import ModelSummary, RichModelSummary
        from lightning.pytorch.utilities.imports import _RICH_AVAILABLE
        # replaces the trainer's summary callbacks of the same or a parent type
        return [RichModelSummary(max_depth=0) if _RICH_AVAILABLE else ModelSummary(max_depth=0)]

    def setup(self, stage: str) -> None:
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        if self.trainer.strategy.root_device.type == 'cpu':
            self._sync_bn_to_bn()
        datamodule = getattr(self.trainer, 'datamodule', None)
        classes = getattr(datamodule, 'classes', None)
        if classes is not None:
            self.classes = tuple(classes)
        if self.classes is not None:
            self.check_classes(self.classes)

    def check_classes(self, classes: Sequence[str]) -> None:
        """Raise ``InputError`` if the model's heads do not fit the dataset's classes."""

    def _sync_bn_to_bn(self) -> None:
        from mmengine.model import revert_sync_batchnorm
        if any(isinstance(m, torch.nn.SyncBatchNorm) for m in self.model.modules()):
            self.model = revert_sync_batchnorm(self.model)  # same parameters and keys
            if self.trainer.world_size > 1:
                rank_zero_info('[msmlp] SyncBN layers run as BatchNorm on the CPU (no CPU kernels to synchronise '
                               'them): each process normalises over its own batch')

    # ----- optimisation ------------------------------------------------------------------
    def configure_optimizers(self):
        from mmengine.optim import build_optim_wrapper
        from mmengine.registry import PARAM_SCHEDULERS
        _scope(self.cfg, self.scope)
        wrapper_cfg = copy.deepcopy(self.cfg.optim_wrapper)
        wrapper_cfg['type'] = 'OptimWrapper'  # precision is Lightning's (trainer.precision), not AmpOptimWrapper's
        for unsupported in ('accumulative_counts', 'loss_scale', 'dtype'):
            if wrapper_cfg.pop(unsupported, None) is not None:
                rank_zero_warn(f'optim_wrapper.{unsupported} is not used on Lightning; use the Trainer flags '
                               '(accumulate_grad_batches, precision)')
        with _quiet_mmengine():  # mmengine logs the decay and lr multiplier of every parameter
            self.optim_wrapper = build_optim_wrapper(self.model, wrapper_cfg)
        self._auto_scale_lr()
        self.param_schedulers = []
        for cfg in self.cfg.get('param_scheduler') or []:
            cfg = copy.deepcopy(dict(cfg))
            if 'end' not in cfg:
                cfg['end'] = (self.trainer.max_epochs if cfg.get('by_epoch', True)
                              else int(self.trainer.estimated_stepping_batches))  # as the Runner defaults it
            self.param_schedulers.append(PARAM_SCHEDULERS.build(
                cfg, default_args=dict(optimizer=self.optim_wrapper.optimizer, epoch_length=self._epoch_length(cfg))))
        if self._scheduler_state is not None:
            for scheduler, state in zip(self.param_schedulers, self._scheduler_state):
                _load_plain_state(scheduler, state)
            self._scheduler_state = None
        return self.optim_wrapper.optimizer

    def _auto_scale_lr(self) -> None:
        """mmengine's ``auto_scale_lr`` (mmdet's ``tools/train.py --auto-scale-lr``) when the config
        enables it: the learning rates times the total batch (per process x processes x gradient
        accumulation) over its ``base_batch_size``. Otherwise they are the config's as written."""
        auto = self.cfg.get('auto_scale_lr') or {}
        if not auto.get('enable'):
            return
        if not auto.get('base_batch_size'):
            raise InputError(f"auto_scale_lr.enable needs auto_scale_lr.base_batch_size in {self.hparams['config']}")
        per_process = (getattr(self.trainer.datamodule, 'batch_size', None)
                       or self.cfg.train_dataloader.batch_size)
        total = per_process * self.trainer.world_size * self.trainer.accumulate_grad_batches
        for group in self.optim_wrapper.optimizer.param_groups:
            group['lr'] *= total / auto['base_batch_size']

    def _epoch_length(self, cfg: dict) -> Optional[int]:
        if not cfg.get('convert_to_iter_based'):
            return None
        self.trainer.estimated_stepping_batches  # sets up the train dataloader
        return math.ceil(self.trainer.num_training_batches / self.trainer.accumulate_grad_batches)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip = self.cfg.optim_wrapper.get('clip_grad') or {}
        if gradient_clip_val is None and clip:
            if clip.get('type', 'norm') != 'norm' or clip.get('norm_type', 2) != 2:
                raise ValueError(f'optim_wrapper.clip_grad={dict(clip)}: only 2-norm clipping is supported')
            gradient_clip_val, gradient_clip_algorithm = clip['max_norm'], 'norm'
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here, not in on_train_batch_end: a checkpoint written at the end of this batch (which
        # happens before that hook) must hold the schedulers' state after this step.
        for scheduler in self.param_schedulers:
            if not scheduler.by_epoch:
                scheduler.step()

    def on_train_epoch_end(self) -> None:
        for scheduler in self.param_schedulers:
            if scheduler.by_epoch:
                scheduler.step()

    def on_train_start(self) -> None:
        super().on_train_start()
        train_cfg = self.cfg.get('train_cfg') or {}
        if self.trainer.fast_dev_run:
            return
        planned = train_cfg.get('max_epochs') or train_cfg.get('max_iters')
        actual = self.trainer.max_epochs if 'max_epochs' in train_cfg else self.trainer.max_steps
        if planned and actual != planned:
            unit = 'epochs' if 'max_epochs' in train_cfg else 'iterations'
            rank_zero_warn(f"the config's schedule is for {planned} {unit} but the trainer stops after {actual}: "
                           'its milestones may not be reached')

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint['param_schedulers'] = [_plain_state(s) for s in self.param_schedulers]
        checkpoint['openmmlab_config'] = self.cfg.pretty_text
        checkpoint['classes'] = list(self.classes) if self.classes is not None else None

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._scheduler_state = checkpoint.get('param_schedulers') or None
        self.warn_if_config_changed(checkpoint.get('openmmlab_config'))
        saved = checkpoint.get('classes')
        if saved:
            if self.classes is not None and tuple(saved) != tuple(self.classes):
                rank_zero_warn(f'the checkpoint was trained on classes {saved}, the data names {list(self.classes)}; '
                               'drawing uses the checkpoint\'s')
            self.classes = tuple(saved)

    def config_changes(self) -> List[str]:
        """The task's options that change its config, in words, for messages about the config."""
        return ['cfg_options'] if self.hparams.get('cfg_options') else []

    def warn_if_config_changed(self, saved: Optional[str]) -> None:
        """A warning when the config this run built differs from the one its checkpoint was
        trained with (the file was edited since, or ``cfg_options`` differ), naming the first
        line that differs: the run uses the config as it is now."""
        now = self.cfg.pretty_text
        if not saved or saved == now:
            return
        old_lines, new_lines = saved.splitlines(), now.splitlines()
        line = next((i for i, (a, b) in enumerate(zip(old_lines, new_lines)) if a != b),
                    min(len(old_lines), len(new_lines)))
        before = old_lines[line].strip() if line < len(old_lines) else '(end)'
        after = new_lines[line].strip() if line < len(new_lines) else '(end)'
        changes = self.config_changes()
        given = self.hparams['config'] + (f' with {" and ".join(changes)}' if changes else '')
        rank_zero_warn(f'the config ({given}) differs from the one the checkpoint was trained with, first at line '
                       f'{line + 1} of its text: {before!r} then, {after!r} now; this run uses it as it is now')

    # ----- steps -------------------------------------------------------------------------
    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # the data preprocessor moves inputs and data samples to the model's device

    def training_step(self, batch, batch_idx):
        data = self.model.data_preprocessor(batch, True)
        try:
            losses = self.model(**data, mode='loss')
        except ValueError as err:
            if 'Expected more than 1 value per channel when training' not in str(err):
                raise
            # a batch norm after global pooling (UperNet's pyramid pooling) sees one value per
            # channel when a process trains on one image (SyncBN across several processes does not)
            raise InputError(f'data.batch_size={len(batch["inputs"])} per process: a batch norm of the model '
                             'normalises a pooled 1x1 map, which needs 2 or more images: set --data.batch_size 2 '
                             'or more') from None
        loss, log_vars = self.model.parse_losses(losses)
        size = len(batch['inputs'])
        self.log_dict({f'train/{k}': v.detach() for k, v in log_vars.items() if k != 'loss'}, batch_size=size)
        self.log('train/loss', loss.detach(), prog_bar=True, batch_size=size)
        self.log('lr', self.optim_wrapper.optimizer.param_groups[0]['lr'], prog_bar=True, batch_size=size)
        return loss

    def forward_test(self, batch) -> list:
        """Predicted data samples of one batch (validate, test, predict); subclasses may add
        test-time augmentation. mmdet's and mmseg's ``val_step`` and ``test_step`` are the same."""
        return self.model.test_step(batch)

    @staticmethod
    def _model_batch(batch: dict) -> dict:
        """The model's part of a batch (evaluation batches may also carry ``targets``)."""
        return dict(inputs=batch['inputs'], data_samples=batch.get('data_samples'))

    def validation_step(self, batch, batch_idx):
        outputs = self.forward_test(self._model_batch(batch))
        if self.val_metrics is not None:
            self.update_metrics(self.val_metrics, outputs, batch)
        return outputs

    def test_step(self, batch, batch_idx):
        outputs = self.forward_test(self._model_batch(batch))
        if self.test_metrics is not None:
            self.update_metrics(self.test_metrics, outputs, batch)
        return outputs

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0):
        for index, reason in batch.get(UNREADABLE, ()):
            self._unread.append((index, reason))
            self._print(f'[msmlp] not predicted: {reason}')
        if not len(batch['inputs']):
            return []
        outputs = self.forward_test(self._model_batch(batch))
        out_dir = self._predict_dir()  # made in on_predict_start
        for sample in outputs:
            self.draw(sample, str(out_dir / prediction_name(sample.img_path)))
            self._predictions_written += 1
        return outputs

    def _predict_dir(self) -> Path:
        if self.predict_dir:
            return Path(self.predict_dir)
        return Path(self.trainer.default_root_dir) / 'predictions'

    def prediction_files(self, out_dir: Path, img_path: str) -> List[Path]:
        """The files ``predict`` writes for the image ``img_path``."""
        return [out_dir / prediction_name(img_path)]

    def on_predict_start(self) -> None:
        self._predictions_written, self._unread = 0, []
        out_dir = self._predict_dir()
        paths = getattr(getattr(self.trainer.datamodule, 'datasets', {}).get('predict'), 'paths', [])
        inputs = {os.path.realpath(p) for p in paths}
        for path in paths:
            clash = next((f for f in self.prediction_files(out_dir, path) if os.path.realpath(f) in inputs), None)
            if clash is not None:
                raise InputError(f'model.predict_dir: the prediction of {path} would be written over the image '
                                 f'{clash}: give --model.predict_dir another folder')
        for folder in sorted({f.parent for f in self.prediction_files(out_dir, 'image.png')}):
            try:  # before predicting, not at the first batch
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise InputError(f'model.predict_dir: cannot make the folder {folder} '
                                 f'({err.strerror or err})') from None
            if not os.access(folder, os.W_OK):
                raise InputError(f'model.predict_dir: cannot write into {folder}: permission denied')

    def on_predict_end(self) -> None:
        # each process drew its share of the images
        written = int(self.trainer.strategy.reduce(torch.tensor(self._predictions_written), reduce_op='sum'))
        if self.trainer.is_global_zero:
            images = f'{written} prediction image' + ('s' if written != 1 else '')
            print(f'[msmlp] wrote {images} to {self._predict_dir().resolve()}', flush=True)
        unread = gather_in_order(self._unread)  # every process gets them all, and fails alike
        if unread:
            raise InputError(f'{len(unread)} of {len(unread) + written} images could not be read or prepared and have '
                             f'no prediction in {self._predict_dir().resolve()}; the first: {unread[0]}')

    # ----- metrics -----------------------------------------------------------------------
    def update_metrics(self, metrics, outputs: list, batch: dict) -> None:
        """Feed one batch of predicted data samples to ``metrics``."""
        raise NotImplementedError

    def compute_metrics(self, metrics) -> Dict[str, float]:
        return {k: float(v) for k, v in metrics.compute().items()}

    def _log_metrics(self, metrics, stage: str) -> None:
        if metrics is None:
            return
        values = self.compute_metrics(metrics)  # the same on every process
        metrics.reset()
        # 'max' of equal values: synchronised without arithmetic, so they stay exact
        self.log_dict({f'{stage}/{k}': v for k, v in values.items()}, sync_dist=True, reduce_fx='max')
        if not self.trainer.sanity_checking and self.trainer.is_global_zero:
            fitting = self.trainer.state.fn == 'fit'
            where = f'epoch {self.current_epoch} {stage}' if fitting else stage
            print(f'[msmlp] {where}: ' + '  '.join(f'{k}={v:.4f}' for k, v in values.items()), flush=True)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, 'val')

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, 'test')

    def draw(self, data_sample, out_file: str) -> None:
        """Write the PNG of one prediction."""
        raise NotImplementedError


# ----- data --------------------------------------------------------------------------------
def unreadable(paths: Sequence[str]) -> Optional[str]:
    """Why the first of ``paths`` that is not a readable image fails, or None if all read."""
    from PIL import Image
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
        except (OSError, ValueError, SyntaxError) as err:
            return f'cannot read {path}: {err}'
    return None


class _ReadErrors(Dataset):
    """An mmdet/mmseg dataset whose items fail with one line naming the file when an image or
    label map cannot be read (mmcv's loaders fail with an assertion, or on ``None``, deep in
    the pipeline); any other failure is raised as it is."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except InputError:
            raise
        except Exception:
            info = self.dataset.get_data_info(index)
            reason = unreadable([info[key] for key in ('img_path', 'seg_map_path') if info.get(key)])
            if reason is None:
                raise
            raise InputError(reason) from None

    def __getattr__(self, name: str):
        if name == 'dataset':
            raise AttributeError(name)
        return getattr(self.dataset, name)


UNREADABLE = 'unreadable'


class _SkipUnreadable(_ReadErrors):
    """For predict: an unreadable image is an item ``{UNREADABLE: (index, reason)}``, which
    ``collate_predict`` sets beside the batch, so that predicting a large folder does not stop
    at it (the run still fails at the end, naming it)."""

    def __getitem__(self, index: int):
        try:
            return super().__getitem__(index)
        except InputError as err:
            return {UNREADABLE: (index, str(err))}
        except Exception as err:  # read, but the config's pipeline fails on it (4000x8 resized to 160x0)
            return {UNREADABLE: (index, _unprepared(self.dataset.get_data_info(index)['img_path'], err))}


def _unprepared(path: str, err: Exception) -> str:
    from PIL import Image
    with Image.open(path) as image:
        width, height = image.size
    reason = next((line.strip() for line in reversed(str(err).splitlines()) if line.strip()), '')
    return f'cannot prepare {path} ({width}x{height}) for the model: {type(err).__name__}: {reason}'


def collate_predict(items: Sequence[dict]) -> dict:
    """mmengine's ``pseudo_collate`` of the readable items, the unreadable ones' ``(index, reason)``
    under ``UNREADABLE``."""
    from mmengine.dataset import pseudo_collate
    readable = [item for item in items if UNREADABLE not in item]
    batch = pseudo_collate(readable) if readable else {'inputs': []}
    batch[UNREADABLE] = [item[UNREADABLE] for item in items if UNREADABLE in item]
    return batch


class _Items(Dataset):
    """Images from files through a test pipeline without annotation loading (for predict;
    wrapped in ``_ReadErrors`` like the annotated datasets)."""

    def __init__(self, paths: Sequence[str], pipeline):
        self.paths, self.pipeline = list(paths), pipeline

    def __len__(self) -> int:
        return len(self.paths)

    def get_data_info(self, index: int) -> dict:
        return dict(img_path=self.paths[index], img_id=index)

    def __getitem__(self, index: int):
        return self.pipeline(self.get_data_info(index))


def prediction_name(img_path: str) -> str:
    """The file name of an image's prediction (and, for seg, of its label map)."""
    return Path(img_path).stem + '.png'


def _check_distinct_prediction_names(paths: Sequence[str]) -> None:
    seen: Dict[str, str] = {}
    for path in paths:
        other = seen.setdefault(prediction_name(path), path)
        if other != path:
            raise InputError(f'predict images {other} and {path} would both be predicted to {prediction_name(path)}: '
                             'rename one, or predict them separately')


def loads_annotations(step) -> bool:
    return isinstance(step, dict) and 'LoadAnnotations' in str(step.get('type'))


def without_annotations(pipeline: list) -> list:
    """A copy of ``pipeline`` without ``LoadAnnotations`` (also inside ``TestTimeAug``), for unlabelled images."""
    out = []
    for step in pipeline:
        if loads_annotations(step):
            continue
        step = copy.copy(step)
        if isinstance(step, dict) and 'transforms' in step:
            step['transforms'] = [g for g in (without_annotations(list(g)) for g in step['transforms']) if g]
        out.append(step)
    return out


IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


def leaf_datasets(cfg) -> list:
    """The innermost dataset configs of (possibly wrapped) dataset ``cfg``."""
    if 'dataset' in cfg:
        return leaf_datasets(cfg['dataset'])
    if 'datasets' in cfg:
        return [leaf for sub in cfg['datasets'] for leaf in leaf_datasets(sub)]
    return [cfg]


class OpenMMLabDataModule(LightningDataModule):
    """The datasets of an mmdet/mmseg config, with its pipelines.

    Args:
        root: The dataset folder (``data_root``); None writes (once) and uses the
            embedded default dataset.
        batch_size: Training images per device (default: the config's
            ``train_dataloader.batch_size``).
        num_workers: Loader processes (default: the config's).
        predict_images: An image file, a folder or a glob for ``predict`` (default: the
            validation split's images).
        config: An mmdet/mmseg config; by default the config of the task it is used with.
        cfg_options: Overrides merged into ``config`` (only with ``config``).
    """

    scope = 'mmdet'
    splits = {'fit': ('train', 'val'), 'validate': ('val',), 'test': ('test',)}
    full_train_batches = False  # True: an epoch's last incomplete batch is dropped

    def __init__(self, root: Optional[str] = None, batch_size: Optional[int] = None,
                 num_workers: Optional[int] = None, predict_images: Optional[str] = None,
                 config: Optional[str] = None, cfg_options: Optional[Dict[str, Any]] = None):
        check_loader_args(batch_size, num_workers)
        super().__init__()
        # Not config/cfg_options: the task has hparams of those names, and Lightning refuses to
        # log a module's and a datamodule's hparams when a shared name has different values.
        self.save_hyperparameters(ignore=['config', 'cfg_options'])
        self.root = self.hparams.root = absolute_root(root)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.predict_images = predict_images
        self.config, self.cfg_options = config, cfg_options
        self.datasets: Dict[str, Dataset] = {}
        self.classes: Optional[Sequence[str]] = None
        self._cfg = None

    def explain_missing(self, what: str, path: str, root: str, relative: str) -> None:
        """For ``path`` (``relative`` under ``root``), a file or folder the config reads that is
        missing: with no ``--data.root``, an ``InputError`` naming what the embedded dataset
        holds instead; with one, an ``InputError`` naming the folder inside it that holds
        ``relative``, if one does. Otherwise it returns, and the split's own checks name it."""
        if self.root is None:
            raise InputError(f'{what} not found: {path}. The embedded dataset holds {self.embedded_layout}: '
                             'pass --data.root with the dataset this config reads')
        hint = nested_root_hint(Path(root), relative)
        if hint:
            raise InputError(f'{what} not found: {path}{hint}')

    # ----- hooks for subclasses ------------------------------------------------------------
    embedded_layout = ''  # what the embedded dataset holds, in words, for messages

    def embedded_root(self) -> Path:
        """Write (once) and return the embedded default dataset."""
        raise NotImplementedError(f'{type(self).__name__} has no embedded dataset: pass root=')

    def prepare_dataset_cfg(self, split: str, dataset_cfg) -> None:
        """Adjust one split's dataset config in place; check its files."""

    def wrap_dataset(self, split: str, dataset: Dataset) -> Dataset:
        return dataset

    # ----- building ------------------------------------------------------------------------
    @property
    def cfg(self):
        if self._cfg is None:
            if self.config is not None:
                self._cfg = load_config(self.config, self.cfg_options)
            else:
                task = getattr(self.trainer, 'lightning_module', None) if self.trainer is not None else None
                if task is None or getattr(task, 'cfg', None) is None:
                    raise RuntimeError(f'{type(self).__name__} takes its pipelines from the task\'s OpenMMLab '
                                       'config: use it with an OpenMMLabTask, or pass config=')
                self._cfg = task.cfg
        return self._cfg

    def data_root(self) -> Path:
        return Path(self.root).expanduser() if self.root is not None else self.embedded_root()

    def prepare_data(self) -> None:
        if self.root is None:
            self.embedded_root()

    def dataset_cfg(self, split: str):
        loader = self.cfg.get(f'{split}_dataloader')
        if not loader:
            raise InputError(f'the config has no {split}_dataloader')
        cfg = copy.deepcopy(loader['dataset'])
        for leaf in leaf_datasets(cfg):
            leaf['data_root'] = str(self.data_root())
            self.prepare_dataset_cfg(split, leaf)
        return cfg

    def build_dataset(self, split: str) -> Dataset:
        cfg = self.dataset_cfg(split)
        registry = _registry(self.cfg, self.scope)
        dataset = registry.DATASETS.build(cfg)
        if len(dataset) == 0:
            raise InputError(f'the {split} dataset under {self.data_root()} is empty after filtering '
                             f'({[leaf.get("ann_file") for leaf in leaf_datasets(cfg)]})')
        if self.classes is None:
            self.classes = tuple(dataset.metainfo['classes'])
        return self.wrap_dataset(split, _ReadErrors(dataset))

    def setup(self, stage: str) -> None:
        if stage == 'predict':
            if self.predict_images is None and 'val' not in self.datasets:
                self.datasets['val'] = self.build_dataset('val')
            self.datasets['predict'] = self.build_predict_dataset()
            if self.classes is None:
                self.classes = self.config_classes()
            return
        for split in self.splits.get(stage, ()):
            if split not in self.datasets:
                self.datasets[split] = self.build_dataset(split)

    def config_classes(self) -> Optional[Sequence[str]]:
        """The classes the config names (its test dataset's metainfo or dataset class)."""
        return dataset_classes(self.cfg, self.scope, leaf_datasets(self.cfg.test_dataloader.dataset)[0])

    def predict_pipeline(self) -> list:
        """The test pipeline without annotation loading."""
        return without_annotations(self.cfg.test_dataloader.dataset.pipeline)

    def build_predict_dataset(self) -> Dataset:
        from mmengine.dataset import Compose
        _scope(self.cfg, self.scope)
        if self.predict_images == '':  # not silently the validation images
            raise InputError('predict_images is empty: give an image, a folder or a glob, or leave it out for '
                             'the validation images')
        if self.predict_images:
            paths = self._image_paths(self.predict_images)
        else:
            val = self.datasets['val']
            paths = [val.get_data_info(i)['img_path'] for i in range(len(val))]
        _check_distinct_prediction_names(paths)
        return _SkipUnreadable(_Items(paths, Compose(self.predict_pipeline())))

    @staticmethod
    def _image_paths(spec: str) -> List[str]:
        spec = os.path.expanduser(spec)
        if os.path.isdir(spec):
            entries = [p for p in Path(spec).iterdir() if not p.name.startswith('.')]
            images = {p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()}
            paths = sorted(map(str, images))
            unread = sorted(p.name + ('/' if p.is_dir() else '') for p in entries if p not in images)
            if unread:
                rank_zero_warn(f'predict_images={spec!r}: {len(unread)} entries are not read ({listed(unread, 5)}): '
                               f'only the {"/".join(IMAGE_SUFFIXES)} files in the folder itself are')
        elif os.path.isfile(spec):
            paths = [spec]
        else:
            paths = sorted(p for p in glob.glob(spec, recursive=True) if Path(p).suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise InputError(f'predict_images={spec!r}: no images found (a file, a folder or a glob)')
        return paths

    # ----- loaders -------------------------------------------------------------------------
    def _loader_args(self, split: str) -> Dict[str, Any]:
        from mmengine.dataset import pseudo_collate
        config_split = 'test' if split == 'predict' else split  # predict reads images as test does
        loader_cfg = self.cfg.get(f'{config_split}_dataloader') or self.cfg.get('val_dataloader')
        batch_size = self.batch_size if split == 'train' and self.batch_size else loader_cfg.get('batch_size', 1)
        workers = self.num_workers if self.num_workers is not None else loader_cfg.get('num_workers', 0)
        collate = collate_predict if split == 'predict' else pseudo_collate
        return dict(batch_size=batch_size, collate_fn=collate, **worker_args(workers, self.datasets[split]))

    def train_dataloader(self) -> DataLoader:
        args = self._loader_args('train')
        train = self.datasets['train']
        if self.full_train_batches:
            check_full_batch(f'the training split of {self.root or "the embedded data"}', len(train), args['batch_size'])
        return ResumableLoader(train, seed=int(os.environ.get('PL_GLOBAL_SEED', 0)),
                               drop_last=self.full_train_batches, persistent_workers=args['num_workers'] > 0, **args)

    def val_dataloader(self) -> DataLoader:
        return eval_loader(self.datasets['val'], **self._loader_args('val'))

    def test_dataloader(self) -> DataLoader:
        return eval_loader(self.datasets['test'], **self._loader_args('test'))

    def predict_dataloader(self) -> DataLoader:
        # Lightning gives each process its share of a plain loader for predict, without repeats.
        return DataLoader(self.datasets['predict'], shuffle=False, **self._loader_args('predict'))
