"""MS-MLP: Mix-Shift-MLP (Zheng et al., arXiv 2202.06510).

Read top-down: token mixer and block, stage, model, checkpoint filter, registered
entry points. Parameter names are the released ones, so released checkpoints load
with a strict ``load_state_dict``. Unlike the released code the model accepts any
input size (padding where a stride needs it) and exposes the dense-task interface
of timm and mmdet backbones (``out_indices``, a norm per returned stage,
``frozen_stages``, gradient checkpointing, ``feature_info``).
"""

import contextlib
import contextvars
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from timm.layers import DropPath, register_notrace_module, trunc_normal_
from timm.models import build_model_with_cfg, register_model, resolve_pretrained_cfg
from timm.models._features import feature_take_indices
from timm.models._registry import generate_default_cfgs

from .mixing import BLOCK_FORWARDS, MIX_IMPLS, auto_impl, shift_mix

__all__ = ['MSMLP', 'MIX_SIZES', 'SHIFT_DIST', 'checkpoint_filter_fn']

SHIFT_DIST = (-2, -1, 0, 1, 2)
MIX_SIZES = ((1, 1, 3, 5, 7), (1, 3, 3, 5, 7), (1, 5, 5, 5, 7), (1, 7, 7, 7, 7))


_EAGER_WHEN_WATCHED = contextvars.ContextVar('msmlp_eager_when_watched', default=False)


@contextlib.contextmanager
def eager_when_watched() -> Iterator[None]:
    """Run the eager paths under dispatch modes too: for a mode that watches the operations
    actually run (a memory tracker), where by default the model runs the released ones."""
    token = _EAGER_WHEN_WATCHED.set(True)
    try:
        yield
    finally:
        _EAGER_WHEN_WATCHED.reset(token)


@torch.jit.unused
def _watched() -> bool:
    """Whether the operations are traced (torch.fx, torch.jit.trace) or watched (a dispatch
    mode: FLOP counting, fake tensors, torch.export; not inside ``eager_when_watched``)."""
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode
    return ((is_in_torch_dispatch_mode() and not _EAGER_WHEN_WATCHED.get()) or torch.jit.is_tracing()
            or torch.fx._symbolic_trace.is_fx_symbolic_tracing())


@torch.jit.unused
def _traced() -> bool:
    """Whether the operations are compiled, traced or watched."""
    return torch.compiler.is_compiling() or _watched()


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the bottom and right of an NCHW map so that H and W divide ``multiple``."""
    # written through the padded size, (h + m - 1) // m * m: the conv's output size is then
    # (h + m - 1) // m, so traced sizes stay short expressions from stage to stage
    pad_h = (x.shape[2] + multiple - 1) // multiple * multiple - x.shape[2]
    pad_w = (x.shape[3] + multiple - 1) // multiple * multiple - x.shape[3]
    # sizes may be symbolic when traced or scripted: pad without asking (a zero pad is a copy)
    if torch.jit.is_scripting():
        return F.pad(x, [0, pad_w, 0, pad_h])
    if _traced() or pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    return x


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (computed channels-last, as released).

    With ``contiguous=False`` the result keeps its channels-last memory (an NCHW view of it),
    which the fast blocks read without a copy; the reference blocks make their input contiguous.
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-6, contiguous: bool = True):
        super().__init__(normalized_shape, eps=eps)
        self.contiguous = contiguous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)
        return x.contiguous() if self.contiguous else x


class PatchEmbed(nn.Module):
    """Stem: a 4x4 stride-4 conv, then LayerNorm over channels."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int = 4):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = LayerNorm2d(embed_dim, eps=1e-6, contiguous=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(_pad_to_multiple(x, self.patch_size)))


