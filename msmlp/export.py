"""``msmlp export``: an MS-MLP or MS-Swin classifier or dense backbone as ONNX, TorchScript, a
torch.export program, or safetensors weights; a detector or segmentor trained with ``msmlp fit
--task det|seg`` as the checkpoint and config that MMDetection's and MMSegmentation's own tools read.

    msmlp export --model msmlp_tiny --format onnx --output msmlp_tiny.onnx
    msmlp export --model msmlp_tiny --checkpoint last.ckpt --format exported-program
    msmlp export --model msmlp_tiny --features-only --out-indices 1 2 3 --format onnx --img-size 512 512
    msmlp export --checkpoint runs/det/version_0/checkpoints/last.ckpt --format openmmlab --output det.pth

ONNX and exported programs take any batch, height and width (>= 64) unless ``--static``
(MS-Swin's: any batch at the export size, for which its attention windows are built);
TorchScript takes any size. Every file is checked after it is written: it is loaded again
and run (ONNX with onnxruntime) at the export size and, when dynamic, at a second odd size,
against the eager model. Detection and segmentation models export their backbone this way
(``--checkpoint`` of a det/seg run, ``--features-only``); whole detectors go through MMDeploy.
With ``--checkpoint`` the architecture is the checkpoint's (read from its weights), whatever
``--model`` says.
"""
import argparse
import json
import os
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .checkpoint import (CheckpointError, extract_state_dict, imagenet_class_names, infer_arch, load_state,
                         local_checkpoint, read_checkpoint, run_model_args, swin_key)
from .model import MIX_SIZES, VARIANT_ARCHS, MSMLP
from .msswin import DEFAULT_PATTERN, MSSwin
from .msswin import VARIANT_ARCHS as MSSWIN_ARCHS

__all__ = ['FORMATS', 'DenseOutputs', 'build_model', 'describe', 'export', 'check_export', 'check_writable', 'main']

MODELS = (*VARIANT_ARCHS, *MSSWIN_ARCHS)
FORMATS = {'onnx': '.onnx', 'torchscript': '.pt', 'exported-program': '.pt2', 'safetensors': '.safetensors'}
OPENMMLAB = 'openmmlab'  # a det/seg run's whole model, for the OpenMMLab tools (not a backbone format)
# Below 64 pixels the last stage is 1x1, a case the exported program's shape guards leave out.
MIN_DYNAMIC_SIZE = 64
MIN_OPSET = 18  # torch.onnx.export(dynamo=True) raises a lower request to 18, with a traceback on the way


class OutputError(ValueError):
    """An ``--output`` that cannot be written."""


class DenseOutputs(nn.Module):
    """The backbone's ``forward_dense`` (stage outputs, each through its norm) as ``forward``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.model.forward_dense(x)


def _head_classes(state: Dict[str, torch.Tensor]) -> Optional[int]:
    head = state.get('head.weight', state.get('head.fc.weight'))  # MS-MLP's, timm Swin's
    return None if head is None else head.shape[0]


def _classes(state: Dict[str, torch.Tensor], num_classes: Optional[int], source: Optional[str]) -> int:
    """The classifier's outputs: ``num_classes`` if given (0: none, the pooled features), else the
    checkpoint head's (none when it has no head), else 1000."""
    in_file = _head_classes(state)
    if num_classes is not None and num_classes < 0:
        raise ValueError(f'--num-classes {num_classes}: give 0 (no classifier: the pooled features) or more')
    if num_classes and source and num_classes != in_file:
        held = f'a head of {in_file} classes' if in_file else 'no classifier head'
        raise ValueError(f'--num-classes {num_classes}: {source} holds {held}; leave --num-classes out, '
                         'or give 0 for the pooled features')
    if num_classes is not None:
        return num_classes
    return (in_file or 0) if source else 1000


def _variant_of(arch: Dict) -> Optional[str]:
    """The registered variant whose architecture ``arch`` (:func:`infer_arch`'s keys) is, if any."""
    released = tuple(map(tuple, arch['mix_sizes'])) == MIX_SIZES and arch['in_chans'] == 3
    return next((name for name, variant in VARIANT_ARCHS.items() if released and (
        arch['embed_dim'], tuple(arch['depths'])) == (variant['embed_dim'], variant['depths'])), None)


