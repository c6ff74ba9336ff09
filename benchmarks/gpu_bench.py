"""One prepared GPU check (issue 5, point 4): msmlp_tiny (fast and reference paths) vs timm
convnext_tiny, batch 128, 224x224, bf16 autocast, inference and training step (fwd+bwd+AdamW),
plus a fast-vs-reference agreement check on the GPU in fp32.

    PYTHONPATH=. python3 benchmarks/gpu_bench.py [--batch-size 128] [--steps 20]

Prints a markdown table and writes it to $OUT/gpu_table.md when OUT is set.
"""
import argparse
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import timm  # noqa: E402
import msmlp  # noqa: E402,F401  (registers msmlp_tiny)


def timed(fn, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def measure(name: str, make, batch: int, steps: int, train: bool) -> dict:
    torch.manual_seed(0)
    model = make().cuda()
    x = torch.randn(batch, 3, 224, 224, device='cuda')
    y = torch.randint(0, 1000, (batch,), device='cuda')
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    if train:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            with torch.autocast('cuda', dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        model.eval()

        @torch.no_grad()
        def step():
            with torch.autocast('cuda', dtype=torch.bfloat16):
                model(x)
    seconds = timed(step, steps, warmup=5)
    return dict(model=name, mode='train' if train else 'infer', img_s=batch / seconds,
                mem_gib=torch.cuda.max_memory_allocated() / 2**30)


def agreement() -> float:
    torch.manual_seed(0)
    model = timm.create_model('msmlp_tiny').cuda().eval()
    for block in model.modules():  # randomize layer scale so the mixing is visible
        if hasattr(block, 'gamma'):
            block.gamma.data.normal_(0, 0.3)
    x = torch.randn(4, 3, 224, 224, device='cuda')
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        model.set_mix_impl('fast')
        fast = model.forward_features(x)
        model.set_mix_impl('reference')
        ref = model.forward_features(x)
    return ((fast - ref).abs().max() / ref.abs().max()).item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--steps', type=int, default=20)
    args = parser.parse_args()
    print(f'device: {torch.cuda.get_device_name()}, torch {torch.__version__}, timm {timm.__version__}')
    print(f'fast vs reference (fp32, no TF32), max |diff| / max |ref| on stage-3 features: {agreement():.2e}')
    torch.backends.cudnn.benchmark = True

    def msmlp_tiny(impl):
        def make():
            model = timm.create_model('msmlp_tiny')
            model.set_mix_impl(impl)
            return model
        return make

    makers = {'msmlp_tiny (fast)': msmlp_tiny('fast'), 'msmlp_tiny (reference)': msmlp_tiny('reference'),
              'convnext_tiny': lambda: timm.create_model('convnext_tiny')}
    rows = [measure(name, make, args.batch_size, args.steps, train)
            for train in (False, True) for name, make in makers.items()]
    base = {(r['mode'], r['model']): r['img_s'] for r in rows}
    lines = [f'| model | mode | img/s | vs reference | vs convnext_tiny | peak GiB |', '|---|---|---|---|---|---|']
    for r in rows:
        lines.append(f"| {r['model']} | {r['mode']} | {r['img_s']:.0f} | "
                     f"{r['img_s'] / base[(r['mode'], 'msmlp_tiny (reference)')]:.2f}x | "
                     f"{r['img_s'] / base[(r['mode'], 'convnext_tiny')]:.2f}x | {r['mem_gib']:.1f} |")
    table = '\n'.join(lines)
    print(f'batch {args.batch_size}, 224x224, bf16 autocast, median of {args.steps} steps after 5 warm-up')
    print(table)
    if os.environ.get('OUT'):
        Path(os.environ['OUT'], 'gpu_table.md').write_text(table + '\n')


if __name__ == '__main__':
    main()
