# The embedded default of `msmlp fit --task det`: a small MS-MLP Mask R-CNN trained from
# scratch on the embedded COCO-format shapes dataset (tasks/embedded/coco.py; 3 classes,
# 112-160 pixel JPEGs) in minutes on 2 CPU cores. It is the recipe of
# mask-rcnn_msmlp-t_fpn_1x_coco.py (mmdet's Swin Mask R-CNN 1x: AdamW, weight decay 0.05 with
# none on norms and layer scale, linear warm-up, lr steps) scaled down to a short CPU run: a
# 4-stage MS-MLP with embed_dim 32 and depths 1-1-2-1, layer scale starting at 1 (not 1e-6:
# from scratch and in 800 iterations the blocks must contribute at once), 64-channel FPN and
# heads, fewer proposals and sampled RoIs, images at their own size, lr 2e-3 with a 50-iteration
# warm-up, 10 epochs with a x0.1 step after epoch 8.
# data_root is set by the data module (--data.root, or the embedded dataset when null).
_base_ = './mask-rcnn_msmlp-t_fpn_1x_coco.py'

classes = ('circle', 'square', 'triangle')
num_classes = len(classes)
channels = 64
image_scale = (160, 160)  # (w, h) bound; the shapes images are at most 160 a side

model = dict(
    backbone=dict(arch=None, embed_dim=32, depths=[1, 1, 2, 1], drop_path_rate=0., layer_scale_init=1.0,
                  init_cfg=None),
    neck=dict(in_channels=[32, 64, 128, 256], out_channels=channels),
    rpn_head=dict(in_channels=channels, feat_channels=channels,
                  anchor_generator=dict(scales=[4], strides=[4, 8, 16, 32, 64])),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=channels),
        bbox_head=dict(in_channels=channels, fc_out_channels=256, num_classes=num_classes),
        mask_roi_extractor=dict(out_channels=channels),
        mask_head=dict(num_convs=2, in_channels=channels, conv_out_channels=channels, num_classes=num_classes)),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=300, max_per_img=100),
        rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(rpn=dict(nms_pre=300, max_per_img=100)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
data_root = 'data/coco-shapes/'
train_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(
        type='CocoDataset', data_root=data_root, metainfo=dict(classes=classes),
        ann_file='annotations/instances_train.json', data_prefix=dict(img='train/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=16), pipeline=train_pipeline))
# One image per evaluation batch, as mmdet's COCO configs: the mix-shift wraps around the padded
# canvas, so padding an image to the largest of its batch changes its detections (measured: bbox
# AP 0.2001 at batch 4 against 0.2010 at batch 1), and with it the metrics would depend on how
# the images are batched, hence on the number of processes.
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(
        type='CocoDataset', data_root=data_root, metainfo=dict(classes=classes),
        ann_file='annotations/instances_val.json', data_prefix=dict(img='val/'),
        test_mode=True, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator

max_epochs = 10
train_cfg = dict(max_epochs=max_epochs, val_interval=5)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8], gamma=0.1),
]
optim_wrapper = dict(optimizer=dict(lr=0.002))
auto_scale_lr = dict(base_batch_size=4)
default_hooks = dict(logger=dict(interval=20))
