"""Safe loading of released checkpoints: no pickled code runs, clear errors on bad files."""
import pickle
import sys
from pathlib import Path

import pytest
import torch

from msmlp import CheckpointError, MSMLP, load_pretrained, read_checkpoint
from msmlp.checkpoint import infer_arch

FIXTURES = Path(__file__).parent / 'fixtures'
RELEASED = FIXTURES / 'released_layout_square_64.pth'
SQUARE = torch.load(FIXTURES / 'msmlp_reference.pt', weights_only=True)['square_64']
SQUARE_ARCH = dict(embed_dim=24, depths=(1, 1, 2, 1))


class CreatesFileWhenUnpickled:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), 'w')


def test_released_layout_loads_exactly_without_yacs(monkeypatch):
    monkeypatch.setitem(sys.modules, 'yacs', None)  # any `import yacs` now fails
    monkeypatch.setitem(sys.modules, 'yacs.config', None)
    model = MSMLP(num_classes=10, **SQUARE_ARCH)
    report = load_pretrained(model, RELEASED)
    assert report == {'dropped': [], 'kept_init': [], 'adapted': []}
    with torch.no_grad():
        assert (model.eval()(SQUARE['input']) - SQUARE['logits']).abs().max() <= 1e-5


def test_released_config_is_read_as_plain_data():
    checkpoint = read_checkpoint(RELEASED)
    assert set(checkpoint) == {'model', 'optimizer', 'lr_scheduler', 'max_accuracy', 'epoch', 'config'}
    assert checkpoint['config']['MODEL']['MSMLP']['DEPTHS'] == [1, 1, 2, 1]
    assert type(checkpoint['config']).__module__ == 'collections'


def test_plain_torch_load_refuses_the_released_layout():
    with pytest.raises(pickle.UnpicklingError, match='yacs'):
        torch.load(RELEASED, weights_only=True)


def test_pickle_that_would_run_code_is_refused(tmp_path):
    target = tmp_path / 'pwned.txt'
    evil = tmp_path / 'evil.pth'
    torch.save({'model': SQUARE['state_dict'], 'payload': CreatesFileWhenUnpickled(target)}, evil)
    assert not target.exists()
    refused = 'refused to load .*evil.pth: its pickle asks for io.open, .*could run code'
    with pytest.raises(CheckpointError, match=refused) as err:
        load_pretrained(MSMLP(num_classes=10, **SQUARE_ARCH), evil)
    assert not target.exists()
    assert 'weights_only' not in str(err.value) and '\n' not in str(err.value)


def test_an_mmengine_training_checkpoint_loads_its_weights_and_nothing_else_runs(tmp_path):
    """mmengine's message hub (HistoryBuffer objects, numpy arrays) is read as inert stand-ins;
    a pickle that mixes such objects with a call is still refused at the call."""
    import numpy as np
    from mmengine.logging import HistoryBuffer
    hub = {'log_scalars': {'loss': HistoryBuffer([np.float64(1.5)], [np.int64(2)])}, 'array': np.zeros(3)}
    state = {f'backbone.{k}': v for k, v in SQUARE['state_dict'].items() if not k.startswith('head.')}
    trained = tmp_path / 'epoch_1.pth'
    torch.save({'meta': {'epoch': 1}, 'state_dict': state, 'message_hub': hub}, trained)
    model = MSMLP(num_classes=0, **SQUARE_ARCH)
    load_pretrained(model, trained)
    assert torch.equal(model.patch_embed.proj.weight, SQUARE['state_dict']['patch_embed.proj.weight'])

    target = tmp_path / 'pwned.txt'
    mixed = tmp_path / 'mixed.pth'
    torch.save({'message_hub': hub, 'payload': CreatesFileWhenUnpickled(target)}, mixed)
    with pytest.raises(CheckpointError, match='refused to load .*mixed.pth: its pickle asks for io.open'):
        read_checkpoint(mixed)
    assert not target.exists()


