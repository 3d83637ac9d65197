"""BiFormer: official configurations (parameter counts of the official model definitions), the official key
layout (recorded from `models/biformer.py`) loading through KEY_MAP, release-file round trip, padding at any
size, stage structure. Logit parity with the official code itself needs the official repository (outside the
project); the figures are in the README."""
import json
from pathlib import Path

import pytest
import timm
import torch

import zoo
from zoo.weights.keymap import IncompatibleKeysError, remap_state_dict
from zoo.zoo_biformer import KEY_MAP

OFFICIAL_KEYS = json.loads((Path(__file__).parent / 'golden' / 'biformer_tiny_official_keys.json').read_text())


@pytest.mark.parametrize('name, params', [
    ('biformer_tiny', 13_142_760), ('biformer_small', 25_536_232), ('biformer_base', 56_804_968)])
def test_parameter_counts_equal_the_official_models(name, params):
    # counted on the official model definitions (rayleizhu/BiFormer models/biformer.py): 13.14M / 25.54M / 56.80M
    model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params


def test_official_configuration():
    model = timm.create_model('biformer_tiny')
    routed = [s.blocks[0].attn for s in model.stages]
    assert [a.topk for a in routed] == [1, 4, 16, -2]
    assert [(a.num_heads, a.head_dim) for a in routed] == [(2, 32), (4, 32), (8, 32), (8, 64)]
    assert [a.n_win for a in routed[:3]] == [7, 7, 7]
    assert [a.scale for a in routed] == [64 ** -0.5, 128 ** -0.5, 256 ** -0.5, 64 ** -0.5]
    assert routed[3].qkv.bias is None and all(a.qkv.bias is not None for a in routed[:3])
    block = model.stages[0].blocks[0]
    assert block.norm1.eps == 1e-6 and block.pos_embed.proj.kernel_size == (3, 3)
    assert block.mlp.fc1.out_features == 3 * 64 and routed[0].lepe.kernel_size == (5, 5)
    assert isinstance(model.norm, torch.nn.BatchNorm2d) and model.stem[0].stride == (2, 2)
    assert [f['reduction'] for f in model.feature_info] == [4, 8, 16, 32]


def _official_state_dict(model) -> dict:
    """Our weights under the official names (written here from the official layout, independently of KEY_MAP)."""
    sd = model.state_dict()
    out = {}
    for k, v in sd.items():
        name = k
        if name.startswith('stem.'):
            name = 'downsample_layers.0.' + name[len('stem.'):]
        elif '.downsample.' in name:
            stage, rest = name[len('stages.'):].split('.downsample.')
            name = f'downsample_layers.{stage}.' + {'conv': '0', 'norm': '1'}[rest.split('.')[0]] + \
                rest[rest.index('.'):]
        elif name.startswith('stages.'):
            stage, _, block, rest = name[len('stages.'):].split('.', 3)
            global_stage = model.stages[int(stage)].blocks[int(block)].attn.is_global
            rest = rest.replace('pos_embed.proj.', 'pos_embed.').replace('mlp.fc1.', 'mlp.0.') \
                .replace('mlp.fc2.', 'mlp.3.')
            if not global_stage:
                rest = rest.replace('attn.qkv.', 'attn.qkv.qkv.').replace('attn.proj.', 'attn.wo.')
            name = f'stages.{stage}.{block}.{rest}'
        elif name.startswith('head.fc.'):
            name = 'head.' + name[len('head.fc.'):]
        out[name] = v
    return out


def test_official_key_layout_maps_exactly_onto_the_model():
    model = timm.create_model('biformer_tiny')
    own = {k: list(v.shape) for k, v in model.state_dict().items()}
    official = {k: torch.zeros(shape) for k, shape in OFFICIAL_KEYS}
    mapped = remap_state_dict(official, model, KEY_MAP, source='official biformer_tiny layout')
    assert {k: list(v.shape) for k, v in mapped.items()} == own
    # and our independent renaming of the model's keys gives exactly the official layout
    assert sorted([k, list(v.shape)] for k, v in _official_state_dict(model).items()) == sorted(OFFICIAL_KEYS)


