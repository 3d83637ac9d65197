"""The model test standard: every registered zoo model meets timm's interface and goes beyond it.

timm's own checks (forward, backward with every parameter receiving a gradient, default cfgs,
reset_classifier, features_only, forward_intermediates, grad checkpointing) are the floor; odd input
sizes, NCHW features from both wrappers, pruning, ONNX parity and bad-input errors go beyond them.

Each model runs at reduced width and depth (`zoo.reduced_args`: same stages, mixers, schedules and
layouts), so the standard scales with the number of models; full sizes are built only where parameter
counts and parity with timm / the official code are checked (tests/zoo/).
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import zoo

MODELS = zoo.list_zoo_models()
ODD_SIZE = (97, 131)


def _small_size(model) -> int:
    return max(64, model.min_input_size)


def _create(name: str, **kwargs):
    return timm.create_model(name, **dict(zoo.reduced_args(name), **kwargs))


def _expected_hw(size, reduction: int):
    return tuple(-(-s // reduction) for s in size)


EXPECTED = {
    'swin_tiny', 'swin_small', 'swin_base', 'maxvit_tiny', 'maxvit_small', 'maxvit_base',
    'cbam_resnet18', 'cbam_resnet34', 'cbam_resnet50', 'nat_mini', 'nat_tiny', 'nat_small', 'nat_base',
    'dinat_mini', 'dinat_tiny', 'dinat_small', 'dinat_base', 'dinat_s_tiny', 'dinat_s_small', 'dinat_s_base',
    'hybrid_tiny', 'hybrid_small', 'biformer_tiny', 'biformer_small', 'biformer_base',
    'flatten_swin_tiny', 'flatten_swin_small', 'flatten_swin_base', 'inline_swin_tiny', 'inline_swin_small',
    'inline_swin_base', 'mala_tiny', 'mala_small', 'mala_base', 'mala_large', 'l2vit_tiny', 'l2vit_small',
    'l2vit_base',
    'zoo_twins_pcpvt_small', 'zoo_twins_pcpvt_base', 'zoo_twins_pcpvt_large', 'zoo_twins_svt_small',
    'zoo_twins_svt_base', 'zoo_twins_svt_large', 'zoo_shvit_s1', 'zoo_shvit_s2', 'zoo_shvit_s3', 'zoo_shvit_s4',
    'van_b0', 'van_b1', 'van_b2', 'van_b3', 'van_b4', 'van_b5', 'van_b6', 'psa_resnet50', 'ela_resnet18',
    'ela_resnet50',
    'zoo_volo_d1', 'zoo_volo_d2', 'zoo_volo_d3', 'zoo_volo_d4', 'zoo_volo_d5',
    'zoo_gcvit_xxtiny', 'zoo_gcvit_xtiny', 'zoo_gcvit_tiny', 'zoo_gcvit_small', 'zoo_gcvit_base',
    'zoo_davit_tiny', 'zoo_davit_small', 'zoo_davit_base', 'zoo_davit_large', 'zoo_davit_huge', 'zoo_davit_giant',
}


def test_models_registered():
    assert EXPECTED <= set(MODELS), sorted(EXPECTED - set(MODELS))
    assert all(timm.is_model(n) for n in MODELS)
    assert zoo.list_zoo_models('dinat_s_*') == ['dinat_s_base', 'dinat_s_small', 'dinat_s_tiny']


def test_every_model_has_reduced_args():
    golden = json.loads((Path(__file__).parent / 'zoo' / 'golden' / 'state_dict_keys.json').read_text())
    for name in MODELS:
        small = _create(name)
        n_small = sum(v.numel() for v in small.state_dict().values())
        n_full = sum(math.prod(shape) for _, shape in golden[name])  # the full model's layout, recorded
        n_stages = len({k.split('.')[1] for k, _ in golden[name] if k.startswith('stages.')})  # the full model's
        assert len(small.stages) == n_stages >= 3 and n_small < n_full / 2, (name, n_small, n_full)


def test_no_zoo_name_shadows_timm():
    code = (
        'import timm; before = set(timm.list_models()); import zoo; after = set(timm.list_models()); '
        'ours = set(zoo.list_zoo_models()); '
        'print(len(before & ours), len(after) - len(before), len(ours))'
    )
    res = subprocess.run([sys.executable, '-W', 'error::UserWarning', '-c', code],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    overlap, added, ours = map(int, res.stdout.split())
    assert overlap == 0
    assert added == ours > 0


@pytest.mark.parametrize('name', MODELS)
def test_forward_and_grad_checkpointing(name):
    """Training with checkpointed stages gives the same output and the same gradients as without."""
    model = _create(name, drop_path_rate=0.).train()
    size = _small_size(model)
    x = torch.randn(2, 3, size, size)
    results = []
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        out = model(x)
        assert out.shape == (2, model.num_classes) and torch.isfinite(out).all()
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (out0, grads0), (out1, grads1) = results
    assert all(s.grad_checkpointing for s in model.stages)
    torch.testing.assert_close(out1, out0, rtol=1e-5, atol=1e-5 * out0.abs().max().item())
    for n, g in grads0.items():
        torch.testing.assert_close(grads1[n], g, rtol=1e-4, atol=1e-5 * g.abs().max().item() + 1e-12, msg=n)


@pytest.mark.parametrize('name', MODELS)
def test_backward_every_parameter(name):
    model = _create(name, num_classes=42).train()
    size = _small_size(model)
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 42)
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f'parameters without gradient: {missing[:10]}'
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize('name', MODELS)
def test_default_cfg_and_heads(name):
    model = _create(name).eval()
    cfg = model.pretrained_cfg
    assert model.num_classes == cfg['num_classes'] and model.num_features > 0 and model.head_hidden_size > 0
    state = model.state_dict()
    classifiers = cfg['classifier'] if isinstance(cfg['classifier'], (list, tuple)) else [cfg['classifier']]
    assert all(c + '.weight' in state for c in classifiers)
    first_convs = cfg['first_conv'] if isinstance(cfg['first_conv'], (list, tuple)) else [cfg['first_conv']]
    assert all(fc + '.weight' in state for fc in first_convs)
    assert _expected_hw(cfg['input_size'][1:], model.feature_info[-1]['reduction']) == tuple(cfg['pool_size'])
    with torch.no_grad():
        feat = model.forward_features(torch.randn(1, *cfg['input_size']))
        assert feat.shape == (1, model.num_features, *cfg['pool_size'])
        assert model.forward_head(feat).shape == (1, model.num_classes)
        pre = model.forward_head(feat, pre_logits=True)
        assert pre.shape == (1, model.head_hidden_size)
        model.reset_classifier(0)
        assert model.num_classes == 0
        assert model.forward_head(feat).shape == pre.shape
        model.reset_classifier(0, '')
        assert model.forward_head(feat).shape[-2:] == tuple(cfg['pool_size'])
        model.reset_classifier(7, global_pool='avg')
        assert model.forward_head(feat).shape == (1, 7)
        assert model.get_classifier().out_features == 7
        nopool = _create(name, num_classes=0, global_pool='').eval()
        assert nopool.forward_head(feat).shape == feat.shape


@pytest.mark.parametrize('name', MODELS)
def test_features_only_wrappers_are_nchw(name):
    torch.manual_seed(0)
    ref = _create(name).eval()
    size = (_small_size(ref), _small_size(ref) + 32)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        want = ref.forward_intermediates(x, intermediates_only=True)
    last = len(ref.feature_info) - 1  # 3 stages (SHViT) or 4
    assert last >= 2
    for feature_cls, out_indices in (('list', tuple(range(last + 1))), ('getter', (1, last))):
        torch.manual_seed(0)  # same init as `ref`
        model = _create(name, features_only=True, feature_cls=feature_cls, out_indices=out_indices).eval()
        chans, reds = model.feature_info.channels(), model.feature_info.reduction()
        assert reds == [ref.feature_info[i]['reduction'] for i in out_indices]
        assert chans == [ref.feature_info[i]['num_chs'] for i in out_indices]
        with torch.no_grad():
            feats = model(x)
        assert len(feats) == len(out_indices)
        for f, c, r, i in zip(feats, chans, reds, out_indices):
            assert f.shape == (2, c, *_expected_hw(size, r)), (feature_cls, f.shape, c, r)
            torch.testing.assert_close(f, want[i], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name', MODELS)
def test_forward_intermediates_and_prune(name):
    model = _create(name).eval()
    size = _small_size(model)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        final, inters = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=1e-5, atol=1e-5)
        assert len(inters) == len(model.feature_info)
        for t, info in zip(inters, model.feature_info):
            assert t.shape == (2, info['num_chs'], *_expected_hw((size, size), info['reduction']))
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [t.shape for t in last_two] == [t.shape for t in inters[-2:]]
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], inters[1])
        model.set_grad_checkpointing()
        final_ckpt, _ = model.forward_intermediates(x)
        torch.testing.assert_close(final_ckpt, final, rtol=1e-4, atol=1e-5)
        kept = model.prune_intermediate_layers([0, 1], prune_head=True)
        assert kept == [0, 1] and len(model.stages) == 2 and model.num_classes == 0
        pruned = model.forward_intermediates(x, intermediates_only=True)
        torch.testing.assert_close(pruned[1], inters[1])
        assert model.num_features == model.feature_info[1]['num_chs']
        assert model(x).shape == (2, model.num_features, *inters[1].shape[-2:])


@pytest.mark.parametrize('name', MODELS)
def test_odd_input_sizes(name):
    model = _create(name, features_only=True).eval()
    x = torch.randn(1, 3, *ODD_SIZE)
    with torch.no_grad():
        feats = model(x)
    for f, c, r in zip(feats, model.feature_info.channels(), model.feature_info.reduction()):
        assert f.shape == (1, c, *_expected_hw(ODD_SIZE, r))
        assert torch.isfinite(f).all()


@pytest.mark.parametrize('name', MODELS)
def test_bad_input_errors(name):
    model = _create(name).eval()
    with pytest.raises(ValueError, match=r'expected input \(B, 3, H, W\)'):
        model(torch.randn(1, 4, 64, 64))
    tiny = model.min_input_size - 1
    if tiny > 0:
        with pytest.raises(ValueError, match=f'>= {model.min_input_size}'):
            model(torch.randn(1, 3, tiny, tiny))


def test_unknown_model_name():
    with pytest.raises(RuntimeError, match='Unknown model'):
        timm.create_model('swin_tinyy')


@pytest.mark.parametrize('name', MODELS)
def test_onnx_parity(name, tmp_path):
    """Every model through the TorchScript exporter (fast), static shape; tests/weights/test_onnx_dynamic.py
    exports every model with dynamic H x W."""
    from zoo.weights.onnx import export_onnx
    model = _create(name).eval()
    size = _small_size(model)
    x = torch.randn(2, 3, size, size)
    # export_onnx's rule: max |ort - torch| <= max(1e-4, 1e-5 * max |logits|), per input
    report = export_onnx(model, tmp_path / f'{name}.onnx', example_input=x, exporter='legacy')
    assert report['checks'] and all(c['max_abs_err'] <= c['tol'] for c in report['checks']), report


FAMILY_REPRESENTATIVES = ['swin_tiny', 'maxvit_tiny', 'cbam_resnet18', 'nat_mini', 'dinat_s_tiny', 'hybrid_tiny',
                          'biformer_tiny', 'zoo_twins_svt_small', 'zoo_shvit_s1', 'van_b0']


@pytest.mark.parametrize('name', FAMILY_REPRESENTATIVES)
def test_onnx_parity_dynamo(name, tmp_path):
    """One model per family through the dynamo exporter (the torch default), batch 2 example."""
    from zoo.weights.onnx import export_onnx
    model = _create(name).eval()
    size = _small_size(model)
    report = export_onnx(model, tmp_path / f'{name}.onnx', img_size=(size, size), exporter='dynamo')
    assert report['exporter'] == 'dynamo' and all(c['max_abs_err'] <= c['tol'] for c in report['checks']), report


# ---------------------------------------------------------------------------------------- FX and TorchScript
# timm's tests/test_models.py holds its models to FX tracing (its leaf / autowrap registries), features_only with
# feature_cls='fx' and TorchScript; the same calls here, on reduced widths.

def _timm_tracer_kwargs():
    from timm.models import get_notrace_functions, get_notrace_modules
    return dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                param_shapes_constant=True)


def _fx_model(model, tracer_kwargs=None):
    """The whole model as an FX GraphModule returning its logits (timm's test harness does the same)."""
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=tracer_kwargs)


