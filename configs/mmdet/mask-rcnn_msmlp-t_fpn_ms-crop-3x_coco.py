# Mask R-CNN with an MS-MLP-T backbone, FPN, 3x schedule (36 epochs) with multi-scale crop
# training on COCO. The MS-MLP authors released no detection hyper-parameters. This follows
# mmdet's Swin-T Mask R-CNN 3x recipe (swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py):
# shorter side 480-800 (x1333), half of the time after a random 384-600 crop (DETR's
# augmentation); AdamW, lr 1e-4, weight decay 0.05 with none on norms and layer scale;
# warm-up 1000 iterations, lr x0.1 after epochs 27 and 33; batch 16 in total. Drop path 0.4
# (ConvNeXt-T's detection value). Backbone weights: msmlp_tiny_patch4_ckpt_epoch299.pth.
_base_ = './mask-rcnn_msmlp-t_fpn_1x_coco.py'

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(
        type='RandomChoice',
        transforms=[
            [dict(type='RandomChoiceResize',
                  scales=[(480, 1333), (512, 1333), (544, 1333), (576, 1333), (608, 1333), (640, 1333),
                          (672, 1333), (704, 1333), (736, 1333), (768, 1333), (800, 1333)],
                  keep_ratio=True)],
            [dict(type='RandomChoiceResize', scales=[(400, 1333), (500, 1333), (600, 1333)], keep_ratio=True),
             dict(type='RandomCrop', crop_type='absolute_range', crop_size=(384, 600), allow_negative_crop=True),
             dict(type='RandomChoiceResize',
                  scales=[(480, 1333), (512, 1333), (544, 1333), (576, 1333), (608, 1333), (640, 1333),
                          (672, 1333), (704, 1333), (736, 1333), (768, 1333), (800, 1333)],
                  keep_ratio=True)],
        ]),
    dict(type='PackDetInputs'),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))

max_epochs = 36
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[27, 33], gamma=0.1),
]
