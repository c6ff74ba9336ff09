"""The MS-MLP and MS-Swin backbones for MMDetection and MMSegmentation.

``import msmlp.mm`` (or ``custom_imports=dict(imports=['msmlp.mm'], allow_failed_imports=False)``
in a config) registers ``MSMLP`` and ``MSSwin`` in the ``MODELS`` registry of whichever of
mmdet and mmseg is installed::

    backbone=dict(type='MSMLP', arch='tiny', out_indices=(0, 1, 2, 3), drop_path_rate=0.4,
                  init_cfg=dict(type='Pretrained', checkpoint='msmlp_tiny_patch4_ckpt_epoch299.pth'))
    backbone=dict(type='MSSwin', arch='tiny', drop_path_rate=0.2,
                  init_cfg=dict(type='Pretrained', checkpoint='swin_tiny_patch4_window7_224.pth'))

Each is the model itself (:class:`msmlp.model.MSMLP`, :class:`msmlp.msswin.MSSwin`, no
classifier) behind mmengine's ``BaseModule``: ``forward`` returns the ``out_indices`` stage
outputs (NCHW), each through its own LayerNorm. ``init_cfg=dict(type='Pretrained',
checkpoint=...)`` reads checkpoints through the safe loader, which never unpickles code
(mmengine's own loader would): for MSMLP released MS-MLP, Lightning and mmengine checkpoints
(:func:`msmlp.load_pretrained`), for MSSwin also Swin checkpoints, whose matching keys it
loads (:func:`msmlp.load_swin_checkpoint`).
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import logging
import os
import pickle
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmengine.runner import CheckpointLoader
from mmengine.runner.checkpoint import load_from_local as _mmengine_load_from_local

from .checkpoint import CheckpointError, listed, load_pretrained, local_checkpoint
from .model import VARIANT_ARCHS, MSMLP
from .msswin import VARIANT_ARCHS as MSSWIN_ARCHS
from .msswin import MSSwin, load_swin_checkpoint

__all__ = ['MSMLPBackbone', 'MSSwinBackbone', 'ARCHS', 'MSSWIN_ARCHS', 'REGISTERED_IN']


def _by_size(variants: Dict[str, dict], prefix: str) -> Dict[str, dict]:
    """``{'tiny': ..., 't': ...}`` from ``{'<prefix>tiny': ...}``."""
    archs = {name[len(prefix):]: dict(arch) for name, arch in variants.items()}
    archs.update({name[0]: arch for name, arch in list(archs.items())})
    return archs


ARCHS: Dict[str, dict] = _by_size(VARIANT_ARCHS, 'msmlp_')
MSSWIN_ARCHS = _by_size(MSSWIN_ARCHS, 'msswin_')


def _arch_spec(name: str, arch: Optional[str], archs: Dict[str, dict], given: dict,
               free: Sequence[str] = ()) -> dict:
    """The arch's arguments with the explicitly given ones over them. A given value that differs
    from the arch's is an error unless it is one of ``free``: in a config that inherits a
    ``_base_`` with ``arch=None, embed_dim=...``, a new ``arch`` would otherwise be silently lost."""
    if arch is not None and arch not in archs:
        raise ValueError(f'{name} arch must be one of {sorted(archs)} or None, got {arch!r}')
    spec = dict(archs[arch]) if arch is not None else {}
    given = {k: v for k, v in given.items() if v is not None}
    for key, value in given.items():
        if key in spec and key not in free and _comparable(value) != _comparable(spec[key]):
            raise ValueError(f'{name} arch={arch!r} has {key}={spec[key]!r}, but {key}={value!r} is given too '
                             f"(a _base_ config may set it): set {key}=None to take the arch's, "
                             'or arch=None to give every size')
    spec.update(given)
    needed = list(next(iter(archs.values())))
    if not set(needed) <= set(spec):
        raise ValueError(f'{name} with arch=None needs {", ".join(needed[:-1])} and {needed[-1]}')
    return spec


def _comparable(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


InitCfg = Union[dict, List[dict], None]


def _init_cfg(name: str, init_cfg: InitCfg, pretrained: Optional[str]) -> InitCfg:
    """``init_cfg``, or the deprecated ``pretrained=path`` as a ``Pretrained`` init_cfg, as mmdet's
    Swin reads it (mmseg's segmentors pass their ``model.pretrained`` to the backbone so)."""
    if pretrained is None:
        return copy.deepcopy(init_cfg)
    if init_cfg is not None:
        raise ValueError(f'{name}: give the checkpoint as init_cfg or as pretrained, not both')
    if not isinstance(pretrained, (str, os.PathLike)):
        raise TypeError(f'{name}: pretrained must be a path or URL, got {pretrained!r}')
    warnings.warn(f"{name}: pretrained is deprecated in OpenMMLab; read as init_cfg=dict(type='Pretrained', "
                  f"checkpoint={os.fspath(pretrained)!r})", stacklevel=3)
    return dict(type='Pretrained', checkpoint=os.fspath(pretrained))


class _Backbone(BaseModule):
    """What the OpenMMLab backbones share: the dense forward, ``out_channels``, and
    ``init_cfg`` loading through the safe loader (``_load``)."""

    _load = staticmethod(load_pretrained)

    @property
    def out_channels(self) -> List[int]:
        return [self.dims[i] for i in self.out_indices]

    def forward(self, x: torch.Tensor) -> tuple:
        return tuple(self.forward_dense(x))

    def _exclude_unused(self) -> None:
        """What the dense outputs never run (the classifier's final norm; stages after the last
        of ``out_indices``) stays, so that classification checkpoints load strictly, but takes no
        gradient: DDP (mmengine's and Lightning's, which expect every trainable parameter to get
        one) would otherwise stop at the second iteration."""
        for module in self._unused_by_dense():
            module.requires_grad_(False)

    def _unused_by_dense(self) -> List[torch.nn.Module]:
        raise NotImplementedError

    def init_weights(self) -> None:
        """Load ``init_cfg``'s pretrained checkpoint with the safe loader; other init types
        go to mmengine (the constructor already applied the model's own initialisation)."""
        cfgs = self.init_cfg if isinstance(self.init_cfg, list) else [self.init_cfg] if self.init_cfg else []
        pretrained = [c for c in cfgs if c.get('type') == 'Pretrained']
        others = [c for c in cfgs if c.get('type') != 'Pretrained']
        if others:
            from mmengine.model import initialize
            initialize(self, others)
        for cfg in pretrained:
            path = _local_checkpoint(cfg['checkpoint'])
            report = self._load(self, path, prefix=cfg.get('prefix'))
            under = f" (the weights under {cfg['prefix']!r})" if cfg.get('prefix') else ''
            print_log(f'{type(self).__name__}: loaded {path}{under}' + ''.join(
                f' ({what}: {listed(report[key])})' for key, what in (
                    ('dropped', 'not loaded'), ('not_loaded', 'not loaded'), ('kept_init', 'kept initialisation'),
                    ('fresh', 'kept initialisation'), ('adapted', 'adapted to the input channels'))
                if report.get(key)), logger='current', level=logging.INFO)
        self._is_init = True


class MSMLPBackbone(MSMLP, _Backbone):
    """MS-MLP as a dense-prediction backbone (registered as ``MSMLP``).

    Args:
        arch: ``'tiny'``, ``'small'`` or ``'base'`` (or ``'t'``, ``'s'``, ``'b'``); ``None``
            to give ``embed_dim`` and ``depths`` explicitly (with an arch, they must be the arch's).
        embed_dim: Channels of stage 0 (stage i has ``embed_dim * 2**i``).
        depths: Blocks per stage.
        in_channels: Input image channels.
        out_indices: Stages returned by ``forward``.
        drop_path_rate: Stochastic depth, rising linearly over all blocks.
        frozen_stages: -1 freezes nothing, 0 the stem, i the stem and stages 0..i-1.
        with_cp: Gradient checkpointing of every block.
        init_cfg: ``dict(type='Pretrained', checkpoint=path_or_url)`` to load weights
            (``prefix='teacher.backbone.'`` picks one model's of a file holding several).
        pretrained: Deprecated (as in mmdet's Swin): a checkpoint read as a ``Pretrained`` init_cfg.
        **kwargs: Other :class:`msmlp.model.MSMLP` arguments (``mix_sizes``, ``mix_impl``, ...).
    """

    def __init__(
            self,
            arch: Optional[str] = 'tiny',
            embed_dim: Optional[int] = None,
            depths: Optional[Sequence[int]] = None,
            in_channels: int = 3,
            out_indices: Sequence[int] = (0, 1, 2, 3),
            drop_path_rate: float = 0.,
            frozen_stages: int = -1,
            with_cp: bool = False,
            init_cfg: Union[dict, List[dict], None] = None,
            pretrained: Optional[str] = None,
            **kwargs,
    ):
        spec = _arch_spec('MSMLP', arch, ARCHS, dict(embed_dim=embed_dim, depths=depths))
        # MSMLP.__init__ reaches BaseModule.__init__ through the MRO (with init_cfg=None).
        super().__init__(
            in_chans=in_channels, num_classes=0, out_indices=out_indices, drop_path_rate=drop_path_rate,
            frozen_stages=frozen_stages, with_cp=with_cp, **spec, **kwargs)
        self.init_cfg = _init_cfg(type(self).__name__, init_cfg, pretrained)
        self._exclude_unused()

    def _unused_by_dense(self) -> List[torch.nn.Module]:
        last = self.layers[max(self.out_indices)]
        return [self.norm, *self.layers[max(self.out_indices) + 1:], *([last.downsample] if last.downsample else [])]

    forward = _Backbone.forward  # not MSMLP's classifier forward


class MSSwinBackbone(MSSwin, _Backbone):
    """MS-Swin as a dense-prediction backbone (registered as ``MSSwin``).

    Args:
        arch: ``'tiny'``, ``'small'`` or ``'base'`` (or ``'t'``, ``'s'``, ``'b'``): Swin-T/S/B's
            widths, depths and heads; ``None`` to give ``embed_dim``, ``depths``, ``num_heads``
            and ``window_size``. With an arch, ``embed_dim``, ``depths`` and ``num_heads`` must be
            the arch's; ``window_size`` overrides it.
        block_pattern: Block types along each stage (``('ws', 'ms')``; ``('ws', 'sw')`` is Swin).
        in_channels: Input image channels.
        out_indices: Stages returned by ``forward``.
        drop_path_rate: Stochastic depth, rising linearly over all blocks (as Swin's).
        frozen_stages: -1 freezes nothing, 0 the stem, i the stem and stages 0..i-1.
        with_cp: Gradient checkpointing of every block.
        init_cfg: ``dict(type='Pretrained', checkpoint=path_or_url)``: an MS-Swin or a Swin
            checkpoint (its matching keys); ``prefix`` as for ``MSMLP``.
        pretrained: Deprecated (as in mmdet's Swin): a checkpoint read as a ``Pretrained`` init_cfg.
        **kwargs: Other :class:`msmlp.msswin.MSSwin` arguments (``mix_sizes``, ``mix_impl``, ...).
    """

    _load = staticmethod(load_swin_checkpoint)

    def __init__(
            self,
            arch: Optional[str] = 'tiny',
            embed_dim: Optional[int] = None,
            depths: Optional[Sequence[int]] = None,
            num_heads: Optional[Sequence[int]] = None,
            window_size: Optional[int] = None,
            in_channels: int = 3,
            out_indices: Sequence[int] = (0, 1, 2, 3),
            drop_path_rate: float = 0.2,
            frozen_stages: int = -1,
            with_cp: bool = False,
            init_cfg: Union[dict, List[dict], None] = None,
            pretrained: Optional[str] = None,
            **kwargs,
    ):
        spec = _arch_spec('MSSwin', arch, MSSWIN_ARCHS, dict(embed_dim=embed_dim, depths=depths, num_heads=num_heads,
                                                              window_size=window_size), free=('window_size',))
        super().__init__(in_chans=in_channels, num_classes=0, out_indices=out_indices, drop_path_rate=drop_path_rate,
                         frozen_stages=frozen_stages, with_cp=with_cp, **spec, **kwargs)
        self.init_cfg = _init_cfg(type(self).__name__, init_cfg, pretrained)
        self._exclude_unused()

    def _unused_by_dense(self) -> List[torch.nn.Module]:
        return [self.norm, *self.layers[max(self.out_indices) + 1:]]  # a stage opens with its patch merging

    forward = _Backbone.forward  # not Swin's classifier forward

    def init_weights(self, mode: str = '', needs_reset: Optional[bool] = None) -> None:
        """timm's constructor initialises the weights through this name (``needs_reset=False``);
        mmengine calls it without arguments, to load ``init_cfg``."""
        if mode or needs_reset is not None:
            return MSSwin.init_weights(self, mode, needs_reset)
        _Backbone.init_weights(self)


def _local_checkpoint(checkpoint: str) -> str:
    """A local path for ``checkpoint``: URLs are downloaded once into torch hub's cache."""
    if not isinstance(checkpoint, (str, os.PathLike)) or not str(checkpoint):
        raise CheckpointError(f"init_cfg Pretrained needs checkpoint=<path or URL>, got {checkpoint!r}")
    path = local_checkpoint(os.path.expanduser(str(checkpoint)))  # a URL is downloaded once
    if not os.path.isfile(path):
        raise CheckpointError(
            f'init_cfg checkpoint not found: {path}. Download the released checkpoint there '
            '(msmlp_{tiny,small,base}_patch4_ckpt_epoch299.pth for MSMLP, a Swin checkpoint for MSSwin), '
            'point model.backbone.init_cfg.checkpoint at it, or set model.backbone.init_cfg=None '
            'to train from scratch.')
    return path


def _register() -> List[str]:
    """Register in every installed OpenMMLab registry this backbone serves."""
    registered = []
    for scope in ('mmdet', 'mmseg'):
        if importlib.util.find_spec(scope) is None:
            continue
        registry = importlib.import_module(f'{scope}.registry').MODELS
        registry.register_module(name='MSMLP', module=MSMLPBackbone, force=True)
        registry.register_module(name='MSSwin', module=MSSwinBackbone, force=True)
        registered.append(scope)
    if not registered:
        raise ImportError('msmlp.mm registers the MSMLP and MSSwin backbones with MMDetection or MMSegmentation; '
                          'neither is installed (pip install "msmlp[openmmlab]" or run scripts/setup.sh)')
    return registered


# ----- mmengine's own checkpoints under torch's weights-only default -----------------------------
def _history_buffer_method(owner, name: str):
    """The one ``getattr`` a message hub pickles: a HistoryBuffer statistics method by name."""
    from mmengine.logging.history_buffer import HistoryBuffer
    if owner is HistoryBuffer and not name.startswith('_') and callable(vars(HistoryBuffer).get(name)):
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(f'getattr({owner!r}, {name!r}) is not an mmengine HistoryBuffer statistic')


def runner_checkpoint_globals() -> list:
    """What an mmengine runner's checkpoint pickles beside tensors (its message hub: HistoryBuffers
    of numpy arrays and scalars), for ``torch.serialization.safe_globals``: data classes, and
    ``getattr`` only as the HistoryBuffer method lookup it is there."""
    import numpy
    import numpy.dtypes
    from mmengine.logging.history_buffer import HistoryBuffer
    core = getattr(numpy, '_core', None) or numpy.core  # numpy 2 and numpy 1
    reconstruct, scalar = core.multiarray._reconstruct, core.multiarray.scalar
    dtypes = [getattr(numpy.dtypes, name) for name in numpy.dtypes.__all__]
    return [HistoryBuffer, numpy.ndarray, numpy.dtype, *dtypes, (_history_buffer_method, 'builtins.getattr'),
            *[(reconstruct, f'numpy.{m}.multiarray._reconstruct') for m in ('core', '_core')],
            *[(scalar, f'numpy.{m}.multiarray.scalar') for m in ('core', '_core')]]


def load_from_local(filename: str, map_location: Optional[Union[str, torch.device, Callable]] = None) -> Any:
    """mmengine's local-file loader, with its runner's own objects allowed: torch (from 2.6) loads
    weights only by default, and mmengine 0.10 calls ``torch.load`` without allowing them, so
    tools/test.py, ``--resume`` and the inference APIs refused every checkpoint tools/train.py wrote."""
    with torch.serialization.safe_globals(runner_checkpoint_globals()):
        return _mmengine_load_from_local(filename, map_location)


def class_palette(classes: Sequence[str]) -> 'numpy.ndarray':
    """RGB colour per class (uint8): ADE20K's for its class names, fixed random colours for
    others; msmlp's segmentation overlays and its exports for mmseg's visualizer use it."""
    import numpy
    from mmseg.datasets import ADE20KDataset
    ade = dict(zip(ADE20KDataset.METAINFO['classes'], ADE20KDataset.METAINFO['palette']))
    rng = numpy.random.default_rng(42)
    return numpy.array([ade.get(name, rng.integers(0, 256, 3).tolist()) for name in classes], dtype=numpy.uint8)


REGISTERED_IN = _register()
CheckpointLoader.register_scheme(prefixes='', loader=load_from_local, force=True)  # named so its log says 'local'
