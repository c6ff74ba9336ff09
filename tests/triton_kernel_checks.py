"""The Triton mixer computes the released token mixer: outputs and every gradient (input,
each group's weights and biases of both branches) agree with the released NCHW rolls and
convs, for unequal channel groups, odd maps, maps smaller than the kernel, shifts beyond the
map, batches of one and three; bf16 within its precision; compiled without graph breaks. The
mixer fused with the LayerNorm after it (``shift_mix_norm_triton``, ``mix_impl='triton_norm'``)
agrees with the released mixer followed by ``F.layer_norm``, the norm's gradients included.

On a machine without a GPU the kernels run on CPU tensors in Triton's interpreter (slow:
shapes are tiny). The interpreter must be on before anything imports triton, and torch.compile's
CPU backend leaves triton's interpreter unable to run kernels afterwards in the same process, so
the test suite runs this file in a process of its own (tests/test_triton_mix.py); on a GPU
machine run it directly: ``TRITON_INTERPRET=0 pytest tests/triton_kernel_checks.py``."""
import os

os.environ.setdefault('TRITON_INTERPRET', '1')  # before triton is imported

import warnings  # noqa: E402
from typing import List, Sequence, Tuple  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip('triton')

from msmlp import triton_mix  # noqa: E402
from msmlp.model import MSMLPBlock, channel_groups  # noqa: E402

if not triton_mix.available():
    pytest.skip('triton runs neither on a GPU nor in its interpreter here', allow_module_level=True)

DEVICE = 'cpu' if triton_mix.interpreted() else 'cuda'
SHIFTS = (-2, -1, 0, 1, 2)


