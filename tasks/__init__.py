"""Lightning tasks on the MS-MLP backbone, one module per task.

- ``tasks.base``: ``BaseTask`` (configure_models / configure_losses / configure_metrics,
  the AdamW + warm-up/cosine optimiser of the MS-MLP recipes) and ``InputError``.
- ``tasks.classification``: ``ClassificationTask`` and ``ImageFolderDataModule``.
- ``tasks.embedded``: the embedded default datasets (``ensure_dataset(name)``).

The configs name classes by full path (``tasks.classification.ClassificationTask``); the
names below are also importable from ``tasks`` directly (imported on first use).
"""
import importlib

_EXPORTS = {
    'BaseTask': 'tasks.base',
    'InputError': 'tasks.base',
    'ClassificationTask': 'tasks.classification',
    'ImageFolderDataModule': 'tasks.classification',
    'ensure_dataset': 'tasks.embedded',
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
