"""Segmentation task: metrics against mmseg's IoUMetric, whole/sliding/TTA inference, the data
checks on bad input, and the real CLI (fit with fast_dev_run, validate, predict)."""
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip('mmseg', reason='the OpenMMLab stack comes from scripts/setup.sh')
from mmseg.evaluation import IoUMetric  # noqa: E402

import cli  # noqa: E402
from tasks.base import InputError  # noqa: E402
from tasks.embedded import ade20k as scenes  # noqa: E402
from tasks.segmentation import (ADE20KDataModule, SegmentationMetrics, SegmentationTask,  # noqa: E402
                                check_image_label_pairs, class_subset_note)

PAPER_T = 'mmseg/msmlp-t_upernet_8xb2-160k_ade20k-512x512.py'


# ----- metrics -----------------------------------------------------------------------------
def mmseg_iou_metric(batches, num_classes):
    metric = IoUMetric(ignore_index=255)
    metric.dataset_meta = dict(classes=[f'c{i}' for i in range(num_classes)])
    for preds, labels in batches:
        metric.process({}, [dict(pred_sem_seg=dict(data=p[None]), gt_sem_seg=dict(data=l[None]))
                            for p, l in zip(preds, labels)])
    summary = metric.compute_metrics(metric.results)
    areas = [sum(parts) for parts in zip(*metric.results)]
    exact = IoUMetric.total_area_to_metrics(*areas, metrics=['mIoU'])
    return summary, exact


def test_metrics_equal_mmseg_iou_metric_with_a_class_absent_from_a_batch():
    num_classes = 6
    gen = torch.Generator().manual_seed(0)
    batches = []
    for b in range(3):
        labels = torch.randint(0, 4, (2, 37, 53), generator=gen)
        if b == 1:
            labels[labels == 2] = 3  # class 2 absent from this batch's labels
            labels[0, :5] = 4  # class 4 labelled only here
        labels[torch.rand(labels.shape, generator=gen) < 0.1] = 255  # ignored pixels
        preds = torch.where(torch.rand(labels.shape, generator=gen) < 0.7, labels.clamp(max=3),
                            torch.randint(0, 6, labels.shape, generator=gen))  # class 5: predicted, never labelled
        batches.append((preds, labels))
    ours = SegmentationMetrics(num_classes)
    for preds, labels in batches:
        ours.update(preds, labels)
    values = ours.compute()
    summary, exact = mmseg_iou_metric(batches, num_classes)
    for key in ('mIoU', 'mAcc', 'aAcc'):
        assert abs(values[key].item() - summary[key] / 100) <= 1e-4, key
    per_class = ours.per_class()
    np.testing.assert_allclose(per_class['IoU'].numpy(), exact['IoU'], atol=1e-6)  # NaN where mmseg's is
    np.testing.assert_allclose(per_class['Acc'].numpy(), exact['Acc'], atol=1e-6)
    assert per_class['IoU'][5] == 0 and torch.isnan(per_class['Acc'][5])  # predicted but never labelled


def test_metrics_reject_labels_outside_the_classes():
    metric = SegmentationMetrics(3)
    with pytest.raises(ValueError, match=r'labels hold values \[7\]'):
        metric.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.full((1, 4, 4), 7))
    metric.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.full((1, 4, 4), 255))  # ignored: fine


# ----- data --------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def embedded_data(tmp_path_factory):
    """MSMLP_DATA with the embedded ADE20K scenes (written once per module)."""
    root = tmp_path_factory.mktemp('msmlp-data')
    old = os.environ.get('MSMLP_DATA')
    os.environ['MSMLP_DATA'] = str(root)
    from tasks.embedded import ensure_dataset
    ensure_dataset('ade20k')
    yield root
    if old is None:
        os.environ.pop('MSMLP_DATA', None)
    else:
        os.environ['MSMLP_DATA'] = old


