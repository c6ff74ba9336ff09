"""Safe loading of released MS-MLP checkpoints and of this project's own checkpoints.

The released files hold a pickled yacs ``CfgNode`` beside the weights, which
``torch.load(weights_only=True)`` refuses. We load them with that same restricted
unpickler, allow-listing one inert stand-in class under the name
``yacs.config.CfgNode``: no pickled code runs and yacs need not be installed. mmengine's
training checkpoints (``epoch_N.pth``) pickle its message hub beside the weights; what that
asks for is read as inert stand-ins too. Any other class or callable in the pickle is refused.
``.safetensors`` files are read with safetensors.

Released checkpoints given by URL are downloaded once into torch hub's cache (the folder timm
uses, ``$TORCH_HOME/hub/checkpoints``) by :func:`download_weights`, checked, and removed again
when the download is damaged.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import pickle
import re
import warnings
from urllib.parse import parse_qsl, urlparse
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .model import MIX_SIZES, checkpoint_filter_fn

__all__ = ['CheckpointError', 'ReleasedConfig', 'read_checkpoint', 'extract_state_dict', 'load_pretrained', 'load_state',
           'download_weights', 'local_checkpoint', 'listed', 'infer_arch', 'run_model_args']

PathLike = Union[str, os.PathLike]

# Per-stage output norms of dense models: a dense model keeps its own when the file lacks them,
# a file's are left out when the model has none at that stage.
_NEW_IN_DENSE = ('out_norms.',)
_HEAD = ('head.',)
_STEM = 'patch_embed.proj.weight'
# What torch's weights-only unpickler says of a file that is no pickle (or a cut one).
_NOT_A_PICKLE = ('Unsupported operand', 'invalid load key', 'String is too long', 'persistent id')


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


class _Discarded:
    """Inert stand-in for what mmengine's runner pickles beside the weights of a training
    checkpoint (its message hub's ``HistoryBuffer`` objects and their numpy arrays): whatever
    the pickle calls or builds under those names becomes one of these, and nothing runs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


# Globals of an mmengine training checkpoint's message hub (``builtins.getattr`` reaches numpy
# scalar types there); allowed only as _Discarded, and only when strict reading stopped at one.
_MMENGINE_RUNTIME = ('mmengine.logging.history_buffer.HistoryBuffer', 'numpy.ndarray', 'numpy.dtype',
                     'numpy._core.multiarray._reconstruct', 'numpy._core.multiarray.scalar',
                     'numpy.core.multiarray._reconstruct', 'numpy.core.multiarray.scalar', 'builtins.getattr')


def read_checkpoint(path: PathLike) -> Any:
    """Read a checkpoint file without executing pickled code.

    Raises:
        CheckpointError: the file is missing, truncated, not a PyTorch checkpoint, or its
            pickle asks for a class or function outside the weights-only allow list.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f'checkpoint {path} is a folder: name the checkpoint file in it')
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint not found: {path}')
    if path.endswith('.safetensors'):
        return _read_safetensors(path)
    try:
        try:
            return _load_weights_only(path, _SAFE_EXTRAS)
        except pickle.UnpicklingError as err:
            if _asked_global(str(err)) not in _MMENGINE_RUNTIME:
                raise
            return _load_weights_only(path, _SAFE_EXTRAS + [(_Discarded, name) for name in _MMENGINE_RUNTIME])
    except pickle.UnpicklingError as err:
        raise _refusal(path, str(err)) from None
    except Exception as err:  # torch raises many types for damaged files; all mean unreadable
        if 'TorchScript archive' in str(err):  # torch's advice (weights_only=False) would run its code
            raise CheckpointError(f'{path} is a TorchScript model (msmlp export writes them), not a checkpoint of '
                                  'weights: torch.jit.load runs it') from None
        cache = os.path.abspath(os.path.join(torch.hub.get_dir(), 'checkpoints'))
        cached = os.path.dirname(os.path.abspath(path)) == cache
        raise CheckpointError(
            f'cannot read {path}: not a PyTorch checkpoint, or truncated ({type(err).__name__}: '
            f'{str(err).splitlines()[0] if str(err) else "no details"})'
            + ('; it is a download in the weights cache: remove it to download it again' if cached else '')) from None


def _load_weights_only(path: str, extras: list) -> Any:
    with torch.serialization.safe_globals(extras), warnings.catch_warnings():
        # a pickle that is not torch's format: refused by the caller, whatever its protocol
        warnings.filterwarnings('ignore', message='Detected pickle protocol')
        return torch.load(path, map_location='cpu', weights_only=True)


def _asked_global(message: str) -> Optional[str]:
    """The class or function a weights-only refusal names, if any."""
    asked = (re.search(r'GLOBAL (\S+)', message)
             or re.search(r'allowlisted via `add_safe_globals`,? but got (.+)', message))
    return asked.group(1).rstrip('.,') if asked else None


def _refusal(path: str, message: str) -> CheckpointError:
    """The error for a pickle the weights-only unpickler stopped, naming what it asked for."""
    # torch wraps the reason in advice to load with weights_only=False, which we never give
    asked = _asked_global(message)
    if asked:
        return CheckpointError(f'refused to load {path}: its pickle asks for {asked}, '
                               'outside the weights-only allow list, so loading it could run code')
    if any(sign in message for sign in _NOT_A_PICKLE):
        return CheckpointError(f'cannot read {path}: not a PyTorch checkpoint, or truncated')
    reason = next((line.strip() for line in message.splitlines() if line.strip() and 'weights_only' not in line
                   and 'torch.load' not in line), 'no details')
    return CheckpointError(f'refused to load {path}: the weights-only unpickler stopped ({reason})')


def _read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f'cannot read {path}: not a safetensors file, or truncated ({err})') from None


def download_weights(url: str, progress: bool = True, cache_dir: Optional[PathLike] = None) -> str:
    """The local copy of the checkpoint at ``url``, downloaded once into torch hub's cache (or
    into ``cache_dir``, as timm's ``create_model(cache_dir=...)``).

    The copy is named after the URL's file and the URL itself (without its fragment), so two
    URLs ending in the same file name are two copies. A download is kept only when complete:
    all the bytes the server announced (Content-Length), the SHA-256 that a ``#sha256=<hex>``
    fragment of the URL gives (pip's convention), and a file that reads as a checkpoint (a
    truncated one does not). Otherwise nothing is kept, so that the next call downloads it
    again. A copy already in the cache is checked against the fragment's SHA-256 too.

    Raises:
        CheckpointError: the download failed or is damaged, or the cached copy has another SHA-256.
    """
    parsed = urlparse(url)
    name = os.path.basename(parsed.path)
    if not name:
        raise CheckpointError(f'{url} names no file to download')
    source = parsed._replace(fragment='').geturl()
    sha256 = dict(parse_qsl(parsed.fragment)).get('sha256')
    if sha256 is not None and not re.fullmatch(r'[0-9a-fA-F]{64}', sha256):
        raise CheckpointError(f'{url}: #sha256= takes the 64 hex digits of the file\'s SHA-256, got {sha256!r}')
    folder = os.fspath(cache_dir) if cache_dir is not None else os.path.join(torch.hub.get_dir(), 'checkpoints')
    path = os.path.join(folder, _cached_name(source, name))
    if os.path.isfile(path):
        _check_cached(path, url, sha256)
        return path
    os.makedirs(folder, exist_ok=True)
    # one partial file per process (several processes of a run may download at once, as
    # torch.hub's temporary files); the same suffix: read_checkpoint goes by it
    partial = os.path.join(folder, f'partial-{os.getpid()}-{os.path.basename(path)}')
    try:
        problem = _download(source, partial, name, progress, sha256)
    except Exception as err:  # urllib and http.client raise many types; all mean no file
        _remove(partial)
        raise CheckpointError(f'cannot download {url}: {err}') from None
    if problem:
        _remove(partial)
        raise CheckpointError(f'the download of {url} is damaged ({problem}); nothing was kept, '
                              'so the next call downloads it again')
    os.replace(partial, path)
    return path


def _cached_name(url: str, name: str) -> str:
    """``<stem>-<12 hex digits of the URL's SHA-256><suffix>``: one cached copy per URL."""
    stem, suffix = os.path.splitext(name)
    return f'{stem}-{hashlib.sha256(url.encode()).hexdigest()[:12]}{suffix}'


def _check_cached(path: str, url: str, sha256: Optional[str]) -> None:
    if not sha256:
        return
    digest = hashlib.sha256()
    with open(path, 'rb') as cached:
        for block in iter(lambda: cached.read(1 << 20), b''):
            digest.update(block)
    if digest.hexdigest() != sha256.lower():
        raise CheckpointError(f'the cached {path} has SHA-256 {digest.hexdigest()}, but {url} expects '
                              f'{sha256.lower()}; remove the file to download it again')


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


def extract_state_dict(checkpoint: Any, source: str = 'checkpoint',
                       prefix: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The model weights inside a released, Lightning, mmengine or plain checkpoint,
    under ``MSMLP`` key names. Only the ``backbone.`` part of a detector or segmentor.

    ``prefix`` (as in mmengine's ``Pretrained`` init) takes only the weights under it, e.g.
    ``'teacher.'`` or ``'teacher.backbone.'``; a file holding several backbones (a teacher and a
    student) needs one, or the weights would be a mix of them."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f'{source} holds a {type(checkpoint).__name__}, not a state dict')
    for key in ('model', 'state_dict', 'model_state'):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            checkpoint = checkpoint[key]
            break
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f'{source} holds no tensors: not a model checkpoint')
    if prefix:
        tensors = _under_prefix(tensors, prefix, source)
    owners = sorted({k[:k.index('backbone.')] for k in tensors if 'backbone.' in k})
    if len(owners) > 1:
        raise CheckpointError(
            f"{source} holds {len(owners)} backbones ({listed(o + 'backbone.' for o in owners)}): name the one to "
            f"load as the prefix (init_cfg=dict(type='Pretrained', checkpoint=..., prefix='{owners[0]}backbone.'))")
    if owners:
        tensors = {k[k.index('backbone.') + len('backbone.'):]: v for k, v in tensors.items() if 'backbone.' in k}
    return checkpoint_filter_fn(tensors)


def _under_prefix(tensors: Dict[str, torch.Tensor], prefix: str, source: str) -> Dict[str, torch.Tensor]:
    """The tensors whose keys start with ``prefix`` (a trailing dot added), the prefix removed."""
    dotted = prefix if prefix.endswith('.') else prefix + '.'
    chosen = {k[len(dotted):]: v for k, v in tensors.items() if k.startswith(dotted)}
    if not chosen:
        tops = sorted({k.split('.')[0] + '.' for k in tensors})
        raise CheckpointError(f'{source} has no weights under the prefix {prefix!r}: '
                              f'its keys start with {listed(tops)}')
    return chosen


def load_pretrained(model: nn.Module, path: PathLike, strict_head: bool = False,
                    prefix: Optional[str] = None, strict: bool = True) -> Dict[str, list]:
    """Load a checkpoint into an ``MSMLP`` (or a module whose ``.backbone`` is one).

    A classifier head of another size (or no head in the model) is dropped with a warning
    unless ``strict_head``, and so are output norms at stages the model returns no dense output
    of; a head (with a warning) and output norms that the file lacks keep their initialisation.
    A stem of other input channels is adapted as timm adapts pretrained weights
    (``adapt_input_conv``). Any other missing, unexpected or mis-shaped key is a one-line error
    that counts them and names the first few; with ``strict=False`` (timm's ``pretrained_strict``)
    missing and unexpected keys are a warning instead, and the rest loads. ``prefix`` picks the
    weights under it (:func:`extract_state_dict`).

    Returns:
        ``{'dropped': [...], 'kept_init': [...], 'adapted': [...]}``: keys not loaded, keys left
        at their initialisation, keys converted to the model's input channels.
    """
    source = os.fspath(path)
    state = extract_state_dict(read_checkpoint(source), source=source, prefix=prefix)
    return load_state(model, state, source, strict_head, strict)


def load_state(model: nn.Module, state: Dict[str, torch.Tensor], source: str,
               strict_head: bool = False, strict: bool = True) -> Dict[str, list]:
    """:func:`load_pretrained` of weights already read (``extract_state_dict``'s output);
    ``source`` names them in messages."""
    target = getattr(model, 'backbone', model)
    own = target.state_dict()
    check_family(state, own, source)

    head = [k for k in state if k.startswith(_HEAD) and (k not in own or own[k].shape[0] != state[k].shape[0])]
    if head and strict_head:
        raise CheckpointError(f'{source}: classifier head does not fit the model: {head}')
    norms = [k for k in state if k.startswith(_NEW_IN_DENSE) and k not in own]
    file_has_head = any(k.startswith(_HEAD) for k in state)
    dropped = head + norms
    state, adapted = adapt_stem({k: v for k, v in state.items() if k not in dropped}, own)

    kept_init = [k for k in own if k not in state and k.startswith(_NEW_IN_DENSE + _HEAD)]
    missing = [k for k in own if k not in state and k not in kept_init]
    unexpected = [k for k in state if k not in own]
    mis_shaped = [f'{k}: {list(state[k].shape)} in the file, {list(own[k].shape)} in the model'
                  for k in state if k in own and own[k].shape != state[k].shape]
    if mis_shaped or (strict and (missing or unexpected)):
        raise CheckpointError(mismatch_message(source, missing, unexpected, mis_shaped))
    if missing or unexpected:
        warnings.warn(f'{source}: loaded without {len(missing)} of the model\'s tensors ({listed(missing, 4)}) '
                      f'and {len(unexpected)} of the file\'s ({listed(unexpected, 4)}): strict=False', stacklevel=3)
    # warned only once the weights are known to fit: a wrong file gets the error alone
    if head:
        warnings.warn(f'{source}: classifier head {head} not loaded: the model has a different '
                      'num_classes', stacklevel=3)
    if any(k.startswith(_HEAD) for k in own) and not file_has_head:
        warnings.warn(f'{source} holds no classifier head: the model\'s keeps its initialisation', stacklevel=3)
    if norms:
        warnings.warn(f'{source}: output norms {listed(norms, 4)} not loaded: the model has '
                      'no dense output at their stages', stacklevel=3)
    target.load_state_dict(state, strict=False)
    return {'dropped': dropped + unexpected, 'kept_init': kept_init + missing, 'adapted': adapted}


def check_family(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], source: str) -> None:
    """One line when MS-Swin (or Swin) weights meet an MS-MLP, or MS-MLP weights an MS-Swin."""
    in_file, in_model = swin_key(state), swin_key(own)
    if in_file is not None and in_model is None:
        raise CheckpointError(f'{source} holds MS-Swin or Swin weights ({in_file}), not an MS-MLP\'s: '
                              'load it into an msswin_* model')
    if in_file is None and in_model is not None and any('.dwconv_lr.' in k for k in state):
        raise CheckpointError(f'{source} holds MS-MLP weights, not an MS-Swin\'s: load it into an msmlp_* model')


def adapt_stem(state: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor]
                ) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """``state`` with its stem conv converted to the model's input channels when only those
    differ (timm's ``adapt_input_conv``: summed for one channel, repeated and scaled for more)."""
    weight, wanted = state.get(_STEM), own.get(_STEM)
    if weight is None or wanted is None or weight.shape == wanted.shape or (
            weight.shape[:1] + weight.shape[2:] != wanted.shape[:1] + wanted.shape[2:]):
        return state, []
    from timm.models import adapt_input_conv
    return {**state, _STEM: adapt_input_conv(wanted.shape[1], weight, base_chans=weight.shape[1])}, [_STEM]


