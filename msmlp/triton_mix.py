"""The MS-MLP token mixer as Triton kernels, channels-last (NHWC).

For each channel ``c`` (of group ``g``: shift ``s``, odd kernel ``k``) the mixer computes

    out[n, h, w, c] = b_lr[c] + sum_{|di|, |dj| <= k // 2} w_lr[c, di, dj] * lr[n, h + di, w + dj, c]
                    + b_td[c] + sum_{|di|, |dj| <= k // 2} w_td[c, di, dj] * td[n, h + di, w + dj, c]

with ``lr = torch.roll(x, s, W)`` and ``td = torch.roll(x, s, H)``, both zero outside the map:
the released block's rolls and depthwise convs, without materialising the rolled copies.

* Forward (``_mix_kernel``): one program per (image ``n``, tile of ``BLOCK_P`` output pixels,
  block of ``BLOCK_C`` channels of one group). A group's channels are taken in blocks from the
  8-channel vector holding its first channel, so that its shift and kernel size are scalars
  (the sources of a tap are computed per pixel, not per pixel and channel), the channels load
  as whole aligned 16-byte vectors, and a block runs only its group's taps (a block spanning
  two groups ran both groups' taps on all its channels: at 64 channels, 55% of msmlp_tiny's
  tap work was wasted, now 31%; at 16, 19% and 15%). For each row of taps of the group's own
  kernel it finds the row's sources (zero padding around the rolled map, then the roll) once,
  then per tap the column, and accumulates both branches in fp32; the group's channels of the
  block are stored (a vector shared with the next group is computed by both). ``x`` is read
  once (repeated taps hit the cache) and the output is written once.
* Input gradient: the same kernel in its adjoint form (``ADJOINT``): per branch the inverse
  roll of the output pixel, then the transposed tap.
* Weight gradient (``_weight_grad_kernel``): one program per (``COLUMNS`` taps of a row of the
  largest kernel, block of a group's channels, range of the batch's pixels), summing
  ``grad * source`` elementwise over its pixels and reducing once at the end; taps outside the
  group's kernel give zeros. ``COLUMNS`` is tuned: 1 (a program a tap) or 8 (a row of taps
  sharing each pixel's gradient and row arithmetic). The per-program partial sums are added
  with torch (deterministic, no atomics).
* Bias gradient: ``grad`` summed over N, H, W (both branches get the same).

The operator takes the groups' kernels and biases as lists and packs the kernels into one
``(2, K * K, C)`` fp32 tensor (branch, tap, channel; each kernel centred in the largest, ``K``,
zeros elsewhere) by one concatenation and one gather; its backward gathers the packed weight
gradient back into each group's ``(c_g, 1, k_g, k_g)``.
The kernels run as the custom operators ``msmlp::shift_mix_triton`` (with fake and autograd
registrations: torch.compile traces them without graph breaks, as opaque calls) and its two
gradients. They run on CUDA tensors, or on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` before triton is imported). Any input dtype is computed in fp32 and
returned in ``x``'s dtype (bf16 or fp16 under autocast).
"""
from __future__ import annotations

import contextlib
import functools
from typing import List, Optional, Sequence, Tuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the module stays importable; ``available()`` says False
    triton = None

__all__ = ['available', 'fits', 'interpreted', 'shift_mix_norm_triton', 'shift_mix_triton']

MAX_KERNEL = 7
# A program's first channel is a multiple of this (aligned 16-byte loads of bf16 and fp16)
VECTOR_CHANNELS = 8
# Programs of the weight gradient (rows of taps x channel blocks x pixel ranges): enough to fill a GPU,
# few enough that the partial sums (pixel ranges x 2 x taps x channels fp32) stay small.
WEIGHT_GRAD_PROGRAMS = 4096


# interpreted() and available() return constants set on import, not cached calls: every block asks
# them, and torch.compile warns on each ``functools.lru_cache`` it traces.
def interpreted() -> bool:
    """Whether triton runs kernels with its CPU interpreter (``TRITON_INTERPRET=1``), as fixed
    when the kernels were defined."""
    return _INTERPRETED


def available() -> bool:
    """Whether the kernels can run here: triton imports, and a GPU or the interpreter runs them."""
    return _AVAILABLE


def _kernels_interpreted() -> bool:
    if triton is None:
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(_mix_kernel, InterpretedFunction)


