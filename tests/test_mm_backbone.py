"""The MSMLP backbone registered with MMDetection and MMSegmentation (msmlp/mm.py)."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip('mmdet', reason='the OpenMMLab stack comes from scripts/setup.sh')
from mmdet.registry import MODELS as DET_MODELS  # noqa: E402

import msmlp  # noqa: E402
import msmlp.mm as mm  # noqa: E402
from msmlp import CheckpointError  # noqa: E402

FIXTURES = Path(__file__).parent / 'fixtures'
RELEASED = FIXTURES / 'released_layout_square_64.pth'
REFERENCE = torch.load(FIXTURES / 'msmlp_reference.pt', weights_only=True)['square_64']
TINY = dict(arch=None, embed_dim=24, depths=[1, 1, 2, 1])


def build(**kwargs):
    return DET_MODELS.build(dict(type='MSMLP', **kwargs))


def test_registered_from_a_config_through_custom_imports(tmp_path):
    """A fresh interpreter: only the config's custom_imports registers MSMLP."""
    config = tmp_path / 'backbone.py'
    config.write_text(textwrap.dedent("""
        custom_imports = dict(imports=['msmlp.mm'], allow_failed_imports=False)
        backbone = dict(type='MSMLP', arch='tiny', out_indices=(0, 1, 2, 3))
    """))
    script = textwrap.dedent(f"""
        import importlib.util
        from mmengine.config import Config
        from mmdet.registry import MODELS
        assert MODELS.get('MSMLP') is None, 'registered before the config was read'
        cfg = Config.fromfile({str(config)!r})
        for scope in ('mmdet', 'mmseg'):
            if importlib.util.find_spec(scope):
                model = importlib.import_module(scope + '.registry').MODELS.build(cfg.backbone)
                print(scope, type(model).__module__, type(model).__name__, model.out_channels)
    """)
    import importlib
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert 'mmdet msmlp.mm MSMLPBackbone [96, 192, 384, 768]' in out.stdout
    if importlib.util.find_spec('mmseg'):
        assert 'mmseg msmlp.mm MSMLPBackbone [96, 192, 384, 768]' in out.stdout


def test_is_the_foundation_model_not_a_copy():
    backbone = build(**TINY)
    assert isinstance(backbone, msmlp.MSMLP)
    assert backbone.num_classes == 0 and isinstance(backbone.head, torch.nn.Identity)


@pytest.mark.parametrize('arch, dims, depths', [('tiny', [96, 192, 384, 768], (3, 3, 9, 3)),
                                                 ('small', [96, 192, 384, 768], (3, 3, 27, 3)),
                                                 ('base', [128, 256, 512, 1024], (3, 3, 27, 3))])
def test_arch_variants(arch, dims, depths):
    with torch.device('meta'):
        backbone = build(arch=arch)
    assert backbone.out_channels == dims and backbone.depths == depths


def test_unknown_arch_and_missing_sizes_are_errors():
    with pytest.raises(ValueError, match="arch must be one of"):
        build(arch='huge')
    with pytest.raises(ValueError, match='embed_dim and depths'):
        build(arch=None, embed_dim=32)


