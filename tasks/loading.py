"""Data loading that gives the same run on any number of workers, after any restart, and
evaluation that sees every sample once on any number of processes.

Training (:class:`ResumableLoader`):

* the order is torch's ``DistributedSampler`` (a permutation per epoch from the seed; each
  process takes its share, the last batch padded with repeats), on one process too;
* every sample is augmented under Python's, NumPy's and torch's global random generators
  seeded from (seed, epoch, index) (:class:`SeededDataset`), so what a sample looks like does
  not depend on which worker loads it, how many workers there are, or what ran before;
* the loader is Lightning-stateful (``state_dict`` / ``load_state_dict``: the epoch and the
  batches consumed), so a checkpoint saved mid-epoch resumes at the next batch: the sampler
  skips the indices already consumed, nothing is read twice.

Evaluation (:func:`eval_loader`): in order, and on several processes each takes every
``world_size``-th sample without the repeats ``DistributedSampler`` adds, so the metrics
summed over processes count each sample once. :func:`gather_in_order` collects per-sample
results from every process in dataset order, as mmengine's ``collect_results`` does.
"""
from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import random
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ['ResumableLoader', 'ShuffledSampler', 'SeededDataset', 'seeded_rngs', 'sample_seed', 'eval_loader',
           'check_loader_args', 'worker_args', 'gather_in_order', 'world']


def check_loader_args(batch_size: Optional[int], num_workers: Optional[int]) -> None:
    """``InputError`` naming the value for a batch size below 1 or a negative worker count
    (``None``: the config's own)."""
    from tasks.base import InputError
    if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
        raise InputError(f'data.batch_size={batch_size}: the images per batch (and process) must be at least 1')
    if num_workers is not None and num_workers < 0:
        raise InputError(f'data.num_workers={num_workers}: the loader processes must be 0 (load in the training '
                         'process) or more')


def check_full_batch(split: str, images: int, batch_size: int) -> None:
    """``InputError`` when ``split`` (named so in the message) holds fewer ``images`` than one
    batch on every process: a loader that drops an epoch's last incomplete batch would train on
    nothing."""
    from tasks.base import InputError
    processes = world()[0]
    if images < batch_size * processes:
        each = f' on each of {processes} processes' if processes > 1 else ''
        raise InputError(f'{split} has {images} images, fewer than one batch (batch_size={batch_size}{each}): '
                         f'set --data.batch_size {max(1, images // processes)} or less')


def absolute_root(root: Optional[str]) -> Optional[str]:
    """A dataset folder as an absolute path: checkpoints store it, and are used from other folders."""
    return None if root is None else os.path.abspath(os.path.expanduser(root))


def worker_args(num_workers: int, dataset: Dataset) -> Dict[str, Any]:
    """``DataLoader`` arguments for ``num_workers`` loader processes, started from a fork server
    where the platform has one (Python 3.14's default on Linux) instead of forked from the
    training process: that process runs threads (the progress bar's, the loggers', other
    loaders' queues, the process group's), and a fork taken while one of them holds a lock
    can hang the new worker for good (seen here: CPython 3.11's after-fork clean-up, under
    DDP). The server imports the dataset's modules once, so each worker starts in a fraction
    of a second; the dataset reaches it pickled."""
    if num_workers == 0 or 'forkserver' not in multiprocessing.get_all_start_methods():
        return dict(num_workers=num_workers)
    modules = {__name__}
    while dataset is not None:
        modules.add(type(dataset).__module__)
        dataset = getattr(dataset, 'dataset', None)
    multiprocessing.set_forkserver_preload(sorted(modules))  # used when the server starts
    return dict(num_workers=num_workers, multiprocessing_context='forkserver')


def world() -> Tuple[int, int]:
    """``(world_size, rank)`` of the default process group, ``(1, 0)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` in ``epoch``, independent for every triple."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@contextlib.contextmanager
def seeded_rngs(seed: int):
    """Python's, NumPy's and torch's (CPU) global generators seeded from ``seed`` inside the
    block, and put back as they were after it."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.default_generator.manual_seed(seed)  # the CPU one only: torch.manual_seed would reseed CUDA's too
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


