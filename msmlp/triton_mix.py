"""The MS-MLP token mixer as Triton kernels, channels-last (NHWC).

For each channel ``c`` (of group ``g``: shift ``s``, odd kernel ``k``) the mixer computes

    out[n, h, w, c] = b_lr[c] + sum_{|di|, |dj| <= k // 2} w_lr[c, di, dj] * lr[n, h + di, w + dj, c]
                    + b_td[c] + sum_{|di|, |dj| <= k // 2} w_td[c, di, dj] * td[n, h + di, w + dj, c]

with ``lr = torch.roll(x, s, W)`` and ``td = torch.roll(x, s, H)``, both zero outside the map:
the released block's rolls and depthwise convs, without materialising the rolled copies.

* Forward (``_mix_kernel``): one program per (image ``n``, tile of ``BLOCK_P`` output pixels,
  block of ``BLOCK_C`` channels). It loops over the taps of the largest kernel's
  window, masks the taps outside each channel's own kernel, finds each tap's source in ``x``
  (zero padding around the rolled map, then the roll) and accumulates both branches in fp32;
  ``x`` is read once (repeated taps hit the cache) and the output is written once.
* Input gradient: the same kernel in its adjoint form (``ADJOINT``): per branch the inverse
  roll of the output pixel, then the transposed tap.
* Weight gradient (``_weight_grad_kernel``): one program per (range of pixels over the whole
  batch, block of channels), summing ``grad * source`` per tap into a (taps, channels) fp32
  accumulator; the per-program partial sums are added with torch (deterministic, no atomics).
* Bias gradient: ``grad`` summed over N, H, W (both branches get the same).

The groups' kernels are packed into one ``(2, K * K, C)`` fp32 tensor (branch, tap, channel;
each kernel centred in the largest, ``K``, zeros elsewhere) by differentiable torch operations,
so autograd unpacks the packed weight gradient into each group's ``(c_g, 1, k_g, k_g)``.
The kernels run as the custom operators ``msmlp::shift_mix_triton`` (with fake and autograd
registrations: torch.compile traces them without graph breaks, as opaque calls) and its two
gradients. They run on CUDA tensors, or on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` before triton is imported). Any input dtype is computed in fp32 and
returned in ``x``'s dtype (bf16 or fp16 under autocast).
"""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the module stays importable; ``available()`` says False
    triton = None

__all__ = ['available', 'interpreted', 'pack_weights', 'shift_mix_triton']

MAX_KERNEL = 7
# Programs of the weight gradient: enough to fill a GPU, few enough that the partial sums
# (programs x 2 x taps x channels fp32) stay small.
WEIGHT_GRAD_PROGRAMS = 512