def backbone(model: nn.Module) -> Union[MSMLP, MSSwin]:
    """The ``MSMLP`` or ``MSSwin`` inside what :func:`build_model` returns."""
    return model.model if isinstance(model, DenseOutputs) else model


def _fixed_size(model: nn.Module) -> bool:
    """MS-Swin builds its attention windows and masks for one input size when exported."""
    return isinstance(backbone(model), MSSwin)


def default_img_size(model: nn.Module) -> Tuple[int, int]:
    """The example input size: an MS-Swin's ``img_size``, else 224x224."""
    net = backbone(model)
    return tuple(net.patch_embed.img_size) if isinstance(net, MSSwin) and net.patch_embed.img_size else (224, 224)


def _architecture(name: str, checkpoint: Dict, state: Dict[str, torch.Tensor], source: str) -> Tuple[str, Dict]:
    """The registered model and its timm arguments for the weights of ``source``: MS-MLP's read
    from the weights (:func:`infer_arch`); an MS-Swin classifier run's from its stored
    hyperparameters; other MS-Swin weights are ``name``'s registered architecture (loaded strictly,
    so a file of another one is refused)."""
    swin = swin_key(state)
    hparams = checkpoint.get('hyper_parameters') if isinstance(checkpoint, dict) else None
    trained = hparams.get('model') if isinstance(hparams, dict) else None
    if isinstance(trained, str) and not trained.startswith(('msmlp', 'msswin')):
        raise CheckpointError(f'{source} is a run of {trained}: msmlp export converts MS-MLP and MS-Swin runs '
                              "(timm's own tools export other models)")
    if swin is None:
        arch = infer_arch(state, source)
        return _variant_of(arch) or (name if name in VARIANT_ARCHS else 'msmlp_tiny'), arch
    if trained in MSSWIN_ARCHS:
        arch = {k: v for k, v in run_model_args(hparams).items()
                if k not in ('num_classes', 'out_indices', 'pretrained')}  # build_model sets these
        return hparams['model'], arch
    arch = _openmmlab_msswin_args(checkpoint)
    if arch is not None:
        return 'msswin_tiny', arch
    if name not in MSSWIN_ARCHS:
        raise CheckpointError(f'{source} holds MS-Swin or Swin weights ({swin}): give their '
                              f"architecture, --model {' or '.join(MSSWIN_ARCHS)}")
    return name, {}


# the OpenMMLab backbone's arguments that are not the architecture (build_model sets its own)
_TRAINING_ARGS = ('type', '_delete_', 'arch', 'init_cfg', 'out_indices', 'drop_path_rate', 'frozen_stages',
                  'with_cp', 'in_channels')


def _openmmlab_msswin_args(checkpoint: Dict) -> Optional[Dict]:
    """The timm arguments of the MS-Swin backbone of a ``msmlp fit --task det|seg`` run, from the
    OpenMMLab config it trained with (its weights alone do not give the block pattern); None for
    other checkpoints."""
    text = checkpoint.get('openmmlab_config') if isinstance(checkpoint, dict) else None
    if not text:
        return None
    from mmengine.config import Config

    from .mm import MSSWIN_ARCHS as MM_MSSWIN_ARCHS
    from .mm import _arch_spec
    backbone = dict(Config.fromstring(text, '.py').model.get('backbone') or {})
    if str(backbone.get('type', '')).rpartition('.')[2] != 'MSSwin':
        return None
    given = {k: backbone.get(k) for k in ('embed_dim', 'depths', 'num_heads', 'window_size')}
    spec = _arch_spec('MSSwin', backbone.get('arch', 'tiny'), MM_MSSWIN_ARCHS, given, free=('window_size',))
    rest = {k: v for k, v in backbone.items() if k not in _TRAINING_ARGS and k not in spec}
    return {**spec, **rest, 'in_chans': backbone.get('in_channels', 3)}