class SeededDataset(Dataset):
    """``dataset`` indexed by ``(index, seed)`` pairs: item ``index``, read and augmented under
    global generators seeded with ``seed`` (:func:`seeded_rngs`)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]) -> Any:
        index, seed = key
        with seeded_rngs(seed):
            return self.dataset[index]


class ShuffledSampler(DistributedSampler):
    """This process's share of a seeded permutation per epoch, as ``(index, seed)`` pairs.

    ``DistributedSampler`` (shuffled, padded to a multiple of the processes) on the default
    process group, or on one process without one; ``seed`` is :func:`sample_seed` of the
    epoch and index. ``start`` skips that many indices of the next pass (a resumed epoch).
    """

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        num_replicas, rank = world()
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.start = 0

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        start, self.start = self.start, 0
        for index in itertools.islice(super().__iter__(), start, None):
            yield index, sample_seed(self.seed, self.epoch, index)


class ResumableLoader(DataLoader):
    """A shuffling training ``DataLoader`` that resumes mid-epoch.

    Args:
        dataset: Map-style dataset (indexed by position).
        batch_size: Per process.
        seed: Seeds the order and every sample's augmentation.
        drop_last: Drop the last incomplete batch of each process's share.
        **kwargs: Other ``DataLoader`` arguments (``num_workers``, ``collate_fn``, ...).

    ``state_dict()`` is the epoch and the number of batches handed out in it; after
    ``load_state_dict`` the next pass of that same epoch starts at the following batch
    (Lightning calls both, saving the state in its checkpoints).
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, drop_last: bool = True,
                 **kwargs: Any) -> None:
        for taken in ('shuffle', 'sampler', 'batch_sampler', 'generator'):
            if kwargs.pop(taken, None) not in (None, False):
                raise ValueError(f'ResumableLoader sets {taken} itself')
        # The loader's own generator: drawing the workers' base seed must not move the global
        # generator, which the training steps use (drop path, Mixup) and checkpoints restore.
        super().__init__(SeededDataset(dataset), batch_size=batch_size, sampler=ShuffledSampler(dataset, seed),
                         drop_last=drop_last, generator=torch.Generator().manual_seed(seed), **kwargs)
        self._handed_out = 0
        self._resume: Optional[Dict[str, int]] = None

    def __iter__(self) -> Iterator[Any]:
        # Started on the first batch, so that the epoch Lightning sets after iter() is used.
        resume, self._resume = self._resume, None
        skip = resume['batches'] if resume is not None and resume['epoch'] == self.sampler.epoch else 0
        self.sampler.start = skip * self.batch_size
        self._handed_out = skip
        for batch in super().__iter__():
            self._handed_out += 1
            yield batch

    def state_dict(self) -> Dict[str, int]:
        return {'epoch': int(self.sampler.epoch), 'batches': self._handed_out}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self._resume = {'epoch': int(state['epoch']), 'batches': int(state['batches'])}


def _ordered_share(dataset: Dataset):
    """Every ``world_size``-th index from this process's rank, without padding."""
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
    num_replicas, rank = world()
    if num_replicas == 1:
        return None
    return UnrepeatedDistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)


def eval_loader(dataset: Dataset, batch_size: int, **kwargs: Any) -> DataLoader:
    """An evaluation ``DataLoader``: dataset order; on several processes each takes its share
    without repeats (Lightning keeps a ``DistributedSampler`` it is given)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=_ordered_share(dataset),
                      generator=torch.Generator().manual_seed(0), **kwargs)


def gather_in_order(items: Sequence[Tuple[int, Any]], to_rank: Optional[int] = None) -> List[Any]:
    """``(dataset index, result)`` pairs of every process, as results in dataset order, one
    per index. Every process must call it; every process gets the whole list, or only
    process ``to_rank`` does (the others get ``[]``)."""
    num_replicas, rank = world()
    if num_replicas > 1:
        parts: List[Optional[Sequence]] = [None] * num_replicas
        if to_rank is None:
            dist.all_gather_object(parts, list(items))
        else:
            dist.gather_object(list(items), parts if rank == to_rank else None, dst=to_rank)
            if rank != to_rank:
                return []
        items = [item for part in parts for item in part]
    unique = dict(items)
    return [unique[index] for index in sorted(unique)]


def broadcast(value: Any, from_rank: int = 0) -> Any:
    """``value`` of process ``from_rank``, on every process (any picklable object)."""
    if world()[0] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=from_rank)
    return box[0]
