"""The backbone: exact to the released model, any input size, the dense-task interface, timm."""
import ast
import os
from pathlib import Path

import pytest
import timm
import torch

import msmlp
from msmlp import MSMLP

FIXTURES = Path(__file__).parent / 'fixtures'
REFERENCE = torch.load(FIXTURES / 'msmlp_reference.pt', weights_only=True)
TINY = dict(embed_dim=24, depths=(1, 1, 2, 1))


def reference_model(case: dict, mix_impl: str) -> MSMLP:
    cfg = case['config']
    model = MSMLP(num_classes=cfg['num_classes'], embed_dim=cfg['embed_dim'], depths=cfg['depths'],
                  mix_sizes=cfg['mix_size'], shift_dist=cfg['shift_dist'], mix_impl=mix_impl)
    model.load_state_dict(case['state_dict'], strict=True)
    return model.eval()


@pytest.mark.parametrize('name, params', [('msmlp_tiny', 28.66), ('msmlp_small', 50.30), ('msmlp_base', 88.70)])
def test_variant_parameter_counts(name, params):
    with torch.device('meta'):
        model = timm.create_model(name)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == params


@pytest.mark.parametrize('mix_impl', ['reference', 'fast'])
@pytest.mark.parametrize('case', sorted(REFERENCE))
def test_reproduces_released_outputs(case, mix_impl):
    data = REFERENCE[case]
    model = reference_model(data, mix_impl)
    with torch.no_grad():
        logits = model(data['input'])
        stages = model.forward_intermediates(data['input'], intermediates_only=True)
    assert (logits - data['logits']).abs().max() <= 1e-5
    for ours, released in zip(stages, data['stage_outputs'], strict=True):
        assert ours.shape == released.shape
        # Deeper stages reach magnitudes near 40, where fp32 rounding alone moves values by
        # ~2e-5 (the model run in fp64 differs from the released fp32 outputs that much), so the
        # bound scales with the tensor's magnitude; below magnitude 1 it is 1e-5 absolute.
        scale = max(1.0, released.abs().max().item())
        assert (ours - released).abs().max() <= 1e-5 * scale


def test_early_stages_match_the_released_outputs_to_rounding():
    """Stages 0-1 through the reference path, to 2e-6 of their magnitude (1e-5 above). On the
    Intel Xeons (AVX-512) the released code reproduces them bit for bit, and so does the
    reference path; on an AMD EPYC (oneDNN's AVX2 kernels, another order of sums) both stages
    differ from the fixture by fp32 rounding: 4.8e-6 and 9.1e-6 at magnitudes 11 and 11."""
    data = REFERENCE['wide_64x96']
    model = reference_model(data, 'reference')
    with torch.no_grad():
        stages = model.forward_intermediates(data['input'], intermediates_only=True)
    for ours, released in zip(stages[:2], data['stage_outputs'][:2]):
        assert (ours - released).abs().max() <= 2e-6 * released.abs().max()


@pytest.mark.parametrize('size, stage_sizes', [
    ((32, 32), [(8, 8), (4, 4), (2, 2), (1, 1)]),
    ((33, 47), [(9, 12), (5, 6), (3, 3), (2, 2)]),
    ((511, 383), [(128, 96), (64, 48), (32, 24), (16, 12)]),
    ((800, 1333), [(200, 334), (100, 167), (50, 84), (25, 42)]),
])
def test_any_input_size_gives_exact_stage_shapes(size, stage_sizes):
    model = MSMLP(num_classes=5, out_indices=(0, 1, 2, 3), **TINY).eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        features = model.forward_dense(x)
        logits = model(x)
    assert [tuple(f.shape) for f in features] == [(1, c, h, w) for c, (h, w) in zip(model.dims, stage_sizes)]
    assert logits.shape == (1, 5)


@pytest.mark.parametrize('size', [(61, 93), (33, 47)])
def test_any_size_equals_the_image_zero_padded_to_a_multiple_of_4(size):
    """The stem's padding is the image's: every stage and the logits are those of the image
    zero-padded to a multiple of 4 (33x47: the downsamplings then pad the 9x12 map further)."""
    data = REFERENCE['wide_64x96']
    model = reference_model(data, 'fast')
    image = data['input'][:, :, :size[0], :size[1]]
    padded = torch.nn.functional.pad(image, (0, -size[1] % 4, 0, -size[0] % 4))
    with torch.no_grad():
        assert torch.equal(model(image), model(padded))
        for ours, expected in zip(model.forward_intermediates(image, intermediates_only=True),
                                  model.forward_intermediates(padded, intermediates_only=True), strict=True):
            assert torch.equal(ours, expected)


