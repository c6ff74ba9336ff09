"""Embedded default datasets: small, generated once, stored as real files in the real format.

``ensure_dataset(name)`` returns the folder of dataset ``name``, writing it first if it is
not there. The root is ``$MSMLP_DATA`` (default ``~/.cache/msmlp/data``). A writer module
provides ``DIRNAME`` (the folder name under the root; put a version in it so a changed
generator writes a fresh copy) and ``write(folder: Path) -> None``. To add a dataset, add
one line to ``WRITERS``.
"""
from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ['WRITERS', 'data_root', 'ensure_dataset']

WRITERS = {
    'imagenet': 'tasks.embedded.imagenet',  # ImageNet-folder classification (coloured shapes)
    'ade20k': 'tasks.embedded.ade20k',  # ADEChallengeData2016 layout segmentation (outdoor scenes)
    'coco': 'tasks.embedded.coco',  # COCO-layout instance segmentation (coloured shapes)
}


def data_root() -> Path:
    """Where embedded datasets live: ``$MSMLP_DATA`` or ``~/.cache/msmlp/data``."""
    return Path(os.environ.get('MSMLP_DATA') or Path.home() / '.cache' / 'msmlp' / 'data').expanduser()


def ensure_dataset(name: str) -> Path:
    """The folder of embedded dataset ``name``; written once, atomically (into a temporary
    folder beside it, then renamed), so an interrupted or concurrent write never leaves a
    half-written dataset behind."""
    if name not in WRITERS:
        raise KeyError(f'no embedded dataset {name!r}; known: {sorted(WRITERS)}')
    writer = importlib.import_module(WRITERS[name])
    target = data_root() / writer.DIRNAME
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f'Writing the embedded {name!r} dataset to {target} (once)')
    tmp = Path(tempfile.mkdtemp(prefix=f'.{writer.DIRNAME}.', dir=target.parent))
    try:
        writer.write(tmp)
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():  # another process did not win the race: a real failure
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
