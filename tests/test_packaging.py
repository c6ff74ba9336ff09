"""`pip install .` installs msmlp, tasks, cli and the configs, and the CLI finds its configs there."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('wheel')
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q',
                    '-w', str(out), str(ROOT)], check=True, capture_output=True)
    return next(out.glob('msmlp-*.whl'))


def test_wheel_holds_every_part(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = ['cli.py', 'msmlp/model.py', 'msmlp/msswin.py', 'msmlp/cpu_kernel.py', 'msmlp/csrc/shift_mix.cpp', 'tasks/loading.py', 'tasks/checkpointing.py', 'msmlp/checkpoint.py', 'msmlp/mm.py', 'tasks/classification.py',
                'tasks/openmmlab.py', 'tasks/embedded/__init__.py', 'configs/cls/default.yaml',
                'configs/cls/msmlp_tiny_in1k.yaml', 'configs/cls/msmlp_small_in1k.yaml',
                'configs/cls/msmlp_base_in1k.yaml', 'configs/det/default.yaml', 'configs/seg/default.yaml',
                'configs/mmdet/mask-rcnn_msmlp-t_fpn_1x_coco.py',
                'configs/mmseg/msmlp-t_upernet_8xb2-160k_ade20k-512x512.py', 'configs/cls/msswin_mini_shapes.yaml',
                'configs/mmdet/mask-rcnn_msswin-t_fpn_1x_coco.py']
    assert [n for n in expected if n not in names] == []
    entry_points = next(n for n in names if n.endswith('entry_points.txt'))
    assert 'msmlp = cli:main' in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_cli_finds_its_configs_outside_the_repo(wheel, tmp_path):
    target = tmp_path / 'site'
    subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target', str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ('import cli, sys; path = cli.task_config("det"); print(path); '
            'sys.exit(cli.main(["fit", "--task", "cls", "--print_config"]))')
    env = dict(os.environ, PYTHONPATH=str(target))
    result = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    first_line = result.stdout.splitlines()[0]
    assert first_line.startswith(str(target)) and first_line.endswith('configs/det/default.yaml')
    assert 'tasks.classification.ClassificationTask' in result.stdout


@pytest.mark.slow
def test_two_processes_from_the_installed_package_outside_the_repo(wheel, tmp_path):
    """Lightning's ddp launcher re-runs the command; with the package installed (not editable)
    that is the installed cli.py, run from a folder that is not the repository."""
    target = tmp_path / 'site'
    subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target', str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ('import sys, cli; sys.exit(cli.main(["fit", "--task", "cls", "--trainer.strategy=ddp", '
            '"--trainer.devices=2", "--trainer.accelerator=cpu", "--trainer.max_epochs=1", '
            '"--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2"]))')
    env = dict(os.environ, PYTHONPATH=str(target), MSMLP_DATA=str(tmp_path / 'data'), OMP_NUM_THREADS='1')
    work = tmp_path / 'work'
    work.mkdir()
    result = subprocess.run([sys.executable, '-c', code], cwd=work, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count('msmlp: run finished') == 1
    assert (work / 'runs' / 'cls' / 'version_0' / 'checkpoints' / 'last.ckpt').is_file()
