"""Agent-Swin T/S/B: official parameter counts and block layouts, the official checkpoint layout (recorded from
the official model definitions in golden/agent_swin_official_layout.json) loading through the key map, the agent
mixer against the official classification formula, tables resized for other sizes, ONNX, bad arguments.

Logit parity with the official model itself needs its code, which is not part of this project; the figures are
in the README (Agent-Swin section)."""
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import zoo
from zoo.blocks import create_mixer
from zoo.blocks.agent import AgentAttention
from zoo.blocks.window import WindowAttention

NAMES = ['agent_swin_tiny', 'agent_swin_small', 'agent_swin_base']
# counted from the official AgentSwinTransformer definitions with the official configs (cfgs/agent_swin_*.yaml)
OFFICIAL_PARAMS = {'agent_swin_tiny': 28_902_964, 'agent_swin_small': 49_666_684, 'agent_swin_base': 88_095_096}
OFFICIAL_LAYOUT = json.loads((Path(__file__).parent / 'golden' / 'agent_swin_official_layout.json').read_text())
TYPES = {'agent_swin_tiny': ('AA', 'AA', 'A' * 6, 'BB'), 'agent_swin_small': ('AA', 'AA', 'B' * 18, 'BB'),
         'agent_swin_base': ('AA', 'AA', 'AA' + 'B' * 16, 'BB')}


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registered_with_release_notes():
    assert sorted(timm.list_models(module='zoo_agent_swin')) == sorted(NAMES)
    for name in NAMES:
        cfg = timm.models.get_pretrained_cfg(name)
        assert not cfg.url and 'cloud.tsinghua.edu.cn/f/' in cfg.notes[0]
        with pytest.raises(RuntimeError, match='no pretrained weights to download.*pretrained_cfg_overlay'):
            timm.create_model(name, pretrained=True)


@pytest.mark.parametrize('name', NAMES)
def test_param_counts_match_official(name):
    with torch.device('meta'):
        model = timm.create_model(name)
    assert _count(model) == OFFICIAL_PARAMS[name]


@pytest.mark.parametrize('name', NAMES)
def test_block_layout(name):
    with torch.device('meta'):
        model = timm.create_model(name)
    for i, (stage, types) in enumerate(zip(model.stages, TYPES[name])):
        size = 56 // 2 ** i
        got = ''.join('A' if isinstance(b.attn, AgentAttention) else 'B' for b in stage.blocks)
        assert got == types, (i, got)
        for j, block in enumerate(stage.blocks):
            attn = block.attn
            if isinstance(attn, AgentAttention):  # global, tables at the stage's size for 224 px
                assert attn.agent_num == (9, 16, 49, 49)[i] and attn.bias_size == (size, size)
            else:  # Swin's window 7 (clamped), shifted in odd blocks while the map is larger than the window
                assert isinstance(attn, WindowAttention) and attn.window_size == (min(7, size),) * 2
                assert attn.shift_size == ((3, 3) if j % 2 and size > 7 else (0, 0))
    other = timm.create_model('agent_swin_tiny', img_size=288, **zoo.reduced_args('agent_swin_tiny'))
    assert [s.blocks[0].attn.bias_size for s in other.stages[:3]] == [(72, 72), (36, 36), (18, 18)]


@pytest.mark.parametrize('tag, size, window, params', [('agent_swin_small.in1k_288', 288, 9, 49_707_964),
                                                         ('agent_swin_base.in1k_384', 384, 12, 88_305_016)])
