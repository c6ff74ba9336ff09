"""Before timing on a GPU: the fast, triton and triton_norm paths equal the reference path there
too (fp32, TF32 off), on outputs and gradients, and under bf16 autocast within bf16 precision; a forward
and backward captured in one CUDA graph replays what eager computes. With ``--compile``, instead:
each path compiled by torch.compile's default backend (inductor, one graph) gives the reference
outputs and gradients, on msmlp_tiny's widths with one block a stage (compiling takes minutes).

    python3 benchmarks/gpu_check.py [--device cuda] [--compile]
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


def captured_outputs_and_grads(model, impl, x, grad):
    """``outputs_and_grads`` through a CUDA graph: warmed up on a side stream (triton tunes and
    compiles there), captured with fresh gradients, replayed on ``x``."""
    model.set_mix_impl(impl)
    static_x = torch.zeros_like(x, requires_grad=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            model.zero_grad()
            (model(static_x).float() * grad).sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    model.zero_grad()
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = model(static_x)
        (static_out.float() * grad).sum().backward()
    with torch.no_grad():
        static_x.copy_(x)
    graph.replay()
    torch.cuda.synchronize()
    return [t.detach().float().clone() for t in [static_out, static_x.grad] + [p.grad for p in model.parameters()]]


def compiled_outputs_and_grads(model, impl, x, grad):
    """``outputs_and_grads`` of ``model`` compiled by inductor as one graph (no graph breaks)."""
    torch._dynamo.reset()
    return outputs_and_grads(torch.compile(model, fullgraph=True), impl, x, grad)


def relative_error(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1)).item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--compile', action='store_true', help='check the paths compiled by inductor instead')
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    depths = dict(depths=(1, 1, 1, 1)) if args.compile else {}
    model = timm.create_model('msmlp_tiny', num_classes=10, **depths).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    x = torch.randn(4, 3, 96, 160, device=device)
    grad = torch.randn(4, 10, device=device)
    from msmlp.mixing import triton_runs
    ref = outputs_and_grads(model, 'reference', x, grad)
    impls = ['fast'] + (['triton', 'triton_norm'] if triton_runs(x) else [])
    if args.compile:
        return check_compiled(model, impls, x, grad, ref)
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
    for impl in impls if device.type == 'cuda' else ():
        ok = reported(f'{impl} under a CUDA graph (forward and backward captured, replayed on new input) vs eager',
                      lambda: (captured_outputs_and_grads(model, impl, x, grad), outputs_and_grads(model, impl, x, grad)),
                      bound=1e-6) and ok
    if 'triton' not in impls:
        print('triton: does not run here (no triton, or not a GPU)')
    return 0 if ok else 1


def check_compiled(model, impls, x, grad, ref) -> int:
    ok = True
    for impl in impls:
        ok = reported(f'{impl} compiled (inductor, fullgraph) vs reference eager',
                      lambda: (compiled_outputs_and_grads(model, impl, x, grad), ref), bound=1e-4) and ok
    return 0 if ok else 1


def reported(label: str, compared, bound: float) -> bool:
    """Print ``label``'s worst relative difference between the two lists of tensors that
    ``compared()`` returns, or the error it raised (the other checks go on); whether within ``bound``."""
    try:
        worst = max(relative_error(f, r) for f, r in zip(*compared()))
    except Exception as err:  # noqa: BLE001  (the report names it)
        worst, result = float('inf'), f'{type(err).__name__}: {err}'.splitlines()[0]
    else:
        bound_text = f'{bound:.0e}'.replace('e-0', 'e-')
        result = f'worst relative difference {worst:.2e} over outputs and all gradients (bound {bound_text})'
    print(f'{label}: {result}: {"OK" if worst <= bound else "MISMATCH"}')
    return worst <= bound


if __name__ == '__main__':
    sys.exit(main())
