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


def fit_seg(tmp_path, *args, timeout=900):
    """``msmlp fit --task seg *args`` in a fresh process and data folder: its output, final val
    mIoU and minutes."""
    env = dict(os.environ, MSMLP_DATA=str(tmp_path / 'data'), PYTHONPATH=str(REPO))
    start = time.monotonic()
    result = subprocess.run([sys.executable, '-m', 'cli', 'fit', '--task', 'seg', *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=timeout)
    minutes = (time.monotonic() - start) / 60
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    final = re.findall(r'val: mIoU=([0-9.]+)\s+mAcc=([0-9.]+)\s+aAcc=([0-9.]+)', out)
    assert final, out[-4000:]
    return out, float(final[-1][0]), minutes


@pytest.mark.slow
def test_msmlp_fit_task_seg_reaches_miou_one_half(tmp_path):
    out, miou, minutes = fit_seg(tmp_path)
    assert (tmp_path / 'data' / 'ade20k-scenes-v1' / 'annotations' / 'validation').is_dir()
    print(f'embedded seg default: val mIoU {miou:.4f} after {minutes:.1f} min')
    assert miou >= 0.5, out[-4000:]
    assert minutes <= 10, f'took {minutes:.1f} minutes'
    assert list((tmp_path / 'runs' / 'seg').glob('version_*/checkpoints/last.ckpt'))


@pytest.mark.slow
def test_the_msswin_mini_config_trains_on_the_embedded_scenes(tmp_path):
    """configs/seg/msswin-mini_upernet_ade20k-scenes-128x128.yaml: the same run with a small
    MS-Swin backbone (mIoU 0.72 here on 2026-12-07) clears the same floor."""
    config = REPO / 'configs' / 'seg' / 'msswin-mini_upernet_ade20k-scenes-128x128.yaml'
    out, miou, _ = fit_seg(tmp_path, '--config', str(config), timeout=1200)
    assert 'task seg: mmseg/msswin-mini_upernet_ade20k-scenes-128x128.py' in out
    print(f'MS-Swin mini seg: val mIoU {miou:.4f}')
    assert miou >= 0.5, out[-4000:]
    assert list((tmp_path / 'runs' / 'seg_msswin_mini').glob('version_*/checkpoints/last.ckpt'))
