"""How fast could any token mixer make msmlp_tiny? Times the model with its mixer replaced
by a copy of its input (the channel MLP, stem, downsampling and head unchanged: a bound no
mixer implementation can pass) beside the fast, reference and (where it runs) triton paths and
convnext_tiny, inference and a training step, interleaved in one process. By default fp32 batch
16 at 224x224 on the CPU; any other option of ``msmlp benchmark`` (device, precision, batch,
size, channels-last) applies to every row.

    .venv/bin/python benchmarks/mixer_bound.py
    python3 benchmarks/mixer_bound.py --device cuda --precision bf16 --batch-size 128 --channels-last
"""
import contextlib
import statistics
import sys
import time
from unittest import mock

import timm
import torch

import msmlp  # noqa: F401  (registers msmlp_*)
from msmlp import benchmark, mixing


def measure(train: bool, options=(), runs: int = 5) -> dict:
    """Images/s per row: the rows' steps (``msmlp benchmark``'s) interleaved, each timed step
    right after an untimed one of the same row; run 0 only warms up."""
    torch.manual_seed(0)
    args = benchmark.parse_args((['--train'] if train else []) + list(options))  # default: batch 16, 224x224, fp32
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    msmlp_tiny, convnext = timm.create_model('msmlp_tiny'), timm.create_model('convnext_tiny')
    identity = mock.patch.object(mixing, 'mix_fast_nhwc', lambda x, block: x * 1.0)
    rows = {  # name: (model, mix_impl, patch)
        'fast': (msmlp_tiny, 'fast', None), 'reference': (msmlp_tiny, 'reference', None),
        'identity mixer': (msmlp_tiny, 'fast', identity), 'convnext_tiny': (convnext, None, None)}
    if mixing.triton_runs_on(device):
        rows['triton'] = (msmlp_tiny, 'triton', None)
    steps = {name: benchmark.make_step(model, args, device) for name, (model, _, _) in rows.items()}
    times = {name: [] for name in rows}
    for run in range(runs + 1):
        for name, (model, impl, patch) in rows.items():
            if impl:
                model.set_mix_impl(impl)
            with patch or contextlib.nullcontext():
                steps[name]()
                sync()
                start = time.perf_counter()
                steps[name]()
                sync()
                if run:
                    times[name].append(time.perf_counter() - start)
    return {name: args.batch_size / statistics.median(t) for name, t in times.items()}


def main(options=()) -> None:
    for train in (False, True):
        r = measure(train, options)
        if not train:
            names = [name for name in ('fast', 'triton', 'reference') if name in r]
            print(f"| msmlp_tiny {' '.join(options) or 'fp32, batch 16, 224x224'} | {' | '.join(names)} | "
                  'identity mixer (bound) | convnext_tiny | bound / reference | bound / convnext_tiny |')
            print('|---' * (len(names) + 5) + '|')
        print(f"| {'training step' if train else 'inference'} img/s | {' | '.join(f'{r[n]:.2f}' for n in names)} | "
              f"{r['identity mixer']:.2f} | {r['convnext_tiny']:.2f} | "
              f"{r['identity mixer'] / r['reference']:.2f} | {r['identity mixer'] / r['convnext_tiny']:.2f} |")


if __name__ == '__main__':
    main(sys.argv[1:])
