"""msmlp {fit,validate,test,predict} --task det: metrics, bad input, the recipe, the CLI."""
import copy
import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip('mmdet', reason='the OpenMMLab stack comes from scripts/setup.sh')

import cli  # noqa: E402
from tasks.base import InputError  # noqa: E402
from tasks.detection import (CocoDataModule, CocoTargets, DetectionTask, check_coco, coco_map_metric,  # noqa: E402
                             coco_map_names, predictions)
from tasks.embedded import coco as shapes  # noqa: E402
from tasks.openmmlab import collate_predict  # noqa: E402

MINI = 'mmdet/mask-rcnn_msmlp-mini_fpn_shapes.py'


def write_shapes(root: Path, train: int = 4, val: int = 2) -> Path:
    shapes.write(root, split_sizes={'train': train, 'val': val})
    return root


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp('shapes'))


def add_awkward_annotations(data: dict) -> dict:
    """Image 1: + a crowd region; image 2: + a zero-area box and a box outside the image;
    image 3: no annotations at all. Returns the ids added, by kind."""
    anns = data['annotations']
    next_id = max(a['id'] for a in anns) + 1
    first = next(a for a in anns if a['image_id'] == 1)
    crowd = dict(copy.deepcopy(first), id=next_id, iscrowd=1)
    crowd['bbox'] = [0, 0, 40, 40]
    crowd['segmentation'] = [[0, 0, 40, 0, 40, 40, 0, 40]]
    crowd['area'] = 1600.0
    zero = dict(copy.deepcopy(first), id=next_id + 1, image_id=2, bbox=[10, 10, 0, 5], area=0.0)
    outside = dict(copy.deepcopy(first), id=next_id + 2, image_id=2, bbox=[500, 500, 20, 20], area=400.0,
                   segmentation=[[500, 500, 520, 500, 520, 520]])
    data['annotations'] = [a for a in anns if a['image_id'] != 3] + [crowd, zero, outside]
    return dict(crowd=[crowd['id']], skipped=[zero['id'], outside['id']], unannotated=[3])


# ----- metrics -----------------------------------------------------------------------------
def fake_predictions(targets: CocoTargets, image_id: int, rng: np.random.Generator):
    """Detections near the ground truth (some shifted, some mislabelled) plus false positives."""
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData
    image = targets.images[image_id]
    gt = targets(image_id)
    h, w = image['height'], image['width']
    boxes, labels, masks = [], [], []
    for box, label, mask in zip(gt['boxes'], gt['labels'], gt['masks']):
        shift = rng.integers(-6, 7, 2)
        boxes.append(box + torch.tensor([*shift, *shift], dtype=torch.float32))
        labels.append(int(label) if rng.random() < 0.8 else int(rng.integers(3)))
        masks.append(torch.roll(mask, tuple(int(s) for s in shift[::-1]), dims=(0, 1)))
    for _ in range(int(rng.integers(0, 4))):
        x, y = rng.uniform(0, w - 30), rng.uniform(0, h - 30)
        size = rng.uniform(8, 60)
        boxes.append(torch.tensor([x, y, x + size, y + size], dtype=torch.float32))
        labels.append(int(rng.integers(3)))
        mask = torch.zeros(h, w, dtype=torch.bool)
        mask[int(y):int(y + size), int(x):int(x + size)] = True
        masks.append(mask)
    pred = InstanceData(bboxes=torch.stack(boxes) if boxes else torch.zeros(0, 4),
                        scores=torch.from_numpy(rng.uniform(0.05, 1, len(boxes))).float(),
                        labels=torch.tensor(labels, dtype=torch.long),
                        masks=torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.bool))
    return DetDataSample(pred_instances=pred, metainfo=dict(img_id=image_id, ori_shape=(h, w)))


def test_metrics_equal_mmdet_coco_metric(tmp_path):
    from mmdet.evaluation import CocoMetric
    data_root = write_shapes(tmp_path / 'data', train=1, val=24)
    ann_file = data_root / 'annotations' / 'instances_val.json'
    edit_json(ann_file, add_awkward_annotations)
    targets = CocoTargets(str(ann_file), shapes.CLASSES)
    rng = np.random.default_rng(0)
    samples = [fake_predictions(targets, image_id, rng) for image_id in targets.images]

    ours = coco_map_metric(('bbox', 'segm'))
    for sample in samples:
        ours.update(predictions([sample], with_masks=True), [targets(sample.img_id)])
    ours = coco_map_names(ours.compute(), ('bbox', 'segm'))

    reference = CocoMetric(ann_file=str(ann_file), metric=['bbox', 'segm'])
    reference.dataset_meta = dict(classes=shapes.CLASSES)
    reference.process({}, [s.to_dict() for s in samples])
    theirs = reference.evaluate(len(samples))

    names = {'AP': 'mAP', 'AP50': 'mAP_50', 'AP75': 'mAP_75', 'APs': 'mAP_s', 'APm': 'mAP_m', 'APl': 'mAP_l'}
    for iou_type in ('bbox', 'segm'):
        for ours_name, their_name in names.items():
            assert ours[f'{iou_type}_{ours_name}'] == pytest.approx(theirs[f'coco/{iou_type}_{their_name}'],
                                                                   abs=1e-3), (iou_type, ours_name)
    assert 0.1 < ours['bbox_AP50'] < 0.99  # a non-trivial comparison


