# MS-MLP-T + UperNet on ADE20K (150 classes), 512x512 crops, 160k iterations,
# 8 GPUs x 2 images = batch 16.
#
# The MS-MLP authors released no segmentation code or hyper-parameters. This config follows
# mmseg's ConvNeXt UperNet ADE20K recipe
# (mmseg::convnext/convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py), the closest
# published one: MS-MLP-T has ConvNeXt-T's widths (96..768), depths (3, 3, 9, 3) and layer scale.
# Kept from it: UperHead (512 channels, pool scales 1, 2, 3, 6) on the four stages and an
# auxiliary FCNHead (weight 0.4) on stage 3 (index 2), SyncBN in the heads, ADE20K's
# 2048x512 random resize (ratio 0.5-2.0), 512x512 crop, flip and photometric distortion,
# reduce_zero_label (150 classes, label 0 ignored); AdamW lr 1e-4, betas (0.9, 0.999),
# weight decay 0.05; linear warm-up over 1500 iterations from 1e-6 times the rate,
# then poly (power 1) to 0;
# 160k iterations; drop path 0.4 (ConvNeXt-T's UperNet value; -S 0.3, -B 0.4; MS-MLP's
# ImageNet values would be 0.1/0.4/0.5); sliding-window inference with 512x512 crops and
# stride 341.
# Changed: fp32 OptimWrapper instead of AMP (mmseg's tools/train.py --amp turns AMP on);
# no stage-wise learning-rate decay (mmseg's LearningRateDecayOptimizerConstructor only knows
# ConvNeXt and BEiT parameter names). As that constructor does, no weight decay on 1-D
# parameters: norms, biases and layer scale (`gamma`).
#
# Pretrained weights: the released ImageNet-1K checkpoint at `checkpoint_file` (read by the
# safe loader); set model.backbone.init_cfg=None to train from scratch.
_base_ = [
    'mmseg::_base_/models/upernet_convnext.py', 'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py', 'mmseg::_base_/schedules/schedule_160k.py'
]
custom_imports = dict(imports=['msmlp.mm'], allow_failed_imports=False)

crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
checkpoint_file = 'https://tsciencescu.blob.core.windows.net/projectshzheng/MSMLP/released_model/msmlp_tiny_patch4/msmlp_tiny_patch4_ckpt_epoch299.pth'
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        _delete_=True,
        type='MSMLP',
        arch='tiny',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.4,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    decode_head=dict(in_channels=[96, 192, 384, 768], num_classes=150),
    auxiliary_head=dict(in_channels=384, num_classes=150),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(341, 341)))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(
        norm_decay_mult=0.,
        bias_decay_mult=0.,
        flat_decay_mult=0.,
        custom_keys={'gamma': dict(decay_mult=0.)}))

param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', power=1.0, begin=1500, end=160000, eta_min=0.0, by_epoch=False),
]

# 8 GPUs x 2 images per GPU = batch 16.
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
