"""The Triton mixer's checks (tests/triton_kernel_checks.py), in a process of their own: Triton's
interpreter has to be on before triton is first imported, and torch.compile's CPU backend (used
by other tests) leaves it unable to run kernels later in the same process."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_triton_mixer_checks_pass_in_their_own_process():
    pytest.importorskip('triton')
    # the interpreter runs Python on one core: the checks are shared by one process a core
    shards = max(1, min(2, os.cpu_count() or 1))
    # a second GPU needs two; inductor takes minutes: run with the slow tests
    selection = 'not second_gpu and not inductor'
    _assert_passed([_start_checks(selection, f'{shard}/{shards}') for shard in range(shards)])


@pytest.mark.slow
def test_inductor_check_passes_in_its_own_process():
    pytest.importorskip('triton')
    _assert_passed([_start_checks('inductor', '0/1')], expected='1 passed')


def _start_checks(selection: str, shard: str) -> subprocess.Popen:
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get('TRITON_INTERPRET', '1'), MSMLP_TEST_SHARD=shard)
    return subprocess.Popen([sys.executable, '-m', 'pytest', 'tests/triton_kernel_checks.py', '-q',
                             '-p', 'no:cacheprovider', '-k', selection],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _assert_passed(runs, expected: str = ' passed') -> None:
    for run in runs:
        stdout, stderr = run.communicate()
        summary = stdout.strip().splitlines()[-1] if stdout.strip() else stderr[-2000:]
        assert run.returncode == 0, stdout[-6000:] + stderr[-2000:]
        assert expected in summary and 'skipped' not in summary, summary


def test_the_weight_gradients_division_by_multiply_is_exact():
    """``_magic(d)`` locates pixels with a multiply: exact for every numerator below 2**31."""
    pytest.importorskip('triton')
    import random
    from msmlp.triton_mix import _magic
    generator = random.Random(0)
    divisors = list(range(1, 3000)) + [generator.randrange(1, 2 ** 31) for _ in range(1000)] + [2 ** 30, 2 ** 31 - 1]
    for d in divisors:
        m, s = _magic(d)
        assert 2 ** 31 <= m < 2 ** 32  # an unsigned 32-bit multiplier: one wide multiply
        largest = (2 ** 31 - 1) // d * d
        for n in (0, 1, d - 1, d, d + 1, largest - 1, largest, 2 ** 31 - 1, generator.randrange(2 ** 31)):
            if 0 <= n < 2 ** 31:
                assert (n * m) >> s == n // d, (n, d)


def test_deterministic_algorithms_fix_the_tiles_whose_sums_follow_them(monkeypatch):
    """The weight gradient's sums follow its tile (and the fused norm's statistics its channel
    block), and the autotuner picks tiles by timing: with ``torch.use_deterministic_algorithms(True)``
    one fixed tile runs, so two runs (or a resumed one) sum in the same order."""
    pytest.importorskip('triton')
    import torch
    from msmlp import triton_mix
    monkeypatch.setattr(triton_mix, 'interpreted', lambda: False)
    assert triton_mix._weight_grad_launcher(3136, 96) is triton_mix._weight_grad_kernel_tuned
    assert triton_mix._mix_norm_launcher(3136, 96) is triton_mix._mix_norm_kernel_tuned
    monkeypatch.setattr(torch, 'are_deterministic_algorithms_enabled', lambda: True)
    fixed = triton_mix._weight_grad_launcher(3136, 96)
    block_p, block_c, columns, warps = triton_mix.WEIGHT_GRAD_CONFIGS[0]
    assert [(c.kwargs, c.num_warps) for c in fixed.configs] == [
        (dict(BLOCK_P=block_p, BLOCK_C=block_c, COLUMNS=columns), warps)]
    block_p, block_c, warps = triton_mix.MIX_NORM_CONFIGS[0]  # the fused norm's statistics follow its channel block
    assert [(c.kwargs, c.num_warps) for c in triton_mix._mix_norm_launcher(3136, 96).configs] == [
        (dict(BLOCK_P=block_p, BLOCK_C=block_c), warps)]


def test_every_launch_grid_fits_cuda_limits_at_any_map_size():
    """CUDA takes up to 2**31 - 1 programs on a grid's first axis and 65535 on the others. The
    mixer's pixel tiles share the first axis with the images: the first stage of a 8000x8000
    input (4M pixels) takes 125000 tiles of 32 pixels, which a second axis could not launch."""
    pytest.importorskip('triton')
    from msmlp import triton_mix
    from msmlp.model import channel_groups
    for n, h, w, c in [(1, 2000, 2000, 96), (2, 14, 14, 384), (1024, 56, 56, 96), (4, 3000, 5000, 20)]:
        groups = channel_groups(c)
        _, span = triton_mix._group_table((0,) * len(groups), (7,) * len(groups), tuple(groups), 'cpu')
        for block_p, block_c, _ in triton_mix.MIX_CONFIGS + [(16, 8, 1)]:
            grid = triton_mix._mix_grid(n, h, w, len(groups), span)(dict(BLOCK_P=block_p, BLOCK_C=block_c))
            assert grid[0] == -(-h * w // block_p) * n and grid[1] == len(groups) * -(-span // block_c)
            assert grid[0] < 2 ** 31 and all(size <= 65535 for size in grid[1:]), (n, h, w, c, grid)


@pytest.mark.parametrize('groups,span', [((20, 20, 20, 20, 16), 24), ((39, 39, 39, 39, 36), 48),
                                         ((77, 77, 77, 77, 76), 88), ((8, 8), 8), ((3, 3, 3, 3), 16)])
def test_a_groups_programs_start_at_the_vector_holding_its_first_channel(groups, span):
    """Each group's programs take its channels from the 8-channel vector holding its first one
    (aligned 16-byte loads) to the one holding its last: ``span`` channels for the widest group
    (96 channels: the group of channels 20-39 loads 16-39; of 12, channels 6-8 load 0-15)."""
    pytest.importorskip('triton')
    from msmlp import triton_mix
    table, measured = triton_mix._group_table((0,) * len(groups), (3,) * len(groups), groups, 'cpu')
    assert measured == span
    assert table[:, :2].tolist() == [[sum(groups[:i]), sum(groups[:i + 1])] for i in range(len(groups))]


@pytest.mark.parametrize('shape', [(1, 47000, 47000, 1), (2 ** 16, 256, 128, 1)])
def test_a_map_beyond_32_bit_indexing_is_refused_in_one_line(shape):
    """An image's elements (H*W*C) and the batch's pixels (N*H*W) are indexed in 32 bits: beyond,
    the addresses would wrap and the output be silently wrong."""
    pytest.importorskip('triton')
    import torch
    from msmlp.triton_mix import shift_mix_triton
    x = torch.empty(shape, device='meta')
    weight, bias = torch.empty(1, 1, 1, 1, device='meta'), torch.empty(1, device='meta')
    with pytest.raises(ValueError, match=r'too large for the Triton mixer.*mix_impl=.fast.'):
        shift_mix_triton(x, [weight], [bias], [weight], [bias], [0], [1], [1])


def test_the_triton_mixer_dispatches_a_handful_of_operations(monkeypatch):
    """On a GPU each operation costs host time: with the groups' kernels packed by some forty
    small differentiable operations a block, a bf16 training step of msmlp_tiny on an H200 waited
    on the host (92 ms a step for 50 ms of kernels). The mixer's forward and backward now take
    its three kernel launches and eleven other operations (the launches stubbed here)."""
    pytest.importorskip('triton')
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from msmlp import triton_mix
    from msmlp.model import MSMLPBlock

    launches = []

    class Launcher:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(kwargs)

    monkeypatch.setattr(triton_mix, '_check_runnable', lambda t: None)
    monkeypatch.setattr(triton_mix, '_mix_launcher', lambda pixels, channels: Launcher())
    monkeypatch.setattr(triton_mix, '_weight_grad_launcher', lambda pixels, channels: Launcher())
    views = {'view', 'as_strided', 'reshape', '_reshape_alias', 'slice', 'narrow', 'permute', 't', 'transpose',
             'detach', 'expand', 'split', 'split_with_sizes', 'unsqueeze', 'squeeze', 'alias', '_unsafe_view'}

    class Count(TorchDispatchMode):
        operations = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in views:
                self.operations.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    block = MSMLPBlock(96, (1, 3, 5, 7, 7))
    params = [[getattr(conv, name) for conv in convs] for convs, name in
              ((block.dwconv_lr, 'weight'), (block.dwconv_lr, 'bias'), (block.dwconv_td, 'weight'), (block.dwconv_td, 'bias'))]
    x = torch.randn(2, 8, 8, 96, requires_grad=True)

    grad = torch.randn(x.shape)

    def mix_forward_and_backward():
        block.zero_grad(set_to_none=True)
        x.grad = None
        triton_mix.shift_mix_triton(x, *params, block.shift_dist, block.mix_size, block.group_sizes).backward(grad)

    mix_forward_and_backward()  # the packing's index tables are made once
    launches.clear()
    with Count():
        mix_forward_and_backward()
    assert len(launches) == 3 and len(Count.operations) <= 11, Count.operations
    assert all(p.grad is not None for group in params for p in group)
