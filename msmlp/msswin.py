"""MS-Swin: the paper's hybrids of MS-MLP and the Swin Transformer, on timm's Swin.

The paper reports that mixing MS-MLP into Swin improves it at three scales; its authors
released no code for it and it does not fix the layout, so this is a configurable hybrid
with a documented default. :class:`MSSwin` *is* timm's ``SwinTransformer`` (imported and
extended, nothing copied) whose blocks follow ``block_pattern``, repeated along each stage:

* ``'ws'``: window attention (timm's Swin block with shift 0);
* ``'sw'``: shifted-window attention (timm's Swin block with shift window // 2);
* ``'ms'``: a mix-shift block, this project's :class:`msmlp.model.MSMLPBlock` with the
  stage's mix sizes, on the same channels-last tokens (fast path included).

``('ws', 'sw')`` is Swin itself: the state dict is timm's and the outputs are timm's. The
registered default ``('ws', 'ms')`` replaces the shifted-window attention of every second
Swin block by mix-shift mixing, whose shifted groups connect neighbouring windows as the
shifted windows did (our choice: the paper does not say where its MS blocks go).

Read top-down: the mix-shift block in Swin's layout, the model, checkpoint loading (from
MS-Swin or timm Swin checkpoints), registered entry points.
"""
from __future__ import annotations

import os
import warnings
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from timm.layers import PatchEmbed
from timm.models import register_model
from timm.models._registry import generate_default_cfgs
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer import checkpoint_filter_fn as swin_checkpoint_filter_fn
from torch import nn

from .checkpoint import CheckpointError, adapt_stem, check_family, extract_state_dict, listed, read_checkpoint
from .model import MIX_SIZES, SHIFT_DIST, MSMLP, MSMLPBlock, build_variant, check_feature_cls, pretrained_strict

__all__ = ['MSSwin', 'MSSwinBlock', 'BLOCK_TYPES', 'DEFAULT_PATTERN', 'VARIANT_ARCHS', 'load_swin_checkpoint']

BLOCK_TYPES = ('ws', 'sw', 'ms')
DEFAULT_PATTERN = ('ws', 'ms')
Pattern = Union[Sequence[str], Sequence[Sequence[str]]]


