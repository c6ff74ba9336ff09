"""MS-Swin: timm's Swin with mix-shift blocks. Swin itself where no MS block is placed,
registration, the dense interface at odd sizes, loading from Swin checkpoints, OpenMMLab."""
import re
from pathlib import Path
import warnings

import pytest
import timm
import torch

import msmlp
from msmlp.msswin import MSSwinBlock, load_swin_checkpoint
from timm.models.swin_transformer import SwinTransformerBlock


def kinds(model):
    return [['ms' if isinstance(b, MSSwinBlock) else ('sw' if any(b.shift_size) else 'ws') for b in stage.blocks]
            for stage in model.layers]


def test_the_swin_pattern_is_timms_swin_exactly():
    torch.manual_seed(0)
    swin = timm.create_model('swin_tiny_patch4_window7_224').eval()
    ours = timm.create_model('msswin_tiny', block_pattern=('ws', 'sw')).eval()
    assert list(ours.state_dict()) == list(swin.state_dict())
    ours.load_state_dict(swin.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(ours(x), swin(x), atol=1e-6, rtol=0)
    # and at any size, as timm's Swin with dynamic image sizes
    dynamic = timm.create_model('swin_tiny_patch4_window7_224', strict_img_size=False).eval()
    dynamic.load_state_dict(swin.state_dict())
    x = torch.randn(1, 3, 224, 320)
    with torch.no_grad():
        assert torch.allclose(ours(x), dynamic(x), atol=1e-6, rtol=0)


def test_default_pattern_replaces_every_second_swin_block():
    model = timm.create_model('msswin_tiny')
    assert kinds(model) == [['ws', 'ms'], ['ws', 'ms'], ['ws', 'ms'] * 3, ['ws', 'ms']]
    block = model.layers[2].blocks[1]
    assert block.mix_size == msmlp.MIX_SIZES[2] and block.gamma.shape == (384,)
    assert isinstance(model.layers[2].blocks[0], SwinTransformerBlock)


def test_per_stage_patterns_and_bad_patterns():
    model = timm.create_model('msswin_tiny', block_pattern=[('ms',), ('ws', 'sw'), ('sw', 'ms', 'ws'), ('ws',)])
    assert kinds(model) == [['ms', 'ms'], ['ws', 'sw'], ['sw', 'ms', 'ws', 'sw', 'ms', 'ws'], ['ws', 'ws']]
    with pytest.raises(ValueError, match="block types are \\('ws', 'sw', 'ms'\\)"):
        timm.create_model('msswin_tiny', block_pattern=('ws', 'attn'))
    with pytest.raises(ValueError, match='2 per-stage patterns for 4 stages'):
        timm.create_model('msswin_tiny', block_pattern=[('ws',), ('ms',)])


@pytest.mark.parametrize('name, params, swin_params', [('msswin_tiny', 24.08, 28.29), ('msswin_small', 41.96, 49.61),
                                                       ('msswin_base', 74.08, 87.77)])
def test_registered_variants_and_their_size(name, params, swin_params):
    assert name in timm.list_models('msswin*')
    with torch.device('meta'):
        model = timm.create_model(name)
        swin = timm.create_model(name.replace('msswin', 'swin') + '_patch4_window7_224')
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert round(count, 2) == params and round(sum(p.numel() for p in swin.parameters()) / 1e6, 2) == swin_params


def test_features_only_and_dense_outputs_at_an_odd_size():
    x = torch.randn(1, 3, 383, 511)
    features = timm.create_model('msswin_tiny', features_only=True).eval()
    with torch.no_grad():
        shapes = [tuple(f.shape) for f in features(x)]
    assert shapes == [(1, 96, 96, 128), (1, 192, 48, 64), (1, 384, 24, 32), (1, 768, 12, 16)]
    assert features.feature_info.channels() == [96, 192, 384, 768]
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    dense = msmlp.MSSwin(out_indices=(1, 3)).eval()
    with torch.no_grad():
        outs = dense.forward_dense(x)
    assert [tuple(o.shape) for o in outs] == [(1, 192, 48, 64), (1, 768, 12, 16)]
    assert list(dense.out_norms) == ['1', '3']


def test_fast_and_reference_mixing_and_gradient_checkpointing_agree():
    torch.manual_seed(0)
    model = msmlp.MSSwin(embed_dim=40, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4, img_size=32,
                         drop_path_rate=0.)
    for block in model.modules():
        if isinstance(block, MSSwinBlock):
            block.gamma.data.fill_(0.5)  # make the mixing visible
    x = torch.randn(2, 3, 37, 45, requires_grad=True)
    fast = model(x)
    fast.sum().backward()
    grad = x.grad.clone()
    x.grad = None
    model.set_mix_impl('reference')
    model.set_grad_checkpointing(True)
    reference = model(x)
    reference.sum().backward()
    assert torch.allclose(fast, reference, atol=1e-5, rtol=1e-5)
    assert torch.allclose(grad, x.grad, atol=1e-5, rtol=1e-4)


def test_frozen_stages_are_reapplied_on_train():
    model = msmlp.MSSwin(embed_dim=40, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4,
                         out_indices=(0, 1, 2, 3), frozen_stages=2)
    model.train()
    assert not model.patch_embed.training and not model.layers[1].training and model.layers[2].training
    assert not any(p.requires_grad for p in model.layers[1].parameters())
    assert not any(p.requires_grad for p in model.out_norms['1'].parameters())
    assert all(p.requires_grad for name, p in model.layers[2].named_parameters() if not name.startswith('downsample'))


def swin_state(**kwargs):
    torch.manual_seed(1)
    return timm.create_model('swin_tiny_patch4_window7_224', **kwargs).state_dict()


def test_starting_from_a_swin_checkpoint_loads_the_matching_keys(tmp_path):
    state = swin_state()
    torch.save({'model': state}, tmp_path / 'swin.pth')
    model = timm.create_model('msswin_tiny', num_classes=1000)
    with pytest.warns(UserWarning, match=re.escape(f'{tmp_path / "swin.pth"}: loaded ')) as warned:
        report = load_swin_checkpoint(model, tmp_path / 'swin.pth')
    assert 'layers.0.blocks.1.attn.qkv.weight' in report['not_loaded']  # attention where an MS block is
    assert 'layers.0.blocks.1.dwconv_lr.0.weight' in report['fresh']
    assert 'not loaded from the file: layers.0.blocks.1' in str(warned[0].message)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in report['loaded'])
    assert 'layers.2.blocks.4.attn.qkv.weight' in report['loaded'] and 'head.fc.weight' in report['loaded']
    assert not any(k.startswith(('layers.0.blocks.1.', 'layers.2.blocks.5.')) for k in report['loaded'])


