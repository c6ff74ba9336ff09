"""Checkpoints that lose nothing when a run is killed, and the state a resumed run needs.

:class:`RunCheckpoint` is the ``--checkpoint.*`` callback of the ``msmlp`` CLI: Lightning's
``ModelCheckpoint`` with these differences:

* ``every_n_train_steps`` and ``train_time_interval`` write ``last.ckpt`` during the epoch
  (the fault-tolerance checkpoint; either may be set, both too), while the top-k checkpoints
  by ``monitor`` stay at the ends of validation. In Lightning those two arguments replace the
  epoch trigger, so the "best" checkpoint would be taken at some later step with a stale metric.
* ``last.ckpt`` is also written at the end of every validation and every training epoch
  (Lightning 2.6 writes it only when a top-k checkpoint was written at that step).
* Every file is written atomically: into ``<name>.partial`` beside it, then renamed over it,
  so a kill while writing leaves the previous checkpoint whole.
* Before each save the loggers are flushed, and the checkpoint records how many rows
  ``metrics.csv`` held and from which step on the killed run's events are redone; a run
  resumed from it continues that CSV from there (see ``cli.py``) and TensorBoard hides the
  killed run's later events (``purge_step``). A mid-epoch save due at a batch whose metrics
  Lightning logs is taken one batch later (Lightning logs them after the batch-end hooks, so
  they would be written after the checkpoint and never again by the resumed run); one due at
  the last batch of an epoch is left to the epoch-end save that follows.

:func:`rng_states` / :func:`set_rng_states` capture and restore Python's, NumPy's, torch's
and CUDA's generators in types ``torch.load(weights_only=True)`` accepts.
"""
from __future__ import annotations

import csv
import os
import random
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, Optional
from weakref import proxy

import numpy as np
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.trainer.states import TrainerFn

__all__ = ['RunCheckpoint', 'rng_states', 'set_rng_states', 'LOG_STATE_KEY', 'csv_data_rows', 'truncate_csv']

