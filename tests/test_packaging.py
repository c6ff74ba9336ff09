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
    expected = ['cli.py', 'msmlp/model.py', 'msmlp/checkpoint.py', 'msmlp/mm.py', 'tasks/classification.py',
                'tasks/openmmlab.py', 'tasks/embedded/__init__.py', 'configs/cls/default.yaml',
                'configs/cls/msmlp_tiny_in1k.yaml', 'configs/cls/msmlp_small_in1k.yaml',
                'configs/cls/msmlp_base_in1k.yaml', 'configs/det/default.yaml', 'configs/seg/default.yaml',
                'configs/mmdet/mask-rcnn_msmlp-t_fpn_1x_coco.py',
                'configs/mmseg/msmlp-t_upernet_8xb2-160k_ade20k-512x512.py']
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