def reference(x_nchw, w_lr, b_lr, w_td, b_td, shifts):
    """The released mixer (NCHW)."""
    groups = torch.chunk(x_nchw, len(shifts), dim=1)
    lr = [F.conv2d(torch.roll(t, s, dims=3), w, b, padding=w.shape[-1] // 2, groups=t.shape[1])
          for t, s, w, b in zip(groups, shifts, w_lr, b_lr)]
    td = [F.conv2d(torch.roll(t, s, dims=2), w, b, padding=w.shape[-1] // 2, groups=t.shape[1])
          for t, s, w, b in zip(groups, shifts, w_td, b_td)]
    return torch.cat(lr, 1) + torch.cat(td, 1)


def block_params(dim: int, kernels: Sequence[int], seed: int = 0) -> Tuple[MSMLPBlock, List[torch.Tensor]]:
    """A block with random mixer parameters and those parameters: lr weights, lr biases, td
    weights, td biases, each a list over groups."""
    block = MSMLPBlock(dim, kernels).to(DEVICE)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    params = [[getattr(conv, name) for conv in convs] for convs, name in
              ((block.dwconv_lr, 'weight'), (block.dwconv_lr, 'bias'),
               (block.dwconv_td, 'weight'), (block.dwconv_td, 'bias'))]
    return block, params


def norm_params(dim: int, seed: int = 5) -> List[torch.Tensor]:
    """A LayerNorm's random weight and bias."""
    generator = torch.Generator().manual_seed(seed)
    return [(1 + torch.randn(dim, generator=generator)).to(DEVICE).requires_grad_(),
            torch.randn(dim, generator=generator).to(DEVICE).requires_grad_()]


def flat(params: List[List[torch.Tensor]]) -> List[torch.Tensor]:
    return [t for group in params for t in group]


def close(ours: torch.Tensor, ref: torch.Tensor, tol: float) -> bool:
    """Agreement to ``tol`` relative to the reference's largest magnitude."""
    return (ours.float() - ref.float()).abs().max().item() <= tol * ref.abs().max().item()


def reference_run(x_nchw, params, shifts, grad_nchw):
    x = x_nchw.detach().float().requires_grad_()
    out = reference(x, *params, shifts)
    grads = torch.autograd.grad((out * grad_nchw.float()).sum(), [x] + flat(params))
    return out, grads


def triton_run(x_nchw, params, shifts, kernels, groups, grad_nchw):
    x = x_nchw.detach().permute(0, 2, 3, 1).contiguous().requires_grad_()
    out = triton_mix.shift_mix_triton(x, *params, shifts, kernels, groups)
    grads = torch.autograd.grad((out * grad_nchw.permute(0, 2, 3, 1).to(out.dtype)).sum(), [x] + flat(params))
    return out.permute(0, 3, 1, 2), (grads[0].permute(0, 3, 1, 2),) + grads[1:]


def assert_agree(ours, ref, tol: float) -> None:
    out, grads = ours
    ref_out, ref_grads = ref
    assert out.shape == ref_out.shape
    assert close(out, ref_out, tol)
    for i, (grad, ref_grad) in enumerate(zip(grads, ref_grads)):
        assert grad.shape == ref_grad.shape, i
        assert close(grad, ref_grad, tol), (i, (grad.float() - ref_grad).abs().max().item())


CASES = {  # dim, kernels, shifts, (N, H, W), weight-gradient programs
    '96ch-7x9': (96, (1, 1, 3, 5, 7), SHIFTS, (1, 7, 9), 512),
    '24ch-batch3-13x5': (24, (1, 3, 3, 5, 7), SHIFTS, (3, 13, 5), 512),
    '24ch-batch3-one-program': (24, (1, 3, 3, 5, 7), SHIFTS, (3, 13, 5), 1),
    '26ch-3x4-shifts-beyond-map': (26, (1, 7, 7, 7, 7), (-5, -1, 0, 3, 9), (1, 3, 4), 512),
}


@pytest.mark.parametrize('case', CASES.values(), ids=CASES.keys())
def test_matches_reference(case, monkeypatch):
    dim, kernels, shifts, (n, h, w), programs = case
    monkeypatch.setattr(triton_mix, 'WEIGHT_GRAD_PROGRAMS', programs)
    block, params = block_params(dim, kernels)
    groups = channel_groups(dim)
    assert tuple(groups) == block.group_sizes
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, dim, h, w, generator=generator).to(DEVICE)
    grad = torch.randn(n, dim, h, w, generator=generator).to(DEVICE)
    ref = reference_run(x, params, shifts, grad)
    if shifts == SHIFTS:
        assert torch.allclose(block.mix_released(x), ref[0], atol=1e-6)
    assert_agree(triton_run(x, params, shifts, kernels, groups, grad), ref, 1e-5)


def assert_case_agrees(case: str, seed: int) -> None:
    """``CASES[case]`` through the triton path agrees with the reference to 1e-5 (random input
    and output gradient from ``seed``)."""
    dim, kernels, shifts, (n, h, w), _ = CASES[case]
    _, params = block_params(dim, kernels)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, h, w, generator=generator).to(DEVICE)
    grad = torch.randn(n, dim, h, w, generator=generator).to(DEVICE)
    ours = triton_run(x, params, shifts, kernels, channel_groups(dim), grad)
    assert_agree(ours, reference_run(x, params, shifts, grad), 1e-5)


@pytest.mark.parametrize('tile', [(16, 8), (32, 16)], ids=['16x8', '32x16'])
def test_every_tile_matches_reference(tile, monkeypatch):
    """Channel blocks narrower than a group, blocks holding parts of two groups, pixel tiles
    smaller than the map (the GPU's tuned tiles; the interpreter otherwise runs the largest)."""
    if not triton_mix.interpreted():
        pytest.skip('on a GPU the autotuner chooses the tiles')
    monkeypatch.setattr(triton_mix, '_block_sizes', lambda pixels, channels: tile)
    assert_case_agrees('96ch-7x9', seed=3)


@pytest.mark.parametrize('columns', [1, 4])
def test_weight_gradient_of_one_tap_or_part_of_a_row_a_program(columns, monkeypatch):
    """Weight-gradient programs of one tap (the tuned tiles' COLUMNS 1) and of chunks of a row
    that end past it (4 taps: 7x7 kernels take two chunks, the second with a tap beyond the row);
    the other checks run whole rows (8)."""
    monkeypatch.setattr(triton_mix, 'INTERPRETER_COLUMNS', columns)
    assert_case_agrees('24ch-batch3-13x5', seed=4)


