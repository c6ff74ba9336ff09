"""How fast could any token mixer make msmlp_tiny? Times the model with its mixer replaced
by a copy of its input (the channel MLP, stem, downsampling and head unchanged: a bound no
mixer implementation can pass) beside the fast and reference paths and convnext_tiny, fp32
batch 16 at 224x224, inference and a training step, interleaved in one process.

    .venv/bin/python benchmarks/mixer_bound.py
"""
import contextlib
import statistics
import time
from unittest import mock

import timm
import torch

import msmlp  # noqa: F401  (registers msmlp_*)
from msmlp import benchmark, mixing


def measure(train: bool, runs: int = 5) -> dict:
    """Images/s per row: the rows' steps (``msmlp benchmark``'s) interleaved, each timed step
    right after an untimed one of the same row; run 0 only warms up."""
    torch.manual_seed(0)
    args = benchmark.parse_args(['--train'] if train else [])  # batch 16, 224x224, fp32
    device = torch.device(args.device)
    msmlp_tiny, convnext = timm.create_model('msmlp_tiny'), timm.create_model('convnext_tiny')
    identity = mock.patch.object(mixing, 'mix_fast_nhwc', lambda x, block: x * 1.0)
    rows = {  # name: (model, mix_impl, patch)
        'fast': (msmlp_tiny, 'fast', None), 'reference': (msmlp_tiny, 'reference', None),
        'identity mixer': (msmlp_tiny, 'fast', identity), 'convnext_tiny': (convnext, None, None)}
    steps = {name: benchmark.make_step(model, args, device) for name, (model, _, _) in rows.items()}
    times = {name: [] for name in rows}
    for run in range(runs + 1):
        for name, (model, impl, patch) in rows.items():
            if impl:
                model.set_mix_impl(impl)
            with patch or contextlib.nullcontext():
                steps[name]()
                start = time.perf_counter()
                steps[name]()
                if run:
                    times[name].append(time.perf_counter() - start)
    return {name: args.batch_size / statistics.median(t) for name, t in times.items()}


def main() -> None:
    print('| msmlp_tiny, fp32, batch 16, 224x224 | fast | reference | identity mixer (bound) | convnext_tiny |'
          ' bound / reference | bound / convnext_tiny |')
    print('|---|---|---|---|---|---|---|')
    for train in (False, True):
        r = measure(train)
        print(f"| {'training step' if train else 'inference'} img/s | {r['fast']:.2f} | {r['reference']:.2f} | "
              f"{r['identity mixer']:.2f} | {r['convnext_tiny']:.2f} | "
              f"{r['identity mixer'] / r['reference']:.2f} | {r['identity mixer'] / r['convnext_tiny']:.2f} |")


if __name__ == '__main__':
    main()
