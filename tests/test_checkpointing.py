"""tasks.checkpointing: when last.ckpt and the top-k checkpoints are written, atomic writes,
the log state a resumed run continues from, and the random generator states."""
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from tasks.checkpointing import LOG_STATE_KEY, RunCheckpoint, csv_data_rows, rng_states, set_rng_states, truncate_csv

REPO = Path(__file__).resolve().parents[1]


class Tiny(LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch).pow(2).mean()
        self.log('train/loss', loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log('val/score', float(self.current_epoch))  # rises every epoch: each validation is the best

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(torch.randn(10, 2), batch_size=1)  # 10 steps per epoch

    def val_dataloader(self):
        return DataLoader(torch.randn(2, 2), batch_size=1)


class Recording(RunCheckpoint):
    """Records (global step, file name, stage) of every checkpoint written."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.written = []

    def _save_checkpoint(self, trainer, filepath):
        super()._save_checkpoint(trainer, filepath)
        self.written.append((trainer.global_step, Path(filepath).name, self._stage))


def fit(tmp_path, log_every_n_steps=50, **checkpoint_args):
    callback = Recording(dirpath=tmp_path / 'checkpoints', filename='best-{epoch}', monitor='val/score', mode='max',
                         save_last=True, **checkpoint_args)
    trainer = Trainer(max_epochs=2, callbacks=[callback], logger=CSVLogger(tmp_path, name='', version=''),
                      log_every_n_steps=log_every_n_steps, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0)
    trainer.fit(Tiny())
    return callback.written


def test_last_every_n_steps_and_the_best_at_each_validation(tmp_path):
    written = fit(tmp_path, every_n_train_steps=4)
    assert written == [(4, 'last.ckpt', 'batch'), (8, 'last.ckpt', 'batch'),
                       # the save due at the last batch is left to the end of the epoch, after validation
                       (10, 'best-epoch=0.ckpt', 'epoch'), (10, 'last.ckpt', 'epoch'),
                       (12, 'last.ckpt', 'batch'), (16, 'last.ckpt', 'batch'),
                       (20, 'best-epoch=1.ckpt', 'epoch'), (20, 'last.ckpt', 'epoch')]
    assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['best-epoch=1.ckpt', 'last.ckpt']


def test_lightning_modelcheckpoint_takes_the_best_at_step_intervals_with_a_stale_metric(tmp_path):
    """Why RunCheckpoint exists: with Lightning's own callback, every_n_train_steps replaces
    the epoch trigger, and the "best" file is a later step's weights under an old score."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    callback = ModelCheckpoint(dirpath=tmp_path, filename='best-{step}', monitor='val/score', mode='max',
                               every_n_train_steps=4)
    Trainer(max_epochs=2, callbacks=[callback], logger=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0).fit(Tiny())
    # epoch 1 validated at 1.0 (epoch 0 at 0.0), yet the best file is a mid-epoch step scored 0.0
    assert Path(callback.best_model_path).name == 'best-step=12.ckpt' and float(callback.best_model_score) == 0.0


def test_a_save_due_where_lightning_logs_the_batch_is_taken_one_batch_later(tmp_path):
    # Lightning logs step 4's metrics after the batch-end hooks: a checkpoint there would lack them.
    written = fit(tmp_path, log_every_n_steps=4, every_n_train_steps=4)
    assert [(s, n) for s, n, stage in written if stage == 'batch'] == [(5, 'last.ckpt'), (9, 'last.ckpt'),
                                                                        (13, 'last.ckpt'), (17, 'last.ckpt')]


def test_with_validation_every_other_epoch_last_is_written_at_each_epoch_end(tmp_path):
    callback = Recording(dirpath=tmp_path, filename='best-{epoch}', monitor='val/score', mode='max', save_last=True)
    Trainer(max_epochs=4, check_val_every_n_epoch=2, callbacks=[callback], logger=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0).fit(Tiny())
    # Lightning alone writes last.ckpt only with a new best, at epochs 1 and 3
    assert callback.written == [(10, 'last.ckpt', 'epoch'), (20, 'best-epoch=1.ckpt', 'validation'),
                                (20, 'last.ckpt', 'validation'), (30, 'last.ckpt', 'epoch'),
                                (40, 'best-epoch=3.ckpt', 'validation'), (40, 'last.ckpt', 'validation')]


