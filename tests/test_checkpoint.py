"""Safe loading of released checkpoints: no pickled code runs, clear errors on bad files."""
import sys
from pathlib import Path

import pytest
import torch

from msmlp import CheckpointError, MSMLP, load_pretrained, read_checkpoint

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
    assert report == {'dropped': [], 'kept_init': []}
    with torch.no_grad():
        assert (model.eval()(SQUARE['input']) - SQUARE['logits']).abs().max() <= 1e-5


def test_released_config_is_read_as_plain_data():
    checkpoint = read_checkpoint(RELEASED)
    assert set(checkpoint) == {'model', 'optimizer', 'lr_scheduler', 'max_accuracy', 'epoch', 'config'}
    assert checkpoint['config']['MODEL']['MSMLP']['DEPTHS'] == [1, 1, 2, 1]
    assert type(checkpoint['config']).__module__ == 'collections'


def test_plain_torch_load_refuses_the_released_layout():
    with pytest.raises(Exception, match='yacs'):
        torch.load(RELEASED, weights_only=True)


def test_pickle_that_would_run_code_is_refused(tmp_path):
    target = tmp_path / 'pwned.txt'
    evil = tmp_path / 'evil.pth'
    torch.save({'model': SQUARE['state_dict'], 'payload': CreatesFileWhenUnpickled(target)}, evil)
    assert not target.exists()
    with pytest.raises(CheckpointError, match='refused to load .*evil.pth.*could run code'):
        load_pretrained(MSMLP(num_classes=10, **SQUARE_ARCH), evil)
    assert not target.exists()


def test_other_num_classes_drops_the_head_with_a_warning():
    model = MSMLP(num_classes=3, **SQUARE_ARCH)
    head_before = model.head.weight.clone()
    with pytest.warns(UserWarning, match='classifier head'):
        report = load_pretrained(model, RELEASED)
    assert report['dropped'] == ['head.weight', 'head.bias']
    assert torch.equal(model.head.weight, head_before)
    assert torch.equal(model.patch_embed.proj.weight, SQUARE['state_dict']['patch_embed.proj.weight'])


def test_dense_backbone_keeps_its_new_output_norms():
    model = MSMLP(num_classes=0, out_indices=(0, 1, 2, 3), **SQUARE_ARCH)
    with pytest.warns(UserWarning, match='classifier head'):
        report = load_pretrained(model, RELEASED)
    assert sorted(report['kept_init']) == sorted(k for k in model.state_dict() if k.startswith('out_norms.'))
    assert torch.equal(model.layers[2].blocks[1].gamma, SQUARE['state_dict']['layers.2.blocks.1.gamma'])


def test_architecture_mismatch_lists_the_keys():
    model = MSMLP(num_classes=10, embed_dim=24, depths=(1, 1, 3, 1))
    with pytest.raises(CheckpointError) as err:
        load_pretrained(model, RELEASED)
    message = str(err.value)
    assert 'missing in the file' in message and 'layers.2.blocks.2.gamma' in message
    wider = MSMLP(num_classes=10, embed_dim=32, depths=(1, 1, 2, 1))
    with pytest.raises(CheckpointError, match='shape mismatch.*patch_embed.proj.weight'):
        load_pretrained(wider, RELEASED)


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


@pytest.mark.parametrize('content, match', [
    (b'', 'cannot read'),
    (b'hello, not a checkpoint', 'cannot read'),
])
def test_non_checkpoint_files_give_a_clear_error(tmp_path, content, match):
    path = tmp_path / 'bad.pth'
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f'{match} .*bad.pth'):
        load_pretrained(MSMLP(num_classes=10, **SQUARE_ARCH), path)


def test_truncated_checkpoint_gives_a_clear_error(tmp_path):
    path = tmp_path / 'truncated.pth'
    path.write_bytes(RELEASED.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match='cannot read .*truncated.pth'):
        read_checkpoint(path)


def test_missing_file_and_tensorless_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match='not found: .*nope.pth'):
        read_checkpoint(tmp_path / 'nope.pth')
    path = tmp_path / 'list.pth'
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match='holds a list'):
        load_pretrained(MSMLP(num_classes=10, **SQUARE_ARCH), path)
    torch.save({'epoch': 1}, path)
    with pytest.raises(CheckpointError, match='no tensors'):
        load_pretrained(MSMLP(num_classes=10, **SQUARE_ARCH), path)