def test_bf16_within_its_precision():
    dim, kernels = 24, (1, 3, 3, 5, 7)
    block, params = block_params(dim, kernels)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, dim, 5, 6, generator=generator).to(DEVICE).bfloat16()
    grad = torch.randn(2, dim, 5, 6, generator=generator).to(DEVICE)
    ours = triton_run(x, params, SHIFTS, kernels, block.group_sizes, grad)
    assert ours[0].dtype == ours[1][0].dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in ours[1][1:])
    assert_agree(ours, reference_run(x, params, SHIFTS, grad), 2e-2)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        autocast = triton_mix.shift_mix_triton(x.permute(0, 2, 3, 1).contiguous(), *params, SHIFTS, kernels,
                                               block.group_sizes)
    assert torch.equal(autocast.permute(0, 3, 1, 2), ours[0].detach())


@pytest.mark.parametrize('with_norm', [False, True], ids=['mixer', 'mixer-and-norm'])
def test_compiles_without_graph_breaks(with_norm):
    dim, kernels = 24, (1, 3, 3, 5, 7)
    block, params = block_params(dim, kernels)
    norm = norm_params(dim) if with_norm else []
    x = torch.randn(1, 4, 5, dim, device=DEVICE)

    def mix(x_nhwc):
        if with_norm:
            return triton_mix.shift_mix_norm_triton(x_nhwc, *params, SHIFTS, kernels, block.group_sizes, *norm, 1e-6)
        return triton_mix.shift_mix_triton(x_nhwc, *params, SHIFTS, kernels, block.group_sizes)

    compiled = torch.compile(mix, backend='aot_eager', fullgraph=True)
    outs = []
    for fn in (mix, compiled):
        x_in = x.clone().requires_grad_()
        out = fn(x_in)
        grads = torch.autograd.grad(out.square().sum(), [x_in] + flat(params) + norm)
        outs.append((out, grads))
    assert_agree(outs[1], outs[0], 1e-6)


@pytest.mark.parametrize('with_norm', [False, True], ids=['mixer', 'mixer-and-norm'])
def test_operator_registrations(with_norm):
    kernels, groups = (1, 3, 3, 5, 7), channel_groups(24)
    _, params = block_params(24, kernels)
    weights = [w.detach().requires_grad_() for w in params[0] + params[2]]
    biases = [b.detach().requires_grad_() for b in params[1] + params[3]]
    x = torch.randn(1, 3, 4, 24, device=DEVICE, requires_grad=True)
    layout = (list(SHIFTS), list(kernels), list(groups))
    if with_norm:  # the norm's output in bf16 (autocast's) from an fp32 map, kept for a backward
        torch.library.opcheck(torch.ops.msmlp.shift_mix_norm_triton.default,
                              (x, weights, biases, *norm_params(24), 1e-6, torch.bfloat16, True, *layout))
    else:
        torch.library.opcheck(torch.ops.msmlp.shift_mix_triton.default, (x, weights, biases, *layout))


def test_rejects_a_layout_that_does_not_match():
    kernels = (1, 3, 3, 5, 7)
    block, params = block_params(24, kernels)
    with pytest.raises(ValueError, match='add up'):
        triton_mix.shift_mix_triton(torch.randn(1, 3, 3, 25, device=DEVICE), *params, SHIFTS, kernels,
                                    block.group_sizes)
    with pytest.raises(ValueError, match='weights'):
        triton_mix.shift_mix_triton(torch.randn(1, 3, 3, 24, device=DEVICE), *params, SHIFTS, (1, 3, 3, 5, 5),
                                    block.group_sizes)