@pytest.fixture
def small_root(tmp_path):
    root = tmp_path / 'ADEChallengeData2016'
    scenes.write(root, split_sizes={'training': 3, 'validation': 2})
    return root


def test_embedded_scenes_use_ade20k_label_encoding():
    from mmseg.datasets import ADE20KDataset
    ade = ADE20KDataset.METAINFO['classes']
    assert all(ade[index] == name for name, index in scenes.ADE20K_INDEX.items())
    image, labels = scenes.make_scene(np.random.default_rng(3))
    assert image.dtype == np.uint8 and image.shape == labels.shape + (3,)
    assert set(np.unique(labels)) <= {0} | {i + 1 for i in scenes.ADE20K_INDEX.values()}
    assert (labels == 0).any()  # unlabelled borders, ignored through reduce_zero_label


def datamodule(root, task=None, **kwargs):
    dm = ADE20KDataModule(root=str(root), num_workers=0, config=task.hparams['config'] if task else
                          'mmseg/msmlp-mini_upernet_ade20k-scenes-128x128.py', **kwargs)
    return dm


def test_dataset_items_follow_the_config_pipelines(small_root):
    dm = datamodule(small_root)
    dm.setup('fit')
    assert dm.classes == scenes.CLASSES
    item = dm.datasets['train'][0]
    # RandomResize may shrink a scene below the 128 crop; the batch preprocessor pads it later
    assert item['inputs'].shape[0] == 3 and max(item['inputs'].shape[1:]) <= 128
    seg = item['data_samples'].gt_sem_seg.data
    assert seg.shape[1:] == item['inputs'].shape[1:]
    assert set(seg.unique().tolist()) <= {0, 1, 2, 3, 4, 255}
    val = dm.datasets['val'][0]['data_samples']
    assert val.gt_sem_seg.data.shape[1:] == val.ori_shape  # evaluated at the original size


def test_image_without_label_map_names_the_image(small_root):
    (small_root / 'annotations' / 'training' / 'ADE_train_00000002.png').unlink()
    with pytest.raises(InputError, match=r'1 images have no label map .*ADE_train_00000002\.jpg'):
        datamodule(small_root).setup('fit')


def test_label_map_without_image_names_the_label_map(small_root):
    (small_root / 'images' / 'validation' / 'ADE_val_00000001.jpg').unlink()
    with pytest.raises(InputError, match=r'1 label maps have no image .*ADE_val_00000001\.png'):
        datamodule(small_root).setup('fit')


def test_images_with_another_suffix_are_not_skipped_silently(small_root):
    image = small_root / 'images' / 'training' / 'ADE_train_00000001.jpg'
    Image.open(image).save(image.with_suffix('.png'))
    image.unlink()
    with pytest.raises(InputError, match=r"do not end in '\.jpg'.*ADE_train_00000001\.png"):
        datamodule(small_root).setup('fit')


def test_missing_folders_say_what_the_layout_is(tmp_path):
    with pytest.raises(InputError, match=r'images folder not found: .*images/training.*ADEChallengeData2016'):
        datamodule(tmp_path).setup('fit')


def test_a_data_root_one_level_above_the_dataset_names_the_folder_inside(small_root):
    above = small_root.parent
    with pytest.raises(InputError, match=f'^images folder not found: {above}/images/training; {small_root} holds '
                                         f'images/training: --data.root {small_root}\\?$'):
        datamodule(above).setup('fit')


def test_a_config_of_other_folders_without_data_root_says_to_pass_it(embedded_data):
    # the user's own config, run without --data.root, reads its folders under the embedded data
    dm = ADE20KDataModule(root=None, num_workers=0, config='mmseg/msmlp-mini_upernet_ade20k-scenes-128x128.py',
                          cfg_options={'train_dataloader.dataset.data_prefix.img_path': 'img_dir/train'})
    with pytest.raises(InputError, match=r'^images folder not found: .*img_dir/train\. The embedded dataset holds '
                                         r'images/\{training,validation\} .*: pass --data\.root with the dataset this '
                                         r'config reads$'):
        dm.setup('fit')


