"""Shift-mix token mixing of an MS-MLP block, in two implementations of one function.

The released block splits channels into groups with ``torch.chunk``, rolls group g
circularly by ``shift_dist[g]`` along W (branch ``lr``) and along H (branch ``td``),
applies a depthwise conv of kernel ``mix_size[g]`` per group and branch, and adds the
two branches. ``reference`` does exactly that, in NCHW, as released. ``fast`` computes
the same function channels-last (NHWC) with fewer, larger kernels:

1. one pass writes both branches' rolled copies side by side into one (N, H, W, 2C)
   buffer (circular wrap kept: each group's roll is two slice copies);
2. one depthwise conv over those 2C channels, each group's kernel zero-padded (centred)
   to the stage's largest kernel; the zero taps add exact zeros;
3. the two halves are added.

The channel MLP of the fast block then runs on the same NHWC tensor (no permute copies)
with the layer scale folded into ``pwconv2`` (``gamma * (W h + b) == (gamma W) h + gamma b``).
Both paths read the block's released parameters (``dwconv_lr``/``dwconv_td``, ``gamma``,
``pwconv2``...), so gradients reach the same tensors and checkpoints load into either.
"""
from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Callable, Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

if TYPE_CHECKING:
    from .model import MSMLPBlock


# ----- reference: the released computation ---------------------------------------------------
def mix_reference(x: torch.Tensor, block: 'MSMLPBlock') -> torch.Tensor:
    """The released computation: per-group roll and per-group depthwise conv (NCHW)."""
    groups = torch.chunk(x, len(block.shift_dist), dim=1)
    lr = [conv(torch.roll(g, s, dims=3)) for g, s, conv in zip(groups, block.shift_dist, block.dwconv_lr)]
    td = [conv(torch.roll(g, s, dims=2)) for g, s, conv in zip(groups, block.shift_dist, block.dwconv_td)]
    return torch.cat(lr, dim=1) + torch.cat(td, dim=1)