# ----- bad input ---------------------------------------------------------------------------
def check(root: Path, split: str = 'val'):
    return check_coco(str(root / 'annotations' / f'instances_{split}.json'), str(root / split), shapes.CLASSES,
                      needs_masks=True)


@pytest.mark.parametrize('content, message', [
    (None, r'annotation file not found: .*instances_val\.json'),
    ('not json', r'instances_val\.json is not a COCO annotation file: not valid JSON'),
    ('[1, 2]', r'instances_val\.json is not a COCO annotation file: it holds a JSON list'),
    ('{"images": [], "annotations": []}', r'instances_val\.json is not a COCO instances file: it has no categories'),
])
def test_missing_or_non_coco_annotation_file(tmp_path, content, message):
    data_root = write_shapes(tmp_path / 'data', train=1, val=2)
    path = data_root / 'annotations' / 'instances_val.json'
    if content is None:
        path.unlink()
    else:
        path.write_text(content)
    with pytest.raises(InputError, match=message):
        check(data_root)


def test_image_listed_but_missing_on_disk(tmp_path):
    data_root = write_shapes(tmp_path / 'data', train=1, val=2)
    (data_root / 'val' / '000001.jpg').unlink()
    with pytest.raises(InputError, match=r'1 image\(s\) listed in .*instances_val\.json are missing on disk: '
                                         r'.*val/000001\.jpg \(image id 2\)'):
        check(data_root)


def test_category_id_not_in_categories(tmp_path):
    data_root = write_shapes(tmp_path / 'data', train=1, val=2)
    path = data_root / 'annotations' / 'instances_val.json'
    edit_json(path, lambda d: d['annotations'][0].update(category_id=99))
    ann_id = json.loads(path.read_text())['annotations'][0]['id']
    with pytest.raises(InputError, match=rf'instances_val\.json: annotation {ann_id} has category_id 99, which is '
                                         r'not in its categories list \(ids \[1, 2, 3\]\)'):
        check(data_root)


def test_unlisted_image_id_duplicate_ids_and_missing_fields(tmp_path):
    data_root = write_shapes(tmp_path / 'data', train=1, val=2)
    path = data_root / 'annotations' / 'instances_val.json'
    original = path.read_text()
    edit_json(path, lambda d: d['annotations'][0].update(image_id=77))
    with pytest.raises(InputError, match=r'refers to image_id 77, which is not in its images list'):
        check(data_root)
    path.write_text(original)
    edit_json(path, lambda d: d['images'][1].update(id=1))
    with pytest.raises(InputError, match=r'images ids are not unique: 1'):
        check(data_root)
    path.write_text(original)
    edit_json(path, lambda d: d['annotations'][0].pop('area'))
    with pytest.raises(InputError, match=r'annotations id \d+ lacks area'):
        check(data_root)


def test_an_evaluated_image_of_another_size_than_its_coco_entry_is_refused(tmp_path):
    """COCOeval would draw the ground-truth masks at the listed size: mask AP 0, silently."""
    data_root = write_shapes(tmp_path / 'data', train=1, val=2)
    path = data_root / 'annotations' / 'instances_val.json'
    edit_json(path, lambda d: d['images'][0].update(width=120, height=60))
    entry = json.loads(path.read_text())['images'][0]
    datamodule = CocoDataModule(root=str(data_root), config=MINI)
    datamodule.setup('validate')
    val = datamodule.datasets['val']
    index = [val.get_data_info(i)['img_id'] for i in range(len(val))].index(entry['id'])
    with pytest.raises(InputError, match=rf'instances_val\.json gives image .*{entry["file_name"]} as 120x60 '
                                         r'\(WxH\) but the file is \d+x\d+$'):
        val[index]


