"""Shift-mix token mixing of an MS-MLP block, in several implementations of one function.

The released block splits channels into five groups with ``torch.chunk``, rolls group g
circularly by ``shift_dist[g]`` along W (branch ``lr``) and along H (branch ``td``),
applies a depthwise conv of kernel ``mix_size[g]`` per group and branch, adds the two
branches, then runs a channel MLP (LayerNorm, Linear, GELU, Linear, layer scale) and a
residual add. ``reference`` does exactly that, in NCHW, as released: ten rolls, ten
convs, two concatenations and two permute copies per block. ``fast`` computes the same
function channels-last (NHWC) in a few large operations:

* Mixer on the CPU in float32: one C++ pass over the map (``cpu_kernel``,
  ``csrc/shift_mix.cpp``): both branches' rolls read in place, each group at its own kernel
  size, one write; for training (``_KernelShiftMix``) it keeps only its input, and its backward
  is one C++ pass for the input gradient and one for the kernels'. Where that kernel is not
  built, under autocast and on GPUs:
* Mixer (``_ShiftMix``): run by run (consecutive groups sharing a kernel size, 1x1 kernels
  joining 3x3 ones; a single image's small maps on the CPU: all groups as one run,
  ``ONE_RUN_MAX_PIXELS``), one gather of channel rows writes the run's rolled copies of both
  branches side by side (``_run_rows``: a row per pixel, branch and group, as wide as the
  first group; a roll moves values, so the circular wrap is exact), one depthwise conv applies
  the groups' kernels zero-padded (centred) to the run's largest (the zero taps add exact
  zeros), and the halves are added into the run's channels of the output. Its backward is one
  ``convolution_backward`` per run and the inverse rolls as one more gather; the weight
  gradients of large kernels on small maps are batched matrix products (oneDNN's 5x5/7x7
  depthwise weight gradient is slow there).
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

from . import cpu_kernel

if TYPE_CHECKING:
    from .model import MSMLPBlock

__all__ = ['MIX_IMPLS', 'auto_impl', 'forward_fast', 'forward_triton', 'mix_fast', 'mix_reference', 'mix_triton', 'shift_mix',
           'triton_runs', 'triton_runs_on']


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
# embedded in the largest). There per-operation overhead outweighs the zero taps (measured at
# batch 1 on stages 1-3 of msmlp_tiny); at larger batches or maps the runs are faster.
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


# ----- fast: the rolls as gathers of channel rows --------------------------------------------
# torch.chunk makes every group but the last ``sizes[0]`` channels wide, so a run's rolled copy
# is gathered in rows of that width (the "slots"): per pixel, branch and group one row, copied
# whole by index_select (5-6x faster than gathering single values). The last group's slot, when
# that group is narrower, starts before its channels: its first ``junk`` channels repeat the
# previous group's, get zero kernels, and are dropped from the output and the gradients.
class RunRows(NamedTuple):
    forward: torch.Tensor   # rows of x forming the run's rolled pair: (N, H, W, [lr, td], group)
    slots: torch.Tensor     # rows of an (N, H, W, C) map in the pair's layout, unrolled
    backward: torch.Tensor  # rows of the pair giving each slot its lr and td images' gradients


@functools.lru_cache(maxsize=64)
def _run_rows(batch: int, height: int, width: int, sizes: Tuple[int, ...], shifts: Tuple[int, ...],
              first: int, stop: int, device: torch.device) -> RunRows:
    """Row indices of the rolls of groups ``first..stop-1`` on an (N, H, W, C) map."""
    channels, slot = sum(sizes), sizes[0]
    ends = torch.tensor(sizes).cumsum(0)[first:stop]
    shift = torch.tensor(shifts[first:stop])
    n = torch.arange(batch)[:, None, None, None]
    h = torch.arange(height)[:, None, None]
    w = torch.arange(width)[:, None]
    groups = torch.arange(stop - first)

    def x_row(hh, ww):  # the slot rows of pixel (hh, ww), a start every ``slot`` channels at most
        return ((n * height + hh) * width + ww) * channels + ends - slot

    def pair_row(hh, ww, branch):  # rows of the (N, H, W, 2, groups, slot) pair
        return (((n * height + hh) * width + ww) * 2 + branch) * len(groups) + groups

    # lr[h, w] = x[h, w - s] and td[h, w] = x[h - s, w], circularly (torch.roll)
    forward = torch.stack((x_row(h, (w - shift) % width), x_row((h - shift) % height, w)), -2)
    slots = x_row(h, w).unsqueeze(-2).expand(forward.shape)
    backward = torch.stack((pair_row(h, (w + shift) % width, 0), pair_row((h + shift) % height, w, 1)), -2)
    dtype = torch.int32 if batch * height * width * channels < 2 ** 31 else torch.int64
    return RunRows(*(index.flatten().to(device, dtype) for index in (forward, slots, backward)))


def _rows(x: torch.Tensor, slot: int) -> torch.Tensor:
    """Every ``slot`` consecutive values of a contiguous map as a row: (numel - slot + 1, slot)."""
    return x.view(-1).unfold(0, slot, 1)


def _slot_pieces(run: Run, sizes: Tuple[int, ...]) -> Tuple[Tuple[slice, slice], ...]:
    """``(channels of one half of the pair, channels of x)`` that correspond, junk left out."""
    slot = sizes[0]
    half = slot * (run.groups.stop - run.groups.start)
    junk = half - (run.end - run.start)  # only the last group can be narrower
    if not junk:
        return ((slice(0, half), slice(run.start, run.end)),)
    lead = half - slot
    pieces = ((slice(0, lead), slice(run.start, run.start + lead)),) if lead else ()
    return pieces + ((slice(lead + junk, half), slice(run.start + lead, run.end)),)


def _add_halves_into(out: torch.Tensor, lr: torch.Tensor, td: torch.Tensor, run: Run, sizes) -> None:
    """``out[..., run's channels] = lr + td`` from the pair's layout."""
    for in_pair, channels in _slot_pieces(run, sizes):
        torch.add(lr[..., in_pair], td[..., in_pair], out=out[..., channels])


# ----- fast: the mixer -----------------------------------------------------------------------
def _depthwise(x: torch.Tensor, weight: torch.Tensor, bias, kernel: int) -> torch.Tensor:
    """Depthwise conv of an NHWC map (NHWC out, oneDNN's channels-last kernels)."""
    out = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=kernel // 2, groups=x.shape[-1])
    return out.permute(0, 2, 3, 1)


class MixParams(NamedTuple):
    """The block's depthwise parameters, per branch and group."""
    lr_weights: Tuple[torch.Tensor, ...]
    lr_biases: Tuple[torch.Tensor, ...]
    td_weights: Tuple[torch.Tensor, ...]
    td_biases: Tuple[torch.Tensor, ...]

    @classmethod
    def of(cls, block: 'MSMLPBlock') -> 'MixParams':
        lr, td = block.dwconv_lr, block.dwconv_td
        return cls(*(tuple(getattr(conv, name) for conv in convs)
                     for convs in (lr, td) for name in ('weight', 'bias')))

    def flat(self) -> torch.Tensor:
        """Every value, in field order, then a zero."""
        return torch.cat([t.view(-1) for part in self for t in part] + [self.lr_biases[0].new_zeros(1)])


@functools.lru_cache(maxsize=None)
def _slot_kernel_index(sizes: Tuple[int, ...], kernels: Tuple[int, ...], first: int, stop: int, k: int,
                       device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Where each value of the run's slot kernels (and biases) sits in ``MixParams.flat``: the
    groups' kernels centred in ``k`` x ``k``, zero (the last index) around them and for junk."""
    taps = [size * kernel * kernel for size, kernel in zip(sizes, kernels)]
    # flat holds the lr weights, the lr biases, then the td weights and biases at the same offsets + branch
    weight_starts = torch.tensor([0] + taps).cumsum(0)
    bias_starts = weight_starts[-1] + torch.tensor([0] + list(sizes)).cumsum(0)
    branch = int(bias_starts[-1])
    zero = 2 * branch
    weights, biases = [], []
    for b in range(2):
        for g in range(first, stop):
            junk, kernel, pad = sizes[0] - sizes[g], kernels[g], (k - kernels[g]) // 2
            grid = torch.full((sizes[0], k, k), zero)
            grid[junk:, pad:pad + kernel, pad:pad + kernel] = b * branch + weight_starts[g] + torch.arange(
                taps[g]).view(sizes[g], kernel, kernel)
            weights.append(grid.flatten())
            biases.append(torch.cat((torch.full((junk,), zero), b * branch + bias_starts[g] + torch.arange(sizes[g]))))
    return torch.cat(weights).to(device), torch.cat(biases).to(device)


def _gathers_kernels(run: Run, kernels: Tuple[int, ...]) -> bool:
    """Whether the run's kernels are gathered from ``MixParams.flat`` (two gathers) rather than
    padded one by one: where more than one group's kernel needs padding (measured on msmlp_tiny)."""
    return sum(kernels[g] < run.kernel for g in range(run.groups.start, run.groups.stop)) > 1


def _slot_kernels(params: MixParams, flat, run: Run, sizes: Tuple[int, ...],
                  kernels: Tuple[int, ...]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The run's kernels in the pair's layout, each zero-padded (centred) to the run's kernel,
    zero for junk channels; and the biases. ``flat`` is ``params.flat()`` (computed once per
    block) where any run ``_gathers_kernels``."""
    k = run.kernel
    if _gathers_kernels(run, kernels):
        weight_index, bias_index = _slot_kernel_index(sizes, kernels, run.groups.start, run.groups.stop, k,
                                                      flat.device)
        return flat.index_select(0, weight_index).view(-1, 1, k, k), flat.index_select(0, bias_index)
    weights, biases = [], []
    for branch_weights, branch_biases in ((params.lr_weights, params.lr_biases),
                                          (params.td_weights, params.td_biases)):
        for g in range(run.groups.start, run.groups.stop):
            weight, bias = branch_weights[g], branch_biases[g]
            junk = sizes[0] - sizes[g]
            if junk:
                weights.append(weight.new_zeros(junk, 1, k, k))
                biases.append(bias.new_zeros(junk))
            pad = (k - kernels[g]) // 2
            weights.append(F.pad(weight, [pad] * 4) if pad else weight)
            biases.append(bias)
    return torch.cat(weights), torch.cat(biases)


def _shift_mix(x: torch.Tensor, block: 'MSMLPBlock', params: MixParams):
    """The fast mixer's forward (see ``_ShiftMix``): the output, and each run's rolled pair and
    kernels (what the backward needs)."""
    n, h, w, c = x.shape
    sizes, shifts = block.group_sizes, block.shift_dist
    rows = _rows(x, sizes[0])
    runs = mix_runs(n, h, w, x.device.type, sizes, block.mix_size)
    flat = params.flat() if any(_gathers_kernels(run, block.mix_size) for run in runs) else None
    out = None
    pairs, weights = [], []
    for run in runs:
        index = _run_rows(n, h, w, sizes, shifts, run.groups.start, run.groups.stop, x.device).forward
        pair = rows.index_select(0, index).view(n, h, w, -1)
        weight, bias = _slot_kernels(params, flat, run, sizes, block.mix_size)
        mixed = _depthwise(pair, weight, bias, run.kernel)
        if out is None:
            out = mixed.new_empty(n, h, w, c)  # autocast may have run the conv in another dtype
        half = pair.shape[-1] // 2
        _add_halves_into(out, mixed[..., :half], mixed[..., half:], run, sizes)
        pairs.append(pair)
        weights.append(weight)
    return out, pairs, weights


class _ShiftMix(torch.autograd.Function):
    """The fast token mixer of a contiguous NHWC map.

    Forward, run by run (groups sharing a kernel size): one gather of channel rows writes the
    run's rolled copies of both branches side by side (``[lr | td]``, see ``_run_rows``), one
    depthwise conv applies the groups' kernels embedded in the run's largest, and the halves
    are added into the run's channels of the output. Backward, per run: the output gradient
    gathered into the pair's layout, one ``convolution_backward`` for the input and weight
    gradients (batched matrix products for large kernels on small maps, see
    ``_toeplitz_weight_grad``), then the inverse rolls as one more gather.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, block: 'MSMLPBlock', *params: torch.Tensor) -> torch.Tensor:
        out, pairs, weights = _shift_mix(x, block, MixParams(*(params[i::4] for i in range(4))))
        ctx.block_args = block.group_sizes, block.shift_dist, block.mix_size
        ctx.save_for_backward(*pairs, *weights)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        sizes, shifts, kernels = ctx.block_args
        saved = [t.to(grad.dtype) for t in ctx.saved_tensors]  # autocast ran the convs in grad's dtype
        pairs, weights = saved[:len(saved) // 2], saved[len(saved) // 2:]
        need_x, need_params = ctx.needs_input_grad[0], any(ctx.needs_input_grad[2:])
        grad = grad.contiguous()
        n, h, w, _ = grad.shape
        grad_rows = _rows(grad, sizes[0])
        grad_x = torch.empty_like(grad) if need_x else None
        grad_weight: List[List[torch.Tensor]] = [[], []]
        runs = mix_runs(n, h, w, grad.device.type, sizes, kernels)
        for run, pair, weight in zip(runs, pairs, weights):
            index = _run_rows(n, h, w, sizes, shifts, run.groups.start, run.groups.stop, grad.device)
            half = pair.shape[-1] // 2
            both = grad_rows.index_select(0, index.slots).view(pair.shape)  # d(lr + td)/d lr and /d td
            toeplitz = need_params and _toeplitz_suits(grad, run.kernel)
            grad_pair, run_weight_grad = _depthwise_backward(both, pair, weight, run.kernel, need_x,
                                                             need_params and not toeplitz)
            if toeplitz:
                run_weight_grad = _toeplitz_weight_grad(pair[..., :half], pair[..., half:], both[..., :half],
                                                        run.kernel)
            if need_x:
                unrolled = grad_pair.reshape(-1, sizes[0]).index_select(0, index.backward).view(n, h, w, 2, half)
                _add_halves_into(grad_x, unrolled[..., 0, :], unrolled[..., 1, :], run, sizes)
            if need_params:
                _split_weight_grad(run_weight_grad.view(2, half, run.kernel, run.kernel), run, sizes, kernels,
                                   grad_weight)
        if not need_params:  # frozen mixer
            return _mixer_grads(ctx, grad_x)
        return _mixer_grads(ctx, grad_x, grad, *grad_weight)


def _mixer_grads(ctx, grad_x, grad=None, lr_weight_grads=(), td_weight_grads=()) -> tuple:
    """A mixer function's backward result for ``(x, block, *per group: lr weight, lr bias, td
    weight, td bias)``: no parameter gradients without ``grad`` (a frozen mixer); else the
    kernels' as given and the biases' from the output gradient."""
    if grad is None:
        return (grad_x, None) + (None,) * (len(ctx.needs_input_grad) - 2)
    sizes = [w.shape[0] for w in lr_weight_grads]
    grad_bias = grad.sum((0, 1, 2)).split(sizes)  # d(lr + td)/d bias: the same for both branches
    return (grad_x, None, *[t for g in range(len(sizes))
                            for t in (lr_weight_grads[g], grad_bias[g], td_weight_grads[g], grad_bias[g])])


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
    """Append each group's weight gradient (its slot without junk, cropped to its own kernel)
    per branch."""
    slot = sizes[0]
    for i, g in enumerate(range(run.groups.start, run.groups.stop)):
        channels = slice((i + 1) * slot - sizes[g], (i + 1) * slot)
        crop = slice((run.kernel - kernels[g]) // 2, (run.kernel + kernels[g]) // 2)
        for branch in range(2):
            grad_weight[branch].append(run_grad[branch, channels, None, crop, crop])


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
    """The token mixer on a contiguous NHWC map; returns an NHWC map (contiguous, except
    when compiled: the compiler lays it out)."""
    if torch.compiler.is_compiling():  # the compiler fuses the released rolls and concatenations itself
        return mix_reference(x.permute(0, 3, 1, 2), block).permute(0, 2, 3, 1)
    params = MixParams.of(block)
    tensors = [t for group in zip(*params) for t in group]  # per group: lr weight, lr bias, td weight, td bias
    differentiable = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in tensors))
    if cpu_kernel.suits(x):  # float32 on the CPU: C++ passes (msmlp/cpu_kernel.py)
        if not differentiable:
            return cpu_kernel.shift_mix(x, *params, block.shift_dist)
        return _KernelShiftMix.apply(x, block, *tensors)
    if not differentiable:
        return _shift_mix(x, block, params)[0]  # no autograd node
    return _ShiftMix.apply(x, block, *tensors)


class _KernelShiftMix(torch.autograd.Function):
    """The mixer by the CPU kernel, with its gradients: the forward keeps only its input; the
    backward is one C++ pass for the input gradient (each branch's adjoint: the rotated kernel
    read around where the roll moved each pixel) and one for the kernels' gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, block: 'MSMLPBlock', *tensors: torch.Tensor) -> torch.Tensor:
        params = MixParams(*(tensors[i::4] for i in range(4)))
        ctx.block_args = block.group_sizes, block.shift_dist
        ctx.save_for_backward(x, *params.lr_weights, *params.td_weights)
        return cpu_kernel.shift_mix(x, *params, block.shift_dist)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        sizes, shifts = ctx.block_args
        x, *weights = ctx.saved_tensors
        lr_weights, td_weights = weights[:len(sizes)], weights[len(sizes):]
        grad = grad.contiguous()
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = cpu_kernel.shift_mix_grad_input(grad, lr_weights, td_weights, shifts)
        if not any(ctx.needs_input_grad[2:]):  # frozen mixer
            return _mixer_grads(ctx, grad_x)
        grad_weights = cpu_kernel.shift_mix_grad_weight(grad, x, lr_weights, td_weights, shifts)
        return _mixer_grads(ctx, grad_x, grad, grad_weights[0::2], grad_weights[1::2])


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
def fused_linear_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN's fused Linear+GELU and Linear+add (the ops the compiler emits on the
    CPU) exist in this torch build, agree exactly with the plain operations in fp32, and run in
    ``dtype`` on this CPU (oneDNN has no bf16 products on a CPU without bf16 instructions: an
    AMD EPYC with AVX2 refuses them)."""
    try:
        with torch.autocast('cpu', enabled=False), torch.no_grad():
            return _fused_matches_plain() and (dtype == torch.float32 or _fused_runs(dtype))
    except (AttributeError, RuntimeError):
        return False


def _fused(x: torch.Tensor) -> torch.Tensor:
    linear = torch.ops.mkldnn._linear_pointwise
    return linear.binary(linear(x, x, x[0], 'gelu', [], 'none'), x, x, x[0], 'add')


def _fused_matches_plain() -> bool:
    x = torch.ones(2, 2)
    return torch.equal(_fused(x), F.linear(F.gelu(F.linear(x, x, x[0])), x, x[0]) + x)


def _fused_runs(dtype: torch.dtype) -> bool:
    return _fused(torch.ones(2, 2, dtype=dtype)).dtype == dtype  # raises where oneDNN has no such product


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
    fused = dtype in (torch.float32, torch.bfloat16) and fused_linear_available(dtype)
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
    return _after_norm(block, x, block.norm(mixed))


def _after_norm(block: 'MSMLPBlock', x: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
    """``x + drop_path(mlp(normed))`` on NHWC maps, returned as NCHW."""
    w2, b2 = _folded_pwconv2(block)
    y = F.linear(block.act(block.pwconv1(normed)), w2, b2)
    return (x + block.drop_path(y)).permute(0, 3, 1, 2)


# ----- triton: the mixer as one kernel (msmlp/triton_mix.py) ---------------------------------
def triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton mixer runs on ``device``'s tensors: triton imports and the device is a
    GPU, or the CPU under Triton's interpreter (``TRITON_INTERPRET=1``)."""
    if device.type not in ('cuda', 'cpu'):
        return False
    from . import triton_mix
    return triton_mix.available() and (device.type == 'cuda') != triton_mix.interpreted()


def triton_runs(x: torch.Tensor) -> bool:
    """Whether the Triton mixer runs on ``x`` (``triton_runs_on`` its device)."""
    return triton_runs_on(x.device)


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


def _norm_fusable(block: 'MSMLPBlock') -> bool:
    norm = block.norm
    return type(norm) is nn.LayerNorm and norm.weight is not None and norm.bias is not None


def _norm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the layer after the norm computes in: autocast's where it is on (a separate
    norm would give fp32 and the linear layer cast it), else ``x``'s."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def forward_triton_norm(block: 'MSMLPBlock', x: torch.Tensor) -> torch.Tensor:
    """The block with the Triton mixer and the LayerNorm after it as one kernel, then the plain
    channel MLP; ``forward_triton`` where the norm is not a LayerNorm with weight and bias, the
    fast path where Triton cannot run."""
    if not (triton_runs(x) and _norm_fusable(block)):
        return forward_triton(block, x)
    from .triton_mix import shift_mix_norm_triton
    x = _as_nhwc(x)
    lr, td, norm = block.dwconv_lr, block.dwconv_td, block.norm
    normed = shift_mix_norm_triton(x, [c.weight for c in lr], [c.bias for c in lr], [c.weight for c in td],
                                   [c.bias for c in td], block.shift_dist, block.mix_size, block.group_sizes,
                                   norm.weight, norm.bias, norm.eps, _norm_dtype(x))
    return _after_norm(block, x, normed)


def auto_impl(x: torch.Tensor) -> str:
    """What ``mix_impl='auto'`` (the default) runs on ``x``: the Triton mixer on a CUDA map
    where triton imports and the map fits its 32-bit indexing (measured faster than the fast
    path on an H200 in every setting: docs/speed.md), else the fast path."""
    if x.is_cuda and triton_runs(x):
        from .triton_mix import fits
        n, c, h, w = x.shape
        if fits(n, h, w, c):
            return 'triton'
    return 'fast'


def mix_auto(x: torch.Tensor, block: 'MSMLPBlock') -> torch.Tensor:
    return MIX_IMPLS[block._impl_for(x)](x, block)


MIX_IMPLS: Dict[str, Callable[[torch.Tensor, 'MSMLPBlock'], torch.Tensor]] = {
    'auto': mix_auto,
    'reference': mix_reference,
    'fast': mix_fast,
    'triton': mix_triton,
    'triton_norm': mix_triton,  # the mixer alone is triton's; the block fuses the norm after it
}


# The block's forward on the channels-last paths, by the implementation it runs
BLOCK_FORWARDS: Dict[str, Callable[['MSMLPBlock', torch.Tensor], torch.Tensor]] = {
    'fast': forward_fast,
    'triton': forward_triton,
    'triton_norm': forward_triton_norm,
}


def shift_mix(x: torch.Tensor, block: 'MSMLPBlock', impl: str) -> torch.Tensor:
    return MIX_IMPLS[impl](x, block)
