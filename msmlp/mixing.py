"""Shift-mix token mixing of an MS-MLP block, in two implementations of one function.

The released block splits channels into five groups with ``torch.chunk``, rolls group g
circularly by ``shift_dist[g]`` along W (branch ``lr``) and along H (branch ``td``),
applies a depthwise conv of kernel ``mix_size[g]`` per group and branch, adds the two
branches, then runs a channel MLP (LayerNorm, Linear, GELU, Linear, layer scale) and a
residual add. ``reference`` does exactly that, in NCHW, as released: ten rolls, ten
convs, two concatenations and two permute copies per block. ``fast`` computes the same
function channels-last (NHWC) in a few large operations:

* Mixer (``_ShiftMix``): run by run (consecutive groups sharing a kernel size, 1x1 kernels
  joining 3x3 ones), the run's rolled copies of both branches are written side by side (on
  the CPU as two slice copies per group and branch, on a GPU as one gather with a
  precomputed index; a roll moves values, so the circular wrap is exact), one depthwise
  conv applies the groups' kernels zero-padded (centred) to the run's largest (the zero
  taps add exact zeros), and the halves are added into the run's channels of the output
  (a single image's small maps on the CPU: all groups as one run, rolled by one gather,
  ``ONE_RUN_MAX_PIXELS``). Its backward is one ``convolution_backward`` per run and
  the inverse rolls; the weight gradients of large kernels on small maps are batched
  matrix products (oneDNN's 5x5/7x7 depthwise weight gradient is slow there).
* Channel MLP: on the same NHWC rows, no permute copies, the layer scale folded into
  ``pwconv2`` (``gamma * (W h + b) == (gamma W) h + gamma b``; for inference on fewer rows
  than the hidden width the output is scaled instead, which costs less than the fold). On the CPU it runs in
  row chunks of at most ``MLP_CHUNK_BYTES`` of hidden activations: without autograd
  through oneDNN's fused Linear+GELU and Linear+residual-add; with autograd as one
  function that keeps each chunk's normed input, pre-activation and activation for its
  backward, which runs chunk by chunk too. Chunks keep the 4x-wide hidden activations in
  cache and out of freshly mapped pages (glibc maps every allocation above 32 MiB afresh,
  and faulting those pages in costs as much as the work on them).

Autocast runs the convs and products in its dtype, as the plain operations would (training
under autocast takes the plain MLP operations). Under ``torch.compile`` a fast block runs the
released block (``MSMLPBlock.forward``), whose rolls and concatenations inductor fuses
itself; the fast functions called directly fall back to the released mixer and the plain
MLP operations.
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

__all__ = ['MIX_IMPLS', 'forward_fast', 'forward_triton', 'mix_fast', 'mix_reference', 'mix_triton', 'shift_mix',
           'triton_runs']


# ----- reference: the released computation ---------------------------------------------------
def mix_reference(x: torch.Tensor, block: 'MSMLPBlock') -> torch.Tensor:
    """The released computation: per-group roll and per-group depthwise conv (NCHW); written
    as the block's ``mix_released`` so that TorchScript compiles it with the block."""
    return block.mix_released(x)


# ----- fast: the runs of one block -----------------------------------------------------------
class Run(NamedTuple):
    """Consecutive channel groups mixed by one depthwise conv at ``kernel``."""
    start: int     # first channel
    end: int       # one past the last channel
    kernel: int    # the largest kernel of its groups
    groups: slice  # the groups' indices


@functools.lru_cache(maxsize=None)
def kernel_runs(sizes: Tuple[int, ...], kernels: Tuple[int, ...]) -> Tuple[Run, ...]:
    """Runs of consecutive groups with one kernel size, or all with kernels of at most 3
    (oneDNN's fast 3x3 depthwise kernels cover 1x1 kernels embedded in 3x3)."""
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


