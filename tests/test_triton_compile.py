"""The Triton mixer's kernels compile for the GPUs they are meant for, without a GPU: triton
compiles ahead of time for a named target (Hopper sm_90, Ampere sm_80) down to a cubin with
its bundled ptxas, whose report gives registers and spills (the size of the PTX tells whether
the tap loop was unrolled). Triton's interpreter
(tests/triton_kernel_checks.py) checks what the kernels compute but accepts code the GPU
compiler rejects (a constexpr reassigned in an unrolled loop did), and it cannot tell how
large the compiled code is (fully unrolled, the mixer kernel took 11 minutes to compile)."""
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
PTXAS = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'ptxas')
RADIUS = triton_mix.MAX_KERNEL // 2  # every variant's largest kernel is 7x7


def mix_source(dtype: str, adjoint: bool, block_p: int, block_c: int) -> ASTSource:
    signature = dict(src_ptr=f'*{dtype}', weight_ptr='*fp32', bias_ptr='*fp32', shift_ptr='*i32', radius_ptr='*i32',
                     out_ptr=f'*{dtype}', H='i32', W='i32', C='i32')
    constants = dict(RADIUS=RADIUS, ADJOINT=adjoint, HAS_BIAS=not adjoint, BLOCK_P=block_p, BLOCK_C=block_c)
    return ASTSource(fn=triton_mix._mix_kernel, signature={**signature, **dict.fromkeys(constants, 'constexpr')},
                     constexprs=constants)


def weight_grad_source(dtype: str) -> ASTSource:
    signature = dict(x_ptr=f'*{dtype}', grad_ptr=f'*{dtype}', shift_ptr='*i32', radius_ptr='*i32', partial_ptr='*fp32',
                     N='i32', H='i32', W='i32', C='i32', pixels_per_program='i32')
    block_p, block_c = triton_mix._block_sizes(2 ** 20, 1024, max_channels=32)  # as launched on real maps
    constants = dict(RADIUS=RADIUS, TAPS=triton.next_power_of_2((2 * RADIUS + 1) ** 2), BLOCK_P=block_p,
                     BLOCK_C=block_c)
    return ASTSource(fn=triton_mix._weight_grad_kernel,
                     signature={**signature, **dict.fromkeys(constants, 'constexpr')}, constexprs=constants)


# The tap loop compiled as a loop: 50-120 KiB of PTX for 7x7 kernels. Unrolled, the PTX grows
# with the taps (measured at 64x64 on 8 warps: 187 KiB for 3x3, 446 KiB for 5x5, 24 s to compile).
MAX_PTX_BYTES = 256 * 1024


def compiled_registers_and_spills(source: ASTSource, target: GPUTarget, num_warps: int):
    """Compile to a cubin for ``target``; ptxas' report of the kernel: (registers, spilled bytes)."""
    kernel = triton.compile(source, target=target, options=dict(num_warps=num_warps))
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


def assert_fits(source, target, num_warps):
    registers, spilled = compiled_registers_and_spills(source, target, num_warps)
    if registers is not None:
        assert spilled == 0 and registers <= 255, f'{registers} registers, {spilled} bytes spilled'


@pytest.mark.parametrize('block_p,block_c,num_warps', triton_mix.MIX_CONFIGS)
@pytest.mark.parametrize('adjoint', [False, True], ids=['forward', 'input-grad'])
def test_every_tuned_tile_of_the_mixer_compiles_for_hopper_without_spills(adjoint, block_p, block_c, num_warps):
    assert_fits(mix_source('bf16', adjoint, block_p, block_c), HOPPER, num_warps)


@pytest.mark.parametrize('dtype', ['fp32', 'fp16'])
def test_the_mixer_compiles_in_fp32_and_fp16(dtype):
    block_p, block_c, num_warps = triton_mix.MIX_CONFIGS[0]
    for adjoint in (False, True):
        assert_fits(mix_source(dtype, adjoint, block_p, block_c), HOPPER, num_warps)


@pytest.mark.parametrize('dtype', ['bf16', 'fp32', 'fp16'])
def test_the_weight_gradient_compiles_for_hopper_without_spills(dtype):
    assert_fits(weight_grad_source(dtype), HOPPER, triton_mix.WEIGHT_GRAD_WARPS)


def test_every_kernel_compiles_for_ampere():
    block_p, block_c, num_warps = triton_mix.MIX_CONFIGS[1]
    for adjoint in (False, True):
        assert_fits(mix_source('bf16', adjoint, block_p, block_c), AMPERE, num_warps)
    assert_fits(weight_grad_source('bf16'), AMPERE, triton_mix.WEIGHT_GRAD_WARPS)


def test_a_spilling_tile_is_caught():
    """The check above can fail: a 64x64 tile on 4 warps (32 values a thread) spills."""
    registers, spilled = compiled_registers_and_spills(mix_source('bf16', True, 64, 64), HOPPER, 4)
    if registers is None:
        pytest.skip('triton ships no ptxas here')
    assert spilled > 0
