"""``msmlp benchmark``: throughput of MS-MLP's fast and reference paths and of timm models.

Every row is measured in this one process, the rows' timed runs interleaved (run 1 of
every row, then run 2 of every row, ...), so that the ratios hold even on a machine whose
load drifts. Images/s is the median over the timed runs, after warm-up steps.

    msmlp benchmark --model msmlp_tiny --batch-size 16 --img-size 224 --compare convnext_tiny
    msmlp benchmark --model msmlp_tiny --train --compare convnext_tiny swin_tiny
    msmlp benchmark --model msmlp_tiny --batch-size 1 --img-size 800x1333 --features-only
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['main', 'parse_args']

PRECISIONS = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def parse_img_size(text: str) -> Tuple[int, int]:
    """``'224'`` -> (224, 224); ``'800x1333'`` -> (800, 1333) (height x width)."""
    parts = text.lower().split('x')
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        sizes = ()
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f'--img-size must be N or HxW (e.g. 224 or 800x1333), got {text!r}')
    return sizes


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='msmlp benchmark',
        description='Images/s, GMACs, parameters and peak memory of MS-MLP (fast and reference paths) '
                    'and of timm models, measured in one process.')
    parser.add_argument('--model', default='msmlp_tiny', help='timm model name (default: msmlp_tiny)')
    parser.add_argument('--compare', nargs='*', default=[], metavar='MODEL',
                        help='timm models to compare with (a prefix such as swin_tiny picks the first match)')
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--img-size', type=parse_img_size, default=(224, 224), metavar='N|HxW')
    parser.add_argument('--train', action='store_true',
                        help='time a training step (forward, backward, AdamW) instead of inference')
    parser.add_argument('--features-only', action='store_true',
                        help="time the backbone (every feature level timm's features_only gives: an MS-MLP's or "
                             "ConvNeXt's 4 stages, a ResNet's 5) without the classifier")
    parser.add_argument('--compile', action='store_true', help='torch.compile every model')
    parser.add_argument('--channels-last', action='store_true', help='models and input in channels_last')
    parser.add_argument('--precision', choices=sorted(PRECISIONS), default='fp32',
                        help='fp32, or autocast to bf16/fp16')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--runs', type=int, default=5, help='timed runs per row (median reported)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps per row first')
    parser.add_argument('--steps-per-run', type=int, default=1, help='steps in one timed run')
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (CPU)')
    parser.add_argument('--no-reference', action='store_true', help='skip the reference-path row')
    parser.add_argument('--triton', action='store_true',
                        help="add rows with mix_impl='triton' (the Triton mixer: on a GPU, or under TRITON_INTERPRET=1) "
                             "and 'triton_norm' (the Triton mixer and the LayerNorm after it as one kernel)")
    parser.add_argument('--no-memory', action='store_true', help='skip the peak-memory measurement')
    parser.add_argument('--output', default=None, metavar='FILE', help='also append the table to FILE')
    args = parser.parse_args(argv)
    for name in ('batch_size', 'runs', 'steps_per_run'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be at least 1, got {getattr(args, name)}')
    if args.warmup < 0:
        parser.error(f'--warmup must be >= 0, got {args.warmup}')
    if args.compile and args.warmup == 0:
        parser.error('--compile needs --warmup 1 or more: the first step compiles, and would be timed')
    if args.threads is not None and args.threads < 1:
        parser.error(f'--threads must be at least 1, got {args.threads}')
    if args.output:
        try:  # now, not after the whole benchmark
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            open(args.output, 'a').close()
        except OSError as err:
            parser.error(f'--output {args.output}: {err.strerror}')
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f'--device {args.device!r} is not a torch device (cpu, cuda, cuda:1, ...)')
    if device.type == 'cuda' and (device.index or 0) >= torch.cuda.device_count():
        parser.error(f'--device {args.device}: {torch.cuda.device_count()} CUDA devices are visible here')
    return args


# ----- models --------------------------------------------------------------------------------
def resolve_model_name(name: str) -> str:
    """A timm model name; a prefix (``swin_tiny``) resolves to its first match."""
    import timm
    import msmlp  # noqa: F401  (registers msmlp_* with timm)
    if not name.strip():  # a prefix of every model: it resolved to timm's first, a 1.2B-parameter one
        raise SystemExit('msmlp benchmark: a model name is empty')
    if timm.is_model(name):
        return name
    matches = timm.list_models(f'{name}*')
    if not matches:
        raise SystemExit(f'msmlp benchmark: unknown timm model {name!r}')
    return matches[0]


def mix_owner(model: nn.Module) -> Optional[nn.Module]:
    """The MS-MLP inside ``model`` (which may be a timm features wrapper), if any."""
    return next((m for m in model.modules() if hasattr(m, 'set_mix_impl')), None)


def create_model(name: str, args: argparse.Namespace, mix_impl: Optional[str] = None) -> nn.Module:
    import timm
    kwargs = dict(features_only=True) if args.features_only else {}  # every level: ResNet's 5, MS-MLP's 4
    if mix_impl is not None:
        kwargs['mix_impl'] = mix_impl
    if tuple(args.img_size) != (224, 224) and not name.startswith('msmlp'):
        # fixed-size models (swin, vit) need their size; the others do not take the argument
        with contextlib.suppress(TypeError):
            return timm.create_model(name, img_size=args.img_size, **kwargs)
    return timm.create_model(name, **kwargs)


@dataclass
class Row:
    label: str
    name: str
    model: nn.Module
    step: Callable[[], None] = None
    params: float = 0.
    gmacs: float = math.nan
    executed_gmacs: float = math.nan
    peak_mb: float = math.nan
    times: List[float] = field(default_factory=list)
    error: str = ''

    @property
    def images_per_s(self) -> float:
        return statistics.median(self.times) if self.times else math.nan


def build_rows(args: argparse.Namespace) -> List[Row]:
    name = resolve_model_name(args.model)
    mixes = name.startswith(('msmlp', 'msswin'))  # its first row: the fast path (on a GPU the default is triton's)
    rows = [Row(f'{name} (fast)' if mixes else name, name, create_model(name, args, 'fast' if mixes else None))]
    if mix_owner(rows[0].model) is not None and getattr(args, 'triton', False):
        from msmlp.mixing import triton_runs_on
        if triton_runs_on(torch.device(args.device)):
            rows += [Row(f'{name} ({impl})', name, create_model(name, args, impl)) for impl in ('triton', 'triton_norm')]
        else:  # mix_impl='triton' would run the fast path: a row so labelled would time the wrong thing
            print(f'msmlp benchmark: no triton row: the Triton mixer runs on a CUDA device with triton, or on the '
                  f"CPU under TRITON_INTERPRET=1; on {args.device} mix_impl='triton' runs the fast path",
                  file=sys.stderr)
    if mix_owner(rows[0].model) is not None and not args.no_reference:
        rows.append(Row(f'{name} (reference)', name, create_model(name, args, 'reference')))
    for other in args.compare:
        other = resolve_model_name(other)
        rows.append(Row(other, other, create_model(other, args)))
    return rows


# ----- measuring ---------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _autocast(args: argparse.Namespace, device: torch.device):
    dtype = PRECISIONS[args.precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _loss(output) -> torch.Tensor:
    if isinstance(output, (list, tuple)):  # features: a stand-in loss reaching every stage
        return sum(o.float().mean() for o in output)
    return F.cross_entropy(output.float(), torch.zeros(output.shape[0], dtype=torch.long, device=output.device))


def make_step(model: nn.Module, args: argparse.Namespace, device: torch.device) -> Callable[[], None]:
    """One inference batch, or one training step (forward, backward, AdamW)."""
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    x = torch.randn(args.batch_size, 3, *args.img_size, device=device).contiguous(memory_format=memory_format)
    run = torch.compile(model) if args.compile else model
    if not args.train:
        model.eval()

        def infer():
            with torch.inference_mode(), _autocast(args, device):
                run(x)
        infer.resident_bytes = lambda: _tensor_bytes([x, *model.parameters(), *model.buffers()])
        return infer

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    scaler = torch.amp.GradScaler(device.type) if args.precision == 'fp16' else None

    def train_step():
        with _autocast(args, device):
            loss = _loss(run(x))
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
    train_step.resident_bytes = lambda: _tensor_bytes(
        [x, *model.parameters(), *model.buffers(), *(t for state in optimizer.state.values() for t in state.values())])
    return train_step


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def count_gmacs(model: nn.Module, args: argparse.Namespace, device: torch.device) -> float:
    """Multiply-accumulates per image of one forward (convs, matrix products), in billions."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(1, 3, *args.img_size, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() / 2 / 1e9