def infer_arch(state: Mapping[str, torch.Tensor], source: str = 'checkpoint') -> Dict[str, Any]:
    """The ``MSMLP`` arguments that weights under ``MSMLP`` key names (``extract_state_dict``'s
    output) were made with: ``in_chans``, ``embed_dim`` and ``depths``, and ``mix_sizes`` read
    from the depthwise kernels. ``shift_dist`` is not in the weights (the released one is assumed).

    Raises:
        CheckpointError: the weights are not an MS-MLP's (an MS-Swin or Swin checkpoint, say).
    """
    swin = swin_key(state)
    if swin is not None:
        raise CheckpointError(f'{source} holds MS-Swin or Swin weights ({swin}), not an MS-MLP\'s')
    stem = state.get(_STEM)
    stages = {int(m.group(1)) for m in map(re.compile(r'layers\.(\d+)\.').match, state) if m}
    if stem is None or not stages:
        raise CheckpointError(f'{source} holds no MS-MLP weights (no {_STEM if stem is None else "layers.*"})')
    blocks = [tuple(map(int, m.groups())) for m in map(re.compile(r'layers\.(\d+)\.blocks\.(\d+)\.').match, state) if m]
    depths = tuple(1 + max((j for i, j in blocks if i == stage), default=-1) for stage in range(max(stages) + 1))
    return dict(in_chans=stem.shape[1], embed_dim=stem.shape[0], depths=depths,
                mix_sizes=tuple(_stage_mix_sizes(state, stage) for stage in range(len(depths))))