def test_padding_a_feature_map_is_not_padding_the_image():
    """docs/backbone.md: at 33x47 the downsamplings pad feature maps with zeros, which is not
    the model on the image zero-padded to 64x64 (whose maps need no padding)."""
    data = REFERENCE['wide_64x96']
    model = reference_model(data, 'fast')
    image = data['input'][:, :, :33, :47]
    padded = torch.nn.functional.pad(image, (0, 64 - 47, 0, 64 - 33))
    with torch.no_grad():
        ours = model.forward_intermediates(image, intermediates_only=True)
        bigger = model.forward_intermediates(padded, intermediates_only=True)
    for o, b in zip(ours, bigger):
        assert (o - b[:, :, :o.shape[2], :o.shape[3]]).abs().max() > 0.1


def test_dense_outputs_have_their_own_norms():
    model = MSMLP(num_classes=0, out_indices=(1, 3), **TINY).eval()
    assert sorted(model.out_norms) == ['1', '3']
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        raw = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
        dense = model.forward_dense(x)
        normed = [model.out_norms[str(i)](r) for i, r in zip((1, 3), raw)]
    for d, n in zip(dense, normed, strict=True):
        assert torch.allclose(d, n)
    assert dense[0].shape[1] == 48 and dense[1].shape[1] == 192


def test_scripted_model_keeps_forward_dense():
    """A TorchScript backbone for deployment offers the dense outputs, not only the classifier forward."""
    model = MSMLP(num_classes=0, out_indices=(1, 3), **TINY).eval()
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        for scripted, eager in zip(torch.jit.script(model).forward_dense(x), model.forward_dense(x), strict=True):
            assert torch.allclose(scripted, eager, atol=1e-5)
    classifier = torch.jit.script(MSMLP(num_classes=3, **TINY))  # no out_indices: still scripts, and says why not
    with pytest.raises(torch.jit.Error, match='forward_dense needs out_indices'):
        classifier.forward_dense(x)


def test_depths_of_another_stage_count_name_the_option_given():
    # before: 'mix_sizes has 4 entries for 3 stages', an option the user never set
    with pytest.raises(ValueError, match=r'^depths \(1, 1, 2\) names 3 stages, but the released mix_sizes have 4 '
                                         r'entries: give as many depths as mix_sizes'):
        MSMLP(embed_dim=24, depths=(1, 1, 2))
    with pytest.raises(ValueError, match=r'^depths \(1, 1\) names 2 stages, but mix_sizes has 3 entries'):
        MSMLP(embed_dim=24, depths=(1, 1), mix_sizes=((1, 3), (1, 3), (1, 3)))


def test_out_indices_are_validated():
    with pytest.raises(ValueError, match=r'^out_indices \[0, 4\] must name stages in 0..3 \(or -4..-1\)$'):
        MSMLP(out_indices=(0, 4), **TINY)
    with pytest.raises(ValueError, match='^out_indices is empty'):
        MSMLP(out_indices=(), **TINY)
    assert MSMLP(out_indices=(-1,), **TINY).out_indices == (3,)


@pytest.mark.parametrize('frozen', [0, 2])
def test_frozen_stages_stay_frozen_across_train(frozen):
    model = MSMLP(num_classes=0, out_indices=(0, 1, 2, 3), frozen_stages=frozen, **TINY)
    model.train()
    frozen_modules = [model.patch_embed] + [model.layers[i] for i in range(frozen)] + [
        model.out_norms[str(i)] for i in range(frozen)]
    for module in frozen_modules:
        assert not module.training
        assert all(not p.requires_grad for p in module.parameters())
    trainable = [model.layers[i] for i in range(frozen, 4)]
    for module in trainable:
        assert module.training
        assert all(p.requires_grad for p in module.parameters())
    loss = sum(f.sum() for f in model.forward_dense(torch.randn(1, 3, 64, 64)))
    loss.backward()
    assert model.patch_embed.proj.weight.grad is None
    assert model.layers[3].blocks[0].pwconv1.weight.grad is not None


