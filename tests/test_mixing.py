"""The fast block computes the released function: it agrees with the reference path (the
released per-group rolls and convs) on outputs and gradients, for every variant's stage
shapes, at odd and tiny sizes, with released weights, compiled and under bf16 autocast."""
import os
from pathlib import Path
from unittest import mock

import pytest
import torch

import msmlp
from msmlp import MIX_SIZES, MSMLP, MSMLPBlock
from msmlp import mixing

FIXTURES = Path(__file__).parent / 'fixtures'
REFERENCE = torch.load(FIXTURES / 'msmlp_reference.pt', weights_only=True)

# (dim, stage) of every variant's stages: tiny and small share 96..768, base has 128..1024.
STAGES = [(96 * 2 ** i, i) for i in range(4)] + [(128 * 2 ** i, i) for i in range(4)]


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """Tiny tensors: one thread avoids a thread hand-off per oneDNN call on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random parameters (layer scale included), so that every part of the block matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return module


def close(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> bool:
    """Agreement to ``tol`` relative to the reference's magnitude (absolute below 1)."""
    return (ours.float() - ref.float()).abs().max().item() <= tol * max(1.0, ref.abs().max().item())


def use_path(module: torch.nn.Module, impl: str) -> None:
    """Every block of ``module`` (a block alone, a model, a compiled model) on one path."""
    for m in module.modules():
        if isinstance(m, MSMLPBlock):
            m.mix_impl = impl


def run(module: torch.nn.Module, impl: str, x: torch.Tensor, grad: torch.Tensor, seed: int = 0):
    """Output, input gradient and parameter gradients of ``module`` on the given path."""
    use_path(module, impl)
    module.zero_grad()
    x = x.detach().requires_grad_()
    torch.manual_seed(seed)  # the same drop-path draws on both paths
    out = module(x)
    (out * grad).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in module.named_parameters()}


def assert_paths_agree(module: torch.nn.Module, x: torch.Tensor, tol: float = 1e-5) -> None:
    """Outputs and every gradient of the fast path, on the CPU kernel and on the PyTorch
    operations (``MSMLP_CPU_KERNEL=0``), equal the reference path's; so do its inference outputs."""
    grad = torch.randn(module(x).shape)
    ref = run(module, 'reference', x, grad)
    with without_cpu_kernel():
        operations = run(module, 'fast', x, grad)
    for path, fast in (('kernel', run(module, 'fast', x, grad)), ('operations', operations)):
        assert close(fast[0], ref[0], tol), f'{path}: outputs'
        assert close(fast[1], ref[1], tol), f'{path}: input gradient'
        for name, g in ref[2].items():
            assert close(fast[2][name], g, tol), f'{path}: {name}'
    with torch.no_grad():  # the inference paths: the CPU kernel, and the PyTorch operations (fused, chunked MLP)
        assert close(run_no_grad(module, 'fast', x), ref[0], tol)
        with without_cpu_kernel():
            assert close(run_no_grad(module, 'fast', x), ref[0], tol)


def without_cpu_kernel():
    """The fast path on its PyTorch operations (``MSMLP_CPU_KERNEL=0``)."""
    return mock.patch.dict(os.environ, MSMLP_CPU_KERNEL='0')