def test_release_file_round_trip_and_wrong_files(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model('biformer_tiny', **zoo.reduced_args('biformer_tiny')).eval()
    with torch.no_grad():  # BatchNorm statistics as in a trained release file
        for m in src.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / 'biformer_tiny_in1k.pth'
    torch.save({'model': _official_state_dict(src)}, path)  # the release format: {'model': state_dict}
    loaded = timm.create_model('biformer_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                               **zoo.reduced_args('biformer_tiny')).eval()
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), src(x), rtol=0, atol=0)
    # a release file of another size is refused with a message, never partially loaded
    other = timm.create_model('biformer_tiny', **dict(zoo.reduced_args('biformer_tiny'), depths=(1, 1, 3, 1)))
    torch.save({'model': _official_state_dict(other)}, path)
    with pytest.raises(IncompatibleKeysError, match='not in the model'):
        timm.create_model('biformer_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                          **zoo.reduced_args('biformer_tiny'))


def test_pretrained_cfg_points_at_the_official_release():
    cfg = timm.create_model('biformer_small', **zoo.reduced_args('biformer_small')).pretrained_cfg
    assert cfg['url'].startswith('https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvChHDyM')
    assert cfg['first_conv'] == 'stem.0' and cfg['classifier'] == 'head.fc'


def test_sizes_multiple_of_the_region_grid_pad_nothing():
    # at 224 px every routed stage map (56, 28, 14) splits into 7 x 7 regions: the mixers pad nothing, so a
    # model with the padding removed gives the same output; at 200 px the maps (50, 25, 13) are padded
    model = timm.create_model('biformer_tiny', **zoo.reduced_args('biformer_tiny')).eval()
    import torch.nn.functional as F
    calls = []
    real_pad = F.pad

    def spy(x, pad, *a, **k):
        calls.append(tuple(pad))
        return real_pad(x, pad, *a, **k)

    F.pad = spy
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, 224, 224))
            assert not calls
            model(torch.randn(1, 3, 200, 200))
    finally:
        F.pad = real_pad
    assert calls and all(p[2] == p[4] for p in calls)  # (0, 0, 0, pad_w, 0, pad_h): bottom / right only


@pytest.mark.parametrize('exporter', ['legacy', pytest.param('dynamo', marks=pytest.mark.slow)])
def test_onnx_one_export_runs_at_any_size(exporter, tmp_path):
    """One export with dynamic H, W (the mixers always pad / crop in exported graphs) runs at sizes that need
    no padding, other padding and a second batch, both exporters (the registry says onnx_dynamic=True)."""
    from zoo.blocks import mixer_info
    from zoo.weights.onnx import export_onnx
    assert mixer_info('routing').onnx_dynamic
    model = timm.create_model('biformer_tiny', **zoo.reduced_args('biformer_tiny')).eval()
    report = export_onnx(model, tmp_path / 'biformer.onnx', img_size=(112, 112), dynamic=True, exporter=exporter,
                         check_sizes=[(64, 96), (100, 140)])
    sizes = [c['input_shape'][2:] for c in report['checks']]
    assert (112, 112) in sizes and (64, 96) in sizes and (100, 140) in sizes and len(set(sizes)) >= 4, sizes
    assert report['max_abs_err'] <= 1e-4, report


@pytest.mark.triton
def test_model_triton_matches_reference(monkeypatch):
    import zoo.kernels as kernels
    import zoo.kernels.routing as routing_op
    chosen = []

    def spy(*args, _resolve=routing_op.resolve_backend, **kw):
        chosen.append(_resolve(*args, **kw))
        return chosen[-1]

    monkeypatch.setattr(routing_op, 'resolve_backend', spy)
    torch.manual_seed(0)
    # 4 x 4 regions keep the interpreter quick: stage maps 8 x 12 (regions of 2 x 3 tokens), 4 x 6 (padded to
    # 4 x 8: 1 x 2), 2 x 3 (padded to 4 x 4: one token)
    model = timm.create_model('biformer_tiny', num_classes=5, n_win=4, **zoo.reduced_args('biformer_tiny')).eval()
    x = torch.randn(1, 3, 32, 48)
    results = {}
    for backend in ('torch', 'triton'):
        model.zero_grad()
        with kernels.use_backend(backend):
            out = model(x)
        out.square().sum().backward()
        results[backend] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert chosen.count('triton') == chosen.count('torch') == 4  # the four routed blocks, on each path
    (out_ref, g_ref), (out_tri, g_tri) = results['torch'], results['triton']
    torch.testing.assert_close(out_tri, out_ref, rtol=1e-4, atol=1e-5)
    for n in g_ref:
        scale = max(1.0, g_ref[n].abs().max().item())
        torch.testing.assert_close(g_tri[n], g_ref[n], rtol=1e-3, atol=1e-4 * scale, msg=n)