def test_gradient_checkpointing_matches_plain_backward(monkeypatch):
    torch.manual_seed(0)
    plain = MSMLP(num_classes=3, **TINY)
    checkpointed = MSMLP(num_classes=3, with_cp=True, **TINY)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    plain(x).sum().backward()
    checkpointed_blocks = []

    def counted_checkpoint(block, *args, **kwargs):
        checkpointed_blocks.append(block)
        return torch.utils.checkpoint.checkpoint(block, *args, **kwargs)
    monkeypatch.setattr(msmlp.model, 'checkpoint', counted_checkpoint)
    checkpointed(x).sum().backward()
    assert len(checkpointed_blocks) == sum(TINY['depths'])
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_feature_info_and_heads():
    model = MSMLP(num_classes=7, **TINY).eval()
    assert [f['num_chs'] for f in model.feature_info] == [24, 48, 96, 192]
    assert [f['reduction'] for f in model.feature_info] == [4, 8, 16, 32]
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 192, 2, 3)
        pooled = model.forward_head(features, pre_logits=True)
        assert pooled.shape == (2, 192)
        assert torch.allclose(model.forward_head(features), model(x))
    model.reset_classifier(4)
    assert model(x).shape == (2, 4) and model.get_classifier().out_features == 4
    model.reset_classifier(0, global_pool='')
    assert model(x).shape == (2, 192, 2, 3)


def test_unpooled_classifier_classifies_every_position_as_timm_convnext():
    """``global_pool=''`` with a classifier: timm's ConvNeXt applies its head norm and classifier
    at every position; so does MSMLP (it crashed on its first forward before)."""
    model = timm.create_model('msmlp_tiny', global_pool='', num_classes=5, **TINY).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model(x)
        at_00 = model.head(model.norm(features[:, :, 0, 0]))
        normed = model.forward_head(features, pre_logits=True)
    assert logits.shape == (2, 5, 2, 3) and normed.shape == features.shape
    assert torch.allclose(logits[:, :, 0, 0], at_00, atol=1e-6)
    model.reset_classifier(7, 'avg')
    assert model(x).shape == (2, 7)
    model.reset_classifier(3, '')
    assert model(x).shape == (2, 3, 2, 3)


def test_negative_num_classes_is_refused():
    with pytest.raises(ValueError, match='num_classes must be 0 .* got -3'):
        MSMLP(num_classes=-3, **TINY)
    with pytest.raises(ValueError, match='num_classes must be 0 .* got -1'):
        MSMLP(num_classes=3, **TINY).reset_classifier(-1)


def test_timm_create_model_with_classes_and_drop_path():
    model = timm.create_model('msmlp_tiny', num_classes=10, drop_path_rate=0.3)
    assert model.head.out_features == 10
    rates = [b.drop_path.drop_prob for s in model.layers for b in s.blocks if hasattr(b.drop_path, 'drop_prob')]
    assert rates[-1] == pytest.approx(0.3) and len(rates) == sum(model.depths) - 1
    assert model.pretrained_cfg['interpolation'] == 'bicubic'


@pytest.mark.parametrize('name, size', [('msmlp_tiny', TINY), ('msswin_tiny', dict(img_size=64, window_size=4))])
def test_timm_train_script_builds_and_optimizes_the_model(name, size):
    """timm's train.py passes these keywords on every run (drop_rate=0.0 from --drop's default;
    create_model drops the None ones), then builds AdamW with layer-wise decay from group_matcher."""
    import timm.optim
    model = timm.create_model(name, pretrained=False, in_chans=3, num_classes=5, drop_rate=0.3, drop_path_rate=None,
                              drop_block_rate=None, global_pool=None, bn_momentum=None, bn_eps=None,
                              scriptable=False, checkpoint_path='', **size)
    optimizer = timm.optim.create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    assert len({group['lr_scale'] for group in optimizer.param_groups}) > 4
    x = torch.randn(2, 3, 64, 64)
    model.train()
    assert not torch.equal(model(x), model(x))  # the classifier's dropout
    model.eval()
    assert torch.equal(model(x), model(x))


