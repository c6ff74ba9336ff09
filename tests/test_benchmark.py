"""``msmlp benchmark`` runs and prints its table (no timing assertions: the benchmark
reports speed, the tests check that it measures what it says)."""
import pytest
import timm
import torch

from msmlp import benchmark

TINY = ['--batch-size', '1', '--img-size', '32', '--runs', '1', '--warmup', '0', '--threads', '1']


def table_rows(output: str):
    lines = [line for line in output.splitlines() if line.startswith('|')]
    header = [cell.strip() for cell in lines[0].strip('|').split('|')]
    rows = [[cell.strip() for cell in line.strip('|').split('|')] for line in lines[2:]]
    return header, {row[0]: dict(zip(header, row)) for row in rows}


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_inference_table_has_every_column_and_the_ratios(capsys):
    assert benchmark.main(['--model', 'msmlp_tiny', '--compare', 'convnext_tiny', *TINY]) == 0
    out = capsys.readouterr().out
    header, rows = table_rows(out)
    assert header == ['model', 'params (M)', 'GMACs', 'images/s', 'peak memory (MiB)',
                      'x msmlp_tiny (reference)', 'x convnext_tiny']
    assert list(rows) == ['msmlp_tiny (fast)', 'msmlp_tiny (reference)', 'convnext_tiny']
    fast, reference = rows['msmlp_tiny (fast)'], rows['msmlp_tiny (reference)']
    assert fast['params (M)'] == reference['params (M)'] == '28.66'
    assert float(fast['GMACs']) == pytest.approx(4.44 * (32 / 224) ** 2, abs=0.01)
    assert reference['x msmlp_tiny (reference)'] == '1.00' and rows['convnext_tiny']['x convnext_tiny'] == '1.00'
    assert float(fast['images/s']) > 0 and float(fast['peak memory (MiB)']) > 100  # the weights alone: 109 MiB
    assert 'inference, classifier, batch 1 at 32x32, fp32, eager' in out
    assert 'the fast path executes' not in out  # the CPU kernel runs each group at its own kernel size


def test_training_step_and_prefix_names(capsys):
    assert benchmark.main(['--model', 'msmlp_tiny', '--train', '--no-memory', '--compare', 'swin_tiny', *TINY]) == 0
    out = capsys.readouterr().out
    _, rows = table_rows(out)
    assert 'training step (forward, backward, AdamW)' in out
    assert 'the fast path executes' not in out  # the CPU kernel trains each group at its own kernel size
    assert 'swin_tiny_patch4_window7_224' in rows  # the prefix resolved to a timm model
    assert rows['msmlp_tiny (fast)']['peak memory (MiB)'] == '-'


def test_backbone_features_at_a_detection_shape_in_bf16(capsys, tmp_path):
    output = tmp_path / 'table.md'
    argv = ['--model', 'msmlp_tiny', '--features-only', '--precision', 'bf16', '--no-reference',
            '--output', str(output), *TINY[:2], '--img-size', '40x56', *TINY[4:]]
    assert benchmark.main(argv) == 0
    out = capsys.readouterr().out
    header, rows = table_rows(out)
    assert 'backbone features (4 stages), batch 1 at 40x56, bf16' in out
    assert 'CPU mixer kernel off (bf16: it runs float32)' in out or 'CPU mixer kernel off (not built)' in out
    assert list(rows) == ['msmlp_tiny (fast)'] and header[-1] == 'peak memory (MiB)'
    assert output.read_text().strip() == out.strip()


def test_peak_memory_is_measured_on_the_path_it_names(monkeypatch):
    """The memory tracker is a dispatch mode, under which the model runs the released operations by
    default (FLOP counting); the fast row's peak is measured on the fast path's own operations."""
    from msmlp import cpu_kernel
    calls = []
    kernel = cpu_kernel.shift_mix
    monkeypatch.setattr(cpu_kernel, 'shift_mix', lambda *args: calls.append(1) or kernel(*args))
    args = benchmark.parse_args(['--batch-size', '1', '--img-size', '256', '--features-only', '--threads', '1'])
    fast, reference = benchmark.build_rows(args)[:2]
    device = torch.device('cpu')
    peaks = [benchmark.measure_peak_mb(benchmark.make_step(row.model, args, device), device) for row in (fast, reference)]
    assert calls  # the fast path ran under the tracker
    assert peaks[0] < peaks[1]  # its mixer keeps no rolled copies of the map


