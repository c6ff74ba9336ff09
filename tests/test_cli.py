"""The ``msmlp`` command line: task selection, config layering, help, dispatch, install."""
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

import cli
from msmlp import export

REPO = Path(__file__).resolve().parents[1]


def print_config(capsys, *args):
    """The merged config ``msmlp fit --task cls ... --print_config`` prints, as a dict."""
    assert cli.main(['fit', '--task', 'cls', *args, '--print_config']) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_configs_are_found_beside_the_installed_module():
    assert cli.CONFIG_DIR == Path(cli.__file__).resolve().parent / 'configs'
    assert cli.task_config('cls').is_file()


def test_task_default_is_the_first_config(capsys):
    config = print_config(capsys)
    assert config['task'] == 'cls'
    assert config['model']['class_path'] == 'tasks.classification.ClassificationTask'
    assert config['model']['init_args']['embed_dim'] == 40  # the embedded default's small MS-MLP
    assert config['data']['init_args']['root'] is None  # the embedded dataset
    assert config['checkpoint']['monitor'] == 'val/top1' and config['checkpoint']['save_last'] is True
    assert [logger['class_path'].rsplit('.', 1)[1] for logger in config['trainer']['logger']] == [
        'CSVLogger', 'TensorBoardLogger']


def test_config_file_then_flags_override_the_task_default(capsys, tmp_path):
    override = tmp_path / 'override.yaml'
    override.write_text('data:\n  init_args:\n    batch_size: 8\n    image_size: 48\ntrainer:\n  max_epochs: 3\n')
    config = print_config(capsys, '--config', str(override))
    assert config['data']['init_args']['batch_size'] == 8
    assert config['data']['init_args']['image_size'] == 48
    assert config['trainer']['max_epochs'] == 3
    assert config['model']['init_args']['embed_dim'] == 40  # untouched values keep the task default

    config = print_config(capsys, '--config', str(override), '--data.init_args.batch_size=16', '--trainer.max_epochs', '5')
    assert config['data']['init_args']['batch_size'] == 16
    assert config['data']['init_args']['image_size'] == 48
    assert config['trainer']['max_epochs'] == 5


def test_short_flags_without_init_args(capsys):
    config = print_config(capsys, '--data.predict_path', 'some/image.png', '--model.lr=0.01')
    assert config['data']['init_args']['predict_path'] == 'some/image.png'
    assert config['model']['init_args']['lr'] == 0.01


def test_recipe_config_layers_over_the_default(capsys):
    config = print_config(capsys, '--config', str(REPO / 'configs/cls/msmlp_small_in1k.yaml'))
    model = config['model']['init_args']
    assert model['model'] == 'msmlp_small' and model['embed_dim'] is None and model['depths'] is None
    assert model['num_classes'] == 1000
    assert config['data']['init_args']['image_size'] == 224
    assert config['trainer']['max_epochs'] == 300


@pytest.mark.parametrize('argv', [['--help'], ['fit', '--help'], ['fit', '--task', 'cls', '--help'],
                                  ['predict', '--help']])
def test_help(argv, capsys):
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert '--task' in out
    if argv[0] == 'fit':
        assert '--config' in out and '--print_config' in out and '--trainer.max_epochs' in out


def test_no_arguments_prints_usage_and_fails(capsys):
    assert cli.main([]) == 2
    assert 'usage: msmlp' in capsys.readouterr().out


def test_a_missing_task_config_says_the_installation_is_incomplete(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, 'CONFIG_DIR', tmp_path)
    assert cli.main(['fit', '--task', 'det']) == 2
    assert capsys.readouterr().err == (f'msmlp: error: {tmp_path / "det" / "default.yaml"} is missing: '
                                       'this installation of msmlp is incomplete (reinstall it)\n')


def test_unknown_task(capsys):
    assert cli.main(['fit', '--task', 'pose']) == 2
    assert "unknown task 'pose'" in capsys.readouterr().err