def test_a_swin_checkpoint_in_the_swin_repositorys_layout_is_converted(tmp_path):
    # The Swin repository puts each stage's downsampling at its end and names the classifier head.
    state = swin_state()
    original = {re.sub(r'layers\.(\d+)\.downsample', lambda m: f'layers.{int(m.group(1)) - 1}.downsample', k)
                .replace('head.fc.', 'head.'): v for k, v in state.items()}
    assert 'layers.0.downsample.reduction.weight' in original
    torch.save({'model': original}, tmp_path / 'swin_tiny_patch4_window7_224.pth')
    model = timm.create_model('msswin_tiny', block_pattern=('ws', 'sw'))
    report = load_swin_checkpoint(model, tmp_path / 'swin_tiny_patch4_window7_224.pth')
    assert report['not_loaded'] == [] and report['fresh'] == []
    assert torch.equal(model.layers[1].downsample.reduction.weight, state['layers.1.downsample.reduction.weight'])


def test_pretrained_through_timm_takes_the_file(tmp_path):
    torch.save(swin_state(), tmp_path / 'swin.pth')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model = timm.create_model('msswin_tiny', pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(tmp_path / 'swin.pth')))
        features = timm.create_model('msswin_tiny', pretrained=True, features_only=True,
                                     pretrained_cfg_overlay=dict(file=str(tmp_path / 'swin.pth')))
    assert torch.equal(model.patch_embed.proj.weight, swin_state()['patch_embed.proj.weight'])
    assert torch.equal(features.model.patch_embed.proj.weight, swin_state()['patch_embed.proj.weight'])
    with pytest.raises(ValueError, match='no released weights'):
        timm.create_model('msswin_tiny', pretrained=True)


