# Mask R-CNN with an MS-MLP-T backbone, FPN, 1x schedule (12 epochs) on COCO.
# The MS-MLP authors released no detection code or hyper-parameters. This follows mmdet's
# Swin-T Mask R-CNN 1x recipe (swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py): AdamW, lr 1e-4,
# weight decay 0.05 with none on norms (and on MS-MLP's layer scale `gamma`), linear warm-up
# over 1000 iterations, lr x0.1 after epochs 8 and 11, single scale 1333x800, batch 16 in
# total (8 GPUs x 2 images). Drop path per size follows ConvNeXt's detection recipe
# (T 0.4, S 0.6, B 0.7): MS-MLP's ImageNet drop path (0.1/0.4/0.5) is ConvNeXt's.
# Backbone weights: the released msmlp_tiny_patch4_ckpt_epoch299.pth (read by the safe loader).
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['msmlp.mm'], allow_failed_imports=False)
pretrained = 'https://tsciencescu.blob.core.windows.net/projectshzheng/MSMLP/released_model/msmlp_tiny_patch4/msmlp_tiny_patch4_ckpt_epoch299.pth'

model = dict(
    backbone=dict(
        _delete_=True,
        type='MSMLP',
        arch='tiny',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.4,
        frozen_stages=-1,
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
optim_wrapper = dict(
    type='OptimWrapper',
    paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.), 'gamma': dict(decay_mult=0.)}),
    optimizer=dict(_delete_=True, type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05))
