# The embedded seg default with a small MS-Swin backbone (msmlp's MS-MLP + Swin hybrid):
#   msmlp fit --task seg --config configs/seg/msswin-mini_upernet_ade20k-scenes-128x128.yaml
# Everything but the backbone is the recipe of msmlp-mini_upernet_ade20k-scenes-128x128.py (data,
# heads, schedule). The backbone has the same widths (32-64-128-256): two blocks a stage, window
# attention then mix-shift mixing (the registered default pattern), one head of 32 channels per
# 32, windows of 7 patches; from scratch. As in the paper-scale MS-Swin config, the relative
# position tables take no weight decay.
_base_ = './msmlp-mini_upernet_ade20k-scenes-128x128.py'

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
        init_cfg=None))

optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'relative_position_bias_table': dict(decay_mult=0.)}))
