"""The embedded default, end to end: `msmlp fit --task seg` with nothing else writes the
ADE20K-layout scenes and trains the small MS-MLP UperNet on CPU to validation mIoU >= 0.5
within 10 minutes (the issue's bound on 2 cores); the MS-Swin mini config clears the same floor."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip('mmseg', reason='the OpenMMLab stack comes from scripts/setup.sh')

REPO = Path(__file__).parent.parent


@pytest.mark.slow
def test_msmlp_fit_task_seg_reaches_miou_one_half(tmp_path):
    env = dict(os.environ, MSMLP_DATA=str(tmp_path / 'data'), PYTHONPATH=str(REPO))
    start = time.monotonic()
    result = subprocess.run([sys.executable, '-m', 'cli', 'fit', '--task', 'seg'], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    minutes = (time.monotonic() - start) / 60
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert (tmp_path / 'data' / 'ade20k-scenes-v1' / 'annotations' / 'validation').is_dir()
    final = re.findall(r'val: mIoU=([0-9.]+)\s+mAcc=([0-9.]+)\s+aAcc=([0-9.]+)', out)
    assert final, out[-4000:]
    miou = float(final[-1][0])
    print(f'embedded seg default: val mIoU {miou:.4f} after {minutes:.1f} min')
    assert miou >= 0.5, out[-4000:]
    assert minutes <= 10, f'took {minutes:.1f} minutes'
    assert list((tmp_path / 'runs' / 'seg').glob('version_*/checkpoints/last.ckpt'))


@pytest.mark.slow
def test_the_msswin_mini_config_trains_on_the_embedded_scenes(tmp_path):
    """configs/seg/msswin-mini_upernet_ade20k-scenes-128x128.yaml: the same run with a small
    MS-Swin backbone (mIoU 0.72 here on 2026-12-07) clears the same floor."""
    env = dict(os.environ, MSMLP_DATA=str(tmp_path / 'data'), PYTHONPATH=str(REPO))
    config = REPO / 'configs' / 'seg' / 'msswin-mini_upernet_ade20k-scenes-128x128.yaml'
    result = subprocess.run([sys.executable, '-m', 'cli', 'fit', '--task', 'seg', '--config', str(config)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert 'task seg: mmseg/msswin-mini_upernet_ade20k-scenes-128x128.py' in out
    miou = float(re.findall(r'val: mIoU=([0-9.]+)', out)[-1])
    print(f'MS-Swin mini seg: val mIoU {miou:.4f}')
    assert miou >= 0.5, out[-4000:]
    assert list((tmp_path / 'runs' / 'seg_msswin_mini').glob('version_*/checkpoints/last.ckpt'))