def test_every_launch_runs_on_its_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: the forward, input-gradient and
    weight-gradient launches each make their tensors' device current."""
    devices = []
    guard = triton_mix._on_device
    monkeypatch.setattr(triton_mix, '_on_device', lambda device: devices.append(device) or guard(device))
    kernels = (1, 3, 3, 5, 7)
    block, params = block_params(24, kernels)
    x = torch.randn(1, 3, 4, 24, device=DEVICE, requires_grad=True)
    triton_mix.shift_mix_triton(x, *params, SHIFTS, kernels, block.group_sizes).sum().backward()
    assert devices == [x.device] * 3


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs two GPUs')
def test_tensors_on_a_second_gpu_mix_there():
    kernels = (1, 3, 3, 5, 7)
    block, params = block_params(24, kernels)
    block = block.to('cuda:1')
    params = [[t.detach().to('cuda:1').requires_grad_() for t in group] for group in params]
    x = torch.randn(2, 5, 7, 24, device='cuda:1', requires_grad=True)
    with torch.cuda.device(0):
        out = triton_mix.shift_mix_triton(x, *params, SHIFTS, kernels, block.group_sizes)
        out.square().sum().backward()
    expected = reference(x.detach().permute(0, 3, 1, 2), *params, SHIFTS).permute(0, 2, 3, 1)
    assert out.device == x.grad.device == torch.device('cuda:1')
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())


# ----- the mixer and the LayerNorm after it as one kernel -----------------------------------------
def reference_norm_run(x_nchw, params, norm, shifts, grad_nchw):
    x = x_nchw.detach().float().requires_grad_()
    mixed = reference(x, *params, shifts).permute(0, 2, 3, 1)
    out = F.layer_norm(mixed, mixed.shape[-1:], *norm, eps=1e-6)
    grads = torch.autograd.grad((out * grad_nchw.permute(0, 2, 3, 1).float()).sum(), [x] + flat(params) + norm)
    return out.permute(0, 3, 1, 2), grads


def triton_norm_run(x_nchw, params, norm, shifts, kernels, groups, grad_nchw, out_dtype=None):
    x = x_nchw.detach().permute(0, 2, 3, 1).contiguous().requires_grad_()
    out = triton_mix.shift_mix_norm_triton(x, *params, shifts, kernels, groups, *norm, 1e-6, out_dtype)
    grads = torch.autograd.grad((out * grad_nchw.permute(0, 2, 3, 1).to(out.dtype)).sum(), [x] + flat(params) + norm)
    return out.permute(0, 3, 1, 2), (grads[0].permute(0, 3, 1, 2),) + grads[1:]


def assert_norm_case_agrees(case: str, seed: int) -> None:
    dim, kernels, shifts, (n, h, w), _ = CASES[case]
    _, params = block_params(dim, kernels)
    norm = norm_params(dim)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, h, w, generator=generator).to(DEVICE)
    grad = torch.randn(n, dim, h, w, generator=generator).to(DEVICE)
    ours = triton_norm_run(x, params, norm, shifts, kernels, channel_groups(dim), grad)
    assert_agree(ours, reference_norm_run(x, params, norm, shifts, grad), 1e-5)
    with torch.no_grad():  # nothing kept for a backward: normalised in the mixer's buffer
        inference = triton_mix.shift_mix_norm_triton(x.permute(0, 2, 3, 1).contiguous(), *params, shifts, kernels,
                                                     channel_groups(dim), *norm, 1e-6)
    assert torch.equal(inference.permute(0, 3, 1, 2), ours[0])


@pytest.mark.parametrize('case', [name for name in CASES if name != '24ch-batch3-one-program'])
def test_mixer_and_norm_match_reference(case):
    """The LayerNorm of the released mixer, and every gradient (input, the groups' kernels and
    biases, the norm's weight and bias), to 1e-5."""
    assert_norm_case_agrees(case, seed=6)


