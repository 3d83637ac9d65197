"""VAN and the PSA / ELA ResNets: parameter counts of the official definitions, the official VAN key layout (recorded
from Visual-Attention-Network/VAN-Classification models/van.py) loading through KEY_MAP, the release format round
trip, a file of another variant refused, the gate placements. Logit parity with the official code itself needs the
official repository (outside the project); the figures are in the README."""
import json
import re
from pathlib import Path

import pytest
import timm
import torch

import zoo
from zoo.blocks import MixerBlock
from zoo.blocks.conv_attention import EfficientLocalAttention, LargeKernelAttention, PolarizedSelfAttention
from zoo.weights.keymap import IncompatibleKeysError, remap_state_dict
from zoo.zoo_van import KEY_MAP

OFFICIAL_KEYS = json.loads((Path(__file__).parent / 'golden' / 'van_b0_official_keys.json').read_text())


@pytest.mark.parametrize('name, params', [
    ('van_b0', 4_105_800), ('van_b1', 13_861_800), ('van_b2', 26_578_472), ('van_b3', 44_765_608),
    ('van_b4', 60_283_176), ('van_b5', 89_967_688), ('van_b6', 199_829_416)])
def test_parameter_counts_equal_the_official_models(name, params):
    # counted on the official model definitions (models/van.py)
    with torch.device('meta'):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params


def test_names_do_not_shadow_timm():
    assert timm.list_models('van_*') == [f'van_b{i}' for i in range(7)]
    assert not any(n.startswith('van') for n in timm.list_models(module='resnet'))
    assert set(timm.list_models(['psa_*', 'ela_*'])) == {'psa_resnet50', 'ela_resnet18', 'ela_resnet50'}


def test_official_configuration():
    model = timm.create_model('van_b0')
    block = model.stages[0].blocks[0]
    assert isinstance(block, MixerBlock) and isinstance(block.attn, LargeKernelAttention)
    assert isinstance(block.norm1, torch.nn.BatchNorm2d) and isinstance(block.norm2, torch.nn.BatchNorm2d)
    assert block.mlp.fc1.out_features == 8 * 32 and block.mlp.dwconv.kernel_size == (3, 3)
    assert torch.equal(block.gamma1, torch.full((32,), 1e-2))
    assert model.stem.proj.kernel_size == (7, 7) and model.stem.proj.stride == (4, 4)
    ds = model.stages[1].downsample
    assert ds.conv.kernel_size == (3, 3) and ds.conv.stride == (2, 2) and isinstance(ds.norm, torch.nn.BatchNorm2d)
    assert all(isinstance(s.norm, torch.nn.LayerNorm) and s.norm.eps == 1e-6 for s in model.stages)
    assert isinstance(model.norm, torch.nn.Identity)
    assert [len(s.blocks) for s in model.stages] == [3, 3, 5, 2]
    assert [f['reduction'] for f in model.feature_info] == [4, 8, 16, 32]
    assert model.pretrained_cfg['url'].endswith('van_tiny_754.pth.tar')