# Single images up to this many pixels per map, on the CPU: all groups as one run (every kernel
# embedded in the largest) rolled by one gather. There per-operation overhead outweighs the zero
# taps (measured at batch 1 on stages 1-3 of msmlp_tiny: the mixer 1.4-2.7x faster); at larger
# batches or maps the runs of slice copies are faster.
ONE_RUN_MAX_PIXELS = 28 * 28


def _one_run(batch: int, height: int, width: int, device_type: str) -> bool:
    return device_type == 'cpu' and batch == 1 and height * width <= ONE_RUN_MAX_PIXELS


def mix_runs(batch: int, height: int, width: int, device_type: str, sizes: Tuple[int, ...],
             kernels: Tuple[int, ...]) -> Tuple[Run, ...]:
    """The runs the fast mixer convolves on an (N, H, W) map: ``kernel_runs``, or one run of
    all groups for single small maps on the CPU (``ONE_RUN_MAX_PIXELS``)."""
    if _one_run(batch, height, width, device_type):
        return (Run(0, sum(sizes), max(kernels), slice(0, len(sizes))),)
    return kernel_runs(sizes, kernels)


def _roll_into(dst: torch.Tensor, src: torch.Tensor, shift: int, dim: int, accumulate: bool = False) -> None:
    """``dst = torch.roll(src, shift, dim)`` (or ``+=``) as two slice copies, for strided views."""
    length = src.shape[dim]
    k = shift % length
    for target, source in ((dst.narrow(dim, k, length - k), src.narrow(dim, 0, length - k)),
                           (dst.narrow(dim, 0, k), src.narrow(dim, length - k, k))):
        if target.numel():
            target.add_(source) if accumulate else target.copy_(source)


# NHWC dimensions the two branches roll along: lr along W, td along H
BRANCH_DIMS = (2, 1)


class RunIndex(NamedTuple):
    forward: torch.Tensor      # flat source in x of the run's [lr | td] rolled copy (H*W*2c entries)
    backward_lr: torch.Tensor  # flat source in that copy of each x entry's lr image (H*W*c entries)
    backward_td: torch.Tensor


@functools.lru_cache(maxsize=64)
def _run_index(height: int, width: int, sizes: Tuple[int, ...], shifts: Tuple[int, ...], start: int, end: int,
               device: torch.device) -> RunIndex:
    """The rolls of one run's channels of an NHWC map as gather indices (cached for a few sizes)."""
    channels = sum(sizes)
    shift = torch.repeat_interleave(torch.tensor(shifts), torch.tensor(sizes))[start:end]  # per channel
    h = torch.arange(height)[:, None, None]
    w = torch.arange(width)[None, :, None]
    c = torch.arange(start, end)
    row, col = width * channels, channels
    # lr[h, w, c] = x[h, w - s, c] and td[h, w, c] = x[h - s, w, c], circularly (torch.roll)
    forward = torch.cat((h * row + (w - shift) % width * col + c, (h - shift) % height * row + w * col + c), -1)
    half = end - start
    pair_row, pair_col, j = width * 2 * half, 2 * half, c - start
    backward_lr = h * pair_row + (w + shift) % width * pair_col + j
    backward_td = (h + shift) % height * pair_row + w * pair_col + half + j
    dtype = torch.int32 if height * width * channels * 2 < 2 ** 31 else torch.int64
    return RunIndex(*(index.flatten().to(device, dtype) for index in (forward, backward_lr, backward_td)))


def _gathers(x: torch.Tensor) -> bool:
    """Whether rolls run as one gather (off the CPU, and for the one run of a single small
    map) rather than as slice copies."""
    return x.device.type != 'cpu' or _one_run(*x.shape[:3], x.device.type)


def _group_branches(run: Run, sizes: Tuple[int, ...]):
    """Per group of the run and per branch: ``(group, branch, channels in x, channels in the
    run's [lr | td] copy, the NHWC dimension the branch rolls along)``."""
    half = run.end - run.start
    for g in range(run.groups.start, run.groups.stop):
        start = sum(sizes[:g])
        for branch, dim in enumerate(BRANCH_DIMS):
            offset = start - run.start + branch * half
            yield g, branch, slice(start, start + sizes[g]), slice(offset, offset + sizes[g]), dim


