"""The Triton mixer's kernels compile for the GPUs they are meant for, without a GPU: triton
compiles ahead of time for a named target (Hopper sm_90, Ampere sm_80) down to a cubin with
its bundled ptxas, whose report gives registers and spills (the size of the PTX tells whether
the tap loop was unrolled). Triton's interpreter
(tests/triton_kernel_checks.py) checks what the kernels compute but accepts code the GPU
compiler rejects (a constexpr reassigned in an unrolled loop did), and it cannot tell how
large the compiled code is (fully unrolled, the mixer kernel took 11 minutes to compile).

``python tests/test_triton_compile.py`` prints every tuned tile's registers, spills and
tap-loop instructions (the figures in docs/speed.md)."""
import os
import re
import subprocess
import tempfile

import pytest

triton = pytest.importorskip('triton')
if os.environ.get('TRITON_INTERPRET', '0') == '1':
    pytest.skip('the interpreter is on: triton does not compile kernels', allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from msmlp import triton_mix  # noqa: E402

HOPPER, AMPERE = GPUTarget('cuda', 90, 32), GPUTarget('cuda', 80, 32)
NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin')
PTXAS, NVDISASM = os.path.join(NVIDIA_BIN, 'ptxas'), os.path.join(NVIDIA_BIN, 'nvdisasm')
RADIUS = triton_mix.MAX_KERNEL // 2  # every variant's largest kernel is 7x7


ALIGNED = [['tt.divisibility', 16]]  # as triton specialises a launch: 16-byte aligned pointers, C % 16 == 0


def source(kernel, signature: dict, constants: dict, aligned) -> ASTSource:
    """``kernel`` as launched on a real map (every variant's widths are multiples of 16)."""
    attrs = {(kernel.arg_names.index(name),): ALIGNED for name in aligned}
    return ASTSource(fn=kernel, signature={**signature, **dict.fromkeys(constants, 'constexpr')}, constexprs=constants,
                     attrs=attrs)


def mix_source(dtype: str, adjoint: bool, block_p: int, block_c: int) -> ASTSource:
    pointers = dict(src_ptr=f'*{dtype}', weight_ptr='*fp32', bias_ptr='*fp32', group_ptr='*i32', out_ptr=f'*{dtype}')
    constants = dict(RADIUS=RADIUS, ADJOINT=adjoint, HAS_BIAS=not adjoint, BLOCK_P=block_p, BLOCK_C=block_c)
    return source(triton_mix._mix_kernel, {**pointers, **dict.fromkeys(['N', 'H', 'W', 'C', 'span'], 'i32')}, constants,
                  list(pointers) + ['C'])


def mix_norm_source(dtype: str, block_p: int, block_c: int, out_dtype: str = None, save_stats: bool = True) -> ASTSource:
    """The mixer fused with the LayerNorm: ``out_dtype`` bf16 and ``dtype`` fp32 is the first stage
    under bf16 autocast (its residual stream is fp32)."""
    pointers = dict(src_ptr=f'*{dtype}', weight_ptr='*fp32', bias_ptr='*fp32', group_ptr='*i32',
                    norm_weight_ptr='*fp32', norm_bias_ptr='*fp32', mixed_ptr=f'*{dtype}',
                    out_ptr=f'*{out_dtype or dtype}', mean_ptr='*fp32', rstd_ptr='*fp32')
    sizes = {**dict.fromkeys(['N', 'H', 'W', 'C', 'G'], 'i32'), 'eps': 'fp32'}
    return source(triton_mix._mix_norm_kernel, {**pointers, **sizes},
                  dict(RADIUS=RADIUS, SAVE_STATS=save_stats, BLOCK_P=block_p, BLOCK_C=block_c), list(pointers) + ['C'])


def weight_grad_source(dtype: str, block_p: int, block_c: int, columns: int) -> ASTSource:
    pointers = dict(x_ptr=f'*{dtype}', grad_ptr=f'*{dtype}', group_ptr='*i32', partial_ptr='*fp32')
    sizes = {**dict.fromkeys(['N', 'H', 'W', 'C', 'span', 'pixels_per_program'], 'i32'),
             'h_magic': 'i64', 'h_shift': 'i32', 'w_magic': 'i64', 'w_shift': 'i32'}
    return source(triton_mix._weight_grad_kernel, {**pointers, **sizes},
                  dict(RADIUS=RADIUS, COLUMNS=columns, BLOCK_P=block_p, BLOCK_C=block_c),
                  list(pointers) + ['C', 'pixels_per_program'])


# The tap loop compiled as a loop: 50-120 KiB of PTX for 7x7 kernels. Unrolled, the PTX grows
# with the taps (measured at 64x64 on 8 warps: 187 KiB for 3x3, 446 KiB for 5x5, 24 s to compile).
MAX_PTX_BYTES = 256 * 1024


def compiled(source: ASTSource, num_warps: int, target: GPUTarget = HOPPER):
    """``source`` compiled to a cubin for ``target`` (its PTX and cubin in ``.asm``)."""
    return triton.compile(source, target=target, options=dict(num_warps=num_warps))


def registers_and_spills(kernel, target: GPUTarget = HOPPER):
    """ptxas' report of a compiled kernel: (registers, spilled bytes); (None, None) without ptxas."""
    assert kernel.asm['cubin'], 'no cubin'
    assert len(kernel.asm['ptx']) < MAX_PTX_BYTES, f'{len(kernel.asm["ptx"]) // 1024} KiB of PTX: unrolled?'
    if not os.access(PTXAS, os.X_OK):
        return None, None
    with tempfile.TemporaryDirectory() as folder:
        ptx = os.path.join(folder, 'kernel.ptx')
        with open(ptx, 'w') as f:
            f.write(kernel.asm['ptx'])
        arch = f'sm_{target.arch}' + ('a' if target.arch == 90 else '')
        report = subprocess.run([PTXAS, '-v', f'--gpu-name={arch}', ptx, '-o', os.devnull],
                                capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r'Used (\d+) registers', report).group(1))
    spilled = sum(int(n) for n in re.findall(r'(\d+) bytes spill (?:stores|loads)', report))
    return registers, spilled