def test_mixer_and_norm_at_a_narrow_tile(monkeypatch):
    """Blocks of 8 channels (a group of 20 takes three, the last shared with the next group)
    and pixel tiles of 16 (the 63-pixel map's last one partly outside it). The tile is the
    fused forward's alone (its backward is the mixer's kernels, checked above), so the outputs,
    kept for a backward or not, are what is checked."""
    if not triton_mix.interpreted():
        pytest.skip('on a GPU the autotuner chooses the tiles')
    monkeypatch.setattr(triton_mix, '_block_sizes', lambda pixels, channels: (16, 8))
    dim, kernels, shifts, (n, h, w), _ = CASES['96ch-7x9']
    _, params = block_params(dim, kernels)
    norm = norm_params(dim)
    x = torch.randn(n, dim, h, w, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    expected = F.layer_norm(reference(x, *params, shifts).permute(0, 2, 3, 1), (dim,), *norm, eps=1e-6)
    x_nhwc = x.permute(0, 2, 3, 1).contiguous()
    kept = triton_mix.shift_mix_norm_triton(x_nhwc.requires_grad_(), *params, shifts, kernels, channel_groups(dim),
                                            *norm, 1e-6)
    with torch.no_grad():
        inference = triton_mix.shift_mix_norm_triton(x_nhwc, *params, shifts, kernels, channel_groups(dim), *norm, 1e-6)
    assert close(kept, expected, 1e-5) and torch.equal(inference, kept)


def test_mixer_and_norm_in_bf16_and_under_autocast():
    """bf16 in, bf16 out within its precision; under autocast the first stage's fp32 map gives
    the bf16 the next linear layer takes, equal to a separate fp32 norm's output cast to bf16."""
    dim, kernels = 24, (1, 3, 3, 5, 7)
    block, params = block_params(dim, kernels)
    norm = norm_params(dim)
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(2, dim, 5, 6, generator=generator).to(DEVICE)
    grad = torch.randn(2, dim, 5, 6, generator=generator).to(DEVICE)
    ref = reference_norm_run(x, params, norm, SHIFTS, grad)
    ours = triton_norm_run(x.bfloat16(), params, norm, SHIFTS, kernels, block.group_sizes, grad)
    assert ours[0].dtype == ours[1][0].dtype == torch.bfloat16
    assert_agree(ours, ref, 3e-2)
    mixed = triton_mix.shift_mix_triton(x.permute(0, 2, 3, 1).contiguous(), *params, SHIFTS, kernels, block.group_sizes)
    separate = F.layer_norm(mixed, (dim,), *norm, eps=1e-6).bfloat16()
    fused = triton_norm_run(x, params, norm, SHIFTS, kernels, block.group_sizes, grad, torch.bfloat16)
    assert fused[0].dtype == torch.bfloat16 and fused[1][0].dtype == torch.float32
    assert close(fused[0].permute(0, 2, 3, 1), separate, 1e-2)
    assert_agree(fused, ref, 3e-2)


def test_mixer_and_norm_rejects_a_norm_of_other_channels():
    kernels = (1, 3, 3, 5, 7)
    block, params = block_params(24, kernels)
    with pytest.raises(ValueError, match=r'\(24,\)'):
        triton_mix.shift_mix_norm_triton(torch.randn(1, 3, 3, 24, device=DEVICE), *params, SHIFTS, kernels,
                                         block.group_sizes, *norm_params(20), 1e-6)


# ----- the model with mix_impl='triton' --------------------------------------------------------
def count_calls(monkeypatch, names: Sequence[str]) -> List[str]:
    """The calls of ``triton_mix``'s functions ``names``, by name, in order (mix_impl='triton'
    falls back to the fast path silently)."""
    calls = []
    for name in names:
        def counted(*args, _name=name, _function=getattr(triton_mix, name), **kwargs):
            calls.append(_name)
            return _function(*args, **kwargs)
        monkeypatch.setattr(triton_mix, name, counted)
    return calls


@pytest.fixture
def triton_launches(monkeypatch):
    """The Triton mixer's calls, by function."""
    return count_calls(monkeypatch, ('shift_mix_triton', 'shift_mix_norm_triton'))


def trained(model, impl: str, x: torch.Tensor, compiled: bool = False):
    """``model``'s output on ``x`` and its parameters' gradients of ``out.square().sum()`` on
    mix path ``impl``, compiled by inductor as one graph where ``compiled``."""
    model.zero_grad()
    model.set_mix_impl(impl)
    out = (torch.compile(model, fullgraph=True) if compiled else model)(x)
    out.square().sum().backward()
    if compiled:
        torch._dynamo.reset()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same_grads(grads, expected_grads, label: str) -> None:
    for name, expected in expected_grads.items():
        assert torch.allclose(grads[name], expected, rtol=1e-4, atol=1e-5 * expected.abs().max()), (label, name)


IMPLS = {'triton': 'shift_mix_triton', 'triton_norm': 'shift_mix_norm_triton'}


@pytest.mark.parametrize('impl', IMPLS)
def test_a_released_checkpoint_gives_the_released_logits_through_the_triton_mixer(impl, triton_launches):
    from pathlib import Path
    from msmlp import MSMLP
    reference_cases = torch.load(Path(__file__).parent / 'fixtures' / 'msmlp_reference.pt', weights_only=True)
    case = reference_cases['wide_64x96']
    cfg = case['config']
    model = MSMLP(num_classes=cfg['num_classes'], embed_dim=cfg['embed_dim'], depths=cfg['depths'],
                  mix_sizes=cfg['mix_size'], shift_dist=cfg['shift_dist'], mix_impl=impl)
    model.load_state_dict(case['state_dict'])
    with torch.no_grad():
        logits = model.eval().to(DEVICE)(case['input'].to(DEVICE)).cpu()
    assert (logits - case['logits']).abs().max() <= 1e-5
    assert triton_launches == [IMPLS[impl]] * sum(cfg['depths'])


@pytest.mark.parametrize('impl', IMPLS)
def test_triton_blocks_train_as_the_reference_blocks(impl, triton_launches):
    from msmlp import MSMLP
    torch.manual_seed(0)
    model = MSMLP(num_classes=3, embed_dim=20, depths=(1, 1, 1, 1), drop_path_rate=0.).to(DEVICE)
    x = torch.randn(2, 3, 40, 56, device=DEVICE)
    _, expected_grads = trained(model, 'reference', x)
    _, grads = trained(model, impl, x)
    assert triton_launches == [IMPLS[impl]] * 4  # one block per stage, in the triton pass only
    assert_same_grads(grads, expected_grads, impl)


@pytest.mark.parametrize('impl', IMPLS)
def test_compiled_model_keeps_the_triton_op(impl):
    from msmlp import MSMLP
    model = MSMLP(num_classes=3, embed_dim=20, depths=(1, 1, 1, 1), mix_impl=impl).eval().to(DEVICE)
    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        expected = model(x)
        out = torch.compile(model, backend=backend, fullgraph=True)(x)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)
    targets = {str(n.target) for g in graphs for n in g.graph.nodes}
    assert any(IMPLS[impl] in t for t in targets)
    assert not [str(w.message) for w in caught if 'Dynamo' in str(w.message)]  # e.g. on a cached call it traced


