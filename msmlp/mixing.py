"""Shift-mix token mixing of an MS-MLP block, in two implementations of one function.

The released block splits channels into groups with ``torch.chunk``, rolls group g
circularly by ``shift_dist[g]`` along W (branch ``lr``) and along H (branch ``td``),
applies a depthwise conv of kernel ``mix_size[g]`` per group and branch, and adds the
two branches. ``reference`` does exactly that; ``fast`` computes the same function with
fewer, larger kernels. Both read the block's per-group ``dwconv_lr``/``dwconv_td``
parameters (the released key names), so gradients reach the same tensors.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .model import MSMLPBlock


def mix_reference(x: torch.Tensor, block: 'MSMLPBlock') -> torch.Tensor:
    """The released computation: per-group roll and per-group depthwise conv."""
    groups = torch.chunk(x, len(block.shift_dist), dim=1)
    lr = [conv(torch.roll(g, s, dims=3)) for g, s, conv in zip(groups, block.shift_dist, block.dwconv_lr)]
    td = [conv(torch.roll(g, s, dims=2)) for g, s, conv in zip(groups, block.shift_dist, block.dwconv_td)]
    return torch.cat(lr, dim=1) + torch.cat(td, dim=1)


def embedded_kernels(convs, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-group depthwise kernels, each zero-padded (centred) to ``size`` x ``size``."""
    weights = []
    for conv in convs:
        pad = (size - conv.kernel_size[0]) // 2
        weights.append(F.pad(conv.weight, (pad, pad, pad, pad)) if pad else conv.weight)
    return torch.cat(weights, dim=0), torch.cat([conv.bias for conv in convs], dim=0)


def _roll_groups(x: torch.Tensor, block: 'MSMLPBlock', dim: int) -> torch.Tensor:
    parts = torch.split(x, block.group_sizes, dim=1)
    return torch.cat([torch.roll(p, s, dims=dim) if s else p
                      for p, s in zip(parts, block.shift_dist)], dim=1)


def mix_fast(x: torch.Tensor, block: 'MSMLPBlock') -> torch.Tensor:
    """Both branches as one depthwise conv over the two rolled copies, kernels embedded
    in the stage's largest kernel (zero taps are exact: they add 0)."""
    size = max(block.mix_size)
    w_lr, b_lr = embedded_kernels(block.dwconv_lr, size)
    w_td, b_td = embedded_kernels(block.dwconv_td, size)
    c = x.shape[1]
    # interleave lr/td per channel so one grouped conv (2 inputs -> 1 output) sums them
    stacked = torch.stack((_roll_groups(x, block, 3), _roll_groups(x, block, 2)), dim=2)
    stacked = stacked.flatten(1, 2)
    weight = torch.stack((w_lr, w_td), dim=1).flatten(1, 2)
    return F.conv2d(stacked, weight, b_lr + b_td, padding=size // 2, groups=c)


MIX_IMPLS: Dict[str, Callable[[torch.Tensor, 'MSMLPBlock'], torch.Tensor]] = {
    'reference': mix_reference,
    'fast': mix_fast,
}


def shift_mix(x: torch.Tensor, block: 'MSMLPBlock', impl: str) -> torch.Tensor:
    return MIX_IMPLS[impl](x, block)
