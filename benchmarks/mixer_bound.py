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
import torch.nn.functional as F

import msmlp  # noqa: F401  (registers msmlp_*)
from msmlp import mixing


def step_fn(model, x, train: bool):
    if not train:
        def infer():
            with torch.no_grad():
                model(x)
        return infer
    target = torch.randint(0, 1000, (x.shape[0],))
    optimizer = torch.optim.AdamW(model.parameters())

    def step():
        optimizer.zero_grad()
        F.cross_entropy(model(x), target).backward()
        optimizer.step()
    return step


def measure(train: bool, runs: int = 5) -> dict:
    torch.manual_seed(0)
    x = torch.randn(16, 3, 224, 224)
    msmlp_tiny, convnext = timm.create_model('msmlp_tiny'), timm.create_model('convnext_tiny')
    identity = mock.patch.object(mixing, 'mix_fast_nhwc', lambda x, block: x * 1.0)
    rows = {  # name: (model, mix_impl, patch)
        'fast': (msmlp_tiny, 'fast', None), 'reference': (msmlp_tiny, 'reference', None),
        'identity mixer': (msmlp_tiny, 'fast', identity), 'convnext_tiny': (convnext, None, None)}
    times = {name: [] for name in rows}
    for run in range(runs + 1):  # run 0 warms up
        for name, (model, impl, patch) in rows.items():
            if impl:
                model.set_mix_impl(impl)
            model.train(train)
            with patch or contextlib.nullcontext():
                step = step_fn(model, x, train)
                step()
                start = time.perf_counter()
                step()
                if run:
                    times[name].append(time.perf_counter() - start)
    return {name: x.shape[0] / statistics.median(t) for name, t in times.items()}


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
