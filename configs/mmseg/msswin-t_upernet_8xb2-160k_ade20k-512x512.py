# MS-Swin-T (msmlp's MS-MLP + Swin hybrid: every second Swin block's shifted-window attention
# replaced by mix-shift mixing) + UperNet on ADE20K (150 classes), 512x512 crops, 160k
# iterations, 8 GPUs x 2 images = batch 16.
#
# The paper reports MS-Swin for ImageNet only and released no code. This follows mmseg's Swin-T
# UperNet ADE20K recipe (mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py):
# drop path 0.3; AdamW lr 6e-5, betas (0.9, 0.999), weight decay 0.01 with none on norms and the
# relative position tables (nor on the MS blocks' layer scale `gamma`; biases decay, as Swin's); linear warm-up over 1500
# iterations from 1e-6 times the rate, then poly (power 1) to 0; the UperHead and auxiliary FCN head, pipelines,
# sliding-window inference (512x512 windows, stride 341) and batch of the MS-MLP-T UperNet config
# (msmlp-t_upernet_8xb2-160k_ade20k-512x512.py), which share mmseg's ADE20K settings.
# Backbone weights: the Swin-T ImageNet-1K checkpoint; its keys that exist here are loaded.
_base_ = './msmlp-t_upernet_8xb2-160k_ade20k-512x512.py'

model = dict(
    backbone=dict(
        _delete_=True,
        type='MSSwin',
        arch='tiny',
        block_pattern=('ws', 'ms'),
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint='https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_tiny_patch4_window7_224.pth')))

optim_wrapper = dict(
    optimizer=dict(lr=0.00006, weight_decay=0.01),
    paramwise_cfg=dict(_delete_=True, custom_keys={key: dict(decay_mult=0.) for key in (
        'norm', 'gamma', 'relative_position_bias_table')}))
