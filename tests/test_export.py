"""``msmlp export``: ONNX (run with onnxruntime), TorchScript, torch.export programs and safetensors,
for the classifier and the dense backbone, checked against the eager model."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import msmlp
from msmlp.export import DenseOutputs, OutputError, build_model, check_export, export, export_openmmlab, main

ROOT = Path(__file__).parents[1]
SMALL = dict(embed_dim=24, depths=(1, 1, 2, 1))


def small_classifier():
    return msmlp.MSMLP(num_classes=10, **SMALL).eval()


def small_backbone():
    return DenseOutputs(msmlp.MSMLP(num_classes=0, out_indices=(0, 1, 2, 3), **SMALL)).eval()


def run_onnx(path, x):
    import onnxruntime
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    return [torch.from_numpy(o) for o in session.run(None, {'images': x.numpy()})]


@pytest.mark.parametrize('make', [small_classifier, small_backbone], ids=['classifier', 'backbone'])
def test_onnx_with_dynamic_batch_height_and_width_matches_eager_in_onnxruntime(tmp_path, make):
    model = make()
    path = tmp_path / 'model.onnx'
    export(model, 'onnx', str(path))
    for shape in [(1, 3, 224, 224), (2, 3, 383, 511)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            expected = model(x)
        expected = expected if isinstance(expected, list) else [expected]
        got = run_onnx(path, x)
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert g.shape == e.shape
            assert (g - e).abs().max() <= 1e-4 * e.abs().max()


def test_static_onnx_takes_its_size_only(tmp_path):
    model = small_classifier()
    path = tmp_path / 'static.onnx'
    export(model, 'onnx', str(path), img_size=(96, 128), static=True)
    assert check_export(model, 'onnx', str(path), (96, 128), static=True) <= 1e-5
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument
    with pytest.raises(InvalidArgument, match='Got: 128 Expected: 96'):
        run_onnx(path, torch.randn(1, 3, 128, 128))


@pytest.mark.parametrize('fmt', ['torchscript', 'exported-program'])
@pytest.mark.parametrize('make', [small_classifier, small_backbone], ids=['classifier', 'backbone'])
def test_torchscript_and_exported_program_match_eager_at_any_size(tmp_path, fmt, make):
    model = make()
    path = tmp_path / 'model.bin'
    export(model, fmt, str(path), img_size=(64, 96))
    assert check_export(model, fmt, str(path), (64, 96)) <= 1e-5  # at 1x3x64x96 and 2x3x383x511


def test_dynamic_export_refuses_sizes_below_64(tmp_path):
    with pytest.raises(ValueError, match='--static'):
        export(small_classifier(), 'onnx', str(tmp_path / 'm.onnx'), img_size=(32, 32))


def test_safetensors_weights_load_with_timm_pretrained(tmp_path, capsys):
    out = tmp_path / 'msmlp_tiny.safetensors'
    umask = os.umask(0o022)
    try:
        assert main(['--model', 'msmlp_tiny', '--format', 'safetensors', '--output', str(out)]) == 0
    finally:
        os.umask(umask)
    assert 'holds the model\'s weights exactly' in capsys.readouterr().out
    assert out.stat().st_mode & 0o777 == 0o644  # as the other formats (safetensors itself writes 0600)
    loaded = timm.create_model('msmlp_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(out)))
    from safetensors.torch import load_file
    saved = load_file(out)
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())


def test_checkpoint_of_a_lightning_run_sets_the_classes_and_weights(tmp_path, capsys):
    trained = timm.create_model('msmlp_tiny', num_classes=7).eval()
    ckpt = tmp_path / 'last.ckpt'
    torch.save({'state_dict': {f'model.{k}': v for k, v in trained.state_dict().items()}, 'epoch': 3}, ckpt)
    out = tmp_path / 'cls.pt'
    assert main(['--model', 'msmlp_tiny', '--checkpoint', str(ckpt), '--format', 'torchscript',
                 '--output', str(out)]) == 0
    printed = capsys.readouterr().out
    assert '(7 classes) from' in printed and 'at 1x3x224x224 and 2x3x383x511 matches' in printed
    scripted = torch.jit.load(str(out))
    x = torch.randn(1, 3, 100, 140)
    with torch.no_grad():
        assert torch.allclose(scripted(x), trained(x), rtol=1e-4, atol=1e-5)


def test_backbone_of_a_detection_checkpoint(tmp_path):
    dense = msmlp.MSMLP(num_classes=0, out_indices=(1, 2, 3), **msmlp.VARIANT_ARCHS['msmlp_tiny'])
    state = {f'model.backbone.{k}': v for k, v in dense.state_dict().items()}
    state['model.neck.lateral_convs.0.conv.weight'] = torch.zeros(1)
    torch.save({'state_dict': state}, tmp_path / 'det.ckpt')
    model = build_model('msmlp_tiny', str(tmp_path / 'det.ckpt'), features_only=True, out_indices=(1, 2, 3))
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        for ours, expected in zip(model(x), dense.eval().forward_dense(x), strict=True):
            assert torch.equal(ours, expected)


def lightning_checkpoint(path, model, prefix='model.'):
    torch.save({'state_dict': {f'{prefix}{k}': v for k, v in model.state_dict().items()}, 'epoch': 3}, path)
    return str(path)


def test_checkpoint_of_the_default_cls_run_builds_its_architecture(tmp_path, capsys):
    """configs/cls/default.yaml trains embed_dim 40, depths 1,1,2,1: export reads that from the weights."""
    trained = timm.create_model('msmlp_tiny', num_classes=3, embed_dim=40, depths=(1, 1, 2, 1)).eval()
    ckpt = lightning_checkpoint(tmp_path / 'last.ckpt', trained)
    out = tmp_path / 'cls.pt'
    assert main(['--checkpoint', ckpt, '--format', 'torchscript', '--output', str(out)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith('msmlp export: msmlp_tiny (embed_dim 40, depths 1,1,2,1) classifier (3 classes) from')
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(out))(x), trained(x), rtol=1e-4, atol=1e-5)


def test_weights_of_1000_unnamed_classes_are_named_as_imagenets(tmp_path):
    """The released files name no classes; their 1000 are ImageNet-1K's, in timm's order."""
    from msmlp.export import class_names
    torch.save(msmlp.MSMLP(num_classes=1000, **SMALL).state_dict(), tmp_path / 'in1k.pth')
    names = class_names(build_model('msmlp_tiny', str(tmp_path / 'in1k.pth')))
    assert len(names) == 1000 and names[281] == 'tabby, tabby cat'
    assert class_names(build_model('msmlp_tiny')) is None  # random weights: no classes to name
    torch.save(msmlp.MSMLP(num_classes=10, **SMALL).state_dict(), tmp_path / 'ten.pth')
    assert class_names(build_model('msmlp_tiny', str(tmp_path / 'ten.pth'))) is None


@pytest.mark.parametrize('fmt', ['onnx', 'torchscript', 'exported-program', 'safetensors'])
def test_a_cls_runs_class_names_are_recorded_in_the_file(tmp_path, capsys, fmt):
    """Without them an exported classifier's outputs are numbers: the run's checkpoint records its
    class names, and every format carries them (timm's pretrained_cfg['label_names'] in between)."""
    from msmlp.export import written_class_names
    trained = timm.create_model('msmlp_tiny', num_classes=3, **SMALL).eval()
    ckpt = tmp_path / 'last.ckpt'
    torch.save({'state_dict': {f'model.{k}': v for k, v in trained.state_dict().items()},
                'hyper_parameters': {'class_names': ['ant', 'bee', 'wasp'], 'num_classes': 3}}, ckpt)
    out = tmp_path / f'cls.{fmt}'
    assert main(['--checkpoint', str(ckpt), '--format', fmt, '--output', str(out), '--no-check']) == 0
    assert "with its 3 class names ('class_names')" in capsys.readouterr().out
    assert written_class_names(fmt, str(out)) == ['ant', 'bee', 'wasp']
    # a backbone has no classes; nor do weights that name none
    assert main(['--checkpoint', str(ckpt), '--format', fmt, '--output', str(out), '--no-check',
                 '--features-only']) == 0
    assert written_class_names(fmt, str(out)) is None


def test_checkpoint_of_a_variant_is_built_as_that_variant(tmp_path, capsys):
    with torch.device('meta'):
        shapes = timm.create_model('msmlp_small', num_classes=5).state_dict()
    ckpt = tmp_path / 'small.pth'
    torch.save({'model': {k: torch.zeros(v.shape) for k, v in shapes.items()}}, ckpt)
    model = build_model('msmlp_tiny', str(ckpt))
    assert model.pretrained_cfg['architecture'] == 'msmlp_small' and model.num_classes == 5


def test_backbone_of_the_default_det_run(tmp_path, capsys):
    """The default det run's backbone (embed_dim 32, depths 1,1,2,1, norms at stages 0-3) under
    model.backbone., exported at stages 1-3 with the backbone's own key names."""
    dense = msmlp.MSMLP(num_classes=0, out_indices=(0, 1, 2, 3), embed_dim=32, depths=(1, 1, 2, 1)).eval()
    ckpt = lightning_checkpoint(tmp_path / 'det.ckpt', dense, prefix='model.backbone.')
    out = tmp_path / 'backbone.safetensors'
    assert main(['--checkpoint', ckpt, '--features-only', '--out-indices', '1', '2', '3', '--format', 'safetensors',
                 '--output', str(out)]) == 0
    assert 'msmlp_tiny (embed_dim 32, depths 1,1,2,1) backbone (stages 1, 2, 3) from' in capsys.readouterr().out
    from safetensors.torch import load_file
    assert not any(k.startswith('model.') for k in load_file(out))
    strict = timm.create_model('msmlp_tiny', num_classes=0, out_indices=(1, 2, 3), embed_dim=32, depths=(1, 1, 2, 1),
                               checkpoint_path=str(out)).eval()
    ours = msmlp.MSMLP(num_classes=0, out_indices=(1, 2, 3), embed_dim=32, depths=(1, 1, 2, 1)).eval()
    assert msmlp.load_pretrained(ours, out)['dropped'] == []
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        expected = dense.forward_dense(x)[1:]
        for model in (strict, ours):
            for got, e in zip(model.forward_dense(x), expected, strict=True):
                assert torch.equal(got, e)


def test_backbone_of_an_msswin_det_run_is_built_from_its_config(tmp_path, capsys):
    """configs/det/mask-rcnn_msswin-mini_fpn_shapes.yaml's backbone (MS-Swin of width 32) under
    model.backbone.: its architecture is the run's mmdet config's (before: 'give their
    architecture, --model msswin_tiny ...', then 175 shape mismatches with that)."""
    pytest.importorskip('mmdet', reason='the OpenMMLab stack comes from scripts/setup.sh')
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope

    import msmlp.mm  # noqa: F401  (registers MSSwin)
    cfg = Config.fromfile(str(ROOT / 'configs/mmdet/mask-rcnn_msswin-mini_fpn_shapes.py'))
    init_default_scope('mmdet')
    torch.manual_seed(0)
    backbone = MODELS.build(cfg.model.backbone).eval()
    ckpt = tmp_path / 'det.ckpt'
    torch.save({'state_dict': {f'model.backbone.{k}': v for k, v in backbone.state_dict().items()},
                'openmmlab_config': cfg.pretty_text}, ckpt)
    out = tmp_path / 'backbone.pt'
    assert main(['--checkpoint', str(ckpt), '--features-only', '--format', 'torchscript', '--output', str(out)]) == 0
    assert 'msmlp export: msswin_tiny (embed_dim 32, depths 2,2,2,2) backbone (stages 0, 1, 2, 3)' in capsys.readouterr().out
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        for got, expected in zip(torch.jit.load(str(out))(x), backbone(x), strict=True):
            assert torch.allclose(got, expected, atol=1e-5)


MINI_SWIN = dict(embed_dim=16, depths=[1, 2, 1, 1], model_args=dict(num_heads=[1, 1, 2, 2], window_size=4,
                                                                     img_size=32, block_pattern=['ws', 'ms']))


def swin_run_checkpoint(path, **hparams):
    """A ``msmlp fit --task cls`` checkpoint of a small MS-Swin: its weights and the hyperparameters
    that built it."""
    hparams = dict(dict(model='msswin_tiny', num_classes=4, **MINI_SWIN), **hparams)
    trained = timm.create_model('msswin_tiny', num_classes=hparams['num_classes'], embed_dim=hparams['embed_dim'],
                                depths=hparams['depths'], **hparams['model_args']).eval()
    torch.save({'state_dict': {f'model.{k}': v for k, v in trained.state_dict().items()},
                'hyper_parameters': hparams}, path)
    return str(path), trained


def test_an_ms_swin_run_exports_with_its_architecture_and_any_batch_at_its_size(tmp_path, capsys):
    ckpt, trained = swin_run_checkpoint(tmp_path / 'last.ckpt', model_args=dict(
        MINI_SWIN['model_args'], block_pattern=[['ws', 'sw'], ['ws', 'ms'], ['ms'], ['sw']]))
    out = tmp_path / 'swin.onnx'
    assert main(['--checkpoint', ckpt, '--format', 'onnx', '--output', str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == (f'msmlp export: msswin_tiny (embed_dim 16, depths 1,2,1,1, window 4x4, blocks ws,sw | ws,ms '
                          f'| ms | sw) classifier (4 classes) from {ckpt} -> {out} (onnx, dynamic batch at 3x32x32: '
                          "MS-Swin's windows are built for one size)")
    assert 'onnxruntime at 1x3x32x32 and 2x3x32x32 matches the eager model' in printed[-1]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = trained(x)
    assert torch.allclose(run_onnx(out, x)[0], expected, rtol=1e-4, atol=1e-5)  # the shifted windows too


def test_an_ms_swin_backbone_as_a_program_and_torchscript(tmp_path, capsys):
    ckpt, trained = swin_run_checkpoint(tmp_path / 'last.ckpt')
    dense = timm.create_model('msswin_tiny', num_classes=0, out_indices=(1, 2), embed_dim=16, depths=[1, 2, 1, 1],
                              **MINI_SWIN['model_args']).eval()
    assert dense.load_state_dict(trained.state_dict(), strict=False).missing_keys == ['out_norms.1.weight',
                                                                                       'out_norms.1.bias',
                                                                                       'out_norms.2.weight',
                                                                                       'out_norms.2.bias']
    for fmt, suffix in [('exported-program', '.pt2'), ('torchscript', '.pt')]:
        out = tmp_path / f'backbone{suffix}'
        assert main(['--checkpoint', ckpt, '--features-only', '--out-indices', '1', '2', '--format', fmt,
                     '--img-size', '40', '56', '--output', str(out)]) == 0
        assert 'msswin_tiny (embed_dim 16, depths 1,2,1,1, window 4x4) backbone (stages 1, 2)' in capsys.readouterr().out
    x = torch.randn(2, 3, 40, 56)
    model = build_model('msswin_tiny', ckpt, features_only=True, out_indices=(1, 2))
    dense.load_state_dict(model.model.state_dict())  # the output norms export built
    with torch.no_grad():
        expected = dense.forward_dense(x)
        program = torch.export.load(str(tmp_path / 'backbone.pt2')).module()(x)
        scripted = torch.jit.load(str(tmp_path / 'backbone.pt'))(torch.randn(1, 3, 50, 70))
    assert [tuple(o.shape) for o in program] == [(2, 32, 5, 7), (2, 64, 3, 4)]
    assert all(torch.allclose(p, e, rtol=1e-4, atol=1e-5) for p, e in zip(program, expected, strict=True))
    assert [tuple(o.shape) for o in scripted] == [(1, 32, 7, 9), (1, 64, 4, 5)]  # TorchScript: any size


def test_ms_swin_weights_without_a_run_are_the_named_models(tmp_path, capsys):
    """A plain MS-Swin state dict does not say its architecture: it is --model's, loaded strictly."""
    path = tmp_path / 'msswin_small.pth'
    with torch.device('meta'):
        shapes = timm.create_model('msswin_small', num_classes=5).state_dict()
    torch.save({k: torch.zeros(v.shape) for k, v in shapes.items()}, path)
    assert main(['--checkpoint', str(path)]) == 1
    assert capsys.readouterr().err == (f'msmlp export: error: {path} holds MS-Swin or Swin weights '
                                       '(layers.0.blocks.0.attn.relative_position_bias_table): give their '
                                       'architecture, --model msswin_tiny or msswin_small or msswin_base\n')
    assert main(['--checkpoint', str(path), '--model', 'msswin_tiny', '--format', 'safetensors',
                 '--output', str(tmp_path / 'x.safetensors')]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f'msmlp export: error: {path} does not fit the model: ') and err.count('\n') == 1
    assert err.endswith("are built as --model msswin_tiny's registered architecture\n")
    model = build_model('msswin_small', str(path))
    assert model.pretrained_cfg['architecture'] == 'msswin_small' and model.num_classes == 5


def test_num_classes_zero_exports_the_pooled_features_and_negatives_are_refused(tmp_path, capsys):
    trained = timm.create_model('msmlp_tiny', num_classes=7, **SMALL).eval()
    ckpt = lightning_checkpoint(tmp_path / 'last.ckpt', trained)
    model = build_model('msmlp_tiny', ckpt, num_classes=0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), trained.forward_head(trained.forward_features(x), pre_logits=True))
    assert build_model('msmlp_tiny', num_classes=0).num_classes == 0
    assert main(['--num-classes', '-3']) == 1
    assert capsys.readouterr().err.strip() == ('msmlp export: error: --num-classes -3: give 0 (no classifier: '
                                               'the pooled features) or more')
    assert main(['--checkpoint', ckpt, '--num-classes', '5']) == 1
    assert 'holds a head of 7 classes; leave --num-classes out' in capsys.readouterr().err


def test_a_checkpoint_that_does_not_fit_says_why_on_its_one_line(tmp_path, capsys):
    state = timm.create_model('msmlp_tiny', num_classes=3, **SMALL).state_dict()
    del state['layers.2.blocks.1.norm.weight']
    torch.save(state, tmp_path / 'cut.pth')
    assert main(['--checkpoint', str(tmp_path / 'cut.pth')]) == 1
    assert capsys.readouterr().err == (f'msmlp export: error: {tmp_path / "cut.pth"} does not fit the model: 1 missing '
                                       'key (layers.2.blocks.1.norm.weight), 0 unexpected keys, 0 shape mismatches\n')


@pytest.mark.parametrize('output, reason', [
    ('{tmp}', 'it is a folder; name a file'),
    ('/proc/nope/x.safetensors', 'cannot make the folder /proc/nope'),
])
def test_an_output_that_cannot_be_written_is_one_line(tmp_path, capsys, output, reason):
    output = output.format(tmp=tmp_path)
    assert main(['--format', 'safetensors', '--num-classes', '3', '--output', output]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f'msmlp export: error: cannot write {output}: {reason}') and err.count('\n') == 1


def test_bad_input_is_one_line(tmp_path, capsys):
    assert main(['--model', 'msmlp_tiny', '--checkpoint', str(tmp_path / 'none.pth')]) == 1
    assert capsys.readouterr().err.strip().endswith(f'checkpoint not found: {tmp_path / "none.pth"}')
    assert main(['--model', 'resnet50']) == 1
    assert '--model must be one of msmlp_tiny' in capsys.readouterr().err
    assert main(['--img-size', '32', '32', '--output', str(tmp_path / 'm.onnx')]) == 1
    assert 'add --static' in capsys.readouterr().err


@pytest.mark.parametrize('args, message', [
    (['--img-size', '0', '5'], '--img-size 0 5: height and width must be at least 1'),  # wrote the file, then failed
    (['--format', 'onnx', '--opset', '5'], "--opset 5: torch's ONNX exporter writes opset 18 or later"),  # wrote 18
])
def test_sizes_and_opsets_that_cannot_be_written_are_refused_first(tmp_path, capsys, args, message):
    output = tmp_path / 'out'
    with pytest.raises(SystemExit) as stop:
        main([*args, '--output', str(output)])
    assert stop.value.code == 2 and capsys.readouterr().err.strip().endswith(f'msmlp export: error: {message}')
    assert not output.exists()


def test_an_export_never_replaces_its_checkpoint_or_a_config_of_ones_own(tmp_path, capsys):
    ckpt = lightning_checkpoint(tmp_path / 'run.ckpt', timm.create_model('msmlp_tiny', num_classes=3, **SMALL))
    before = Path(ckpt).read_bytes()
    with pytest.raises(SystemExit):  # before: the TorchScript file replaced the training checkpoint
        main(['--checkpoint', ckpt, '--format', 'torchscript', '--output', str(tmp_path / '.' / 'run.ckpt')])
    assert capsys.readouterr().err.strip().endswith(f'--output {tmp_path / "." / "run.ckpt"} is the checkpoint it '
                                                    'exports: name another file')
    assert Path(ckpt).read_bytes() == before
    own = tmp_path / 'my_det.py'  # before: replaced by the run's config
    own.write_text('# my own config\n')
    det = tmp_path / 'det.ckpt'
    torch.save({'state_dict': {'model.w': torch.zeros(1)}, 'openmmlab_config': "default_scope = 'mmdet'\n"}, det)
    with pytest.raises(OutputError, match=f'^cannot write {tmp_path / "my_det.pth"}: its config would replace '
                                          f'{own}, which msmlp export did not write; name another output$'):
        export_openmmlab(str(det), str(tmp_path / 'my_det.pth'))
    assert own.read_text() == '# my own config\n' and not (tmp_path / 'my_det.pth').exists()
    for _ in range(2):  # its own config, from an earlier export, is replaced
        export_openmmlab(str(det), str(tmp_path / 'exported.pth'))
    assert (tmp_path / 'exported.py').read_text() == f"# written by msmlp export from {det}\ndefault_scope = 'mmdet'\n"


def test_a_run_of_another_timm_model_is_named_as_such(tmp_path, capsys):
    # before: 'holds no MS-MLP weights (no patch_embed.proj.weight)'
    ckpt = tmp_path / 'resnet.ckpt'
    torch.save({'state_dict': {'model.conv1.weight': torch.zeros(8, 3, 7, 7)},
                'hyper_parameters': {'model': 'resnet18'}}, ckpt)
    assert main(['--checkpoint', str(ckpt), '--output', str(tmp_path / 'r.onnx')]) == 1
    assert capsys.readouterr().err == (f'msmlp export: error: {ckpt} is a run of resnet18: msmlp export converts '
                                       "MS-MLP and MS-Swin runs (timm's own tools export other models)\n")


def test_the_cli_lists_export():
    out = subprocess.run([sys.executable, str(ROOT / 'cli.py'), 'export', '--help'], capture_output=True, text=True)
    assert out.returncode == 0 and '--format {onnx,torchscript,exported-program,safetensors,openmmlab}' in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize('extra', [[], ['--features-only', '--out-indices', '1', '2', '3']],
                         ids=['classifier', 'backbone'])
def test_msmlp_tiny_to_onnx_from_the_command_line(tmp_path, extra):
    out = tmp_path / 'model.onnx'
    result = subprocess.run([sys.executable, str(ROOT / 'cli.py'), 'export', '--model', 'msmlp_tiny',
                             '--format', 'onnx', '--output', str(out), *extra],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert 'onnxruntime at 1x3x224x224 and 2x3x383x511 matches the eager model' in result.stdout


@pytest.mark.parametrize('scope, config', [('mmdet', 'configs/mmdet/mask-rcnn_msmlp-mini_fpn_shapes.py'),
                                           ('mmseg', 'configs/mmseg/msmlp-mini_upernet_ade20k-scenes-128x128.py')])
def test_a_det_or_seg_run_exports_for_the_openmmlab_tools(tmp_path, capsys, scope, config):
    """A Lightning det/seg checkpoint (weights under ``model.``, the OpenMMLab config and the
    classes beside them) as mmengine's runner saves one, which the tools and APIs read: mmdet's
    init_detector gave a detector of random weights and COCO's 80 classes from the Lightning file."""
    pytest.importorskip(scope, reason='the OpenMMLab stack comes from scripts/setup.sh')
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.runner import load_checkpoint
    cfg = Config.fromfile(str(ROOT / config))
    init_default_scope(scope)
    torch.manual_seed(0)
    trained = MODELS.build(cfg.model)
    ckpt = tmp_path / 'last.ckpt'
    classes = ['a', 'b', 'c'] if scope == 'mmdet' else [f'class {i}' for i in range(cfg.model.decode_head.num_classes)]
    torch.save({'state_dict': {f'model.{k}': v for k, v in trained.state_dict().items()}, 'epoch': 4,
                'openmmlab_config': cfg.pretty_text, 'classes': classes}, ckpt)
    out = tmp_path / 'export' / 'run.pth'
    assert main(['--checkpoint', str(ckpt), '--format', 'openmmlab', '--output', str(out)]) == 0
    printed = capsys.readouterr().out
    assert f'checked: {scope} builds the model from {tmp_path / "export" / "run.py"} and loads every weight' in printed
    torch.manual_seed(1)
    model = MODELS.build(Config.fromfile(str(tmp_path / 'export' / 'run.py')).model)
    meta = load_checkpoint(model, str(out), map_location='cpu', strict=True)['meta']  # as the tools load it
    assert meta['dataset_meta']['classes'] == tuple(classes) and meta['epoch'] == 4
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in model.state_dict().items())
    if scope == 'mmseg':  # its inferencer draws with a colour per class (before: 'The length of classes should be equal to palette')
        from mmseg.apis import MMSegInferencer
        image = tmp_path / 'image.png'
        Image.fromarray(np.full((40, 56, 3), 90, np.uint8)).save(image)
        MMSegInferencer(model=str(tmp_path / 'export' / 'run.py'), weights=str(out), device='cpu')(
            str(image), out_dir=str(tmp_path / 'drawn'))
        assert len(meta['dataset_meta']['palette']) == len(classes)
        assert [p.name for p in (tmp_path / 'drawn' / 'vis').iterdir()] == ['image.png']


def test_openmmlab_export_of_a_classifier_is_one_line(tmp_path, capsys):
    ckpt = lightning_checkpoint(tmp_path / 'cls.ckpt', timm.create_model('msmlp_tiny', num_classes=3, **SMALL))
    assert main(['--checkpoint', ckpt, '--format', 'openmmlab']) == 1
    assert capsys.readouterr().err.strip() == (
        f'msmlp export: error: {ckpt} is not a checkpoint of msmlp fit --task det or seg (it holds no OpenMMLab '
        'config); --format openmmlab converts those')
