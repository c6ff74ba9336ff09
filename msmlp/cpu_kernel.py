"""The fast path's CPU kernel: a block's whole token mixer in one C++ pass (``csrc/shift_mix.cpp``).

On the CPU in float32 the fast path runs the mixer as one loop over the map: both branches' rolls
read in place, every group at its own kernel size (no zero taps, no rolled copies), one write of the
output, on torch's intra-op threads; for training, its input gradient and its kernels' gradients in
one more loop each. Measured on msmlp_tiny it is 2.5-4x the PyTorch fast path's mixer at batch 1,
and 2.2-3.2x its forward and backward in training at batch 16 (docs/speed.md).

It is built on first use with torch's extension builder (a C++ compiler and ninja; ``make setup``
builds it) for this machine's CPU (``-march=native``), once per CPU model, source and torch
version, into ``$MSMLP_CACHE/kernels`` (default ``~/.cache/msmlp/kernels``). Where it cannot be
built the fast path runs its PyTorch operations (the same function; a warning says why), and
``MSMLP_CPU_KERNEL=0`` skips it. ``cpu_kernel.main()`` builds it and says where.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import platform
import sys
import threading
import types
import warnings
from pathlib import Path
from typing import List, Optional, Sequence

import filelock
import torch

__all__ = ['available', 'enabled', 'load', 'shift_mix', 'shift_mix_grad_input', 'shift_mix_grad_weight', 'suits']

SOURCE = Path(__file__).with_name('csrc') / 'shift_mix.cpp'
CFLAGS = ('-O3', '-march=native', '-fopenmp')
LDFLAGS = ('-fopenmp',)

_lock = threading.Lock()
_built: dict = {}  # 'module': the module, or None where the build failed


def enabled() -> bool:
    """False where ``MSMLP_CPU_KERNEL=0``."""
    return os.environ.get('MSMLP_CPU_KERNEL', '1').strip() != '0'


def cache_dir() -> Path:
    """Where built kernels live: ``$MSMLP_CACHE/kernels`` (the set-up's cache), else under
    ``$XDG_CACHE_HOME/msmlp`` or ``~/.cache/msmlp``."""
    root = os.environ.get('MSMLP_CACHE') or Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'msmlp'
    return Path(root) / 'kernels'


def _cpu_signature() -> str:
    """This CPU's model and instruction sets: ``-march=native`` code is only valid on such a CPU."""
    lines = []
    with contextlib.suppress(OSError):
        with open('/proc/cpuinfo') as info:
            for line in info:
                if line.startswith(('model name', 'flags', 'Features', 'CPU part')):
                    lines.append(line)
                if line.strip() == '' and lines:
                    break
    return platform.machine() + platform.processor() + ''.join(lines)


def build_name() -> str:
    """The module's name: its source, flags, torch version and CPU, hashed."""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), ' '.join(CFLAGS + LDFLAGS).encode(), torch.__version__.encode(),
                 _cpu_signature().encode()):
        key.update(part)
    return f'msmlp_shift_mix_{key.hexdigest()[:16]}'


@contextlib.contextmanager
def _ninja_on_path():
    """torch's builder runs ``ninja`` from PATH; the pip package's may not be on it."""
    path = os.environ.get('PATH', '')
    try:
        import ninja
        os.environ['PATH'] = os.pathsep.join((ninja.BIN_DIR, path))
    except ImportError:
        pass
    try:
        yield
    finally:
        os.environ['PATH'] = path


def _build():
    name = build_name()
    directory = cache_dir() / name
    directory.mkdir(parents=True, exist_ok=True)
    built = directory / f'{name}.so'
    # one process builds, the others wait for it and import what it built
    with filelock.FileLock(str(directory / 'msmlp.lock')):
        if built.exists():  # the name covers source, flags, torch and CPU: import it as it is
            spec = importlib.util.spec_from_file_location(name, built)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        # torch.utils.cpp_extension logs a CUDA_HOME notice at import on CUDA builds without a GPU
        logging.getLogger('torch.utils.cpp_extension').setLevel(logging.ERROR)
        from torch.utils import cpp_extension
        print(f'msmlp: building the CPU mixer kernel for this CPU (once, about 20 s) in {directory}',
              file=sys.stderr, flush=True)
        with _ninja_on_path():
            return cpp_extension.load(name, [str(SOURCE)], extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                                      build_directory=str(directory), verbose=False)


def load() -> Optional[types.ModuleType]:
    """The built kernel module; None where ``MSMLP_CPU_KERNEL=0`` or it cannot be built (warned
    once per process)."""
    if not enabled():
        return None
    if 'module' not in _built:
        with _lock:
            if 'module' not in _built:
                try:
                    _built['module'] = _build()
                except Exception as error:  # no compiler, no ninja, an unsupported CPU or platform
                    _built['module'] = None
                    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
                    warnings.warn(f'msmlp: the CPU mixer kernel could not be built ({reason}); the fast path '
                                  f'runs its PyTorch operations instead (same results, slower). '
                                  f'MSMLP_CPU_KERNEL=0 skips the build.', RuntimeWarning, stacklevel=2)
    return _built['module']


def available() -> bool:
    """Whether the kernel is enabled and built (building it if needed)."""
    return load() is not None


def suits(x: torch.Tensor) -> bool:
    """Whether the kernel runs the mixer (and its gradients) on ``x``: a float32 map on the CPU,
    outside autocast (which runs the mixer's convs in its lower precision), the kernel enabled and built."""
    return (x.device.type == 'cpu' and x.dtype == torch.float32 and not torch.is_autocast_enabled('cpu')
            and available())


def shift_mix(x: torch.Tensor, lr_weights: Sequence[torch.Tensor], lr_biases: Sequence[torch.Tensor],
              td_weights: Sequence[torch.Tensor], td_biases: Sequence[torch.Tensor],
              shifts: Sequence[int]) -> torch.Tensor:
    """The token mixer of a contiguous NHWC float32 map (no autograd node; ``mixing`` adds the
    gradients): see ``csrc/shift_mix.cpp``."""
    return load().shift_mix(x, list(lr_weights), list(lr_biases), list(td_weights), list(td_biases), list(shifts))


def shift_mix_grad_input(grad: torch.Tensor, lr_weights: Sequence[torch.Tensor], td_weights: Sequence[torch.Tensor],
                         shifts: Sequence[int]) -> torch.Tensor:
    """The mixer's input gradient from its output gradient (contiguous NHWC float32)."""
    return load().shift_mix_grad_input(grad, list(lr_weights), list(td_weights), list(shifts))


def shift_mix_grad_weight(grad: torch.Tensor, x: torch.Tensor, lr_weights: Sequence[torch.Tensor],
                          td_weights: Sequence[torch.Tensor], shifts: Sequence[int]) -> List[torch.Tensor]:
    """The kernels' gradients, per group lr then td, from the output gradient and the input (contiguous
    NHWC float32); ``lr_weights`` and ``td_weights`` give only the shapes."""
    return load().shift_mix_grad_weight(grad, x, list(lr_weights), list(td_weights), list(shifts))


def main() -> None:
    """Build the kernel (``make setup`` runs this) and say where it is, or why it is not."""
    if not enabled():
        print('msmlp: the CPU mixer kernel is off (MSMLP_CPU_KERNEL=0)')
        return
    module = load()
    if module is None:
        raise SystemExit('msmlp: the CPU mixer kernel is not available (see the warning above); '
                         'the fast path runs its PyTorch operations')
    print(f'msmlp: CPU mixer kernel ready: {module.__file__}')