def test_layer_decay_groups_follow_the_order_of_computation():
    """A stage's downsampling runs after its blocks and feeds the next stage (as in the released
    model; ConvNeXt and Swin open a stage with theirs): its layer-decay group lies between them
    (before: with the stage's first block)."""
    from timm.models import group_parameters
    model = timm.create_model('msmlp_tiny')
    order = {name.rsplit('.', 1)[0]: i for i, names in enumerate(group_parameters(model, model.group_matcher()).values())
             for name in names}
    assert order['layers.0.blocks.2'] < order['layers.0.downsample.proj'] < order['layers.1.blocks.0']
    assert order['layers.2.blocks.8'] < order['layers.2.downsample.proj'] < order['layers.3.blocks.0'] < order['norm']


def test_timm_features_only():
    model = timm.create_model('msmlp_tiny', features_only=True, out_indices=(1, 3)).eval()
    assert model.feature_info.channels() == [192, 768]
    assert model.feature_info.reduction() == [8, 32]
    with torch.no_grad():
        features = model(torch.randn(1, 3, 96, 128))
    assert [tuple(f.shape) for f in features] == [(1, 192, 12, 16), (1, 768, 3, 4)]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """torch hub's (and timm's) download cache in a temporary folder."""
    monkeypatch.setattr(torch.hub, '_hub_dir', str(tmp_path / 'hub'))
    return tmp_path / 'hub' / 'checkpoints'


def released_at_a_url(tmp_path, data: bytes = None) -> str:
    source = tmp_path / 'server' / 'msmlp_tiny_patch4_ckpt_epoch299.pth'
    source.parent.mkdir(exist_ok=True)
    source.write_bytes((FIXTURES / 'released_layout_square_64.pth').read_bytes() if data is None else data)
    return source.as_uri()


def small_pretrained(**overlay):
    return timm.create_model('msmlp_tiny', pretrained=True, num_classes=10, embed_dim=24, depths=(1, 1, 2, 1),
                             pretrained_cfg_overlay=overlay)


def test_pretrained_cfgs_hold_the_released_urls():
    for name in ('msmlp_tiny', 'msmlp_small', 'msmlp_base'):
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.url == ('https://tsciencescu.blob.core.windows.net/projectshzheng/MSMLP/released_model/'
                           f'{name}_patch4/{name}_patch4_ckpt_epoch299.pth') and cfg.custom_load


def test_pretrained_downloads_once_into_the_hub_cache_and_loads_safely(tmp_path, hub):
    url = released_at_a_url(tmp_path)
    data = REFERENCE['square_64']
    model = small_pretrained(url=url).eval()
    [cached] = hub.glob('msmlp_tiny_patch4_ckpt_epoch299-*.pth')
    Path(url[len('file://'):]).unlink()  # a second call does not download again
    again = small_pretrained(url=url).eval()
    with torch.no_grad():
        for m in (model, again):
            assert (m(data['input']) - data['logits']).abs().max() <= 1e-5


def test_features_only_pretrained_by_url(tmp_path, hub):
    model = timm.create_model('msmlp_tiny', pretrained=True, features_only=True, embed_dim=24, depths=(1, 1, 2, 1),
                              pretrained_cfg_overlay=dict(url=released_at_a_url(tmp_path)))
    data = REFERENCE['square_64']
    with torch.no_grad():
        for ours, released in zip(model.eval()(data['input']), data['stage_outputs'], strict=True):
            assert (ours - released).abs().max() <= 1e-5 * max(1.0, released.abs().max().item())