def test_a_training_image_turned_by_its_exif_orientation_is_refused(tmp_path):
    """mmcv reads images turned by their EXIF orientation; the boxes are drawn on the listed size."""
    from PIL import Image
    data_root = write_shapes(tmp_path / 'data', train=4, val=1)
    images = json.loads((data_root / 'annotations' / 'instances_train.json').read_text())['images']
    entry = next(img for img in images if img['width'] != img['height'])
    path = data_root / 'train' / entry['file_name']
    image = Image.open(path)
    exif = image.getexif()
    exif[0x0112] = 6  # a quarter turn
    image.save(path, exif=exif, quality=95)
    datamodule = CocoDataModule(root=str(data_root), config=MINI)
    datamodule.setup('fit')
    train = datamodule.datasets['train']
    index = [train.get_data_info(i)['img_id'] for i in range(len(train))].index(entry['id'])
    with pytest.raises(InputError, match=rf'instances_train\.json gives image .*{entry["file_name"]} as '
                                         rf'{entry["width"]}x{entry["height"]} \(WxH\) but the file is '
                                         rf'{entry["height"]}x{entry["width"]} \(its EXIF orientation 6 turns it'):
        train[index]
    others = [i for i in range(len(train)) if i != index]
    assert train[others[0]]['inputs'].shape[0] == 3


@pytest.mark.parametrize('edit, message', [
    (lambda d: d['annotations'][0].update(iscrowd='0'), r"annotation \d+ has iscrowd '0', not 0 or 1"),
    (lambda d: d['images'][0].update(width='128'), r"image 1 has width '128', not a whole number of pixels > 0"),
    (lambda d: d['images'][0].update(height=0), r'image 1 has height 0, not a whole number of pixels > 0'),
    (lambda d: d['annotations'][0].update(segmentation=[1, 1, 9, 1, 9, 9]),
     r'annotation \d+ has a flat segmentation list \[x1, y1, \.\.\.\]: COCO polygons are a list of polygons'),
    (lambda d: d['annotations'][0].update(segmentation={'counts': [0, 4], 'size': [2, 2]}),
     r'annotation \d+ has an RLE mask of size \[2, 2\] \(height, width\) on image \d+ of \d+x\d+'),
    (lambda d: d['annotations'][0].update(category_id='1'),
     r"annotation \d+ has category_id '1', which is not in its categories list \(ids \[1, 2, 3\]\)"),
])
def test_fields_of_the_wrong_type_are_one_line_naming_the_id(tmp_path, edit, message):
    """Each was a TypeError traceback, or (iscrowd '0', a true string) every box a crowd region."""
    data_root = write_shapes(tmp_path / 'data', train=1, val=2)
    edit_json(data_root / 'annotations' / 'instances_val.json', edit)
    with pytest.raises(InputError, match=r'instances_val\.json: ' + message):
        check(data_root)


def test_annotations_of_classes_the_config_does_not_train_are_warned_about(tmp_path):
    data_root = write_shapes(tmp_path / 'data', train=1, val=4)
    data = json.loads((data_root / 'annotations' / 'instances_val.json').read_text())
    names = {cat['id']: cat['name'] for cat in data['categories']}
    unused = [a for a in data['annotations'] if names[a['category_id']] != 'circle']
    with pytest.warns(UserWarning, match=rf'instances_val\.json: {len(unused)} annotation\(s\) of categories the '
                                         r'config does not train \(square, triangle\) are not used: '
                                         r"metainfo.classes lists 1 of the file's 3 categories"):
        check_coco(str(data_root / 'annotations' / 'instances_val.json'), str(data_root / 'val'), ('circle',))


def test_classes_out_of_the_files_order_or_absent_are_short_errors(tmp_path):
    """The first class out of place, not both lists (COCO's 80 names twice made a 3 KB line)."""
    data_root = write_shapes(tmp_path / 'data', train=1, val=2)
    ann_file, images = str(data_root / 'annotations' / 'instances_val.json'), str(data_root / 'val')
    with pytest.raises(InputError, match=r"^.*instances_val\.json: the config lists its 3 classes in another order "
                                         r"than the file's categories: class 0 is 'square' in the config, 'circle' in "
                                         r"the file; mmdet numbers labels in the file's order, so set metainfo.classes "
                                         r"in that order$"):
        check_coco(ann_file, images, ('square', 'circle', 'triangle'))
    with pytest.raises(InputError, match=r"^.*instances_val\.json: 2 of the config's classes are not among its 3 "
                                         r"categories: 'dog', 'cat' \(its categories: 'circle', 'square', "
                                         r"'triangle'\)$"):
        check_coco(ann_file, images, ('circle', 'dog', 'cat'))