@pytest.mark.parametrize('size', [(800, 1333), (801, 1335), (97, 61)])
def test_output_shapes_and_channels_per_stage(size):
    h, w = size
    backbone = build(arch='tiny').eval() if size == (800, 1333) else build(**TINY).eval()
    with torch.no_grad():
        outs = backbone(torch.randn(1, 3, h, w))
    assert len(outs) == 4
    for i, out in enumerate(outs):
        stride = 4 * 2 ** i
        assert out.shape == (1, backbone.out_channels[i], -(-h // stride), -(-w // stride))


def test_out_indices_select_stages():
    backbone = build(**TINY, out_indices=(1, 3)).eval()
    outs = backbone(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [48, 192] == backbone.out_channels


def test_frozen_stages_take_no_gradient_and_stay_in_eval():
    # seeded: drop path dropped both samples of layers.2.blocks.0 (no gradient, no update) for 2 seeds in 400
    torch.manual_seed(0)
    backbone = build(**TINY, frozen_stages=2, drop_path_rate=0.2)
    backbone.train()
    frozen = [backbone.patch_embed, backbone.layers[0], backbone.layers[1], backbone.out_norms['0'],
              backbone.out_norms['1']]
    for module in frozen:
        assert not module.training
        assert all(not p.requires_grad for p in module.parameters())
    assert backbone.layers[2].training and all(p.requires_grad for p in backbone.layers[2].parameters())
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    opt = torch.optim.SGD([p for p in backbone.parameters() if p.requires_grad], lr=0.1)
    sum(o.mean() for o in backbone(torch.randn(2, 3, 64, 64))).backward()
    opt.step()
    after = backbone.state_dict()
    assert torch.equal(before['layers.1.blocks.0.gamma'], after['layers.1.blocks.0.gamma'])
    assert not torch.equal(before['layers.2.blocks.0.gamma'], after['layers.2.blocks.0.gamma'])


def test_classifier_norm_takes_no_gradient():
    """Unused by dense outputs; a trainable unused parameter would stall DDP."""
    backbone = build(**TINY)
    assert not any(p.requires_grad for p in backbone.norm.parameters())
    sum(o.mean() for o in backbone(torch.randn(1, 3, 64, 64))).backward()
    assert all(p.grad is not None for p in backbone.parameters() if p.requires_grad)


def test_with_cp_and_drop_path(monkeypatch):
    torch.manual_seed(0)
    plain = build(**TINY, drop_path_rate=0.3)
    cp = build(**TINY, drop_path_rate=0.3, with_cp=True)
    cp.load_state_dict(plain.state_dict())
    assert all(stage.grad_checkpointing for stage in cp.layers)
    assert cp.layers[3].blocks[0].drop_path.drop_prob == pytest.approx(0.3)
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    plain.eval(), cp.train()
    cp.apply(lambda m: m.eval() if m.__class__.__name__ == 'DropPath' else None)
    for a, b in zip(plain(x), cp(x)):
        assert torch.allclose(a, b, atol=1e-6)
    checkpointed_blocks = []

    def counted_checkpoint(block, *args, **kwargs):
        checkpointed_blocks.append(block)
        return torch.utils.checkpoint.checkpoint(block, *args, **kwargs)
    monkeypatch.setattr(msmlp.model, 'checkpoint', counted_checkpoint)
    sum(o.sum() for o in cp(x)).backward()
    assert x.grad is not None and len(checkpointed_blocks) == sum(TINY['depths'])


def test_pretrained_init_cfg_loads_a_released_checkpoint():
    backbone = build(**TINY, init_cfg=dict(type='Pretrained', checkpoint=str(RELEASED)))
    with pytest.warns(UserWarning, match='classifier head'):
        backbone.init_weights()
    state = REFERENCE['state_dict']
    for key in ('patch_embed.proj.weight', 'layers.2.blocks.1.dwconv_td.3.weight', 'layers.3.blocks.0.gamma'):
        assert torch.equal(backbone.state_dict()[key], state[key])
    backbone.eval()
    with torch.no_grad():
        raw = backbone.forward_intermediates(REFERENCE['input'], intermediates_only=True)
        outs = backbone(REFERENCE['input'])
    for ours, ref, out in zip(raw, REFERENCE['stage_outputs'], outs):
        assert torch.allclose(ours, ref, atol=1e-5)
        # each output through its own (fresh) LayerNorm over channels
        normed = F.layer_norm(ref.permute(0, 2, 3, 1), ref.shape[1:2], eps=1e-6).permute(0, 3, 1, 2)
        assert torch.allclose(out, normed, atol=1e-4)


def test_pretrained_init_cfg_loads_a_lightning_checkpoint(tmp_path):
    source = build(**TINY)
    path = tmp_path / 'task.ckpt'
    torch.save({'state_dict': {f'model.backbone.{k}': v for k, v in source.state_dict().items()},
                'hyper_parameters': {'config': 'x.py'}}, path)
    backbone = build(**TINY, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    backbone.init_weights()
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in backbone.state_dict().items())
    assert backbone.is_init


def test_pretrained_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match='not found: .*missing.pth'):
        build(**TINY, init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'missing.pth'))).init_weights()
    with pytest.raises(CheckpointError, match='does not fit the model'):
        build(arch=None, embed_dim=32, depths=[1, 1, 2, 1],
              init_cfg=dict(type='Pretrained', checkpoint=str(RELEASED))).init_weights()