def run_no_grad(module: torch.nn.Module, impl: str, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    use_path(module, impl)
    torch.manual_seed(seed)
    with torch.no_grad():
        return module(x)


@pytest.mark.parametrize('dim, stage', STAGES, ids=[f'{d}ch-stage{s}' for d, s in STAGES])
def test_block_matches_reference_for_every_variant_stage(dim, stage):
    torch.manual_seed(dim)
    block = randomize(MSMLPBlock(dim, MIX_SIZES[stage]))
    assert_paths_agree(block, torch.randn(2, dim, 7, 9))


@pytest.mark.parametrize('dim, stage', STAGES, ids=[f'{d}ch-stage{s}' for d, s in STAGES])
def test_a_single_small_map_takes_one_run_and_agrees(dim, stage):
    """Batch 1 up to 28x28 pixels: all groups in one conv and one gathered roll (with fewer
    rows than the hidden width, the inference path scales by gamma instead of folding it)."""
    torch.manual_seed(dim)
    block = randomize(MSMLPBlock(dim, MIX_SIZES[stage]))
    kernels = block.mix_size
    runs = mixing.mix_runs(1, 7, 9, 'cpu', block.group_sizes, kernels)
    assert runs == (mixing.Run(0, dim, max(kernels), slice(0, 5)),)
    assert len(mixing.mix_runs(2, 7, 9, 'cpu', block.group_sizes, kernels)) == len(mixing.kernel_runs(
        block.group_sizes, kernels)) == len(mixing.mix_runs(1, 29, 28, 'cpu', block.group_sizes, kernels))
    assert_paths_agree(block, torch.randn(1, dim, 7, 9))


@pytest.mark.parametrize('size', [(1, 1), (1, 2), (2, 5), (3, 3), (6, 1)])
def test_rolls_wrap_like_torch_roll_when_the_map_is_smaller_than_the_shift(size):
    torch.manual_seed(0)
    block = randomize(MSMLPBlock(96, MIX_SIZES[0]))
    assert_paths_agree(block, torch.randn(2, 96, *size))


@pytest.mark.parametrize('dim', [40, 21, 26])
@pytest.mark.parametrize('batch', [1, 2])
def test_channel_rows_with_and_without_a_narrower_last_group(dim, batch):
    """Rolls gather rows of ``group_sizes[0]`` channels: 40 channels split evenly (no junk
    channels), 21 leave one channel in the last group (four junk channels in its row), 26 two
    fewer; one run (batch 1) and kernel runs (batch 2); maps smaller than the shifts too."""
    torch.manual_seed(dim)
    block = randomize(MSMLPBlock(dim, MIX_SIZES[0]))
    for size in [(7, 9), (1, 2), (3, 3)]:
        assert_paths_agree(block, torch.randn(batch, dim, *size))


def test_wide_maps_take_the_library_weight_gradient_and_agree():
    # wider than TOEPLITZ_MAX_WIDTH: the 5x5 and 7x7 weight gradients come from oneDNN
    torch.manual_seed(0)
    block = randomize(MSMLPBlock(96, MIX_SIZES[0]))
    assert_paths_agree(block, torch.randn(1, 96, 5, mixing.TOEPLITZ_MAX_WIDTH + 3))


def test_model_at_an_odd_size_with_drop_path_and_chunked_mlp(monkeypatch):
    monkeypatch.setattr(mixing, 'MLP_CHUNK_BYTES', 1)  # the smallest chunks: many per block
    torch.manual_seed(0)
    model = randomize(MSMLP(num_classes=5, embed_dim=24, depths=(1, 2, 1, 1), drop_path_rate=0.3), seed=1)
    model.train()
    assert_paths_agree(model, torch.randn(3, 3, 61, 45))


def test_input_layout_does_not_matter():
    torch.manual_seed(0)
    block = randomize(MSMLPBlock(192, MIX_SIZES[1]))
    x = torch.randn(2, 192, 9, 11)
    with torch.no_grad():
        assert torch.equal(block(x), block(x.contiguous(memory_format=torch.channels_last)))


def test_frozen_mixer_passes_the_input_gradient_only():
    torch.manual_seed(0)
    block = randomize(MSMLPBlock(96, MIX_SIZES[0]))
    for p in block.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 96, 8, 8)
    grad = torch.randn(2, 96, 8, 8)
    ref = run(block, 'reference', x, grad)
    with without_cpu_kernel():
        operations = run(block, 'fast', x, grad)
    for fast in (run(block, 'fast', x, grad), operations):
        assert close(fast[1], ref[1])
        assert all(g is None for g in fast[2].values())


def test_token_mixer_alone_matches_reference():
    torch.manual_seed(0)
    block = randomize(MSMLPBlock(384, MIX_SIZES[2]))
    x = torch.randn(2, 384, 5, 6)
    with torch.no_grad():
        assert close(mixing.mix_fast(x, block), mixing.mix_reference(x, block))


@pytest.mark.parametrize('mix_impl', ['fast', 'reference'])
def test_released_checkpoint_loads_into_both_paths(mix_impl):
    data = REFERENCE['square_64']
    cfg = data['config']
    model = MSMLP(num_classes=cfg['num_classes'], embed_dim=cfg['embed_dim'], depths=cfg['depths'],
                  mix_impl=mix_impl)
    msmlp.load_pretrained(model, FIXTURES / 'released_layout_square_64.pth')
    with torch.no_grad():
        assert close(model.eval()(data['input']), data['logits'])


@pytest.mark.parametrize('case', sorted(REFERENCE))
def test_reference_weights_give_the_same_outputs_and_gradients_on_both_paths(case):
    data = REFERENCE[case]
    cfg = data['config']
    model = MSMLP(num_classes=cfg['num_classes'], embed_dim=cfg['embed_dim'], depths=cfg['depths'],
                  mix_sizes=cfg['mix_size'], shift_dist=cfg['shift_dist'])
    model.load_state_dict(data['state_dict'], strict=True)
    assert close(run_no_grad(model.eval(), 'fast', data['input']), data['logits'])
    assert_paths_agree(model, data['input'])