def _first_item_error(root, split='train', match=''):
    dm = datamodule(root)
    dm.setup('fit')
    with pytest.raises(InputError, match=match):
        dm.datasets[split][0]


def test_label_map_of_another_size_names_the_file(small_root):
    path = small_root / 'annotations' / 'training' / 'ADE_train_00000001.png'
    labels = np.array(Image.open(path))
    Image.fromarray(labels[:-3, :-1]).save(path)
    h, w = labels.shape
    _first_item_error(small_root, match=rf'label map .*ADE_train_00000001\.png is {w - 1}x{h - 3} .* is {w}x{h}')


def test_label_values_above_the_class_count_name_the_file(small_root):
    path = small_root / 'annotations' / 'validation' / 'ADE_val_00000001.png'
    labels = np.array(Image.open(path))
    labels[0, 0] = 200
    Image.fromarray(labels).save(path)
    _first_item_error(small_root, split='val',
                      match=r"ADE_val_00000001\.png holds values above the class count 150 .*\[200\]; valid values: 0 = other, 1..150")


def test_value_255_is_ignored_not_an_error(small_root):
    path = small_root / 'annotations' / 'training' / 'ADE_train_00000001.png'
    labels = np.array(Image.open(path))
    labels[:4, :4] = 255
    Image.fromarray(labels).save(path)
    dm = datamodule(small_root)
    dm.setup('fit')
    dm.datasets['val'][0]
    assert dm.datasets['train'][0]['inputs'].shape[0] == 3


@pytest.mark.parametrize('mode', ['RGB', 'I;16'])
def test_colour_or_16_bit_label_maps_are_refused(small_root, mode):
    path = small_root / 'annotations' / 'training' / 'ADE_train_00000001.png'
    labels = np.array(Image.open(path))
    image = Image.fromarray(labels).convert('RGB') if mode == 'RGB' else Image.fromarray(labels.astype(np.uint16))
    image.save(path)
    _first_item_error(small_root, match=r'ADE_train_00000001\.png .*8-bit single-channel')


def test_jpeg_label_maps_are_refused(small_root):
    """JPEG artefacts change class indices along every edge; mmseg would read them as labels."""
    path = small_root / 'annotations' / 'training' / 'ADE_train_00000001.png'
    Image.open(path).save(path, format='JPEG', quality=95)
    _first_item_error(small_root, match=r'label map .*ADE_train_00000001\.png is a JPEG: lossy compression')


def test_an_image_turned_by_its_exif_orientation_is_refused(small_root):
    """mmcv reads the image turned, the label map as stored: a half turn keeps the size."""
    path = small_root / 'images' / 'training' / 'ADE_train_00000001.jpg'
    image = Image.open(path)
    exif = image.getexif()
    exif[0x0112] = 3  # 180 degrees
    image.save(path, exif=exif, quality=95)
    _first_item_error(small_root, match=r'image .*ADE_train_00000001\.jpg has EXIF orientation 3: it is read turned')


def test_images_in_hidden_folders_are_paired_as_mmseg_reads_them(small_root):
    """mmseg lists hidden folders (a notebook's .ipynb_checkpoints) with the rest."""
    hidden = small_root / 'images' / 'training' / '.ipynb_checkpoints'
    hidden.mkdir()
    shutil.copy(small_root / 'images' / 'training' / 'ADE_train_00000001.jpg', hidden / 'ADE_train_00000001.jpg')
    with pytest.raises(InputError, match=r'1 images have no label map .*\.ipynb_checkpoints/ADE_train_00000001\.jpg'):
        datamodule(small_root).setup('fit')