def spills_in_tap_loop(kernel) -> int:
    """Local-memory loads and stores (spills) among the tap loop's instructions."""
    return sum(bool(re.search(r'\b(?:STL|LDL)\b', line)) for line in innermost_loop(kernel))


def assert_fits(source, target, num_warps):
    """Within the register file, and the tap loop free of spills (ptxas may keep a few values of
    the outer loops in local memory, read once a row of taps)."""
    kernel = compiled(source, num_warps, target)
    registers, spilled = registers_and_spills(kernel, target)
    if registers is not None:
        assert registers <= 255, f'{registers} registers'
        if spilled and os.access(NVDISASM, os.X_OK):
            assert spills_in_tap_loop(kernel) == 0, f'{spilled} bytes spilled, some in the tap loop'
        else:
            assert spilled == 0, f'{spilled} bytes spilled'


@pytest.mark.parametrize('block_p,block_c,num_warps', triton_mix.MIX_CONFIGS)
@pytest.mark.parametrize('adjoint', [False, True], ids=['forward', 'input-grad'])
def test_every_tuned_tile_of_the_mixer_compiles_for_hopper_without_spills(adjoint, block_p, block_c, num_warps):
    assert_fits(mix_source('bf16', adjoint, block_p, block_c), HOPPER, num_warps)


@pytest.mark.parametrize('block_p,block_c,num_warps', triton_mix.MIX_CONFIGS)
@pytest.mark.parametrize('dtype', ['fp32', 'fp16'])
def test_every_tuned_tile_of_the_mixer_compiles_in_fp32_and_fp16(dtype, block_p, block_c, num_warps):
    for adjoint in (False, True):
        assert_fits(mix_source(dtype, adjoint, block_p, block_c), HOPPER, num_warps)


