"""Where a training step's GPU time goes, kernel by kernel: msmlp_tiny on the triton path (its
three mixer kernels) against convnext_tiny (its depthwise convolutions), bf16 autocast,
channels-last, measured with torch.profiler's CUDA activity; then the tile the autotuner chose
for each map size. For the GPU run of benchmarks/gpu_bench.sh.

    python3 benchmarks/triton_kernels.py [--batch-size 128] [--img-size 224] [--steps 5]
"""
import argparse
import collections
import sys

import torch

import msmlp  # noqa: F401  (registers msmlp_* with timm)
import timm


def step(model, x, optimizer):
    with torch.autocast('cuda', dtype=torch.bfloat16):
        loss = model(x).float().square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def kernel_times(model, x, steps: int):
    """Milliseconds per step of each CUDA kernel, by name, after warm-up (triton tunes there)."""
    optimizer = torch.optim.AdamW(model.parameters())
    for _ in range(3):
        step(model, x, optimizer)
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(steps):
            step(model, x, optimizer)
        torch.cuda.synchronize()
    times = collections.Counter()
    for event in profile.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.name] += event.time_range.elapsed_us() / 1000 / steps
    return times


# What fusing the mixer with the LayerNorm after it, or with the residual add, could save at most
# (issue 10: fuse where it measures faster): those kernels' whole time.
FUSION_BOUNDS = [
    ('layer norms, forward and backward', lambda k: 'layer_norm' in k or 'gammabeta' in k),
    ('elementwise (adds, casts, copies, GELU)', lambda k: 'elementwise' in k and 'layer_norm' not in k),
]


def report(name, times, patterns):
    total = sum(times.values())
    print(f'{name}: {total:.2f} ms of GPU kernels a step')
    for label, match in patterns:
        chosen = {k: v for k, v in times.items() if match(k.lower())}
        print(f'  {label}: {sum(chosen.values()):.2f} ms ({100 * sum(chosen.values()) / max(total, 1e-9):.0f}%) '
              f'in {len(chosen)} kernels')
    for kernel, ms in times.most_common(8):
        print(f'    {ms:7.3f} ms  {kernel[:100]}')


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--steps', type=int, default=5)
    args = parser.parse_args(argv)
    from msmlp import triton_mix
    if not torch.cuda.is_available() or not triton_mix.available():
        print('triton_kernels: needs a CUDA GPU and triton; skipped')
        return 0
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device='cuda')
    x = x.contiguous(memory_format=torch.channels_last)
    print(f'# training step kernels, batch {args.batch_size}, {args.img_size}x{args.img_size}, bf16 autocast, '
          f'channels-last, {torch.cuda.get_device_name()}, torch {torch.__version__}, triton '
          f'{triton_mix.triton.__version__}')
    msmlp_model = timm.create_model('msmlp_tiny', mix_impl='triton').cuda().to(memory_format=torch.channels_last)
    report('msmlp_tiny (triton)', kernel_times(msmlp_model, x, args.steps),
           [('mixer forward and input gradient', lambda k: k.startswith('_mix_kernel')),
            ('mixer weight gradient', lambda k: k.startswith('_weight_grad_kernel')),
            ('convolutions (stem, downsamplings)', lambda k: 'conv' in k), *FUSION_BOUNDS])
    convnext = timm.create_model('convnext_tiny').cuda().to(memory_format=torch.channels_last)
    report('convnext_tiny', kernel_times(convnext, x, args.steps),
           [('convolutions (18 depthwise 7x7, stem, downsamplings)', lambda k: 'conv' in k), *FUSION_BOUNDS])
    for name, tuner in (('mixer', triton_mix._mix_kernel_tuned), ('weight gradient', triton_mix._weight_grad_kernel_tuned)):
        for key, config in sorted(tuner.cache.items(), key=str):
            print(f'{name} tile for {key}: {config}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