def test_awkward_annotations_are_handled_as_documented(tmp_path):
    data_root = write_shapes(tmp_path / 'data', train=6, val=4)
    added = {}
    for split in ('train', 'val'):
        edit_json(data_root / 'annotations' / f'instances_{split}.json',
                  lambda d: added.__setitem__(split, add_awkward_annotations(d)))
    report = check(data_root, 'train')
    assert {kind: report[kind] for kind in added['train']} == added['train']

    datamodule = CocoDataModule(root=str(data_root), config=MINI)
    with pytest.warns(UserWarning, match=r'2 annotation\(s\) with zero area, NaN values or outside their image are '
                                         r'skipped'):
        datamodule.setup('fit')
    train, val = datamodule.datasets['train'], datamodule.datasets['val']
    assert len(train) == 5  # the unannotated image is not trained on
    assert len(val) == 4  # ... but is evaluated
    ids = [train.get_data_info(i)['img_id'] for i in range(len(train))]
    assert 3 not in ids
    crowd_item = train[ids.index(1)]['data_samples']
    assert len(crowd_item.ignored_instances) == 1  # the crowd region is no training target
    anns = json.loads((data_root / 'annotations/instances_train.json').read_text())['annotations']
    kept = [a for a in anns if a['image_id'] == 2 and a['id'] not in added['train']['skipped']]
    assert len(train[ids.index(2)]['data_samples'].gt_instances) == len(kept)  # zero-area / outside dropped
    val_targets = {val[i]['data_samples'].img_id: val[i]['targets'] for i in range(len(val))}
    assert val_targets[1]['iscrowd'].tolist().count(1) == 1
    assert len(val_targets[3]['boxes']) == 0 and val_targets[3]['masks'].shape[0] == 0

    task = DetectionTask(config=MINI)
    from mmengine.dataset import pseudo_collate
    batch = pseudo_collate([train[ids.index(1)], train[ids.index(2)]])
    data = task.model.data_preprocessor(batch, True)
    loss, _ = task.model.parse_losses(task.model(**data, mode='loss'))
    assert torch.isfinite(loss)


def test_bad_input_through_the_cli_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    data_root = write_shapes(tmp_path / 'data', train=2, val=1)
    edit_json(data_root / 'annotations' / 'instances_train.json',
              lambda d: d['annotations'][0].update(category_id=42))
    monkeypatch.chdir(tmp_path)
    code = cli.main(['fit', '--task', 'det', '--trainer.fast_dev_run=1', f'--data.root={data_root}'])
    err = capsys.readouterr().err
    assert code == 1
    assert 'msmlp: error:' in err and 'instances_train.json: annotation 1 has category_id 42' in err


def test_heads_that_do_not_fit_the_classes_are_an_error(root):
    task = DetectionTask(config=MINI, cfg_options={'model.roi_head.bbox_head.num_classes': 5})
    with pytest.raises(InputError, match=r"heads predict \[3, 5\] classes but the data has 3"):
        task.check_classes(shapes.CLASSES)


# ----- the recipe --------------------------------------------------------------------------
def test_optimizer_and_schedule_come_from_the_config(root, tmp_path):
    """Lightning steps the config's param_scheduler exactly as mmengine's ParamSchedulerHook."""
    from lightning.pytorch import Trainer
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import PARAM_SCHEDULERS
    schedule = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=3),
                dict(type='MultiStepLR', begin=0, end=2, by_epoch=True, milestones=[1], gamma=0.1)]
    task = DetectionTask(config=MINI, cfg_options={'param_scheduler': schedule})
    datamodule = CocoDataModule(root=str(root), batch_size=2)
    trainer = Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(task, datamodule)

    groups = task.optim_wrapper.optimizer.param_groups
    decay = {n: g['weight_decay'] for g in groups for n in [id(p) for p in g['params']]}
    names = dict(task.model.named_parameters())
    assert decay[id(names['backbone.layers.0.blocks.0.norm.weight'])] == 0
    assert decay[id(names['backbone.out_norms.2.bias'])] == 0
    assert decay[id(names['backbone.layers.1.blocks.0.gamma'])] == 0
    assert decay[id(names['backbone.layers.1.blocks.0.pwconv1.weight'])] == 0.05
    assert type(task.optim_wrapper.optimizer).__name__ == 'AdamW'

    # the same schedule stepped by hand the way mmengine's runner steps it: 2 epochs x 2 iterations
    reference = build_optim_wrapper(torch.nn.Linear(1, 1), dict(type='OptimWrapper', optimizer=dict(
        type='AdamW', lr=task.cfg.optim_wrapper.optimizer.lr)))
    schedulers = [PARAM_SCHEDULERS.build(dict(s), default_args=dict(optimizer=reference)) for s in schedule]
    for _epoch in range(2):
        for _ in range(2):
            [s.step() for s in schedulers if not s.by_epoch]
        [s.step() for s in schedulers if s.by_epoch]
    assert groups[0]['lr'] == pytest.approx(reference.param_groups[0]['lr'])
    base_lr = task.cfg.optim_wrapper.optimizer.lr
    assert groups[0]['lr'] == pytest.approx(base_lr * 0.1)  # warm-up done (3 steps), then one step at epoch 1