def _rolled_pair(x: torch.Tensor, run: Run, sizes: Tuple[int, ...], shifts: Tuple[int, ...]) -> torch.Tensor:
    """The run's channels of ``x`` rolled per group, lr then td: ``(N, H, W, 2 c)``.

    On the CPU as slice copies (no index to read; faster there), elsewhere as one gather (one
    kernel launch, where a dozen small copies would be launch-bound)."""
    n, h, w, _ = x.shape
    half = run.end - run.start
    if _gathers(x):
        index = _run_index(h, w, sizes, shifts, run.start, run.end, x.device)
        return _gather(x, index.forward).view(n, h, w, 2 * half)
    pair = x.new_empty(n, h, w, 2 * half)
    for g, _, channels, in_pair, dim in _group_branches(run, sizes):
        _roll_into(pair[..., in_pair], x[..., channels], shifts[g], dim)
    return pair


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Each image's entries of ``x`` at the flat ``index`` (a single image as one flat gather,
    faster on the CPU)."""
    if x.shape[0] == 1 and x.is_contiguous():
        return x.view(-1).index_select(0, index)
    return x.reshape(x.shape[0], -1).index_select(1, index)


def _unroll_pair_into(grad_x: torch.Tensor, grad_pair: torch.Tensor, run: Run, sizes: Tuple[int, ...],
                      shifts: Tuple[int, ...]) -> None:
    """The adjoint of ``_rolled_pair``: the inverse rolls of both branches, summed into the
    run's channels of ``grad_x``."""
    n, h, w, _ = grad_x.shape
    half = run.end - run.start
    if _gathers(grad_x):
        index = _run_index(h, w, sizes, shifts, run.start, run.end, grad_x.device)
        torch.add(_gather(grad_pair, index.backward_lr).view(n, h, w, half),
                  _gather(grad_pair, index.backward_td).view(n, h, w, half), out=grad_x[..., run.start:run.end])
        return
    for g, branch, channels, in_pair, dim in _group_branches(run, sizes):
        _roll_into(grad_x[..., channels], grad_pair[..., in_pair], -shifts[g], dim, accumulate=branch > 0)


# ----- fast: the mixer -----------------------------------------------------------------------
def _depthwise(x: torch.Tensor, weight: torch.Tensor, bias, kernel: int) -> torch.Tensor:
    """Depthwise conv of an NHWC map (NHWC out, oneDNN's channels-last kernels)."""
    out = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=kernel // 2, groups=x.shape[-1])
    return out.permute(0, 2, 3, 1)