LOG_STATE_KEY = 'msmlp_logs'  # {'csv_rows': rows of metrics.csv at the save, 'purge_step': see _flush_loggers}


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` for runs that must survive a kill (see the module docstring).

    Args:
        every_n_train_steps: Write ``last.ckpt`` every this many optimizer steps (0/None: not by steps).
        train_time_interval: Write ``last.ckpt`` when this much time passed since the last one.
        **kwargs: ``ModelCheckpoint``'s other arguments (``monitor``, ``mode``, ``save_top_k``,
            ``every_n_epochs`` for the top-k checkpoints, ``save_last``, ``filename``, ...).
    """

    def __init__(self, every_n_train_steps: Optional[int] = None, train_time_interval: Optional[timedelta] = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if every_n_train_steps is not None and every_n_train_steps < 0:
            raise ValueError(f'every_n_train_steps={every_n_train_steps}: must be >= 0')
        self.last_every_n_train_steps = every_n_train_steps or 0
        self.last_time_interval = train_time_interval
        self._last_time: Optional[float] = None
        self._stage = 'train'
        self._last_written: Optional[tuple] = None  # (global step, stage) of the last last.ckpt
        self._deferred = False
        self._log_state: Optional[Dict[str, Any]] = None

    # ----- triggers ------------------------------------------------------------------------
    def _fitting(self, trainer) -> bool:
        return not trainer.fast_dev_run and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking

    def _last_due(self, trainer) -> bool:
        import time
        due = bool(self.last_every_n_train_steps) and trainer.global_step % self.last_every_n_train_steps == 0
        if self.last_time_interval is not None:
            now = time.monotonic()
            if self._last_time is None:
                self._last_time = now
            # rank 0 decides, so that every process saves (a collective) or none does
            timed = trainer.strategy.broadcast(now - self._last_time >= self.last_time_interval.total_seconds())
            due = due or timed
        return due

    def _write_last(self, trainer, stage: str) -> None:
        if not self.save_last or not self._fitting(trainer) or self._last_written == (trainer.global_step, stage):
            return
        saved_at = self._last_global_step_saved
        self._stage = stage
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        # A top-k checkpoint of a validation at this same step is still due.
        self._last_global_step_saved = saved_at

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        import time
        self._last_time = time.monotonic()

    def on_train_end(self, trainer, pl_module) -> None:
        if self._fitting(trainer):  # Lightning 2.6 writes last.ckpt here even under fast_dev_run
            super().on_train_end(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._stage = 'batch'
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not (self.last_every_n_train_steps or self.last_time_interval is not None):
            return
        due = self._last_due(trainer) or self._deferred
        if not due or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._deferred = False  # the end of the epoch writes last.ckpt
            return
        if _logs_this_batch(trainer) and not self._deferred:
            self._deferred = True
            return
        self._deferred = False
        self._write_last(trainer, 'batch')

    def on_validation_end(self, trainer, pl_module) -> None:
        self._stage = 'validation'
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):  # else the end of the epoch writes it
            self._write_last(trainer, 'validation')

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._stage = 'epoch'
        super().on_train_epoch_end(trainer, pl_module)
        if self._last_written is None or self._last_written[0] != trainer.global_step:
            self._write_last(trainer, 'epoch')

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_written = (trainer.global_step, self._stage)
            if self.last_time_interval is not None:
                import time
                self._last_time = time.monotonic()

    # ----- writing -------------------------------------------------------------------------
    def _save_checkpoint(self, trainer, filepath: str) -> None:
        self._flush_loggers(trainer)
        if not _is_local_file_protocol(filepath):
            return super()._save_checkpoint(trainer, filepath)
        partial = f'{filepath}.partial'
        trainer.save_checkpoint(partial, self.save_weights_only)
        if trainer.is_global_zero:
            _replace(partial, filepath)
        trainer.strategy.barrier('RunCheckpoint._save_checkpoint')
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def _flush_loggers(self, trainer) -> None:
        """Write the loggers' buffered rows, and note how many rows ``metrics.csv`` holds and
        the first logging step whose events the resumed run writes again (``purge_step``):
        after a mid-epoch save, the next batch's; after an epoch-end save, the one after it
        (that step's validation results were logged before the save)."""
        step = int(trainer.global_step)
        self._log_state = {'purge_step': step if self._stage == 'batch' else step + 1, 'csv_rows': None}
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.save()
            if isinstance(logger, CSVLogger) and self._log_state['csv_rows'] is None:
                self._log_state['csv_rows'] = csv_data_rows(Path(logger.log_dir) / 'metrics.csv')

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: Dict[str, Any]) -> None:
        if self._log_state is not None:
            checkpoint[LOG_STATE_KEY] = dict(self._log_state)


def _logs_this_batch(trainer) -> bool:
    """Whether Lightning logs the metrics of the current training batch (after its hooks)."""
    connector = getattr(trainer, '_logger_connector', None)
    return bool(getattr(connector, 'should_update_logs', True))


def _replace(partial: str, filepath: str) -> None:
    """Move ``partial`` over ``filepath``: one atomic rename for a file; a directory
    (sharded checkpoints) is swapped in two renames."""
    if os.path.isdir(partial) and os.path.isdir(filepath):
        old = f'{filepath}.old'
        shutil.rmtree(old, ignore_errors=True)
        os.replace(filepath, old)
        os.replace(partial, filepath)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, filepath)


# ----- logs of a resumed run --------------------------------------------------------------
def csv_data_rows(path: Path) -> Optional[int]:
    """Data rows (not counting the header) of a CSV file; None if there is no file."""
    if not path.is_file():
        return None
    with open(path, newline='') as f:
        return max(0, sum(1 for _ in csv.reader(f)) - 1)


def truncate_csv(path: Path, rows: int) -> list:
    """Keep the header and the first ``rows`` data rows of ``path``; return the header."""
    with open(path, newline='') as f:
        table = list(csv.reader(f))
    if not table:
        return []
    header, data = table[0], table[1:rows + 1]
    tmp = path.with_name(path.name + '.partial')
    with open(tmp, 'w', newline='') as f:
        csv.writer(f).writerows([header, *data])  # '\r\n', as Lightning's CSV writer ends its rows
    os.replace(tmp, path)
    return header


# ----- random generators ------------------------------------------------------------------
def rng_states() -> Dict[str, Any]:
    """This process's Python, NumPy, torch (CPU) and CUDA generator states, in plain types and
    tensors (checkpoints stay loadable with ``torch.load(weights_only=True)``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {'python': random.getstate(), 'numpy': (name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                     int(has_gauss), float(cached)),
              'torch': torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states['cuda'] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: Dict[str, Any]) -> None:
    """Restore what :func:`rng_states` captured."""
    version, internal, gauss = states['python']
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states['torch'])
    if 'cuda' in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states['cuda'])