def test_init_cfg_prefix_picks_one_backbone_of_a_file_holding_several(tmp_path):
    """A teacher-student file (mmdet's semi-supervised detectors save both): each loads by its
    prefix, as mmengine's Pretrained init takes it; without one, one line instead of a mix."""
    teacher, student = build(**TINY), build(**TINY)
    path = tmp_path / 'teacher_student.pth'
    torch.save({'state_dict': {**{f'teacher.backbone.{k}': v for k, v in teacher.state_dict().items()},
                               **{f'student.backbone.{k}': v for k, v in student.state_dict().items()}}}, path)
    for prefix, source in (('teacher.backbone.', teacher), ('student.', student), ('teacher.backbone', teacher)):
        backbone = build(**TINY, init_cfg=dict(type='Pretrained', checkpoint=str(path), prefix=prefix))
        backbone.init_weights()
        assert all(torch.equal(v, source.state_dict()[k]) for k, v in backbone.state_dict().items()), prefix
    with pytest.raises(CheckpointError, match=r"holds 2 backbones \(student.backbone., teacher.backbone.\): name"):
        build(**TINY, init_cfg=dict(type='Pretrained', checkpoint=str(path))).init_weights()
    with pytest.raises(CheckpointError, match=r"no weights under the prefix 'neck.': its keys start with student., "):
        build(**TINY, init_cfg=dict(type='Pretrained', checkpoint=str(path), prefix='neck.')).init_weights()


def test_deprecated_pretrained_argument_is_read_as_init_cfg():
    """mmseg's segmentors hand their model.pretrained to the backbone as pretrained=, as mmdet's
    Swin still reads it."""
    with pytest.warns(UserWarning, match="pretrained is deprecated.*init_cfg=dict.type='Pretrained'"):
        backbone = build(**TINY, pretrained=str(RELEASED))
    assert backbone.init_cfg == dict(type='Pretrained', checkpoint=str(RELEASED))
    with pytest.warns(UserWarning, match='classifier head'):
        backbone.init_weights()
    assert torch.equal(backbone.patch_embed.proj.weight, REFERENCE['state_dict']['patch_embed.proj.weight'])
    with pytest.raises(ValueError, match='as init_cfg or as pretrained, not both'):
        build(**TINY, pretrained=str(RELEASED), init_cfg=dict(type='Pretrained', checkpoint=str(RELEASED)))


def test_mmseg_model_pretrained_reaches_the_backbone():
    pytest.importorskip('mmseg')
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS as SEG_MODELS
    cfg = Config.fromfile(str(Path(__file__).parent.parent / 'configs/mmseg/msmlp-mini_upernet_ade20k-scenes-128x128.py'))
    cfg.model.update(pretrained=str(RELEASED))
    cfg.model.backbone.update(embed_dim=24)
    cfg.model.decode_head.in_channels = [24, 48, 96, 192]
    cfg.model.pop('auxiliary_head', None)
    init_default_scope('mmseg')
    with pytest.warns(UserWarning, match='pretrained is deprecated'):
        segmentor = SEG_MODELS.build(cfg.model)
    with pytest.warns(UserWarning, match='classifier head'):
        segmentor.init_weights()
    assert torch.equal(segmentor.backbone.patch_embed.proj.weight, REFERENCE['state_dict']['patch_embed.proj.weight'])


@pytest.mark.parametrize('given', [dict(embed_dim=32), dict(depths=[1, 1, 2, 1])])
def test_sizes_that_contradict_the_arch_are_refused(given):
    """A config inheriting the mini config (arch=None, embed_dim=32, depths=[1, 1, 2, 1]) that sets
    arch='small' built the mini network silently."""
    with pytest.raises(ValueError, match=r"arch='small' has .* is given too \(a _base_ config may set it\)"):
        build(arch='small', **given)
    with torch.device('meta'):
        assert build(arch='small', embed_dim=96, depths=(3, 3, 27, 3)).depths == (3, 3, 27, 3)


def test_a_new_arch_in_a_config_inheriting_the_mini_config_is_refused(tmp_path):
    from mmengine.config import Config
    mini = Path(__file__).parent.parent / 'configs/mmdet/mask-rcnn_msmlp-mini_fpn_shapes.py'
    (tmp_path / 'small.py').write_text(f"_base_ = {str(mini)!r}\nmodel = dict(backbone=dict(arch='small'))\n")
    cfg = Config.fromfile(str(tmp_path / 'small.py'))
    with pytest.raises(ValueError, match="arch='small' has embed_dim=96, but embed_dim=32"):
        DET_MODELS.build(cfg.model.backbone)
    cfg.model.backbone.update(embed_dim=None, depths=None)
    with torch.device('meta'):
        assert DET_MODELS.build(cfg.model.backbone).depths == (3, 3, 27, 3)


