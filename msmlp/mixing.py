"""Shift-mix token mixing of an MS-MLP block, in two implementations of one function.

The released block splits channels into five groups with ``torch.chunk``, rolls group g
circularly by ``shift_dist[g]`` along W (branch ``lr``) and along H (branch ``td``),
applies a depthwise conv of kernel ``mix_size[g]`` per group and branch, adds the two
branches, then runs a channel MLP (LayerNorm, Linear, GELU, Linear, layer scale) and a
residual add. ``reference`` does exactly that, in NCHW, as released: ten rolls, ten
convs, two concatenations and two permute copies per block. ``fast`` computes the same
function channels-last (NHWC) in a few large operations:

* Mixer (``_ShiftMix``): one ``index_select`` with a precomputed permutation writes both
  branches' rolled copies side by side (``[lr | td]``, 2C channels; a roll is a
  permutation, so the circular wrap is exact), one depthwise conv over the 2C channels
  with every group's kernel zero-padded (centred) to the block's largest (the zero taps
  add exact zeros), one add of the halves. Its backward is the transposed conv per branch
  and the inverse permutation; the weight gradients are computed run by run (groups
  sharing a kernel size) at each run's own kernel size, with batched matrix products on
  small maps (oneDNN's 5x5/7x7 depthwise weight gradient is slow there).
* Channel MLP: on the same NHWC rows, no permute copies, the layer scale folded into
  ``pwconv2`` (``gamma * (W h + b) == (gamma W) h + gamma b``). On the CPU it runs in
  row chunks of at most ``MLP_CHUNK_BYTES`` of hidden activations: without autograd
  through oneDNN's fused Linear+GELU and Linear+residual-add; with autograd as one
  function that keeps only the pre-activations and recomputes the GELU in its backward.
  Chunks keep the 4x-wide hidden activations in cache and out of freshly mapped pages.

Autocast keeps the mixer (convs run in the autocast dtype) and takes the plain MLP
operations; ``torch.compile`` traces a functional version of the same computation.
Both paths read the block's released parameters (``dwconv_lr``/``dwconv_td``, ``gamma``,
``pwconv2``...), so gradients reach the same tensors and checkpoints load into either.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable, Dict, List, NamedTuple, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.layers import DropPath
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
    """Consecutive channel groups whose weight gradients are computed together."""
    start: int     # first channel
    end: int       # one past the last channel
    kernel: int    # the largest kernel of its groups
    groups: slice  # the groups' indices


def kernel_runs(sizes: Sequence[int], kernels: Sequence[int]) -> Tuple[Run, ...]:
    """Runs of consecutive groups with one kernel size, or all with kernels of at most 3
    (oneDNN's fast 3x3 depthwise weight gradient covers 1x1 kernels embedded in 3x3)."""
    runs: List[Run] = []
    channel = 0
    for g, (size, k) in enumerate(zip(sizes, kernels)):
        last = runs[-1] if runs else None
        if last is not None and (last.kernel == k or max(last.kernel, k) <= 3):
            runs[-1] = Run(last.start, channel + size, max(last.kernel, k), slice(last.groups.start, g + 1))
        else:
            runs.append(Run(channel, channel + size, k, slice(g, g + 1)))
        channel += size
    return tuple(runs)


class ShiftPlan(NamedTuple):
    runs: Tuple[Run, ...]
    kernel: int                # the block's largest kernel
    forward: torch.Tensor      # flat source index of [lr | td] in x (H*W*2C entries)
    backward_lr: torch.Tensor  # flat source index of the inverse rolls (H*W*C entries)
    backward_td: torch.Tensor


@functools.lru_cache(maxsize=8)
def shift_plan(height: int, width: int, sizes: Tuple[int, ...], shifts: Tuple[int, ...],
               kernels: Tuple[int, ...], device: torch.device) -> ShiftPlan:
    """The rolls of an NHWC map of this size as permutation indices (cached for a few sizes)."""
    channels = sum(sizes)
    shift = torch.repeat_interleave(torch.tensor(shifts), torch.tensor(sizes))  # per channel
    h = torch.arange(height)[:, None, None]
    w = torch.arange(width)[None, :, None]
    c = torch.arange(channels)
    row, col = width * channels, channels
    # lr[h, w, c] = x[h, w - s, c] and td[h, w, c] = x[h - s, w, c], circularly (torch.roll)
    forward = torch.cat((h * row + (w - shift) % width * col + c, (h - shift) % height * row + w * col + c), -1)
    backward_lr = h * row + (w + shift) % width * col + c
    backward_td = (h + shift) % height * row + w * col + c
    dtype = torch.int32 if forward.numel() < 2 ** 31 else torch.int64
    return ShiftPlan(kernel_runs(sizes, kernels), max(kernels), *(
        index.flatten().to(device, dtype) for index in (forward, backward_lr, backward_td)))


def plan_for(block: 'MSMLPBlock', x: torch.Tensor) -> ShiftPlan:
    return shift_plan(x.shape[1], x.shape[2], block.group_sizes, block.shift_dist, block.mix_size, x.device)


# ----- fast: the mixer -----------------------------------------------------------------------
def _depthwise(x: torch.Tensor, weight: torch.Tensor, bias, kernel: int) -> torch.Tensor:
    """Depthwise conv of an NHWC map (NHWC out, oneDNN's channels-last kernels)."""
    out = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=kernel // 2, groups=x.shape[-1])
    return out.permute(0, 2, 3, 1)


def _embed(weights: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """Per-group depthwise kernels, each zero-padded (centred) to ``size`` x ``size``, stacked."""
    return torch.cat([F.pad(w, [(size - w.shape[-1]) // 2] * 4) for w in weights])


class _ShiftMix(torch.autograd.Function):
    """The fast token mixer of a contiguous NHWC map.

    Forward: one ``index_select`` writes both branches' rolled copies (``[lr | td]``, 2C
    channels), one depthwise conv with every group's kernel embedded in the largest, one add
    of the halves. Backward: per branch, the transposed conv (the same conv with flipped
    kernels) and the inverse roll; the weight gradients run by run at each run's own kernel.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: ShiftPlan, *params: torch.Tensor) -> torch.Tensor:
        n, h, w, c = x.shape
        weight = _embed(params[0::2], plan.kernel)  # lr groups, then td groups
        pair = x.reshape(n, -1).index_select(1, plan.forward).view(n, h, w, 2 * c)
        mixed = _depthwise(pair, weight, torch.cat(params[1::2]), plan.kernel)
        ctx.plan = plan
        ctx.sizes = [p.shape[0] for p in params[0:len(params) // 2:2]]  # per group (lr and td alike)
        ctx.kernels = [p.shape[-1] for p in params[0:len(params) // 2:2]]
        ctx.save_for_backward(pair, weight)
        return mixed[..., :c] + mixed[..., c:]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        plan = ctx.plan
        grad = grad.contiguous()
        pair, weight = (t.to(grad.dtype) for t in ctx.saved_tensors)  # autocast ran the conv in grad's dtype
        n, h, w, c = grad.shape
        grad_x = None
        if ctx.needs_input_grad[0]:
            for branch, index in enumerate((plan.backward_lr, plan.backward_td)):
                flipped = weight[branch * c:(branch + 1) * c].flip((2, 3))
                back = _depthwise(grad, flipped, None, plan.kernel).reshape(n, -1).index_select(1, index)
                grad_x = back if grad_x is None else grad_x.add_(back)
            grad_x = grad_x.view(n, h, w, c)
        if not any(ctx.needs_input_grad[2:]):  # frozen mixer
            return (grad_x, None) + (None,) * (len(ctx.needs_input_grad) - 2)
        sizes, kernels = ctx.sizes, ctx.kernels
        grad_bias = grad.sum((0, 1, 2)).split(sizes)  # d(lr + td)/d bias: the same for both branches
        grad_weight: List[List[torch.Tensor]] = [[], []]
        for run in plan.runs:
            run_grad = _run_weight_grad(pair[..., run.start:run.end], pair[..., c + run.start:c + run.end],
                                        grad[..., run.start:run.end], run.kernel)
            for g, part in zip(range(run.groups.start, run.groups.stop),
                               run_grad.split(sizes[run.groups], dim=1)):
                crop = slice((run.kernel - kernels[g]) // 2, (run.kernel + kernels[g]) // 2)
                for branch in range(2):
                    grad_weight[branch].append(part[branch, :, None, crop, crop])
        return (grad_x, None, *[t for branch in range(2) for pair_grads in zip(grad_weight[branch], grad_bias)
                                for t in pair_grads])


# On the CPU up to this width, the weight gradient of a 5x5 or larger depthwise kernel is
# computed with batched matrix products (see _toeplitz_weight_grad); elsewhere by the library.
TOEPLITZ_MAX_WIDTH = 32


def _run_weight_grad(x_lr: torch.Tensor, x_td: torch.Tensor, grad: torch.Tensor, k: int) -> torch.Tensor:
    """Weight gradients (2, c, k, k) of a run's depthwise convs, branch lr then td, from the
    run's rolled inputs (N, H, W, c) and the gradient of ``lr + td`` (N, H, W, c)."""
    channels = grad.shape[-1]
    if k >= 5 and grad.shape[2] <= TOEPLITZ_MAX_WIDTH and grad.device.type == 'cpu':
        return _toeplitz_weight_grad(x_lr, x_td, grad, k)
    inputs = torch.cat((x_lr, x_td), dim=-1).permute(0, 3, 1, 2)
    both = torch.cat((grad, grad), dim=-1).permute(0, 3, 1, 2)
    shape = grad.new_empty(2 * channels, 1, k, k)
    grad_weight = torch.ops.aten.convolution_backward(
        both, inputs, shape, None, [1, 1], [k // 2, k // 2], [1, 1], False, [0, 0], 2 * channels,
        [False, True, False])[1]
    return grad_weight.view(2, channels, k, k)


def _toeplitz_weight_grad(x_lr: torch.Tensor, x_td: torch.Tensor, grad: torch.Tensor, k: int) -> torch.Tensor:
    """``dw[b, c, i, j] = sum_{n,h,w} pad(x_b)[n, h + i, w + j, c] * grad[n, h, w, c]``.

    oneDNN computes the weight gradient of 5x5 and 7x7 depthwise kernels far below the
    machine's rate, worst on small maps. Here, per channel, the padded images are stacked
    into one tall image: for kernel row ``i``, ``P = G^T X_i`` is a (W, W + 2p) matrix
    product over all image rows, and ``dw[..., i, j]`` is the sum of P's j-th diagonal.
    """
    n, h, w, channels = grad.shape
    p = k // 2
    rows = n * (h + 2 * p)  # the gradient's images, each followed by 2p zero rows
    g = grad.new_zeros(2, channels, w, n, h + 2 * p)
    g[..., :h] = grad.permute(3, 2, 0, 1)  # both branches share the gradient
    g = g.view(2 * channels, w, rows)
    x = grad.new_zeros(2, channels, rows + 2 * p, w + 2 * p)
    images = x[:, :, :rows].view(2, channels, n, h + 2 * p, w + 2 * p)[..., p:p + h, p:p + w]
    images[0] = x_lr.permute(3, 0, 1, 2)
    images[1] = x_td.permute(3, 0, 1, 2)
    x = x.view(2 * channels, rows + 2 * p, w + 2 * p)
    products = grad.new_empty(k, 2 * channels, w, w + 2 * p)
    for i in range(k):
        torch.bmm(g, x[:, i:i + rows], out=products[i])
    diagonals = products.as_strided((2 * channels, k, k, w),
                                    (w * (w + 2 * p), products.stride(0), 1, w + 2 * p + 1))
    return diagonals.sum(-1).view(2, channels, k, k)


def _shift_mix_functional(x: torch.Tensor, block: 'MSMLPBlock', kernel: int) -> torch.Tensor:
    """The same function in plain differentiable operations (what ``torch.compile`` traces)."""
    parts = torch.split(x, block.group_sizes, dim=3)
    rolled = [torch.roll(p, s, dims=d) for d in (2, 1) for p, s in zip(parts, block.shift_dist)]
    convs = [*block.dwconv_lr, *block.dwconv_td]
    mixed = _depthwise(torch.cat(rolled, dim=3), _embed([conv.weight for conv in convs], kernel),
                       torch.cat([conv.bias for conv in convs]), kernel)
    c = x.shape[-1]
    return mixed[..., :c] + mixed[..., c:]


def mix_fast_nhwc(x: torch.Tensor, block: 'MSMLPBlock') -> torch.Tensor:
    """The token mixer on a contiguous NHWC map; returns a contiguous NHWC map."""
    if torch.compiler.is_compiling():
        return _shift_mix_functional(x, block, max(block.mix_size))
    params = [t for convs in (block.dwconv_lr, block.dwconv_td) for conv in convs for t in (conv.weight, conv.bias)]
    return _ShiftMix.apply(x, plan_for(block, x), *params)


def mix_fast(x: torch.Tensor, block: 'MSMLPBlock') -> torch.Tensor:
    """The token mixer alone, NCHW in and out (the output is channels-last in memory)."""
    return mix_fast_nhwc(_as_nhwc(x), block).permute(0, 3, 1, 2)


def _as_nhwc(x: torch.Tensor) -> torch.Tensor:
    x = x.permute(0, 2, 3, 1)
    return x if x.is_contiguous() else x.contiguous()


# ----- fast: the block -----------------------------------------------------------------------
# Hidden activations of the channel MLP computed at once on the CPU. Below the allocator's
# largest mmap threshold (32 MiB in glibc), chunk buffers are reused instead of freshly mapped
# and faulted in, while the chunks stay few.
MLP_CHUNK_BYTES = 30 * 2 ** 20


def _folded_pwconv2(block: 'MSMLPBlock') -> Tuple[torch.Tensor, torch.Tensor]:
    gamma = block.gamma
    return block.pwconv2.weight * gamma[:, None], block.pwconv2.bias * gamma


@functools.lru_cache(maxsize=None)
def fused_linear_available() -> bool:
    """Whether oneDNN's fused Linear+GELU and Linear+add (the ops the compiler emits on the
    CPU) exist in this torch build and agree exactly with the plain operations."""
    try:
        x = torch.ones(2, 2)
        linear = torch.ops.mkldnn._linear_pointwise
        return torch.equal(linear.binary(linear(x, x, x[0], 'gelu', [], 'none'), x, x, x[0], 'add'),
                           F.linear(F.gelu(F.linear(x, x, x[0])), x, x[0]) + x)
    except (AttributeError, RuntimeError):
        return False


def _mlp_inference(mixed, x, norm_weight, norm_bias, w1, b1, w2, b2, eps: float, rows: int) -> torch.Tensor:
    """``x + gelu(norm(mixed) w1' + b1) w2' + b2`` over row chunks of 2-D inputs (no autograd):
    per chunk, a norm and two oneDNN products with the GELU and the residual add fused."""
    c = x.shape[1]
    fused = x.dtype in (torch.float32, torch.bfloat16) and fused_linear_available()
    outs = []
    for start in range(0, x.shape[0], rows):
        part = slice(start, start + rows)
        z = F.layer_norm(mixed[part], (c,), norm_weight, norm_bias, eps)
        if fused:
            linear = torch.ops.mkldnn._linear_pointwise
            outs.append(linear.binary(linear(z, w1, b1, 'gelu', [], 'none'), x[part], w2, b2, 'add'))
        else:
            hidden = torch.ops.aten.gelu_(torch.addmm(b1, z, w1.t()))
            outs.append(torch.add(x[part], b2).addmm_(hidden, w2.t()))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _mlp_chunks(mixed, x, scale, norm_weight, norm_bias, w1, b1, w2, b2, eps: float, rows: int,
                pre: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x + scale * (gelu(norm(mixed) w1' + b1) w2' + b2)`` over row chunks of 2-D inputs,
    writing the pre-activations into ``pre``; returns the output and the norm statistics."""
    c = x.shape[1]
    out = torch.empty_like(x)
    means, rstds = [], []
    w1t, w2t = w1.t(), w2.t()
    for start in range(0, x.shape[0], rows):
        part = slice(start, start + rows)
        z, mean, rstd = torch.native_layer_norm(mixed[part], (c,), norm_weight, norm_bias, eps)
        hidden = F.gelu(torch.addmm(b1, z, w1t, out=pre[part]))
        means.append(mean)
        rstds.append(rstd)
        if scale is None:
            torch.add(x[part], b2, out=out[part]).addmm_(hidden, w2t)
        else:
            torch.addcmul(x[part], torch.addmm(b2, hidden, w2t), scale[part, None], out=out[part])
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
        grad_mixed = []
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
            grad_mixed.append(grad_in)
            grad_norm_weight += grad_nw
            grad_norm_bias += grad_nb
        grad_mixed = grad_mixed[0] if len(grad_mixed) == 1 else torch.cat(grad_mixed)
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
        args = (mixed.reshape(-1, c), x.reshape(-1, c), block.norm.weight, block.norm.bias,
                block.pwconv1.weight, block.pwconv1.bias, w2, b2, block.norm.eps, rows)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or mixed.requires_grad or any(
            p.requires_grad for p in (block.norm.weight, block.pwconv1.weight, w2)))
        if needs_grad or scale is not None:
            out = _ChannelMLP.apply(args[0], args[1], scale, *args[2:])
        else:
            out = _mlp_inference(*args)
        return out.view(n, h, w, c).permute(0, 3, 1, 2)
    y = F.linear(block.act(block.pwconv1(block.norm(mixed))), w2, b2)
    return (x + block.drop_path(y)).permute(0, 3, 1, 2)


MIX_IMPLS: Dict[str, Callable[[torch.Tensor, 'MSMLPBlock'], torch.Tensor]] = {
    'reference': mix_reference,
    'fast': mix_fast,
}


def shift_mix(x: torch.Tensor, block: 'MSMLPBlock', impl: str) -> torch.Tensor:
    return MIX_IMPLS[impl](x, block)
