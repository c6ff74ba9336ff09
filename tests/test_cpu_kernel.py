"""The fast path's CPU kernel (msmlp/csrc/shift_mix.cpp): the released mixer in one C++ pass, and
its input and kernel gradients in one pass each, for float32 on the CPU; built here (CI's machine
has a compiler), and where it cannot be built the PyTorch fast path runs instead, with one warning."""
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


def gradients(x: torch.Tensor, block: MSMLPBlock, grad: torch.Tensor, impl: str):
    """The mixer's gradients: of the input if it requires one, then of each kernel and bias that does."""
    block.zero_grad()
    x = x.detach().requires_grad_(x.requires_grad)
    mixing.shift_mix(x, block, impl).backward(grad)
    mixer = [p for p in (*block.dwconv_lr.parameters(), *block.dwconv_td.parameters()) if p.requires_grad]
    return ([x.grad] if x.requires_grad else []) + [p.grad for p in mixer]


def assert_gradients_released(x: torch.Tensor, block: MSMLPBlock) -> None:
    grad = torch.randn(x.shape)
    ours, theirs = gradients(x, block, grad, 'fast'), gradients(x, block, grad, 'reference')
    assert ours and len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a is not None and close(a, b), i


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


@pytest.mark.parametrize('dim, stage', STAGES, ids=[f'{d}ch-stage{s}' for d, s in STAGES])
@pytest.mark.parametrize('batch', [1, 3])
def test_kernel_gradients_equal_the_released_mixers(dim, stage, batch, counted_kernel_calls):
    torch.manual_seed(dim + batch)
    block = randomize(MSMLPBlock(dim, MIX_SIZES[stage]))
    for size in [(7, 9), (13, 5), (1, 1), (2, 5), (16, 17)]:  # odd, smaller than shifts and kernels
        assert_gradients_released(torch.randn(batch, dim, *size, requires_grad=True), block)
    assert len(counted_kernel_calls) == 5  # the forwards of the five training steps


@pytest.mark.parametrize('dim', [20, 21, 40, 97])
def test_kernel_gradients_of_narrow_and_uneven_groups(dim):
    torch.manual_seed(dim)
    block = randomize(MSMLPBlock(dim, MIX_SIZES[0]))
    assert_gradients_released(torch.randn(2, dim, 9, 6, requires_grad=True), block)


def test_kernel_gradients_with_shifts_and_kernels_other_than_the_released():
    """A 9x9 kernel's weight gradient takes the one-channel-at-a-time loop."""
    torch.manual_seed(0)
    block = randomize(MSMLPBlock(96, (3, 1, 5, 9, 3), shift_dist=(4, -3, 0, 7, -1)))
    assert_gradients_released(torch.randn(2, 96, 6, 11, requires_grad=True), block)


def test_kernel_gradients_of_a_frozen_mixer_and_of_a_frozen_input():
    torch.manual_seed(0)
    block = randomize(MSMLPBlock(96, MIX_SIZES[0]))
    x = torch.randn(2, 96, 8, 7)
    assert_gradients_released(x, block)  # the input needs no gradient (a frozen stem)
    for p in block.parameters():
        p.requires_grad_(False)
    x.requires_grad_()
    assert len(gradients(x, block, torch.randn(x.shape), 'fast')) == 1
    assert_gradients_released(x, block)


def test_kernel_gradients_do_not_change_from_run_to_run():
    """Each thread sums its rows' kernel gradients into its own buffer, added in a fixed order."""
    torch.manual_seed(0)
    block = randomize(MSMLPBlock(96, MIX_SIZES[0]))
    x, grad = torch.randn(4, 96, 30, 30, requires_grad=True), torch.randn(4, 96, 30, 30)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first, second = gradients(x, block, grad, 'fast'), gradients(x, block, grad, 'fast')
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_autocast_takes_the_pytorch_operations(counted_kernel_calls):
    torch.manual_seed(0)
    block = randomize(MSMLPBlock(96, MIX_SIZES[0]))
    x = torch.randn(1, 96, 8, 8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        with torch.no_grad():
            assert mixing.mix_fast(x, block).dtype == torch.bfloat16  # the convs in autocast's precision
        block(x.requires_grad_()).float().sum().backward()
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
