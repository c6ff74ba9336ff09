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
from timm.layers import DropPath
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
    backward_lr: torch.Tensor  # flat source index of the inverse rolls (H*W*C entries)
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
    # the inverse rolls, for the gradient: x[h, w, c] went to lr[h, w + s, c] and td[h + s, w, c]
    backward_lr = h * row + (w + shift) % width * col + c
    backward_td = (h + shift) % height * row + w * col + c
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


# Up to this width the weight gradient of a 5x5 or larger depthwise kernel is computed with
# batched matrix products (below); wider maps use oneDNN's kernel.
TOEPLITZ_MAX_WIDTH = 32


def _pair_weight_grad(pair: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor) -> List[torch.Tensor]:
    """Gradients of a run's depthwise weights and biases, ``[lr | td]`` order: ``pair`` is
    the run's rolled input (N, H, W, 2c), ``grad`` the gradient of ``lr + td`` (N, H, W, c)."""
    k = weight.shape[-1]
    grad_bias = grad.sum((0, 1, 2)).repeat(2)
    if k >= 5 and pair.shape[2] <= TOEPLITZ_MAX_WIDTH:
        return [_toeplitz_weight_grad(pair, grad, k), grad_bias]
    both = torch.cat((grad, grad), dim=-1).permute(0, 3, 1, 2)
    grad_weight = torch.ops.aten.convolution_backward(
        both, pair.permute(0, 3, 1, 2), weight, None, [1, 1], [k // 2, k // 2], [1, 1], False, [0, 0],
        weight.shape[0], [False, True, False])[1]
    return [grad_weight, grad_bias]


def _toeplitz_weight_grad(pair: torch.Tensor, grad: torch.Tensor, k: int) -> torch.Tensor:
    """``dw[c, i, j] = sum_{n,h,w} pad(pair)[n, h + i, w + j, c] grad[n, h, w, c mod c_run]``.

    oneDNN's weight gradient for 5x5 and 7x7 depthwise kernels runs far below the machine's
    rate on small maps. Here, per channel, the images are stacked into one tall image (each
    followed by zero rows): for kernel row ``i``, ``P = G^T X_i`` is a (W, W + 2p) matrix
    product over all rows, and ``dw[c, i, j]`` is the sum of P's j-th diagonal.
    """
    n, h, w, channels = pair.shape
    p = k // 2
    rows = n * (h + 2 * p)
    g = grad.new_zeros(2, channels // 2, w, n, h + 2 * p)
    g[..., :h] = grad.permute(3, 2, 0, 1)  # both branches share the gradient
    g = g.view(channels, w, rows)
    x = pair.new_zeros(channels, rows + 2 * p, w + 2 * p)
    x[:, :rows].view(channels, n, h + 2 * p, w + 2 * p)[:, :, p:p + h, p:p + w] = pair.permute(3, 0, 1, 2)
    products = pair.new_empty(k, channels, w, w + 2 * p)
    for i in range(k):
        torch.bmm(g, x[:, i:i + rows], out=products[i])
    diagonals = products.as_strided((channels, k, k, w), (w * (w + 2 * p), products.stride(0), 1, w + 2 * p + 1))
    return diagonals.sum(-1).unsqueeze(1)


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
        grad_params = []
        for run, pair, weight in zip(plan.runs, rolled, weights):
            grad_params += _pair_weight_grad(pair, grad[..., run.start:run.end], weight)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # per branch: the transposed conv (the conv with flipped kernels, all runs embedded
            # in the largest kernel), then the inverse roll (the rolls are permutations)
            size = max(r.kernel for r in plan.runs)
            flat = grad_x = None
            for branch, index in enumerate((plan.backward_lr, plan.backward_td)):
                kernels = []
                for run, weight in zip(plan.runs, weights):
                    half = weight[branch * (run.end - run.start):(branch + 1) * (run.end - run.start)]
                    pad = (size - run.kernel) // 2
                    kernels.append(F.pad(half, [pad] * 4).flip((2, 3)))
                back = _depthwise(grad, torch.cat(kernels), None, size).reshape(n, -1)
                if grad_x is None:
                    grad_x = back.index_select(1, index)
                else:
                    grad_x += back.index_select(1, index)
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


def _mlp_chunks(mixed, x, scale, norm_weight, norm_bias, w1, b1, w2, b2, eps: float, rows: int,
                pre=None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x + scale * (gelu(norm(mixed) w1' + b1) w2' + b2)`` over row chunks of 2-D inputs;
    with ``pre``, also writes the pre-activations there and returns the norm statistics."""
    c = x.shape[1]
    out = torch.empty_like(x)
    means, rstds = [], []
    w1t, w2t = w1.t(), w2.t()
    for start in range(0, x.shape[0], rows):
        part = slice(start, start + rows)
        z, mean, rstd = torch.native_layer_norm(mixed[part], (c,), norm_weight, norm_bias, eps)
        if pre is None:
            hidden = torch.ops.aten.gelu_(torch.addmm(b1, z, w1t))
        else:
            hidden = F.gelu(torch.addmm(b1, z, w1t, out=pre[part]))
            means.append(mean)
            rstds.append(rstd)
        if scale is None:
            torch.add(x[part], b2, out=out[part]).addmm_(hidden, w2t)
        else:
            torch.addcmul(x[part], torch.addmm(b2, hidden, w2t), scale[part, None], out=out[part])
    if pre is None:
        return out, None, None
    return out, torch.cat(means), torch.cat(rstds)


class _ChannelMLP(torch.autograd.Function):
    """The block's channel MLP and residual add over row chunks (see ``_mlp_chunks``).

    The 4x-wide hidden activations exist only chunk by chunk: the forward keeps the
    pre-activation alone, the backward recomputes the GELU from it, and GELU, its gradient
    and the hidden gradients stay in cache.
    """

    @staticmethod
    def forward(ctx, mixed, x, scale, norm_weight, norm_bias, w1, b1, w2, b2, eps: float, rows: int):
        pre = x.new_empty(x.shape[0], w1.shape[0])
        out, mean, rstd = _mlp_chunks(mixed, x, scale, norm_weight, norm_bias, w1, b1, w2, b2, eps, rows, pre)
        ctx.eps, ctx.rows = eps, rows
        ctx.save_for_backward(mixed, pre, mean, rstd, scale, norm_weight, norm_bias, w1, w2)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        mixed, pre, mean, rstd, scale, norm_weight, norm_bias, w1, w2 = ctx.saved_tensors
        c = mixed.shape[1]
        grad = grad.contiguous()
        grad_y = grad if scale is None else grad * scale[:, None]
        grad_mixed = torch.empty_like(mixed)
        grad_w1, grad_w2 = torch.zeros_like(w1), torch.zeros_like(w2)
        grad_b1 = w1.new_zeros(w1.shape[0])
        grad_norm_weight, grad_norm_bias = torch.zeros_like(norm_weight), torch.zeros_like(norm_bias)
        for start in range(0, mixed.shape[0], ctx.rows):
            part = slice(start, start + ctx.rows)
            g, p = grad_y[part], pre[part]
            grad_w2.addmm_(g.t(), F.gelu(p))
            grad_pre = torch.ops.aten.gelu_backward(torch.mm(g, w2), p)
            z = torch.native_layer_norm(mixed[part], (c,), norm_weight, norm_bias, ctx.eps)[0]
            grad_w1.addmm_(grad_pre.t(), z)
            grad_b1 += grad_pre.sum(0)
            grad_in, grad_nw, grad_nb = torch.ops.aten.native_layer_norm_backward(
                torch.mm(grad_pre, w1), mixed[part], (c,), mean[part], rstd[part], norm_weight, norm_bias,
                [True, True, True])
            grad_mixed[part] = grad_in
            grad_norm_weight += grad_nw
            grad_norm_bias += grad_nb
        return (grad_mixed, grad, None, grad_norm_weight, grad_norm_bias, grad_w1, grad_b1,
                grad_w2, grad_y.sum(0), None, None)


def _drop_path_scale(block: 'MSMLPBlock', x: torch.Tensor):
    """Per-sample drop-path factors drawn as timm's ``drop_path`` draws them, or None."""
    drop = block.drop_path
    if not block.training or not isinstance(drop, DropPath) or drop.drop_prob == 0.:
        return None
    keep = 1 - drop.drop_prob
    scale = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    if keep > 0 and drop.scale_by_keep:
        scale.div_(keep)
    return scale.flatten()


def _fusable(block: 'MSMLPBlock', x: torch.Tensor) -> bool:
    """The chunked MLP covers the block as built (exact GELU, LayerNorm, timm DropPath) on
    the CPU, without autocast or compilation (those take the plain operations)."""
    return (x.device.type == 'cpu' and not torch.is_autocast_enabled('cpu') and not torch.compiler.is_compiling()
            and type(block.act) is nn.GELU and block.act.approximate == 'none'
            and type(block.norm) is nn.LayerNorm and block.norm.weight is not None
            and isinstance(block.drop_path, (nn.Identity, DropPath)))


def forward_fast(block: 'MSMLPBlock', x: torch.Tensor) -> torch.Tensor:
    """The block forward, channels-last throughout. Takes NCHW; returns NCHW whose memory
    is channels-last, so that the next fast block needs no copy."""
    x = _as_nhwc(x)
    mixed = mix_fast_nhwc(x, block)
    w2, b2 = _folded_pwconv2(block)
    if _fusable(block, x):
        n, h, w, c = x.shape
        scale = _drop_path_scale(block, x)
        if scale is not None:
            scale = scale.repeat_interleave(h * w)
        rows = max(64, MLP_CHUNK_BYTES // (block.pwconv1.out_features * x.element_size()))
        args = (mixed.reshape(-1, c), x.reshape(-1, c), scale, block.norm.weight, block.norm.bias,
                block.pwconv1.weight, block.pwconv1.bias, w2, b2, block.norm.eps, rows)
        out = _ChannelMLP.apply(*args) if torch.is_grad_enabled() else _mlp_chunks(*args)[0]
        return out.view(n, h, w, c).permute(0, 3, 1, 2)
    y = F.linear(block.act(block.pwconv1(block.norm(mixed))), w2, b2)
    return (x + block.drop_path(y)).permute(0, 3, 1, 2)


MIX_IMPLS: Dict[str, Callable[[torch.Tensor, 'MSMLPBlock'], torch.Tensor]] = {
    'reference': mix_reference,
    'fast': mix_fast,
}


def shift_mix(x: torch.Tensor, block: 'MSMLPBlock', impl: str) -> torch.Tensor:
    return MIX_IMPLS[impl](x, block)