def test_a_truncated_file_is_refused_and_not_kept(tmp_path, hub):
    whole = (FIXTURES / 'released_layout_square_64.pth').read_bytes()
    url = released_at_a_url(tmp_path, whole[:len(whole) // 2])
    with pytest.raises(msmlp.CheckpointError, match='damaged .*truncated.*downloads it again'):
        small_pretrained(url=url)
    assert not list(hub.iterdir())
    released_at_a_url(tmp_path)  # the server has the whole file again: the next call fetches it
    small_pretrained(url=url)


def test_a_download_cut_short_of_its_content_length_is_not_kept(hub):
    """A server that announces the whole file and closes the connection half-way."""
    import http.server
    import threading
    whole = (FIXTURES / 'released_layout_square_64.pth').read_bytes()

    class CutShort(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header('Content-Length', str(len(whole)))
            self.end_headers()
            self.wfile.write(whole[:len(whole) // 3])

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(('127.0.0.1', 0), CutShort)
    threading.Thread(target=server.handle_request, daemon=True).start()
    url = f'http://127.0.0.1:{server.server_port}/msmlp_tiny_patch4_ckpt_epoch299.pth'
    try:
        with pytest.raises(msmlp.CheckpointError, match=f'received {len(whole) // 3} of {len(whole)} bytes'):
            small_pretrained(url=url)
    finally:
        server.server_close()
    assert not list(hub.iterdir())


def test_two_processes_downloading_the_same_url_at_once_both_get_it(tmp_path, hub):
    """The processes of a multi-GPU run build their models at once: each downloads (the server
    here makes the two downloads overlap); before, they wrote into one partial file and both failed."""
    import http.server
    import socketserver
    import subprocess
    import sys
    import threading
    whole = (FIXTURES / 'released_layout_square_64.pth').read_bytes()
    both_connected = threading.Barrier(2, timeout=60)

    class Overlapping(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header('Content-Length', str(len(whole)))
            self.end_headers()
            both_connected.wait()
            for start in range(0, len(whole), len(whole) // 4 + 1):
                self.wfile.write(whole[start:start + len(whole) // 4 + 1])
                self.wfile.flush()

        def log_message(self, *args):
            pass

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True

    server = Server(('127.0.0.1', 0), Overlapping)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f'http://127.0.0.1:{server.server_port}/msmlp_tiny_patch4_ckpt_epoch299.pth'
    code = f'import msmlp.checkpoint as c; print(c.download_weights({url!r}, progress=False))'
    env = dict(os.environ, TORCH_HOME=str(hub.parent.parent), PYTHONPATH=str(Path(__file__).parents[1]))
    try:
        runs = [subprocess.Popen([sys.executable, '-c', code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for _ in range(2)]
        results = [run.communicate(timeout=120) for run in runs]
    finally:
        server.shutdown()
        server.server_close()
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in results]
    [cached] = hub.iterdir()  # one copy, no partial file left
    assert {out.strip() for out, _ in results} == {str(cached)} and cached.read_bytes() == whole


def test_a_download_with_the_wrong_hash_is_not_kept(tmp_path, hub):
    import hashlib
    url = released_at_a_url(tmp_path)
    with pytest.raises(msmlp.CheckpointError, match='SHA-256 [0-9a-f]{64}, expected 0{64}'):
        small_pretrained(url=url + '#sha256=' + '0' * 64)
    assert not list(hub.iterdir())
    digest = hashlib.sha256((FIXTURES / 'released_layout_square_64.pth').read_bytes()).hexdigest()
    small_pretrained(url=f'{url}#sha256={digest}')
    assert [p.name for p in hub.iterdir()] == [f'msmlp_tiny_patch4_ckpt_epoch299-{_url_hash(url)}.pth']


def _url_hash(url: str) -> str:
    import hashlib
    return hashlib.sha256(url.encode()).hexdigest()[:12]


def test_urls_that_end_in_the_same_file_name_are_cached_apart(tmp_path, hub):
    """Keyed by file name alone, the second URL got the first URL's file."""
    other = tmp_path / 'elsewhere' / 'msmlp_tiny_patch4_ckpt_epoch299.pth'
    other.parent.mkdir()
    other.write_bytes(b'not the released file')
    first = msmlp.checkpoint.download_weights(released_at_a_url(tmp_path), progress=False)
    with pytest.raises(msmlp.CheckpointError, match='download of .*elsewhere.* is damaged'):
        msmlp.checkpoint.download_weights(other.as_uri(), progress=False)
    assert Path(first).read_bytes() == (FIXTURES / 'released_layout_square_64.pth').read_bytes()


def test_a_damaged_cached_copy_says_that_removing_it_downloads_it_again(tmp_path, hub):
    url = released_at_a_url(tmp_path)
    cached = Path(msmlp.checkpoint.download_weights(url, progress=False))
    cached.write_bytes(cached.read_bytes()[:1000])  # cut, as by a full disk
    with pytest.raises(msmlp.CheckpointError, match=f'^cannot read {cached}: not a PyTorch checkpoint, or truncated '
                                                    r'\(.*\); it is a download in the weights cache: remove it to '
                                                    'download it again$'):
        small_pretrained(url=url)


def test_a_cached_copy_is_checked_against_the_urls_sha256(tmp_path, hub):
    url = released_at_a_url(tmp_path)
    with pytest.raises(msmlp.CheckpointError, match=r"#sha256= takes the 64 hex digits of the file's SHA-256, "
                                                    r"got 'xyz'$"):
        msmlp.checkpoint.download_weights(url + '#sha256=xyz', progress=False)
    cached = msmlp.checkpoint.download_weights(url, progress=False)
    with pytest.raises(msmlp.CheckpointError, match=f'^the cached {cached} has SHA-256 [0-9a-f]{{64}}, but .* expects '
                                                    f'{"0" * 64}; remove the file to download it again$'):
        msmlp.checkpoint.download_weights(url + '#sha256=' + '0' * 64, progress=False)


def test_a_failed_download_is_one_line(tmp_path, hub):
    with pytest.raises(msmlp.CheckpointError, match='cannot download file://.*missing.pth'):
        small_pretrained(url=(tmp_path / 'missing.pth').as_uri())


def test_timm_pretrained_from_released_file():
    model = timm.create_model('msmlp_tiny', pretrained=True, num_classes=10, embed_dim=24, depths=(1, 1, 2, 1),
                              pretrained_cfg_overlay=dict(file=str(FIXTURES / 'released_layout_square_64.pth')))
    data = REFERENCE['square_64']
    with torch.no_grad():
        assert (model.eval()(data['input']) - data['logits']).abs().max() <= 1e-5


def test_timm_train_scripts_pretrained_path_and_checkpoint_path_read_released_weights(tmp_path):
    """train.py --pretrained-path FILE is pretrained_cfg_overlay=dict(file=FILE, num_classes=-1);
    checkpoint_path= reads the safetensors copy msmlp export writes (torch.load refuses the yacs pickle)."""
    from msmlp import export
    case, released = REFERENCE['square_64'], str(FIXTURES / 'released_layout_square_64.pth')
    arch = dict(embed_dim=case['config']['embed_dim'], depths=case['config']['depths'])
    model = timm.create_model('msmlp_tiny', pretrained=True, num_classes=10, **arch,
                              pretrained_cfg_overlay=dict(file=released, num_classes=-1)).eval()
    assert (model(case['input']) - case['logits']).abs().max() <= 1e-5
    copy = tmp_path / 'released.safetensors'
    assert export.main(['--checkpoint', released, '--format', 'safetensors', '--output', str(copy)]) == 0
    model = timm.create_model('msmlp_tiny', num_classes=10, **arch, checkpoint_path=str(copy)).eval()
    assert (model(case['input']) - case['logits']).abs().max() <= 1e-5


def test_pretrained_with_one_input_channel_adapts_the_stem():
    model = timm.create_model('msmlp_tiny', pretrained=True, in_chans=1, num_classes=10, embed_dim=24,
                              depths=(1, 1, 2, 1),
                              pretrained_cfg_overlay=dict(file=str(FIXTURES / 'released_layout_square_64.pth')))
    data = REFERENCE['square_64']
    stem = data['state_dict']['patch_embed.proj.weight']
    assert torch.allclose(model.patch_embed.proj.weight, stem.sum(1, keepdim=True))
    assert model.eval()(torch.randn(1, 1, 64, 64)).shape == (1, 10)


def test_a_state_dict_overlay_is_loaded_without_a_download(hub):
    """timm gives an overlay's state_dict first place; msmlp downloaded the released file first.
    (num_classes: timm drops a head whose cfg has another class count, 1000 here.)"""
    data = REFERENCE['square_64']
    model = timm.create_model('msmlp_tiny', pretrained=True, num_classes=10, embed_dim=24, depths=(1, 1, 2, 1),
                              pretrained_cfg_overlay=dict(state_dict=data['state_dict'], num_classes=10,
                                                          url='file:///nowhere/msmlp_tiny.pth'))
    assert not hub.exists()
    with torch.no_grad():
        assert (model.eval()(data['input']) - data['logits']).abs().max() <= 1e-5


def test_a_local_dir_model_saved_for_the_hub_loads(tmp_path, hub):
    """timm.create_model('local-dir:DIR') of what save_for_hf wrote: its cfg has a file, no url."""
    source = timm.create_model('msmlp_tiny', num_classes=10, embed_dim=24, depths=(1, 1, 2, 1))
    timm.models.save_for_hf(source, str(tmp_path / 'hf'), model_config=dict(embed_dim=24, depths=[1, 1, 2, 1]))
    model = timm.create_model(f'local-dir:{tmp_path / "hf"}', pretrained=True)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())
    assert not hub.exists()


def test_cache_dir_holds_the_download(tmp_path, hub):
    model = timm.create_model('msmlp_tiny', pretrained=True, num_classes=10, embed_dim=24, depths=(1, 1, 2, 1),
                              cache_dir=str(tmp_path / 'mine'),
                              pretrained_cfg_overlay=dict(url=released_at_a_url(tmp_path)))
    assert [p.name[:len('msmlp_tiny_patch4')] for p in (tmp_path / 'mine').iterdir()] == ['msmlp_tiny_patch4']
    assert not hub.exists() and model.num_classes == 10


def test_pretrained_strict_false_loads_what_fits_with_a_warning():
    """The file has 2 blocks in stage 2, the model 3: strict refuses it, pretrained_strict=False
    loads the rest, as timm loads any model so."""
    released = str(FIXTURES / 'released_layout_square_64.pth')
    deeper = dict(num_classes=10, embed_dim=24, depths=(1, 1, 3, 1), pretrained_cfg_overlay=dict(file=released))
    with pytest.raises(msmlp.CheckpointError, match='does not fit the model'):
        timm.create_model('msmlp_tiny', pretrained=True, **deeper)
    with pytest.warns(UserWarning, match=r"loaded without \d+ of the model's tensors \(layers.2.blocks.2."):
        model = timm.create_model('msmlp_tiny', pretrained=True, pretrained_strict=False, **deeper)
    state = REFERENCE['square_64']['state_dict']
    assert torch.equal(model.layers[2].blocks[1].gamma, state['layers.2.blocks.1.gamma'])
    with pytest.raises(msmlp.CheckpointError, match='does not fit the model'):  # strict again outside that call
        msmlp.load_pretrained(timm.create_model('msmlp_tiny', **{k: v for k, v in deeper.items() if 'pre' not in k}),
                              released)


@pytest.mark.parametrize('name', ['msmlp_tiny', 'msswin_tiny'])
def test_device_and_dtype_place_every_parameter(name):
    """timm.create_model's device= and dtype= (ConvNeXt and Swin take them): MS-MLP refused them,
    MS-Swin's mix-shift blocks ignored them (half a bf16 model, failing at the first forward)."""
    small = dict(embed_dim=24, depths=(2, 2, 2, 2)) | (dict(num_heads=(1, 2, 4, 8), window_size=4)
                                                        if name == 'msswin_tiny' else {})
    model = timm.create_model(name, device='meta', **small)
    assert {p.device.type for p in model.parameters()} == {'meta'}
    model = timm.create_model(name, dtype=torch.bfloat16, **small).eval()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64, dtype=torch.bfloat16)).shape == (2, 1000)


@pytest.mark.parametrize('mix_impl', ['auto', 'fast', 'reference'])
def test_an_empty_batch_gives_empty_outputs(mix_impl):
    model = timm.create_model('msmlp_tiny', embed_dim=24, depths=(1, 1, 2, 1), mix_impl=mix_impl)
    assert model.eval()(torch.zeros(0, 3, 64, 64)).shape == (0, 1000)
    out = model.train()(torch.zeros(0, 3, 64, 64, requires_grad=True))
    assert out.shape == (0, 1000)
    out.sum().backward()


@pytest.mark.parametrize('fast, plain', [('fast', 'avg'), ('fastavg', 'avg'), ('fastmax', 'max'),
                                         ('fastavgmax', 'avgmax')])
def test_timms_fast_pool_names_are_the_same_pooling(fast, plain):
    small = dict(embed_dim=24, depths=(1, 1, 2, 1), num_classes=5)
    a = timm.create_model('msmlp_tiny', global_pool=plain, **small).eval()
    b = timm.create_model('msmlp_tiny', global_pool=fast, **small).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(a(x), b(x)) and a(x).shape == (2, 5)
        assert torch.allclose(torch.jit.script(b)(x), a(x), atol=1e-5)
    with pytest.raises(ValueError, match=r"got 'fastcatavgmax' \(pooling that doubles the width"):
        b.reset_classifier(5, 'fastcatavgmax')


def test_even_kernels_are_refused_when_the_model_is_built():
    with pytest.raises(ValueError, match=r'mix_size \[3, 5, 6, 5, 3\]: kernels must be odd'):
        msmlp.MSMLP(embed_dim=20, depths=(1, 1, 1, 1), mix_sizes=[(3, 5, 6, 5, 3)] * 4)


def imported_modules(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module


def test_backbone_package_imports_neither_lightning_nor_tasks():
    package = Path(msmlp.__file__).parent
    assert len(list(package.glob('*.py'))) >= 10
    forbidden = {'lightning', 'pytorch_lightning', 'tasks', 'cli'}
    bad = {f'{path.name}: {name}' for path in package.glob('*.py') for name in imported_modules(path)
           if name.split('.')[0] in forbidden}  # function-level imports included
    assert not bad


def test_flop_counting_sees_the_released_operations():
    """Under a dispatch mode (FLOP counting, as Lightning's model summary does) the fast path
    runs the released operations, so the count is the model's whatever the mix_impl."""
    from torch.utils.flop_counter import FlopCounterMode
    model = msmlp.MSMLP(num_classes=4, embed_dim=40, depths=(1, 1, 2, 1)).eval()
    counts = []
    for impl in ('fast', 'reference'):
        model.set_mix_impl(impl)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 5e6


def test_torch_export_with_dynamic_batch_height_and_width():
    """The padding is export-friendly: one exported program serves any batch and size >= 64
    (at 33..63 pixels the last stage is 1x1, which the program's guards leave out)."""
    from torch.export import Dim, export
    model = msmlp.MSMLP(num_classes=10, embed_dim=40, depths=(1, 1, 2, 1)).eval()
    dims = {0: Dim('batch', min=1, max=64), 2: Dim('height', min=64, max=4096), 3: Dim('width', min=64, max=4096)}
    program = export(model, (torch.randn(2, 3, 64, 96),), dynamic_shapes={'x': dims})
    for shape in [(3, 3, 70, 91), (1, 3, 224, 224), (2, 3, 383, 511)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            assert torch.allclose(program.module()(x), model(x), atol=1e-5, rtol=1e-5), shape


@pytest.mark.parametrize('kind', ['max', 'avgmax'])
def test_other_global_pools_pool_as_timm_before_the_head_norm(kind):
    """timm's ConvNeXt accepts its pooling types; the features are pooled, normed, classified."""
    from timm.layers import SelectAdaptivePool2d
    model = timm.create_model('msmlp_tiny', global_pool=kind, num_classes=5, **TINY).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = model.head(model.norm(SelectAdaptivePool2d(pool_type=kind, flatten=True)(model.forward_features(x))))
        assert torch.allclose(model(x), expected, atol=1e-6)
        assert torch.allclose(torch.jit.script(model)(x), expected, atol=1e-5)
    with pytest.raises(ValueError, match=r"got 'catavgmax' \(pooling that doubles the width does not fit the head norm"):
        model.reset_classifier(5, 'catavgmax')
    with pytest.raises(ValueError, match=r"got 'token' \(MS-MLP has no class token\)$"):
        model.reset_classifier(5, 'token')
    with pytest.raises(ValueError, match=r"^global_pool must be one of \('avg', 'max', 'avgmax', ''\), got 'mean'$"):
        model.reset_classifier(5, 'mean')


@pytest.mark.parametrize('indices', [0, 5, -1])
def test_forward_intermediates_refuses_a_last_n_outside_the_stages(indices):
    model = timm.create_model('msmlp_tiny', **TINY).eval()
    with pytest.raises(ValueError, match=f'indices={indices} asks for the last {indices} stages of 4: give 1 to 4'):
        model.forward_intermediates(torch.randn(1, 3, 32, 32), indices=indices, stop_early=True)
    assert len(model.forward_intermediates(torch.randn(1, 3, 32, 32), indices=4)[1]) == 4
    with pytest.raises(ValueError, match=r'^indices \[4\] must name stages in 0..3 \(or -4..-1\)$'):
        model.forward_intermediates(torch.randn(1, 3, 32, 32), indices=[4])  # before: named out_indices