@pytest.mark.parametrize('task, args, error', [
    ('cls', ['fit', '--trainer.max_epochs=many'], '--trainer.max_epochs=many: expected int or null'),
    ('cls', ['fit', '--trainer.devcies=2'],
     'unrecognized arguments: --trainer.devcies=2; did you mean --trainer.devices?'),
    ('cls', ['fit', '--model.lrr=0.1'],
     "--model.lrr: tasks.classification.ClassificationTask takes no option 'lrr'; did you mean --model.lr?"),
    ('cls', ['validate', '--model.init_args.lr=x'], '--model.lr=x: expected float'),
    ('cls', ['fit', '--data.batch_size=abc'], '--data.batch_size=abc: expected int'),
    ('cls', ['fit', '--model.depths=[1,x]'], "--model.depths=[1, 'x']: expected a list of int or null"),
    ('det', ['predict', '--data.predict_path=x.jpg'], "--data.predict_path: tasks.detection.CocoDataModule takes no "
                                                      "option 'predict_path'; did you mean --data.predict_images?"),
])
def test_a_bad_flag_is_one_line_and_where_the_options_are(task, args, error, capsys):
    """Not jsonargparse's usage of every option with the reason inside ten lines of union errors."""
    assert cli.main([args[0], '--task', task, *args[1:]]) == 2
    assert capsys.readouterr().err == (f'msmlp {args[0]}: error: {error}\n'
                                       f'msmlp {args[0]} --task {task} --help lists every option\n')


def test_a_bad_option_in_a_config_file_names_the_file(capsys, tmp_path):
    """Before: reported as if typed on the command line (a wrong key), or with no file at all
    (options not nested under data:)."""
    wrong_key, flat = tmp_path / 'wrong_key.yaml', tmp_path / 'flat.yaml'
    wrong_key.write_text('model:\n  lrr: 0.1\n')
    flat.write_text('data:\nbatch_size: 4\n')
    for config, error in (
            (wrong_key, "--model.lrr: tasks.classification.ClassificationTask takes no option 'lrr'; did you mean "
                        f'--model.lr? (not on the command line: from {wrong_key})'),
            (flat, f"Subcommand 'fit' does not accept option 'batch_size' (not on the command line: from {flat})")):
        assert cli.main(['fit', '--task', 'cls', '--config', str(config)]) == 2
        assert capsys.readouterr().err == f'msmlp fit: error: {error}\nmsmlp fit --task cls --help lists every option\n'


@pytest.mark.parametrize('typed, meant', [('fitt', 'fit'), ('exprot', 'export'), ('benchmrk', 'benchmark')])
def test_a_mistyped_subcommand_is_named_with_the_closest(typed, meant, capsys):
    assert cli.main([typed, '--checkpoint', 'best']) == 2
    line = capsys.readouterr().err.splitlines()[0]
    assert line.startswith(f"msmlp: error: argument subcommand: invalid choice: '{typed}'")
    assert line.endswith(f"or msmlp's export or benchmark; did you mean {meant}?")


def test_a_config_that_is_not_yaml_is_named_with_its_line(capsys, tmp_path):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('trainer:\n  max_epochs: [1\n')
    assert cli.main(['fit', '--task', 'cls', '--config', str(bad)]) == 1
    assert capsys.readouterr().err.startswith(f'msmlp: error: {bad}, line 3, column 1: not valid YAML: ')