def test_compiled_fast_path_matches_eager():
    # compiled, the fast blocks trace the released operations in one graph; aot_eager keeps
    # the test fast (the inductor compile is in the slow test below)
    torch.manual_seed(0)
    model = randomize(MSMLP(num_classes=5, embed_dim=24, depths=(1, 1, 1, 1)))
    x = torch.randn(2, 3, 40, 56)
    grad = torch.randn(2, 5)
    eager = run(model, 'fast', x, grad)
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)
    out, x_grad, grads = run(compiled, 'fast', x, grad)
    assert close(out, eager[0]) and close(x_grad, eager[1])
    for (name, g), compiled_grad in zip(eager[2].items(), grads.values(), strict=True):
        assert close(compiled_grad, g), name


@pytest.mark.slow
def test_inductor_compiled_model_matches_reference():
    torch.manual_seed(0)
    model = randomize(MSMLP(num_classes=5, embed_dim=24, depths=(1, 1, 1, 1))).eval()
    x = torch.randn(2, 3, 40, 56)
    reference = run_no_grad(model, 'reference', x)
    compiled = torch.compile(model)
    assert close(run_no_grad(compiled, 'fast', x), reference)


def test_bf16_autocast_matches_fp32_within_bf16_precision():
    torch.manual_seed(0)
    model = randomize(MSMLP(num_classes=5, embed_dim=24, depths=(1, 1, 1, 1)), seed=2)
    x = torch.randn(2, 3, 40, 56)
    reference = run_no_grad(model, 'reference', x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        inference = run_no_grad(model, 'fast', x)
        model.zero_grad()
        use_path(model, 'fast')
        trained = model(x)
    trained.float().sum().backward()
    assert inference.dtype == torch.bfloat16
    assert close(inference, reference, tol=3e-2) and close(trained, reference, tol=3e-2)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason='torch built without oneDNN')
def test_the_fused_onednn_products_are_found_even_when_first_looked_for_under_autocast():
    mixing.fused_linear_available.cache_clear()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert mixing.fused_linear_available()


def test_triton_mix_impl_falls_back_to_the_fast_path_where_triton_cannot_run():
    """On the CPU without Triton's interpreter, mix_impl='triton' (and 'triton_norm') runs the
    fast path."""
    import os
    import subprocess
    import sys
    code = ('import torch, msmlp; from msmlp import mixing; torch.manual_seed(0); '
            'm = msmlp.MSMLP(num_classes=3, embed_dim=20, depths=(1, 1, 1, 1)).eval(); x = torch.randn(1, 3, 32, 32); '
            'fast = m(x); m.set_mix_impl("triton"); assert not mixing.triton_runs(x); '
            'assert torch.equal(m(x), fast); m.set_mix_impl("triton_norm"); assert torch.equal(m(x), fast)')
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    subprocess.run([sys.executable, '-c', code], check=True, env=env)


def test_the_default_mixer_is_triton_on_cuda_maps_and_fast_elsewhere(monkeypatch):
    """``mix_impl='auto'`` (the default) runs the Triton mixer on CUDA maps where triton runs and
    the map fits its 32-bit indexing; the fast path on the CPU, and where triton cannot run."""
    from types import SimpleNamespace
    model = msmlp.MSMLP(num_classes=3, embed_dim=20, depths=(1, 1, 1, 1)).eval()
    assert {b.mix_impl for b in model.modules() if hasattr(b, 'mix_impl')} == {'auto'}
    x = torch.randn(1, 3, 32, 32)
    assert mixing.auto_impl(x) == 'fast'
    auto = model(x)
    model.set_mix_impl('fast')
    assert torch.equal(model(x), auto)
    cuda_map = SimpleNamespace(is_cuda=True, shape=(128, 96, 56, 56))
    monkeypatch.setattr(mixing, 'triton_runs', lambda x: False)
    assert mixing.auto_impl(cuda_map) == 'fast'
    monkeypatch.setattr(mixing, 'triton_runs', lambda x: True)
    assert mixing.auto_impl(cuda_map) == 'triton'
    assert mixing.auto_impl(SimpleNamespace(is_cuda=True, shape=(1, 96, 5000, 5000))) == 'fast'  # 2.4e9 elements
    assert mixing.auto_impl(SimpleNamespace(is_cuda=False, shape=(128, 96, 56, 56))) == 'fast'