class MSSwinBlock(MSMLPBlock):
    """The MS-MLP block on Swin's tokens: (B, H, W, C) in and out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_nchw(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def set_input_size(self, feat_size: Tuple[int, int], window_size: Tuple[int, int],
                       always_partition: Optional[bool] = None) -> None:
        """Swin resizes the windows of its blocks; a mix-shift block has none (any size works)."""


def _stage_patterns(block_pattern: Pattern, num_stages: int) -> List[Tuple[str, ...]]:
    """One pattern per stage from one pattern for all or a list of per-stage patterns."""
    if isinstance(block_pattern, str):
        raise ValueError(f"block_pattern must be a sequence of block types such as ('ws', 'ms'), got {block_pattern!r}")
    per_stage = all(not isinstance(p, str) for p in block_pattern)
    patterns = [tuple(p) for p in block_pattern] if per_stage else [tuple(block_pattern)] * num_stages
    if len(patterns) != num_stages:
        raise ValueError(f'block_pattern has {len(patterns)} per-stage patterns for {num_stages} stages')
    for pattern in patterns:
        unknown = [kind for kind in pattern if kind not in BLOCK_TYPES]
        if not pattern or unknown:
            raise ValueError(f'block_pattern {pattern}: block types are {BLOCK_TYPES}, got {unknown or "none"}')
    return patterns


class MSSwin(SwinTransformer):
    """timm's Swin Transformer with mix-shift blocks where ``block_pattern`` puts them.

    Args:
        block_pattern: Block types repeated along every stage (``('ws', 'ms')``), or one
            such pattern per stage. ``('ws', 'sw')`` is Swin.
        mix_sizes: Per stage, the depthwise kernel of each channel group of the MS blocks.
        layer_scale_init: Initial layer scale of the MS blocks.
        mix_impl: ``'auto'`` (default: triton on CUDA maps where triton imports, else fast),
            ``'fast'``, ``'reference'``, ``'triton'`` or ``'triton_norm'`` mixing in the MS blocks
            (same function).
        out_indices: Stages ``forward_dense`` returns (NCHW), each through a LayerNorm of its own.
        frozen_stages: -1 freezes nothing, 0 the stem, i >= 1 the stem and stages 0..i-1
            (with their output norms and the patch merging after stage i-1, as mmdet's Swin);
            re-applied on every ``train()``.
        with_cp: Gradient checkpointing of every block.
        strict_img_size: Require ``img_size``; by default any size works (padded to the patch
            and to the windows, attention masks built for the size).
        **kwargs: ``SwinTransformer`` arguments (``embed_dim``, ``depths``, ``num_heads``,
            ``window_size``, ``drop_path_rate``, ``num_classes``, ``img_size``, ...).
    """

    def __init__(
            self,
            block_pattern: Pattern = DEFAULT_PATTERN,
            mix_sizes: Sequence[Sequence[int]] = MIX_SIZES,
            layer_scale_init: float = 1e-6,
            mix_impl: str = 'auto',
            out_indices: Optional[Sequence[int]] = None,
            frozen_stages: int = -1,
            with_cp: bool = False,
            strict_img_size: bool = False,
            **kwargs,
    ):
        if not strict_img_size:
            kwargs.setdefault('embed_layer', partial(PatchEmbed, dynamic_img_pad=True))
        super().__init__(strict_img_size=strict_img_size, **kwargs)
        patterns = _stage_patterns(block_pattern, len(self.layers))
        if len(mix_sizes) < len(self.layers):
            raise ValueError(f'mix_sizes has {len(mix_sizes)} entries for {len(self.layers)} stages')
        self.block_pattern = patterns
        for i, (stage, pattern) in enumerate(zip(self.layers, patterns)):
            for j, block in enumerate(stage.blocks):
                kind = pattern[j % len(pattern)]
                if kind == 'ms':
                    stage.blocks[j] = self._ms_block(block, mix_sizes[i], layer_scale_init, mix_impl)
                else:
                    self._set_shift(block, kind == 'sw', self._ref_window_sizes[i])

        self.dims = tuple(info['num_chs'] for info in self.feature_info)
        self.frozen_stages = frozen_stages
        self.out_indices = MSMLP._check_indices(self, out_indices) if out_indices is not None else None
        self.out_norms = nn.ModuleDict({str(i): nn.LayerNorm(self.dims[i]) for i in self.out_indices or ()})
        placement = {k: kwargs[k] for k in ('device', 'dtype') if kwargs.get(k) is not None}
        if placement:  # timm's Swin made its own layers so, the MS blocks and output norms follow
            self.to(**placement)
        self.set_grad_checkpointing(with_cp)
        self._freeze_stages()

    @staticmethod
    def _ms_block(swin_block: nn.Module, mix_size: Sequence[int], layer_scale_init: float,
                  mix_impl: str) -> MSSwinBlock:
        """An MS block in place of ``swin_block``: same width, drop path and MLP ratio."""
        drop_path = getattr(swin_block.drop_path1, 'drop_prob', 0.)
        block = MSSwinBlock(swin_block.dim, mix_size, SHIFT_DIST, drop_path, layer_scale_init,
                            mlp_ratio=swin_block.mlp_ratio, mix_impl=mix_impl)
        block.apply(MSMLP._init_weights)
        return block

    @staticmethod
    def _set_shift(block: nn.Module, shifted: bool, window_size: Tuple[int, int]) -> None:
        """Make a timm Swin block window (shift 0) or shifted-window attention."""
        if shifted == any(block.target_shift_size):
            return
        block.target_shift_size = (1, 1) if shifted else (0, 0)  # timm shifts by window // 2 when non-zero
        block.set_input_size(block.input_resolution, window_size)

    # ----- dense-task interface -------------------------------------------------------------
    def _freeze_stages(self) -> None:
        """As ``MSMLP``'s, and as mmdet's Swin: stage i-1 is frozen with the patch merging after
        it, which timm's layout keeps at the start of ``layers[i]``."""
        MSMLP._freeze_stages(self)
        if 1 <= self.frozen_stages < len(self.layers):
            merging = self.layers[self.frozen_stages].downsample
            merging.eval()
            merging.requires_grad_(False)

    def train(self, mode: bool = True) -> 'MSSwin':
        super().train(mode)
        self._freeze_stages()
        return self

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set:
        return {'gamma', 'relative_position_bias_table'}

    def load_pretrained(self, checkpoint_path: str) -> None:
        """timm's custom-load hook (``pretrained=True``): an MS-Swin or Swin file through
        ``load_swin_checkpoint``."""
        load_swin_checkpoint(self, checkpoint_path, strict=pretrained_strict())

    set_mix_impl = MSMLP.set_mix_impl

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """timm's Swin pruning, which also drops the output norms (and ``out_indices``) of the
        stages that go."""
        take_indices = super().prune_intermediate_layers(indices, prune_norm, prune_head)
        if self.out_indices is not None:
            kept = len(self.layers)
            for i in self.out_indices:
                if i >= kept:
                    del self.out_norms[str(i)]
            self.out_indices = tuple(i for i in self.out_indices if i < kept) or None
        return take_indices

    @torch.jit.export
    def forward_dense(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Outputs of the ``out_indices`` stages (NCHW), each through its own LayerNorm."""
        indices = self.out_indices
        if indices is None:
            raise RuntimeError('forward_dense needs out_indices; build the model with out_indices=(0, 1, 2, 3)')
        take = [i for i in indices]  # a list (TorchScript reads out_indices as a fixed-size tuple)
        last = max(take)
        x = self.patch_embed(x)
        outputs: List[torch.Tensor] = []
        for i, stage in enumerate(self.layers):
            if i <= last:
                x = stage(x)
                if i in take:
                    outputs.append(x)
        normed: List[torch.Tensor] = []
        for j, norm in enumerate(self.out_norms.values()):  # in out_indices order, sorted as the stages
            normed.append(norm(outputs[j]).permute(0, 3, 1, 2).contiguous())
        return normed


# ----- checkpoints -----------------------------------------------------------------------------
def _owns_module(model: nn.Module, key: str) -> bool:
    try:
        model.get_submodule(key.rsplit('.', 1)[0])
        return True
    except AttributeError:
        return False


def _ms_block_prefixes(model: MSSwin) -> Tuple[str, ...]:
    return tuple(f'{name}.' for name, module in model.named_modules() if isinstance(module, MSSwinBlock))


def _openmmlab_swin_layout(keys) -> bool:
    """OpenMMLab's own Swin (``stages.*``, ``patch_embed.projection``): converted from the
    released Swin with reordered patch-merging channels, which this loader does not undo."""
    return any(k.startswith(('stages.', 'patch_embed.projection.')) for k in keys)


def load_swin_checkpoint(model: MSSwin, path: Union[str, os.PathLike], prefix: Optional[str] = None,
                         strict: bool = True) -> Dict[str, List[str]]:
    """Load an MS-Swin or a Swin checkpoint (timm's or the Swin repository's layout, a released,
    Lightning or mmengine file) into ``model`` through the safe loader. Every part of the model
    that Swin has (stem, attention blocks, patch mergings, final norm) must be in the file with
    its shape, or this is a one-line ``CheckpointError``; the MS blocks, the classifier head and
    the output norms load where the file has them and otherwise keep their initialisation, with a
    warning listing what was left on either side. A stem of other input channels is adapted as
    timm adapts pretrained weights (``adapt_input_conv``). ``prefix`` picks the weights under it
    (:func:`msmlp.extract_state_dict`); ``strict=False`` (timm's ``pretrained_strict``) loads what
    fits of a file that lacks Swin tensors, with a warning.

    Returns:
        ``{'loaded': [...], 'not_loaded': [...], 'fresh': [...], 'adapted': [...]}``: keys taken
        from the file, keys of the file left out (e.g. the attention of blocks that are MS blocks
        here), the model's keys the file lacks (which keep their initialisation), and keys
        converted to the model's input channels.
    """
    state = extract_state_dict(read_checkpoint(path), source=str(path), prefix=prefix)
    check_family(state, model.state_dict(), str(path))
    # timm's conversion looks up the module of every relative-position table: MS blocks have none
    convertible = {k: v for k, v in state.items() if not k.endswith('relative_position_bias_table')
                   or _owns_module(model, k)}
    state = {**swin_checkpoint_filter_fn(convertible, model),
             **{k: v for k, v in state.items() if k not in convertible}}
    own = model.state_dict()
    state, adapted = adapt_stem(state, own)
    loaded = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    optional = _ms_block_prefixes(model) + ('out_norms.', 'head.')
    absent = [k for k in own if k not in loaded and not k.startswith(optional)]
    if absent and strict:
        hint = (": it is in OpenMMLab's Swin layout (stages.*); give the Swin repository's or timm's file"
                if _openmmlab_swin_layout(state) else '')
        total = sum(not k.startswith(optional) for k in own)
        raise CheckpointError(f'{path} does not fit the {type(model).__name__}: {len(absent)} of its {total} Swin '
                              f'tensors are missing or of another shape ({listed(absent, 3)}){hint}')
    report = {'loaded': sorted(loaded), 'not_loaded': sorted(set(state) - set(loaded)),
              'fresh': sorted(set(own) - set(loaded)), 'adapted': adapted}
    model.load_state_dict(loaded, strict=False)
    left = [k for k in report['fresh'] if not k.startswith(('out_norms.', 'head.'))]
    if report['not_loaded'] or left:
        warnings.warn(f'{path}: loaded {len(loaded)} tensors; not loaded from the file: '
                      f'{listed(report["not_loaded"])}; kept their initialisation: {listed(report["fresh"])}',
                      stacklevel=2)
    return report


# ----- registered entry points -------------------------------------------------------------------
def _cfg(**kwargs) -> Dict:
    return dict(
        num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=224 / 256, interpolation='bicubic',
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), first_conv='patch_embed.proj',
        classifier='head.fc', license='mit', paper_ids='arXiv:2202.06510', custom_load=True,
        notes=("msmlp's MS-MLP + Swin hybrid; no released weights: start from a Swin checkpoint "
               'with msmlp.load_swin_checkpoint',), **kwargs)


default_cfgs = generate_default_cfgs({'msswin_tiny': _cfg(), 'msswin_small': _cfg(), 'msswin_base': _cfg()})

# Swin-T/S/B: widths, depths, heads and window 7; drop path as Swin's ImageNet-1K recipe.
VARIANT_ARCHS = {
    'msswin_tiny': dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
    'msswin_small': dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7),
    'msswin_base': dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=7),
}
RECIPE_DROP_PATH = {'msswin_tiny': 0.2, 'msswin_small': 0.3, 'msswin_base': 0.5}


def _create_msswin(variant: str, pretrained: bool = False, **kwargs) -> MSSwin:
    """Build a variant through timm; ``pretrained=True`` takes
    ``pretrained_cfg_overlay=dict(file=<MS-Swin or Swin checkpoint>)`` (see load_swin_checkpoint),
    or an MS-Swin's ``state_dict=...``, ``local-dir:`` or ``hf-hub:`` weights (timm reads those)."""
    check_feature_cls(variant, kwargs, module_outputs=True)  # 'dict'/'list': Swin's own NHWC stage outputs
    return build_variant(
        MSSwin, variant, pretrained, dict(VARIANT_ARCHS[variant], **kwargs),
        feature_cfg=dict(feature_cls='getter', out_indices=(0, 1, 2, 3), flatten_sequential=True),
        no_weights="there are no released weights; pass pretrained_cfg_overlay=dict(file='<an MS-Swin or Swin "
                   "checkpoint>')")


@register_model
def msswin_tiny(pretrained: bool = False, **kwargs) -> MSSwin:
    return _create_msswin('msswin_tiny', pretrained, **kwargs)


@register_model
def msswin_small(pretrained: bool = False, **kwargs) -> MSSwin:
    return _create_msswin('msswin_small', pretrained, **kwargs)


@register_model
def msswin_base(pretrained: bool = False, **kwargs) -> MSSwin:
    return _create_msswin('msswin_base', pretrained, **kwargs)
