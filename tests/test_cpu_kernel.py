"""The fast path's CPU kernel (msmlp/csrc/shift_mix.cpp): the released mixer in one C++ pass for
inference; built here (CI's machine has a compiler), and where it cannot be built the PyTorch fast
path runs instead, with one warning."""
import warnings

import pytest
import torch

import msmlp
from msmlp import MIX_SIZES, MSMLPBlock, cpu_kernel, mixing

from test_mixing import REFERENCE, STAGES, close, randomize


def mix(x: torch.Tensor, block: MSMLPBlock) -> torch.Tensor:
    """The fast mixer on an NCHW map, for inference."""
    with torch.no_grad():
        return mixing.mix_fast(x, block)


def released(x: torch.Tensor, block: MSMLPBlock) -> torch.Tensor:
    with torch.no_grad():
        return mixing.mix_reference(x, block)


@pytest.fixture
def counted_kernel_calls(monkeypatch):
    calls = []
    kernel = cpu_kernel.shift_mix

    def counting(*args):
        calls.append(args[0].shape)
        return kernel(*args)
    monkeypatch.setattr(cpu_kernel, 'shift_mix', counting)
    return calls


def test_the_kernel_builds_on_this_machine():
    assert cpu_kernel.available(), 'the CPU mixer kernel did not build (a C++ compiler and ninja are needed)'


@pytest.mark.parametrize('dim, stage', STAGES, ids=[f'{d}ch-stage{s}' for d, s in STAGES])
@pytest.mark.parametrize('batch', [1, 3])
def test_kernel_equals_the_released_mixer(dim, stage, batch, counted_kernel_calls):
    torch.manual_seed(dim + batch)
    block = randomize(MSMLPBlock(dim, MIX_SIZES[stage]))
    for size in [(7, 9), (13, 5), (1, 1), (2, 5), (3, 3), (16, 17)]:  # odd, smaller than shifts and kernels
        x = torch.randn(batch, dim, *size)
        assert close(mix(x, block), released(x, block)), size
    assert len(counted_kernel_calls) == 6


@pytest.mark.parametrize('dim', [20, 21, 24, 40, 97])
def test_narrow_and_uneven_groups(dim):
    """Groups narrower than a vector (one value at a time), a last group of one channel (21),
    groups that are not a multiple of the vector width (97: 20, 20, 20, 20, 17)."""
    torch.manual_seed(dim)
    block = randomize(MSMLPBlock(dim, MIX_SIZES[0]))
    x = torch.randn(2, dim, 9, 6)
    assert close(mix(x, block), released(x, block))


def test_shifts_and_kernels_other_than_the_released(counted_kernel_calls):
    torch.manual_seed(0)
    block = randomize(MSMLPBlock(96, (3, 1, 5, 9, 3), shift_dist=(4, -3, 0, 7, -1)))
    x = torch.randn(2, 96, 6, 11)
    assert close(mix(x, block), released(x, block))
    assert counted_kernel_calls


def test_a_model_with_channels_last_weights_gives_the_released_logits():
    data = REFERENCE['square_64']
    cfg = data['config']
    model = msmlp.MSMLP(num_classes=cfg['num_classes'], embed_dim=cfg['embed_dim'], depths=cfg['depths'])
    model.load_state_dict(data['state_dict'])
    model.eval().to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert close(model(data['input']), data['logits'])


def test_training_and_autocast_take_the_pytorch_operations(counted_kernel_calls):
    torch.manual_seed(0)
    block = randomize(MSMLPBlock(96, MIX_SIZES[0]))
    x = torch.randn(1, 96, 8, 8)
    block(x.requires_grad_()).sum().backward()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert mixing.mix_fast(x, block).dtype == torch.bfloat16  # the convs in autocast's precision
    assert not counted_kernel_calls


def test_msmlp_cpu_kernel_0_turns_it_off(monkeypatch, counted_kernel_calls):
    torch.manual_seed(0)
    block = randomize(MSMLPBlock(96, MIX_SIZES[0]))
    x = torch.randn(1, 96, 8, 8)
    monkeypatch.setenv('MSMLP_CPU_KERNEL', '0')
    assert close(mix(x, block), released(x, block))
    assert not counted_kernel_calls and not cpu_kernel.suits(x.permute(0, 2, 3, 1))


def test_a_failed_build_warns_once_and_the_pytorch_operations_run(monkeypatch):
    def no_compiler():
        raise RuntimeError('Error building extension: c++: command not found\nmore lines')
    monkeypatch.setattr(cpu_kernel, '_build', no_compiler)
    monkeypatch.setattr(cpu_kernel, '_built', {})
    torch.manual_seed(0)
    block = randomize(MSMLPBlock(96, MIX_SIZES[0]))
    x = torch.randn(1, 96, 8, 8)
    with pytest.warns(RuntimeWarning, match=r'could not be built \(Error building extension: c\+\+: command not '
                                            r'found\); the fast path runs its PyTorch operations'):
        assert close(mix(x, block), released(x, block))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert close(mix(x, block), released(x, block))


def test_the_build_name_changes_with_the_cpu(monkeypatch):
    """-march=native code runs only on CPUs like the one it was built on: another CPU model (a
    shared cache folder on a cluster) builds its own."""
    name = cpu_kernel.build_name()
    monkeypatch.setattr(cpu_kernel, '_cpu_signature', lambda: 'another CPU')
    assert cpu_kernel.build_name() != name