def run_model_args(hparams: Mapping[str, Any]) -> Dict[str, Any]:
    """The ``timm.create_model`` arguments beyond the model name that the hyperparameters of a
    ``msmlp fit --task cls`` run hold: ``embed_dim`` and ``depths`` when set, then ``model_args``."""
    args = {k: hparams[k] for k in ('embed_dim', 'depths') if hparams.get(k) is not None}
    args.update(hparams.get('model_args') or {})
    return args


def swin_key(state: Mapping[str, torch.Tensor]) -> Optional[str]:
    """A key that only Swin's layout has (attention, patch merging), if ``state`` has one: the
    weights are an MS-Swin's or Swin's, not an MS-MLP's."""
    return next((k for k in state if '.attn.' in k or '.downsample.reduction.' in k), None)


def _stage_mix_sizes(state: Mapping[str, torch.Tensor], stage: int) -> Tuple[int, ...]:
    """The depthwise kernel of each channel group, from the stage's first block (a stage without
    blocks has none to read: the released sizes stand in)."""
    kernels: List[int] = []
    while f'layers.{stage}.blocks.0.dwconv_lr.{len(kernels)}.weight' in state:
        kernels.append(state[f'layers.{stage}.blocks.0.dwconv_lr.{len(kernels)}.weight'].shape[-1])
    return tuple(kernels) or MIX_SIZES[min(stage, len(MIX_SIZES) - 1)]