def test_features_only_times_every_level_of_the_compared_backbone():
    """A ResNet has five feature levels: its features_only model was cut after four (layer4
    dropped: 2.8M of resnet18's 11.2M parameters), so the ratio compared against part of it."""
    args = benchmark.parse_args(['--features-only'])
    resnet = benchmark.create_model('resnet18', args)
    assert len(resnet.feature_info.channels()) == 5 and sum(p.numel() for p in resnet.parameters()) > 11e6
    assert benchmark.create_model('msmlp_tiny', args).feature_info.channels() == [96, 192, 384, 768]


def test_a_model_that_cannot_run_the_setting_gets_a_failed_row(capsys, monkeypatch):
    real = benchmark.make_step

    def make_step(model, args, device):
        if type(model).__name__ == 'ConvNeXt':
            raise RuntimeError('no kernel for this shape')
        return real(model, args, device)
    monkeypatch.setattr(benchmark, 'make_step', make_step)
    assert benchmark.main(['--model', 'msmlp_tiny', '--no-memory', '--compare', 'convnext_tiny', *TINY]) == 1
    _, rows = table_rows(capsys.readouterr().out)
    assert rows['convnext_tiny']['images/s'] == 'failed: RuntimeError: no kernel for this shape'
    assert float(rows['msmlp_tiny (fast)']['x msmlp_tiny (reference)']) > 0


def test_a_triton_row_times_the_triton_mixer_or_is_left_out_with_a_note(capsys, monkeypatch):
    """On the CPU without the interpreter mix_impl='triton' runs the fast path, so a row labelled
    triton would time the fast path under the wrong name."""
    argv = ['--model', 'msmlp_tiny', '--triton', '--no-reference', '--no-memory', *TINY]
    assert benchmark.main(argv) == 0
    captured = capsys.readouterr()
    assert list(table_rows(captured.out)[1]) == ['msmlp_tiny (fast)']
    assert "no triton row: the Triton mixer runs on a CUDA device" in captured.err
    from msmlp import mixing
    monkeypatch.setattr(mixing, 'triton_runs_on', lambda device: True)
    rows = benchmark.build_rows(benchmark.parse_args(argv))
    assert [row.label for row in rows] == ['msmlp_tiny (fast)', 'msmlp_tiny (triton)', 'msmlp_tiny (triton_norm)']
    assert {block.mix_impl for block in rows[1].model.modules() if hasattr(block, 'mix_impl')} == {'triton'}
    assert {block.mix_impl for block in rows[2].model.modules() if hasattr(block, 'mix_impl')} == {'triton_norm'}
    # the fast row is the fast path, not the default (which is triton's on a GPU)
    assert {block.mix_impl for block in rows[0].model.modules() if hasattr(block, 'mix_impl')} == {'fast'}


@pytest.mark.parametrize('argv, message', [
    (['--img-size', '800x'], '--img-size must be N or HxW'),
    (['--batch-size', '0'], '--batch-size must be at least 1'),
    (['--model', 'no_such_model_xyz'], "unknown timm model 'no_such_model_xyz'"),
    (['--device', 'gpu'], "--device 'gpu' is not a torch device"),
    (['--device', 'cuda:99'], 'CUDA devices are visible here'),
    (['--threads', '0'], '--threads must be at least 1, got 0'),  # 0 was ignored, -1 a traceback
    (['--compile', '--warmup', '0'], '--compile needs --warmup 1 or more'),
    (['--output', '/proc/no_such_folder/table.md'], '--output /proc/no_such_folder/table.md: '),  # before, not after
])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(argv)
    assert message in capsys.readouterr().err + str(exit_info.value.code)


def test_cli_dispatches_to_the_benchmark(capsys):
    import cli
    assert cli.main(['benchmark', '--model', 'msmlp_tiny', '--no-reference', '--no-memory', *TINY]) == 0
    _, rows = table_rows(capsys.readouterr().out)
    assert list(rows) == ['msmlp_tiny (fast)']


def executed_minus_counted(batch_size: int, *flags: str) -> float:
    args = benchmark.parse_args(['--batch-size', str(batch_size), *flags])
    row = benchmark.build_rows(args)[0]
    benchmark.count_both_gmacs(row, args, torch.device('cpu'))
    return row.executed_gmacs - row.gmacs


