# MS-MLP-B + UperNet on ADE20K (150 classes), 512x512 crops, 160k iterations,
# 8 GPUs x 2 images = batch 16.
#
# Same recipe as msmlp-t_upernet_8xb2-160k_ade20k-512x512.py (mmseg's ConvNeXt UperNet
# ADE20K recipe, see there), with MS-MLP-B (widths 128..1024, depths 3, 3, 27, 3, as
# ConvNeXt-B) and ConvNeXt-B's UperNet drop path, 0.4
# (mmseg::convnext/convnext-base_upernet_8xb2-amp-160k_ade20k-512x512.py).
_base_ = ['./msmlp-t_upernet_8xb2-160k_ade20k-512x512.py']

checkpoint_file = 'https://tsciencescu.blob.core.windows.net/projectshzheng/MSMLP/released_model/msmlp_base_patch4/msmlp_base_patch4_ckpt_epoch299.pth'
model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.4,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512))