@functools.lru_cache(maxsize=None)  # fixed when the kernels were defined; asked by every block
def interpreted() -> bool:
    """Whether triton runs kernels with its CPU interpreter (``TRITON_INTERPRET=1``)."""
    if triton is None:
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(_mix_kernel, InterpretedFunction)


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether the kernels can run here: triton imports, and a GPU or the interpreter runs them."""
    return triton is not None and (interpreted() or torch.cuda.is_available())


if triton is not None:
    @triton.jit
    def _wrap(index, size):
        """``index`` in ``(-size, 2 size)`` brought into ``[0, size)`` (a circular index)."""
        index = tl.where(index < 0, index + size, index)
        return tl.where(index >= size, index - size, index)

    @triton.jit
    def _tap(tap, RADIUS: tl.constexpr, radius, c_in):
        """Tap ``tap`` of the largest window (row-major): its offsets ``(di, dj)`` and the
        channels whose own kernel holds it."""
        di = tap // (2 * RADIUS + 1) - RADIUS
        dj = tap % (2 * RADIUS + 1) - RADIUS
        return di, dj, c_in & (radius >= di) & (radius >= -di) & (radius >= dj) & (radius >= -dj)

    @triton.jit
    def _forward_sources(h, w, shift_h, shift_w, di, dj, H, W, C, c):
        """Offsets in an image and masks of tap ``(di, dj)``'s sources, lr then td: the zero
        padding lies around the rolled map, so bounds are checked before the roll."""
        row = h + di
        col = w + dj
        inside = ((row >= 0) & (row < H) & (col >= 0) & (col < W))[:, None]
        lr = (row[:, None] * W + _wrap(col[:, None] - shift_w[None, :], W)) * C + c[None, :]
        td = (_wrap(row[:, None] - shift_h[None, :], H) * W + col[:, None]) * C + c[None, :]
        return lr, inside, td, inside

    @triton.jit
    def _adjoint_sources(h, w, shift_h, shift_w, di, dj, H, W, C, c):
        """The adjoint of ``_forward_sources``: each pixel's place in the rolled map (the
        inverse roll), then the transposed tap, bounds checked after the roll."""
        row = h - di
        col = _wrap(w[:, None] + shift_w[None, :], W) - dj
        lr_inside = ((row >= 0) & (row < H))[:, None] & (col >= 0) & (col < W)
        lr = (row[:, None] * W + col) * C + c[None, :]
        row = _wrap(h[:, None] + shift_h[None, :], H) - di
        col = w - dj
        td_inside = (row >= 0) & (row < H) & ((col >= 0) & (col < W))[:, None]
        td = (row * W + col[:, None]) * C + c[None, :]
        return lr, lr_inside, td, td_inside

    @triton.jit
    def _mix_kernel(src_ptr, weight_ptr, bias_ptr, shift_ptr, radius_ptr, out_ptr, H, W, C,
                    RADIUS: tl.constexpr, ADJOINT: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """Forward mixer of ``src`` (or, ``ADJOINT``, its input gradient from ``src = grad``)."""
        K: tl.constexpr = 2 * RADIUS + 1
        n = tl.program_id(0)
        p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        p_in = p < H * W
        c_in = c < C
        h = p // W
        w = p % W
        shift = tl.load(shift_ptr + c, mask=c_in, other=0)
        radius = tl.load(radius_ptr + c, mask=c_in, other=-1)
        shift_w = (shift % W + W) % W  # in [0, W) whatever the sign convention of %
        shift_h = (shift % H + H) % H
        image = n.to(tl.int64) * H * W * C
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for tap in range(K * K):  # a loop, not unrolled: unrolled, the GPU compile takes minutes
            di, dj, tap_in = _tap(tap, RADIUS, radius, c_in)
            w_lr = tl.load(weight_ptr + tap * C + c, mask=tap_in, other=0.)
            w_td = tl.load(weight_ptr + (K * K + tap) * C + c, mask=tap_in, other=0.)
            if ADJOINT:
                lr, lr_in, td, td_in = _adjoint_sources(h, w, shift_h, shift_w, di, dj, H, W, C, c)
            else:
                lr, lr_in, td, td_in = _forward_sources(h, w, shift_h, shift_w, di, dj, H, W, C, c)
            mask = p_in[:, None] & tap_in[None, :]
            x_lr = tl.load(src_ptr + image + lr, mask=mask & lr_in, other=0.).to(tl.float32)
            x_td = tl.load(src_ptr + image + td, mask=mask & td_in, other=0.).to(tl.float32)
            acc += x_lr * w_lr[None, :] + x_td * w_td[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + c, mask=c_in, other=0.)[None, :]
        out = out_ptr + image + p[:, None] * C + c[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=p_in[:, None] & c_in[None, :])

    @triton.jit
    def _weight_grad_kernel(x_ptr, grad_ptr, shift_ptr, radius_ptr, partial_ptr, N, H, W, C,
                            pixels_per_program, RADIUS: tl.constexpr, TAPS: tl.constexpr,
                            BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """Partial weight gradients of both branches over one range of the batch's pixels:
        ``partial[program, branch, tap, c] = sum_pixels grad * source(tap)``."""
        K: tl.constexpr = 2 * RADIUS + 1
        split = tl.program_id(0)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_in = c < C
        taps = tl.arange(0, TAPS)
        shift = tl.load(shift_ptr + c, mask=c_in, other=0)
        radius = tl.load(radius_ptr + c, mask=c_in, other=-1)
        shift_w = (shift % W + W) % W
        shift_h = (shift % H + H) % H
        acc_lr = tl.zeros((TAPS, BLOCK_C), dtype=tl.float32)
        acc_td = tl.zeros((TAPS, BLOCK_C), dtype=tl.float32)
        start = split * pixels_per_program
        end = tl.minimum(start + pixels_per_program, N * H * W)
        for first in range(start, end, BLOCK_P):
            p = first + tl.arange(0, BLOCK_P)
            p_in = p < end
            n = p // (H * W)
            h = p % (H * W) // W
            w = p % W
            image = (n.to(tl.int64) * H * W * C)[:, None]
            grad = tl.load(grad_ptr + p.to(tl.int64)[:, None] * C + c[None, :],
                           mask=p_in[:, None] & c_in[None, :], other=0.).to(tl.float32)
            for tap in range(K * K):
                di, dj, tap_in = _tap(tap, RADIUS, radius, c_in)
                lr, lr_in, td, td_in = _forward_sources(h, w, shift_h, shift_w, di, dj, H, W, C, c)
                mask = p_in[:, None] & tap_in[None, :]
                x_lr = tl.load(x_ptr + image + lr, mask=mask & lr_in, other=0.).to(tl.float32)
                x_td = tl.load(x_ptr + image + td, mask=mask & td_in, other=0.).to(tl.float32)
                here = taps[:, None] == tap
                acc_lr += tl.where(here, tl.sum(grad * x_lr, axis=0)[None, :], 0.)
                acc_td += tl.where(here, tl.sum(grad * x_td, axis=0)[None, :], 0.)
        out = partial_ptr + (split * 2 * K * K + taps[:, None]) * C + c[None, :]
        mask = (taps < K * K)[:, None] & c_in[None, :]
        tl.store(out, acc_lr, mask=mask)
        tl.store(out + K * K * C, acc_td, mask=mask)


# ----- launches ------------------------------------------------------------------------------
def _check_runnable(t: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError('msmlp.triton_mix needs triton')
    if t.device.type == 'cpu' and not interpreted():
        raise RuntimeError('CPU tensors need Triton\'s interpreter: set TRITON_INTERPRET=1 before importing triton')


@functools.lru_cache(maxsize=64)
def _channel_table(shifts: Tuple[int, ...], kernel_sizes: Tuple[int, ...], group_sizes: Tuple[int, ...],
                   device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per channel: the group's shift and kernel radius (int32, on ``device``)."""
    sizes = torch.tensor(group_sizes)
    shift = torch.repeat_interleave(torch.tensor(shifts, dtype=torch.int32), sizes)
    radius = torch.repeat_interleave(torch.tensor([k // 2 for k in kernel_sizes], dtype=torch.int32), sizes)
    return shift.to(device), radius.to(device)


def _block_sizes(pixels: int, channels: int, max_channels: int = 64) -> Tuple[int, int]:
    return min(64, triton.next_power_of_2(pixels)), min(max_channels, triton.next_power_of_2(channels))


# Tiles of the mixer kernel on a GPU, each compiled for sm_90 without register spills
# (tests/test_triton_compile.py); triton times them on the first call of each map size and
# keeps the fastest. The interpreter runs _block_sizes' tile (_one_tile_kernel).
MIX_CONFIGS = [(64, 64, 8), (32, 64, 4), (16, 64, 2), (64, 32, 4), (32, 32, 2)]  # BLOCK_P, BLOCK_C, warps
WEIGHT_GRAD_WARPS = 4

if triton is not None:
    _mix_kernel_tuned = triton.autotune(
        [triton.Config(dict(BLOCK_P=p, BLOCK_C=c), num_warps=warps) for p, c, warps in MIX_CONFIGS],
        key=['H', 'W', 'C', 'RADIUS', 'ADJOINT'])(_mix_kernel)


def _launch_mix(src: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype,
                shifts, kernel_sizes, group_sizes, adjoint: bool) -> torch.Tensor:
    _check_runnable(src)
    n, h, w, c = src.shape
    shift, radius = _channel_table(tuple(shifts), tuple(kernel_sizes), tuple(group_sizes), src.device)
    out = torch.empty(src.shape, dtype=out_dtype, device=src.device)
    args = (src, weight, weight if bias is None else bias, shift, radius, out, h, w, c)
    options = dict(RADIUS=max(kernel_sizes) // 2, ADJOINT=adjoint, HAS_BIAS=bias is not None)
    kernel = _one_tile_kernel(*_block_sizes(h * w, c)) if interpreted() else _mix_kernel_tuned
    kernel[lambda meta: (n, triton.cdiv(h * w, meta['BLOCK_P']), triton.cdiv(c, meta['BLOCK_C']))](*args, **options)
    return out


@functools.lru_cache(maxsize=None)
def _one_tile_kernel(block_p: int, block_c: int):
    """The mixer kernel tuned to a single tile, for the interpreter (which cannot time tiles):
    the launch is the GPU's, config and grid included."""
    return triton.autotune([triton.Config(dict(BLOCK_P=block_p, BLOCK_C=block_c))], key=[])(_mix_kernel)


def _launch_weight_grad(grad: torch.Tensor, x: torch.Tensor, shifts, kernel_sizes, group_sizes) -> torch.Tensor:
    _check_runnable(x)
    n, h, w, c = x.shape
    shift, radius = _channel_table(tuple(shifts), tuple(kernel_sizes), tuple(group_sizes), x.device)
    size = max(kernel_sizes)
    block_p, block_c = _block_sizes(n * h * w, c, max_channels=32)  # two (taps, channels) accumulators
    channel_blocks = triton.cdiv(c, block_c)
    chunks = triton.cdiv(n * h * w, block_p)
    splits = max(1, min(chunks, WEIGHT_GRAD_PROGRAMS // channel_blocks))
    pixels_per_program = triton.cdiv(chunks, splits) * block_p
    splits = triton.cdiv(n * h * w, pixels_per_program)
    partial = torch.empty(splits, 2, size * size, c, dtype=torch.float32, device=x.device)
    _weight_grad_kernel[(splits, channel_blocks)](
        x, grad, shift, radius, partial, n, h, w, c, pixels_per_program, RADIUS=size // 2,
        TAPS=triton.next_power_of_2(size * size), BLOCK_P=block_p, BLOCK_C=block_c, num_warps=WEIGHT_GRAD_WARPS)
    return partial.sum(0)


# ----- custom operators ----------------------------------------------------------------------
@torch.library.custom_op('msmlp::shift_mix_triton', mutates_args=())
def _mix_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, shifts: List[int],
            kernel_sizes: List[int], group_sizes: List[int]) -> torch.Tensor:
    return _launch_mix(x, weight, bias, x.dtype, shifts, kernel_sizes, group_sizes, adjoint=False)


@torch.library.custom_op('msmlp::shift_mix_triton_grad_input', mutates_args=())
def _grad_input_op(grad: torch.Tensor, weight: torch.Tensor, shifts: List[int], kernel_sizes: List[int],
                   group_sizes: List[int]) -> torch.Tensor:
    return _launch_mix(grad, weight, None, grad.dtype, shifts, kernel_sizes, group_sizes, adjoint=True)


@torch.library.custom_op('msmlp::shift_mix_triton_grad_weight', mutates_args=())
def _grad_weight_op(grad: torch.Tensor, x: torch.Tensor, shifts: List[int], kernel_sizes: List[int],
                    group_sizes: List[int]) -> torch.Tensor:
    return _launch_weight_grad(grad, x, shifts, kernel_sizes, group_sizes)


@_mix_op.register_fake
def _(x, weight, bias, shifts, kernel_sizes, group_sizes):
    return torch.empty_like(x)


@_grad_input_op.register_fake
def _(grad, weight, shifts, kernel_sizes, group_sizes):
    return torch.empty_like(grad)


@_grad_weight_op.register_fake
def _(grad, x, shifts, kernel_sizes, group_sizes):
    size = max(kernel_sizes)
    return x.new_empty(2, size * size, x.shape[-1], dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _, shifts, kernel_sizes, group_sizes = inputs
    ctx.save_for_backward(x, weight)
    ctx.layout = (shifts, kernel_sizes, group_sizes)


def _backward(ctx, grad: torch.Tensor):
    x, weight = ctx.saved_tensors
    grad = grad.to(x.dtype).contiguous()
    need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
    grad_x = _grad_input_op(grad, weight, *ctx.layout) if need_x else None
    grad_weight = _grad_weight_op(grad, x, *ctx.layout) if need_weight else None
    grad_bias = grad.sum((0, 1, 2), dtype=torch.float32) if need_bias else None
    return grad_x, grad_weight, grad_bias, None, None, None


_mix_op.register_autograd(_backward, setup_context=_setup_context)


# ----- public API ----------------------------------------------------------------------------
def pack_weights(weights_lr: Sequence[torch.Tensor], weights_td: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-group depthwise kernels ``(c_g, 1, k_g, k_g)`` of both branches as one fp32
    ``(2, K * K, C)`` tensor (branch, tap, channel), each centred in the largest kernel ``K``."""
    size = max(w.shape[-1] for w in list(weights_lr) + list(weights_td))

    def branch(weights: Sequence[torch.Tensor]) -> torch.Tensor:
        padded = [F.pad(w.float(), [(size - w.shape[-1]) // 2] * 4).reshape(w.shape[0], size * size)
                  for w in weights]
        return torch.cat(padded).t()

    return torch.stack((branch(weights_lr), branch(weights_td))).contiguous()


def _check_layout(x: torch.Tensor, weights: Sequence[torch.Tensor], shifts, kernel_sizes, group_sizes) -> None:
    if x.dim() != 4:
        raise ValueError(f'expected an (N, H, W, C) map, got shape {tuple(x.shape)}')
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
    weight = pack_weights(weights_lr, weights_td)
    bias = torch.cat([b.float() for b in biases_lr]) + torch.cat([b.float() for b in biases_td])
    return _mix_op(x_nhwc.contiguous(), weight, bias, list(shifts), list(kernel_sizes), list(group_sizes))