def test_other_num_classes_drops_the_head_with_a_warning():
    model = MSMLP(num_classes=3, **SQUARE_ARCH)
    head_before = model.head.weight.clone()
    with pytest.warns(UserWarning, match='classifier head') as warned:
        report = load_pretrained(model, RELEASED)
    assert [str(w.message).split(': ', 1)[-1] for w in warned] == [
        "classifier head ['head.weight', 'head.bias'] not loaded: the model has a different num_classes"]
    assert report['dropped'] == ['head.weight', 'head.bias']
    assert torch.equal(model.head.weight, head_before)
    assert torch.equal(model.patch_embed.proj.weight, SQUARE['state_dict']['patch_embed.proj.weight'])


def test_dense_backbone_keeps_its_new_output_norms():
    model = MSMLP(num_classes=0, out_indices=(0, 1, 2, 3), **SQUARE_ARCH)
    with pytest.warns(UserWarning, match='classifier head'):
        report = load_pretrained(model, RELEASED)
    assert sorted(report['kept_init']) == sorted(k for k in model.state_dict() if k.startswith('out_norms.'))
    assert torch.equal(model.layers[2].blocks[1].gamma, SQUARE['state_dict']['layers.2.blocks.1.gamma'])


def test_architecture_mismatch_is_one_line_that_counts_and_names_the_keys():
    deeper = MSMLP(num_classes=10, embed_dim=24, depths=(1, 1, 3, 1))
    with pytest.raises(CheckpointError) as err:
        load_pretrained(deeper, RELEASED)
    assert str(err.value) == (
        f'{RELEASED} does not fit the model: 27 missing keys (layers.2.blocks.2.gamma, '
        'layers.2.blocks.2.dwconv_lr.0.weight, layers.2.blocks.2.dwconv_lr.0.bias and 24 more), '
        '0 unexpected keys, 0 shape mismatches')
    wider = MSMLP(num_classes=10, embed_dim=32, depths=(1, 1, 2, 1))
    with pytest.raises(CheckpointError) as err:
        load_pretrained(wider, RELEASED)
    message = str(err.value)
    assert '\n' not in message and '0 missing keys, 0 unexpected keys, ' in message
    assert (' shape mismatches (patch_embed.proj.weight: [24, 3, 4, 4] in the file, [32, 3, 4, 4] in the model; '
            in message)


def test_ms_swin_weights_and_ms_mlp_weights_are_told_apart_without_head_warnings(tmp_path, recwarn):
    import msmlp
    swin = msmlp.MSSwin(num_classes=5, embed_dim=40, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4)
    torch.save(swin.state_dict(), tmp_path / 'swin.pth')
    with pytest.raises(CheckpointError, match=r"swin.pth holds MS-Swin or Swin weights \(layers\.0\.blocks\.0\.attn\."
                                               r".*\), not an MS-MLP's: load it into an msswin_\* model$"):
        load_pretrained(MSMLP(num_classes=3, **SQUARE_ARCH), tmp_path / 'swin.pth')
    with pytest.raises(CheckpointError,
                       match=r"holds MS-MLP weights, not an MS-Swin's: load it into an msmlp_\* model$"):
        load_pretrained(swin, RELEASED)
    assert not [str(w.message) for w in recwarn.list if 'classifier head' in str(w.message)]


def test_a_file_with_more_output_norms_or_without_head_loads_what_the_model_has(tmp_path):
    """A detector's backbone (norms at stages 0-3, no head) into a classifier returning stage 1."""
    dense = MSMLP(num_classes=0, out_indices=(0, 1, 2, 3), **SQUARE_ARCH)
    torch.save({'state_dict': {f'model.backbone.{k}': v for k, v in dense.state_dict().items()}}, tmp_path / 'det.ckpt')
    model = MSMLP(num_classes=10, out_indices=(1,), **SQUARE_ARCH)
    with pytest.warns(UserWarning) as warned:
        report = load_pretrained(model, tmp_path / 'det.ckpt')
    assert sorted(report['dropped']) == [f'out_norms.{i}.{p}' for i in (0, 2, 3) for p in ('bias', 'weight')]
    assert sorted(report['kept_init']) == ['head.bias', 'head.weight']
    messages = ' '.join(str(w.message) for w in warned)
    assert 'holds no classifier head' in messages and 'output norms' in messages
    assert torch.equal(model.out_norms['1'].weight, dense.out_norms['1'].weight)
    assert torch.equal(model.layers[3].blocks[0].gamma, dense.layers[3].blocks[0].gamma)