# ----- fast: channels-last, one conv per branch for all groups ------------------------------------
@functools.lru_cache(maxsize=16)
def _shift_indices(height: int, width: int, sizes: Tuple[int, ...], shifts: Tuple[int, ...],
                   device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flat source indices of the two rolls of an NHWC map whose channel group g is rolled
    by ``shifts[g]``: along W within a row (W*C entries), along H within an image (H*W*C)."""
    channels = sum(sizes)
    shift = torch.repeat_interleave(torch.tensor(shifts), torch.tensor(sizes))  # per channel
    c = torch.arange(channels)
    w = torch.arange(width)[:, None]
    along_w = ((w - shift) % width) * channels + c  # (W, C)
    h = torch.arange(height)[:, None, None]
    along_h = ((h - shift) % height) * (width * channels) + w * channels + c  # (H, W, C)
    dtype = torch.int32 if height * width * channels < 2 ** 31 else torch.int64
    return along_w.flatten().to(device, dtype), along_h.flatten().to(device, dtype)


def _roll_all(x: torch.Tensor, index_w: torch.Tensor, index_h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    n, h, w, c = x.shape
    lr = x.reshape(n * h, w * c).index_select(1, index_w).view(n, h, w, c)
    td = x.reshape(n, h * w * c).index_select(1, index_h).view(n, h, w, c)
    return lr, td


class _ShiftedCopies(torch.autograd.Function):
    """(N, H, W, C) -> the channel groups rolled along W, and along H (two NHWC maps).
    A roll is a permutation: its backward is the inverse roll of the gradient."""

    @staticmethod
    def forward(ctx, x, sizes, shifts):
        n, h, w, c = x.shape
        ctx.geometry = (h, w, sizes, shifts, x.device)
        return _roll_all(x.contiguous(), *_shift_indices(*ctx.geometry))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_lr, grad_td):
        h, w, sizes, shifts, device = ctx.geometry
        back_w, back_h = _shift_indices(h, w, sizes, tuple(-s for s in shifts), device)
        grad = None
        for g, index in ((grad_lr, back_w), (grad_td, back_h)):
            if g is None:
                continue
            n, _, _, c = g.shape
            g = g.contiguous()
            if index is back_w:
                g = g.reshape(n * h, w * c).index_select(1, index)
            else:
                g = g.reshape(n, h * w * c).index_select(1, index)
            grad = g if grad is None else grad.add_(g.view_as(grad))
        return grad.view(n, h, w, c), None, None


def shifted_copies(x: torch.Tensor, block: 'MSMLPBlock') -> Tuple[torch.Tensor, torch.Tensor]:
    """The two branches' rolled copies of a contiguous NHWC map (circular, per channel group)."""
    if torch.compiler.is_compiling():  # a functional form the compiler fuses
        parts = torch.split(x, block.group_sizes, dim=3)
        return tuple(torch.cat([torch.roll(p, s, dims=d) for p, s in zip(parts, block.shift_dist)], dim=3)
                     for d in (2, 1))
    return _ShiftedCopies.apply(x, block.group_sizes, block.shift_dist)


def embedded_kernels(convs, size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stack per-group depthwise kernels, each zero-padded (centred) to ``size`` x ``size``."""
    weights = []
    for conv in convs:
        pad = (size - conv.kernel_size[0]) // 2
        weights.append(F.pad(conv.weight, (pad, pad, pad, pad)) if pad else conv.weight)
    return torch.cat(weights, dim=0), torch.cat([conv.bias for conv in convs], dim=0)


def _kernel_runs(sizes: Sequence[int], kernels: Sequence[int]) -> Tuple[Tuple[int, int, int, int, int], ...]:
    """Consecutive groups sharing a kernel size: (first channel, end channel, kernel,
    first group, end group) for each run."""
    runs, channel, group = [], 0, 0
    for g, (size, k) in enumerate(zip(sizes, kernels)):
        if runs and runs[-1][2] == k:
            first_c, _, _, first_g, _ = runs[-1]
            runs[-1] = (first_c, channel + size, k, first_g, g + 1)
        else:
            runs.append((channel, channel + size, k, g, g + 1))
        channel += size
    return tuple(runs)


class _GroupedDepthwise(torch.autograd.Function):
    """Depthwise conv of an NHWC map whose channel groups have kernels of their own sizes.

    Forward: one conv, each group's kernel zero-padded to the largest. Backward: the input
    gradient as one conv with the flipped kernels; the weight gradient run by run at each
    run's own kernel size (oneDNN's fast depthwise weight-gradient kernels do not cover the
    embedded large kernels, and the zero taps would cost as much as real ones).
    """

    @staticmethod
    def forward(ctx, x, runs, *params):
        weights, biases = params[0::2], params[1::2]
        size = max(w.shape[-1] for w in weights)
        weight = torch.cat([F.pad(w, [(size - w.shape[-1]) // 2] * 4) for w in weights])
        ctx.runs, ctx.size, ctx.kernels = runs, size, [w.shape for w in weights]
        ctx.save_for_backward(x, weight)
        y = F.conv2d(x.permute(0, 3, 1, 2), weight, torch.cat(biases), padding=size // 2, groups=x.shape[-1])
        return y.permute(0, 2, 3, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous().permute(0, 3, 1, 2)  # channels_last NCHW
        xc = x.permute(0, 3, 1, 2)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv2d(grad, weight.flip((2, 3)), None, padding=ctx.size // 2,
                              groups=x.shape[-1]).permute(0, 2, 3, 1)
        grads = []
        for start, end, k, first, last in ctx.runs:
            shapes = ctx.kernels[first:last]
            run_weight = weight.new_empty(end - start, 1, k, k)
            _, gw, gb = torch.ops.aten.convolution_backward(
                grad[:, start:end], xc[:, start:end], run_weight, [end - start], [1, 1], [k // 2] * 2,
                [1, 1], False, [0, 0], end - start, [False, True, True])
            split = [s[0] for s in shapes]
            for w_part, b_part in zip(gw.split(split), gb.split(split)):
                grads += [w_part, b_part]
        return (grad_x, None, *grads)


def depthwise_branch(x: torch.Tensor, convs, runs) -> torch.Tensor:
    """The per-group depthwise convs of one branch on an NHWC map (NHWC out)."""
    if torch.compiler.is_compiling():
        size = max(conv.kernel_size[0] for conv in convs)
        weight, bias = embedded_kernels(convs, size)
        return F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=size // 2,
                        groups=x.shape[-1]).permute(0, 2, 3, 1)
    params = [t for conv in convs for t in (conv.weight, conv.bias)]
    return _GroupedDepthwise.apply(x, runs, *params)


def mixed_branches(x: torch.Tensor, block: 'MSMLPBlock') -> Tuple[torch.Tensor, torch.Tensor]:
    """The lr and td branches (before their sum) of a contiguous NHWC map, as NHWC maps."""
    runs = _kernel_runs(block.group_sizes, block.mix_size)
    lr, td = shifted_copies(x, block)
    return depthwise_branch(lr, block.dwconv_lr, runs), depthwise_branch(td, block.dwconv_td, runs)


def mix_fast_nhwc(x: torch.Tensor, block: 'MSMLPBlock') -> torch.Tensor:
    """The token mixer on a contiguous NHWC map; returns an NHWC map."""
    lr, td = mixed_branches(x, block)
    return lr + td


def mix_fast(x: torch.Tensor, block: 'MSMLPBlock') -> torch.Tensor:
    """The token mixer alone, NCHW in and out (the output is channels-last in memory)."""
    return mix_fast_nhwc(_as_nhwc(x), block).permute(0, 3, 1, 2)


def _as_nhwc(x: torch.Tensor) -> torch.Tensor:
    x = x.permute(0, 2, 3, 1)
    return x if x.is_contiguous() else x.contiguous()


# Rows of the channel MLP processed at once on the CPU: the 4x-wide hidden activations of a
# chunk stay in cache and are never allocated whole (the allocator maps and faults large
# fresh buffers on every call).
MLP_CHUNK_BYTES = int(os.environ.get('MSMLP_CHUNK_BYTES', 2 ** 24))


def _mlp_inference(block, lr, td, x):
    """``x + pwconv2'(gelu(pwconv1(norm(lr + td))))`` in row chunks (no autograd)."""
    c = x.shape[-1]
    lr, td, x = lr.reshape(-1, c), td.reshape(-1, c), x.reshape(-1, c)
    gamma = block.gamma
    w1, b1 = block.pwconv1.weight.t(), block.pwconv1.bias
    w2, b2 = (block.pwconv2.weight * gamma[:, None]).t(), block.pwconv2.bias * gamma
    norm = block.norm
    out = torch.empty_like(x)
    rows = max(16, int(os.environ.get('MSMLP_CHUNK_BYTES', MLP_CHUNK_BYTES)) // (w1.shape[1] * x.element_size()))
    for start in range(0, x.shape[0], rows):
        part = slice(start, start + rows)
        z = F.layer_norm(torch.add(lr[part], td[part]), norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        hidden = torch.ops.aten.gelu_(torch.addmm(b1, z, w1))
        o = torch.add(x[part], b2, out=out[part])
        o.addmm_(hidden, w2)
    return out


def forward_fast(block: 'MSMLPBlock', x: torch.Tensor) -> torch.Tensor:
    """The block forward, channels-last throughout. Takes NCHW; returns NCHW whose memory
    is channels-last, so that the next fast block needs no copy."""
    x = _as_nhwc(x)
    lr, td = mixed_branches(x, block)
    if (os.environ.get('MSMLP_CHUNK', '1') == '1' and not torch.is_grad_enabled() and x.device.type == 'cpu'
            and not torch.is_autocast_enabled('cpu') and not torch.compiler.is_compiling()
            and type(block.act) is torch.nn.GELU and block.act.approximate == 'none'):
        return _mlp_inference(block, lr, td, x).view(x.shape).permute(0, 3, 1, 2)
    y = block.act(block.pwconv1(block.norm(lr + td)))
    gamma = block.gamma
    y = F.linear(y, block.pwconv2.weight * gamma[:, None], block.pwconv2.bias * gamma)
    return (x + block.drop_path(y)).permute(0, 3, 1, 2)


MIX_IMPLS: Dict[str, Callable[[torch.Tensor, 'MSMLPBlock'], torch.Tensor]] = {
    'reference': mix_reference,
    'fast': mix_fast,
}


def shift_mix(x: torch.Tensor, block: 'MSMLPBlock', impl: str) -> torch.Tensor:
    return MIX_IMPLS[impl](x, block)