def test_inductor_compiles_the_triton_blocks_to_the_reference_outputs_and_gradients(monkeypatch):
    """torch.compile's default backend (inductor) over both Triton mixers, training. On the CPU
    inductor builds C++ for each graph (1.5 to 3 min here), so the suite runs this with the slow tests
    (tests/test_triton_mix.py); triton is imported in the interpreter before, so later kernels run."""
    from msmlp import MSMLP
    torch.manual_seed(0)
    x = torch.randn(2, 3, 40, 56, device=DEVICE)
    model = MSMLP(num_classes=3, embed_dim=20, depths=(1, 1, 1, 1), drop_path_rate=0.).to(DEVICE)
    launches = count_calls(monkeypatch, ('_launch_mix', '_launch_mix_norm'))  # what the compiled code runs
    expected, expected_grads = trained(model, 'reference', x)
    results = {impl: trained(model, impl, x, compiled=True) for impl in IMPLS}
    # the four blocks' forward launches, then their input gradients' (a mix by the adjoint kernel)
    assert launches == ['_launch_mix'] * 8 + ['_launch_mix_norm'] * 4 + ['_launch_mix'] * 4, ' '.join(launches)
    for impl, (out, grads) in results.items():
        assert torch.allclose(out, expected, rtol=1e-4, atol=1e-5), impl
        assert_same_grads(grads, expected_grads, impl)
