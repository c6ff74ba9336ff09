"""Several processes and killed runs, through the real ``msmlp`` command (2 gloo processes on
the CPU): Lightning's ddp launcher, torchrun and SLURM; metrics that do not depend on the
number of processes; a SIGKILL mid-epoch then a resume that ends bit for bit where an
uninterrupted run ends. All slow (run by .ci/run)."""
import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

MSMLP = Path(sys.executable).parent / 'msmlp'  # the console script of the editable install
TWO = ['--trainer.strategy=ddp', '--trainer.devices=2', '--trainer.accelerator=cpu']


@pytest.fixture(scope='session')
def env(tmp_path_factory):
    """The embedded datasets written once for this module; one intra-op thread per process
    (two processes share two cores)."""
    data = tmp_path_factory.mktemp('data')
    return dict(os.environ, MSMLP_DATA=str(data), OMP_NUM_THREADS='1')


def msmlp(cwd: Path, env, *args, command=(str(MSMLP),), timeout=900, ok=True):
    cwd.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-5000:])
    return done


def one_report(done, val_lines: int = 0):
    """The run's messages once, whatever the number of processes."""
    out = done.stdout + done.stderr
    assert out.count('msmlp: run finished') == 1 and out.count('logs and checkpoints go to') == 1, out[-3000:]
    assert '[rank: 1]' not in out and 'GLOBAL_RANK: 1' not in out
    assert out.count('] epoch 0 val:') == val_lines, out[-3000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def metrics_table(out: str) -> dict:
    """The ``metric │ value`` rows Lightning prints after validate/test, and the per-class rows."""
    row = r'[│|]\s*((?:val|test)/\S+)\s*[│|]\s*([-0-9.e]+)'
    found = {m.group(1): float(m.group(2)) for m in re.finditer(row, out)}
    found.update({f'class {m.group(1)}': (float(m.group(2)), float(m.group(3)))
                  for m in re.finditer(r'^(\w+)\s+([0-9.]+)\s+([0-9.]+)$', out, re.MULTILINE)})
    return found


def read_csv(path: Path) -> list:
    with open(path) as f:
        return list(csv.reader(f))


# ----- the ddp launcher, torchrun, SLURM --------------------------------------------------------------
SHORT = {'cls': ['--trainer.max_epochs=1', '--trainer.limit_train_batches=3', '--trainer.limit_val_batches=2'],
         'det': ['--trainer.max_epochs=1', '--trainer.limit_train_batches=3', '--trainer.limit_val_batches=3',
                 '--trainer.check_val_every_n_epoch=1'],
         'seg': ['--trainer.max_epochs=1', '--trainer.limit_train_batches=3', '--trainer.limit_val_batches=3',
                 '--trainer.check_val_every_n_epoch=1']}


@pytest.mark.parametrize('task', ['cls', 'det', 'seg'])
def test_fit_on_two_processes_through_the_cli_launcher(task, env, tmp_path):
    done = msmlp(tmp_path, env, 'fit', '--task', task, *TWO, *SHORT[task])
    one_report(done, val_lines=0 if task == 'cls' else 1)
    assert (tmp_path / 'runs' / task / 'version_0' / 'checkpoints' / 'last.ckpt').is_file()
    assert not (tmp_path / 'runs' / task / 'version_1').exists()


def test_predict_and_test_on_two_processes(env, tmp_path):
    """cls prints every image's ranking once, in the folder's order; det and seg draw every image
    (det's mmengine visualizer drew on the first process only: the second's share was lost)."""
    msmlp(tmp_path, env, 'fit', '--task', 'cls', *SHORT['cls'])
    checkpoint = f'--ckpt_path={tmp_path / "runs/cls/version_0/checkpoints/last.ckpt"}'
    images = Path(env['MSMLP_DATA']) / 'imagenet-shapes-v2' / 'val' / 'cross'
    done = msmlp(tmp_path, env, 'predict', '--task', 'cls', checkpoint, f'--data.predict_path={images}', *TWO)
    printed = [line for line in done.stdout.splitlines() if line.endswith('.png')]
    assert printed == sorted(str(p) for p in images.iterdir())
    rows = (tmp_path / 'runs/cls/predictions.csv').read_text().splitlines()[1:]  # written once, by the first
    assert [row.split(',')[0] for row in rows] == printed and done.stdout.count('msmlp: wrote the top-') == 1
    assert sorted(p.name for p in (tmp_path / 'runs/cls').glob('predictions*')) == ['predictions.csv']  # shares gone
    tested = msmlp(tmp_path, env, 'test', '--task', 'cls', checkpoint, *TWO)
    assert tested.stdout.count('Test metric') == 1 and 'test/top1' in tested.stdout

    msmlp(tmp_path, env, 'fit', '--task', 'seg', *SHORT['seg'])
    done = msmlp(tmp_path, env, 'predict', '--task', 'seg', *TWO,
                 f'--ckpt_path={tmp_path / "runs/seg/version_0/checkpoints/last.ckpt"}')
    validation = Path(env['MSMLP_DATA']) / 'ade20k-scenes-v1' / 'images' / 'validation'
    count = len(list(validation.iterdir()))
    assert f'wrote {count} prediction images' in done.stdout
    assert len(list((tmp_path / 'runs/seg/predictions/labels').iterdir())) == count

    pattern = Path(env['MSMLP_DATA']) / 'coco-shapes-v1' / 'val' / '00001[012].jpg'
    done = msmlp(tmp_path, env, 'predict', '--task', 'det', *TWO, f'--data.predict_images={pattern}',
                 f'--model.predict_dir={tmp_path / "drawn"}')  # the config's initial weights
    assert 'wrote 3 prediction images' in done.stdout
    assert sorted(p.name for p in (tmp_path / 'drawn').iterdir()) == ['000010.png', '000011.png', '000012.png']


def test_learning_rate_scales_with_processes_and_accumulation(env, tmp_path):
    # lr 1e-3 at a total batch of 32: 16 per process x 2 processes x 2 accumulated = 64 -> 2e-3
    msmlp(tmp_path, env, 'fit', '--task', 'cls', *TWO, '--trainer.max_epochs=1', '--trainer.limit_train_batches=4',
          '--trainer.limit_val_batches=0', '--trainer.accumulate_grad_batches=2', '--trainer.log_every_n_steps=1',
          '--data.batch_size=16', '--model.lr=1e-3', '--model.lr_batch_size=32', '--model.warmup_epochs=0',
          '--model.min_lr=1e-3')
    rates = [float(row[1]) for row in read_csv(tmp_path / 'runs/cls/version_0/metrics.csv')[1:] if row[1]]
    assert rates and all(rate == pytest.approx(2e-3, rel=1e-6) for rate in rates)


def test_torchrun_with_the_default_single_device_stops_every_process_in_one_line(env, tmp_path):
    """torchrun --nproc_per_node 2 without --trainer.devices 2: two lone runs into one folder
    before; now each process says what to pass, and nothing is written."""
    done = msmlp(tmp_path, env, '--standalone', '--nproc_per_node=2', str(MSMLP), 'fit', '--task', 'cls',
                 *SHORT['cls'], command=(sys.executable, '-m', 'torch.distributed.run'), timeout=300, ok=False)
    refusal = ('msmlp: error: torchrun started 2 processes, but the trainer runs 1 (devices 1 x num_nodes 1): '
               'pass --trainer.devices 2 --trainer.strategy ddp')
    out = done.stdout + done.stderr
    assert done.returncode != 0 and out.count(refusal) == 2, out[-3000:]
    assert 'Epoch' not in out and not (tmp_path / 'runs').exists()


def test_torchrun_two_nodes_with_rendezvous(env, tmp_path):
    """torchrun --nnodes 2 (two agents here, as on two machines) with c10d rendezvous."""
    port = free_port()
    args = ['-m', 'torch.distributed.run', '--nnodes=2', '--nproc_per_node=1', '--rdzv-backend=c10d',
            f'--rdzv-endpoint=127.0.0.1:{port}', '--rdzv-id=msmlp-test', str(MSMLP), 'fit', '--task', 'cls',
            '--trainer.num_nodes=2', '--trainer.devices=1', '--trainer.accelerator=cpu', '--trainer.strategy=ddp',
            *SHORT['cls']]
    nodes = [subprocess.Popen([sys.executable, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [o[-3000:] for o in outs]
    assert sum(o.count('msmlp: run finished') for o in outs) == 1
    assert any('MEMBER: 1/2' in o for o in outs)  # one process group across the two "nodes"
    assert (tmp_path / 'runs/cls/version_0/checkpoints/last.ckpt').is_file()


def test_slurm_two_nodes_from_lightnings_environment_variables(env, tmp_path):
    """What srun sets for 2 nodes x 1 task: Lightning's SLURMEnvironment builds the group."""
    common = dict(env, SLURM_NTASKS='2', SLURM_NTASKS_PER_NODE='1', SLURM_NNODES='2', SLURM_JOB_ID='4242',
                  SLURM_JOB_NAME='msmlp-test', SLURM_NODELIST='127.0.0.1', MASTER_PORT=str(free_port()))
    args = [str(MSMLP), 'fit', '--task', 'cls', '--trainer.num_nodes=2', '--trainer.devices=1',
            '--trainer.accelerator=cpu', '--trainer.strategy=ddp', *SHORT['cls']]
    tasks = [subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dict(common, SLURM_PROCID=str(rank), SLURM_LOCALID='0', SLURM_NODEID=str(rank)))
             for rank in range(2)]
    outs = [task.communicate(timeout=600)[0] for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], [o[-3000:] for o in outs]
    assert outs[0].count('msmlp: run finished') == 1 and 'run finished' not in outs[1]
    assert 'MEMBER: 1/2' in outs[0]
    assert (tmp_path / 'runs/cls/version_0/checkpoints/last.ckpt').is_file()


def cascade_small(path: Path) -> Path:
    """The Cascade Mask R-CNN config (SyncBN in its box heads) at the embedded default's scale."""
    from mmengine.config import Config
    configs = Path(__file__).resolve().parents[1] / 'configs' / 'mmdet'
    cfg = Config.fromfile(str(configs / 'cascade-mask-rcnn_msmlp-t_fpn_ms-crop-3x_coco.py'))
    mini = Config.fromfile(str(configs / 'mask-rcnn_msmlp-mini_fpn_shapes.py'))
    model = cfg.model
    model.backbone, model.neck, model.rpn_head = mini.model.backbone, mini.model.neck, mini.model.rpn_head
    model.roi_head.bbox_roi_extractor.out_channels = model.roi_head.mask_roi_extractor.out_channels = 64
    for head in model.roi_head.bbox_head:
        head.update(num_classes=3, in_channels=64, conv_out_channels=64, fc_out_channels=128)
    model.roi_head.mask_head.update(num_classes=3, in_channels=64, conv_out_channels=64)
    model.train_cfg.rpn_proposal, model.test_cfg.rpn = mini.model.train_cfg.rpn_proposal, mini.model.test_cfg.rpn
    for stage in model.train_cfg.rcnn:
        stage.sampler.num = 32
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader', 'train_cfg', 'param_scheduler'):
        cfg[key] = mini[key]
    assert "type='SyncBN'" in cfg.pretty_text
    cfg.dump(str(path))
    return path


def test_cascade_syncbn_runs_as_batchnorm_on_two_cpu_processes(env, tmp_path):
    config = cascade_small(tmp_path / 'cascade-small.py')
    done = msmlp(tmp_path, env, 'fit', '--task', 'det', f'--model.config={config}', *TWO, '--trainer.max_epochs=1',
                 '--trainer.limit_train_batches=2', '--trainer.limit_val_batches=0')
    one_report(done)
    assert (done.stdout + done.stderr).count('SyncBN layers run as BatchNorm on the CPU') == 1


# ----- metrics on one and on two processes ----------------------------------------------------------
def odd_split(task: str, data: Path, out: Path) -> Path:
    """A copy of the embedded dataset whose validation split lost one sample (odd sizes:
    399 cls images in batches of 64, 63 det images, 39 seg images)."""
    out.mkdir(parents=True)
    if task == 'cls':
        source = data / 'imagenet-shapes-v2'
        (out / 'train').symlink_to(source / 'train')
        shutil.copytree(source / 'val', out / 'val')
        next((out / 'val' / 'circle').iterdir()).unlink()
    elif task == 'det':
        source = data / 'coco-shapes-v1'
        for split in ('train', 'val'):
            (out / split).symlink_to(source / split)
        (out / 'annotations').mkdir()
        shutil.copy(source / 'annotations/instances_train.json', out / 'annotations')
        ann = json.loads((source / 'annotations/instances_val.json').read_text())
        dropped = ann['images'].pop()['id']
        ann['annotations'] = [a for a in ann['annotations'] if a['image_id'] != dropped]
        (out / 'annotations/instances_val.json').write_text(json.dumps(ann))
    else:
        source = data / 'ade20k-scenes-v1'
        for kind in ('images', 'annotations'):
            (out / kind).mkdir()
            (out / kind / 'training').symlink_to(source / kind / 'training')
            shutil.copytree(source / kind / 'validation', out / kind / 'validation')
        image = sorted((out / 'images/validation').iterdir())[-1]
        image.unlink()
        (out / 'annotations/validation' / (image.stem + '.png')).unlink()
    return out


TRAIN = {'cls': ['--trainer.max_epochs=3'],
         'det': ['--trainer.max_epochs=2', '--trainer.check_val_every_n_epoch=2'],
         'seg': ['--trainer.max_epochs=2', '--trainer.check_val_every_n_epoch=2']}
NONTRIVIAL = {'cls': 'val/top1', 'det': 'val/bbox_AP50', 'seg': 'val/mIoU'}


@pytest.mark.parametrize('task', ['cls', 'det', 'seg'])
def test_validation_metrics_are_the_same_on_one_and_on_two_processes(task, env, tmp_path):
    msmlp(tmp_path / 'train', env, 'fit', '--task', task, *TRAIN[task])
    checkpoint = tmp_path / 'train' / 'runs' / task / 'version_0' / 'checkpoints' / 'last.ckpt'
    root = odd_split(task, Path(env['MSMLP_DATA']), tmp_path / 'odd')
    args = ['validate', '--task', task, f'--ckpt_path={checkpoint}', f'--data.root={root}']
    one_run = msmlp(tmp_path / 'one', env, *args)
    two_run = msmlp(tmp_path / 'two', env, *args, *TWO)
    one, two = metrics_table(one_run.stdout + one_run.stderr), metrics_table(two_run.stdout + two_run.stderr)
    assert one.keys() == two.keys() and NONTRIVIAL[task] in one and one[NONTRIVIAL[task]] > 0.05, (one, two)
    for name, value in one.items():
        assert two[name] == pytest.approx(value, abs=1e-6), name
    if task == 'seg':
        assert sum(name.startswith('class ') for name in one) == 5
    assert two_run.stdout.count('Validate metric') == 1  # printed by the first process only


# ----- killed and resumed ----------------------------------------------------------------------------
def kill_after_checkpoint(args, cwd: Path, env, checkpoint: Path, min_step: int, steps_per_epoch: int) -> int:
    """Start ``msmlp ARGS``; SIGKILL the whole run (every process) once ``checkpoint`` holds a
    mid-epoch state at ``min_step`` or later; return that step."""
    cwd.mkdir(parents=True, exist_ok=True)
    with open(cwd / 'killed.log', 'w') as log:
        run = subprocess.Popen([str(MSMLP), *args], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
        seen = None
        try:
            while run.poll() is None:
                stamp = checkpoint.stat().st_mtime_ns if checkpoint.is_file() else None
                if stamp is not None and stamp != seen:
                    seen = stamp
                    step = torch.load(checkpoint, weights_only=True, map_location='cpu')['global_step']
                    if step >= min_step and step % steps_per_epoch:
                        os.killpg(run.pid, signal.SIGKILL)
                        run.wait()
                        return step
                time.sleep(0.01)
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
    raise AssertionError('the run ended before it was killed: ' + (cwd / 'killed.log').read_text()[-3000:])


def tensorboard_scalars(run: Path, tag: str) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def assert_resumed_exactly(uninterrupted: Path, resumed: Path, tags=('train/loss',)):
    a = torch.load(uninterrupted / 'checkpoints' / 'last.ckpt', weights_only=True, map_location='cpu')
    b = torch.load(resumed / 'checkpoints' / 'last.ckpt', weights_only=True, map_location='cpu')
    assert a['global_step'] == b['global_step']
    for key in ('state_dict', 'ema_state_dict'):
        assert (key in a) == (key in b)
        if key in a:
            assert a[key].keys() == b[key].keys()
            different = [k for k in a[key] if not torch.equal(a[key][k], b[key][k])]
            assert different == [], f'{key}: {len(different)} tensors differ, e.g. {different[:3]}'
    assert (uninterrupted / 'metrics.csv').read_bytes() == (resumed / 'metrics.csv').read_bytes()
    for tag in tags:
        assert tensorboard_scalars(uninterrupted, tag) == tensorboard_scalars(resumed, tag)


RECIPE = ['--data.num_workers=2', '--data.auto_augment=rand-m9-mstd0.5-inc1', '--data.re_prob=0.25',
          '--model.mixup_alpha=0.8', '--model.cutmix_alpha=1.0', '--model.label_smoothing=0.1',
          '--model.drop_path_rate=0.1', '--model.ema=true']


@pytest.mark.parametrize('task, extra, min_step, steps_per_epoch', [
    # cls: 25 steps an epoch; the released augmentations, drop path, Mixup/CutMix, EMA, 2 workers
    ('cls', ['--trainer.max_epochs=3', *RECIPE], 30, 25),
    ('cls', ['--trainer.max_epochs=3', *RECIPE, '--data.num_workers=0'], 30, 25),
    # seg: 30 steps an epoch; mmseg's random resize, crop and flip; validation every epoch
    ('seg', ['--trainer.max_epochs=2', '--trainer.check_val_every_n_epoch=1'], 31, 30),
    # det: 80 steps an epoch (cut to 30); mmdet's flip, RPN and RoI sampling
    ('det', ['--trainer.max_epochs=2', '--trainer.limit_train_batches=30', '--trainer.limit_val_batches=8',
             '--trainer.check_val_every_n_epoch=1'], 11, 30),
    # cls with EMA on 2 processes (12 steps an epoch each), killed and resumed on 2
    ('cls', ['--trainer.max_epochs=3', '--data.num_workers=2', '--model.drop_path_rate=0.1', '--model.ema=true',
             *TWO], 13, 12),
], ids=['cls-2-workers', 'cls-0-workers', 'seg', 'det', 'cls-2-processes'])
def test_a_killed_run_resumes_bit_for_bit(task, extra, min_step, steps_per_epoch, env, tmp_path):
    args = ['fit', '--task', task, *extra]
    msmlp(tmp_path / 'a', env, *args)
    run = tmp_path / 'b' / 'runs' / task / 'version_0'
    step = kill_after_checkpoint(args, tmp_path / 'b', env, run / 'checkpoints' / 'last.ckpt', min_step,
                                 steps_per_epoch)
    done = msmlp(tmp_path / 'b', env, *args, f'--ckpt_path={run / "checkpoints" / "last.ckpt"}')
    assert f'logs and checkpoints continue in {Path("runs") / task / "version_0"}' in done.stdout
    print(f'{task}: killed after the checkpoint of step {step}, resumed')
    assert_resumed_exactly(tmp_path / 'a' / 'runs' / task / 'version_0', run)