def build_model(name: str, checkpoint: Optional[str] = None, features_only: bool = False,
                out_indices: Sequence[int] = (0, 1, 2, 3), num_classes: Optional[int] = None) -> nn.Module:
    """The eval-mode model to export: the classifier (with ``num_classes`` outputs, else as many as
    the checkpoint's head, else 1000; 0, and a checkpoint without head, give the pooled features)
    or, ``features_only``, the backbone with its output norms. With a checkpoint the architecture
    is the checkpoint's (:func:`_architecture`): an MS-MLP's read from its weights, built as the
    variant it is, if any, else with the checkpoint's width and depths; an MS-Swin's from the run
    that trained it, else ``name``'s."""
    import timm  # the models are registered with it by this module's imports of .model and .msswin
    if name not in MODELS:
        raise ValueError(f"--model must be one of {', '.join(MODELS)}, got {name!r}")
    checkpoint = local_checkpoint(checkpoint) if checkpoint else None  # a URL is downloaded once
    arch: Dict = {}
    if checkpoint:
        raw = read_checkpoint(checkpoint)
        state = extract_state_dict(raw, source=checkpoint)
        name, arch = _architecture(name, raw, state, checkpoint)
    else:
        state = {}
    if features_only:
        model = timm.create_model(name, num_classes=0, out_indices=tuple(out_indices), **arch)
    else:
        model = timm.create_model(name, num_classes=_classes(state, num_classes, checkpoint), **arch)
    if checkpoint:
        with warnings.catch_warnings():
            # a backbone has no head, a classifier no output norms, --num-classes 0 neither
            warnings.filterwarnings('ignore', message='.*(classifier head|output norms)')
            try:
                load_state(model, state, checkpoint)
            except CheckpointError as err:
                if isinstance(model, MSSwin) and not arch:  # built as --model's registered architecture
                    raise CheckpointError(f'{err}; MS-Swin weights outside a msmlp fit --task cls checkpoint '
                                          f'are built as --model {name}\'s registered architecture') from None
                raise
    if checkpoint and not features_only:
        # weights of 1000 unnamed classes are ImageNet-1K's (the released files)
        names = _class_names(raw) or (imagenet_class_names() if model.num_classes == 1000 else None)
        if names is not None and len(names) == model.num_classes:
            model.pretrained_cfg = {**model.pretrained_cfg, 'label_names': tuple(names)}  # timm's field
    model.eval()
    return DenseOutputs(model).eval() if features_only else model


def _class_names(checkpoint: Dict) -> Optional[List[str]]:
    """The class names a ``msmlp fit --task cls`` run's checkpoint records (None for others)."""
    hparams = checkpoint.get('hyper_parameters') if isinstance(checkpoint, dict) else None
    names = hparams.get('class_names') if isinstance(hparams, dict) else None
    return [str(name) for name in names] if isinstance(names, (list, tuple)) and names else None


def class_names(model: nn.Module) -> Optional[List[str]]:
    """The classifier's class names (timm's ``pretrained_cfg['label_names']``), in output order."""
    if isinstance(model, DenseOutputs):
        return None
    names = getattr(model, 'pretrained_cfg', {}).get('label_names')
    return list(names) if names and len(names) == getattr(model, 'num_classes', None) else None


def arch_words(embed_dim: Optional[int], depths: Optional[Sequence[int]]) -> List[str]:
    """``['embed_dim 40', 'depths 1,1,2,1']``, each only when given."""
    words = [f'embed_dim {embed_dim}'] if embed_dim else []
    return words + ([f'depths {",".join(map(str, depths))}'] if depths else [])


def _swin_details(net: MSSwin, name: str) -> List[str]:
    """How an MS-Swin differs from its registered variant, in words."""
    variant = MSSWIN_ARCHS.get(name, {})
    depths = tuple(len(stage.blocks) for stage in net.layers)
    details = []
    if (net.dims[0], depths) != (variant.get('embed_dim'), variant.get('depths')):
        details += arch_words(net.dims[0], depths)
    if net._ref_window_sizes[0] != (variant.get('window_size'),) * 2:
        details.append(f'window {"x".join(map(str, net._ref_window_sizes[0]))}')
    patterns = [','.join(p) for p in net.block_pattern]
    if set(patterns) != {','.join(DEFAULT_PATTERN)}:
        details.append('blocks ' + (patterns[0] if len(set(patterns)) == 1 else ' | '.join(patterns)))
    return details


