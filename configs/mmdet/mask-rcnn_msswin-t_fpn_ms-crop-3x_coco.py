# Mask R-CNN with an MS-Swin-T backbone, FPN, 3x schedule (36 epochs) with multi-scale crop
# training on COCO. This follows mmdet's Swin-T Mask R-CNN 3x recipe
# (swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py): shorter side 480-800 (x1333), half of the
# time after a random 384-600 crop; AdamW, lr 1e-4, weight decay 0.05 (none on norms, relative
# position tables and layer scale); warm-up 1000 iterations, lr x0.1 after epochs 27 and 33;
# batch 16 in total; drop path 0.2. Pipeline and schedule: mask-rcnn_msmlp-t's 3x (the same Swin
# recipe); backbone and optimizer keys: as mask-rcnn_msswin-t_fpn_1x_coco.py.
_base_ = './mask-rcnn_msmlp-t_fpn_ms-crop-3x_coco.py'
no_decay = {key: dict(decay_mult=0.) for key in ('norm', 'gamma', 'relative_position_bias_table')}
model = dict(
    backbone=dict(_delete_=True, type='MSSwin', arch='tiny', block_pattern=('ws', 'ms'), drop_path_rate=0.2,
                  init_cfg=dict(type='Pretrained', checkpoint='https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_tiny_patch4_window7_224.pth')),
    neck=dict(in_channels=[96, 192, 384, 768]))
optim_wrapper = dict(paramwise_cfg=dict(custom_keys=no_decay))