def test_a_class_subset_says_that_the_other_classes_are_ignored(small_root, caplog):
    from mmseg.datasets import ADE20KDataset
    assert class_subset_note(ADE20KDataset, ADE20KDataset.METAINFO['classes'], 255) is None
    note = class_subset_note(ADE20KDataset, ('sky', 'tree'), 255)
    assert note.startswith('the config trains 2 of the 150 classes of ADE20KDataset: label-map pixels of the '
                           'other 148 (wall, building, floor, ceiling, road and 143 more) are ignored (255)')
    with caplog.at_level(logging.INFO):
        datamodule(small_root).setup('fit')  # builds train and val: one note
    notes = [r.getMessage() for r in caplog.records if 'the config trains 5 of the 150 classes' in r.getMessage()]
    assert len(notes) == 1


@pytest.mark.parametrize('mode', ['L', 'RGBA', 'CMYK'])
def test_grayscale_rgba_and_cmyk_images_are_read_as_rgb(small_root, mode):
    path = small_root / 'images' / 'training' / 'ADE_train_00000001.jpg'
    rgb = Image.open(path).convert('RGB')
    if mode == 'RGBA':  # RGBA cannot be a JPEG: a PNG under the .jpg name, as some datasets hold
        rgb.convert('RGBA').save(path, format='PNG')
    else:
        rgb.convert(mode).save(path, format='JPEG')
    dm = datamodule(small_root, batch_size=1)
    dm.setup('validate')
    dm.setup('fit')
    item = dm.datasets['train'][0]
    assert item['inputs'].shape[0] == 3
    inputs = item['inputs'].float()
    if mode == 'L':
        assert torch.equal(inputs[0], inputs[1]) and torch.equal(inputs[1], inputs[2])


def test_pairing_check_counts_pairs(small_root):
    assert check_image_label_pairs(small_root / 'images' / 'training', small_root / 'annotations' / 'training') == 3


# ----- inference ---------------------------------------------------------------------------
def _count_windows(model):
    calls = []
    original = model.encode_decode

    def counting(inputs, metas):
        calls.append(tuple(inputs.shape[2:]))
        return original(inputs, metas)
    model.encode_decode = counting
    return calls


def test_whole_and_sliding_window_inference(small_root):
    task = SegmentationTask(inference='slide').eval()
    assert dict(task.model.test_cfg) == dict(mode='slide', crop_size=(128, 128), stride=(85, 85))
    calls = _count_windows(task.model)
    x = torch.randn(1, 3, 150, 260)
    meta = dict(ori_shape=(150, 260), img_shape=(150, 260), pad_shape=(150, 260), padding_size=[0] * 4)
    with torch.no_grad():
        logits = task.model.inference(x, [dict(meta)])
    assert logits.shape == (1, 5, 150, 260)
    assert len(calls) == 2 * 3 and set(calls) == {(128, 128)}  # ceil((150-128)/85)+1 x ceil((260-128)/85)+1
    whole = SegmentationTask(inference='whole').eval()
    calls = _count_windows(whole.model)
    with torch.no_grad():
        whole.model.inference(x, [dict(meta)])
    assert calls == [(150, 260)]


def test_a_checkpoint_evaluated_with_another_inference_mode_names_the_option(small_root):
    """--model.inference changes the config's test_cfg; the warning that the config differs from
    the checkpoint's names it (before: it read as if the file had been edited since training)."""
    trained_with = SegmentationTask().cfg.pretty_text
    with pytest.warns(UserWarning, match=r'^the config \(mmseg/\S+ with inference=slide\) differs from the one '
                                         r'the checkpoint was trained with, first at line \d+ of its text: '
                                         r'"test_cfg=dict\(mode=\'whole\'\),"'):
        SegmentationTask(inference='slide').warn_if_config_changed(trained_with)


