"""timm's model battery (its repository's tests/test_models.py), applied to every registered model:
msmlp_tiny/small/base and msswin_tiny/small/base.

Each test is one of timm's checks, at timm's input sizes and tolerances; where timm only checks
shapes we also compare outputs with the eager model, which timm's FX check does exactly.
"""
import math

import pytest
import timm
import torch
from timm.layers import Format, get_channel_dim, get_spatial_dim
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor, get_graph_node_names

import msmlp  # noqa: F401  (registers the models)

MODELS = ['msmlp_tiny', 'msmlp_small', 'msmlp_base', 'msswin_tiny', 'msswin_small', 'msswin_base']
# timm's sizes: the default 224 capped at these targets
FWD_SIZE, BWD_SIZE, JIT_SIZE, FEAT_SIZE, FX_SIZE = 224, 128, 128, 96, 128


def input_size(model_name: str, target: int):
    size = timm.get_pretrained_cfg_value(model_name, 'input_size')
    return tuple(min(s, target) for s in size)


def tracer_kwargs():
    return dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                param_shapes_constant=True)


def fx_model(model, train: bool = False):
    """timm's ``_create_fx_model``: a feature extractor returning the model's output node."""
    kwargs = tracer_kwargs()
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kwargs)
    train_return, eval_return = [train_nodes[-1]], [eval_nodes[-1]]
    if train:
        graph_nodes = list(reversed(NodePathTracer(**kwargs).trace(model).nodes))
        names = [n.name for n in graph_nodes]
        train_return = [train_nodes[-names.index(n.name)] for n in graph_nodes[0]._input_nodes.keys()]
    return create_feature_extractor(model, train_return_nodes=train_return, eval_return_nodes=eval_return,
                                    tracer_kwargs=kwargs)