def test_openmmlab_backbone_is_the_same_model_and_loads_swin_weights(tmp_path):
    pytest.importorskip('mmdet', reason='the OpenMMLab stack comes from scripts/setup.sh')
    from msmlp.mm import MSSwinBackbone
    import mmdet.registry
    assert mmdet.registry.MODELS.get('MSSwin') is MSSwinBackbone
    torch.save(swin_state(), tmp_path / 'swin.pth')
    backbone = MSSwinBackbone(arch='t', init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'swin.pth')))
    assert isinstance(backbone, msmlp.MSSwin) and backbone.out_channels == [96, 192, 384, 768]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        backbone.init_weights()
    assert torch.equal(backbone.layers[2].blocks[0].attn.qkv.weight, swin_state()['layers.2.blocks.0.attn.qkv.weight'])
    with torch.no_grad():
        outs = backbone.eval()(torch.randn(1, 3, 70, 90))
    assert [tuple(o.shape[1:]) for o in outs] == [(96, 18, 23), (192, 9, 12), (384, 5, 6), (768, 3, 3)]
    with pytest.raises(ValueError, match='embed_dim, depths, num_heads and window_size'):
        MSSwinBackbone(arch=None, embed_dim=32)
    with pytest.raises(ValueError, match="arch='t' has num_heads=.* is given too"):
        MSSwinBackbone(arch='t', num_heads=[2, 4, 8, 16])
    with torch.device('meta'):
        backbone = MSSwinBackbone(arch='t', window_size=12)  # the one size an arch leaves free
    assert backbone.layers[0].blocks[0].window_size == (12, 12)


def test_benchmark_runs_msswin_against_swin_and_msmlp(capsys):
    import cli
    assert cli.main(['benchmark', '--model', 'msswin_tiny', '--compare', 'swin_tiny_patch4_window7_224', 'msmlp_tiny',
                     '--batch-size', '1', '--img-size', '64', '--runs', '1', '--warmup', '0', '--no-memory']) == 0
    table = capsys.readouterr().out
    for row in ('| msswin_tiny (fast) |', '| msswin_tiny (reference) |', '| swin_tiny_patch4_window7_224 |',
                '| msmlp_tiny |'):
        assert row in table


