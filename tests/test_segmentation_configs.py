"""The configs/mmseg configs: MSMLP registered through custom_imports, the ADE20K recipe they
state, output shapes, and one training iteration (plus a validation pass) through mmengine's
Runner as mmseg's tools/train.py runs it, with the data pointed at the embedded scenes."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip('mmseg', reason='the OpenMMLab stack comes from scripts/setup.sh')
from mmengine.config import Config  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from tasks.embedded import ade20k as scenes  # noqa: E402

REPO = Path(__file__).parent.parent
CONFIGS = REPO / 'configs' / 'mmseg'
PAPER = {size: f'msmlp-{size}_upernet_8xb2-160k_ade20k-512x512.py' for size in 'tsb'}
MINI = 'msmlp-mini_upernet_ade20k-scenes-128x128.py'
MSSWIN = 'msswin-t_upernet_8xb2-160k_ade20k-512x512.py'
MSSWIN_MINI = 'msswin-mini_upernet_ade20k-scenes-128x128.py'
ALL = list(PAPER.values()) + [MSSWIN, MINI, MSSWIN_MINI]
WIDTHS = {'t': 96, 's': 96, 'b': 128}
DROP_PATH = {'t': 0.4, 's': 0.3, 'b': 0.4}  # ConvNeXt's UperNet ADE20K values


@pytest.fixture(scope='module')
def scenes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('ade20k-scenes')
    scenes.write(root, split_sizes={'training': 4, 'validation': 2})
    return root


def test_custom_imports_registers_msmlp_in_mmseg():
    # A fresh interpreter: only the config's custom_imports can have registered MSMLP.
    code = f"""
import mmseg.registry
from mmengine.config import Config
assert 'MSMLP' not in mmseg.registry.MODELS.module_dict
cfg = Config.fromfile({str(CONFIGS / PAPER['t'])!r})
assert cfg.custom_imports == dict(imports=['msmlp.mm'], allow_failed_imports=False)
from msmlp.mm import MSMLPBackbone
assert mmseg.registry.MODELS.get('MSMLP') is MSMLPBackbone
cfg.model.backbone.init_cfg = None
model = mmseg.registry.MODELS.build(cfg.model)
assert type(model.backbone) is MSMLPBackbone and type(model).__name__ == 'EncoderDecoder'
print('ok')
"""
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and result.stdout.strip().endswith('ok'), result.stderr[-3000:]


def test_headers_say_which_recipe_they_follow():
    for name in ALL:
        header = (CONFIGS / name).read_text().split('\n_base_')[0]
        assert header.startswith('#') and 'recipe' in header, name
    assert 'ConvNeXt UperNet ADE20K recipe' in (CONFIGS / PAPER['t']).read_text()


@pytest.mark.parametrize('size', 'tsb')
def test_paper_configs_state_the_recipe(size):
    cfg = Config.fromfile(str(CONFIGS / PAPER[size]))
    model = cfg.model
    assert model.type == 'EncoderDecoder'
    assert model.backbone.type == 'MSMLP' and model.backbone.arch == {'t': 'tiny', 's': 'small', 'b': 'base'}[size]
    assert model.backbone.drop_path_rate == DROP_PATH[size]
    assert model.backbone.out_indices == (0, 1, 2, 3)
    assert model.backbone.init_cfg.checkpoint.endswith(f'msmlp_{model.backbone.arch}_patch4_ckpt_epoch299.pth')
    width = WIDTHS[size]
    assert model.decode_head.type == 'UPerHead' and model.decode_head.in_index == [0, 1, 2, 3]
    assert model.decode_head.in_channels == [width, 2 * width, 4 * width, 8 * width]
    assert model.auxiliary_head.type == 'FCNHead' and model.auxiliary_head.in_index == 2
    assert model.auxiliary_head.in_channels == 4 * width and model.auxiliary_head.loss_decode.loss_weight == 0.4
    assert model.decode_head.num_classes == model.auxiliary_head.num_classes == 150
    assert model.data_preprocessor.size == (512, 512)
    assert dict(model.test_cfg) == dict(mode='slide', crop_size=(512, 512), stride=(341, 341))
    # data: ADE20K, reduce_zero_label, 512x512 crops, 8 GPUs x 2 images
    train = cfg.train_dataloader
    assert train.dataset.type == 'ADE20KDataset' and train.batch_size == 2
    assert [s for s in train.dataset.pipeline if s.type == 'LoadAnnotations'][0].reduce_zero_label
    assert [s for s in train.dataset.pipeline if s.type == 'RandomCrop'][0].crop_size == (512, 512)
    assert cfg.tta_pipeline and cfg.tta_model.type == 'SegTTAModel'
    # optimisation: AdamW, no decay on norms / biases / gamma, linear warm-up + poly, 160k iterations
    optim = cfg.optim_wrapper
    assert optim.type == 'OptimWrapper' and optim.optimizer.type == 'AdamW'
    assert optim.optimizer.lr == 1e-4 and optim.optimizer.weight_decay == 0.05
    assert optim.paramwise_cfg.norm_decay_mult == 0 and optim.paramwise_cfg.custom_keys['gamma'].decay_mult == 0
    warmup, poly = cfg.param_scheduler
    assert (warmup.type, warmup.end, warmup.by_epoch) == ('LinearLR', 1500, False)
    assert (poly.type, poly.power, poly.begin, poly.end, poly.eta_min) == ('PolyLR', 1.0, 1500, 160000, 0.0)
    assert cfg.train_cfg.type == 'IterBasedTrainLoop' and cfg.train_cfg.max_iters == 160000


def build(name: str, **test_cfg):
    from mmseg.registry import MODELS
    cfg = Config.fromfile(str(CONFIGS / name))
    cfg.model.backbone.init_cfg = None
    if test_cfg:
        cfg.model.test_cfg = test_cfg
    return MODELS.build(cfg.model).eval()


@pytest.mark.parametrize('size', 'tsb')
def test_stage_channels_and_logit_shape_at_odd_sizes(size):
    model = build(PAPER[size])
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        features = model.extract_feat(x)
        logits = model(x, mode='tensor')
    width = WIDTHS[size]
    assert [f.shape[1] for f in features] == [width, 2 * width, 4 * width, 8 * width]
    assert [tuple(f.shape[2:]) for f in features] == [(18, 23), (9, 12), (5, 6), (3, 3)]
    assert logits.shape == (1, 150, 18, 23)


def weight_decays(name: str) -> dict:
    """Each parameter's weight decay in the optimizer the config builds."""
    from mmengine.optim import build_optim_wrapper
    model = build(name)
    groups = build_optim_wrapper(model, Config.fromfile(str(CONFIGS / name)).optim_wrapper).optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: group['weight_decay'] for group in groups for p in group['params']}