def test_time_interval_writes_last_during_the_epoch(tmp_path):
    from datetime import timedelta
    written = fit(tmp_path, train_time_interval=timedelta(0))
    assert [s for s, n, stage in written if stage == 'batch'] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15, 16,
                                                                  17, 18, 19]


def test_checkpoints_record_the_csv_rows_and_the_step_the_logs_continue_from(tmp_path):
    fit(tmp_path, log_every_n_steps=1, every_n_train_steps=4)
    last = torch.load(tmp_path / 'checkpoints' / 'last.ckpt', weights_only=True)
    # written after the last validation: 20 training rows and 2 validation rows before it
    assert last[LOG_STATE_KEY] == {'purge_step': 21, 'csv_rows': 22}
    assert csv_data_rows(tmp_path / 'metrics.csv') == 22


def test_csv_truncation_keeps_the_header_and_the_first_rows_byte_for_byte(tmp_path):
    from lightning.fabric.loggers.csv_logs import _ExperimentWriter
    writer = _ExperimentWriter(str(tmp_path))  # Lightning's own, so that the line endings are its own
    for step in range(3):
        writer.log_metrics({'x': step + 1}, step)
    writer.save()
    path = Path(writer.metrics_file_path)
    lines = path.read_bytes().splitlines(keepends=True)
    assert truncate_csv(path, 2) == ['step', 'x']
    assert path.read_bytes() == b''.join(lines[:3])
    assert csv_data_rows(path) == 2 and csv_data_rows(tmp_path / 'missing.csv') is None


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save({'rng': rng_states()}, tmp_path / 'states.pt')
    expected = random.random(), float(np.random.rand()), float(torch.rand(()))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_states(torch.load(tmp_path / 'states.pt', weights_only=True)['rng'])
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected


KILLED_WHILE_WRITING = '''
import os, signal, sys
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.io import TorchCheckpointIO
sys.path.insert(0, {tests!r})
from test_checkpointing import Recording, Tiny

class DiesMidWrite(TorchCheckpointIO):
    saves = 0
    def save_checkpoint(self, checkpoint, path, storage_options=None):
        DiesMidWrite.saves += 1
        if DiesMidWrite.saves < 3:
            return super().save_checkpoint(checkpoint, path, storage_options)
        super().save_checkpoint(checkpoint, path, storage_options)
        with open(path, 'r+b') as f:  # as if killed half-way through writing the file
            f.truncate(os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)

callback = Recording(dirpath={dirpath!r}, monitor='val/score', mode='max', save_last=True, every_n_train_steps=4)
Trainer(max_epochs=2, callbacks=[callback], logger=False, plugins=[DiesMidWrite()], enable_progress_bar=False,
        num_sanity_val_steps=0).fit(Tiny())
'''


def test_a_kill_while_writing_leaves_the_previous_last_checkpoint_whole(tmp_path):
    script = tmp_path / 'killed.py'
    script.write_text(textwrap.dedent(KILLED_WHILE_WRITING.format(tests=str(REPO / 'tests'),
                                                                  dirpath=str(tmp_path / 'ckpt'))))
    done = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr[-3000:]
    # saves: step 4, step 8 (last.ckpt), then the truncated third: best of epoch 0
    last = torch.load(tmp_path / 'ckpt' / 'last.ckpt', weights_only=True)
    assert last['global_step'] == 8
    partial = [p.name for p in (tmp_path / 'ckpt').iterdir() if p.name.endswith('.partial')]
    assert len(partial) == 1
    with pytest.raises(RuntimeError, match='zip archive'):  # truncated
        torch.load(tmp_path / 'ckpt' / partial[0], weights_only=True)