def test_fine_tuned_release_tags_build_their_layout(tag, size, window, params):
    """The 288 / 384 releases: tables at the stage sizes of that input, Swin windows max(7, size // 32) as in the
    official configs (WINDOW_SIZE 72 / 96); parameter counts of the official definitions at those sizes."""
    with torch.device('meta'):
        model = timm.create_model(tag)
    assert _count(model) == params and model.pretrained_cfg['input_size'] == (3, size, size)
    assert model.stages[0].blocks[0].attn.bias_size == (size // 4, size // 4)
    assert model.stages[3].blocks[0].attn.window_size == (window, window)
    assert model.stages[2].blocks[-1].attn.shift_size == (window // 2,) * 2


@pytest.fixture
def official_file(official_checkpoint, tmp_path):
    return lambda name: official_checkpoint(OFFICIAL_LAYOUT[name], tmp_path / f'{name}_official.pth')


@pytest.mark.parametrize('name', ['agent_swin_tiny', 'agent_swin_base'])
def test_official_checkpoint_layout_loads(name, official_file):
    state, path = official_file(name)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    ours = model.state_dict()
    buffers = [k for k in state if k.endswith(('relative_position_index', 'attn_mask'))]
    assert buffers and len(ours) == len(state) - len(buffers)  # everything else loaded, one to one
    pairs = {
        'patch_embed.proj.weight': 'stem.conv.weight', 'patch_embed.norm.bias': 'stem.norm.bias',
        'layers.0.downsample.reduction.weight': 'stages.1.downsample.reduction.weight',
        'layers.2.downsample.norm.weight': 'stages.3.downsample.norm.weight',
        'layers.0.blocks.1.attn.wa_bias': 'stages.0.blocks.1.attn.wa_bias',
        'layers.2.blocks.0.attn.an_bias': 'stages.2.blocks.0.attn.an_bias',
        'layers.2.blocks.1.attn.dwc.weight': 'stages.2.blocks.1.attn.dwc.weight',
        'layers.3.blocks.1.attn.relative_position_bias_table': 'stages.3.blocks.1.attn.relative_position_bias_table',
        'norm.weight': 'norm.weight', 'head.weight': 'head.fc.weight', 'head.bias': 'head.fc.bias',
    }
    for theirs, own in pairs.items():
        torch.testing.assert_close(ours[own], state[theirs], rtol=0, atol=0, msg=theirs)


def test_file_for_224_loads_into_another_size(official_file):
    """Row / column tables are resized (linearly, as the official detection code resizes them) to img_size."""
    state, path = official_file('agent_swin_tiny')
    model = timm.create_model('agent_swin_tiny', img_size=288, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)))
    got = model.stages[0].blocks[0].attn.ha_bias  # official (1, heads, rows, 1, agents)
    want = F.interpolate(state['layers.0.blocks.0.attn.ha_bias'][0, :, :, 0].transpose(1, 2), size=72,
                         mode='linear', align_corners=False).transpose(1, 2)[None, :, :, None]
    assert got.shape == (1, 3, 72, 1, 9)
    torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-6)


def _official_formula(m: AgentAttention, x: torch.Tensor) -> torch.Tensor:
    """The official classification forward (square map of the tables' size), restated with plain ops."""
    b, h, w, c = x.shape
    n, nh, a = h * w, m.num_heads, m.agent_num
    q, k, v = m.qkv(x.reshape(b, n, c)).reshape(b, n, 3, c).permute(2, 0, 1, 3)
    agents = F.adaptive_avg_pool2d(q.reshape(b, h, w, c).permute(0, 3, 1, 2), m.agent_grid)
    agents = agents.reshape(b, c, -1).permute(0, 2, 1).reshape(b, a, nh, -1).permute(0, 2, 1, 3)
    q, k, v = (t.reshape(b, n, nh, -1).permute(0, 2, 1, 3) for t in (q, k, v))
    b1 = F.interpolate(m.an_bias, size=(h, w), mode='bilinear').reshape(1, nh, a, -1).repeat(b, 1, 1, 1)
    b1 = b1 + (m.ah_bias + m.aw_bias).reshape(1, nh, a, -1).repeat(b, 1, 1, 1)
    agent_v = torch.softmax(agents * m.scale @ k.transpose(-2, -1) + b1, dim=-1) @ v
    b2 = F.interpolate(m.na_bias, size=(h, w), mode='bilinear').reshape(1, nh, a, -1).permute(0, 1, 3, 2)
    b2 = b2.repeat(b, 1, 1, 1) + (m.ha_bias + m.wa_bias).reshape(1, nh, -1, a).repeat(b, 1, 1, 1)
    out = (torch.softmax(q * m.scale @ agents.transpose(-2, -1) + b2, dim=-1) @ agent_v).transpose(1, 2)
    out = out.reshape(b, n, c) + m.dwc(v.transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2)).permute(
        0, 2, 3, 1).reshape(b, n, c)
    return m.proj(out).reshape(b, h, w, c)


