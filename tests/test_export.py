"""``msmlp export``: ONNX (run with onnxruntime), TorchScript, torch.export programs and safetensors,
for the classifier and the dense backbone, checked against the eager model."""
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import msmlp
from msmlp.export import DenseOutputs, build_model, check_export, export, main

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
    with pytest.raises(Exception):
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
    assert main(['--model', 'msmlp_tiny', '--format', 'safetensors', '--output', str(out)]) == 0
    assert 'holds the model\'s weights exactly' in capsys.readouterr().out
    exported = build_model('msmlp_tiny')  # same architecture, other random weights
    loaded = timm.create_model('msmlp_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(out)))
    from safetensors.torch import load_file
    saved = load_file(out)
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())
    assert not all(torch.equal(v, saved[k]) for k, v in exported.state_dict().items())


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


def test_bad_input_is_one_line(tmp_path, capsys):
    assert main(['--model', 'msmlp_tiny', '--checkpoint', str(tmp_path / 'none.pth')]) == 1
    assert capsys.readouterr().err.strip().endswith(f'checkpoint not found: {tmp_path / "none.pth"}')
    assert main(['--model', 'resnet50']) == 1
    assert '--model must be one of msmlp_tiny' in capsys.readouterr().err
    assert main(['--img-size', '32', '32', '--output', str(tmp_path / 'm.onnx')]) == 1
    assert 'add --static' in capsys.readouterr().err


def test_the_cli_lists_export():
    out = subprocess.run([sys.executable, str(ROOT / 'cli.py'), 'export', '--help'], capture_output=True, text=True)
    assert out.returncode == 0 and '--format {onnx,torchscript,exported-program,safetensors}' in out.stdout


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