@register_notrace_module
class Downsample(nn.Module):
    """Between stages: a 2x2 stride-2 conv doubling channels, then LayerNorm (conv first).

    Its input layout depends on sizes (``_small_for_weight``), so torch.fx keeps it as one
    leaf, as it keeps the blocks: a traced model runs the eager module and equals eager exactly.
    """

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, out_dim, kernel_size=2, stride=2)
        self.norm = LayerNorm2d(out_dim, eps=1e-6, contiguous=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _pad_to_multiple(x, 2)
        if not torch.jit.is_scripting() and _small_for_weight(x, self.proj.weight):
            x = x.contiguous()
        return self.norm(self.proj(x))


@torch.jit.unused
def _small_for_weight(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a channels-last map is small enough beside a conv's NCHW weight that the conv
    costs less on an NCHW copy of the map: on a channels-last input the CPU conv first copies
    the weight to channels-last, every call (the last downsampling of msmlp_tiny on one 224x224
    image: 2.0 ms, 0.8 ms on an NCHW copy; where the weight is at most 4x the map, measured, the
    channels-last conv is as fast or faster)."""
    return (not _traced() and x.device.type == 'cpu' and weight.numel() > 4 * x.numel()
            and not x.is_contiguous() and weight.is_contiguous())


def channel_groups(dim: int, num_groups: int = 5) -> List[int]:
    """Group sizes of ``torch.chunk(x, num_groups, dim=1)`` for ``dim`` channels."""
    size = -(-dim // num_groups)
    sizes = [size] * (dim // size) + ([dim % size] if dim % size else [])
    if len(sizes) != num_groups:
        raise ValueError(f'{dim} channels cannot be split into {num_groups} groups as the released '
                         f'model splits them (torch.chunk gives {sizes})')
    return sizes


@register_notrace_module
class MSMLPBlock(nn.Module):
    """Mix-shift block: shifted depthwise mixing along W and H, then a channel MLP.

    Eager, ``'fast'`` runs :func:`msmlp.mixing.forward_fast`; compiled, traced, exported or
    scripted, the block runs the released computation (``forward_released``), the same function.
    ``'triton'`` runs the Triton mixer (compiled too, as a custom operator), ``'triton_norm'``
    the Triton mixer and the LayerNorm after it as one kernel; ``'auto'``, the default, picks
    ``'triton'`` for CUDA maps where triton imports, and ``'fast'`` elsewhere.
    torch.fx keeps the block as one leaf (registered with timm), so a traced model runs the
    eager block and gives the eager outputs exactly.

    Args:
        dim: Channels.
        mix_size: Depthwise kernel of each channel group (the group shifted by
            ``shift_dist[g]`` uses ``mix_size[g]``).
        shift_dist: Circular shift of each channel group.
        drop_path: Stochastic depth rate.
        layer_scale_init: Initial value of the layer scale ``gamma``.
        mlp_ratio: Hidden width of the channel MLP relative to ``dim``.
        mix_impl: ``'auto'`` (default: ``'triton'`` on CUDA maps where triton imports, else
            ``'fast'``), ``'fast'``, ``'reference'``, ``'triton'`` (one Triton kernel for the
            mixer, on GPUs or under Triton's interpreter; elsewhere the fast path) or
            ``'triton_norm'`` (one kernel for the mixer and the norm after it); all compute
            the released function.
    """
    __jit_unused_properties__ = ['mix_impl']

    def __init__(
            self,
            dim: int,
            mix_size: Sequence[int],
            shift_dist: Sequence[int] = SHIFT_DIST,
            drop_path: float = 0.,
            layer_scale_init: float = 1e-6,
            mlp_ratio: float = 4.,
            mix_impl: str = 'auto',
    ):
        super().__init__()
        groups = channel_groups(dim, len(shift_dist))
        if len(mix_size) != len(groups):
            raise ValueError(f'mix_size {list(mix_size)} must give one kernel per channel group ({len(groups)})')
        if any(k < 1 or k % 2 == 0 for k in mix_size):
            raise ValueError(f'mix_size {list(mix_size)}: kernels must be odd (padded by k // 2 on each side, '
                             'an even one would change the map\'s size)')
        self.shift_dist = tuple(shift_dist)
        self.mix_size = tuple(mix_size)
        self.group_sizes = tuple(groups)
        self.mix_impl = mix_impl
        self.gamma = nn.Parameter(layer_scale_init * torch.ones(dim))
        self.dwconv_lr = nn.ModuleList(
            nn.Conv2d(c, c, k, padding=k // 2, groups=c) for c, k in zip(groups, mix_size))
        self.dwconv_td = nn.ModuleList(
            nn.Conv2d(c, c, k, padding=k // 2, groups=c) for c, k in zip(groups, mix_size))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(mlp_ratio * dim)
        self.pwconv1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(hidden, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    @property
    def mix_impl(self) -> str:
        return self._mix_impl

    @mix_impl.setter
    def mix_impl(self, impl: str) -> None:
        if impl not in MIX_IMPLS:
            raise ValueError(f'mix_impl must be one of {sorted(MIX_IMPLS)}, got {impl!r}')
        self._mix_impl = impl

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """The token mixer alone (NCHW in, NCHW out)."""
        return shift_mix(x, self, self._mix_impl)

    def mix_released(self, x: torch.Tensor) -> torch.Tensor:
        """The released token mixer: per group a circular roll and a depthwise conv (NCHW)."""
        groups = torch.chunk(x, len(self.shift_dist), dim=1)
        lr: List[torch.Tensor] = []
        td: List[torch.Tensor] = []
        for g, (conv_lr, conv_td) in enumerate(zip(self.dwconv_lr, self.dwconv_td)):
            lr.append(conv_lr(torch.roll(groups[g], self.shift_dist[g], dims=3)))
            td.append(conv_td(torch.roll(groups[g], self.shift_dist[g], dims=2)))
        return torch.cat(lr, dim=1) + torch.cat(td, dim=1)

    def forward_released(self, x: torch.Tensor) -> torch.Tensor:
        """The released block. torch.compile runs it for the fast path too (inductor fuses it
        best), and so does a dispatch mode such as FLOP counting (whose counts it then matches)."""
        x = x.contiguous()  # the released NCHW layout, whatever the previous layer left
        shortcut = x
        x = self.mix_released(x).permute(0, 2, 3, 1)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        x = (self.gamma * x).permute(0, 3, 1, 2)
        return shortcut + self.drop_path(x)

    @torch.jit.unused
    def _forward_fast(self, x: torch.Tensor, impl: str) -> torch.Tensor:
        # same function, channels-last (see mixing.py)
        return BLOCK_FORWARDS[impl](self, x)

    @torch.jit.unused
    def _impl_for(self, x: torch.Tensor) -> str:
        if self._mix_impl != 'auto':
            return self._mix_impl
        return 'fast' if _watched() else auto_impl(x)  # traced or watched, every path runs the released one

    @torch.jit.unused
    def _runs_fast(self, impl: str) -> bool:
        if impl in ('triton', 'triton_norm'):  # custom ops: torch.compile keeps them
            return not _watched()
        return impl == 'fast' and not _traced()

    def forward_nchw(self, x: torch.Tensor) -> torch.Tensor:
        """The block on an NCHW map (``forward``; blocks on other layouts call it)."""
        if not torch.jit.is_scripting():
            impl = self._impl_for(x)
            if self._runs_fast(impl) and x.shape[0] > 0:  # the fast paths need an image (fx: not asked)
                return self._forward_fast(x, impl)
        return self.forward_released(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_nchw(x)


class MSMLPStage(nn.Module):
    """Blocks at one resolution, then (except in the last stage) a downsampling.

    ``forward`` returns ``(stage_output, next_stage_input)``: the stage output is taken
    before the downsampling, as in the released model.

    Args:
        dim: Channels of the stage.
        depth: Number of blocks.
        mix_size: Depthwise kernel size of each channel group of the token mixer.
        shift_dist: Shift of each channel group (the released wrap-around roll).
        drop_path: Drop-path rate of each block.
        layer_scale_init: Initial layer scale of the blocks.
        downsample: Follow the blocks with a 2x downsampling to ``2 * dim`` channels.
        mix_impl: ``'auto'``, ``'fast'``, ``'reference'``, ``'triton'`` or ``'triton_norm'`` token mixing.
    """

    def __init__(
            self,
            dim: int,
            depth: int,
            mix_size: Sequence[int],
            shift_dist: Sequence[int],
            drop_path: Sequence[float],
            layer_scale_init: float,
            downsample: bool,
            mix_impl: str,
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.blocks = nn.Sequential(*[
            MSMLPBlock(dim, mix_size, shift_dist, drop_path[i], layer_scale_init, mix_impl=mix_impl)
            for i in range(depth)])
        self.downsample = Downsample(dim, 2 * dim) if downsample else None

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        for block in self.blocks:
            if not torch.jit.is_scripting() and self.grad_checkpointing and x.requires_grad:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x, (self.downsample(x) if self.downsample is not None else x)


class MSMLP(nn.Module):
    """MS-MLP backbone and classifier.

    Args:
        in_chans: Input image channels.
        num_classes: Classifier outputs; 0 for no classifier (``forward`` then returns
            pooled features).
        embed_dim: Channels of the first stage; stage i has ``embed_dim * 2**i``.
        depths: Blocks per stage.
        mix_sizes: Per stage, the depthwise kernel of each channel group.
        shift_dist: Circular shift of each channel group.
        drop_path_rate: Stochastic depth, rising linearly from 0 over all blocks.
        drop_rate: Dropout before the classifier (timm's ``drop_rate``, its train.py's ``--drop``;
            the released recipe has none).
        layer_scale_init: Initial layer scale.
        global_pool: ``'avg'``, ``'max'``, ``'avgmax'`` (their mean; timm's ``'fast'``, ``'fastavg'``,
            ``'fastmax'``, ``'fastavgmax'`` are the same), or ``''``: no pooling; as in
            timm's ConvNeXt, the norm and the classifier then apply at every position (``forward``
            returns a B x classes x h x w map).
        out_indices: Stages whose outputs ``forward_dense`` returns, each through a
            LayerNorm of its own (``out_norms``), as mmdet backbones do.
        frozen_stages: -1 freezes nothing, 0 the stem, i >= 1 the stem and stages 0..i-1
            (with their output norms); re-applied on every ``train()``.
        with_cp: Gradient checkpointing of every block.
        mix_impl: ``'auto'`` (default), ``'fast'``, ``'reference'``, ``'triton'`` or
            ``'triton_norm'`` token mixing (same function; see :class:`MSMLPBlock`).
        device: Where the parameters go (``timm.create_model``'s ``device``, e.g. ``'meta'``).
        dtype: Their floating-point type (``timm.create_model``'s ``dtype``).
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dim: int = 96,
            depths: Sequence[int] = (3, 3, 9, 3),
            mix_sizes: Sequence[Sequence[int]] = MIX_SIZES,
            shift_dist: Sequence[int] = SHIFT_DIST,
            drop_path_rate: float = 0.,
            drop_rate: float = 0.,
            layer_scale_init: float = 1e-6,
            global_pool: str = 'avg',
            out_indices: Optional[Sequence[int]] = None,
            frozen_stages: int = -1,
            with_cp: bool = False,
            mix_impl: str = 'auto',
            device: Union[str, torch.device, None] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        num_stages = len(depths)
        if len(mix_sizes) != num_stages:
            given = 'the released mix_sizes have' if mix_sizes is MIX_SIZES else 'mix_sizes has'
            raise ValueError(f'depths {tuple(depths)} names {num_stages} stages, but {given} {len(mix_sizes)} entries: '
                             'give as many depths as mix_sizes (or mix_sizes for each stage)')
        _check_head(num_classes, global_pool)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.depths = tuple(depths)
        self.dims = tuple(embed_dim * 2 ** i for i in range(num_stages))
        self.num_features = self.head_hidden_size = self.dims[-1]
        self.frozen_stages = frozen_stages

        self.patch_embed = PatchEmbed(in_chans, embed_dim)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        self.layers = nn.ModuleList()
        self.feature_info = []
        start = 0
        for i, (dim, depth) in enumerate(zip(self.dims, depths)):
            self.layers.append(MSMLPStage(
                dim, depth, mix_sizes[i], shift_dist, rates[start:start + depth],
                layer_scale_init, downsample=i < num_stages - 1, mix_impl=mix_impl))
            # a stage's output is its last block's (the stage module returns it with the next input)
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f'layers.{i}.blocks.{depth - 1}'))
            start += depth
        self.norm = nn.LayerNorm(self.num_features, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

        self.out_indices = self._check_indices(out_indices) if out_indices is not None else None
        self.out_norms = nn.ModuleDict(
            {str(i): LayerNorm2d(self.dims[i], eps=1e-6) for i in self.out_indices or ()})

        self.apply(self._init_weights)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)
        self.set_grad_checkpointing(with_cp)
        self._freeze_stages()

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def _check_indices(self, indices: Sequence[int]) -> Tuple[int, ...]:
        return tuple(_stages_taken(list(indices), len(self.layers), 'out_indices'))

    # ----- training-time controls -----------------------------------------------------
    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def set_mix_impl(self, impl: str) -> None:
        """Switch every block to ``'auto'``, ``'fast'``, ``'reference'``, ``'triton'`` or
        ``'triton_norm'`` token mixing."""
        for block in self.modules():
            if isinstance(block, MSMLPBlock):
                block.mix_impl = impl

    def _freeze_stages(self) -> None:
        if self.frozen_stages < 0:
            return
        frozen: List[nn.Module] = [self.patch_embed]
        for i in range(min(self.frozen_stages, len(self.layers))):
            frozen.append(self.layers[i])
            if str(i) in self.out_norms:
                frozen.append(self.out_norms[str(i)])
        for module in frozen:
            module.eval()
            for p in module.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True) -> 'MSMLP':
        super().train(mode)
        self._freeze_stages()
        return self

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str) -> None:
        """timm's custom-load hook (``pretrained=True``): the file through the safe loader."""
        from .checkpoint import load_pretrained
        load_pretrained(self, checkpoint_path, strict=pretrained_strict())

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set:
        return {'gamma'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(stem=r'^patch_embed', blocks=r'^layers\.(\d+)' if coarse else [
            (r'^layers\.(\d+)\.downsample', (99998,)), (r'^layers\.(\d+)\.blocks\.(\d+)', None),
            (r'^norm', (99999,))])

    # ----- classifier -------------------------------------------------------------------
    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        _check_head(num_classes, self.global_pool if global_pool is None else global_pool)
        if global_pool is not None:
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            self._init_weights(self.head)

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """timm's pruning for ``forward_intermediates(indices)``: the stages after the last of
        ``indices`` go (and with them the head, sized for the last stage), as do their output norms.

        ``prune_norm`` changes nothing: the features have no norm of their own (``norm`` is the
        head's, and goes with it). Returns the kept indices.
        """
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        prune_end = max_index < len(self.layers) - 1
        self.layers = self.layers[:max_index + 1]
        self.layers[-1].downsample = None  # it fed a stage that is gone
        self.depths = self.depths[:max_index + 1]
        if self.out_indices is not None:
            for i in self.out_indices:
                if i > max_index:
                    del self.out_norms[str(i)]
            self.out_indices = tuple(i for i in self.out_indices if i <= max_index) or None
        if prune_end:
            self.num_features = self.head_hidden_size = self.dims[max_index]
        if prune_head or prune_end:
            self.norm = nn.Identity()
            self.reset_classifier(0, '')
        return take_indices

    # ----- forward ----------------------------------------------------------------------
    def _stage_outputs(self, x: torch.Tensor, indices: List[int], stop: int) -> List[torch.Tensor]:
        outputs: List[torch.Tensor] = []
        x = self.patch_embed(x)
        for i, stage in enumerate(self.layers):
            if i <= stop:
                out, x = stage(x)
                if i in indices:
                    outputs.append(out)
        return outputs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The unpooled output of the last stage (B, C, H/32, W/32)."""
        last = len(self.layers) - 1
        return self._stage_outputs(x, [last], last)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool != '':
            x = self.head_drop(self.norm(_pool(x, self.global_pool)))
            return x if pre_logits else self.head(x)
        x = self.head_drop(self.norm(x.permute(0, 2, 3, 1)))  # unpooled: norm and classifier at every position
        if not pre_logits:
            x = self.head(x)
        return x.permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.export
    def forward_dense(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Outputs of the ``out_indices`` stages, each through its own LayerNorm."""
        indices = self.out_indices
        if indices is None:
            raise RuntimeError('forward_dense needs out_indices; build the model with out_indices=(0, 1, 2, 3)')
        take = [i for i in indices]  # a list (TorchScript reads out_indices as a fixed-size tuple)
        outputs = self._stage_outputs(x, take, max(take))
        normed: List[torch.Tensor] = []
        for j, norm in enumerate(self.out_norms.values()):  # in out_indices order
            normed.append(norm(outputs[j]))
        return normed

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's feature API: stage outputs before downsampling (TorchScript compiles it, for
        timm's ``features_only`` wrapper).

        Args:
            x: Input images (N, C, H, W), any size.
            indices: The stages to return: a sequence of stage indices (negative from the end),
                or an int n for the last n stages (1 to 4); all by default.
            norm: Ignored: stage outputs are returned raw, as the released model's (the dense
                heads' norms are ``out_norms``, applied by ``forward_dense``).
            stop_early: Run the stages only up to the last one taken (the final features are
                then its output).
            output_fmt: ``'NCHW'`` only.
            intermediates_only: Return only the stage outputs.

        Returns:
            The stage outputs, or ``(final features, stage outputs)``, the final features being
            ``forward_features``'s.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got '{output_fmt}'")
        n = len(self.layers)
        if indices is None:
            take = list(range(n))
        elif isinstance(indices, int):
            if not 0 < indices <= n:
                raise ValueError(f'indices={indices} asks for the last {indices} stages of {n}: give 1 to {n}')
            take = list(range(n - indices, n))
        else:
            take = _stages_taken(list(indices), n)
        last = max(take) if (stop_early or intermediates_only) else n - 1
        stages = take + [n - 1] if last == n - 1 else take  # the last stage's output is the final features
        outputs = self._stage_outputs(x, stages, last)
        intermediates = outputs[:len(take)]
        if intermediates_only:
            return intermediates
        return outputs[-1], intermediates


def _stages_taken(indices: List[int], n: int, name: str = 'indices') -> List[int]:
    """Stage numbers given as ``indices`` or ``out_indices`` (negative from the end), sorted."""
    taken: List[int] = []
    for i in indices:
        stage = i + n if i < 0 else i
        if not 0 <= stage < n:
            raise ValueError(f'{name} {indices} must name stages in 0..{n - 1} (or -{n}..-1)')
        if stage not in taken:
            taken.append(stage)
    if len(taken) == 0:
        raise ValueError(f'{name} is empty: name at least one stage')
    taken.sort()
    return taken


POOL_TYPES = ('avg', 'max', 'avgmax', '')


def _plain_pool(kind: str) -> str:
    """timm's ``fast*`` pooling names (``'fast'``, ``'fastmax'``, ...) as the pooling they are: it
    flattens here anyway."""
    if kind.startswith('fast'):
        return kind[4:] if len(kind) > 4 else 'avg'
    return kind


def _pool(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Global pooling of a (B, C, H, W) map to (B, C), as timm's ``SelectAdaptivePool2d``."""
    kind = _plain_pool(kind)
    if kind == 'avg':
        return x.mean((2, 3))
    if kind == 'max':
        return x.amax((2, 3))
    return 0.5 * (x.mean((2, 3)) + x.amax((2, 3)))


def _check_head(num_classes: int, global_pool: str) -> None:
    if num_classes < 0:
        raise ValueError(f'num_classes must be 0 (no classifier) or more, got {num_classes}')
    if _plain_pool(global_pool) not in POOL_TYPES:
        why = _POOL_REFUSALS.get(_plain_pool(global_pool))
        raise ValueError(f'global_pool must be one of {POOL_TYPES}, got {global_pool!r}' + (f' ({why})' if why else ''))


_POOL_REFUSALS = {
    'catavgmax': 'pooling that doubles the width does not fit the head norm, as in timm\'s ConvNeXt',
    'token': 'MS-MLP has no class token',
    'map': 'MS-MLP has no attention pooling',
}


# ----- checkpoint conversion -------------------------------------------------------------
def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: Optional[MSMLP] = None
                         ) -> Dict[str, torch.Tensor]:
    """Map a released, timm, Lightning or mmdet state dict onto ``MSMLP`` key names.

    Pure: strips the wrappers the training frameworks add (``model``/``state_dict``
    nesting is removed by the caller) and the ``model.``, ``backbone.``, ``module.`` and
    ``net.`` key prefixes; keeps tensors as they are.
    """
    prefixes = ('module.', 'model.', 'backbone.', 'net.')
    out = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in prefixes:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


# ----- registered entry points -------------------------------------------------------------
RELEASED_URL = ('https://tsciencescu.blob.core.windows.net/projectshzheng/MSMLP/released_model/'
                '{0}_patch4/{0}_patch4_ckpt_epoch299.pth')


def _cfg(**kwargs) -> Dict:
    # custom_load: timm hands the file to MSMLP.load_pretrained (the safe loader); a plain
    # torch.load refuses the released files
    return dict(
        num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=224 / 256,
        interpolation='bicubic', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        first_conv='patch_embed.proj', classifier='head', license='mit', custom_load=True,
        paper_ids='arXiv:2202.06510', **kwargs)


default_cfgs = generate_default_cfgs({
    f'{name}.in1k': _cfg(url=RELEASED_URL.format(name), notes=('the released ImageNet-1K checkpoint',))
    for name in ('msmlp_tiny', 'msmlp_small', 'msmlp_base')
})

VARIANT_ARCHS = {
    'msmlp_tiny': dict(embed_dim=96, depths=(3, 3, 9, 3)),
    'msmlp_small': dict(embed_dim=96, depths=(3, 3, 27, 3)),
    'msmlp_base': dict(embed_dim=128, depths=(3, 3, 27, 3)),
}
# The released ImageNet-1K recipe's stochastic depth per size (timm builds with 0 unless told).
RECIPE_DROP_PATH = {'msmlp_tiny': 0.1, 'msmlp_small': 0.4, 'msmlp_base': 0.5}


def check_feature_cls(variant: str, kwargs: dict, module_outputs: bool = False) -> None:
    """Refuse the timm feature wrappers that would give wrong features: ``'dict'``/``'list'``
    rebuild the model from its modules, whose outputs are not an MS-MLP stage's (that is taken
    after the stage's blocks, before its downsampling, through its norm; ``module_outputs``: the
    model's stages are modules, as Swin's); ``'fx'`` traces a graph whose ``train()`` puts
    ``frozen_stages`` back in training mode."""
    if not kwargs.get('features_only'):
        return
    cls = str(kwargs.get('feature_cls', 'getter')).lower()
    if cls in ('dict', 'list') and not module_outputs:
        raise ValueError(f"{variant}: feature_cls={cls!r} cannot give its stage outputs (taken inside a stage, "
                         "through its norm); use 'getter' (the default), 'hook' or 'fx'")
    if cls == 'fx' and kwargs.get('frozen_stages', -1) >= 0:
        raise ValueError(f"{variant}: frozen_stages with feature_cls='fx': the traced graph's train() would put "
                         "the frozen stages back in training mode (dropout, drop path); use 'getter' (the default)")


# create_model's pretrained_strict while timm builds a model (its custom load does not pass it on)
_PRETRAINED_STRICT = contextvars.ContextVar('msmlp_pretrained_strict', default=True)


def pretrained_strict() -> bool:
    """``timm.create_model``'s ``pretrained_strict`` while it loads a file through a model's
    ``load_pretrained`` (True outside ``create_model``)."""
    return _PRETRAINED_STRICT.get()


def weights_url(cfg: Dict) -> Optional[str]:
    """The URL timm takes a resolved pretrained cfg's weights from; None where they come from an
    overlay's ``state_dict`` or ``file``, a ``local-dir:`` folder or the Hugging Face hub."""
    if cfg.get('source') in ('hf-hub', 'local-dir') or cfg.get('hf_hub_id'):
        return None
    if cfg.get('state_dict') is not None or cfg.get('file'):
        return None
    return cfg.get('url') or None


def build_variant(model_cls: type, variant: str, pretrained: bool, kwargs: Dict, feature_cfg: Dict,
                  no_weights: Optional[str] = None, pretrained_filter_fn=None) -> nn.Module:
    """timm's ``build_model_with_cfg`` for a registered variant, files through the safe loader.

    A cfg's URL is downloaded by :func:`msmlp.checkpoint.download_weights` (into ``cache_dir``
    if given) and the file handed to the model's ``load_pretrained``, which honours
    ``pretrained_strict``; an overlay's ``state_dict``, a ``local-dir:`` folder and the Hugging
    Face hub go to timm's own loading, through ``pretrained_filter_fn``. ``no_weights``: the
    error when the cfg names no weights at all."""
    overlay = dict(kwargs.pop('pretrained_cfg_overlay', None) or {})
    overlay.setdefault('custom_load', True)  # a file goes to the safe loader (timm resets it for a given file)
    if pretrained:
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                     pretrained_cfg_overlay=overlay).to_dict()
        url = weights_url(cfg)
        if url:
            from .checkpoint import download_weights
            overlay['file'] = download_weights(url, cache_dir=kwargs.get('cache_dir'))
        elif no_weights and not (cfg.get('file') or cfg.get('state_dict') is not None or cfg.get('source')):
            raise ValueError(f'{variant}: {no_weights}')
    token = _PRETRAINED_STRICT.set(bool(kwargs.get('pretrained_strict', True)))
    try:
        return build_model_with_cfg(model_cls, variant, pretrained=pretrained, pretrained_cfg_overlay=overlay,
                                    feature_cfg=feature_cfg, pretrained_filter_fn=pretrained_filter_fn, **kwargs)
    finally:
        _PRETRAINED_STRICT.reset(token)