def test_a_config_that_is_empty_a_folder_or_of_another_task_is_one_line(capsys, tmp_path, monkeypatch):
    """Before: 'Unexpected config:' with nothing after it; 'config not found' for a folder that
    exists; a det config under --task cls trained a Mask R-CNN announced as 'task cls'."""
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / 'empty.yaml'
    empty.write_text('')
    listed = tmp_path / 'list.yaml'
    listed.write_text('- 1\n')
    det = cli.CONFIG_DIR / 'det' / 'default.yaml'
    for config, message in (
            (empty, f'{empty}: empty, not a mapping of options (model:, data:, trainer: ...)'),
            (listed, f'{listed}: a YAML list, not a mapping of options (model:, data:, trainer: ...)'),
            (tmp_path, f'config {tmp_path} is a folder: name a file in it'),
            (det, f'{det} is a config of --task det (its model is tasks.detection.DetectionTask), not of --task cls: '
                  'run it with --task det')):
        assert cli.main(['fit', '--task', 'cls', '--config', str(config)]) == 1
        assert capsys.readouterr().err == f'msmlp: error: {message}\n'
    assert not (tmp_path / 'runs').exists()


def test_trainer_options_the_machine_cannot_run_are_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(['fit', '--task', 'cls', '--trainer.strategy=fsdp', '--trainer.accelerator=cpu']) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith('msmlp: error: trainer (accelerator=cpu, strategy=fsdp, devices=1): ')
    assert err.count('\n') == 0 and 'requires a GPU' in err
    assert not (tmp_path / 'runs').exists()


def test_version_names_the_package_and_its_libraries(capsys):
    from importlib.metadata import version
    assert cli.main(['--version']) == 0
    out = capsys.readouterr().out
    assert out.startswith(f'msmlp {version("msmlp")} (torch {version("torch")}, lightning {version("lightning")}, ')
    assert f'timm {version("timm")}' in out and out.count('\n') == 1


def test_benchmark_is_dispatched_with_its_arguments(monkeypatch):
    calls = []
    fake = types.ModuleType('msmlp.benchmark')
    fake.main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, 'msmlp.benchmark', fake)
    assert cli.main(['benchmark', '--model', 'msmlp_tiny', '--batch-size', '4']) == 0
    assert calls == [['--model', 'msmlp_tiny', '--batch-size', '4']]


