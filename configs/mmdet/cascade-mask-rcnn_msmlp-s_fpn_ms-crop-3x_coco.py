# Cascade Mask R-CNN with an MS-MLP-S backbone, FPN, 3x schedule with multi-scale crop training on COCO.
# Same recipe as cascade-mask-rcnn_msmlp-t_fpn_ms-crop-3x_coco.py (Swin's Cascade Mask R-CNN
# 3x in fp32: 4conv1fc GIoU heads, 480-800 multi-scale + DETR crop, AdamW lr 1e-4, weight decay
# 0.05, none on norms and layer scale, steps at 27 and 33, batch 16 in total), with ConvNeXt's
# detection drop path for this size (0.6). Backbone weights: msmlp_small_patch4_ckpt_epoch299.pth.
_base_ = './cascade-mask-rcnn_msmlp-t_fpn_ms-crop-3x_coco.py'
pretrained = 'https://tsciencescu.blob.core.windows.net/projectshzheng/MSMLP/released_model/msmlp_small_patch4/msmlp_small_patch4_ckpt_epoch299.pth'

model = dict(
    backbone=dict(arch='small', drop_path_rate=0.6, init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))