# ----- the CLI -----------------------------------------------------------------------------
def test_fit_fast_dev_run_through_the_cli(root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(['fit', '--task', 'det', '--trainer.fast_dev_run=1', f'--data.root={root}']) == 0
    out = capsys.readouterr().out
    assert 'val: bbox_AP=' in out and 'segm_AP50=' in out


def test_fit_checkpoint_then_validate_test_and_predict(root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(['fit', '--task', 'det', f'--data.root={root}', '--trainer.max_epochs=1',
                     '--trainer.limit_train_batches=1', '--trainer.check_val_every_n_epoch=1']) == 0
    checkpoints = sorted(tmp_path.glob('runs/det/*/checkpoints/last.ckpt'))
    assert checkpoints, list(tmp_path.rglob('*.ckpt'))
    saved = torch.load(checkpoints[-1], weights_only=True)  # plain types only
    assert saved['classes'] == list(shapes.CLASSES) and len(saved['param_schedulers']) == 2
    from msmlp import MSMLP, load_pretrained
    backbone = MSMLP(num_classes=0, embed_dim=32, depths=(1, 1, 2, 1), out_indices=(0, 1, 2, 3))
    load_pretrained(backbone, checkpoints[-1])

    capsys.readouterr()
    for subcommand in ('validate', 'test'):
        assert cli.main([subcommand, '--task', 'det', f'--data.root={root}', f'--ckpt_path={checkpoints[-1]}']) == 0
        assert f'{"val" if subcommand == "validate" else "test"}: bbox_AP=' in capsys.readouterr().out

    out_dir = tmp_path / 'pngs'
    assert cli.main(['predict', '--task', 'det', f'--data.root={root}', f'--ckpt_path={checkpoints[-1]}',
                     f'--model.predict_dir={out_dir}']) == 0
    pngs = sorted(out_dir.glob('*.png'))
    assert [p.name for p in pngs] == ['000000.png', '000001.png']
    assert f'wrote 2 prediction images to {out_dir}' in capsys.readouterr().out
    from PIL import Image
    assert Image.open(pngs[0]).size == Image.open(root / 'val' / '000000.jpg').size

    exported = tmp_path / 'export' / 'det.pth'  # for mmdet's own tools, from this run's checkpoint
    assert cli.main(['export', '--checkpoint', str(checkpoints[-1]), '--format', 'openmmlab',
                     '--output', str(exported)]) == 0
    assert 'builds the model from' in capsys.readouterr().out
    meta = torch.load(exported, weights_only=True)['meta']
    assert meta['dataset_meta']['classes'] == tuple(shapes.CLASSES)


def test_a_run_of_your_own_config_is_used_from_other_folders_and_warns_when_the_file_changed(
        root, tmp_path, monkeypatch, capsys, recwarn):
    """The checkpoint records a user's config file by its absolute path (a shipped one by its
    name), so validate/test/predict/resume work from any folder; a file edited since is said."""
    from tasks.base import CONFIG_DIR
    work, elsewhere = tmp_path / 'work', tmp_path / 'elsewhere'
    work.mkdir()
    elsewhere.mkdir()
    mine = work / 'my_det.py'
    mine.write_text(f"_base_ = '{CONFIG_DIR / MINI}'\noptim_wrapper = dict(optimizer=dict(lr=0.002))\n")
    monkeypatch.chdir(work)
    assert cli.main(['fit', '--task', 'det', '--model.config=my_det.py', f'--data.root={root}',
                     '--trainer.max_epochs=1', '--trainer.limit_train_batches=1', '--trainer.limit_val_batches=1']) == 0
    checkpoint = work / 'runs/det/version_0/checkpoints/last.ckpt'
    assert torch.load(checkpoint, weights_only=True)['hyper_parameters']['config'] == str(mine)
    assert f'task det: {mine} (' in capsys.readouterr().out

    monkeypatch.chdir(elsewhere)
    validate = ['validate', '--task', 'det', f'--ckpt_path={checkpoint}', '--trainer.limit_val_batches=1']
    recwarn.clear()
    assert cli.main(validate) == 0
    assert not [w for w in recwarn if 'differs from the one the checkpoint' in str(w.message)]
    mine.write_text(mine.read_text().replace('lr=0.002', 'lr=0.001'))
    assert cli.main(validate) == 0
    changed = [str(w.message) for w in recwarn if 'differs from the one the checkpoint' in str(w.message)]
    assert len(changed) == 1 and 'lr=0.002' in changed[0] and 'lr=0.001' in changed[0], changed
    assert DetectionTask(config=f'configs/{MINI}').hparams['config'] == MINI  # shipped: by name, for any clone


def test_a_config_that_is_not_python_or_lacks_its_base_is_one_line_naming_the_file(tmp_path):
    broken, child, orphan = tmp_path / 'broken.py', tmp_path / 'child.py', tmp_path / 'orphan.py'
    broken.write_text("model = dict(\n")
    child.write_text("_base_ = './broken.py'\n")
    orphan.write_text("_base_ = ['./gone.py']\n")
    with pytest.raises(InputError, match=f"^{broken}: not valid Python: line 1: '\\(' was never closed$"):
        DetectionTask(config=str(broken))
    with pytest.raises(InputError, match=f"^{broken}: not valid Python: .* \\(a _base_ of {child}\\)$"):
        DetectionTask(config=str(child))
    with pytest.raises(InputError, match=f'^{orphan}: No such file or directory: {tmp_path / "gone.py"} '):
        DetectionTask(config=str(orphan))


@pytest.mark.parametrize('precision, named', [
    ('bf16-mixed', 'bf16-mixed (or 16-mixed, which Lightning runs as bf16-mixed on the CPU)'),
    # Lightning turns 16-mixed into bf16-mixed on the CPU before the task sees it
    ('16-mixed', 'bf16-mixed (or 16-mixed, which Lightning runs as bf16-mixed on the CPU)'),
    ('64-true', '64-true'),  # was a traceback: "expected scalar type Float but found Double" in mmcv's nms
])
def test_other_precisions_on_the_cpu_are_one_line(precision, named, root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(['fit', '--task', 'det', f'--data.root={root}', '--trainer.fast_dev_run=1',
                     f'--trainer.precision={precision}']) == 1
    assert capsys.readouterr().err == (f'msmlp: error: trainer.precision={named}: detection on the CPU runs in '
                                       "32-true only (mmcv's CPU NMS takes float32 boxes); drop --trainer.precision\n")


def test_a_missing_pretrained_file_and_a_score_threshold_above_one_are_one_line(root, tmp_path, monkeypatch, capsys):
    # before: advice to edit model.backbone.init_cfg, which the command line never showed; 5 drew nothing, silently
    monkeypatch.chdir(tmp_path)
    assert cli.main(['fit', '--task', 'det', f'--data.root={root}', '--trainer.fast_dev_run=1',
                     '--model.pretrained=nope.pth']) == 1
    assert capsys.readouterr().err == ("msmlp: error: model.pretrained: checkpoint not found: nope.pth (a backbone "
                                       "checkpoint file or URL; --model.pretrained '' trains the backbone from scratch)\n")
    with pytest.raises(InputError, match=r'^model.score_thr=5: detection scores are in 0..1'):
        DetectionTask(score_thr=5)


def test_validating_a_run_does_not_read_its_starting_backbone_weights(root, tmp_path, monkeypatch, capsys):
    """The checkpoint replaces the backbone's init_cfg weights: a file deleted since (or a URL
    out of reach) does not matter to validate."""
    from msmlp import MSMLP
    monkeypatch.chdir(tmp_path)
    torch.save(MSMLP(num_classes=0, embed_dim=32, depths=(1, 1, 2, 1)).state_dict(), tmp_path / 'backbone.pth')
    assert cli.main(['fit', '--task', 'det', f'--data.root={root}', '--model.pretrained=backbone.pth',
                     '--trainer.max_epochs=1', '--trainer.limit_train_batches=1', '--trainer.limit_val_batches=1']) == 0
    (tmp_path / 'backbone.pth').unlink()
    assert cli.main(['validate', '--task', 'det', '--ckpt_path=last', '--trainer.limit_val_batches=1']) == 0
    assert 'val: bbox_AP=' in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize('config, runs', [(None, 'det'), ('mask-rcnn_msswin-mini_fpn_shapes', 'det_msswin_mini')],
                         ids=['default', 'msswin-mini'])
def test_embedded_default_reaches_ap50(config, runs, tmp_path, monkeypatch, capsys):
    """`msmlp fit --task det` with nothing else: bbox AP50 >= 0.5 (seeds 0-2 ended at 0.78-0.88 here;
    the time is printed, not asserted: these machines are shared). The same run with a small MS-Swin
    backbone (configs/det/mask-rcnn_msswin-mini_fpn_shapes.yaml; 0.891 here on 2026-12-07) clears
    the same floor."""
    monkeypatch.setenv('MSMLP_DATA', str(tmp_path / 'data'))
    monkeypatch.chdir(tmp_path)
    config_args = ['--config', str(Path(cli.__file__).parent / 'configs' / 'det' / f'{config}.yaml')] if config else []
    start = time.perf_counter()
    assert cli.main(['fit', '--task', 'det', *config_args]) == 0
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    assert f'task det: mmdet/{config or "mask-rcnn_msmlp-mini_fpn_shapes"}.py' in out
    rows = list(csv.DictReader(open(next(tmp_path.glob(f'runs/{runs}/version_*/metrics.csv')))))
    ap50 = [float(r['val/bbox_AP50']) for r in rows if r.get('val/bbox_AP50')]
    print(f'embedded det {config or "default"}: {elapsed:.0f} s, bbox AP50 {ap50}')
    assert 'bbox_AP50=' in out
    assert ap50[-1] >= 0.5


@pytest.mark.parametrize('yaml', sorted(p.name for p in (Path(cli.__file__).parent / 'configs/det').glob('*.yaml')
                                        if p.name != 'default.yaml'))
def test_coco_yaml_configs_point_at_their_mmdet_config(yaml, capsys):
    """Each configs/det/*.yaml parses on top of the default and names an existing mmdet config; the
    paper-scale ones read COCO, the mini ones the embedded data."""
    from tasks.base import find_config
    path = Path(cli.__file__).parent / 'configs' / 'det' / yaml
    with pytest.raises(SystemExit):
        cli.run_lightning('det', ['fit', '--config', str(path), '--print_config'])
    printed = capsys.readouterr().out
    assert f'config: mmdet/{yaml[:-len(".yaml")]}.py' in printed
    assert ('root: null' if '-mini_' in yaml else 'root: data/coco') in printed
    assert find_config(f'mmdet/{yaml[:-len(".yaml")]}.py').is_file()


def test_malformed_boxes_and_polygons_are_warned_about(tmp_path):
    data_root = write_shapes(tmp_path / 'data', train=2, val=2)
    spoiled = {}

    def spoil(split, data):
        anns = data['annotations']
        anns[0]['segmentation'] = [[1, 1, 5, 5]]  # two points: no polygon
        anns[1]['bbox'] = [float('nan'), 3, 10, 10]
        anns[2]['bbox'] = [5, 5, -4, 10]
        anns[3]['bbox'] = [-50, 3, 10, 10]  # left of the image
        spoiled[split] = [a['id'] for a in anns[:4]]

    for split in ('train', 'val'):
        edit_json(data_root / 'annotations' / f'instances_{split}.json', lambda d, s=split: spoil(s, d))
    first, *boxes = spoiled['train']
    with pytest.warns(UserWarning) as train_warnings:
        report = check_coco(str(data_root / 'annotations/instances_train.json'), str(data_root / 'train'),
                            shapes.CLASSES, needs_masks=True, training=True)
    assert report['no_polygon'] == [first] and report['malformed'] == boxes and set(boxes) <= set(report['skipped'])
    messages = [str(w.message) for w in train_warnings]
    assert any(f'have no polygon of 3 or more points: mmdet ignores these instances in training (ids {first})' in m
               for m in messages)
    assert any('NaN values or outside their image are skipped in training' in m for m in messages)

    with pytest.warns(UserWarning) as val_warnings:
        check(data_root, 'val')
    messages = [str(w.message) for w in val_warnings]
    ids = ', '.join(map(str, spoiled['val'][1:]))
    assert any(f'negative sizes or outside their image; they are evaluated as the file has them, as CocoMetric does '
               f'(ids {ids})' in m for m in messages), messages
    assert any('their masks are empty in the mask AP' in m for m in messages)


def test_an_unreadable_image_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    data_root = write_shapes(tmp_path / 'data', train=2, val=2)
    first = json.loads((data_root / 'annotations/instances_val.json').read_text())['images'][0]['file_name']
    broken = data_root / 'val' / first  # in the first validation batch of fast_dev_run
    broken.write_bytes(broken.read_bytes()[:300])
    monkeypatch.chdir(tmp_path)
    assert cli.main(['fit', '--task', 'det', '--trainer.fast_dev_run=1', f'--data.root={data_root}']) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f'msmlp: error: cannot read {broken}: ') and 'Traceback' not in err


def test_predicting_a_folder_says_what_it_does_not_read(tmp_path):
    from PIL import Image
    for name in ('a.png', 'b.JPG', 'c.gif', 'sub/d.png'):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new('RGB', (8, 8)).save(tmp_path / name)
    (tmp_path / '.hidden.png').write_bytes((tmp_path / 'a.png').read_bytes())
    with pytest.warns(UserWarning, match=r"predict_images='.*': 2 entries are not read \(c\.gif, sub/\): only the "
                                         r'\.jpg/.* files in the folder itself are'):
        paths = CocoDataModule._image_paths(str(tmp_path))
    assert paths == [str(tmp_path / 'a.png'), str(tmp_path / 'b.JPG')]
    # a glob, ** reaching into folders
    assert CocoDataModule._image_paths(str(tmp_path / '**' / '*.png')) == [str(tmp_path / 'a.png'),
                                                                          str(tmp_path / 'sub' / 'd.png')]


def test_predicting_an_unreadable_image_names_it_beside_the_batch(tmp_path):
    good, broken = tmp_path / 'good.png', tmp_path / 'broken.png'
    from PIL import Image
    Image.new('RGB', (40, 30), 'red').save(good)
    broken.write_bytes(good.read_bytes()[:60])
    data = CocoDataModule(predict_images=str(tmp_path), config=MINI)
    data.setup('predict')
    images = data.datasets['predict']
    assert len(images) == 2 and images[1]['inputs'].shape[0] == 3  # good.png, sorted after broken.png
    # predict goes past it: the batch carries it beside the readable images, which are collated as before
    index, reason = images[0]['unreadable']
    assert index == 0 and reason.startswith(f'cannot read {broken}: ')
    batch = collate_predict([images[0], images[1]])
    assert len(batch['inputs']) == 1 and batch['data_samples'][0].img_path == str(good)
    assert batch['unreadable'] == [(0, reason)]
    assert collate_predict([images[0]]) == {'inputs': [], 'unreadable': [(0, reason)]}


def test_an_image_the_pipeline_cannot_prepare_is_passed_like_an_unreadable_one(tmp_path):
    """4000x8 resizes to 160x0 in the mini config: cv2's assertion stopped predict there, and the
    images after it were never predicted."""
    from PIL import Image
    Image.new('RGB', (4000, 8), 'red').save(tmp_path / 'a_wide.png')
    Image.new('RGB', (40, 30), 'red').save(tmp_path / 'b_good.png')
    data = CocoDataModule(predict_images=str(tmp_path), config=MINI)
    data.setup('predict')
    images = data.datasets['predict']
    index, reason = images[0]['unreadable']
    assert index == 0 and reason.startswith(f'cannot prepare {tmp_path / "a_wide.png"} (4000x8) for the model: error: ')
    assert '\n' not in reason and images[1]['inputs'].shape[0] == 3


def test_empty_predict_images_is_an_error_not_the_validation_images(root):
    data = CocoDataModule(root=str(root), predict_images='', config=MINI)
    with pytest.raises(InputError, match='^predict_images is empty: give an image, a folder or a glob, or leave it '
                                         'out for the validation images$'):
        data.setup('predict')


def test_a_checkpoint_that_does_not_fit_the_commands_model_is_one_line(root, tmp_path, monkeypatch, capsys):
    # before: torch's page of 138 missing and 116 unexpected keys
    monkeypatch.chdir(tmp_path)
    assert cli.main(['fit', '--task', 'det', f'--data.root={root}', '--trainer.max_epochs=1',
                     '--trainer.limit_train_batches=1', '--trainer.limit_val_batches=1']) == 0
    capsys.readouterr()
    checkpoint = Path('runs/det/version_0/checkpoints/last.ckpt')
    other = 'mmdet/mask-rcnn_msswin-mini_fpn_shapes.py'
    assert cli.main(['validate', '--task', 'det', '--ckpt_path=last', f'--model.config={other}']) == 1
    err = capsys.readouterr().err
    assert 'Traceback' not in err and err.count('\n') == 1
    assert err.startswith(f'msmlp: error: {checkpoint} does not fit the model: 138 missing keys '
                          '(model.backbone.layers.0.blocks.0.norm1.weight, ')
    assert err.endswith(f"0 shape mismatches; the checkpoint's config is '{MINI}', this command's '{other}'\n")


def test_a_data_root_one_level_above_the_dataset_names_the_folder_inside(tmp_path):
    inner = write_shapes(tmp_path / 'downloads' / 'coco', train=2, val=1)
    datamodule = CocoDataModule(root=str(tmp_path / 'downloads'), config=MINI)
    with pytest.raises(InputError, match=f'^annotation file not found: {tmp_path}/downloads/annotations/'
                                         f'instances_train.json; {inner} holds annotations/instances_train.json: '
                                         f'--data.root {inner}\\?$'):
        datamodule.setup('fit')


@pytest.mark.parametrize('enable, per_process, processes, accumulate, lr', [
    (False, 2, 2, 1, 0.002),   # as the config writes it, as mmdet's tools/train.py without --auto-scale-lr
    (True, 2, 2, 1, 0.002),    # total batch 4 = the config's base_batch_size
    (True, 1, 2, 3, 0.003),    # 6 / 4
    (True, None, 2, 1, 0.004)])  # the config's train batch (4) on two processes
def test_auto_scale_lr_scales_by_the_total_batch_when_the_config_enables_it(enable, per_process, processes,
                                                                          accumulate, lr):
    from types import SimpleNamespace
    task = DetectionTask(config=MINI, cfg_options={'auto_scale_lr.enable': enable})
    task._trainer = SimpleNamespace(datamodule=SimpleNamespace(batch_size=per_process), world_size=processes,
                                    accumulate_grad_batches=accumulate)
    optimizer = task.configure_optimizers()
    assert [group['initial_lr'] for group in optimizer.param_groups] == pytest.approx([lr] * len(optimizer.param_groups))
