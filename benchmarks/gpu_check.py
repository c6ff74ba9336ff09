"""Before timing on a GPU: the fast path equals the reference path there too (fp32, TF32 off),
on outputs and gradients, and under bf16 autocast within bf16 precision.

    python3 benchmarks/gpu_check.py [--device cuda]
"""
import argparse
import sys

import torch

import msmlp  # noqa: F401  (registers msmlp_* with timm)
import timm


def outputs_and_grads(model, impl, x, grad):
    model.set_mix_impl(impl)
    model.zero_grad()
    x = x.detach().requires_grad_()
    out = model(x)
    (out.float() * grad).sum().backward()
    return [out.detach().float(), x.grad.float()] + [p.grad.float() for p in model.parameters()]


def relative_error(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1)).item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument('--device', default='cuda')
    device = torch.device(parser.parse_args(argv).device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = timm.create_model('msmlp_tiny', num_classes=10).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    x = torch.randn(4, 3, 96, 160, device=device)
    grad = torch.randn(4, 10, device=device)
    from msmlp.mixing import triton_runs
    ref = outputs_and_grads(model, 'reference', x, grad)
    impls = ['fast'] + (['triton'] if triton_runs(x) else [])
    ok = True
    for impl in impls:
        ours = outputs_and_grads(model, impl, x, grad)
        worst = max(relative_error(f, r) for f, r in zip(ours, ref))
        with torch.autocast(device.type, dtype=torch.bfloat16):
            bf16 = outputs_and_grads(model, impl, x, grad)
        bf16_error = relative_error(bf16[0], ref[0])
        good = worst <= 1e-5 and bf16_error <= 5e-2
        ok = ok and good
        print(f'{impl} vs reference on {device} ({torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}): '
              f'fp32 worst relative difference {worst:.2e} over outputs and all gradients (bound 1e-5); '
              f'bf16 autocast output {bf16_error:.2e} (bound 5e-2): {"OK" if good else "MISMATCH"}')
    if 'triton' not in impls:
        print('triton: does not run here (no triton, or not a GPU)')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
