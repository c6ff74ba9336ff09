"""tasks.loading: training batches that resume mid-epoch and do not depend on the workers;
evaluation that sees every sample once and results gathered in dataset order."""
import os
import random
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Dataset

from tasks.loading import (ResumableLoader, ShuffledSampler, eval_loader, gather_in_order, sample_seed,
                           seeded_rngs, worker_args)


class RandomItems(Dataset):
    """Item i: its index and one draw from each of Python's, NumPy's and torch's global
    generators (what an augmentation would draw)."""

    def __len__(self):
        return 37

    def __getitem__(self, index):
        return torch.tensor([float(index), random.random(), float(np.random.rand()), float(torch.rand(()))])


def batches(loader, count=None):
    out = []
    for batch in loader:
        out.append(batch)
        if count is not None and len(out) == count:
            break
    return out


def epochs(workers, seed=0, epochs_=(0, 1)):
    loader = ResumableLoader(RandomItems(), batch_size=4, seed=seed, num_workers=workers)
    result = []
    for epoch in epochs_:
        loader.sampler.set_epoch(epoch)
        result.append(batches(loader))
    return result


@pytest.mark.parametrize('workers', [0, 2])
def test_a_resumed_epoch_continues_with_the_same_batches(workers):
    uninterrupted = epochs(workers)[1]
    first = ResumableLoader(RandomItems(), batch_size=4, seed=0, num_workers=workers)
    first.sampler.set_epoch(1)
    seen = batches(first, count=3)
    state = first.state_dict()
    assert state == {'epoch': 1, 'batches': 3}

    resumed = ResumableLoader(RandomItems(), batch_size=4, seed=0, num_workers=workers)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)
    rest = batches(resumed)
    assert len(rest) == len(uninterrupted) - 3 == 6  # 37 samples, batches of 4, the last one dropped
    assert all(torch.equal(a, b) for a, b in zip(seen + rest, uninterrupted, strict=True))
    assert resumed.state_dict() == {'epoch': 1, 'batches': 9}


class ParentProcesses(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        return os.getppid()


def test_loader_workers_are_not_forked_from_the_training_process():
    # the training process runs threads: a fork taken while one holds a lock can hang the worker
    dataset = ParentProcesses()
    parents = {int(batch) for batch in DataLoader(dataset, batch_size=1, **worker_args(2, dataset))}
    assert len(parents) == 1 and os.getpid() not in parents
    assert worker_args(0, dataset) == {'num_workers': 0}


def test_a_state_saved_at_the_end_of_an_epoch_starts_the_next_one_whole():
    loader = ResumableLoader(RandomItems(), batch_size=4, seed=0)
    loader.load_state_dict({'epoch': 0, 'batches': 9})
    loader.sampler.set_epoch(1)  # Lightning moves on to the next epoch
    first = batches(loader)
    assert len(first) == 9
    assert all(torch.equal(a, b) for a, b in zip(first, epochs(0)[1], strict=True))


def test_samples_and_augmentations_do_not_depend_on_the_workers_or_the_global_generators():
    torch.manual_seed(123)
    state = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    main = epochs(0)
    assert torch.equal(torch.get_rng_state(), state[0])  # loading in this process moved no global generator
    assert np.array_equal(np.random.get_state()[1], state[1]) and random.getstate() == state[2]
    torch.manual_seed(7)  # another global state: same batches
    assert all(torch.equal(a, b) for epoch_a, epoch_b in zip(main, epochs(2), strict=True)
               for a, b in zip(epoch_a, epoch_b, strict=True))
    first, second = torch.cat(main[0]), torch.cat(main[1])
    assert sorted(first[:, 0].tolist()) != first[:, 0].tolist()  # shuffled
    assert not torch.equal(first[:, 0], second[:, 0])  # another order each epoch
    # the same sample is augmented differently in another epoch, and differently from other samples
    by_index = {int(row[0]): row[1:] for row in first}
    again = {int(row[0]): row[1:] for row in second}
    common = sorted(set(by_index) & set(again))
    assert all(not torch.equal(by_index[i], again[i]) for i in common)
    assert len({tuple(v.tolist()) for v in by_index.values()}) == len(by_index)


def test_another_seed_gives_another_order():
    assert not torch.equal(torch.cat(epochs(0, seed=0)[0]), torch.cat(epochs(0, seed=1)[0]))


def test_seeded_rngs_seed_and_restore():
    random.seed(5)
    before = random.random()
    random.seed(5)
    with seeded_rngs(sample_seed(0, 0, 3)):
        inside = random.random(), float(np.random.rand()), float(torch.rand(()))
    assert random.random() == before  # put back
    with seeded_rngs(sample_seed(0, 0, 3)):
        assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == inside
    assert sample_seed(0, 0, 3) != sample_seed(0, 1, 3) != sample_seed(1, 0, 3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _two_processes(rank, port, results):
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
    try:
        dataset = list(range(11))  # odd: DistributedSampler would repeat one sample
        seen = [int(i) for batch in eval_loader(dataset, batch_size=4) for i in batch]
        gathered = gather_in_order([(i, f'result {i}') for i in seen])
        to_first = gather_in_order([(i, i * i) for i in seen], to_rank=0)
        shuffled = [index for index, _ in ShuffledSampler(dataset, seed=3)]
        results[rank] = (seen, gathered, to_first, shuffled)
    finally:
        dist.destroy_process_group()


def test_evaluation_shares_and_gathering_over_two_processes():
    results = mp.Manager().dict()
    mp.spawn(_two_processes, args=(_free_port(), results), nprocs=2)
    (seen0, gathered0, first0, shuffled0), (seen1, gathered1, first1, shuffled1) = results[0], results[1]
    assert seen0 == [0, 2, 4, 6, 8, 10] and seen1 == [1, 3, 5, 7, 9]  # every sample once, no repeat
    assert gathered0 == gathered1 == [f'result {i}' for i in range(11)]
    assert first0 == [i * i for i in range(11)] and first1 == []
    assert len(shuffled0) == len(shuffled1) == 6 and set(shuffled0) | set(shuffled1) == set(range(11))