def test_torchscript_gives_the_eager_outputs():
    model = timm.create_model('msswin_tiny', num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(torch.jit.script(model)(x), model(x), atol=1e-5)
    dense = msmlp.MSSwin(out_indices=(1, 3)).eval()  # the dense outputs are a method of the scripted model
    with torch.no_grad():
        for scripted, eager in zip(torch.jit.script(dense).forward_dense(x), dense.forward_dense(x), strict=True):
            assert torch.allclose(scripted, eager, atol=1e-5)


def test_frozen_stages_freeze_the_patch_merging_after_the_last_frozen_stage_as_mmdet_swin():
    model = msmlp.MSSwin(embed_dim=40, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4, frozen_stages=1)
    model.train()
    merging = model.layers[1].downsample  # timm's layout: the merging after stage 0 opens stage 1
    assert not merging.training and not any(p.requires_grad for p in merging.parameters())
    assert all(p.requires_grad for name, p in model.layers[1].named_parameters() if not name.startswith('downsample'))
    assert all(p.requires_grad for p in model.layers[2].downsample.parameters())


def test_pruning_keeps_the_dense_outputs_of_the_kept_stages():
    model = msmlp.MSSwin(out_indices=(0, 1, 2, 3)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model.forward_dense(x)
        assert model.prune_intermediate_layers([1]) == [1]
        after = model.forward_dense(x)
    assert model.out_indices == (0, 1) and list(model.out_norms) == ['0', '1']
    assert len(after) == 2 and all(torch.equal(a, b) for a, b in zip(after, before))


def test_a_checkpoint_without_the_swin_part_is_refused_in_one_line(tmp_path):
    torch.save({'state_dict': {'conv1.weight': torch.zeros(64, 3, 7, 7)}}, tmp_path / 'resnet.pth')
    with pytest.raises(msmlp.CheckpointError, match=r'resnet.pth does not fit the MSSwin: 93 of its 93 Swin tensors '
                                                    r'are missing or of another shape \(patch_embed.proj.weight, '):
        load_swin_checkpoint(timm.create_model('msswin_tiny'), tmp_path / 'resnet.pth')
    # OpenMMLab's own Swin layout (mmseg's and mmdet's Swin files), named so the user finds the right file
    openmmlab = {f'backbone.{k}'.replace('layers.', 'stages.').replace('patch_embed.proj.', 'patch_embed.projection.'): v
                 for k, v in swin_state().items()}
    torch.save({'state_dict': openmmlab}, tmp_path / 'mmseg_swin.pth')
    with pytest.raises(msmlp.CheckpointError, match=r"OpenMMLab's Swin layout \(stages\.\*\); give the Swin repository's or timm's"):
        load_swin_checkpoint(timm.create_model('msswin_tiny'), tmp_path / 'mmseg_swin.pth')
    torch.save(timm.create_model('swin_base_patch4_window7_224').state_dict(), tmp_path / 'swin_base.pth')
    with pytest.raises(msmlp.CheckpointError, match='swin_base.pth does not fit the MSSwin'):
        load_swin_checkpoint(timm.create_model('msswin_tiny'), tmp_path / 'swin_base.pth')


def test_an_ms_mlp_file_through_timm_names_the_family_to_use():
    """timm's pretrained=True reached the Swin check ('93 of its 93 Swin tensors are missing')."""
    released = str(Path(__file__).parent / 'fixtures' / 'released_layout_square_64.pth')
    with pytest.raises(msmlp.CheckpointError, match="holds MS-MLP weights, not an MS-Swin's: load it into an msmlp_"):
        timm.create_model('msswin_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=released))


def test_pretrained_strict_false_loads_the_swin_tensors_that_fit(tmp_path):
    state = {k: v for k, v in swin_state().items() if not k.startswith('layers.3.')}
    torch.save(state, tmp_path / 'three_stages.pth')
    overlay = dict(file=str(tmp_path / 'three_stages.pth'))
    with pytest.raises(msmlp.CheckpointError, match='does not fit the MSSwin'):
        timm.create_model('msswin_tiny', pretrained=True, pretrained_cfg_overlay=overlay)
    with pytest.warns(UserWarning, match=r'three_stages.pth: loaded \d+ tensors; .*kept their initialisation'):
        model = timm.create_model('msswin_tiny', pretrained=True, pretrained_strict=False, pretrained_cfg_overlay=overlay)
    assert torch.equal(model.layers[2].blocks[0].attn.qkv.weight, state['layers.2.blocks.0.attn.qkv.weight'])


def test_a_swin_stem_is_adapted_to_other_input_channels(tmp_path):
    state = swin_state()
    torch.save(state, tmp_path / 'swin.pth')
    model = timm.create_model('msswin_tiny', in_chans=1)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the MS blocks start fresh
        report = load_swin_checkpoint(model, tmp_path / 'swin.pth')
    assert report['adapted'] == ['patch_embed.proj.weight']
    assert torch.allclose(model.patch_embed.proj.weight, state['patch_embed.proj.weight'].sum(1, keepdim=True))