def measure_peak_mb(step: Callable[[], None], device: torch.device) -> float:
    """Peak bytes of live tensors (parameters, gradients, optimizer state, activations) over
    one step, in MiB; NaN where they cannot be tracked. On a GPU: what the step allocates beyond
    what was allocated before it, plus the step's own resident tensors (``step.resident_bytes``:
    its input, the model's weights and its optimizer's state), so that the other rows' models,
    on the same device, do not count."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before + step.resident_bytes()) / 2 ** 20
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:
        return math.nan
    from msmlp.model import eager_when_watched
    tracker = MemTracker()
    with eager_when_watched(), tracker:  # the fast path's own operations, not the released ones
        step()
    peaks = tracker.get_tracker_snapshot('peak')
    return max((v['Total'] for v in peaks.values()), default=math.nan) / 2 ** 20


def count_both_gmacs(row: Row, args: argparse.Namespace, device: torch.device) -> None:
    """The model's GMACs (an MS-MLP's counted on its reference path) and, for the eager fast
    path, those it executes: the kernels of groups sharing a conv are zero-padded to the
    largest among them (``mix_runs``), and a narrower last group is convolved over the width of
    the others (``mixing._run_rows``); the CPU kernel (float32) pads none. Compiled,
    both paths run the released operations."""
    from msmlp import cpu_kernel
    from msmlp.mixing import mix_runs
    from msmlp.msswin import MSSwinBlock
    owner = mix_owner(row.model)
    if owner is None:
        row.gmacs = row.executed_gmacs = count_gmacs(row.model, args, device)
        return
    impl = next(m.mix_impl for m in owner.modules() if hasattr(m, 'mix_impl'))
    zero_taps = []

    def count_zero_taps(block, inputs):
        # MS-Swin's blocks take Swin's (B, H, W, C) tokens, MS-MLP's (B, C, H, W) maps
        # per image, counted on one; the runs are those of the measured batch
        x = inputs[0]
        h, w = x.shape[1:3] if isinstance(block, MSSwinBlock) else x.shape[2:]
        sizes, kernels = block.group_sizes, block.mix_size
        runs = mix_runs(args.batch_size, h, w, x.device.type, sizes, kernels)
        # each group fills a slot of sizes[0] channels (the last, narrower group with zero kernels)
        zero_taps.append(2 * h * w * sum(sizes[0] * run.kernel ** 2 - sizes[g] * kernels[g] ** 2
                                         for run in runs for g in range(run.groups.start, run.groups.stop)))

    hooks = [m.register_forward_pre_hook(count_zero_taps) for m in owner.modules() if hasattr(m, 'mix_size')]
    owner.set_mix_impl('reference')
    try:
        row.gmacs = count_gmacs(row.model, args, device)
    finally:
        owner.set_mix_impl(impl)
        for hook in hooks:
            hook.remove()
    # the CPU kernel (float32, inference and training) runs every group at its own kernel size
    kernel = device.type == 'cpu' and args.precision == 'fp32' and cpu_kernel.available()
    padded = impl == 'fast' and not args.compile and not kernel
    row.executed_gmacs = row.gmacs + (sum(zero_taps) / 1e9 if padded else 0.)


def measure(rows: List[Row], args: argparse.Namespace, device: torch.device, log=print) -> None:
    for row in rows:
        try:
            row.params = sum(p.numel() for p in row.model.parameters()) / 1e6
            row.step = make_step(row.model, args, device)
            count_both_gmacs(row, args, device)
            log(f'warm-up: {row.label}' + (' (compiling in the first step)' if args.compile else ''), file=sys.stderr)
            for _ in range(args.warmup):
                row.step()
            if not args.no_memory:
                # on the CPU, kernels of a compiled model allocate out of the tracker's sight
                if not (args.compile and device.type == 'cpu'):
                    row.peak_mb = measure_peak_mb(row.step, device)
        except Exception as err:  # a compared model that cannot run this setting gets a row saying so
            row.error = f'{type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ""}'
            row.step = None
    live = [r for r in rows if r.step is not None]
    for run in range(args.runs):
        log(f'timed run {run + 1}/{args.runs}', file=sys.stderr)
        for row in live:
            _sync(device)
            start = time.perf_counter()
            for _ in range(args.steps_per_run):
                row.step()
            _sync(device)
            row.times.append(args.batch_size * args.steps_per_run / (time.perf_counter() - start))


# ----- report ------------------------------------------------------------------------------
def _fmt(value: float, spec: str) -> str:
    return '-' if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def format_table(rows: List[Row]) -> str:
    reference = next((r for r in rows if r.label.endswith('(reference)')), None)
    compared = [r for r in rows if r is not rows[0] and r is not reference]
    ratio_to = ([reference] if reference else []) + compared
    header = ['model', 'params (M)', 'GMACs', 'images/s', 'peak memory (MiB)'] + [
        f'x {r.label}' for r in ratio_to]
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for row in rows:
        if row.error:
            cells = [row.label, _fmt(row.params, '.2f'), _fmt(row.gmacs, '.2f'), f'failed: {row.error}', '-'] + [
                '-'] * len(ratio_to)
        else:
            cells = [row.label, _fmt(row.params, '.2f'), _fmt(row.gmacs, '.2f'), _fmt(row.images_per_s, '.2f'),
                     _fmt(row.peak_mb, '.0f')]
            cells += [_fmt(row.images_per_s / other.images_per_s, '.2f') if other.times else '-'
                      for other in ratio_to]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def describe_setting(args: argparse.Namespace, device: torch.device) -> str:
    mode = 'training step (forward, backward, AdamW)' if args.train else 'inference'
    what = 'backbone features (4 stages)' if args.features_only else 'classifier'
    h, w = args.img_size
    extras = [args.precision] + ['compiled' if args.compile else 'eager'] + (
        ['channels_last'] if args.channels_last else [])
    if device.type == 'cuda':
        machine = torch.cuda.get_device_name(device)
    else:
        from msmlp import cpu_kernel
        kernel = ('off (MSMLP_CPU_KERNEL=0)' if not cpu_kernel.enabled() else 'off (not built)' if not cpu_kernel.available()
                  else 'off (compiled: the released operations)' if args.compile
                  else f'off ({args.precision}: it runs float32)' if args.precision != 'fp32' else 'on')
        machine = f'{_cpu_name()}, {torch.get_num_threads()} threads, CPU mixer kernel {kernel}'
    return (f'{mode}, {what}, batch {args.batch_size} at {h}x{w}, {", ".join(extras)}; '
            f'median of {args.runs} runs after {args.warmup} warm-up steps; '
            f'{machine}; torch {torch.__version__}')


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    return platform.processor() or platform.machine()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
        # fp32 means fp32: cuDNN would run its convolutions in TF32 by default
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    rows = build_rows(args)
    measure(rows, args, device)
    report = '\n'.join([describe_setting(args, device), format_table(rows), *notes(rows, args)])
    print(report)
    if args.output:
        with open(args.output, 'a') as f:
            f.write(report + '\n\n')
    return 1 if any(r.error for r in rows) else 0


def notes(rows: List[Row], args: argparse.Namespace) -> List[str]:
    out = []
    fast = rows[0]
    if not math.isnan(fast.executed_gmacs) and not math.isclose(fast.executed_gmacs, fast.gmacs, rel_tol=1e-3):
        out.append(f"GMACs: the model's (an MS-MLP's counted on its reference path); the fast path executes "
                   f"{fast.executed_gmacs:.2f}, small kernels zero-padded where groups share a conv.")
    if not args.no_memory and any(math.isnan(r.peak_mb) for r in rows if not r.error):
        out.append('peak memory "-": not tracked here (compiled on the CPU, or torch without torch.distributed).')
    return out


if __name__ == '__main__':
    sys.exit(main())