def describe(model: nn.Module) -> str:
    """What :func:`build_model` built, in words: "msmlp_tiny (embed_dim 40, depths 1,1,2,1)
    classifier (3 classes)"."""
    net = backbone(model)
    name = getattr(net, 'pretrained_cfg', {}).get('architecture', type(net).__name__)
    if isinstance(net, MSSwin):
        details = _swin_details(net, name)
        name += f' ({", ".join(details)})' if details else ''
        return _describe_role(model, net, name)
    arch = dict(embed_dim=net.dims[0], depths=net.depths, in_chans=net.patch_embed.proj.in_channels,
                mix_sizes=tuple(s.blocks[0].mix_size if len(s.blocks) else MIX_SIZES[i]
                                for i, s in enumerate(net.layers)))
    if _variant_of(arch) != name:
        details = arch_words(arch['embed_dim'], arch['depths'])
        if arch['mix_sizes'] != MIX_SIZES:
            details.append('mix sizes ' + ' '.join(','.join(map(str, m)) for m in arch['mix_sizes']))
        if arch['in_chans'] != 3:
            details.append(f'{arch["in_chans"]} input channels')
        name += f' ({", ".join(details)})'
    return _describe_role(model, net, name)


def _describe_role(model: nn.Module, net: nn.Module, name: str) -> str:
    if isinstance(model, DenseOutputs):
        return f'{name} backbone (stages {", ".join(map(str, net.out_indices))})'
    if not net.num_classes:
        return f'{name} without classifier ({net.num_features} pooled features)'
    return f'{name} classifier ({net.num_classes} classes)'


def _dynamic_shapes(model: nn.Module) -> dict:
    from torch.export import Dim
    if _fixed_size(model):
        return {'x': {0: Dim('batch', min=1)}}
    return {'x': {0: Dim('batch', min=1), 2: Dim('height', min=MIN_DYNAMIC_SIZE),
                  3: Dim('width', min=MIN_DYNAMIC_SIZE)}}


def _output_names(model: nn.Module) -> List[str]:
    if isinstance(model, DenseOutputs):
        return [f'stage{i}' for i in model.model.out_indices]
    return ['logits']


def export(model: nn.Module, fmt: str, output: str, img_size: Tuple[int, int] = (224, 224),
           static: bool = False, opset: Optional[int] = None) -> None:
    """Write ``model`` (eval mode) to ``output`` in ``fmt`` (one of :data:`FORMATS`); safetensors:
    the ``MSMLP``'s own state dict (a backbone's without the :class:`DenseOutputs` wrapper)."""
    if fmt not in FORMATS:
        raise ValueError(f'--format must be one of {", ".join(FORMATS)}, got {fmt!r}')
    if not static and fmt in ('onnx', 'exported-program') and min(img_size) < MIN_DYNAMIC_SIZE \
            and not _fixed_size(model):
        raise ValueError(f'--img-size {img_size[0]} {img_size[1]}: a dynamic export needs sizes >= '
                         f'{MIN_DYNAMIC_SIZE}; add --static to export this size only')
    from safetensors import SafetensorError
    check_writable(output)
    example = (_images(model, 1 if static else 2, *img_size),)  # torch.export fixes a batch of 1
    dynamic = None if static else _dynamic_shapes(model)
    try:
        with torch.no_grad():
            _write(model, fmt, output, example, dynamic, opset)
    except (OSError, SafetensorError) as err:
        reason = getattr(err, 'strerror', None) or str(err).splitlines()[0]
        raise OutputError(f'cannot write {output}: {reason}') from None


def check_writable(output: str) -> None:
    """Fail before the (slow) export when ``output`` cannot be written."""
    if os.path.isdir(output):
        raise OutputError(f'cannot write {output}: it is a folder; name a file')
    folder = os.path.dirname(os.path.abspath(output))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise OutputError(f'cannot write {output}: cannot make the folder {folder} ({err.strerror or err})') from None
    if not os.access(folder, os.W_OK) or (os.path.exists(output) and not os.access(output, os.W_OK)):
        raise OutputError(f'cannot write {output}: permission denied')


def _images(model: nn.Module, batch: int, height: int, width: int) -> torch.Tensor:
    return torch.randn(batch, backbone(model).patch_embed.proj.in_channels, height, width)