@pytest.mark.parametrize('block_p,block_c,columns,num_warps', triton_mix.WEIGHT_GRAD_CONFIGS)
@pytest.mark.parametrize('dtype', ['bf16', 'fp32', 'fp16'])
def test_every_tuned_tile_of_the_weight_gradient_compiles_for_hopper_without_spills(dtype, block_p, block_c,
                                                                                     columns, num_warps):
    assert_fits(weight_grad_source(dtype, block_p, block_c, columns), HOPPER, num_warps)


@pytest.mark.parametrize('block_p,block_c,num_warps', triton_mix.MIX_NORM_CONFIGS)
@pytest.mark.parametrize('dtype,out_dtype,save_stats', [('bf16', 'bf16', True), ('fp32', 'bf16', False),
                                                        ('fp32', 'fp32', False)])
def test_every_tuned_tile_of_the_mixer_with_its_norm_compiles_for_hopper_without_spills(
        dtype, out_dtype, save_stats, block_p, block_c, num_warps):
    assert_fits(mix_norm_source(dtype, block_p, block_c, out_dtype, save_stats), HOPPER, num_warps)


def test_every_kernel_compiles_for_ampere():
    block_p, block_c, num_warps = triton_mix.MIX_CONFIGS[1]
    for adjoint in (False, True):
        assert_fits(mix_source('bf16', adjoint, block_p, block_c), AMPERE, num_warps)
    for block_p, block_c, columns, num_warps in triton_mix.WEIGHT_GRAD_CONFIGS[::3]:  # one tap, a row of taps
        assert_fits(weight_grad_source('bf16', block_p, block_c, columns), AMPERE, num_warps)
    block_p, block_c, num_warps = triton_mix.MIX_NORM_CONFIGS[0]
    assert_fits(mix_norm_source('bf16', block_p, block_c), AMPERE, num_warps)


def test_a_spilling_tile_is_caught():
    """The check above can fail: a 128x64 tile on 2 warps (128 values a thread) spills."""
    kernel = compiled(mix_source('bf16', True, 128, 64), 2)
    registers, spilled = registers_and_spills(kernel)
    if registers is None:
        pytest.skip('triton ships no ptxas here')
    assert spilled > 0 and spills_in_tap_loop(kernel) > 0


def innermost_loop(kernel) -> list:
    """The instructions of the shortest loop that stores nothing (a branch back to an earlier
    label; the branch to itself that ends every kernel is not one) in a kernel's SASS: the tap
    loop (the fused norm's loop over its channels, shorter, stores them)."""
    with tempfile.TemporaryDirectory() as folder:
        cubin = os.path.join(folder, 'kernel.cubin')
        with open(cubin, 'wb') as f:
            f.write(kernel.asm['cubin'])
        text = subprocess.run([NVDISASM, '-c', cubin], capture_output=True, text=True, check=True).stdout
    labels, pending, instructions = {}, [], []
    for line in text.splitlines():
        label = re.match(r'(\.L_x_\d+):', line)
        pending += [label.group(1)] if label else []
        address = re.match(r'\s*/\*([0-9a-f]{4,})\*/', line)
        if address:
            labels.update(dict.fromkeys(pending, len(instructions)))
            pending = []
            instructions.append(line)
    loops = [instructions[labels[target.group(1)]:i + 1] for i, line in enumerate(instructions)
             for target in [re.search(r'BRA\s+`\((\.L_x_\d+)\)', line)] if target and labels[target.group(1)] < i]
    loops = [loop for loop in loops if not any(re.search(r'\bSTG\b', line) for line in loop)]
    assert loops, 'no loop without stores in the SASS'
    return min(loops, key=len)


def instructions_per_element(loop: list, block_p: int, block_c: int, num_warps: int) -> float:
    """A loop's instructions shared by the elements of the tile each thread holds."""
    return len(loop) / (block_p * block_c / (32 * num_warps))


