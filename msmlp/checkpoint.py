"""Safe loading of released MS-MLP checkpoints and of this project's own checkpoints.

The released files hold a pickled yacs ``CfgNode`` beside the weights, which
``torch.load(weights_only=True)`` refuses. We load them with that same restricted
unpickler, allow-listing one inert stand-in class under the name
``yacs.config.CfgNode``: no pickled code runs and yacs need not be installed. Any other
class or callable in the pickle is refused. ``.safetensors`` files are read with safetensors.

Released checkpoints given by URL are downloaded once into torch hub's cache (the folder timm
uses, ``$TORCH_HOME/hub/checkpoints``) by :func:`download_weights`, checked, and removed again
when the download is damaged.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import warnings
from urllib.parse import parse_qsl, urlparse
from collections import OrderedDict
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .model import checkpoint_filter_fn

__all__ = ['CheckpointError', 'ReleasedConfig', 'read_checkpoint', 'extract_state_dict', 'load_pretrained', 'load_state',
           'download_weights', 'local_checkpoint', 'shown_keys']

PathLike = Union[str, os.PathLike]

# Keys a backbone may lack in a checkpoint: new per-stage output norms of dense models.
_NEW_IN_DENSE = ('out_norms.',)
_HEAD = ('head.',)


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or does not fit the model."""


class ReleasedConfig:
    """Inert stand-in for the yacs ``CfgNode`` pickled in released checkpoints.

    The weights-only unpickler fills only plain mappings, so "constructing" a CfgNode
    yields an ``OrderedDict`` of the config's values (its attributes land in ``__dict__``).
    """

    def __new__(cls, *args: Any) -> 'OrderedDict[str, Any]':  # type: ignore[misc]
        return OrderedDict()


_SAFE_EXTRAS = [(ReleasedConfig, 'yacs.config.CfgNode')]


def read_checkpoint(path: PathLike) -> Any:
    """Read a checkpoint file without executing pickled code.

    Raises:
        CheckpointError: the file is missing, truncated, not a PyTorch checkpoint, or its
            pickle asks for a class or function outside the weights-only allow list.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint not found: {path}')
    if path.endswith('.safetensors'):
        return _read_safetensors(path)
    try:
        with torch.serialization.safe_globals(_SAFE_EXTRAS):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f'refused to load {path}: its pickle references objects outside the weights-only '
            f'allow list, so loading it could run code. Details: {str(err).splitlines()[0]}') from None
    except Exception as err:  # torch raises many types for damaged files; all mean unreadable
        raise CheckpointError(
            f'cannot read {path}: not a PyTorch checkpoint, or truncated ({type(err).__name__}: '
            f'{str(err).splitlines()[0] if str(err) else "no details"})') from None


def _read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f'cannot read {path}: not a safetensors file, or truncated ({err})') from None


def download_weights(url: str, progress: bool = True) -> str:
    """The local copy of the checkpoint at ``url``, downloaded once into torch hub's cache.

    A download is kept only when complete: all the bytes the server announced
    (Content-Length), the SHA-256 that a ``#sha256=<hex>`` fragment of the URL gives (pip's
    convention), and a file that reads as a checkpoint (a truncated one does not). Otherwise
    nothing is kept, so that the next call downloads it again.

    Raises:
        CheckpointError: the download failed or is damaged.
    """
    parsed = urlparse(url)
    name = os.path.basename(parsed.path)
    if not name:
        raise CheckpointError(f'{url} names no file to download')
    folder = os.path.join(torch.hub.get_dir(), 'checkpoints')
    path = os.path.join(folder, name)
    if os.path.isfile(path):
        return path
    os.makedirs(folder, exist_ok=True)
    partial = os.path.join(folder, f'partial-{name}')  # same suffix: read_checkpoint goes by it
    try:
        problem = _download(parsed._replace(fragment='').geturl(), partial, name, progress,
                            dict(parse_qsl(parsed.fragment)).get('sha256'))
    except Exception as err:  # urllib and http.client raise many types; all mean no file
        _remove(partial)
        raise CheckpointError(f'cannot download {url}: {err}') from None
    if problem:
        _remove(partial)
        raise CheckpointError(f'the download of {url} is damaged ({problem}); nothing was kept, '
                              'so the next call downloads it again')
    os.replace(partial, path)
    return path


def local_checkpoint(path_or_url: PathLike) -> str:
    """A checkpoint's local path: an ``http(s)://`` or ``file://`` URL is downloaded once
    (:func:`download_weights`); a path is returned as it is."""
    text = os.fspath(path_or_url)
    return download_weights(text) if text.startswith(('http://', 'https://', 'file://')) else text


def _download(url: str, target: str, name: str, progress: bool, sha256: Optional[str]) -> Optional[str]:
    """Write ``url`` to ``target``; what is wrong with the result, or None."""
    from urllib.request import urlopen
    from tqdm.auto import tqdm
    digest, received = hashlib.sha256(), 0
    with urlopen(url, timeout=60) as response, open(target, 'wb') as out:
        announced = response.headers.get('Content-Length')
        announced = int(announced) if announced else None
        with tqdm(total=announced, unit='B', unit_scale=True, unit_divisor=1024, desc=name,
                  disable=not progress) as bar:
            for block in iter(lambda: response.read(1 << 20), b''):
                out.write(block)
                digest.update(block)
                received += len(block)
                bar.update(len(block))
    if announced is not None and received != announced:
        return f'received {received} of {announced} bytes'
    if sha256 and digest.hexdigest() != sha256.lower():
        return f'SHA-256 {digest.hexdigest()}, expected {sha256.lower()}'
    try:
        read_checkpoint(target)
    except CheckpointError as err:
        return str(err).split(f'{target}: ', 1)[-1]
    return None


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def extract_state_dict(checkpoint: Any, source: str = 'checkpoint') -> Dict[str, torch.Tensor]:
    """The model weights inside a released, Lightning, mmengine or plain checkpoint,
    under ``MSMLP`` key names. Only the ``backbone.`` part of a detector or segmentor."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f'{source} holds a {type(checkpoint).__name__}, not a state dict')
    for key in ('model', 'state_dict', 'model_state'):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            checkpoint = checkpoint[key]
            break
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f'{source} holds no tensors: not a model checkpoint')
    if any('backbone.' in k for k in tensors):
        tensors = {k[k.index('backbone.') + len('backbone.'):]: v for k, v in tensors.items() if 'backbone.' in k}
    return checkpoint_filter_fn(tensors)