def test_optimizer_has_no_decay_on_norms_biases_and_layer_scale():
    decay = weight_decays(MINI)
    assert decay['backbone.layers.0.blocks.0.gamma'] == 0
    assert decay['backbone.layers.0.blocks.0.norm.weight'] == 0
    assert decay['backbone.out_norms.0.weight'] == 0
    assert decay['decode_head.fpn_bottleneck.bn.weight'] == 0
    assert decay['backbone.layers.0.blocks.0.pwconv1.bias'] == 0
    assert decay['backbone.layers.0.blocks.0.pwconv1.weight'] == 0.05
    assert decay['decode_head.fpn_bottleneck.conv.weight'] == 0.05


def test_the_msswin_mini_config_is_the_mini_recipe_with_an_msswin_backbone():
    """Its heads, data and schedule are the MS-MLP mini config's; no weight decay on the relative
    position tables either (as the paper-scale MS-Swin config)."""
    mini, swin = Config.fromfile(str(CONFIGS / MINI)), Config.fromfile(str(CONFIGS / MSSWIN_MINI))
    assert swin.model.backbone.type == 'MSSwin' and tuple(swin.model.backbone.block_pattern) == ('ws', 'ms')
    assert (swin.model.decode_head, swin.model.auxiliary_head) == (mini.model.decode_head, mini.model.auxiliary_head)
    for key in ('train_dataloader', 'param_scheduler', 'train_cfg'):
        assert swin[key] == mini[key], key
    decay = weight_decays(MSSWIN_MINI)
    assert decay['backbone.layers.0.blocks.0.attn.relative_position_bias_table'] == 0
    assert decay['backbone.layers.0.blocks.1.gamma'] == 0 and decay['backbone.layers.0.blocks.0.norm1.weight'] == 0
    assert decay['backbone.layers.0.blocks.0.attn.qkv.weight'] == 0.05


def runner_config(name: str, root: Path, work_dir: Path) -> Config:
    """``name`` as tools/train.py would run it (with --cfg-options), on CPU-sized images."""
    cfg = Config.fromfile(str(CONFIGS / name))
    cfg.work_dir = str(work_dir)
    cfg.model.backbone.init_cfg = None  # the released ImageNet weights are not part of the tests
    crop = (64, 64)
    cfg.model.data_preprocessor.size = crop
    cfg.model.test_cfg = dict(mode='slide', crop_size=crop, stride=(43, 43))
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        loader.update(num_workers=0, persistent_workers=False)
        loader.dataset.update(data_root=str(root), indices=2)
        for step in loader.dataset.pipeline:
            if 'scale' in step:
                step.scale = (256, 64)
            if 'crop_size' in step:
                step.crop_size = crop
    cfg.train_dataloader.batch_size = 2
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=1, val_interval=1)
    cfg.default_hooks.logger.interval = 1
    cfg.default_hooks.checkpoint = None
    return cfg


@pytest.mark.parametrize('name', ALL)
def test_config_trains_one_iteration_through_the_runner(name, scenes_root, tmp_path):
    runner = Runner.from_cfg(runner_config(name, scenes_root, tmp_path))
    before = {n: p.detach().clone() for n, p in runner.model.named_parameters()}
    runner.train()
    assert runner.iter == 1
    changed = [n for n, p in runner.model.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith('backbone.') for n in changed) and any(n.startswith('decode_head.') for n in changed)
    scalars = runner.message_hub.log_scalars
    assert torch.isfinite(torch.tensor(scalars['train/loss'].current()))
    assert 'val/mIoU' in scalars and 'val/aAcc' in scalars  # the IoUMetric validation pass ran


def test_msswin_config_follows_mmsegs_swin_recipe():
    cfg = Config.fromfile(str(CONFIGS / MSSWIN))
    backbone = cfg.model.backbone
    assert (backbone.type, backbone.arch, tuple(backbone.block_pattern), backbone.drop_path_rate) == (
        'MSSwin', 'tiny', ('ws', 'ms'), 0.3)
    assert cfg.optim_wrapper.optimizer.lr == 6e-5 and cfg.optim_wrapper.optimizer.weight_decay == 0.01
    assert set(cfg.optim_wrapper.paramwise_cfg.custom_keys) == {'norm', 'gamma', 'relative_position_bias_table'}
    assert 'bias_decay_mult' not in cfg.optim_wrapper.paramwise_cfg  # Swin's recipe decays biases
    model = build(MSSWIN)
    with torch.no_grad():
        features = model.extract_feat(torch.randn(1, 3, 70, 90))
    assert [f.shape[1] for f in features] == [96, 192, 384, 768]
    assert [tuple(f.shape[2:]) for f in features] == [(18, 23), (9, 12), (5, 6), (3, 3)]