def test_detector_init_weights_reaches_the_backbone():
    """mmengine's BaseModule.init_weights of a detector calls ours (safe loader, not torch.load)."""
    from mmengine.config import Config
    cfg = Config.fromfile(str(Path(__file__).parent.parent / 'configs/mmdet/mask-rcnn_msmlp-mini_fpn_shapes.py'))
    cfg.model.backbone.update(embed_dim=24, init_cfg=dict(type='Pretrained', checkpoint=str(RELEASED)))
    cfg.model.neck.in_channels = [24, 48, 96, 192]
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    detector = DET_MODELS.build(cfg.model)
    with pytest.warns(UserWarning, match='classifier head'):
        detector.init_weights()
    assert torch.equal(detector.backbone.patch_embed.proj.weight, REFERENCE['state_dict']['patch_embed.proj.weight'])


def test_import_works_with_only_one_of_mmdet_and_mmseg():
    script = textwrap.dedent("""
        import importlib.util, sys
        real = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == 'mmseg' else real(name, *a)
        import msmlp.mm
        assert msmlp.mm.REGISTERED_IN == ['mmdet'], msmlp.mm.REGISTERED_IN
        assert 'mmseg' not in sys.modules
        assert 'lightning' not in sys.modules and 'tasks' not in sys.modules
        print('ok')
    """)
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and 'ok' in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize('kind', ['MSMLP', 'MSSwin'])
@pytest.mark.parametrize('out_indices', [(0, 1, 2), (1,), (0, 1, 2, 3)])
def test_every_trainable_parameter_gets_a_gradient(kind, out_indices):
    """DDP (mmengine's and Lightning's) waits for a gradient of every trainable parameter: the
    stages after the last of out_indices, never run, take none (it stopped at iteration 2)."""
    arch = dict(TINY) if kind == 'MSMLP' else dict(arch=None, embed_dim=24, depths=[1, 1, 2, 1],
                                                      num_heads=[1, 2, 4, 8], window_size=4)
    backbone = build(**arch, out_indices=out_indices) if kind == 'MSMLP' else DET_MODELS.build(
        dict(type='MSSwin', **arch, out_indices=out_indices))
    sum(o.sum() for o in backbone.train()(torch.randn(1, 3, 64, 64))).backward()
    assert [n for n, p in backbone.named_parameters() if p.requires_grad and p.grad is None] == []
    assert all(p.requires_grad for p in backbone.layers[max(out_indices)].blocks.parameters())


def test_mmengine_loads_checkpoints_of_its_own_runner_under_weights_only(tmp_path):
    """torch loads weights only by default and mmengine 0.10 does not allow its runner's objects:
    tools/test.py, --resume and the inference APIs refused what tools/train.py saved."""
    import numpy as np
    from mmengine.logging import HistoryBuffer, MessageHub
    from mmengine.runner import CheckpointLoader
    hub = MessageHub('checkpoint_test')
    for value in (1.5, np.float64(2.5)):
        hub.update_scalar('train/loss', value)
    torch.save({'state_dict': {'w': torch.ones(2)}, 'message_hub': hub.state_dict()}, tmp_path / 'epoch_1.pth')
    loaded = CheckpointLoader.load_checkpoint(str(tmp_path / 'epoch_1.pth'))
    history = loaded['message_hub']['log_scalars']['train/loss']
    assert isinstance(history, HistoryBuffer) and history.mean() == 2.0 and history.current() == 2.5


class _Smuggled:
    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return getattr, (self.owner, self.name)


@pytest.mark.parametrize('owner, name', [(torch.Tensor, 'add'), ('HistoryBuffer', '_set_default_statistics')])
def test_the_runner_globals_allow_getattr_only_for_history_buffer_statistics(tmp_path, owner, name):
    import pickle
    from mmengine.logging import HistoryBuffer
    from mmengine.runner import CheckpointLoader
    owner = HistoryBuffer if owner == 'HistoryBuffer' else owner
    torch.save({'state_dict': {}, 'smuggled': _Smuggled(owner, name)}, tmp_path / 'bad.pth')
    with pytest.raises(pickle.UnpicklingError, match='not an mmengine HistoryBuffer statistic'):
        CheckpointLoader.load_checkpoint(str(tmp_path / 'bad.pth'))
