# MS-MLP-S + UperNet on ADE20K (150 classes), 512x512 crops, 160k iterations,
# 8 GPUs x 2 images = batch 16.
#
# Same recipe as msmlp-t_upernet_8xb2-160k_ade20k-512x512.py (mmseg's ConvNeXt UperNet
# ADE20K recipe, see there), with MS-MLP-S (depths 3, 3, 27, 3, as ConvNeXt-S) and
# ConvNeXt-S's UperNet drop path, 0.3
# (mmseg::convnext/convnext-small_upernet_8xb2-amp-160k_ade20k-512x512.py).
_base_ = ['./msmlp-t_upernet_8xb2-160k_ade20k-512x512.py']

checkpoint_file = 'https://tsciencescu.blob.core.windows.net/projectshzheng/MSMLP/released_model/msmlp_small_patch4/msmlp_small_patch4_ckpt_epoch299.pth'
model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