@pytest.mark.parametrize('in_chans', [1, 2])
def test_a_stem_of_other_input_channels_is_adapted_as_timm_does(in_chans):
    from timm.models import adapt_input_conv
    model = MSMLP(num_classes=10, in_chans=in_chans, **SQUARE_ARCH)
    report = load_pretrained(model, RELEASED)
    stem = SQUARE['state_dict']['patch_embed.proj.weight']
    assert report['adapted'] == ['patch_embed.proj.weight']
    assert torch.equal(model.patch_embed.proj.weight, adapt_input_conv(in_chans, stem))
    if in_chans == 1:
        assert torch.allclose(model.patch_embed.proj.weight, stem.sum(1, keepdim=True))


def test_infer_arch_reads_the_architecture_from_the_weights():
    mix_sizes = ((1, 3, 3, 3, 3), (1, 1, 3, 5, 7), (1, 5, 5, 5, 7), (1, 7, 7, 7, 7))
    state = MSMLP(num_classes=3, in_chans=1, embed_dim=40, depths=(1, 2, 3, 1), mix_sizes=mix_sizes).state_dict()
    assert infer_arch(state) == dict(in_chans=1, embed_dim=40, depths=(1, 2, 3, 1), mix_sizes=mix_sizes)
    assert infer_arch(SQUARE['state_dict'])['depths'] == (1, 1, 2, 1)
    with pytest.raises(CheckpointError, match='^x.pth holds no MS-MLP weights'):
        infer_arch({'conv1.weight': torch.zeros(1)}, 'x.pth')


def test_lightning_and_mmengine_layouts(tmp_path):
    for prefix in ('model.', 'backbone.', 'model.backbone.'):
        path = tmp_path / f'{prefix}ckpt'
        state = {prefix + k: v for k, v in SQUARE['state_dict'].items()}
        if 'backbone' in prefix:
            state['neck.conv.weight'] = torch.zeros(1)  # detector parts are ignored
        torch.save({'state_dict': state, 'epoch': 3}, path)
        model = MSMLP(num_classes=10, **SQUARE_ARCH)
        load_pretrained(model, path)
        assert torch.equal(model.norm.weight, SQUARE['state_dict']['norm.weight']), prefix


@pytest.mark.parametrize('content', [
    b'',
    b'hello, not a checkpoint',
    b'\xff\xd8\xff\xe0\x00\x10JFIF\x00' + bytes(200),  # a JPEG
    b'_base_: default.yaml\nmodel:\n  lr: 0.1\n',  # YAML
    pickle.dumps([1, 2], protocol=4),  # a pickle, not a PyTorch file
], ids=['empty', 'text', 'jpeg', 'yaml', 'plain-pickle'])
def test_non_checkpoint_files_give_a_clear_error(tmp_path, content):
    path = tmp_path / 'bad.pth'
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f'^cannot read {path}: not a PyTorch checkpoint, or truncated'):
        load_pretrained(MSMLP(num_classes=10, **SQUARE_ARCH), path)


def test_truncated_checkpoint_gives_a_clear_error(tmp_path):
    path = tmp_path / 'truncated.pth'
    path.write_bytes(RELEASED.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match='cannot read .*truncated.pth'):
        read_checkpoint(path)


def test_missing_file_and_tensorless_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match='not found: .*nope.pth'):
        read_checkpoint(tmp_path / 'nope.pth')
    with pytest.raises(CheckpointError, match=f'^checkpoint {tmp_path} is a folder: name the checkpoint file in it$'):
        read_checkpoint(tmp_path)  # was 'checkpoint not found'
    scripted = tmp_path / 'model.pt'
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), scripted)
    with pytest.raises(CheckpointError, match=r'model\.pt is a TorchScript model \(msmlp export writes them\), not a '
                                              r'checkpoint of weights: torch.jit.load runs it$'):
        read_checkpoint(scripted)  # was torch's advice to load it with weights_only=False
    path = tmp_path / 'list.pth'
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match='holds a list'):
        load_pretrained(MSMLP(num_classes=10, **SQUARE_ARCH), path)
    torch.save({'epoch': 1}, path)
    with pytest.raises(CheckpointError, match='no tensors'):
        load_pretrained(MSMLP(num_classes=10, **SQUARE_ARCH), path)