def _scriptable(model) -> bool:
    """Every mixer in `model` is registered with torchscript=True (the others refuse by name)."""
    return not any('__prepare_scriptable__' in vars(m) for m in model.modules())


@pytest.mark.parametrize('name', MODELS)
def test_fx_forward_any_size(name):
    """One traced graph gives eager's logits bit for bit, at the traced size and at an odd size (the graph pads and
    crops without branching on the size)."""
    model = _create(name).eval()
    fx = _fx_model(model, _timm_tracer_kwargs())
    size = _small_size(model)
    with torch.inference_mode():
        for shape in ((1, 3, size, size + 32), (2, 3, *ODD_SIZE)):
            x = torch.randn(shape)
            (out,) = fx(x).values()
            assert torch.equal(out, model(x)), (name, shape)


@pytest.mark.parametrize('name', MODELS)
def test_fx_backward(name):
    """A train-mode graph: every parameter receives the gradient eager autograd gives it."""
    model = _create(name, num_classes=42, drop_path_rate=0.).train()
    fx = _fx_model(model, _timm_tracer_kwargs())
    x = torch.randn(2, 3, _small_size(model), _small_size(model))
    (out,) = fx(x).values()
    assert out.shape == (2, 42)
    out.square().mean().backward()
    fx_grads = {n: p.grad for n, p in fx.named_parameters()}
    assert all(g is not None for g in fx_grads.values()) and len(fx_grads) == len(list(model.parameters()))
    model.zero_grad()
    model(x).square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(fx_grads[n], p.grad, rtol=1e-4, atol=1e-6 * p.grad.abs().max().item() + 1e-12,
                                   msg=n)