CLASS_NAMES = 'class_names'  # the metadata key (a file 'class_names.json' in TorchScript and programs)


def _write(model: nn.Module, fmt: str, output: str, example: tuple, dynamic: Optional[dict],
           opset: Optional[int]) -> None:
    names = class_names(model)
    metadata = {CLASS_NAMES: json.dumps(names)} if names else {}
    files = {f'{CLASS_NAMES}.json': metadata[CLASS_NAMES]} if names else {}
    if fmt == 'safetensors':
        from safetensors.torch import save_file
        state = {k: v.contiguous() for k, v in backbone(model).state_dict().items()}
        save_file(state, output, metadata={'format': 'pt', **metadata})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(output, 0o666 & ~umask)  # safetensors writes owner-only (0600), unlike the other formats
    elif fmt == 'torchscript':
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='.*torch.jit.script.* is deprecated', category=FutureWarning)
            torch.jit.script(model).save(output, _extra_files=files)
    elif fmt == 'exported-program':
        torch.export.save(torch.export.export(model, example, dynamic_shapes=dynamic), output, extra_files=files)
    else:
        _export_onnx(model, example, dynamic, output, opset, metadata)


def written_class_names(fmt: str, output: str) -> Optional[List[str]]:
    """The class names an exported file records (None if it records none)."""
    if fmt == 'onnx':
        import onnxruntime
        session = onnxruntime.InferenceSession(output, providers=['CPUExecutionProvider'])
        found = session.get_modelmeta().custom_metadata_map.get(CLASS_NAMES)
    elif fmt == 'safetensors':
        from safetensors import safe_open
        with safe_open(output, 'pt') as f:
            found = (f.metadata() or {}).get(CLASS_NAMES)
    else:
        files = {f'{CLASS_NAMES}.json': ''}
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='.*torch.jit.load.* is deprecated', category=FutureWarning)
            if fmt == 'torchscript':
                torch.jit.load(output, _extra_files=files)
            else:
                torch.export.load(output, extra_files=files)
        found = files[f'{CLASS_NAMES}.json'] or None
    return json.loads(found) if found else None


def _export_onnx(model, example, dynamic, output: str, opset: Optional[int], metadata: Dict[str, str]) -> None:
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError:
        raise RuntimeError('ONNX export needs onnx and onnxscript: pip install onnx onnxscript onnxruntime') from None
    program = torch.onnx.export(
        model, example, dynamo=True, dynamic_shapes=dynamic, opset_version=opset, verbose=False,
        input_names=['images'], output_names=_output_names(model))
    program.model.metadata_props.update(metadata)
    program.save(output)


def _loaded(fmt: str, output: str) -> Callable[[torch.Tensor], List[torch.Tensor]]:
    """The exported file, loaded again, as a function of the input images."""
    if fmt == 'onnx':
        import onnxruntime
        session = onnxruntime.InferenceSession(output, providers=['CPUExecutionProvider'])
        name = session.get_inputs()[0].name
        return lambda x: [torch.from_numpy(o) for o in session.run(None, {name: x.numpy()})]
    if fmt == 'torchscript':
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='.*torch.jit.load.* is deprecated', category=FutureWarning)
            module = torch.jit.load(output)
    else:
        module = torch.export.load(output).module()

    def run(x: torch.Tensor) -> List[torch.Tensor]:
        out = module(x)
        return list(out) if isinstance(out, (list, tuple)) else [out]
    return run


def check_sizes(img_size: Tuple[int, int], static: bool, fmt: str, fixed_size: bool = False
                ) -> List[Tuple[int, int, int]]:
    """(batch, height, width) to check: the export size and, when dynamic, an odd other one
    (``fixed_size``: another batch at the export size, except for TorchScript)."""
    sizes = [(1, *img_size)]
    if fixed_size and fmt != 'torchscript':
        sizes += [] if static else [(2, *img_size)]
    elif not static or fmt == 'torchscript':
        sizes.append((2, 383, 511) if tuple(img_size) != (383, 511) else (2, 416, 576))
    return sizes


