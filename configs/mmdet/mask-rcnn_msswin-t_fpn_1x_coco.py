# Mask R-CNN with an MS-Swin-T backbone (msmlp's MS-MLP + Swin hybrid: every second Swin block's
# shifted-window attention replaced by mix-shift mixing), FPN, 1x schedule on COCO.
# The paper reports MS-Swin for ImageNet only and released no code; this follows mmdet's Swin-T
# Mask R-CNN 1x recipe (swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py) as it stands: drop path 0.2,
# AdamW lr 1e-4, weight decay 0.05 with none on norms, the relative position tables and the
# MS blocks' layer scale, linear warm-up over 1000 iterations, lr x0.1 after epochs 8 and 11,
# single scale 1333x800, batch 16 in total (8 GPUs x 2 images); the detector is the MS-MLP-T
# one's (mask-rcnn_msmlp-t_fpn_1x_coco.py, the same Swin recipe) with the backbone swapped.
# Backbone weights: the Swin-T ImageNet-1K checkpoint (swin_tiny_patch4_window7_224.pth); its
# keys that exist here are loaded, the MS blocks start from their initialisation.
_base_ = './mask-rcnn_msmlp-t_fpn_1x_coco.py'
pretrained = 'https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_tiny_patch4_window7_224.pth'

model = dict(
    backbone=dict(
        _delete_=True,
        type='MSSwin',
        arch='tiny',
        block_pattern=('ws', 'ms'),
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        frozen_stages=-1,
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))

no_decay = {key: dict(decay_mult=0.) for key in ('norm', 'gamma', 'relative_position_bias_table')}
optim_wrapper = dict(paramwise_cfg=dict(custom_keys=no_decay))