@pytest.mark.parametrize('agents, size', [(9, 12), (16, 8), (49, 14)])
def test_mixer_is_the_official_formula(agents, size):
    torch.manual_seed(0)
    m = create_mixer('agent', 48, num_heads=3, agent_num=agents, bias_size=size).eval()
    with torch.no_grad():
        for p in (m.an_bias, m.na_bias, m.ah_bias, m.aw_bias, m.ha_bias, m.wa_bias):
            p.normal_()  # O(1) biases, so a transposed table shows
        x = torch.randn(2, size, size, 48)
        torch.testing.assert_close(m(x), _official_formula(m, x), rtol=1e-5, atol=1e-5)


def test_full_model_any_size():
    model = timm.create_model('agent_swin_tiny', features_only=True).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 97, 131))
    assert [tuple(f.shape[-2:]) for f in feats] == [(25, 33), (13, 17), (7, 9), (4, 5)]
    assert all(torch.isfinite(f).all() for f in feats)


@pytest.mark.parametrize('attn_type', ['AAAB', 'AAAA'])
def test_dynamic_onnx(attn_type, tmp_path):
    """One export (legacy exporter, dynamic H x W) runs at other sizes, non-square and with maps smaller than the
    agent grids (64 px: 4 x 4 map, 7 x 7 agents in stage 3); the dynamo exporter: tests/kernels/test_agent_op.py."""
    from zoo.weights.onnx import export_onnx
    model = timm.create_model('agent_swin_tiny', attn_type=attn_type, **zoo.reduced_args('agent_swin_tiny')).eval()
    report = export_onnx(model, tmp_path / 'a.onnx', img_size=(224, 224), dynamic=True, exporter='legacy',
                         check_sizes=[(97, 131), (64, 64)], atol=1e-4)
    # the export size, export_onnx's smaller and larger sizes (other_sizes), then check_sizes
    assert report['max_abs_err'] <= 1e-4 and len(report['checks']) == 5, report


def test_bad_arguments():
    small = zoo.reduced_args('agent_swin_tiny')
    with pytest.raises(ValueError, match='attn_type: expected'):
        timm.create_model('agent_swin_tiny', attn_type='AAXB', **small)
    with pytest.raises(ValueError, match='attn_type: expected'):
        timm.create_model('agent_swin_tiny', attn_type='AAMB', **small)
    with pytest.raises(ValueError, match='agent_num: expected one count per stage'):
        timm.create_model('agent_swin_tiny', agent_num=(9, 16, 49), **small)
    with pytest.raises(ValueError, match='agent_num: expected a perfect square'):
        timm.create_model('agent_swin_tiny', agent_num=(9, 15, 49, 49), **small)
    with pytest.raises(ValueError, match=r'agent_num: 256 agents \(16 x 16\) exceed the tokens of the 14 x 14 map'):
        timm.create_model('agent_swin_tiny', agent_num=(9, 16, 256, 49), **small)
    with pytest.raises(ValueError, match='the mixers follow attn_type and agent_num'):
        timm.create_model('agent_swin_tiny', mixer='window', **small)
    with pytest.raises(ValueError, match='num_heads: expected a divisor of dim=96'):
        create_mixer('agent', 96, num_heads=5)
    with pytest.raises(ValueError, match='agent_num: expected a perfect square'):
        create_mixer('agent', 96, agent_num=0)
    mixer = create_mixer('agent', 96, num_heads=3)
    with pytest.raises(ValueError, match=r'AgentAttention: expected input \(B, H, W, 96\), got \(1, 7, 7, 64\)'):
        mixer(torch.randn(1, 7, 7, 64))