def test_console_entry_point_runs_in_a_fresh_process(tmp_path):
    script = Path(sys.executable).parent / 'msmlp'
    command = [str(script)] if script.exists() else [sys.executable, '-m', 'cli']
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([*command, 'fit', '--task', 'cls', '--print_config'], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert 'tasks.classification.ImageFolderDataModule' in done.stdout


# ----- several processes, resuming ---------------------------------------------------------
@pytest.mark.parametrize('strategy', ['ddp_spawn', 'ddp_spawn_find_unused_parameters_true'])
def test_ddp_spawn_is_refused_in_one_line(strategy, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(['fit', '--task', 'cls', f'--trainer.strategy={strategy}', '--trainer.devices=2',
                     '--trainer.accelerator=cpu']) == 1
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and 'use --trainer.strategy ddp' in err and strategy in err
    assert not (tmp_path / 'runs').exists()


TORCHRUN_TWO = {'TORCHELASTIC_RUN_ID': 'none', 'RANK': '0', 'GROUP_RANK': '0', 'LOCAL_RANK': '0',
                'LOCAL_WORLD_SIZE': '2', 'WORLD_SIZE': '2'}
SRUN_TWO_NODES = {'SLURM_NTASKS': '4', 'SLURM_NTASKS_PER_NODE': '2', 'SLURM_NNODES': '2', 'SLURM_JOB_NAME': 'in1k',
                  'SLURM_PROCID': '0', 'SLURM_LOCALID': '0', 'SLURM_NODEID': '0', 'SLURM_STEP_NUM_TASKS': '4',
                  'SLURM_STEP_NUM_NODES': '2'}


@pytest.mark.parametrize('launcher, variables, flags, hint', [
    ('torchrun', TORCHRUN_TWO, [], '--trainer.devices 2 --trainer.strategy ddp'),
    ('torchrun', TORCHRUN_TWO, ['--trainer.devices=3', '--trainer.strategy=ddp'],
     '--trainer.devices 2 --trainer.strategy ddp'),
    ('srun', SRUN_TWO_NODES, ['--trainer.devices=2', '--trainer.strategy=ddp'],
     '--trainer.devices 2 --trainer.num_nodes 2 --trainer.strategy ddp'),
])
def test_a_process_count_other_than_the_launchers_is_refused_in_one_line(launcher, variables, flags, hint, capsys,
                                                                         tmp_path, monkeypatch):
    """Under torchrun or srun with the default devices=1, every process would train the whole
    run alone into the same run folder; with too many devices, Lightning stops each process
    with a traceback."""
    monkeypatch.chdir(tmp_path)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert cli.main(['fit', '--task', 'cls', '--trainer.accelerator=cpu', *flags]) == 1
    err = capsys.readouterr().err.strip()
    processes = variables.get('WORLD_SIZE') or variables['SLURM_STEP_NUM_TASKS']
    assert err.count('\n') == 0 and err.startswith(f'msmlp: error: {launcher} started {processes} processes'), err
    assert err.endswith(hint), err
    assert not (tmp_path / 'runs').exists()


def test_slurm_task_layout_lightning_refuses_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv('SLURM_NTASKS_PER_NODE', raising=False)  # sbatch --ntasks without --ntasks-per-node
    for name, value in SRUN_TWO_NODES.items():
        if name != 'SLURM_NTASKS_PER_NODE':
            monkeypatch.setenv(name, value)
    assert cli.main(['fit', '--task', 'cls', '--trainer.accelerator=cpu', '--trainer.devices=2']) == 1
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and 'strategy=auto' in err and 'ntasks-per-node' in err, err


def test_lightning_ddp_launcher_reruns_this_command():
    """Lightning's ddp launcher starts the other processes with this command line: whichever
    way msmlp was started, it is `python .../cli.py` with the --task and every flag."""
    from lightning.fabric.strategies.launchers.subprocess_script import _basic_subprocess_cmd
    with cli.relaunchable_as(['--task', 'det', 'fit', '--trainer.devices=2']):
        command = _basic_subprocess_cmd()
    assert command == [sys.executable, str(REPO / 'cli.py'), '--task', 'det', 'fit', '--trainer.devices=2']
    assert sys.argv[0] != str(REPO / 'cli.py')  # put back afterwards


def loggers_config(save_dir):
    return {'logger': [{'class_path': 'lightning.pytorch.loggers.CSVLogger',
                        'init_args': {'save_dir': str(save_dir), 'name': 'cls', 'version': None}},
                       {'class_path': 'lightning.pytorch.loggers.TensorBoardLogger',
                        'init_args': {'save_dir': str(save_dir), 'name': 'cls', 'version': None}}]}


def make_run(save_dir, version, files=('last.ckpt',)):
    folder = save_dir / 'cls' / f'version_{version}' / 'checkpoints'
    folder.mkdir(parents=True)
    for name in files:
        (folder / name).write_bytes(b'')
    return folder


def test_ckpt_path_last_is_the_newest_runs_last_checkpoint(tmp_path, capsys):
    trainer = loggers_config(tmp_path)
    assert cli.latest_last_checkpoint(trainer, 'fit') is None  # no run yet: fit starts one
    assert 'starting a new run' in capsys.readouterr().out
    from tasks.base import InputError
    with pytest.raises(InputError) as refused:
        cli.latest_last_checkpoint(trainer, 'validate')
    # both loggers write to one folder: named once
    assert str(refused.value) == f'--ckpt_path last: no run under {tmp_path / "cls"} has checkpoints/last.ckpt'
    make_run(tmp_path, 0)
    make_run(tmp_path, 10)
    make_run(tmp_path, 2)
    make_run(tmp_path, 11, files=('best-epoch003.ckpt',))  # newest, but never wrote last.ckpt
    assert cli.latest_last_checkpoint(trainer, 'fit') == str(tmp_path / 'cls/version_10/checkpoints/last.ckpt')


def test_ckpt_path_best_is_the_newest_runs_best_checkpoint(tmp_path):
    import torch
    from tasks.base import InputError
    trainer = loggers_config(tmp_path)
    with pytest.raises(InputError, match=r'^--ckpt_path best: no run under .* has checkpoints/last.ckpt$'):
        cli.latest_best_checkpoint(trainer)
    make_run(tmp_path, 0, files=('last.ckpt', 'best-epoch000.ckpt'))
    assert cli.latest_best_checkpoint(trainer) == str(tmp_path / 'cls/version_0/checkpoints/best-epoch000.ckpt')
    folder = make_run(tmp_path, 1, files=('last.ckpt', 'last-v1.ckpt'))  # has not validated yet
    with pytest.raises(InputError, match=f'^--ckpt_path best: {folder} holds no best checkpoint yet'):
        cli.latest_best_checkpoint(trainer)
    # several kept (--checkpoint.save_top_k 3): the one its last.ckpt records, wherever the run was started
    folder = make_run(tmp_path, 2, files=('best-epoch000.ckpt', 'best-epoch001.ckpt', 'best-epoch002.ckpt'))
    torch.save({'callbacks': {"RunCheckpoint{'monitor': 'val/top1'}": {
        'best_model_path': 'elsewhere/runs/cls/version_2/checkpoints/best-epoch001.ckpt'}}}, folder / 'last.ckpt')
    assert cli.latest_best_checkpoint(trainer) == str(folder / 'best-epoch001.ckpt')


def test_export_checkpoint_last_or_best_is_the_newest_runs_of_any_task(tmp_path, monkeypatch, capsys):
    from tasks.base import InputError
    monkeypatch.chdir(tmp_path)
    assert cli.main(['export', '--checkpoint', 'last']) == 1
    assert capsys.readouterr().err.startswith('msmlp export: error: --checkpoint last: no run under runs/cls, ')
    make_run(tmp_path / 'runs', 4, files=('last.ckpt', 'best-epoch002.ckpt'))
    det_run = tmp_path / 'runs' / 'det' / 'version_0' / 'checkpoints'
    det_run.mkdir(parents=True)
    (det_run / 'last.ckpt').write_bytes(b'')
    os.utime(det_run / 'last.ckpt', (1, 1))  # written before the cls run's
    def exported(*argv):
        return export.parse_args(argv, cli.export_checkpoint).checkpoint

    assert exported('--checkpoint', 'last', '--format', 'onnx') == str(Path('runs/cls/version_4/checkpoints/last.ckpt'))
    assert exported('--checkpoint=best') == str(Path('runs/cls/version_4/checkpoints/best-epoch002.ckpt'))
    assert exported('--check', 'best') == exported('--checkpoint=best')  # argparse's abbreviation
    # a det/seg run for the OpenMMLab tools: the newest of those, named after the run's file
    args = export.parse_args(['--format', 'openmmlab', '--checkpoint', 'last'], cli.export_checkpoint)
    assert (args.checkpoint, args.output) == (str(Path('runs/det/version_0/checkpoints/last.ckpt')),
                                              'last-openmmlab.pth')
    with pytest.raises(InputError, match=r'^--checkpoint best: runs/det/version_0/checkpoints holds no best '
                                         r'checkpoint yet .*; --checkpoint last takes '):
        exported('--format=openmmlab', '--checkpoint', 'best')
    assert cli.main(['export', '--format=openmmlab', '--checkpoint', 'best']) == 1
    assert capsys.readouterr().err.startswith('msmlp export: error: --checkpoint best: runs/det/version_0/')
    (tmp_path / 'last').write_bytes(b'')  # a file of that name is taken as given
    assert exported('--checkpoint', 'last') == 'last'


def test_a_resumed_last_checkpoint_continues_its_run_folder(tmp_path):
    trainer = loggers_config(tmp_path)
    checkpoints = make_run(tmp_path, 3, files=('last.ckpt', 'best-epoch001.ckpt'))
    make_run(tmp_path, 7)
    assert cli.resumed_run_folder(str(checkpoints / 'last.ckpt'), trainer) == checkpoints.parent
    pinned = cli.share_log_version(trainer, cli.resumed_run_folder(str(checkpoints / 'last.ckpt'), trainer))
    assert [args['version'] for args in pinned] == [3, 3]
    # an earlier point (a best checkpoint) or another config's run: a new run folder
    assert cli.resumed_run_folder(str(checkpoints / 'best-epoch001.ckpt'), trainer) is None
    assert cli.resumed_run_folder(str(checkpoints / 'last.ckpt'), loggers_config(tmp_path / 'other')) is None
    fresh = loggers_config(tmp_path)
    assert [args['version'] for args in cli.share_log_version(fresh)] == [8, 8]


@pytest.mark.parametrize('name', ['configs/cls/msmlp_tiny_in1k.yaml', 'cls/msmlp_tiny_in1k.yaml', 'msmlp_tiny_in1k.yaml'])
def test_shipped_configs_are_found_from_any_folder(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = print_config(capsys, '--config', name)
    assert config['model']['init_args']['model'] == 'msmlp_tiny' and config['trainer']['max_epochs'] == 300


def test_a_config_not_found_is_one_line_saying_where_it_looked(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(['fit', '--task', 'cls', '--config', 'cls/nope.yaml']) == 1
    err = capsys.readouterr().err.strip()
    assert err == f'msmlp: error: config not found: cls/nope.yaml (looked in {tmp_path} and in the shipped configs, ' \
                  f'{cli.CONFIG_DIR})'


def test_no_lightning_advertisement(caplog):
    import logging
    cli.quiet_other_processes()
    from lightning.pytorch.utilities import rank_zero_info
    with caplog.at_level(logging.INFO):
        rank_zero_info('💡 Tip: For seamless cloud logging ... try installing [litlogger](...)')
        rank_zero_info('GPU available: False, used: False')
    assert [r.getMessage() for r in caplog.records] == ['GPU available: False, used: False']


def test_a_resumed_run_hides_the_killed_runs_later_tensorboard_events(tmp_path):
    """LightningCLI builds the logger with ``purge_step=None``; the resumed run still purges."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    killed = TensorBoardLogger(tmp_path, name='run', version=0)
    for step in range(0, 15, 2):  # logged up to step 14; its checkpoint was at step 12
        killed.log_metrics({'loss': float(step)}, step)
    killed.finalize('failed')
    resumed = TensorBoardLogger(tmp_path, name='run', version=0, purge_step=None)
    cli.continue_logs([resumed], Path(resumed.log_dir).resolve(), {'purge_step': 12, 'csv_rows': None})
    for step in range(12, 19, 2):
        resumed.log_metrics({'loss': step + 0.5}, step)
    resumed.finalize('success')
    events = EventAccumulator(resumed.log_dir)
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars('loss')]
    assert logged == [(0, 0.), (2, 2.), (4, 4.), (6, 6.), (8, 8.), (10, 10.), (12, 12.5), (14, 14.5),
                      (16, 16.5), (18, 18.5)]


@pytest.mark.parametrize('task, trained', [('seg', 'tasks.detection.DetectionTask'),
                                           ('det', 'tasks.segmentation.SegmentationTask'),
                                           ('cls', 'tasks.detection.DetectionTask')])
def test_a_checkpoint_of_another_task_is_one_line(task, trained, tmp_path, capsys, monkeypatch):
    import torch
    monkeypatch.chdir(tmp_path)
    checkpoint = tmp_path / 'other.ckpt'
    torch.save({'hyper_parameters': {'_class_path': trained}, 'state_dict': {}, 'pytorch-lightning_version': '2.6.6'},
               checkpoint)
    assert cli.main(['validate', '--task', task, f'--ckpt_path={checkpoint}']) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    other = cli.TASK_MODULES[trained.rsplit('.', 1)[0]]
    assert err.startswith(f'msmlp: error: {checkpoint} holds a {trained}, not the tasks.')
    assert err.endswith(f'of --task {task}: use --task {other}')
    assert not (tmp_path / 'runs').exists()


@pytest.mark.parametrize('task, args, error', [
    ('cls', ['--lr_scheduler=StepLR', '--lr_scheduler.step_size=3'],
     "--lr_scheduler without --optimizer: Lightning would ignore it and run the task's AdamW"),
    ('det', ['--optimizer=SGD', '--optimizer.lr=0.01'],
     "--optimizer: --task det takes its optimizer and schedule from its config's optim_wrapper and param_scheduler; "
     "change them with --model.cfg_options"),
    ('seg', ['--lr_scheduler=StepLR', '--lr_scheduler.step_size=3'],
     "--lr_scheduler: --task seg takes its optimizer and schedule from its config's optim_wrapper")])
def test_optimizer_flags_lightning_would_ignore_or_crash_on_are_one_line(task, args, error, capsys, tmp_path,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(['fit', '--task', task, *args]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f'msmlp: error: {error}')
    assert not (tmp_path / 'runs').exists()


def test_a_class_refusing_its_arguments_is_one_line_with_its_reason_on_the_next_line():
    # jsonargparse's text for --trainer.logger WandbLogger without wandb installed: the reason
    # was cut at the colon ("msmlp: error: Problem with given class_path '...WandbLogger':")
    text = ("Does not validate against any of the Union subtypes\n"
            "Subtypes: [<class 'lightning.pytorch.loggers.logger.Logger'>, <class 'bool'>]\n"
            "Errors:\n"
            "  - Problem with given class_path 'lightning.pytorch.loggers.WandbLogger':\n"
            "      Requirement 'wandb>=0.12.10' not met. HINT: Try running `pip install -U 'wandb>=0.12.10'`\n"
            "  - Expected a <class 'bool'>\n"
            "Given value: Namespace(class_path='lightning.pytorch.loggers.WandbLogger')\n")
    assert cli._rejected_init_args(ValueError(text)) == (
        "Problem with given class_path 'lightning.pytorch.loggers.WandbLogger': Requirement 'wandb>=0.12.10' not "
        "met. HINT: Try running `pip install -U 'wandb>=0.12.10'`")


@pytest.mark.parametrize('task, use', [('cls', 'to start from its weights, or evaluate them, pass it as'),
                                       ('seg', "a backbone's weights are read with")])
def test_a_weights_file_given_as_ckpt_path_says_to_pass_it_as_pretrained(task, use, tmp_path, capsys, monkeypatch):
    # Lightning's own loading of the released file was a page of torch.load's refusal of its yacs pickle
    monkeypatch.chdir(tmp_path)
    released = REPO / 'tests' / 'fixtures' / 'released_layout_square_64.pth'
    assert cli.main(['validate', '--task', task, f'--ckpt_path={released}']) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f'msmlp: error: {released} is not a Lightning checkpoint of a run (it holds model, optimizer, lr_scheduler, '
        f'max_accuracy, epoch and 1 more): {use} --model.pretrained {released}')


def test_the_progress_bar_shows_small_learning_rates():
    """'lr: 0.000' during warm-up: Lightning's rich bar formats metrics with 3 decimals."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import RichProgressBar
    from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme
    trainer = Trainer(callbacks=[RichProgressBar()], logger=False, enable_checkpointing=False)
    cli.show_small_metrics(trainer)
    assert f'{5e-4:{trainer.progress_bar_callback.theme.metrics_format}}' == '0.0005'
    assert RichProgressBar().theme.metrics_format == '.3f'  # Lightning's default theme object is left alone
    own = Trainer(callbacks=[RichProgressBar(theme=RichProgressBarTheme(metrics_format='.2e'))], logger=False,
                  enable_checkpointing=False)
    cli.show_small_metrics(own)
    assert own.progress_bar_callback.theme.metrics_format == '.2e'
