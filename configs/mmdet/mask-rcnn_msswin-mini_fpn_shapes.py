# The embedded det default with a small MS-Swin backbone (msmlp's MS-MLP + Swin hybrid):
#   msmlp fit --task det --config configs/det/mask-rcnn_msswin-mini_fpn_shapes.yaml
# Everything but the backbone is the recipe of mask-rcnn_msmlp-mini_fpn_shapes.py (data, detector, schedule).
# The backbone has the same widths (32-64-128-256): two blocks a stage, window attention then
# mix-shift mixing (the registered default pattern), one head of 32 channels per 32, windows of
# 7 patches, layer scale starting at 1 as in the MS-MLP mini config; from scratch. As in the
# paper-scale MS-Swin configs, the relative position tables take no weight decay.
_base_ = './mask-rcnn_msmlp-mini_fpn_shapes.py'

model = dict(
    backbone=dict(
        _delete_=True,
        type='MSSwin',
        arch=None,
        embed_dim=32,
        depths=[2, 2, 2, 2],
        num_heads=[1, 2, 4, 8],
        window_size=7,
        block_pattern=('ws', 'ms'),
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.,
        layer_scale_init=1.0,
        init_cfg=None))

optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'relative_position_bias_table': dict(decay_mult=0.)}))