def _msmlp_weights(state_dict: Dict[str, torch.Tensor], model: Optional[nn.Module] = None) -> Dict[str, torch.Tensor]:
    """timm's filter for weights it reads itself (an overlay's state dict, a local folder): any
    layout :func:`msmlp.extract_state_dict` reads."""
    from .checkpoint import extract_state_dict
    return extract_state_dict(state_dict, source='the pretrained state dict')


def _create_msmlp(variant: str, pretrained: bool = False, **kwargs) -> MSMLP:
    """Build a variant through timm. ``pretrained=True`` loads the released checkpoint, downloaded
    once from the cfg's ``url`` (see ``msmlp.checkpoint.download_weights``), or
    ``pretrained_cfg_overlay=dict(file=...)``: any file ``msmlp.load_pretrained`` reads (or
    ``state_dict=...``, a ``local-dir:`` or ``hf-hub:`` model: timm reads those)."""
    check_feature_cls(variant, kwargs)
    return build_variant(MSMLP, variant, pretrained, dict(VARIANT_ARCHS[variant], **kwargs),
                         feature_cfg=dict(feature_cls='getter', out_indices=(0, 1, 2, 3)),
                         pretrained_filter_fn=_msmlp_weights)


@register_model
def msmlp_tiny(pretrained: bool = False, **kwargs) -> MSMLP:
    return _create_msmlp('msmlp_tiny', pretrained, **kwargs)


@register_model
def msmlp_small(pretrained: bool = False, **kwargs) -> MSMLP:
    return _create_msmlp('msmlp_small', pretrained, **kwargs)


@register_model
def msmlp_base(pretrained: bool = False, **kwargs) -> MSMLP:
    return _create_msmlp('msmlp_base', pretrained, **kwargs)