if triton is not None:
    @triton.jit
    def _wrap(index, size):
        """``index`` in ``(-size, 2 size)`` brought into ``[0, size)`` (a circular index)."""
        index = tl.where(index < 0, index + size, index)
        return tl.where(index >= size, index - size, index)

    @triton.jit
    def _group(group_ptr, g, H, W):
        """Group ``g``'s first and end channel, kernel radius, and shift brought into ``[0, H)``
        and ``[0, W)`` whatever the sign convention of ``%``."""
        start = tl.load(group_ptr + 4 * g)
        end = tl.load(group_ptr + 4 * g + 1)
        shift = tl.load(group_ptr + 4 * g + 2)
        radius = tl.load(group_ptr + 4 * g + 3)
        return start, end, radius, (shift % H + H) % H, (shift % W + W) % W

    VECTOR = tl.constexpr(VECTOR_CHANNELS)

    @triton.jit
    def _group_chunk(group_ptr, span, H, W, BLOCK_C: tl.constexpr):
        """The channel group and first channel of a program (its second grid axis): each group's
        channels in chunks of ``BLOCK_C`` from the aligned vector holding its first channel
        (``span``: the widest group's extent in whole vectors), as ``_group`` gives them, with
        radius -1 (no taps) for a chunk past the group's channels. A vector shared by two groups
        is computed by both, each storing its own channels."""
        chunks = tl.cdiv(span, BLOCK_C)
        start, end, radius, shift_h, shift_w = _group(group_ptr, tl.program_id(1) // chunks, H, W)
        c0 = tl.multiple_of(start // VECTOR * VECTOR + tl.program_id(1) % chunks * BLOCK_C, VECTOR)
        return c0, start, end, tl.where(c0 < end, radius, -1), shift_h, shift_w

    OUTSIDE = tl.constexpr(-(1 << 30))  # a column that no tap brings into the map

    @triton.jit
    def _in_range(index, size):
        """``0 <= index < size``, as one unsigned comparison."""
        return index.to(tl.uint32) < size.to(tl.uint32)

    @triton.jit
    def _row_sources(h, h_rolled, w, w_rolled, di, shift_h, H, W, p_in, ADJOINT: tl.constexpr):
        """Tap row ``di``'s source rows (as offsets ``row * W``) of the lr and td branches, and the
        columns their taps start from: ``OUTSIDE`` where the row lies outside the map (or the
        pixel outside the tile), so that the column test fails too. Forward, the zero padding lies
        around the rolled map, so the bounds are checked before the roll (td's row is unrolled
        after, lr's column in ``_column_sources``); adjoint, the output pixel's place in the
        rolled map (``h_rolled``, ``w_rolled``) is taken first, then the transposed tap."""
        if ADJOINT:
            lr_row = h - di
            td_row = h_rolled - di
            return (lr_row * W, tl.where(p_in & _in_range(lr_row, H), w_rolled, OUTSIDE),
                    td_row * W, tl.where(p_in & _in_range(td_row, H), w, OUTSIDE))
        else:
            row = h + di
            column = tl.where(p_in & _in_range(row, H), w, OUTSIDE)
            return row * W, column, _wrap(row - shift_h, H) * W, column

    @triton.jit
    def _column_sources(lr_column, td_column, dj, shift_w, W, ADJOINT: tl.constexpr):
        """Tap column ``dj``'s source columns of the lr and td branches from ``_row_sources``'
        columns, and whether they lie in the map (forward, lr's column is unrolled after)."""
        if ADJOINT:
            lr_col = lr_column - dj
            td_col = td_column - dj
            return lr_col, _in_range(lr_col, W), td_col, _in_range(td_col, W)
        else:
            col = lr_column + dj
            inside = _in_range(col, W)
            return _wrap(col - shift_w, W), inside, col, inside

    @triton.jit
    def _mix_tile(src_ptr, weight_ptr, bias_ptr, p_in, h, w, c, c_in, radius, shift_h, shift_w, H, W, C,
                  RADIUS: tl.constexpr, ADJOINT: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """The mixer's fp32 sums of the pixels at rows ``h`` and columns ``w`` (``p_in``: inside the
        map) and channels ``c`` of one group (``radius``, ``shift_h``, ``shift_w``) of an image at ``src_ptr``."""
        K: tl.constexpr = 2 * RADIUS + 1
        w_rolled = _wrap(w + shift_w, W)
        h_rolled = _wrap(h + shift_h, H)
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        # loops, not unrolled (unrolled, the GPU compile takes minutes); a row's pixel arithmetic
        # is done once for its taps
        for di in range(-radius, radius + 1):
            lr_row, lr_column, td_row, td_column = _row_sources(h, h_rolled, w, w_rolled, di, shift_h, H, W, p_in,
                                                                ADJOINT)
            taps = weight_ptr + ((di + RADIUS) * K + RADIUS) * C + c
            for dj in range(-radius, radius + 1):
                lr_col, lr_in, td_col, td_in = _column_sources(lr_column, td_column, dj, shift_w, W, ADJOINT)
                w_lr = tl.load(taps + dj * C, mask=c_in, other=0.)
                w_td = tl.load(taps + (K * K + dj) * C, mask=c_in, other=0.)
                x_lr = tl.load(src_ptr + ((lr_row + lr_col) * C)[:, None] + c[None, :],
                               mask=lr_in[:, None] & c_in[None, :], other=0.)
                x_td = tl.load(src_ptr + ((td_row + td_col) * C)[:, None] + c[None, :],
                               mask=td_in[:, None] & c_in[None, :], other=0.)
                acc += x_lr.to(tl.float32) * w_lr[None, :]  # two fused multiply-adds
                acc += x_td.to(tl.float32) * w_td[None, :]
        if HAS_BIAS:  # both branches' biases: (2, C)
            bias = tl.load(bias_ptr + c, mask=c_in, other=0.) + tl.load(bias_ptr + C + c, mask=c_in, other=0.)
            acc += bias.to(tl.float32)[None, :]
        return acc

    @triton.jit
    def _mix_kernel(src_ptr, weight_ptr, bias_ptr, group_ptr, out_ptr, N, H, W, C, span,
                    RADIUS: tl.constexpr, ADJOINT: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """Forward mixer of ``src`` (or, ``ADJOINT``, its input gradient from ``src = grad``)."""
        p = (tl.program_id(0) // N) * BLOCK_P + tl.arange(0, BLOCK_P)
        c0, start, end, radius, shift_h, shift_w = _group_chunk(group_ptr, span, H, W, BLOCK_C)
        c = c0 + tl.arange(0, BLOCK_C)
        p_in = p < H * W
        c_in = c < C  # loads take whole vectors, the store only the group's channels
        image = (tl.program_id(0) % N).to(tl.int64) * H * W * C
        acc = _mix_tile(src_ptr + image, weight_ptr, bias_ptr, p_in, p // W, p % W, c, c_in, radius, shift_h,
                        shift_w, H, W, C, RADIUS, ADJOINT, HAS_BIAS, BLOCK_P, BLOCK_C)
        out = out_ptr + image + p[:, None] * C + c[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=p_in[:, None] & ((c >= start) & (c < end))[None, :])

    @triton.jit
    def _mix_norm_kernel(src_ptr, weight_ptr, bias_ptr, group_ptr, norm_weight_ptr, norm_bias_ptr, mixed_ptr,
                         out_ptr, mean_ptr, rstd_ptr, N, H, W, C, G, eps, RADIUS: tl.constexpr,
                         SAVE_STATS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """The mixer of ``src`` followed by the LayerNorm over its channels: a program takes a tile
        of pixels through every group's channels, storing the mixer's output (``mixed``, in its
        dtype) and gathering each pixel's mean and squared deviations block by block (Chan's
        pairwise update, from the stored values: the LayerNorm of ``mixed`` exactly as a separate
        one would see it), then reads its tile back from the cache to normalise it into ``out``
        (which may be ``mixed`` itself)."""
        p = (tl.program_id(0) // N) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_in = p < H * W
        h = p // W
        w = p % W
        image = (tl.program_id(0) % N).to(tl.int64) * H * W * C
        src_ptr += image
        mixed_ptr += image
        mean = tl.zeros((BLOCK_P,), dtype=tl.float32)
        squares = tl.zeros((BLOCK_P,), dtype=tl.float32)  # summed squared deviations from the mean
        count = 0.
        for g in range(G):
            start, end, radius, shift_h, shift_w = _group(group_ptr, g, H, W)
            for first in range(start // VECTOR * VECTOR, end, BLOCK_C):
                c = tl.multiple_of(first, VECTOR) + tl.arange(0, BLOCK_C)
                acc = _mix_tile(src_ptr, weight_ptr, bias_ptr, p_in, h, w, c, c < C, radius, shift_h, shift_w,
                                H, W, C, RADIUS, False, True, BLOCK_P, BLOCK_C)
                mine = (c >= start) & (c < end)
                stored = acc.to(mixed_ptr.dtype.element_ty)
                tl.store(mixed_ptr + p[:, None] * C + c[None, :], stored, mask=p_in[:, None] & mine[None, :])
                block_count = (tl.minimum(end, first + BLOCK_C) - tl.maximum(start, first)).to(tl.float32)
                values = tl.where(mine[None, :], stored.to(tl.float32), 0.)
                block_mean = tl.sum(values, axis=1) / block_count
                deviations = tl.where(mine[None, :], values - block_mean[:, None], 0.)
                total = count + block_count
                delta = block_mean - mean
                mean += delta * (block_count / total)
                squares += tl.sum(deviations * deviations, axis=1) + delta * delta * (count * block_count / total)
                count = total
        rstd = 1. / tl.sqrt(squares / C + eps)
        if SAVE_STATS:
            row = (tl.program_id(0) % N) * H * W + p
            tl.store(mean_ptr + row, mean, mask=p_in)
            tl.store(rstd_ptr + row, rstd, mask=p_in)
        tl.debug_barrier()  # the tile's stores, made by other threads, are seen by the loads below
        out_ptr += image
        for first in range(0, C, BLOCK_C):
            c = first + tl.arange(0, BLOCK_C)
            c_in = c < C
            mask = p_in[:, None] & c_in[None, :]
            values = tl.load(mixed_ptr + p[:, None] * C + c[None, :], mask=mask, other=0.).to(tl.float32)
            scale = tl.load(norm_weight_ptr + c, mask=c_in, other=0.).to(tl.float32)
            shift = tl.load(norm_bias_ptr + c, mask=c_in, other=0.).to(tl.float32)
            normed = (values - mean[:, None]) * rstd[:, None] * scale[None, :] + shift[None, :]
            tl.store(out_ptr + p[:, None] * C + c[None, :], normed.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _divide(n, magic, shift):
        """``n // d`` for ``0 <= n < 2**31`` by ``_magic(d)``'s multiplier and shift: one wide
        multiply instead of a division's twenty instructions."""
        return ((n.to(tl.uint64) * magic.to(tl.uint64)) >> shift).to(tl.int32)

    @triton.jit
    def _weight_grad_kernel(x_ptr, grad_ptr, group_ptr, partial_ptr, N, H, W, C, span, pixels_per_program,
                            h_magic, h_shift, w_magic, w_shift, RADIUS: tl.constexpr,
                            COLUMNS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """Partial gradients of ``COLUMNS`` taps of a row of both branches' kernels over one range
        of the batch's pixels: ``partial[program, branch, tap, c] = sum_pixels grad * source(tap)``.
        The taps are a tensor axis: a pixel's gradient and row arithmetic serve all of them (one
        tap a program when ``COLUMNS`` is 1, a whole row when it is the row's width or more)."""
        K: tl.constexpr = 2 * RADIUS + 1
        CHUNKS: tl.constexpr = (K + COLUMNS - 1) // COLUMNS
        di = tl.program_id(0) // CHUNKS - RADIUS
        first_dj = tl.program_id(0) % CHUNKS * COLUMNS - RADIUS
        dj = first_dj + tl.arange(0, COLUMNS)
        c0, start, end, radius, shift_h, shift_w = _group_chunk(group_ptr, span, H, W, BLOCK_C)
        c = c0 + tl.arange(0, BLOCK_C)
        c_in = c < C
        split = tl.program_id(2)
        begin = split * pixels_per_program
        end_p = tl.minimum(begin + pixels_per_program, N * H * W)
        tap_in = (dj <= radius) & (-dj <= radius)
        last_dj = first_dj + COLUMNS - 1
        in_kernel = (di <= radius) & (-di <= radius) & (first_dj <= radius) & (-last_dj <= radius)
        acc_lr = tl.zeros((COLUMNS, BLOCK_P, BLOCK_C), dtype=tl.float32)
        acc_td = tl.zeros((COLUMNS, BLOCK_P, BLOCK_C), dtype=tl.float32)
        for first_p in range(begin, tl.where(in_kernel, end_p, begin), BLOCK_P):
            p = first_p + tl.arange(0, BLOCK_P)
            p_in = p < end_p
            rows = _divide(p, w_magic, w_shift)  # image * H + row
            w = p - rows * W
            h = rows - _divide(rows, h_magic, h_shift) * H
            top = (rows - h) * W  # the image's first pixel
            grad = tl.load(grad_ptr + p.to(tl.int64)[:, None] * C + c[None, :],
                           mask=p_in[:, None] & c_in[None, :], other=0.)
            lr_row, column, td_row, _ = _row_sources(h, h, w, w, di, shift_h, H, W, p_in, False)
            lr_col, inside, td_col, _ = _column_sources(column[None, :], column[None, :], dj[:, None], shift_w, W,
                                                        False)
            inside = inside & tap_in[:, None]
            lr = (top + lr_row)[None, :] + lr_col  # (COLUMNS, BLOCK_P)
            td = (top + td_row)[None, :] + td_col
            x_lr = tl.load(x_ptr + lr.to(tl.int64)[:, :, None] * C + c[None, None, :],
                           mask=inside[:, :, None] & c_in[None, None, :], other=0.)
            x_td = tl.load(x_ptr + td.to(tl.int64)[:, :, None] * C + c[None, None, :],
                           mask=inside[:, :, None] & c_in[None, None, :], other=0.)
            grad = grad.to(tl.float32)[None, :, :]
            acc_lr += grad * x_lr.to(tl.float32)
            acc_td += grad * x_td.to(tl.float32)
        taps = (di + RADIUS) * K + dj + RADIUS
        out = partial_ptr + (split * 2 * K * K + taps)[:, None] * C + c[None, :]
        mask = (dj <= RADIUS)[:, None] & ((c >= start) & (c < end))[None, :]  # a chunk may reach past the row
        tl.store(out, tl.sum(acc_lr, axis=1), mask=mask)
        tl.store(out + K * K * C, tl.sum(acc_td, axis=1), mask=mask)


# ----- launches ------------------------------------------------------------------------------
def _check_runnable(t: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError('msmlp.triton_mix needs triton')
    if t.device.type == 'cpu' and not interpreted():
        raise RuntimeError('CPU tensors need Triton\'s interpreter: set TRITON_INTERPRET=1 before importing triton')


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device whatever device its tensors are on (torch's
    own operators run on their tensors'): the tensors' device is made current for the launch."""
    return torch.cuda.device(device) if device.type == 'cuda' else contextlib.nullcontext()


@functools.lru_cache(maxsize=64)
def _group_table(shifts: Tuple[int, ...], kernel_sizes: Tuple[int, ...], group_sizes: Tuple[int, ...],
                 device: torch.device) -> Tuple[torch.Tensor, int]:
    """Per group its first and end channel, shift and kernel radius (int32, on ``device``); and
    the widest group's extent in whole vectors (``_group_chunk``'s ``span``)."""
    ends = torch.tensor(group_sizes).cumsum(0)
    starts = ends - torch.tensor(group_sizes)
    groups = torch.stack([starts, ends, torch.tensor(shifts), torch.tensor([k // 2 for k in kernel_sizes])], 1)
    vector = VECTOR_CHANNELS
    span = max(-(-end // vector) * vector - start // vector * vector
               for start, end in zip(starts.tolist(), ends.tolist()))
    return groups.to(device, torch.int32).contiguous(), span


def _block_sizes(pixels: int, channels: int) -> Tuple[int, int]:
    """The interpreter's tile (it cannot time tiles): the smallest holding the map, up to 64 x 64."""
    return min(64, triton.next_power_of_2(pixels)), min(64, triton.next_power_of_2(channels))


# Tiles of the kernels on a GPU: (BLOCK_P pixels, BLOCK_C channels, warps) for the mixer and
# (BLOCK_P, BLOCK_C, COLUMNS taps, warps) for the weight gradient, each compiled for sm_90 without
# spills in the tap loop (tests/test_triton_compile.py); triton times them on the first call of
# each map size and keeps the fastest. Narrow channel blocks suit narrow groups (20 channels in
# msmlp_tiny's first stage: a 64-channel block of one group leaves most of its lanes idle).
# Tiles of 8 values a thread (48-64 registers on sm_90) let more programs share a multiprocessor
# than tiles of 16 (71-98), which share more of a tap's pixel arithmetic; the weight gradient's
# rows of taps (COLUMNS 8) share each pixel's gradient among 7 taps. Which wins is the GPU's to say.
MIX_CONFIGS = [(64, 64, 8), (32, 64, 4), (64, 32, 4), (128, 32, 8), (64, 16, 2), (128, 16, 4), (32, 32, 4),
               (16, 64, 4), (64, 16, 4)]
WEIGHT_GRAD_CONFIGS = [(64, 32, 1, 4), (64, 16, 1, 2), (128, 16, 1, 4), (8, 32, 8, 4), (16, 16, 8, 4),
                       (4, 64, 8, 4), (16, 32, 8, 4)]
# The mixer fused with the LayerNorm after it: a program takes its pixels through every channel,
# so pixel tiles are small (stage 3 of msmlp_tiny at batch 128 has 6272 pixels).
MIX_NORM_CONFIGS = [(16, 32, 2), (32, 32, 4), (16, 64, 4), (32, 16, 2), (64, 16, 4), (64, 32, 4), (8, 64, 2), (32, 64, 4),
                    (32, 32, 2)]
# The weight gradient's pixel ranges are multiples of every tile's BLOCK_P (powers of two), and
# its interpreter tile is no wider than its widest tuned channel block.
PIXEL_UNIT = max(tile[0] for tile in WEIGHT_GRAD_CONFIGS)
WEIGHT_GRAD_CHANNELS = max(tile[1] for tile in WEIGHT_GRAD_CONFIGS)
# The taps of a weight-gradient program under the interpreter (tests run 1, 4 and 8).
INTERPRETER_COLUMNS = 8


def _config(tile: Tuple[int, ...]):
    """A tile (BLOCK_P, BLOCK_C[, COLUMNS], warps) as triton's config."""
    *sizes, warps = tile
    return triton.Config(dict(zip(('BLOCK_P', 'BLOCK_C', 'COLUMNS'), sizes)), num_warps=warps)


def _tuned(kernel, tiles, key: List[str]):
    return triton.autotune([_config(tile) for tile in tiles], key=key)(kernel)


if triton is not None:
    _mix_kernel_tuned = _tuned(_mix_kernel, MIX_CONFIGS, ['H', 'W', 'C', 'RADIUS', 'ADJOINT'])
    _weight_grad_kernel_tuned = _tuned(_weight_grad_kernel, WEIGHT_GRAD_CONFIGS, ['N', 'H', 'W', 'C', 'RADIUS'])
    _mix_norm_kernel_tuned = _tuned(_mix_norm_kernel, MIX_NORM_CONFIGS, ['H', 'W', 'C', 'RADIUS', 'SAVE_STATS'])

_INTERPRETED = _kernels_interpreted()
_AVAILABLE = triton is not None and (_INTERPRETED or torch.cuda.is_available())


@functools.lru_cache(maxsize=None)
def _one_tile(kernel, tile: Tuple[int, ...]):
    """``kernel`` tuned to a single tile: the launch is the tuned one's, config and grid included."""
    return _tuned(kernel, [tile], [])


def _chunks(groups: int, span: int, block_c: int) -> int:
    """Programs along the channels: each group's in blocks of ``block_c`` (``_group_chunk``)."""
    return groups * triton.cdiv(span, block_c)


def _mix_grid(n: int, h: int, w: int, groups: int, span: int):
    """Programs (pixel tile x image, channel block of a group): images vary fastest, and the pixel
    tiles share the first axis, whose 2**31 - 1 programs fit any map (the others stop at 65535)."""
    return lambda meta: (triton.cdiv(h * w, meta['BLOCK_P']) * n, _chunks(groups, span, meta['BLOCK_C']))


def _mix_launcher(pixels: int, channels: int):
    """The interpreter's tile, or the tuned kernel (deterministic whatever the tile)."""
    if interpreted():
        return _one_tile(_mix_kernel, (*_block_sizes(pixels, channels), 4))
    return _mix_kernel_tuned


def _weight_grad_launcher(pixels: int, channels: int):
    """The interpreter's tile; under ``torch.use_deterministic_algorithms(True)`` (Lightning's
    ``deterministic=True``) one fixed tile, since the order of the gradient's sums follows the
    tile and the autotuner's choice follows timings; otherwise the tuned kernel. (The mixer's
    outputs and input gradient sum each element's taps in one order whatever the tile.)"""
    if interpreted():
        tile = _block_sizes(pixels, min(channels, WEIGHT_GRAD_CHANNELS))
        return _one_tile(_weight_grad_kernel, (*tile, INTERPRETER_COLUMNS, 4))
    if torch.are_deterministic_algorithms_enabled():
        return _one_tile(_weight_grad_kernel, WEIGHT_GRAD_CONFIGS[0])
    return _weight_grad_kernel_tuned


def _launch_mix(src: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype,
                shifts, kernel_sizes, group_sizes, adjoint: bool) -> torch.Tensor:
    _check_runnable(src)
    n, h, w, c = src.shape
    groups, span = _group_table(tuple(shifts), tuple(kernel_sizes), tuple(group_sizes), src.device)
    out = torch.empty(src.shape, dtype=out_dtype, device=src.device)
    args = (src, weight, weight if bias is None else bias, groups, out, n, h, w, c, span)
    options = dict(RADIUS=max(kernel_sizes) // 2, ADJOINT=adjoint, HAS_BIAS=bias is not None)
    with _on_device(src.device):
        _mix_launcher(h * w, c)[_mix_grid(n, h, w, len(group_sizes), span)](*args, **options)
    return out


def _mix_norm_launcher(pixels: int, channels: int):
    """The interpreter's tile (channel blocks of at most 32: a group takes one or two); under
    ``torch.use_deterministic_algorithms(True)`` one fixed tile (a pixel's mean and deviation are
    gathered block by block, so their rounding follows the channel block); else the tuned kernel."""
    if interpreted():
        return _one_tile(_mix_norm_kernel, (*_block_sizes(pixels, min(channels, 32)), 4))
    if torch.are_deterministic_algorithms_enabled():
        return _one_tile(_mix_norm_kernel, MIX_NORM_CONFIGS[0])
    return _mix_norm_kernel_tuned


def _launch_mix_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, norm_weight: torch.Tensor,
                     norm_bias: torch.Tensor, eps: float, out_dtype: torch.dtype, shifts, kernel_sizes, group_sizes,
                     keep: bool) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The LayerNorm of the mixer of ``x`` in ``out_dtype``; the mixer's output (in ``x``'s dtype)
    and the norm's per-pixel ``(2, N, H, W, 1)`` fp32 mean and reciprocal deviation (None unless
    ``keep``: without them the mixer's output may be the normalised one's buffer, overwritten)."""
    _check_runnable(x)
    n, h, w, c = x.shape
    groups, _ = _group_table(tuple(shifts), tuple(kernel_sizes), tuple(group_sizes), x.device)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    mixed = out if out_dtype == x.dtype and not keep else torch.empty_like(x)
    stats = torch.empty(2, n, h, w, 1, dtype=torch.float32, device=x.device) if keep else None
    args = (x, weight, bias, groups, norm_weight, norm_bias, mixed, out, out if stats is None else stats[0],
            out if stats is None else stats[1], n, h, w, c, len(group_sizes), eps)
    with _on_device(x.device):
        _mix_norm_launcher(h * w, c)[lambda meta: (triton.cdiv(h * w, meta['BLOCK_P']) * n,)](
            *args, RADIUS=max(kernel_sizes) // 2, SAVE_STATS=keep)
    return out, mixed, stats


def _magic(divisor: int) -> Tuple[int, int]:
    """The multiplier ``m`` (in ``[2**31, 2**32)``) and shift ``s`` with ``n // divisor == (n * m) >> s``
    for every ``0 <= n < 2**31`` (Granlund and Montgomery, 1994: ``m * divisor`` exceeds ``2**s`` by
    at most ``2**(s - 31)``)."""
    shift = 31 + (divisor - 1).bit_length()
    return -(-(1 << shift) // divisor), shift


def _launch_weight_grad(grad: torch.Tensor, x: torch.Tensor, shifts, kernel_sizes, group_sizes) -> torch.Tensor:
    _check_runnable(x)
    n, h, w, c = x.shape
    groups, span = _group_table(tuple(shifts), tuple(kernel_sizes), tuple(group_sizes), x.device)
    size = max(kernel_sizes)
    units = triton.cdiv(n * h * w, PIXEL_UNIT)
    channel_blocks = _chunks(len(group_sizes), span, WEIGHT_GRAD_CHANNELS)
    splits = max(1, min(units, triton.cdiv(WEIGHT_GRAD_PROGRAMS, size * channel_blocks)))
    pixels_per_program = triton.cdiv(units, splits) * PIXEL_UNIT
    splits = triton.cdiv(n * h * w, pixels_per_program)
    partial = torch.empty(splits, 2, size * size, c, dtype=torch.float32, device=x.device)
    with _on_device(x.device):
        _weight_grad_launcher(n * h * w, c)[
            lambda meta: (size * triton.cdiv(size, meta['COLUMNS']), _chunks(len(group_sizes), span, meta['BLOCK_C']),
                          splits)](
            x, grad, groups, partial, n, h, w, c, span, pixels_per_program, *_magic(h), *_magic(w),
            RADIUS=size // 2)
    return partial.sum(0)


# ----- packing the groups' kernels ------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _pack_index(kernel_sizes: Tuple[int, ...], group_sizes: Tuple[int, ...],
                device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Where each entry of the packed ``(2, K * K, C)`` weight lies in the flat concatenation of
    the groups' kernels (lr groups, then td groups, then one zero, which the taps outside a
    group's kernel take); and where each entry of that concatenation (the zero left out) lies in
    the packed weight. Both int64, on ``device``."""
    size, channels = max(kernel_sizes), sum(group_sizes)
    total = 2 * sum(c * k * k for c, k in zip(group_sizes, kernel_sizes))
    index = torch.full((2, size * size, channels), total, dtype=torch.long)
    offset = 0
    for branch in range(2):
        start = 0
        for c, k in zip(group_sizes, kernel_sizes):
            pad = (size - k) // 2
            taps = torch.tensor([(i + pad) * size + j + pad for i in range(k) for j in range(k)])
            index[branch, taps, start:start + c] = offset + torch.arange(c)[None, :] * k * k + torch.arange(k * k)[:, None]
            offset, start = offset + c * k * k, start + c
    index = index.flatten()
    inverse = torch.empty(total, dtype=torch.long)
    inside = index < total
    inverse[index[inside]] = torch.arange(index.numel())[inside]
    return index.to(device), inverse.to(device)


def _pack(weights: Sequence[torch.Tensor], kernel_sizes: Sequence[int], group_sizes: Sequence[int]) -> torch.Tensor:
    """The groups' kernels (lr groups, then td groups) as the kernels' fp32 ``(2, K * K, C)``
    weight: one concatenation and one gather, whatever the number of groups."""
    index, _ = _pack_index(tuple(kernel_sizes), tuple(group_sizes), weights[0].device)
    flat = torch.cat([w.reshape(-1) for w in weights] + [weights[0].new_zeros(1)])
    size = max(kernel_sizes)
    return flat.index_select(0, index).view(2, size * size, sum(group_sizes)).float()


def _flat_weight_grad(grad: torch.Tensor, x: torch.Tensor, shifts, kernel_sizes, group_sizes) -> torch.Tensor:
    """The kernels' gradient, fp32, flat in ``_pack``'s order (lr groups, then td groups)."""
    _, inverse = _pack_index(tuple(kernel_sizes), tuple(group_sizes), x.device)
    return _launch_weight_grad(grad, x, shifts, kernel_sizes, group_sizes).reshape(-1).index_select(0, inverse)


# ----- autograd: a custom operator (compiled) and a plain autograd.Function (eager) ------------
# The mixer takes the groups' kernels and biases as they are (lists, lr groups then td groups)
# and packs them inside, out of autograd's sight: a handful of launches a block, where
# differentiable packing took some forty operations forward and backward, and a GPU step of
# msmlp_tiny waited on the host (measured on an H200: 92 ms a bf16 training step at batch 128
# for 50 ms of kernels). Eager, an autograd.Function calls the launches: a custom operator's
# dispatch flattens its lists on every call, which costs a block more host time than the
# rest of its mixer. torch.compile traces the custom operator (fake and autograd registrations:
# no graph breaks, the launches as opaque calls).
def _mix_forward(x: torch.Tensor, weight: torch.Tensor, biases: Sequence[torch.Tensor], shifts, kernel_sizes,
                 group_sizes) -> torch.Tensor:
    """The mixer of ``x`` by the packed ``weight`` and the groups' biases (lr, then td)."""
    return _launch_mix(x, weight, torch.cat(list(biases)), x.dtype, shifts, kernel_sizes, group_sizes, adjoint=False)


def _mix_backward(ctx, grad: torch.Tensor, x: torch.Tensor, weights: Sequence[torch.Tensor], grad_input, grad_weight):
    """Gradients of ``x``, of each kernel and of each bias (``ctx.needs`` says which), by
    ``grad_input(grad)`` and ``grad_weight(grad)`` (the kernels' gradient, flat)."""
    grad = grad.to(x.dtype).contiguous()
    need_x, need_weights, need_biases = ctx.needs
    grad_x, grad_weights, grad_biases = None, [None] * len(weights), [None] * len(weights)
    if need_x:
        grad_x = grad_input(grad)
    if need_weights:
        flat = grad_weight(grad).to(weights[0].dtype)
        grad_weights = [part.view(w.shape) for part, w in zip(flat.split([w.numel() for w in weights]), weights)]
    if need_biases:  # both branches' biases get the summed gradient, each its own copy
        sizes = list(ctx.layout[2])
        summed = grad.sum((0, 1, 2), dtype=torch.float32).to(ctx.bias_dtype)
        grad_biases = list(summed.split(sizes)) + list(summed.clone().split(sizes))
    return grad_x, grad_weights, grad_biases


def _save(ctx, x: torch.Tensor, weights, biases, layout, *saved: torch.Tensor) -> None:
    ctx.save_for_backward(x, *saved, *weights)
    ctx.bias_dtype, ctx.layout = biases[0].dtype, layout
    ctx.needs = x.requires_grad, any(w.requires_grad for w in weights), any(b.requires_grad for b in biases)


@torch.library.custom_op('msmlp::shift_mix_triton', mutates_args=())
def _mix_op(x: torch.Tensor, weights: List[torch.Tensor], biases: List[torch.Tensor], shifts: List[int],
            kernel_sizes: List[int], group_sizes: List[int]) -> torch.Tensor:
    return _mix_forward(x, _pack(weights, kernel_sizes, group_sizes), biases, shifts, kernel_sizes, group_sizes)


# The backward's operators pack and unpack inside: traced (torch.compile), their index tables
# stay out of the graph.
@torch.library.custom_op('msmlp::shift_mix_triton_grad_input', mutates_args=())
def _grad_input_op(grad: torch.Tensor, weights: List[torch.Tensor], shifts: List[int], kernel_sizes: List[int],
                   group_sizes: List[int]) -> torch.Tensor:
    return _launch_grad_input(grad, _pack(weights, kernel_sizes, group_sizes), shifts, kernel_sizes, group_sizes)


@torch.library.custom_op('msmlp::shift_mix_triton_grad_weight', mutates_args=())
def _grad_weight_op(grad: torch.Tensor, x: torch.Tensor, shifts: List[int], kernel_sizes: List[int],
                    group_sizes: List[int]) -> torch.Tensor:
    return _flat_weight_grad(grad, x, shifts, kernel_sizes, group_sizes)


@_mix_op.register_fake
def _(x, weights, biases, shifts, kernel_sizes, group_sizes):
    return torch.empty_like(x)


@_grad_input_op.register_fake
def _(grad, weights, shifts, kernel_sizes, group_sizes):
    return torch.empty_like(grad)


@_grad_weight_op.register_fake
def _(grad, x, shifts, kernel_sizes, group_sizes):
    return x.new_empty(2 * sum(c * k * k for c, k in zip(group_sizes, kernel_sizes)), dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    x, weights, biases, *layout = inputs
    _save(ctx, x, weights, biases, layout)


def _backward(ctx, grad: torch.Tensor):
    x, *weights = ctx.saved_tensors
    return *_mix_backward(ctx, grad, x, weights, lambda g: _grad_input_op(g, weights, *ctx.layout),
                          lambda g: _grad_weight_op(g, x, *ctx.layout)), None, None, None


_mix_op.register_autograd(_backward, setup_context=_setup_context)


def _launch_grad_input(grad: torch.Tensor, weight: torch.Tensor, shifts, kernel_sizes, group_sizes) -> torch.Tensor:
    return _launch_mix(grad, weight, None, grad.dtype, shifts, kernel_sizes, group_sizes, adjoint=True)


class _MixFunction(torch.autograd.Function):
    """``_mix_op`` eager: the same launches, without the operator's dispatch, and the packed
    weight kept for the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layout, *params: torch.Tensor) -> torch.Tensor:
        weights, biases = params[:len(params) // 2], params[len(params) // 2:]
        weight = _pack(weights, *layout[1:])
        _save(ctx, x, weights, biases, layout, weight)
        return _mix_forward(x, weight, biases, *layout)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, *weights = ctx.saved_tensors
        grad_x, grad_weights, grad_biases = _mix_backward(
            ctx, grad, x, weights, lambda g: _launch_grad_input(g, weight, *ctx.layout),
            lambda g: _flat_weight_grad(g, x, *ctx.layout))
        return grad_x, None, *grad_weights, *grad_biases


# ----- the mixer and the LayerNorm after it, in one kernel -----------------------------------------
def _mix_norm_backward(ctx, grad: torch.Tensor, x: torch.Tensor, mixed: torch.Tensor, stats: torch.Tensor,
                       weights: Sequence[torch.Tensor], norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                       grad_input, grad_weight):
    """The LayerNorm's backward (aten's, in the wider of the mixer's and the norm's dtypes, as a
    separate LayerNorm under autocast runs), then the mixer's (``_mix_backward``)."""
    dtype = torch.promote_types(mixed.dtype, norm_weight.dtype)
    need_mixer = any(ctx.needs)
    grad_mixed, grad_scale, grad_shift = torch.ops.aten.native_layer_norm_backward(
        grad.to(dtype), mixed.to(dtype), [mixed.shape[-1]], stats[0], stats[1], norm_weight.to(dtype),
        norm_bias.to(dtype), [need_mixer, *ctx.needs_norm])
    grad_x, grad_weights, grad_biases = (_mix_backward(ctx, grad_mixed, x, weights, grad_input, grad_weight)
                                         if need_mixer else (None, [None] * len(weights), [None] * len(weights)))
    return (grad_x, grad_weights, grad_biases, None if grad_scale is None else grad_scale.to(norm_weight.dtype),
            None if grad_shift is None else grad_shift.to(norm_bias.dtype))


def _save_norm(ctx, x, weights, biases, norm_weight, norm_bias, layout, *saved: torch.Tensor) -> None:
    _save(ctx, x, weights, biases, layout, *saved, norm_weight, norm_bias)
    ctx.needs_norm = norm_weight.requires_grad, norm_bias.requires_grad


@torch.library.custom_op('msmlp::shift_mix_norm_triton', mutates_args=())
def _mix_norm_op(x: torch.Tensor, weights: List[torch.Tensor], biases: List[torch.Tensor], norm_weight: torch.Tensor,
                 norm_bias: torch.Tensor, eps: float, out_dtype: torch.dtype, keep: bool, shifts: List[int],
                 kernel_sizes: List[int], group_sizes: List[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, mixed, stats = _launch_mix_norm(x, _pack(weights, kernel_sizes, group_sizes), torch.cat(biases), norm_weight,
                                         norm_bias, eps, out_dtype, shifts, kernel_sizes, group_sizes, keep)
    if not keep:  # an operator's outputs may not alias each other
        return out, x.new_empty(0), x.new_empty(0, dtype=torch.float32)
    return out, mixed, stats


@_mix_norm_op.register_fake
def _(x, weights, biases, norm_weight, norm_bias, eps, out_dtype, keep, shifts, kernel_sizes, group_sizes):
    n, h, w, _ = x.shape
    return (torch.empty_like(x, dtype=out_dtype), torch.empty_like(x) if keep else x.new_empty(0),
            x.new_empty((2, n, h, w, 1) if keep else (0,), dtype=torch.float32))


def _setup_norm_context(ctx, inputs, output) -> None:
    x, weights, biases, norm_weight, norm_bias, _, _, _, *layout = inputs
    _, mixed, stats = output
    _save_norm(ctx, x, weights, biases, norm_weight, norm_bias, layout, mixed, stats)


def _norm_op_backward(ctx, grad: torch.Tensor, *_):
    x, mixed, stats, norm_weight, norm_bias, *weights = ctx.saved_tensors
    if not stats.numel():
        raise RuntimeError('msmlp::shift_mix_norm_triton ran with keep=False, which keeps nothing for a backward')
    grads = _mix_norm_backward(ctx, grad, x, mixed, stats, weights, norm_weight, norm_bias,
                               lambda g: _grad_input_op(g, weights, *ctx.layout),
                               lambda g: _grad_weight_op(g, x, *ctx.layout))
    return *grads, None, None, None, None, None, None


_mix_norm_op.register_autograd(_norm_op_backward, setup_context=_setup_norm_context)


class _MixNormFunction(torch.autograd.Function):
    """``_mix_norm_op`` eager (as ``_MixFunction`` is ``_mix_op``'s)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layout, eps: float, out_dtype: torch.dtype, norm_weight: torch.Tensor,
                norm_bias: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        weights, biases = params[:len(params) // 2], params[len(params) // 2:]
        weight = _pack(weights, *layout[1:])
        keep = any(ctx.needs_input_grad)
        out, mixed, stats = _launch_mix_norm(x, weight, torch.cat(list(biases)), norm_weight, norm_bias, eps,
                                             out_dtype, *layout, keep)
        if keep:
            _save_norm(ctx, x, weights, biases, norm_weight, norm_bias, layout, mixed, stats, weight)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, mixed, stats, weight, norm_weight, norm_bias, *weights = ctx.saved_tensors
        grad_x, grad_weights, grad_biases, grad_scale, grad_shift = _mix_norm_backward(
            ctx, grad, x, mixed, stats, weights, norm_weight, norm_bias,
            lambda g: _launch_grad_input(g, weight, *ctx.layout), lambda g: _flat_weight_grad(g, x, *ctx.layout))
        return grad_x, None, None, None, grad_scale, grad_shift, *grad_weights, *grad_biases


# ----- public API ----------------------------------------------------------------------------
def fits(n: int, h: int, w: int, c: int) -> bool:
    """Whether an ``n x h x w x c`` map is within the kernels' 32-bit indexing (an image's
    elements and the batch's pixels each below 2**31)."""
    return max(h * w * c, n * h * w) < 2 ** 31


def _check_layout(x: torch.Tensor, weights: Sequence[torch.Tensor], shifts, kernel_sizes, group_sizes) -> None:
    if x.dim() != 4:
        raise ValueError(f'expected an (N, H, W, C) map, got shape {tuple(x.shape)}')
    n, h, w, c = x.shape
    if not fits(n, h, w, c):
        raise ValueError(f'a {n}x{h}x{w}x{c} map is too large for the Triton mixer, which indexes an image\'s '
                         f'elements and the batch\'s pixels in 32 bits (each below 2**31): use mix_impl=\'fast\'')
    if not len(shifts) == len(kernel_sizes) == len(group_sizes):
        raise ValueError('shifts, kernel_sizes and group_sizes must give one entry per group')
    if sum(group_sizes) != x.shape[-1]:
        raise ValueError(f'group sizes {list(group_sizes)} do not add up to {x.shape[-1]} channels')
    if any(k % 2 == 0 or not 1 <= k <= MAX_KERNEL for k in kernel_sizes):
        raise ValueError(f'kernel sizes must be odd, at most {MAX_KERNEL}: got {list(kernel_sizes)}')
    expected = [(c, 1, k, k) for c, k in zip(group_sizes, kernel_sizes)] * 2
    if [tuple(w.shape) for w in weights] != expected:
        raise ValueError(f'weights of shapes {[tuple(w.shape) for w in weights]}, expected {expected}')


def shift_mix_triton(x_nhwc: torch.Tensor, weights_lr: Sequence[torch.Tensor], biases_lr: Sequence[torch.Tensor],
                     weights_td: Sequence[torch.Tensor], biases_td: Sequence[torch.Tensor], shifts: Sequence[int],
                     kernel_sizes: Sequence[int], group_sizes: Sequence[int]) -> torch.Tensor:
    """The MS-MLP token mixer of an NHWC map (see the module docstring), NHWC out in ``x``'s
    dtype; differentiable w.r.t. ``x`` and every weight and bias.

    ``weights_*[g]`` is group g's depthwise kernel ``(c_g, 1, k_g, k_g)`` and ``biases_*[g]``
    its bias ``(c_g,)``, as in an ``MSMLPBlock``'s ``dwconv_lr``/``dwconv_td``.
    """
    _check_layout(x_nhwc, list(weights_lr) + list(weights_td), shifts, kernel_sizes, group_sizes)
    weights, biases = list(weights_lr) + list(weights_td), list(biases_lr) + list(biases_td)
    layout = (list(shifts), list(kernel_sizes), list(group_sizes))
    if torch.compiler.is_compiling():
        return _mix_op(x_nhwc.contiguous(), weights, biases, *layout)
    return _MixFunction.apply(x_nhwc.contiguous(), layout, *weights, *biases)


def shift_mix_norm_triton(x_nhwc: torch.Tensor, weights_lr: Sequence[torch.Tensor], biases_lr: Sequence[torch.Tensor],
                          weights_td: Sequence[torch.Tensor], biases_td: Sequence[torch.Tensor], shifts: Sequence[int],
                          kernel_sizes: Sequence[int], group_sizes: Sequence[int], norm_weight: torch.Tensor,
                          norm_bias: torch.Tensor, eps: float, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``F.layer_norm(shift_mix_triton(x_nhwc, ...), (C,), norm_weight, norm_bias, eps)`` as one
    kernel (the mixer's output goes through the cache, not a second launch), returned in
    ``out_dtype`` (default ``x``'s: under autocast the caller passes the dtype the next layer
    takes). Differentiable w.r.t. ``x`` and every weight and bias, the norm's included."""
    _check_layout(x_nhwc, list(weights_lr) + list(weights_td), shifts, kernel_sizes, group_sizes)
    channels = x_nhwc.shape[-1]
    if norm_weight.shape != (channels,) or norm_bias.shape != (channels,):
        raise ValueError(f'the norm\'s weight and bias must be ({channels},): got {tuple(norm_weight.shape)} and '
                         f'{tuple(norm_bias.shape)}')
    weights, biases = list(weights_lr) + list(weights_td), list(biases_lr) + list(biases_td)
    layout = (list(shifts), list(kernel_sizes), list(group_sizes))
    out_dtype = x_nhwc.dtype if out_dtype is None else out_dtype
    x_nhwc = x_nhwc.contiguous()
    if torch.compiler.is_compiling():
        keep = torch.is_grad_enabled() and any(t.requires_grad for t in [x_nhwc, norm_weight, norm_bias, *weights, *biases])
        return _mix_norm_op(x_nhwc, weights, biases, norm_weight, norm_bias, eps, out_dtype, keep, *layout)[0]
    return _MixNormFunction.apply(x_nhwc, layout, eps, out_dtype, norm_weight, norm_bias, *weights, *biases)
