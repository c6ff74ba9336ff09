"""Shift-mix token mixing of an MS-MLP block, in two implementations of one function.

The released block splits channels into groups with ``torch.chunk``, rolls group g
circularly by ``shift_dist[g]`` along W (branch ``lr``) and along H (branch ``td``),
applies a depthwise conv of kernel ``mix_size[g]`` per group and branch, and adds the
two branches. ``reference`` does exactly that, in NCHW, as released (ten rolls, ten
convs, two concatenations per block). ``fast`` computes the same function channels-last
(NHWC), in a few large operations:

1. Groups are taken in *runs*: consecutive groups with the same kernel size (the released
   mix sizes ``[1, 1, 3, 5, 7]`` give the runs {1, 1}, {3}, {5}, {7}).
2. For each run, one ``index_select`` with a precomputed permutation writes both branches'
   rolled copies of the run's channels side by side (``[lr | td]``). A roll is a
   permutation, so the circular wrap is exact, and its gradient is the inverse permutation.
3. For each run, one depthwise conv over those ``2 * channels`` at the run's own kernel size
   (oneDNN's channels-last kernels; no zero taps), then the two halves are added.
4. The channel MLP runs on the same NHWC rows with no permute copies; the layer scale is
   folded into ``pwconv2`` (``gamma * (W h + b) == (gamma W) h + gamma b``). On the CPU
   without autograd it runs in row chunks, so that the 4x-wide hidden activations stay in
   cache (and the allocator does not map and fault a fresh large buffer per block).

Both paths read the block's released parameters (``dwconv_lr``/``dwconv_td``, ``gamma``,
``pwconv2``...), so gradients reach the same tensors and checkpoints load into either.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable, Dict, List, NamedTuple, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

if TYPE_CHECKING:
    from .model import MSMLPBlock

__all__ = ['MIX_IMPLS', 'forward_fast', 'mix_fast', 'mix_reference', 'shift_mix']


# ----- reference: the released computation ---------------------------------------------------
def mix_reference(x: torch.Tensor, block: 'MSMLPBlock') -> torch.Tensor:
    """The released computation: per-group roll and per-group depthwise conv (NCHW)."""
    groups = torch.chunk(x, len(block.shift_dist), dim=1)
    lr = [conv(torch.roll(g, s, dims=3)) for g, s, conv in zip(groups, block.shift_dist, block.dwconv_lr)]
    td = [conv(torch.roll(g, s, dims=2)) for g, s, conv in zip(groups, block.shift_dist, block.dwconv_td)]
    return torch.cat(lr, dim=1) + torch.cat(td, dim=1)


# ----- fast: the plan of one block at one input size --------------------------------------------
class Run(NamedTuple):
    """Consecutive channel groups sharing a kernel size."""
    start: int   # first channel
    end: int     # one past the last channel
    kernel: int
    groups: slice  # the groups' indices


def kernel_runs(sizes: Sequence[int], kernels: Sequence[int]) -> Tuple[Run, ...]:
    runs: List[Run] = []
    channel = 0
    for g, (size, k) in enumerate(zip(sizes, kernels)):
        if runs and runs[-1].kernel == k:
            runs[-1] = runs[-1]._replace(end=channel + size, groups=slice(runs[-1].groups.start, g + 1))
        else:
            runs.append(Run(channel, channel + size, k, slice(g, g + 1)))
        channel += size
    return tuple(runs)


class ShiftPlan(NamedTuple):
    runs: Tuple[Run, ...]
    forward: Tuple[torch.Tensor, ...]  # per run: flat source index of [lr | td] (H*W*2c entries)
    backward_lr: torch.Tensor  # flat index into the runs' concatenated [lr | td] maps (H*W*C)
    backward_td: torch.Tensor


@functools.lru_cache(maxsize=8)
def shift_plan(height: int, width: int, sizes: Tuple[int, ...], shifts: Tuple[int, ...],
               kernels: Tuple[int, ...], device: torch.device) -> ShiftPlan:
    """Permutation indices of the rolls of an NHWC map of this size (cached: a few sizes)."""
    runs = kernel_runs(sizes, kernels)
    channels = sum(sizes)
    shift = torch.repeat_interleave(torch.tensor(shifts), torch.tensor(sizes))  # per channel
    h = torch.arange(height)[:, None, None]
    w = torch.arange(width)[None, :, None]
    c = torch.arange(channels)
    row, col = width * channels, channels
    lr_source = h * row + (w - shift) % width * col + c  # (H, W, C): lr[h, w, c] = x[lr_source]
    td_source = (h - shift) % height * row + w * col + c
    dtype = torch.int32 if height * width * channels * 2 < 2 ** 31 else torch.int64
    forward = tuple(torch.cat((lr_source[..., r.start:r.end], td_source[..., r.start:r.end]), -1)
                    .flatten().to(device, dtype) for r in runs)
    # in the concatenated gradient, run r's [lr | td] channels start at 2 * r.start
    position = torch.cat([torch.arange(r.start, r.end) + r.start for r in runs])  # lr channel c
    run_size = torch.cat([torch.full((r.end - r.start,), r.end - r.start) for r in runs])
    row2, col2 = 2 * row, 2 * col
    backward_lr = h * row2 + (w + shift) % width * col2 + position
    backward_td = (h + shift) % height * row2 + w * col2 + position + run_size
    return ShiftPlan(runs, forward, backward_lr.flatten().to(device, dtype),
                     backward_td.flatten().to(device, dtype))


def plan_for(block: 'MSMLPBlock', x: torch.Tensor) -> ShiftPlan:
    return shift_plan(x.shape[1], x.shape[2], block.group_sizes, block.shift_dist, block.mix_size, x.device)


# ----- fast: the mixer -----------------------------------------------------------------------
def _run_weights(block: 'MSMLPBlock', run: Run) -> Tuple[torch.Tensor, torch.Tensor]:
    """Depthwise weights and biases of the run's groups, branch lr then td: (2c, 1, k, k), (2c,)."""
    convs = [*block.dwconv_lr[run.groups], *block.dwconv_td[run.groups]]
    return torch.cat([conv.weight for conv in convs]), torch.cat([conv.bias for conv in convs])