def load_pretrained(model: nn.Module, path: PathLike, strict_head: bool = False) -> Dict[str, list]:
    """Load a checkpoint into an ``MSMLP`` (or a module whose ``.backbone`` is one).

    A classifier head of another size (or no head in the model) is dropped with a warning
    unless ``strict_head``; output norms of a dense model that the file lacks keep their
    initialisation. Any other missing, unexpected or mis-shaped key is an error that lists
    the keys.

    Returns:
        ``{'dropped': [...], 'kept_init': [...]}``: keys not loaded, by reason.
    """
    source = os.fspath(path)
    return load_state(model, extract_state_dict(read_checkpoint(source), source=source), source, strict_head)


def load_state(model: nn.Module, state: Dict[str, torch.Tensor], source: str,
               strict_head: bool = False) -> Dict[str, list]:
    """:func:`load_pretrained` of weights already read (``extract_state_dict``'s output);
    ``source`` names them in messages."""
    target = getattr(model, 'backbone', model)
    own = target.state_dict()

    dropped = [k for k in state if k.startswith(_HEAD) and (k not in own or own[k].shape[0] != state[k].shape[0])]
    if dropped and strict_head:
        raise CheckpointError(f'{source}: classifier head does not fit the model: {dropped}')
    if dropped:
        warnings.warn(f'{source}: classifier head {dropped} not loaded: the model has a different '
                      'num_classes', stacklevel=3)
    state = {k: v for k, v in state.items() if k not in dropped}

    kept_init = [k for k in own if k not in state and (k.startswith(_NEW_IN_DENSE) or (
        k.startswith(_HEAD) and dropped))]
    missing = [k for k in own if k not in state and k not in kept_init]
    unexpected = [k for k in state if k not in own]
    mis_shaped = [f'{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}'
                  for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or mis_shaped:
        raise CheckpointError(_mismatch_message(source, missing, unexpected, mis_shaped))
    target.load_state_dict(state, strict=False)
    return {'dropped': dropped, 'kept_init': kept_init}


def shown_keys(keys: Sequence[str], limit: int = 8) -> str:
    """The first ``limit`` of ``keys`` and how many more (for one-line reports)."""
    keys = list(keys)
    if not keys:
        return 'none'
    return ', '.join(keys[:limit]) + (f' and {len(keys) - limit} more' if len(keys) > limit else '')


def _mismatch_message(path: PathLike, missing: list, unexpected: list, mis_shaped: list,
                      limit: Optional[int] = 20) -> str:
    lines = [f'{path} does not fit the model:']
    for title, keys in (('missing in the file', missing), ('unexpected in the file', unexpected),
                        ('shape mismatch', mis_shaped)):
        if keys:
            shown = keys[:limit] + ([f'... and {len(keys) - limit} more'] if len(keys) > limit else [])
            lines.append(f'  {title} ({len(keys)}): ' + ', '.join(shown))
    return '\n'.join(lines)
