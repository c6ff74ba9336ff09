"""Every configs/mmdet config builds and trains one iteration through mmengine's Runner, as
mmdet's tools/train.py runs it, with its dataset pointed at the embedded shapes data."""
from pathlib import Path

import pytest
import torch

pytest.importorskip('mmdet', reason='the OpenMMLab stack comes from scripts/setup.sh')
from mmengine.config import Config  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from tasks.embedded import coco as shapes  # noqa: E402

CONFIGS = Path(__file__).parent.parent / 'configs' / 'mmdet'
PAPER = [f'{kind}_msmlp-{size}_fpn_{schedule}_coco.py'
         for kind, schedule in (('mask-rcnn', '1x'), ('mask-rcnn', 'ms-crop-3x'), ('cascade-mask-rcnn', 'ms-crop-3x'))
         for size in 'tsb']
MSSWIN = ['mask-rcnn_msswin-t_fpn_1x_coco.py', 'mask-rcnn_msswin-t_fpn_ms-crop-3x_coco.py']
ALL = PAPER + MSSWIN + ['mask-rcnn_msmlp-mini_fpn_shapes.py', 'mask-rcnn_msswin-mini_fpn_shapes.py']
# S and B differ from T only in the backbone's arch and drop path: slow (run by .ci/run).
PARAMS = [pytest.param(name, marks=pytest.mark.slow) if '-s_' in name or '-b_' in name else name for name in ALL]


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """Small CPU iterations run several times faster on one intra-op thread (above all on a
    shared machine); mmdet's tools/train.py leaves this to the environment (OMP_NUM_THREADS)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('coco-shapes')
    shapes.write(root, split_sizes={'train': 4, 'val': 2})
    return root


def shrink(pipeline, factor: int = 8):
    """Divide every image scale and crop size of a pipeline by ``factor`` (CPU-sized images)."""
    def small(value):
        if isinstance(value, (tuple, list)) and value and all(isinstance(v, (int, float)) for v in value):
            return type(value)(max(16, int(v) // factor) for v in value)
        if isinstance(value, (tuple, list)):
            return type(value)(small(v) for v in value)
        return value
    for step in pipeline:
        for key in ('scale', 'scales', 'crop_size'):
            if key in step:
                step[key] = small(step[key])
        for nested in step.get('transforms', []):
            shrink(nested if isinstance(nested, list) else [nested], factor)
    return pipeline


def test_shrink_scales_nested_pipelines():
    cfg = Config.fromfile(str(CONFIGS / 'mask-rcnn_msmlp-t_fpn_ms-crop-3x_coco.py'))
    pipeline = shrink(cfg.train_dataloader.dataset.pipeline)
    choice = pipeline[3]['transforms']
    assert choice[0][0]['scales'][0] == (60, 166) and choice[1][1]['crop_size'] == (48, 75)


def test_headers_say_which_recipe_they_follow():
    for name in ALL:
        header = (CONFIGS / name).read_text().split('\n_base_')[0]
        assert 'recipe' in header and header.startswith('#'), name


def set_num_classes(node, num_classes: int) -> None:
    if isinstance(node, dict):
        if 'num_classes' in node:
            node['num_classes'] = num_classes
        for value in node.values():
            set_num_classes(value, num_classes)
    elif isinstance(node, (list, tuple)):
        for value in node:
            set_num_classes(value, num_classes)


def fewer_rois(train_cfg) -> None:
    """CPU-sized RoI sampling: 100 proposals and 64 sampled RoIs per image (every cascade stage)."""
    train_cfg.rpn_proposal.max_per_img = 100
    for stage in train_cfg.rcnn if isinstance(train_cfg.rcnn, list) else [train_cfg.rcnn]:
        stage.sampler.num = 64


def runner_config(name: str, root: Path, work_dir: Path) -> Config:
    """The config as tools/train.py reads it, its data pointed at the shapes dataset (with
    its 3 classes in the heads), one iteration then one validation image."""
    cfg = Config.fromfile(str(CONFIGS / name))
    cfg.work_dir = str(work_dir)
    cfg.model.backbone.init_cfg = None  # the released ImageNet weights are not part of the tests
    set_num_classes(cfg.model, len(shapes.CLASSES))
    fewer_rois(cfg.model.train_cfg)
    for split, loader in (('train', cfg.train_dataloader), ('val', cfg.val_dataloader),
                          ('val', cfg.test_dataloader)):
        dataset = loader.dataset
        dataset.update(data_root=str(root), ann_file=f'annotations/instances_{split}.json',
                       data_prefix=dict(img=f'{split}/'), metainfo=dict(classes=shapes.CLASSES),
                       indices=2 if split == 'train' else 1)
        shrink(dataset.pipeline)
        loader.update(batch_size=2, num_workers=0, persistent_workers=False)
    cfg.val_evaluator.ann_file = cfg.test_evaluator.ann_file = str(root / 'annotations' / 'instances_val.json')
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=1, val_interval=1)
    cfg.log_processor.by_epoch = False
    cfg.default_hooks.logger.interval = 1
    # a checkpoint after the iteration only for the small model (a B detector's is ~1 GB with AdamW state)
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', by_epoch=False, interval=1 if 'mini' in name else -1,
                                        save_last='mini' in name)
    return cfg


@pytest.mark.parametrize('name', PARAMS)
def test_config_trains_one_iteration_through_the_runner(name, shapes_root, tmp_path):
    cfg = runner_config(name, shapes_root, tmp_path)
    assert cfg.custom_imports == dict(imports=['msmlp.mm'], allow_failed_imports=False)
    runner = Runner.from_cfg(cfg)  # as mmdet's tools/train.py does
    assert type(runner.model.backbone).__name__ == ('MSSwinBackbone' if 'msswin' in name else 'MSMLPBackbone')
    stem = runner.model.backbone.patch_embed.proj.weight  # on every path (blocks may be dropped)
    before = stem.detach().clone()
    runner.train()
    assert runner.iter == 1
    assert not torch.equal(before, stem)
    log = next(tmp_path.glob('*/*.log')).read_text()
    assert 'Iter(train) [1/1]' in log and 'Iter(val) [1/1]' in log
    if 'mini' in name:
        # A full mmengine training checkpoint pickles mmengine objects (HistoryBuffer) beside the
        # weights: the safe loader reads them as inert stand-ins and loads the weights.
        backbone = runner.model.backbone
        fresh = type(backbone)(**{k: v for k, v in cfg.model.backbone.items() if k != 'type'})
        fresh._load(fresh, tmp_path / 'iter_1.pth')  # load_pretrained, or MSSwin's load_swin_checkpoint
        trained = dict(backbone.named_parameters())
        assert all(torch.equal(p, trained[n]) for n, p in fresh.named_parameters())
        # tools/train.py --resume (and tools/test.py, through the same loader) reads it too
        resumed = runner_config(name, shapes_root, tmp_path)
        resumed.train_cfg.max_iters, resumed.resume, resumed.load_from = 2, True, str(tmp_path / 'iter_1.pth')
        runner = Runner.from_cfg(resumed)
        runner.train()
        assert runner.iter == 2 and len(runner.message_hub.get_scalar('train/loss').data[0]) == 2  # both iterations


def test_the_docs_config_over_any_mmdet_config_builds(tmp_path):
    """docs/detection.md's snippet over mmdet's ResNet-50 Mask R-CNN (without ``_delete_`` the
    ResNet's ``depth`` reached MSMLP)."""
    import re
    from mmengine.registry import init_default_scope
    from mmdet.registry import MODELS
    docs = (CONFIGS.parents[1] / 'docs' / 'detection.md').read_text()
    snippet = re.search(r'Any mmdet 3\.x config reaches.*?```python\n(.*?)```', docs, re.S).group(1)
    (tmp_path / 'over_resnet.py').write_text(snippet)
    cfg = Config.fromfile(str(tmp_path / 'over_resnet.py'))
    cfg.model.backbone.init_cfg = None  # the released ImageNet weights are not part of the tests
    init_default_scope('mmdet')
    detector = MODELS.build(cfg.model)
    assert type(detector.backbone).__name__ == 'MSMLPBackbone' and detector.neck.in_channels == [96, 192, 384, 768]