def check_export(model: nn.Module, fmt: str, output: str, img_size: Tuple[int, int], static: bool = False
                 ) -> float:
    """The largest difference between the file's outputs and the eager model's, relative to the
    largest eager output, over :func:`check_sizes`; safetensors: whether the weights are equal (0.0)."""
    if fmt == 'safetensors':
        from safetensors.torch import load_file
        saved, own = load_file(output), backbone(model).state_dict()
        if saved.keys() != own.keys() or any(not torch.equal(saved[k], own[k]) for k in own):
            raise RuntimeError(f'{output}: the saved weights differ from the model')
        return 0.0
    worst, run = 0.0, _loaded(fmt, output)
    for batch, height, width in check_sizes(img_size, static, fmt, _fixed_size(model)):
        x = _images(model, batch, height, width)
        with torch.no_grad():
            expected = model(x)
        expected = list(expected) if isinstance(expected, (list, tuple)) else [expected]
        got = run(x)
        if [tuple(g.shape) for g in got] != [tuple(e.shape) for e in expected]:
            raise RuntimeError(f'{output}: output shapes {[tuple(g.shape) for g in got]} at {tuple(x.shape)}, '
                               f'expected {[tuple(e.shape) for e in expected]}')
        for g, e in zip(got, expected):
            worst = max(worst, ((g - e).abs().max() / e.abs().max().clamp_min(1e-12)).item())
    return worst


# ----- a det/seg run for the OpenMMLab tools ---------------------------------------------------
def openmmlab_checkpoint(checkpoint: Dict, source: str) -> Tuple[Dict, str]:
    """A ``msmlp fit --task det|seg`` checkpoint as mmengine's runner saves one (``state_dict``
    of the detector or segmentor, ``meta.dataset_meta.classes``), and the OpenMMLab config it ran."""
    config = checkpoint.get('openmmlab_config') if isinstance(checkpoint, dict) else None
    if not config or not isinstance(checkpoint.get('state_dict'), dict):
        raise ValueError(f'{source} is not a checkpoint of msmlp fit --task det or seg (it holds no OpenMMLab '
                         'config); --format openmmlab converts those')
    state = {k[len('model.'):]: v for k, v in checkpoint['state_dict'].items() if k.startswith('model.')}
    meta = dict(converted_from=source, epoch=checkpoint.get('epoch'), iter=checkpoint.get('global_step'))
    if checkpoint.get('classes'):
        meta['dataset_meta'] = dict(classes=tuple(checkpoint['classes']))
        if _config_scope(config) == 'mmseg':  # its visualizer needs a colour per class, as mmseg's runner saves
            from .mm import class_palette
            meta['dataset_meta']['palette'] = class_palette(checkpoint['classes']).tolist()
    return dict(meta=meta, state_dict=state), config


def _config_scope(config_text: str) -> Optional[str]:
    from mmengine.config import Config
    return Config.fromstring(config_text, '.py').get('default_scope')


def export_openmmlab(source: str, output: str) -> str:
    """Write ``output`` (the checkpoint) and the config beside it (``.py``); returns the config's path."""
    checkpoint, config = openmmlab_checkpoint(read_checkpoint(source), source)
    config_path = os.path.splitext(output)[0] + '.py'
    if os.path.abspath(config_path) == os.path.abspath(output):
        raise OutputError(f'cannot write {output}: name a .pth file (the config goes beside it as {config_path})')
    if os.path.exists(config_path) and not _written_by_export(config_path):
        raise OutputError(f'cannot write {output}: its config would replace {config_path}, which msmlp export did '
                          'not write; name another output')
    check_writable(output)
    torch.save(checkpoint, output)
    with open(config_path, 'w') as f:
        f.write(f'{EXPORTED_CONFIG_MARK} from {source}\n{config}')
    return config_path


EXPORTED_CONFIG_MARK = '# written by msmlp export'


def _written_by_export(config_path: str) -> bool:
    with open(config_path, errors='replace') as f:
        return f.readline().startswith(EXPORTED_CONFIG_MARK)


