"""MS-MLP backbone: model, safe checkpoint loading, timm registration.

``import msmlp`` registers ``msmlp_tiny``, ``msmlp_small`` and ``msmlp_base`` with timm, and the
MS-MLP + Swin hybrids ``msswin_tiny``, ``msswin_small`` and ``msswin_base``.
``import msmlp.mm`` registers the ``MSMLP`` and ``MSSwin`` backbones with MMDetection and MMSegmentation.
"""
from .checkpoint import CheckpointError, extract_state_dict, load_pretrained, read_checkpoint
from .model import (MIX_SIZES, RECIPE_DROP_PATH, SHIFT_DIST, VARIANT_ARCHS, MSMLP, MSMLPBlock,
                    checkpoint_filter_fn, msmlp_base, msmlp_small, msmlp_tiny)
from .msswin import MSSwin, load_swin_checkpoint, msswin_base, msswin_small, msswin_tiny

__version__ = '0.1.0'

__all__ = ['MSMLP', 'MSMLPBlock', 'MIX_SIZES', 'SHIFT_DIST', 'VARIANT_ARCHS', 'RECIPE_DROP_PATH',
           'CheckpointError', 'checkpoint_filter_fn', 'extract_state_dict', 'load_pretrained',
           'read_checkpoint', 'msmlp_tiny', 'msmlp_small', 'msmlp_base', 'MSSwin', 'load_swin_checkpoint',
           'msswin_tiny', 'msswin_small', 'msswin_base']
