"""The small base every task builds on (after torchgeo's ``BaseTask``).

A task declares its arguments as flat, typed ``__init__`` parameters (what the CLI and the
YAML configs set) and fills in three hooks: ``configure_models``, ``configure_losses`` and
``configure_metrics``. The base saves the arguments as hyper-parameters (plain types, so
checkpoints load with ``torch.load(weights_only=True)``) and builds the optimiser the MS-MLP
recipes use: AdamW without weight decay on norms, biases, 1-D parameters and layer scale,
a linear warm-up then cosine decay per step (timm's scheduler), with the learning rates
scaled by the total batch. It also saves every process's random generator states in
checkpoints and restores them when training resumes, so that a resumed run draws the same
drop-path masks, Mixup factors and proposal samples as an uninterrupted one.

Hyper-parameters ``configure_optimizers`` reads (subclasses declare those they use):
``lr``, ``weight_decay`` (0), ``betas`` ((0.9, 0.999)), ``eps`` (1e-8), ``warmup_epochs`` (0),
``warmup_lr`` (0), ``min_lr`` (0) and ``lr_batch_size`` (None). When ``lr_batch_size`` is set,
``lr``, ``warmup_lr`` and ``min_lr`` are multiplied by total batch / ``lr_batch_size``, where
total batch = the datamodule's ``batch_size`` x devices x gradient accumulation.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler

from msmlp.checkpoint import mismatch_message
from tasks.checkpointing import rng_states, set_rng_states

__all__ = ['BaseTask', 'InputError', 'CONFIG_DIR', 'find_config', 'nested_root_hint', 'portable_config',
           'weights_from_checkpoint', 'starting_weights_needed']

# The shipped configs, installed beside the tasks package as they sit in the repository.
CONFIG_DIR = Path(__file__).resolve().parent.parent / 'configs'


class InputError(ValueError):
    """Bad user input (a data folder, an image, a config value) with a message naming it.

    The ``msmlp`` CLI prints these as one-line errors instead of tracebacks.
    """


def nested_root_hint(root: Path, relative: str) -> str:
    """``'; D holds RELATIVE: --data.root D?'`` when exactly one folder D directly inside
    ``root`` holds ``relative`` (an archive unpacked into a folder of its own, with
    ``--data.root`` naming the folder above it); else ``''``."""
    if not root.is_dir():
        return ''
    found = [child for child in sorted(root.iterdir())
             if child.is_dir() and not child.name.startswith('.') and (child / relative).exists()]
    return f'; {found[0]} holds {relative}: --data.root {found[0]}?' if len(found) == 1 else ''


def find_config(name: str, task: str = '') -> Path:
    """A config file as given, or one of the shipped configs by the name the docs use
    (``configs/cls/msmlp_tiny_in1k.yaml``, ``configs/mmdet/<name>.py``) or a shorter one
    (``cls/msmlp_tiny_in1k.yaml``, or ``msmlp_tiny_in1k.yaml`` within ``task``'s folder), from
    any folder; ``InputError`` naming where it looked."""
    given = Path(name).expanduser()
    if given.is_file():
        return given
    relative = name[len('configs/'):] if name.startswith('configs/') else name
    for candidate in (CONFIG_DIR / relative, CONFIG_DIR / task / relative):
        if candidate.is_file():
            return candidate
    if given.is_dir():
        raise InputError(f'config {name} is a folder: name a file in it')
    raise InputError(f'config not found: {name} (looked in {Path.cwd()} and in the shipped configs, {CONFIG_DIR})')


def portable_config(name: str) -> str:
    """How a run records its config: a shipped one by its name under ``configs/`` (found from
    any folder and any installation), any other file by its absolute path, so that the run's
    checkpoint is validated, tested, predicted with or resumed from other folders too."""
    path = find_config(name).resolve()
    return str(path.relative_to(CONFIG_DIR)) if path.is_relative_to(CONFIG_DIR) else str(path)


_WEIGHTS_FROM_CHECKPOINT: contextvars.ContextVar[bool] = contextvars.ContextVar('weights_from_checkpoint',
                                                                                default=False)


@contextlib.contextmanager
def weights_from_checkpoint() -> Iterator[None]:
    """Build tasks whose weights a checkpoint replaces (a run given ``--ckpt_path``,
    ``load_from_checkpoint``): they do not read their starting weights (``pretrained``, a
    config's ``init_cfg``), which may have moved or be out of reach since the run began."""
    token = _WEIGHTS_FROM_CHECKPOINT.set(True)
    try:
        yield
    finally:
        _WEIGHTS_FROM_CHECKPOINT.reset(token)


def starting_weights_needed() -> bool:
    """False while :func:`weights_from_checkpoint` is in force."""
    return not _WEIGHTS_FROM_CHECKPOINT.get()


class BaseTask(LightningModule, ABC):
    """LightningModule with ``configure_models`` / ``configure_losses`` / ``configure_metrics``.

    Args:
        ignore: ``__init__`` arguments not to save as hyper-parameters (e.g. modules).
    """

    def __init__(self, ignore: Optional[Sequence[str]] = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=['ignore', *(ignore or ())])
        self._rng_states_to_restore: Optional[List[Dict[str, Any]]] = None
        # The checkpoint the run starts from (``--ckpt_path``; the CLI sets it), which Lightning
        # restores only after ``setup``: data checks there name it.
        self.checkpoint_path: Optional[str] = None
        self.configure_models()
        self.configure_losses()
        self.configure_metrics()

    @classmethod
    def load_from_checkpoint(cls, *args: Any, **kwargs: Any):  # type: ignore[override]
        """Lightning's, without reading the starting weights the checkpoint's replace."""
        with weights_from_checkpoint():
            return super().load_from_checkpoint(*args, **kwargs)

    @abstractmethod
    def configure_models(self) -> None:
        """Build the networks (``self.model`` by convention)."""

    def configure_losses(self) -> None:
        """Build the loss functions."""

    def configure_metrics(self) -> None:
        """Build the torchmetrics collections."""

    # ----- optimisation ------------------------------------------------------------------
    def no_weight_decay_keywords(self) -> set:
        """Parameter-name keywords without weight decay, gathered from every sub-module that
        declares ``no_weight_decay_keywords`` (MSMLP: the layer scale ``gamma``)."""
        keywords: set = set()
        for module in self.modules():
            if module is not self and hasattr(module, 'no_weight_decay_keywords'):
                keywords |= set(module.no_weight_decay_keywords())
        return keywords

    def lr_scale(self) -> float:
        """Total batch / ``lr_batch_size`` (1 when ``lr_batch_size`` is unset)."""
        reference = self.hparams.get('lr_batch_size')
        if not reference:
            return 1.0
        batch_size = getattr(self.trainer.datamodule, 'batch_size', None)
        if batch_size is None:
            batch_size = getattr(self.trainer.train_dataloader, 'batch_size', None)
        if batch_size is None:
            raise InputError('lr_batch_size is set but the batch size is unknown: give the datamodule '
                             'a batch_size attribute, or set lr_batch_size to null')
        total = batch_size * self.trainer.world_size * self.trainer.accumulate_grad_batches
        return total / reference

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        scale = self.lr_scale()
        lr, warmup_lr, min_lr = hp['lr'] * scale, hp.get('warmup_lr', 0.) * scale, hp.get('min_lr', 0.) * scale
        weight_decay = hp.get('weight_decay', 0.)
        groups = param_groups_weight_decay(
            self, weight_decay, no_weight_decay_list=[f'*{k}*' for k in self.no_weight_decay_keywords()])
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(hp.get('betas', (0.9, 0.999))),
                                      eps=hp.get('eps', 1e-8), weight_decay=weight_decay)
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        batches = self.trainer.num_training_batches  # known once estimated_stepping_batches loaded the data
        if math.isfinite(batches):
            steps_per_epoch = max(1, int(batches) // self.trainer.accumulate_grad_batches)
        else:
            steps_per_epoch = max(1, total_steps // max(1, self.trainer.max_epochs or 1))
        warmup_steps = int(hp.get('warmup_epochs', 0) * steps_per_epoch)
        # As released: the cosine spans the whole run and the warm-up overrides its start.
        scheduler = CosineLRScheduler(optimizer, t_initial=total_steps, lr_min=min_lr, warmup_t=warmup_steps,
                                      warmup_lr_init=warmup_lr, warmup_prefix=False, t_in_epochs=False)
        return {'optimizer': optimizer, 'lr_scheduler': {'scheduler': scheduler, 'interval': 'step'}}

    def _warn_if_schedule_length_changed(self) -> None:
        """A resumed run keeps its checkpoint's schedule (timm restores its length): say so
        when this run is longer or shorter (another max_epochs, batch size or process count)."""
        planned = getattr(self.lr_schedulers(), 't_initial', None)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if planned is None or planned == total:
            return
        from lightning.pytorch.utilities import rank_zero_warn
        effect = (f'steps {planned} to {total} run at its final learning rate (min_lr)' if total > planned
                  else f'this run stops at step {total}, before the learning rate has decayed to min_lr')
        rank_zero_warn(f'the checkpoint\'s learning-rate schedule spans {planned} optimizer steps, this run '
                       f'{total} (another max_epochs, max_steps, batch size or process count); it keeps the '
                       f'checkpoint\'s, so {effect}. To schedule the new length, start a new run from its weights '
                       '(--model.pretrained CHECKPOINT)')

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        if not hasattr(scheduler, 'step_update'):  # a torch scheduler given with --lr_scheduler
            return super().lr_scheduler_step(scheduler, metric)
        # timm schedulers take the number of optimiser steps taken so far.
        scheduler.step_update(num_updates=self.trainer.global_step)

    # ----- exact resumption ----------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Store the random generator states of every process (the saving process writes them all)."""
        states = rng_states()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: List[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, states)
        else:
            gathered = [states]
        checkpoint['rng_states'] = gathered

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        self._rng_states_to_restore = checkpoint.get('rng_states')
        self._checkpoint_hparams = dict(checkpoint.get('hyper_parameters') or {})

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """torch's, but weights that do not fit the model this command built (another config,
        model or width than the checkpoint's) are one line naming the checkpoint, the first
        differing keys and the hyper-parameters that differ, not a page of keys."""
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as err:
            if not str(err).startswith('Error(s) in loading state_dict'):
                raise
            raise InputError(self._misfit_message(state_dict, err)) from err

    def _misfit_message(self, state_dict: Mapping[str, Any], err: RuntimeError) -> str:
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        mis_shaped = [f'{k}: {list(state_dict[k].shape)} in the file, {list(own[k].shape)} in the model'
                      for k in state_dict if k in own and hasattr(state_dict[k], 'shape')
                      and state_dict[k].shape != own[k].shape]
        path = self.checkpoint_path or 'the checkpoint'
        if not (missing or unexpected or mis_shaped):  # keys a load hook renames: torch's first reason
            lines = str(err).splitlines()
            return f'{path} does not fit the model: {lines[min(1, len(lines) - 1)].strip()}'
        trained = getattr(self, '_checkpoint_hparams', {})
        differ = [f"the checkpoint's {k} is {trained[k]!r}, this command's {self.hparams[k]!r}" for k in trained
                  if k in self.hparams and not k.startswith('_') and trained[k] != self.hparams[k]]
        return mismatch_message(path, missing, unexpected, mis_shaped) + ''.join(f'; {d}' for d in differ[:3])

    def _print(self, text: str) -> None:
        bar = self.trainer.progress_bar_callback if self._trainer is not None else None
        if bar is not None:
            bar.print(text)  # keeps the progress bar intact
        else:
            print(text, flush=True)

    def on_predict_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        # Lightning's fit and evaluation loops stop at the batch after a SIGTERM (a batch system's
        # notice before it kills the job); its predict loop would go on until the job is killed
        if self.trainer.received_sigterm:
            from lightning.pytorch.utilities.exceptions import SIGTERMException
            raise SIGTERMException

    def on_train_start(self) -> None:
        # Lightning 2.6 restores a resumable loader's position only if the training data is set
        # up after the checkpoint is read; configure_optimizers (estimated_stepping_batches)
        # sets it up before, so the position restored with the loops is applied here (the
        # loader starts its epoch on the first batch, after this hook).
        load_positions = getattr(self.trainer.fit_loop, '_load_combined_loader_states', None)
        if load_positions is not None:
            load_positions()
        self._warn_if_schedule_length_changed()
        # Restored here, after the sanity check and data set-up, right before the first step.
        states, self._rng_states_to_restore = self._rng_states_to_restore, None
        if not states:
            return
        rank = self.global_rank
        if len(states) != self.trainer.world_size:
            from lightning.pytorch.utilities import rank_zero_warn
            rank_zero_warn(f'the checkpoint holds the random generator states of {len(states)} processes, this run '
                           f'has {self.trainer.world_size}: training continues from the checkpoint but does not repeat '
                           'the uninterrupted run exactly (each process now sees other samples)')
        set_rng_states(states[rank % len(states)])