@functools.lru_cache(maxsize=None)
def imagenet_class_names() -> Tuple[str, ...]:
    """ImageNet-1K's class names in the output order of the released classifiers (timm's, as its
    inference script names the classes of any 1000-class model): 'tabby, tabby cat', ... (read
    from timm's files once: cls predict asks for them every batch)"""
    from timm.data import ImageNetInfo
    info = ImageNetInfo('imagenet-1k')
    return tuple(info.index_to_description(i) for i in range(1000))


def listed(items: Iterable[Any], limit: int = 8, sep: str = ', ') -> str:
    """The first ``limit`` of ``items`` and how many more, for one-line messages."""
    items = [str(item) for item in items]
    if not items:
        return 'none'
    return sep.join(items[:limit]) + (f' and {len(items) - limit} more' if len(items) > limit else '')


def mismatch_message(path: PathLike, missing: List[str], unexpected: List[str], mis_shaped: List[str]) -> str:
    """One line: how many keys are missing, unexpected and mis-shaped, and the first few of each."""
    def counted(keys: List[str], one: str, many: str, sep: str = ', ') -> str:
        text = f'{len(keys)} {one if len(keys) == 1 else many}'
        return text + (f' ({listed(keys, 3, sep)})' if keys else '')
    return (f'{path} does not fit the model: {counted(missing, "missing key", "missing keys")}, '
            f'{counted(unexpected, "unexpected key", "unexpected keys")}, '
            f'{counted(mis_shaped, "shape mismatch", "shape mismatches", "; ")}')