@pytest.mark.parametrize('name', MODELS)
def test_features_only_fx_and_create_feature_extractor(name):
    """feature_cls='fx' and torchvision's create_feature_extractor (with no tracer arguments, as detection code
    calls it) give the stage maps of forward_intermediates."""
    from torchvision.models.feature_extraction import create_feature_extractor
    torch.manual_seed(0)
    ref = _create(name).eval()
    x = torch.randn(1, 3, *ODD_SIZE)
    last = len(ref.stages) - 1
    with torch.no_grad():
        want = ref.forward_intermediates(x, intermediates_only=True)
        last = len(want) - 1
        torch.manual_seed(0)  # same init as `ref`
        feats = _create(name, features_only=True, feature_cls='fx', out_indices=(1, last)).eval()
        for got, i in zip(feats(x), (1, last)):
            assert torch.equal(got, want[i]), i
        extractor = create_feature_extractor(ref, return_nodes={'stages.1': 'c3', f'stages.{last}': 'c5'})
        out = extractor(x)
    assert list(out) == ['c3', 'c5']
    assert torch.equal(out['c3'], want[1]) and torch.equal(out['c5'], want[last])


@pytest.mark.parametrize('name', MODELS)
def test_torchscript(name):
    """Models whose mixers all script (torchscript=True in the registry) script, alone and after FX tracing, to
    eager's logits; the others refuse at once with a message naming the mixer (README: TorchScript)."""
    from timm import set_scriptable
    with set_scriptable(True):
        model = _create(name).eval()
    if not _scriptable(model):
        with pytest.raises(RuntimeError, match=r"the '\w+' mixer does not support TorchScript"):
            torch.jit.script(model)
        return
    scripted = torch.jit.script(model)
    scripted_fx = torch.jit.script(_fx_model(model))
    with torch.inference_mode():
        for x in (torch.randn(1, 3, 64, 96), torch.randn(1, 3, *ODD_SIZE)):
            want = model(x)
            torch.testing.assert_close(scripted(x), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
            (got,) = scripted_fx(x).values()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_torchscript_refuses_forced_triton():
    from zoo.kernels import use_backend
    model = _create('cbam_resnet18').eval()
    with use_backend('triton'), pytest.raises(RuntimeError, match="backend forced to 'triton'"):
        torch.jit.script(model)
    torch.jit.script(model)  # the refusal is about the mode, not the model
