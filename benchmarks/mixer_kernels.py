"""The Triton mixer's kernels timed alone, per stage of msmlp_tiny, against another version of
msmlp/triton_mix.py (a file: e.g. ``git show REV:msmlp/triton_mix.py > old.py``), in one
process on one GPU, interleaved: forward, input gradient and weight gradient at a training
step's maps (batch 128, 224x224; stage 0's map is fp32 under autocast, the others bf16), and
the forward at detection size (batch 2, 800x1333). Milliseconds per step (per block times the
stage's depth), by triton.testing.do_bench.

    python3 benchmarks/mixer_kernels.py --against old_triton_mix.py

Then (also without ``--against``) the mixer fused with the LayerNorm after it, against the mixer
kernel followed by the norm and against ConvNeXt's 7x7 depthwise conv followed by the norm, per
stage (inference).
    python3 benchmarks/mixer_kernels.py --work   # the share of tap work each channel block wastes (no GPU)
"""
import argparse
import importlib.util
import sys
from pathlib import Path

import torch

from msmlp import triton_mix
from msmlp.model import MIX_SIZES, SHIFT_DIST, VARIANT_ARCHS, channel_groups

TINY = VARIANT_ARCHS['msmlp_tiny']


def load_version(path: str):
    """``path`` as a module of its own, its operators renamed so that they register beside ours."""
    source = Path(path).read_text().replace("'msmlp::", "'msmlp_against::")
    file = Path('/tmp') / 'triton_mix_against.py'  # triton's jit reads the kernels' source from a file
    file.write_text(source)
    spec = importlib.util.spec_from_file_location('triton_mix_against', file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def stage_cases(batch: int, height: int, width: int):
    """Per stage: its map (N, H, W, C), input dtype, kernels, and depth."""
    h, w = height // 4, width // 4
    for stage, (kernels, depth) in enumerate(zip(MIX_SIZES, TINY['depths'])):
        c = TINY['embed_dim'] * 2 ** stage
        yield stage, (batch, h, w, c), torch.float32 if stage == 0 else torch.bfloat16, kernels, depth
        h, w = h // 2, w // 2


def kernel_calls(module, shape, dtype, kernels, device='cuda'):
    """The three launches of one block's mixer, as argument-free callables."""
    n, h, w, c = shape
    groups = channel_groups(c)
    x = torch.randn(shape, device=device, dtype=dtype)
    grad = torch.randn(shape, device=device, dtype=torch.bfloat16)
    weights = [torch.randn(g, 1, k, k, device=device) for g, k in zip(groups, kernels)] * 2
    bias = torch.randn(2 * c, device=device)
    weight = module._pack(weights, kernels, groups)
    layout = (SHIFT_DIST, kernels, groups)
    grad = grad.to(dtype)  # the mixer's output, and so its gradient, is in x's dtype
    return {
        'forward': lambda: module._launch_mix(x, weight, bias, dtype, *layout, adjoint=False),
        'input grad': lambda: module._launch_mix(grad, weight, None, dtype, *layout, adjoint=True),
        'weight grad': lambda: module._launch_weight_grad(grad, x, *layout),
    }


def norm_calls(shape, dtype, kernels, device='cuda'):
    """A block's mixer and the LayerNorm after it, inference under bf16 autocast (out in bf16,
    as the next linear layer takes it): as one kernel, as the mixer kernel then the norm and the
    cast, and ConvNeXt's token mixer (cuDNN's 7x7 depthwise conv, channels-last) then the same."""
    n, h, w, c = shape
    groups = channel_groups(c)
    x = torch.randn(shape, device=device, dtype=dtype)
    weights = [torch.randn(g, 1, k, k, device=device) for g, k in zip(groups, kernels)] * 2
    bias = torch.randn(2 * c, device=device)
    norm = torch.ones(c, device=device), torch.zeros(c, device=device)
    weight = triton_mix._pack(weights, kernels, groups)
    layout = (SHIFT_DIST, kernels, groups)
    conv_weight = torch.randn(c, 1, 7, 7, device=device)
    x_nchw = x.permute(0, 3, 1, 2)  # channels-last memory

    def normed(mixed):
        return torch.nn.functional.layer_norm(mixed.float(), (c,), *norm, 1e-6).to(torch.bfloat16)

    def convnext():
        with torch.autocast(device, dtype=torch.bfloat16):  # the conv casts stage 0's fp32 map to bf16
            mixed = torch.nn.functional.conv2d(x_nchw, conv_weight, padding=3, groups=c)
        return normed(mixed.permute(0, 2, 3, 1))
    return {
        'fused': lambda: triton_mix._launch_mix_norm(x, weight, bias, *norm, 1e-6, torch.bfloat16, *layout, False),
        'separate': lambda: normed(triton_mix._launch_mix(x, weight, bias, dtype, *layout, adjoint=False)),
        'convnext': convnext,
    }


def tap_work(block_c: int, by_group: bool) -> float:
    """The share of msmlp_tiny's mixer work (channel taps over the batch's pixels, every block)
    that is wasted by ``block_c``-channel programs: taking a block's groups over all its channels
    (``by_group=False``, the kernels before 2026-12-04), or a group's channels from the vector
    holding its first (``by_group=True``)."""
    useful = done = 0
    for _, (_, h, w, c), _, kernels, depth in stage_cases(1, 224, 224):
        groups = channel_groups(c)
        ends = [sum(groups[:i + 1]) for i in range(len(groups))]
        spans = list(zip([e - g for e, g in zip(ends, groups)], ends, kernels))
        taps = 0
        if by_group:
            for start, end, k in spans:
                taps += sum(k * k * min(block_c, c - c0) for c0 in range(start // 8 * 8, end, block_c))
        else:
            for c0 in range(0, c, block_c):
                taps += sum(k * k * (min(c, c0 + block_c) - c0)
                            for start, end, k in spans if start < c0 + block_c and end > c0)
        useful += h * w * depth * sum(k * k * (end - start) for start, end, k in spans)
        done += h * w * depth * taps
    return 1 - useful / done


def time_versions(versions, path: str, do_bench) -> None:
    """Each kernel of ours against ``versions['against']`` (from ``path``), per stage and in total."""
    print(f'# mixer kernels, ms per step of msmlp_tiny: this tree vs {path}, {torch.cuda.get_device_name()}')
    for label, (batch, height, width), passes in (('training, 128x224x224', (128, 224, 224), None),
                                                  ('features, 2x800x1333', (2, 800, 1333), ('forward',))):
        totals = {name: {} for name in versions}
        for stage, shape, dtype, kernels, depth in stage_cases(batch, height, width):
            calls = {name: kernel_calls(module, shape, dtype, kernels) for name, module in versions.items()}
            for kernel in passes or calls['ours']:
                times = {name: depth * do_bench(calls[name][kernel]) for name in versions}
                times = {name: min(t, depth * do_bench(calls[name][kernel])) for name, t in times.items()}
                for name, t in times.items():
                    totals[name][kernel] = totals[name].get(kernel, 0.) + t
                line = (f'{label} stage {stage} {shape} {kernel}: ours {times["ours"]:.3f} ms, '
                        f'against {times["against"]:.3f} ms ({times["against"] / times["ours"]:.2f}x)')
                if dtype != torch.bfloat16:  # what the kernels would take on a bf16 copy of the map
                    as_bf16 = kernel_calls(triton_mix, shape, torch.bfloat16, kernels)[kernel]
                    line += f'; ours with a bf16 map {depth * min(do_bench(as_bf16), do_bench(as_bf16)):.3f} ms'
                print(line, flush=True)
        for kernel, ours in totals['ours'].items():
            theirs = totals['against'][kernel]
            print(f'{label} total {kernel}: ours {ours:.3f} ms, against {theirs:.3f} ms ({theirs / ours:.2f}x)')


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument('--against', help='another msmlp/triton_mix.py to time the kernels against')
    parser.add_argument('--dry-run', action='store_true', help='each launch once on small CPU maps (TRITON_INTERPRET=1)')
    parser.add_argument('--work', action='store_true',
                        help='print the share of tap work wasted per channel block')
    args = parser.parse_args(argv)
    if args.work:
        for block_c in (8, 16, 32, 64):
            print(f'{block_c}-channel blocks waste {100 * tap_work(block_c, False):.0f}% of the taps taking every '
                  f'group a block overlaps, {100 * tap_work(block_c, True):.0f}% taking one group a block')
        return 0
    against = load_version(args.against) if args.against else None
    if args.dry_run:
        for module in (triton_mix, against) if against else (triton_mix,):
            for _, shape, dtype, kernels, _ in stage_cases(2, 32, 40):
                for call in kernel_calls(module, shape, dtype, kernels, 'cpu').values():
                    call()
        for _, shape, dtype, kernels, _ in stage_cases(2, 32, 40):
            for call in norm_calls(shape, dtype, kernels, 'cpu').values():
                call()
        print('mixer_kernels: dry run passed')
        return 0
    if not torch.cuda.is_available():
        print('mixer_kernels: needs a CUDA GPU; skipped')
        return 0
    from triton.testing import do_bench
    if against:
        time_versions({'ours': triton_mix, 'against': against}, args.against, do_bench)
    print('# mixer and LayerNorm, inference under bf16 autocast, batch 128 at 224x224, ms per step: '
          'one kernel | the mixer kernel, then the norm | convnext_tiny\'s dwconv, then the norm')
    totals = {}
    for stage, shape, dtype, kernels, depth in stage_cases(128, 224, 224):
        calls = norm_calls(shape, dtype, kernels)
        times = {name: depth * min(do_bench(call), do_bench(call)) for name, call in calls.items()}
        totals = {name: totals.get(name, 0.) + t for name, t in times.items()}
        print(f'stage {stage} {shape}: ' + ' | '.join(f'{name} {t:.3f}' for name, t in times.items()), flush=True)
    print('total: ' + ' | '.join(f'{name} {t:.3f}' for name, t in totals.items()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