@pytest.mark.parametrize('name', MODELS)
def test_forward_and_grad_checkpointing(name):
    model = timm.create_model(name).eval()
    x = torch.randn(1, *input_size(name, FWD_SIZE))
    with torch.no_grad():
        out = model(x)
    model.set_grad_checkpointing()
    again = model(x)  # with autograd on, as checkpointing only runs then
    assert out.shape == (1, 1000) and not out.isnan().any()
    assert torch.allclose(out, again, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', MODELS)
def test_backward_reaches_every_parameter(name):
    model = timm.create_model(name, num_classes=42).train()
    out = model(torch.randn(2, *input_size(name, BWD_SIZE)))
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing and out.shape[-1] == 42 and not out.isnan().any()


@pytest.mark.parametrize('name', MODELS)
def test_default_cfg(name):
    model = timm.create_model(name).eval()
    cfg, state = model.default_cfg, model.state_dict()
    assert model.num_classes == 1000 and model.num_features > 0 and model.head_hidden_size > 0
    x = torch.randn(1, *cfg['input_size'])
    with torch.no_grad():
        features = model.forward_features(x)
        pre_logits = model.forward_head(features, pre_logits=True)
        fmt = getattr(model, 'output_fmt', 'NCHW')  # timm's Swin (MS-Swin) keeps its maps NHWC
        assert features.shape[get_channel_dim(fmt)] == model.num_features
        assert tuple(features.shape[i] for i in get_spatial_dim(fmt)) == cfg['pool_size']
        assert pre_logits.shape == (1, model.head_hidden_size)
        model.reset_classifier(0)
        assert model.num_classes == 0
        assert model(x).shape == pre_logits.shape
        model.reset_classifier(0, '')
        assert model(x).shape == features.shape
        unpooled = timm.create_model(name, num_classes=0, global_pool='').eval()
        assert unpooled(x).shape == features.shape
    assert cfg['classifier'] + '.weight' in state and cfg['first_conv'] + '.weight' in state


@pytest.mark.parametrize('name', MODELS)
def test_torchscript_matches_eager(name):
    with timm.set_scriptable(True):
        model = timm.create_model(name).eval()
    scripted = torch.jit.script(model)
    for size in (input_size(name, JIT_SIZE), (3, 97, 131)):  # timm's size and an odd one
        x = torch.randn(1, *size)
        with torch.no_grad():
            out, expected = scripted(x), model(x)
        assert out.shape == (1, 1000) and not out.isnan().any()
        assert torch.allclose(out, expected, rtol=1e-4, atol=1e-5)


def check_feature_maps(outputs, channels, reductions, size, batch=1, fmt='NCHW'):
    assert len(outputs) == len(channels)
    c_axis, (h_axis, w_axis) = get_channel_dim(fmt), get_spatial_dim(fmt)
    for c, r, o in zip(channels, reductions, outputs):
        assert o.shape[c_axis] == c and o.shape[0] == batch
        assert o.shape[h_axis] <= math.ceil(size[-2] / r) + 1 and o.shape[w_axis] <= math.ceil(size[-1] / r) + 1
        assert not o.isnan().any()


@pytest.mark.parametrize('feature_cls', [None, 'hook', 'fx', 'dict', 'list'])  # None: the model's own, 'getter'
@pytest.mark.parametrize('name', MODELS)
def test_features_only(name, feature_cls):
    extra = dict(feature_cls=feature_cls) if feature_cls else {}
    if feature_cls in ('dict', 'list') and name.startswith('msmlp'):  # its stage outputs are no module's
        with pytest.raises(ValueError, match=f"^{name}: feature_cls='{feature_cls}' cannot give its stage outputs"):
            timm.create_model(name, features_only=True, **extra)
        return
    torch.manual_seed(0)
    model = timm.create_model(name, features_only=True, **extra).eval()
    torch.manual_seed(0)
    classifier = timm.create_model(name).eval()  # the same weights
    size = input_size(name, FEAT_SIZE)
    x = torch.randn(1, *size)
    with torch.no_grad():
        outputs = model(x)
        outputs = list(outputs.values()) if isinstance(outputs, dict) else outputs
        expected = classifier.forward_intermediates(x, intermediates_only=True)
    fmt = Format(getattr(model, 'output_fmt', 'NCHW'))  # timm's hook, fx, dict and list extractors of Swin give NHWC
    assert len(model.feature_info.channels()) >= 3
    check_feature_maps(outputs, model.feature_info.channels(), model.feature_info.reduction(), size, fmt=fmt)
    if fmt == Format.NHWC:
        outputs = [o.permute(0, 3, 1, 2) for o in outputs]
    assert all(torch.allclose(o, e, rtol=1e-4, atol=1e-5) for o, e in zip(outputs, expected, strict=True))


@pytest.mark.parametrize('name', MODELS)
def test_forward_intermediates(name):
    model = timm.create_model(name).eval()
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    size = input_size(name, FEAT_SIZE)
    x = torch.randn(1, *size)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x, output_fmt='NCHW')
        check_feature_maps(intermediates, info.channels(), info.reduction(), size)
        assert torch.allclose(final, model.forward_features(x))
    model.set_grad_checkpointing()
    again, _ = model.forward_intermediates(x, output_fmt='NCHW')  # autograd on: checkpointing runs
    assert torch.allclose(final, again, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', MODELS)
def test_fx_forward_equals_eager(name):
    model = timm.create_model(name).eval()
    x = torch.randn(1, *input_size(name, FX_SIZE))
    with torch.inference_mode():
        out = model(x)
        traced = torch.cat(tuple(fx_model(model)(x).values()))
    assert torch.all(traced == out) and not out.isnan().any()


@pytest.mark.parametrize('name', MODELS)
def test_fx_backward_reaches_every_parameter(name):
    model = fx_model(timm.create_model(name, num_classes=42).train(), train=True)
    out = torch.cat(tuple(model(torch.randn(2, *input_size(name, FX_SIZE))).values()))
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing and out.shape[-1] == 42 and not out.isnan().any()


@pytest.mark.parametrize('name', MODELS)
def test_fx_then_torchscript(name):
    with timm.set_scriptable(True):
        model = timm.create_model(name).eval()
    scripted = torch.jit.script(fx_model(model))
    x = torch.randn(1, *input_size(name, JIT_SIZE))
    with torch.inference_mode():
        out = torch.cat(tuple(scripted(x).values()))
        expected = model(x)
    assert out.shape == (1, 1000) and torch.allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_an_op_redefined_in_the_process_leaves_no_id_for_torchscript_to_mistake():
    """What tests/conftest.py guards: an overload added to an op (torch.compile's imports do it)
    must not free the op object whose id TorchScript's builtin table holds, or a later object at
    that address is a builtin to torch.jit.script (so test_fx_then_torchscript failed at random)."""
    library = torch.library.Library('msmlp_id_probe', 'FRAGMENT')
    try:
        library.define('probe(Tensor x) -> Tensor')
        entered = id(torch.ops.msmlp_id_probe.probe._op)
        library.define('probe.other(Tensor x, int n) -> Tensor')  # torch enters a new op object
        later = [torch._C._jit_get_operation('aten::relu')[0] for _ in range(1000)]
        mistaken = [torch.jit._builtins._find_builtin(op) for op in later if id(op) == entered]
        assert mistaken == []
    finally:
        library._destroy()


def test_feature_extractor_at_block_outputs_forward_and_backward():
    """torchvision's create_feature_extractor at the blocks' outputs, as a detector would use it."""
    model = timm.create_model('msmlp_tiny').train()
    nodes = {'layers.0.blocks.2': 'c2', 'layers.1.blocks.2': 'c3', 'layers.2.blocks.8': 'c4',
             'layers.3.blocks.2': 'c5'}
    extractor = create_feature_extractor(model, return_nodes=nodes, tracer_kwargs=tracer_kwargs())
    x = torch.randn(2, 3, 97, 131)
    features = extractor(x)
    expected = model.forward_intermediates(x, intermediates_only=True)
    for name, ref in zip(nodes.values(), expected):
        assert torch.equal(features[name], ref)
    sum(f.mean() for f in features.values()).backward()
    assert all(p.grad is not None for n, p in extractor.named_parameters() if not n.startswith(('norm', 'head')))


def test_fx_without_timm_leaves_traces_the_released_block():
    """Plain torch.fx (no leaf modules) traces through the block: the released computation."""
    model = timm.create_model('msmlp_tiny', num_classes=10).eval()
    traced = torch.fx.symbolic_trace(model)
    assert any(n.target is torch.roll for n in traced.graph.nodes)
    x = torch.randn(2, 3, 70, 90)
    with torch.no_grad():
        assert torch.allclose(traced(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('feature_cls', ['fx', 'hook'])
def test_timm_graph_and_hook_features_are_the_stage_outputs(feature_cls):
    torch.manual_seed(0)
    model = timm.create_model('msmlp_tiny', features_only=True, feature_cls=feature_cls, out_indices=(1, 3)).eval()
    torch.manual_seed(0)  # the same initial weights
    getter = timm.create_model('msmlp_tiny', features_only=True, out_indices=(1, 3)).eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        for ours, expected in zip(model(x), getter(x), strict=True):
            assert torch.equal(ours, expected)


@pytest.mark.parametrize('name', ['msmlp_tiny', 'msswin_tiny'])
def test_a_features_only_model_scripts(name):
    """timm's features wrapper compiles forward_intermediates (as for convnext_tiny); MS-MLP's
    failed on an f-string conversion and its index helper."""
    model = timm.create_model(name, features_only=True, out_indices=(1, 3)).eval()
    x = torch.randn(1, *input_size(name, FEAT_SIZE))
    with torch.no_grad():
        for scripted, eager in zip(torch.jit.script(model)(x), model(x), strict=True):
            assert torch.allclose(scripted, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', ['msmlp_tiny', 'msswin_tiny'])
def test_frozen_stages_in_a_traced_feature_graph_are_refused(name):
    """timm's fx wrapper copies the modules into a graph whose train() sets every module training:
    the frozen stages ran drop path again (outputs changed from call to call)."""
    with pytest.raises(ValueError, match=f"^{name}: frozen_stages with feature_cls='fx': the traced graph's train"):
        timm.create_model(name, features_only=True, feature_cls='fx', frozen_stages=1)
    model = timm.create_model(name, features_only=True, frozen_stages=1, drop_path_rate=0.9).train()
    frozen = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))
              and not any(p.requires_grad for p in m.parameters(recurse=False))]
    assert frozen and not any(m.training for m in frozen)  # the getter keeps them in eval


@pytest.mark.parametrize('indices', [(0, 1), 2, [1, 3]], ids=['first-two', 'last-two', 'one-and-three'])
def test_prune_intermediate_layers_keeps_the_intermediates(indices):
    """timm's ``prune_intermediate_layers`` (convnext's signature): the stages after the last index
    and the head go; ``forward_intermediates`` at the kept indices is unchanged."""
    model = timm.create_model('msmlp_tiny').eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=indices, intermediates_only=True)
        kept = model.prune_intermediate_layers(indices)
        got = model.forward_intermediates(x, indices=kept, intermediates_only=True)
        pooled = model(x)
    last = max(kept)
    assert len(model.layers) == last + 1 and model.layers[-1].downsample is None
    assert model.num_classes == 0 and model.num_features == model.feature_info[last]['num_chs']
    assert not any(n.startswith(('head.', 'norm.')) for n, _ in model.named_parameters())
    assert pooled.shape == (1, model.num_features, *expected[-1].shape[2:])
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)


def test_features_only_prunes_the_stages_it_does_not_return():
    """timm's getter wraps a pruned model: out_indices (0, 1) keeps two stages, no head."""
    torch.manual_seed(0)
    full = timm.create_model('msmlp_tiny').eval()
    torch.manual_seed(0)
    features = timm.create_model('msmlp_tiny', features_only=True, out_indices=(0, 1)).eval()
    assert len(features.model.layers) == 2 and features.model.layers[1].downsample is None
    assert not any(n.startswith(('model.head.', 'model.norm.')) for n, _ in features.named_parameters())
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        for ours, expected in zip(features(x), full.forward_intermediates(x, indices=(0, 1), intermediates_only=True),
                                  strict=True):
            assert torch.equal(ours, expected)