def check_openmmlab(output: str, config_path: str) -> Optional[str]:
    """Build the model from the written config, as the tools do, and load the written weights
    strictly; the registry scope, or None when its package is not installed here."""
    import importlib.util
    from mmengine.config import Config
    cfg = Config.fromfile(config_path)  # its custom_imports register the backbone
    scope = cfg.get('default_scope')
    if scope is None or importlib.util.find_spec(scope) is None:
        return None
    from mmengine.registry import MODELS, init_default_scope
    init_default_scope(scope)
    with warnings.catch_warnings():  # the OpenMMLab packages' deprecation notices about their own code
        warnings.simplefilter('ignore')
        model = MODELS.build(cfg.model)
    model.load_state_dict(torch.load(output, map_location='cpu', weights_only=True)['state_dict'], strict=True)
    return scope


def _main_openmmlab(args: argparse.Namespace) -> int:
    if not args.checkpoint:
        raise ValueError('--format openmmlab converts a det or seg run: give its --checkpoint')
    print(f'msmlp export: {args.checkpoint} -> {args.output} (openmmlab: the whole model, for the OpenMMLab tools)',
          flush=True)
    config_path = export_openmmlab(local_checkpoint(args.checkpoint), args.output)
    print(f'msmlp export: wrote {args.output} and its config {config_path}', flush=True)
    if not args.no_check:
        scope = check_openmmlab(args.output, config_path)
        print(f'msmlp export: checked: {scope} builds the model from {config_path} and loads every weight'
              if scope else f'msmlp export: not checked: the config\'s package is not installed here')
    return 0


CheckpointKeyword = Callable[[str, bool], str]
"""Resolves ``--checkpoint last|best`` (and whether the format is openmmlab) to a file."""


def parse_args(argv: Optional[Sequence[str]] = None,
               checkpoint_keyword: Optional[CheckpointKeyword] = None) -> argparse.Namespace:
    """``checkpoint_keyword`` makes ``--checkpoint last|best`` a file (the CLI passes the rule of
    its run folders); a file of that name here is taken as given."""
    parser = argparse.ArgumentParser(
        prog='msmlp export',
        description='Export an MS-MLP classifier or dense backbone as ONNX, TorchScript, a torch.export '
                    'program or safetensors weights, or a det/seg run for the OpenMMLab tools; the file is '
                    'loaded again and checked against the model.')
    parser.add_argument('--model', default='msmlp_tiny',
                        help=f"{', '.join(MODELS)}; with --checkpoint, the checkpoint's architecture (that of "
                             "MS-Swin weights not from a msmlp fit run is --model's)")
    parser.add_argument('--checkpoint', metavar='FILE',
                        help='weights: a released, Lightning (cls/det/seg), mmengine, timm or safetensors file, '
                             'or its URL (downloaded once); last or best: that of the newest msmlp fit run')
    parser.add_argument('--format', default='onnx', choices=[*FORMATS, OPENMMLAB],
                        help='openmmlab: a det/seg run (--checkpoint) as the .pth and .py config that '
                             "mmdet's and mmseg's tools and APIs read")
    parser.add_argument('--output', metavar='OUT', help='the file to write (default: MODEL[-features].SUFFIX)')
    parser.add_argument('--features-only', action='store_true',
                        help='the backbone: the out-indices stage outputs, each through its norm')
    parser.add_argument('--out-indices', type=int, nargs='+', default=[0, 1, 2, 3], metavar='I')
    parser.add_argument('--num-classes', type=int,
                        help="classifier outputs (default: the checkpoint head's, else 1000); "
                             '0: no classifier, the pooled features')
    parser.add_argument('--img-size', type=int, nargs=2, metavar=('H', 'W'),
                        help="the example input (default: an MS-Swin's img_size, else 224 224); with --static, "
                             "and for MS-Swin's ONNX and programs, the only size the file takes")
    parser.add_argument('--static', action='store_true', help='a fixed batch of 1 at --img-size (ONNX, program)')
    parser.add_argument('--opset', type=int, help="ONNX opset (default: torch's)")
    parser.add_argument('--no-check', action='store_true', help='do not load and check the written file')
    args = parser.parse_args(argv)
    if args.img_size and min(args.img_size) < 1:
        parser.error(f'--img-size {args.img_size[0]} {args.img_size[1]}: height and width must be at least 1')
    if args.opset is not None and args.opset < MIN_OPSET:
        parser.error(f"--opset {args.opset}: torch's ONNX exporter writes opset {MIN_OPSET} or later")
    if checkpoint_keyword and args.checkpoint in ('last', 'best') and not os.path.exists(args.checkpoint):
        args.checkpoint = checkpoint_keyword(args.checkpoint, args.format == OPENMMLAB)
    if args.output is None and args.format == OPENMMLAB:
        stem = os.path.splitext(os.path.basename(args.checkpoint or 'model'))[0]
        args.output = stem + '-openmmlab.pth'
    if args.output and args.checkpoint and os.path.exists(args.output) \
            and os.path.samefile(args.output, args.checkpoint):
        parser.error(f'--output {args.output} is the checkpoint it exports: name another file')
    return args