def test_executed_gmacs_count_the_zero_taps_of_the_convs_the_fast_path_runs(monkeypatch):
    monkeypatch.setenv('MSMLP_CPU_KERNEL', '0')  # the PyTorch operations
    # Every group fills a slot as wide as the first group; the last group of msmlp_tiny's stages is
    # narrower (16 of 20, 36 of 39, 76 of 77, 152 of 154 channels), its slot padded with zero kernels.
    # At batch 16 msmlp_tiny pads its 1x1 kernels into the 3x3 conv they share: stage 0 groups 0-1
    # (56x56) and stage 1 group 0 (28x28); and each stage's narrower last group. 3 blocks each, stage 2 9.
    last_group = [(56, 20, 16, 7, 3), (28, 39, 36, 7, 3), (14, 77, 76, 7, 9), (7, 154, 152, 7, 3)]
    narrower = sum(blocks * 2 * size * size * (slot - last) * k * k for size, slot, last, k, blocks in last_group)
    padded_1x1 = 3 * 2 * 56 * 56 * 2 * 20 * (3 * 3 - 1) + 3 * 2 * 28 * 28 * 39 * (3 * 3 - 1)
    assert executed_minus_counted(16, '--train') == pytest.approx((padded_1x1 + narrower) / 1e9, rel=1e-9)
    # A single image runs stages 1-3 (28x28 and smaller) as one 7x7 conv of all groups' slots.
    one_run = 0
    model = timm.create_model('msmlp_tiny')
    for stage, size in ((1, 28), (2, 14), (3, 7)):
        for block in model.layers[stage].blocks:
            slot = block.group_sizes[0]
            one_run += 2 * size * size * sum(slot * 49 - c * k * k for c, k in zip(block.group_sizes, block.mix_size))
    stage_0 = 3 * 2 * 56 * 56 * (2 * 20 * (3 * 3 - 1) + (20 - 16) * 49)
    assert executed_minus_counted(1, '--train') == pytest.approx((stage_0 + one_run) / 1e9, rel=1e-9)


def test_the_cpu_kernel_executes_what_is_counted(monkeypatch):
    assert executed_minus_counted(16) == executed_minus_counted(16, '--train') == 0  # each group at its own size
    monkeypatch.setenv('MSMLP_CPU_KERNEL', '0')
    assert executed_minus_counted(16) == executed_minus_counted(16, '--train') > 0


def test_gpu_peak_memory_leaves_out_the_other_rows_models(monkeypatch):
    """On a GPU every row's model stays on the device: a row's peak is what its step allocates
    beyond what was there before, plus its own weights, optimizer state and input."""
    args = benchmark.parse_args(['--train', '--batch-size', '2', '--img-size', '32'])
    model = timm.create_model('convnext_tiny', num_classes=10)
    step = benchmark.make_step(model, args, torch.device('cpu'))
    step()  # AdamW's state exists after the warm-up
    others, allocated_by_step = 5 * 2 ** 30, 100 * 2 ** 20
    monkeypatch.setattr(torch.cuda, 'synchronize', lambda device=None: None)
    monkeypatch.setattr(torch.cuda, 'reset_peak_memory_stats', lambda device=None: None)
    monkeypatch.setattr(torch.cuda, 'memory_allocated', lambda device=None: others)
    monkeypatch.setattr(torch.cuda, 'max_memory_allocated', lambda device=None: others + allocated_by_step)
    weights = sum(p.numel() * 4 for p in model.parameters()) + sum(b.numel() * b.element_size() for b in model.buffers())
    own = weights * 3 + 2 * 3 * 32 * 32 * 4 + 4 * len(list(model.parameters()))  # weights, Adam's two moments and step counts, input
    peak = benchmark.measure_peak_mb(step, torch.device('cuda'))
    assert peak == pytest.approx((allocated_by_step + own) / 2 ** 20, rel=1e-6)


def test_ms_swin_rows_are_labelled_and_built_as_ms_mlp_rows(monkeypatch):
    """MS-Swin's first row is its fast path, named so, as MS-MLP's (on a GPU the default mixer is triton's)."""
    from msmlp import mixing
    monkeypatch.setattr(mixing, 'triton_runs_on', lambda device: True)
    rows = benchmark.build_rows(benchmark.parse_args(['--model', 'msswin_tiny', '--triton', *TINY]))
    assert [row.label for row in rows] == ['msswin_tiny (fast)', 'msswin_tiny (triton)', 'msswin_tiny (triton_norm)',
                                           'msswin_tiny (reference)']
    impls = [{block.mix_impl for block in row.model.modules() if hasattr(block, 'mix_impl')} for row in rows]
    assert impls == [{'fast'}, {'triton'}, {'triton_norm'}, {'reference'}]


def test_an_empty_model_name_is_refused():
    """'' is a prefix of every timm model: --compare '' timed timm's first, a 1.2B-parameter model."""
    for argv in (['--compare', ''], ['--model', ' ']):
        with pytest.raises(SystemExit, match='^msmlp benchmark: a model name is empty$'):
            benchmark.build_rows(benchmark.parse_args([*argv, *TINY]))
