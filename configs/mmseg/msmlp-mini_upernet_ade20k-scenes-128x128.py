# The embedded default of `msmlp fit --task seg`: a small MS-MLP UperNet trained from scratch
# on the embedded ADE20K-layout scenes (tasks/embedded/ade20k.py: five ADE20K classes, JPEGs of
# 96-160 pixels, ADE20K label maps with 0 = other) in minutes on 2 CPU cores.
# It is the recipe of msmlp-t_upernet_8xb2-160k_ade20k-512x512.py (mmseg's ConvNeXt UperNet
# ADE20K recipe) scaled down: MS-MLP with embed_dim 32 and depths 1-1-2-1, a 64-channel UperHead
# on the four stages and a 32-channel auxiliary FCNHead on stage 3; ADE20K's pipeline at a
# quarter of its scale (random resize of 512x128 with ratio 0.5-2.0, 128x128 crops, flip,
# reduce_zero_label) without the photometric distortion (colour is what tells these classes
# apart, and the run is short); AdamW with no weight decay on norms, biases and layer scale,
# linear warm-up then poly decay; 8 epochs (240 steps of 8 crops) instead of 160k iterations, a
# higher lr for the short run, whole-image inference (the images are barely larger than a crop).
# data_root is set by the data module (--data.root, or the embedded dataset when null).
_base_ = './msmlp-t_upernet_8xb2-160k_ade20k-512x512.py'

# A subset of ADE20K's classes: mmseg maps the label maps' ADE20K indices onto it.
classes = ('building', 'sky', 'tree', 'grass', 'tent')
num_classes = len(classes)
crop_size = (128, 128)
image_scale = (512, 128)  # ADE20K's (2048, 512) / 4
max_epochs = 8

model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(arch=None, embed_dim=32, depths=[1, 1, 2, 1], drop_path_rate=0., init_cfg=None),
    decode_head=dict(in_channels=[32, 64, 128, 256], channels=64, num_classes=num_classes),
    auxiliary_head=dict(in_channels=128, channels=32, num_classes=num_classes),
    test_cfg=dict(_delete_=True, mode='whole'))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=image_scale, ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
img_ratios = [0.75, 1.0, 1.25]
tta_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='TestTimeAug', transforms=[
        [dict(type='Resize', scale_factor=r, keep_ratio=True) for r in img_ratios],
        [dict(type='RandomFlip', prob=0., direction='horizontal'),
         dict(type='RandomFlip', prob=1., direction='horizontal')],
        [dict(type='LoadAnnotations')],
        [dict(type='PackSegInputs')]]),
]
data_root = 'data/ade20k-scenes'
train_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False,
    sampler=dict(_delete_=True, type='DefaultSampler', shuffle=True),
    dataset=dict(data_root=data_root, metainfo=dict(classes=classes), pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=dict(classes=classes), pipeline=test_pipeline))
test_dataloader = val_dataloader

train_cfg = dict(_delete_=True, type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=max_epochs)
optim_wrapper = dict(optimizer=dict(lr=0.002))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=True, begin=0, end=1, convert_to_iter_based=True),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=True, begin=1, end=max_epochs,
         convert_to_iter_based=True),
]
default_hooks = dict(logger=dict(interval=10), checkpoint=dict(by_epoch=True, interval=max_epochs))
log_processor = dict(by_epoch=True)