def test_tta_averages_three_scales_times_two_flips(small_root):
    from lightning.pytorch import Trainer
    task = SegmentationTask(tta=True)
    views = []
    original = task.model.test_step
    task.model.test_step = lambda data: views.append(data['data_samples'][0].metainfo) or original(data)
    trainer = Trainer(limit_val_batches=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    metrics = trainer.validate(task, ADE20KDataModule(root=str(small_root), num_workers=0), verbose=False)[0]
    assert len(views) == 6
    assert sorted((v['flip'], round(v['scale_factor'][0], 2)) for v in views) == \
        [(False, 0.75), (False, 1.0), (False, 1.25), (True, 0.75), (True, 1.0), (True, 1.25)]
    assert 0 <= metrics['val/mIoU'] <= 1 and 0 <= metrics['val/aAcc'] <= 1


def test_paper_config_slides_512_windows_with_stride_341():
    task = SegmentationTask(config=PAPER_T, pretrained='')
    assert dict(task.model.test_cfg) == dict(mode='slide', crop_size=(512, 512), stride=(341, 341))
    assert task.num_classes == 150
    with pytest.raises(InputError, match="inference must be 'whole' or 'slide'"):
        SegmentationTask(config=PAPER_T, pretrained='', inference='tiles')


def test_model_and_data_classes_must_agree(small_root):
    task = SegmentationTask(config=PAPER_T, pretrained='')
    with pytest.raises(InputError, match='predicts 150 classes .* the dataset has 5'):
        task.check_classes(scenes.CLASSES)


# ----- the real CLI ------------------------------------------------------------------------
def run_cli(args, capsys):
    code = cli.main(args)
    out = capsys.readouterr()
    return code, out.out + out.err


def test_fit_fast_dev_run_through_the_cli(embedded_data, tmp_path, capsys, monkeypatch, recwarn):
    monkeypatch.chdir(tmp_path)
    code, out = run_cli(['fit', '--task', 'seg', '--trainer.fast_dev_run=1'], capsys)
    assert code == 0, out[-3000:]
    out += ''.join(str(w.message) for w in recwarn)  # pytest records the warnings a user would see
    assert 'val: mIoU=' in out or 'val/mIoU' in out
    # no summary table of zero FLOPs (the first line gives the parameters), no report of files
    # that fast_dev_run does not write, no notices the user cannot act on
    assert 'FLOPs' not in out and 'Flops' not in out and '(1.7M parameters)' in out
    assert 'fast_dev_run: nothing is logged or saved' in out and 'run finished' not in out
    assert not (tmp_path / 'runs').exists()
    for noise in ('override existing callbacks', 'transfer_batch_to_device', 'build_loss', 'reduce_zero_label',
                  'avg_non_ignore'):
        assert noise not in out


def test_an_epochs_last_incomplete_batch_is_dropped_as_mmseg_never_trains_one(small_root, tmp_path, capsys,
                                                                              monkeypatch):
    """3 images at batch 2: one step an epoch. Before, the epoch ended on a batch of one image, and
    UperNet's batch norm after its global pooling stopped the run with a traceback there."""
    monkeypatch.chdir(tmp_path)
    base = ['fit', '--task', 'seg', f'--data.root={small_root}', '--trainer.max_epochs=1',
            '--trainer.limit_val_batches=0', '--trainer.logger=false', '--trainer.enable_checkpointing=false']
    code, out = run_cli([*base, '--data.batch_size=2'], capsys)
    assert code == 0, out[-3000:]
    assert re.search(r'Epoch 0/0 .*1/1 ', out), out[-2000:]
    code, out = run_cli([*base, '--data.batch_size=4'], capsys)
    assert code == 1 and out.endswith(f'msmlp: error: the training split of {small_root} has 3 images, fewer than one '
                                      'batch (batch_size=4): set --data.batch_size 3 or less\n'), out[-2000:]
    code, out = run_cli([*base, '--data.batch_size=1'], capsys)
    assert code == 1 and out.endswith('msmlp: error: data.batch_size=1 per process: a batch norm of the model normalises '
                                      'a pooled 1x1 map, which needs 2 or more images: set --data.batch_size 2 or more\n'
                                      ), out[-2000:]


def test_validate_and_predict_with_tta_through_the_cli(embedded_data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = run_cli(['validate', '--task', 'seg', '--model.tta=true', '--trainer.limit_val_batches=2'], capsys)
    assert code == 0, out[-3000:]
    assert 'mIoU=' in out and 'aAcc=' in out
    predictions = tmp_path / 'pred'
    code, out = run_cli(['predict', '--task', 'seg', '--model.tta=true', f'--model.predict_dir={predictions}',
                         '--trainer.limit_predict_batches=2'], capsys)
    assert code == 0, out[-3000:]
    overlays = sorted(predictions.glob('*.png'))
    labels = sorted((predictions / 'labels').glob('*.png'))
    assert len(overlays) == 2 and [p.name for p in labels] == [p.name for p in overlays]
    assert str(predictions.resolve()) in out
    source = embedded_data / scenes.DIRNAME / 'images' / 'validation' / (overlays[0].stem + '.jpg')
    label = np.array(Image.open(labels[0]))
    assert label.shape == Image.open(source).size[::-1]
    assert set(np.unique(label)) <= {i + 1 for i in scenes.ADE20K_INDEX.values()}  # ADE20K encoding
    assert Image.open(overlays[0]).mode == 'RGB'


def test_predict_reads_rgba_and_grayscale_files(embedded_data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = next((embedded_data / scenes.DIRNAME / 'images' / 'validation').glob('*.jpg'))
    inputs = tmp_path / 'inputs'
    inputs.mkdir()
    Image.open(source).convert('RGBA').save(inputs / 'rgba.png')
    Image.open(source).convert('L').save(inputs / 'grey.jpg')
    code, out = run_cli(['predict', '--task', 'seg', f'--data.predict_images={inputs}',
                         f'--model.predict_dir={tmp_path / "out"}'], capsys)
    assert code == 0, out[-3000:]
    assert sorted(p.name for p in (tmp_path / 'out').glob('*.png')) == ['grey.png', 'rgba.png']


def test_predict_goes_past_an_unreadable_image_then_fails_naming_it(embedded_data, tmp_path, capsys, monkeypatch):
    # before: the first unreadable image stopped predict, and the images after it were not predicted
    monkeypatch.chdir(tmp_path)
    sources = sorted((embedded_data / scenes.DIRNAME / 'images' / 'validation').glob('*.jpg'))[:2]
    inputs = tmp_path / 'inputs'
    inputs.mkdir()
    for name, source in zip(('a.jpg', 'c.jpg'), sources):
        Image.open(source).save(inputs / name)
    (inputs / 'b.jpg').write_bytes((inputs / 'a.jpg').read_bytes()[:200])
    code, out = run_cli(['predict', '--task', 'seg', f'--data.predict_images={inputs}'], capsys)
    assert code == 1
    drawn = tmp_path / 'runs' / 'seg' / 'predictions'  # in folders this run made, kept though it failed
    assert sorted(p.name for p in drawn.glob('*.png')) == ['a.png', 'c.png']
    assert [p.name for p in drawn.parent.iterdir()] == ['predictions']  # not the run folder it logged nothing in
    assert f'[msmlp] not predicted: cannot read {inputs / "b.jpg"}: ' in out
    assert f'wrote 2 prediction images to {drawn}' in out
    assert out.strip().splitlines()[-1].startswith(
        f'msmlp: error: 1 of 3 images could not be read or prepared and have no prediction in {drawn}; '
        f'the first: cannot read {inputs / "b.jpg"}: ')


def test_predict_images_that_would_share_an_output_name_are_refused(embedded_data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = next((embedded_data / scenes.DIRNAME / 'images' / 'validation').glob('*.jpg'))
    inputs = tmp_path / 'inputs'
    inputs.mkdir()
    Image.open(source).save(inputs / 'x.jpg')
    Image.open(source).save(inputs / 'x.png')
    code, out = run_cli(['predict', '--task', 'seg', f'--data.predict_images={inputs}',
                         f'--model.predict_dir={tmp_path / "out"}'], capsys)
    assert code == 1
    assert (f'msmlp: error: predict images {inputs / "x.jpg"} and {inputs / "x.png"} would both be predicted to '
            'x.png: rename one, or predict them separately') in out
    assert not (tmp_path / 'out').exists()


def test_predictions_never_overwrite_the_images_and_a_bad_predict_dir_is_one_line(embedded_data, tmp_path, capsys,
                                                                                 monkeypatch):
    """--model.predict_dir = the images' folder wrote the overlays over the PNG inputs; a file or
    an unmakeable folder was a traceback at the first batch."""
    monkeypatch.chdir(tmp_path)
    source = next((embedded_data / scenes.DIRNAME / 'images' / 'validation').glob('*.jpg'))
    inputs = tmp_path / 'inputs'
    inputs.mkdir()
    Image.open(source).save(inputs / 'a.png')
    (inputs / 'labels').mkdir()  # seg also writes labels/<name>.png
    Image.open(source).save(inputs / 'labels' / 'b.png')
    before = {p: p.read_bytes() for p in inputs.rglob('*.png')}
    # the overlay of a.png over a.png; the label map of labels/b.png over labels/b.png
    for images, clash in ((inputs / '*.png', inputs / 'a.png'), (inputs / 'labels', inputs / 'labels' / 'b.png')):
        code, out = run_cli(['predict', '--task', 'seg', f'--data.predict_images={images}',
                             f'--model.predict_dir={inputs}'], capsys)
        assert code == 1 and out.endswith(f'would be written over the image {clash}: give --model.predict_dir another '
                                          'folder\n'), out[-2000:]
    assert {p: p.read_bytes() for p in inputs.rglob('*.png')} == before
    code, out = run_cli(['predict', '--task', 'seg', f'--data.predict_images={inputs / "a.png"}',
                         f'--model.predict_dir={inputs / "a.png"}'], capsys)
    assert code == 1 and out.endswith(f'msmlp: error: model.predict_dir: cannot make the folder {inputs / "a.png"} '
                                      '(File exists)\n'), out[-2000:]


def test_bad_data_root_is_a_one_line_cli_error(tmp_path, capsys, monkeypatch, small_root):
    monkeypatch.chdir(tmp_path)
    (small_root / 'annotations' / 'training' / 'ADE_train_00000003.png').unlink()
    code, out = run_cli(['fit', '--task', 'seg', f'--data.root={small_root}', '--trainer.fast_dev_run=1'], capsys)
    assert code == 1
    assert 'msmlp: error: 1 images have no label map' in out and 'ADE_train_00000003.jpg' in out


@pytest.mark.parametrize('damaged', ['images/training/ADE_train_00000001.jpg',
                                     'annotations/training/ADE_train_00000001.png'])
def test_unreadable_image_or_label_map_is_one_line_naming_it(small_root, damaged):
    path = small_root / damaged
    path.write_bytes(path.read_bytes()[:100])  # truncated
    _first_item_error(small_root, match=rf'^cannot read {path}: ')


@pytest.mark.parametrize('yaml', sorted(p.name for p in (Path(cli.__file__).parent / 'configs/seg').glob('*.yaml')
                                        if p.name != 'default.yaml'))
def test_ade20k_yaml_configs_point_at_their_mmseg_config(yaml, capsys):
    """Each configs/seg/*.yaml parses on top of the default and names an existing mmseg config; the
    paper-scale ones save last.ckpt by time, the mini ones (the embedded data) by steps."""
    from tasks.base import find_config
    with pytest.raises(SystemExit):
        cli.run_lightning('seg', ['fit', '--config', str(Path(cli.__file__).parent / 'configs/seg' / yaml),
                                  '--print_config'])
    printed = capsys.readouterr().out
    assert f'config: mmseg/{yaml[:-len(".yaml")]}.py' in printed
    assert ('every_n_train_steps: 10' if '-mini_' in yaml else 'train_time_interval: ') in printed
    assert find_config(f'mmseg/{yaml[:-len(".yaml")]}.py').is_file()
