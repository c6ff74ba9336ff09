"""The MS-MLP backbone for MMDetection and MMSegmentation.

``import msmlp.mm`` (or ``custom_imports=dict(imports=['msmlp.mm'], allow_failed_imports=False)``
in a config) registers ``MSMLP`` in the ``MODELS`` registry of whichever of mmdet and mmseg
is installed::

    backbone=dict(type='MSMLP', arch='tiny', out_indices=(0, 1, 2, 3), drop_path_rate=0.4,
                  init_cfg=dict(type='Pretrained', checkpoint='msmlp_tiny_patch4_ckpt_epoch299.pth'))

It is :class:`msmlp.model.MSMLP` itself (no classifier) behind mmengine's ``BaseModule``:
``forward`` returns the ``out_indices`` stage outputs, each through its own LayerNorm.
``init_cfg=dict(type='Pretrained', checkpoint=...)`` reads released MS-MLP checkpoints,
this project's Lightning checkpoints and mmengine checkpoints through
:func:`msmlp.load_pretrained`, which never unpickles code (mmengine's own loader would).
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import logging
import os
from typing import Dict, List, Optional, Sequence, Union

import torch
from mmengine.logging import print_log
from mmengine.model import BaseModule

from .checkpoint import CheckpointError, load_pretrained
from .model import VARIANT_ARCHS, MSMLP

__all__ = ['MSMLPBackbone', 'ARCHS', 'REGISTERED_IN']

ARCHS: Dict[str, dict] = {name[len('msmlp_'):]: dict(arch) for name, arch in VARIANT_ARCHS.items()}
ARCHS.update({name[0]: arch for name, arch in list(ARCHS.items())})  # 't', 's', 'b'


class MSMLPBackbone(MSMLP, BaseModule):
    """MS-MLP as a dense-prediction backbone (registered as ``MSMLP``).

    Args:
        arch: ``'tiny'``, ``'small'`` or ``'base'`` (or ``'t'``, ``'s'``, ``'b'``); ``None``
            to give ``embed_dim`` and ``depths`` explicitly. Explicit values override the arch.
        embed_dim: Channels of stage 0 (stage i has ``embed_dim * 2**i``).
        depths: Blocks per stage.
        in_channels: Input image channels.
        out_indices: Stages returned by ``forward``.
        drop_path_rate: Stochastic depth, rising linearly over all blocks.
        frozen_stages: -1 freezes nothing, 0 the stem, i the stem and stages 0..i-1.
        with_cp: Gradient checkpointing of every block.
        init_cfg: ``dict(type='Pretrained', checkpoint=path_or_url)`` to load weights.
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
            **kwargs,
    ):
        if arch is not None and arch not in ARCHS:
            raise ValueError(f'MSMLP arch must be one of {sorted(ARCHS)} or None, got {arch!r}')
        spec = dict(ARCHS[arch]) if arch is not None else {}
        spec.update({k: v for k, v in dict(embed_dim=embed_dim, depths=depths).items() if v is not None})
        if set(spec) != {'embed_dim', 'depths'}:
            raise ValueError('MSMLP with arch=None needs both embed_dim and depths')
        # MSMLP.__init__ reaches BaseModule.__init__ through the MRO (with init_cfg=None).
        super().__init__(
            in_chans=in_channels, num_classes=0, out_indices=out_indices, drop_path_rate=drop_path_rate,
            frozen_stages=frozen_stages, with_cp=with_cp, **spec, **kwargs)
        self.init_cfg = copy.deepcopy(init_cfg)
        # The classifier's final norm is unused by dense outputs; it stays (so classification
        # checkpoints load strictly) but takes no gradient, which DDP would otherwise wait for.
        self.norm.requires_grad_(False)

    @property
    def out_channels(self) -> List[int]:
        return [self.dims[i] for i in self.out_indices]

    def forward(self, x: torch.Tensor) -> tuple:
        return self.forward_dense(x)

    def init_weights(self) -> None:
        """Load ``init_cfg``'s pretrained checkpoint with the safe loader; other init types
        go to mmengine (the constructor already applied the released initialisation)."""
        cfgs = self.init_cfg if isinstance(self.init_cfg, list) else [self.init_cfg] if self.init_cfg else []
        pretrained = [c for c in cfgs if c.get('type') == 'Pretrained']
        others = [c for c in cfgs if c.get('type') != 'Pretrained']
        if others:
            from mmengine.model import initialize
            initialize(self, others)
        for cfg in pretrained:
            path = _local_checkpoint(cfg['checkpoint'])
            report = load_pretrained(self, path)
            print_log(f'MSMLP: loaded {path}' + (f' (not loaded: {report["dropped"]})' if report['dropped'] else '')
                      + (f' (kept initialisation: {report["kept_init"]})' if report['kept_init'] else ''),
                      logger='current', level=logging.INFO)
        self._is_init = True


def _local_checkpoint(checkpoint: str) -> str:
    """A local path for ``checkpoint``: URLs are downloaded once into torch hub's cache."""
    if not isinstance(checkpoint, (str, os.PathLike)) or not str(checkpoint):
        raise CheckpointError(f"init_cfg Pretrained needs checkpoint=<path or URL>, got {checkpoint!r}")
    checkpoint = str(checkpoint)
    if checkpoint.startswith(('http://', 'https://')):
        target = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(checkpoint.split('?')[0]))
        if not os.path.isfile(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            torch.hub.download_url_to_file(checkpoint, target, progress=True)
        return target
    path = os.path.expanduser(checkpoint)
    if not os.path.isfile(path):
        raise CheckpointError(
            f'MSMLP init_cfg checkpoint not found: {path}. Download the released '
            'msmlp_{tiny,small,base}_patch4_ckpt_epoch299.pth there, point '
            'model.backbone.init_cfg.checkpoint at it, or set model.backbone.init_cfg=None '
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
        registered.append(scope)
    if not registered:
        raise ImportError('msmlp.mm registers the MSMLP backbone with MMDetection or MMSegmentation; '
                          'neither is installed (pip install "msmlp[openmmlab]" or run scripts/setup.sh)')
    return registered


REGISTERED_IN = _register()