def _depthwise(x: torch.Tensor, weight: torch.Tensor, bias, kernel: int) -> torch.Tensor:
    """Depthwise conv of an NHWC map (NHWC out, channels-last kernels)."""
    out = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=kernel // 2, groups=x.shape[-1])
    return out.permute(0, 2, 3, 1)


class _ShiftMix(torch.autograd.Function):
    """The fast token mixer on a contiguous NHWC map; weights and biases come run by run."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: ShiftPlan, *params: torch.Tensor) -> torch.Tensor:
        n, h, w, c = x.shape
        flat = x.reshape(n, -1)
        out = x.new_empty(n, h, w, c)
        rolled = []
        for run, index, weight, bias in zip(plan.runs, plan.forward, params[0::2], params[1::2]):
            pair = flat.index_select(1, index).view(n, h, w, -1)  # [lr | td] of the run
            mixed = _depthwise(pair, weight, bias, run.kernel)
            size = run.end - run.start
            torch.add(mixed[..., :size], mixed[..., size:], out=out[..., run.start:run.end])
            rolled.append(pair)
        ctx.plan = plan
        ctx.save_for_backward(*rolled, *params[0::2])
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        plan = ctx.plan
        runs = len(plan.runs)
        rolled, weights = ctx.saved_tensors[:runs], ctx.saved_tensors[runs:]
        n, h, w, c = grad.shape
        grad = grad.contiguous()
        grad_params, grad_rolled = [], []
        for run, pair, weight in zip(plan.runs, rolled, weights):
            part = grad[..., run.start:run.end]
            both = torch.cat((part, part), dim=-1).permute(0, 3, 1, 2)  # d(lr + td)/d[lr | td]
            k = run.kernel
            grad_pair, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                both, pair.permute(0, 3, 1, 2), weight, [weight.shape[0]], [1, 1], [k // 2, k // 2],
                [1, 1], False, [0, 0], weight.shape[0], [ctx.needs_input_grad[0], True, True])
            grad_rolled.append(grad_pair)
            grad_params += [grad_weight, grad_bias]
        grad_x = None
        if ctx.needs_input_grad[0]:
            # the rolls are permutations: send each rolled gradient back to its source
            flat = torch.cat([g.permute(0, 2, 3, 1) for g in grad_rolled], dim=-1).reshape(n, -1)
            grad_x = flat.index_select(1, plan.backward_lr)
            grad_x += flat.index_select(1, plan.backward_td)
            grad_x = grad_x.view(n, h, w, c)
        return (grad_x, None, *grad_params)


def _shift_mix_functional(x: torch.Tensor, block: 'MSMLPBlock', plan: ShiftPlan) -> torch.Tensor:
    """The same computation in plain differentiable operations (for ``torch.compile``)."""
    parts = torch.split(x, block.group_sizes, dim=3)
    lr = torch.cat([torch.roll(p, s, dims=2) for p, s in zip(parts, block.shift_dist)], dim=3)
    td = torch.cat([torch.roll(p, s, dims=1) for p, s in zip(parts, block.shift_dist)], dim=3)
    out = []
    for run in plan.runs:
        mixed = _depthwise(torch.cat((lr[..., run.start:run.end], td[..., run.start:run.end]), dim=3),
                           *_run_weights(block, run), run.kernel)
        size = run.end - run.start
        out.append(mixed[..., :size] + mixed[..., size:])
    return torch.cat(out, dim=3)


def mix_fast_nhwc(x: torch.Tensor, block: 'MSMLPBlock') -> torch.Tensor:
    """The token mixer on a contiguous NHWC map; returns a contiguous NHWC map."""
    plan = plan_for(block, x)
    if torch.compiler.is_compiling():
        return _shift_mix_functional(x, block, plan)
    params = [t for run in plan.runs for t in _run_weights(block, run)]
    return _ShiftMix.apply(x, plan, *params)


def mix_fast(x: torch.Tensor, block: 'MSMLPBlock') -> torch.Tensor:
    """The token mixer alone, NCHW in and out (the output is channels-last in memory)."""
    return mix_fast_nhwc(_as_nhwc(x), block).permute(0, 3, 1, 2)


def _as_nhwc(x: torch.Tensor) -> torch.Tensor:
    x = x.permute(0, 2, 3, 1)
    return x if x.is_contiguous() else x.contiguous()


# ----- fast: the block -----------------------------------------------------------------------
# Rows of the channel MLP processed at once on the CPU without autograd: the 4x-wide hidden
# activations of a chunk stay in cache and no large buffer is allocated per block.
MLP_CHUNK_BYTES = 2 ** 24


def _folded_pwconv2(block: 'MSMLPBlock') -> Tuple[torch.Tensor, torch.Tensor]:
    gamma = block.gamma
    return block.pwconv2.weight * gamma[:, None], block.pwconv2.bias * gamma


def _chunked_mlp(block: 'MSMLPBlock', mixed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x + pwconv2'(gelu(pwconv1(norm(mixed))))`` over row chunks (no autograd)."""
    c = x.shape[-1]
    x, mixed = x.reshape(-1, c), mixed.reshape(-1, c)
    norm = block.norm
    w1, b1 = block.pwconv1.weight.t(), block.pwconv1.bias
    w2, b2 = _folded_pwconv2(block)
    w2 = w2.t()
    out = torch.empty_like(x)
    rows = max(64, MLP_CHUNK_BYTES // (w1.shape[1] * x.element_size()))
    for start in range(0, x.shape[0], rows):
        part = slice(start, start + rows)
        z = F.layer_norm(mixed[part], norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        hidden = torch.ops.aten.gelu_(torch.addmm(b1, z, w1))
        torch.add(x[part], b2, out=out[part]).addmm_(hidden, w2)
    return out


def _can_chunk(block: 'MSMLPBlock', x: torch.Tensor) -> bool:
    return (x.device.type == 'cpu' and not torch.is_grad_enabled() and not torch.is_autocast_enabled('cpu')
            and not torch.compiler.is_compiling()
            and type(block.act) is nn.GELU and block.act.approximate == 'none')


def forward_fast(block: 'MSMLPBlock', x: torch.Tensor) -> torch.Tensor:
    """The block forward, channels-last throughout. Takes NCHW; returns NCHW whose memory
    is channels-last, so that the next fast block needs no copy."""
    x = _as_nhwc(x)
    mixed = mix_fast_nhwc(x, block)
    if _can_chunk(block, x):
        return _chunked_mlp(block, mixed, x).view(x.shape).permute(0, 3, 1, 2)
    y = F.linear(block.act(block.pwconv1(block.norm(mixed))), *_folded_pwconv2(block))
    return (x + block.drop_path(y)).permute(0, 3, 1, 2)


MIX_IMPLS: Dict[str, Callable[[torch.Tensor, 'MSMLPBlock'], torch.Tensor]] = {
    'reference': mix_reference,
    'fast': mix_fast,
}


def shift_mix(x: torch.Tensor, block: 'MSMLPBlock', impl: str) -> torch.Tensor:
    return MIX_IMPLS[impl](x, block)