@pytest.mark.skipif(not os.access(NVDISASM, os.X_OK), reason='triton ships no nvdisasm here')
@pytest.mark.parametrize('kernel', ['forward', 'input-grad', 'weight-grad-tap', 'weight-grad-row', 'forward-norm'])
def test_a_tap_costs_few_instructions_and_reads_whole_vectors(kernel):
    """Per tap, an element costs two multiply-adds, a bf16 conversion per branch and its share of
    16-byte loads and of the tap's pixel arithmetic. Measured on sm_90 in bf16 (64x64 tile on 8
    warps; the weight gradient 64x32 on 4 one tap a program, 8x32x8 on 4 a row of taps; triton
    3.8): 9.2 instructions an element in the forward, 8.6 in the input gradient, 15.8 and 12.5 in
    the weight gradient; 11.8, 10.9 and 16.7 while every tap recomputed its row, and 49, 45 and
    51-63 when every tap's source was computed per pixel and channel. The forward fused with the
    LayerNorm runs the forward's tap loop: 9.6 at 64x32 on 4 warps (the forward alone: 9.4)."""
    if kernel.startswith('weight-grad'):
        tile = triton_mix.WEIGHT_GRAD_CONFIGS[0 if kernel == 'weight-grad-tap' else 3]
        block_p, block_c, columns, num_warps = tile
        limit = 18 if columns == 1 else 16
        loop = innermost_loop(compiled(weight_grad_source('bf16', block_p, block_c, columns), num_warps))
        block_p *= columns  # a pass of the loop takes a row of taps
    elif kernel == 'forward-norm':  # the same tap loop, inside the loop over the groups (64x32 on 4 warps)
        (block_p, block_c, num_warps), limit = max(triton_mix.MIX_NORM_CONFIGS, key=lambda t: t[0] * t[1] / t[2]), 11
        loop = innermost_loop(compiled(mix_norm_source('bf16', block_p, block_c), num_warps))
    else:
        (block_p, block_c, num_warps), limit = triton_mix.MIX_CONFIGS[0], 11
        loop = innermost_loop(compiled(mix_source('bf16', kernel == 'input-grad', block_p, block_c), num_warps))
    per_element = instructions_per_element(loop, block_p, block_c, num_warps)
    assert per_element <= limit, f'{per_element:.1f} instructions an element per tap'
    assert any('LDG.E.128' in line for line in loop), 'no 16-byte load in the tap loop'


def tile_report() -> None:
    """Each tuned tile's ptxas report and tap-loop cost on sm_90 (``python tests/test_triton_compile.py``)."""
    print('| kernel | dtype | tile (pixels x channels [x taps], warps) | registers | spilled bytes '
          '| instructions an element per tap |')
    print('|---|---|---|---|---|---|')
    rows = [(name, dtype, tile, make(dtype, tile)) for dtype in ('bf16', 'fp32') for tile in triton_mix.MIX_CONFIGS
            for name, make in (('forward', lambda d, t: mix_source(d, False, t[0], t[1])),
                               ('input gradient', lambda d, t: mix_source(d, True, t[0], t[1])))]
    rows += [('weight gradient', dtype, tile, weight_grad_source(dtype, *tile[:3]))
             for dtype in ('bf16', 'fp32') for tile in triton_mix.WEIGHT_GRAD_CONFIGS]
    rows += [('forward and LayerNorm', dtype, tile, mix_norm_source(dtype, tile[0], tile[1], 'bf16'))
             for dtype in ('bf16', 'fp32') for tile in triton_mix.MIX_NORM_CONFIGS]
    for name, dtype, tile, source_ in rows:
        block_p, block_c, *columns, warps = tile
        taps = columns[0] if columns else 1
        kernel = compiled(source_, warps)
        registers, spilled = registers_and_spills(kernel)
        per_element = instructions_per_element(innermost_loop(kernel), block_p * taps, block_c, warps)
        shape = 'x'.join(map(str, [block_p, block_c] + columns))
        print(f'| {name} | {dtype} | {shape}, {warps} | {registers} | {spilled} | {per_element:.1f} |')


if __name__ == '__main__':
    tile_report()