def default_output(model: nn.Module, fmt: str) -> str:
    """MODEL[-features].SUFFIX, after the architecture that was built."""
    name = getattr(backbone(model), 'pretrained_cfg', {}).get('architecture', 'model')
    return name + ('-features' if isinstance(model, DenseOutputs) else '') + FORMATS[fmt]


def _input_shapes(model: nn.Module, fmt: str, img_size: Tuple[int, int], static: bool) -> str:
    """The inputs the written file takes, in words."""
    channels = backbone(model).patch_embed.proj.in_channels
    if fmt in ('torchscript', 'safetensors'):
        return 'any size' if fmt == 'torchscript' else 'weights'
    if static:
        return f'1x{channels}x{img_size[0]}x{img_size[1]}'
    if _fixed_size(model):
        return f'dynamic batch at {channels}x{img_size[0]}x{img_size[1]}: MS-Swin\'s windows are built for one size'
    return f'dynamic batch, height and width (>= {MIN_DYNAMIC_SIZE})'


def main(argv: Optional[Sequence[str]] = None, checkpoint_keyword: Optional[CheckpointKeyword] = None) -> int:
    try:
        args = parse_args(argv, checkpoint_keyword)
    except ValueError as err:  # the keyword's run was not found
        if os.environ.get('MSMLP_DEBUG'):
            raise
        print(f'msmlp export: error: {err}', file=sys.stderr)
        return 1
    try:
        if args.format == OPENMMLAB:
            return _main_openmmlab(args)
        model = build_model(args.model, args.checkpoint, args.features_only, args.out_indices, args.num_classes)
        channels = backbone(model).patch_embed.proj.in_channels
        img_size = tuple(args.img_size) if args.img_size else default_img_size(model)
        args.output = args.output or default_output(model, args.format)
        shapes = _input_shapes(model, args.format, img_size, args.static)
        source = f' from {args.checkpoint}' if args.checkpoint else ', random weights'
        print(f'msmlp export: {describe(model)}{source} -> {args.output} ({args.format}, {shapes})', flush=True)
        start = time.perf_counter()
        export(model, args.format, args.output, img_size, args.static, args.opset)
        size_mb = os.path.getsize(args.output) / 2 ** 20
        names = class_names(model)
        recorded = f", with its {len(names)} class names ('{CLASS_NAMES}')" if names else ''
        print(f'msmlp export: wrote {args.output} ({size_mb:.1f} MiB) in {time.perf_counter() - start:.0f} s{recorded}',
              flush=True)
        if not args.no_check:
            worst = check_export(model, args.format, args.output, img_size, args.static)
            if args.format == 'safetensors':
                print('msmlp export: checked: the file holds the model\'s weights exactly')
            else:
                sizes = check_sizes(img_size, args.static, args.format, _fixed_size(model))
                at = ' and '.join(f'{b}x{channels}x{h}x{w}' for b, h, w in sizes)
                runner = 'onnxruntime' if args.format == 'onnx' else 'the loaded file'
                print(f'msmlp export: checked: {runner} at {at} matches the eager model '
                      f'(largest difference {worst:.1e} of the largest output)')
                if worst > 1e-4:
                    print(f'msmlp export: error: {args.output} differs from the model by {worst:.1e} (> 1e-4)',
                          file=sys.stderr)
                    return 1
    except (CheckpointError, ValueError, RuntimeError) as err:
        if os.environ.get('MSMLP_DEBUG'):
            raise
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        print(f'msmlp export: error: {first}', file=sys.stderr)
        return 1
    return 0