def _official_state_dict(model) -> dict:
    """Our weights under the official names (written here from the official layout, independently of KEY_MAP)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith('stem.'):
            k = 'patch_embed1.' + k[len('stem.'):]
        elif k.startswith('head.fc.'):
            k = 'head.' + k[len('head.fc.'):]
        else:
            m = re.fullmatch(r'stages\.(\d)\.(downsample|norm|blocks)\.(.+)', k)
            i, part, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
            if part == 'downsample':
                k = f'patch_embed{i}.' + rest.replace('conv.', 'proj.')
            elif part == 'norm':
                k = f'norm{i}.{rest}'
            else:
                j, rest = rest.split('.', 1)
                rest = {'gamma1': 'layer_scale_1', 'gamma2': 'layer_scale_2'}.get(rest, rest)
                rest = rest.replace('mlp.dwconv.', 'mlp.dwconv.dwconv.')
                if re.fullmatch(r'mlp\.fc[12]\.weight', rest):
                    v = v[:, :, None, None]  # the official MLP's 1x1 convs
                k = f'block{i}.{j}.{rest}'
        out[k] = v
    return out


def test_official_key_layout_maps_exactly_onto_the_model():
    model = timm.create_model('van_b0')
    own = {k: list(v.shape) for k, v in model.state_dict().items()}
    official = {k: torch.zeros(shape) for k, shape in OFFICIAL_KEYS}
    assert len(official) == 402
    mapped = remap_state_dict({'state_dict': official}, model, KEY_MAP, source='official van_b0 layout')
    assert {k: list(v.shape) for k, v in mapped.items()} == own
    assert sorted([k, list(v.shape)] for k, v in _official_state_dict(model).items()) == sorted(OFFICIAL_KEYS)


def _random_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)


def test_release_file_round_trip_and_another_variant_refused(tmp_path):
    torch.manual_seed(0)
    small = zoo.reduced_args('van_b0')
    src = timm.create_model('van_b0', **small).eval()
    _random_bn(src)
    path = tmp_path / 'van_tiny_754.pth.tar'
    torch.save({'state_dict': _official_state_dict(src)}, path)  # the release format
    loaded = timm.create_model('van_b0', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **small).eval()
    x = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), src(x), rtol=0, atol=0)
    # a release file of another variant (the official van_b1 layout) is refused with a message naming it
    with torch.device('meta'):
        b1 = timm.create_model('van_b1')
    other = {k: torch.zeros(v.shape) for k, v in _official_state_dict(b1).items()}
    with pytest.raises(IncompatibleKeysError, match=r'(?s)does not belong to van_b0.*looks like a van_b1 checkpoint'):
        remap_state_dict({'state_dict': other}, timm.create_model('van_b0'), KEY_MAP, source='van_small_811.pth.tar')


def test_stage_norm_is_in_the_features():
    # official VAN normalises every stage's output (norm1..norm4) before the next patch embedding
    model = timm.create_model('van_b0', features_only=True, **zoo.reduced_args('van_b0')).eval()
    with torch.no_grad():
        feats = model(torch.randn(2, 3, 64, 96))
    for f in feats:
        per_pixel = f.permute(0, 2, 3, 1)
        torch.testing.assert_close(per_pixel.mean(-1), torch.zeros(per_pixel.shape[:-1]), rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------ gated ResNets

@pytest.mark.parametrize('name, base, gate, count', [
    ('psa_resnet50', 'resnet50', PolarizedSelfAttention, 27_687_984),
    ('ela_resnet18', 'resnet18', EfficientLocalAttention, 11_706_792),
    ('ela_resnet50', 'resnet50', EfficientLocalAttention, 26_191_400),
])
def test_gated_resnet_counts_and_placement(name, base, gate, count):
    model = timm.create_model(name)
    n_base = sum(p.numel() for p in timm.create_model(base).parameters())
    n = sum(p.numel() for p in model.parameters())
    assert n == count
    gates = [m for m in model.modules() if isinstance(m, gate)]
    assert len(gates) == sum(len(s.blocks) for s in model.stages)
    assert n - n_base == sum(p.numel() for g in gates for p in g.parameters())  # nothing else added
    blocks = [b for s in model.stages for b in s.blocks]
    if gate is PolarizedSelfAttention:  # after the 3x3 conv + BN + ReLU (timm's aa slot), width = planes
        assert all(isinstance(b.aa, gate) and b.se is None and b.aa.mode == 's' and b.aa.form == 'official'
                   for b in blocks)
        assert [b.aa.channels for b in blocks[::len(blocks) - 1]] == [64, 512]
    else:  # after the last conv + BN, before the residual add (timm's se slot)
        assert all(isinstance(b.se, gate) for b in blocks)
    if name == 'ela_resnet18':
        assert blocks[0].se.conv.kernel_size == (7,) and blocks[0].se.conv.groups == 64  # ELA-B
    if name == 'ela_resnet50':
        assert blocks[0].se.conv.kernel_size == (5,) and blocks[0].se.conv.groups == 256 // 8  # ELA-S


def test_gated_resnet_any_gate_and_bad_position():
    model = timm.create_model('cbam_resnet18', attn_layer='psa_p', attn_pos='mid', **zoo.reduced_args('cbam_resnet18'))
    assert isinstance(model.stages[0].blocks[0].aa, PolarizedSelfAttention)
    assert model(torch.randn(2, 3, 64, 80)).shape == (2, 1000)
    with pytest.raises(ValueError, match=r"attn_pos: expected one of \('last', 'mid'\), got 'first'"):
        timm.create_model('ela_resnet18', attn_pos='first')