def _embed(weights: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """Per-group depthwise kernels, each zero-padded (centred) to ``size`` x ``size``, stacked."""
    return torch.cat([w if w.shape[-1] == size else F.pad(w, [(size - w.shape[-1]) // 2] * 4) for w in weights])


def _shift_mix(x: torch.Tensor, block: 'MSMLPBlock', params: Sequence[torch.Tensor]):
    """The fast mixer's forward (see ``_ShiftMix``): the output, the runs, and each run's
    rolled pair and embedded kernels (what the backward needs)."""
    n, h, w, c = x.shape
    sizes, shifts = block.group_sizes, block.shift_dist
    lr_weights, lr_biases = params[0:len(params) // 2:2], params[1:len(params) // 2:2]
    td_weights, td_biases = params[len(params) // 2::2], params[len(params) // 2 + 1::2]
    runs = mix_runs(n, h, w, x.device.type, sizes, block.mix_size)
    out = None
    pairs, weights = [], []
    for run in runs:
        groups, half = run.groups, run.end - run.start
        pair = _rolled_pair(x, run, sizes, shifts)
        weight = _embed(lr_weights[groups] + td_weights[groups], run.kernel)
        mixed = _depthwise(pair, weight, torch.cat(lr_biases[groups] + td_biases[groups]), run.kernel)
        if out is None:
            out = mixed.new_empty(n, h, w, c)  # autocast may have run the conv in another dtype
        torch.add(mixed[..., :half], mixed[..., half:], out=out[..., run.start:run.end])
        pairs.append(pair)
        weights.append(weight)
    return out, runs, pairs, weights


class _ShiftMix(torch.autograd.Function):
    """The fast token mixer of a contiguous NHWC map.

    Forward, run by run (groups sharing a kernel size): ``_rolled_pair`` writes the run's
    rolled copies of both branches side by side (``[lr | td]``), one depthwise conv applies the
    groups' kernels embedded in the run's largest, and the halves are added into the run's
    channels of the output. Each run's tensors stay small (below glibc's mmap threshold at
    batch 16 and 224x224, so they are reused rather than freshly mapped and faulted in).
    Backward, per run: one ``convolution_backward`` for the input and weight gradients
    (batched matrix products for large kernels on small maps, see ``_toeplitz_weight_grad``),
    then the inverse rolls (``_unroll_pair_into``).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, block: 'MSMLPBlock', *params: torch.Tensor) -> torch.Tensor:
        out, runs, pairs, weights = _shift_mix(x, block, params)
        ctx.runs, ctx.sizes, ctx.shifts, ctx.kernels = runs, block.group_sizes, block.shift_dist, block.mix_size
        ctx.save_for_backward(*pairs, *weights)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        runs, sizes, shifts, kernels = ctx.runs, ctx.sizes, ctx.shifts, ctx.kernels
        saved = [t.to(grad.dtype) for t in ctx.saved_tensors]  # autocast ran the convs in grad's dtype
        pairs, weights = saved[:len(runs)], saved[len(runs):]
        need_x, need_params = ctx.needs_input_grad[0], any(ctx.needs_input_grad[2:])
        grad = grad.contiguous()
        grad_x = torch.empty_like(grad) if need_x else None
        grad_weight: List[List[torch.Tensor]] = [[], []]
        for run, pair, weight in zip(runs, pairs, weights):
            half = run.end - run.start
            run_grad = grad[..., run.start:run.end]
            both = torch.cat((run_grad, run_grad), dim=-1)  # d(lr + td)/d lr and /d td
            toeplitz = need_params and _toeplitz_suits(grad, run.kernel)
            grad_pair, run_weight_grad = _depthwise_backward(both, pair, weight, run.kernel, need_x,
                                                             need_params and not toeplitz)
            if toeplitz:
                run_weight_grad = _toeplitz_weight_grad(pair[..., :half], pair[..., half:], run_grad, run.kernel)
            if need_x:
                _unroll_pair_into(grad_x, grad_pair, run, sizes, shifts)
            if need_params:
                _split_weight_grad(run_weight_grad.view(2, half, run.kernel, run.kernel), run, sizes, kernels,
                                   grad_weight)
        if not need_params:  # frozen mixer
            return (grad_x, None) + (None,) * (len(ctx.needs_input_grad) - 2)
        grad_bias = grad.sum((0, 1, 2)).split(sizes)  # d(lr + td)/d bias: the same for both branches
        return (grad_x, None, *[t for branch in range(2) for pair_grads in zip(grad_weight[branch], grad_bias)
                                for t in pair_grads])


def _depthwise_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, kernel: int,
                        need_input: bool, need_weight: bool):
    """Input (NHWC) and weight gradients of ``_depthwise`` as asked, in one library call."""
    if not (need_input or need_weight):
        return None, None
    channels = x.shape[-1]
    grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2), weight, None, [1, 1], [kernel // 2] * 2, [1, 1],
        False, [0, 0], channels, [need_input, need_weight, False])
    return (grad_input.permute(0, 2, 3, 1) if need_input else None), grad_weight


def _split_weight_grad(run_grad: torch.Tensor, run: Run, sizes, kernels, grad_weight) -> None:
    """Append each group's weight gradient (cropped to its own kernel) per branch."""
    for g, part in zip(range(run.groups.start, run.groups.stop), run_grad.split(sizes[run.groups], dim=1)):
        crop = slice((run.kernel - kernels[g]) // 2, (run.kernel + kernels[g]) // 2)
        for branch in range(2):
            grad_weight[branch].append(part[branch, :, None, crop, crop])


# On the CPU up to this width, the weight gradient of a 5x5 or larger depthwise kernel is
# computed with batched matrix products (see _toeplitz_weight_grad); elsewhere by the library.
TOEPLITZ_MAX_WIDTH = 32


def _toeplitz_suits(grad: torch.Tensor, kernel: int) -> bool:
    return kernel >= 5 and grad.shape[2] <= TOEPLITZ_MAX_WIDTH and grad.device.type == 'cpu'


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


def mix_fast_nhwc(x: torch.Tensor, block: 'MSMLPBlock') -> torch.Tensor:
    """The token mixer on a contiguous NHWC map; returns a contiguous NHWC map."""
    if torch.compiler.is_compiling():  # the compiler fuses the released rolls and concatenations itself
        return mix_reference(x.permute(0, 3, 1, 2), block).permute(0, 2, 3, 1)
    params = [t for convs in (block.dwconv_lr, block.dwconv_td) for conv in convs for t in (conv.weight, conv.bias)]
    if not torch.is_grad_enabled() or not (x.requires_grad or any(p.requires_grad for p in params)):
        return _shift_mix(x, block, params)[0]  # nothing to differentiate: no autograd node
    return _ShiftMix.apply(x, block, *params)


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
        with torch.autocast('cpu', enabled=False), torch.no_grad():
            return _fused_matches_plain()
    except (AttributeError, RuntimeError):
        return False


def _fused_matches_plain() -> bool:
    x = torch.ones(2, 2)
    linear = torch.ops.mkldnn._linear_pointwise
    return torch.equal(linear.binary(linear(x, x, x[0], 'gelu', [], 'none'), x, x, x[0], 'add'),
                       F.linear(F.gelu(F.linear(x, x, x[0])), x, x[0]) + x)


def _mlp_inference(mixed, x, norm_weight, norm_bias, w1, b1, w2, b2, eps: float, rows: int,
                   gamma=None) -> torch.Tensor:
    """``x + gelu(norm(mixed) w1' + b1) w2' + b2`` over row chunks of 2-D inputs (no autograd):
    per chunk, a norm and two oneDNN products with the GELU and the residual add fused; with
    ``gamma`` (the layer scale, not folded into ``w2``, ``b2``), ``x + gamma * (...)``.
    Under autocast the products run in its dtype and the residual add in ``x``'s, as the
    plain operations would."""
    c = x.shape[1]
    dtype = torch.get_autocast_dtype('cpu') if torch.is_autocast_enabled('cpu') else x.dtype
    w1, b1, w2, b2 = (t.to(dtype) for t in (w1, b1, w2, b2))
    fused = dtype in (torch.float32, torch.bfloat16) and fused_linear_available()
    linear = torch.ops.mkldnn._linear_pointwise
    outs = []
    for start in range(0, x.shape[0], rows):
        part = slice(start, start + rows)
        z = F.layer_norm(mixed[part], (c,), norm_weight, norm_bias, eps).to(dtype)
        hidden = linear(z, w1, b1, 'gelu', [], 'none') if fused else torch.ops.aten.gelu_(torch.addmm(b1, z, w1.t()))
        if gamma is not None:
            y = linear(hidden, w2, b2, 'none', [], 'none') if fused else torch.addmm(b2, hidden, w2.t())
            outs.append(torch.addcmul(x[part], y.to(x.dtype), gamma.to(x.dtype)))
        elif fused and dtype == x.dtype:
            outs.append(linear.binary(hidden, x[part], w2, b2, 'add'))
        else:
            outs.append(torch.add(x[part], torch.addmm(b2, hidden, w2.t())))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _mlp_chunks(mixed, x, scale, norm_weight, norm_bias, w1, b1, w2, b2, eps: float, rows: int,
                saved: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x + scale * (gelu(norm(mixed) w1' + b1) w2' + b2)`` over row chunks of 2-D inputs,
    appending each chunk's normed input, pre-activation and activation to ``saved``; returns
    the output and the norm statistics."""
    c = x.shape[1]
    out = torch.empty_like(x)
    means, rstds = [], []
    w1t, w2t = w1.t(), w2.t()
    for start in range(0, x.shape[0], rows):
        part = slice(start, start + rows)
        z, mean, rstd = torch.native_layer_norm(mixed[part], (c,), norm_weight, norm_bias, eps)
        pre = torch.addmm(b1, z, w1t)
        hidden = F.gelu(pre)
        saved += (z, pre, hidden)
        means.append(mean)
        rstds.append(rstd)
        if scale is None:
            torch.add(x[part], b2, out=out[part]).addmm_(hidden, w2t)
        else:
            torch.addcmul(x[part], torch.addmm(b2, hidden, w2t), scale[part, None], out=out[part])
    return out, torch.cat(means), torch.cat(rstds)


class _ChannelMLP(torch.autograd.Function):
    """The block's channel MLP and residual add over row chunks (see ``_mlp_chunks``).

    The forward keeps each chunk's normed input, pre-activation and activation as tensors of
    their own (each below the mmap threshold, so their memory is reused rather than freshly
    mapped); the backward runs chunk by chunk, its 4x-wide gradients staying in cache.
    """

    @staticmethod
    def forward(ctx, mixed, x, scale, norm_weight, norm_bias, w1, b1, w2, b2, eps: float, rows: int):
        saved: List[torch.Tensor] = []
        out, mean, rstd = _mlp_chunks(mixed, x, scale, norm_weight, norm_bias, w1, b1, w2, b2, eps, rows, saved)
        ctx.eps, ctx.rows = eps, rows
        ctx.save_for_backward(mixed, mean, rstd, scale, norm_weight, norm_bias, w1, w2, *saved)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        mixed, mean, rstd, scale, norm_weight, norm_bias, w1, w2, *saved = ctx.saved_tensors
        c = mixed.shape[1]
        grad = grad.contiguous()
        grad_y = grad if scale is None else grad * scale[:, None]
        grad_mixed = []
        grad_w1, grad_w2 = torch.zeros_like(w1), torch.zeros_like(w2)
        grad_b1 = w1.new_zeros(w1.shape[0])
        grad_norm_weight, grad_norm_bias = torch.zeros_like(norm_weight), torch.zeros_like(norm_bias)
        chunks = zip(range(0, mixed.shape[0], ctx.rows), saved[0::3], saved[1::3], saved[2::3])
        for start, z, pre, hidden in chunks:
            part = slice(start, start + ctx.rows)
            g = grad_y[part]
            grad_w2.addmm_(g.t(), hidden)
            grad_pre = torch.ops.aten.gelu_backward(torch.mm(g, w2), pre)
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
    the CPU, without compilation (which takes the plain operations)."""
    return (x.device.type == 'cpu' and not torch.compiler.is_compiling()
            and type(block.act) is nn.GELU and block.act.approximate == 'none'
            and type(block.norm) is nn.LayerNorm and block.norm.weight is not None
            and isinstance(block.drop_path, (nn.Identity, DropPath)))


def forward_fast(block: 'MSMLPBlock', x: torch.Tensor) -> torch.Tensor:
    """The block forward, channels-last throughout. Takes NCHW; returns NCHW whose memory
    is channels-last, so that the next fast block needs no copy."""
    x = _as_nhwc(x)
    mixed = mix_fast_nhwc(x, block)
    if _fusable(block, x):
        n, h, w, c = x.shape
        scale = _drop_path_scale(block, x)
        if scale is not None:
            scale = scale.repeat_interleave(h * w)
        hidden_width = block.pwconv1.out_features
        rows = max(64, MLP_CHUNK_BYTES // (hidden_width * x.element_size()))
        inputs = (mixed.reshape(-1, c), x.reshape(-1, c), block.norm.weight, block.norm.bias,
                  block.pwconv1.weight, block.pwconv1.bias)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or mixed.requires_grad or any(
            p.requires_grad for p in (block.norm.weight, block.pwconv1.weight, block.pwconv2.weight, block.gamma)))
        if not (needs_grad or scale is not None):
            if n * h * w < hidden_width:  # scaling so few rows costs less than folding gamma into pwconv2
                (w2, b2), gamma = (block.pwconv2.weight, block.pwconv2.bias), block.gamma
            else:
                (w2, b2), gamma = _folded_pwconv2(block), None
            out = _mlp_inference(*inputs, w2, b2, block.norm.eps, rows, gamma=gamma)
            return out.view(n, h, w, c).permute(0, 3, 1, 2)
        if not torch.is_autocast_enabled('cpu'):  # autocast training takes the plain operations
            out = _ChannelMLP.apply(inputs[0], inputs[1], scale, *inputs[2:], *_folded_pwconv2(block),
                                    block.norm.eps, rows)
            return out.view(n, h, w, c).permute(0, 3, 1, 2)
    return _channel_mlp(block, x, mixed)


def _channel_mlp(block: 'MSMLPBlock', x: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
    """The rest of the block by plain operations on NHWC maps (the layer scale folded into
    ``pwconv2``): ``x + drop_path(mlp(norm(mixed)))``, returned as NCHW."""
    w2, b2 = _folded_pwconv2(block)
    y = F.linear(block.act(block.pwconv1(block.norm(mixed))), w2, b2)
    return (x + block.drop_path(y)).permute(0, 3, 1, 2)


# ----- triton: the mixer as one kernel (msmlp/triton_mix.py) ---------------------------------
def triton_runs(x: torch.Tensor) -> bool:
    """Whether the Triton mixer runs on ``x``: triton imports and ``x`` is on a GPU, or on the
    CPU under Triton's interpreter (``TRITON_INTERPRET=1``)."""
    if x.device.type not in ('cuda', 'cpu'):
        return False
    from . import triton_mix
    return triton_mix.available() and (x.device.type == 'cuda') != triton_mix.interpreted()


def _triton_mix_nhwc(x: torch.Tensor, block: 'MSMLPBlock') -> torch.Tensor:
    from .triton_mix import shift_mix_triton
    lr, td = block.dwconv_lr, block.dwconv_td
    return shift_mix_triton(x, [c.weight for c in lr], [c.bias for c in lr], [c.weight for c in td],
                            [c.bias for c in td], block.shift_dist, block.mix_size, block.group_sizes)


def mix_triton(x: torch.Tensor, block: 'MSMLPBlock') -> torch.Tensor:
    """The token mixer as one Triton kernel, NCHW in and out (channels-last in memory); the
    fast path where Triton cannot run."""
    if not triton_runs(x):
        return mix_fast(x, block)
    return _triton_mix_nhwc(_as_nhwc(x), block).permute(0, 3, 1, 2)


def forward_triton(block: 'MSMLPBlock', x: torch.Tensor) -> torch.Tensor:
    """The block with the Triton mixer and the plain channel MLP, channels-last (the layer
    scale folded into ``pwconv2``); the fast path where Triton cannot run."""
    if not triton_runs(x):
        return forward_fast(block, x)
    x = _as_nhwc(x)
    return _channel_mlp(block, x, _triton_mix_nhwc(x, block))


MIX_IMPLS: Dict[str, Callable[[torch.Tensor, 'MSMLPBlock'], torch.Tensor]] = {
    'reference': mix_reference,
    'fast': mix_fast,
    'triton': mix_triton,
}


def shift_mix(x: torch.Tensor, block: 'MSMLPBlock', impl: str) -> torch.Tensor:
    return MIX_IMPLS[impl](x, block)
