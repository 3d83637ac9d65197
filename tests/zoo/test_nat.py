"""NAT / DiNAT / DiNAT_s: the NA module against natten and a brute-force dense computation, official
parameter counts, the official checkpoint layout, dilation schedules, odd input sizes."""
import re
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F

import zoo.blocks as blocks
import zoo  # noqa: F401  (registers the models)
from zoo.blocks import MixerBlock
from zoo.blocks.neighborhood import NeighborhoodAttention2D

# Official totals (official model code, counted with its natten module: rpb on, no buffers).
NAT_PARAMS = {'mini': 19.984e6, 'tiny': 27.902e6, 'small': 50.743e6, 'base': 89.770e6}
NAT_DEPTHS_DIMS = {'mini': ((3, 4, 6, 5), 64), 'tiny': ((3, 4, 18, 5), 64),
                   'small': ((3, 4, 18, 5), 96), 'base': ((3, 4, 18, 5), 128)}
# official dinat.py: NAT's shapes; layer scale only in NAT-Small/Base and DiNAT-Base
NAT_LAYER_SCALE = {'nat_small', 'nat_base', 'dinat_base'}
DINAT_DILATIONS = {
    'mini': [[1, 8, 1], [1, 4, 1, 4], [1, 2, 1, 2, 1, 2], [1, 1, 1, 1, 1]],
    'tiny': [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5],
}
DINAT_DILATIONS['small'] = DINAT_DILATIONS['base'] = DINAT_DILATIONS['tiny']
DINAT_S_DILATIONS = {'tiny': [[1, 8], [1, 4], [1, 2] * 3, [1, 1]], 'small': [[1, 8], [1, 4], [1, 2] * 9, [1, 1]]}
DINAT_S_DILATIONS['base'] = DINAT_S_DILATIONS['small']
ALL_NAMES = [f'{f}_{s}' for f in ('nat', 'dinat') for s in NAT_PARAMS] + [f'dinat_s_{s}' for s in DINAT_S_DILATIONS]


def _meta_model(name: str, **kwargs):
    with torch.device('meta'):
        return timm.create_model(name, **kwargs)


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- registry


def test_registered_names_and_cfgs():
    assert sorted(timm.list_models(module='zoo_nat')) == sorted(ALL_NAMES)
    for name in ALL_NAMES:
        cfg = timm.models.get_pretrained_cfg(name)
        assert re.match(r'https://shi-labs\.com/projects/(nat|dinat)/checkpoints/', cfg.url), cfg.url
        assert cfg.url.rsplit('/', 1)[1] in (f'{name}.pth', f'{name}_in1k_224.pth'), cfg.url


# ---------------------------------------------------------------------------------------------- param counts


@pytest.mark.parametrize('size', list(NAT_PARAMS))
def test_param_counts_match_official(size):
    nat = _count(_meta_model(f'nat_{size}'))
    dinat = _count(_meta_model(f'dinat_{size}'))
    assert abs(nat - NAT_PARAMS[size]) < 500, nat  # official totals are given to 1e3
    # dilation adds no parameters; DiNAT-Small drops NAT-Small's layer scale (2 * dim per block)
    depths, dim = NAT_DEPTHS_DIMS[size]
    gammas = 2 * sum(d * dim * 2 ** i for i, d in enumerate(depths))
    has_ls = (f'nat_{size}' in NAT_LAYER_SCALE, f'dinat_{size}' in NAT_LAYER_SCALE)
    assert dinat == nat - gammas * (has_ls[0] - has_ls[1])


@pytest.mark.parametrize('size', list(DINAT_S_DILATIONS))
def test_dinat_s_param_counts_equal_swin(size):
    # DiNAT_s is Swin with NA: its (heads, 13, 13) rpb has the size of Swin's (169, heads) bias table,
    # so it has exactly Swin's parameter count (timm's Swin, counted independently).
    ours = _count(_meta_model(f'dinat_s_{size}'))
    swin = _count(_meta_model(f'swin_{size}_patch4_window7_224'))
    assert ours == swin
    assert abs(ours - {'tiny': 28e6, 'small': 50e6, 'base': 88e6}[size]) <= 0.5e6  # README (rounded): 28M / 50M / 88M


# ---------------------------------------------------------------------------------------------- structure


@pytest.mark.parametrize('name', ALL_NAMES)
def test_dilation_schedule_layer_scale_and_no_weight_decay(name):
    model = _meta_model(name)
    size = name.rsplit('_', 1)[1]
    if name.startswith('nat_'):
        depths = NAT_DEPTHS_DIMS[size][0]
        want = [[1] * d for d in depths]
    else:
        want = (DINAT_S_DILATIONS if name.startswith('dinat_s_') else DINAT_DILATIONS)[size]
    got = [[blk.attn.dilation for blk in stage.blocks] for stage in model.stages]
    assert got == want
    assert all(blk.attn.kernel_size == 7 and blk.attn.head_dim == 32 for s in model.stages for blk in s.blocks)
    has_ls = [blk.gamma1 is not None for s in model.stages for blk in s.blocks]
    assert all(has_ls) if name in NAT_LAYER_SCALE else not any(has_ls)
    nwd = model.no_weight_decay()
    rpbs = {n for n, _ in model.named_parameters() if n.endswith('.attn.rpb')}
    assert len(rpbs) == sum(len(s.blocks) for s in model.stages) and rpbs <= nwd
    assert [i['reduction'] for i in model.feature_info] == [4, 8, 16, 32]


# ---------------------------------------------------------------------------------------------- checkpoints


def _to_official(state: dict, swin_layout: bool) -> dict:
    """Our names -> the official release names (written independently of checkpoint_filter_fn)."""
    level = 'layers' if swin_layout else 'levels'
    out = {}
    for k, v in state.items():
        m = re.match(r'stages\.(\d+)\.downsample\.(.*)', k)
        if m:
            k = f'{level}.{int(m.group(1)) - 1}.downsample.{m.group(2)}'
        elif k.startswith('stages.'):
            k = level + k[len('stages'):]
        elif k.startswith('stem.'):
            k = 'patch_embed.' + k[len('stem.'):]
        elif k.startswith('head.fc.'):
            k = 'head.' + k[len('head.fc.'):]
        out[k] = v
    return out


# the registered layouts at a fraction of the width and depth (head dim 32 kept), so the test stays fast
SMALL = dict(embed_dim=32, num_heads=(1, 2, 4, 8), depths=(2, 2, 3, 2))
SMALL_DILATED = dict(SMALL, dilations=((1, 8), (1, 4), (1, 2, 1), (1, 1)))


@pytest.mark.parametrize('name,wrap', [('nat_small', None), ('dinat_s_tiny', 'model')])
def test_official_checkpoint_loads(name, wrap, tmp_path):
    cfg = SMALL_DILATED if name.startswith('dinat') else SMALL
    torch.manual_seed(0)
    src = timm.create_model(name, **cfg).eval()
    with torch.no_grad():  # make every parameter distinct so a wrong mapping cannot go unnoticed
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    official = _to_official(src.state_dict(), swin_layout=name.startswith('dinat_s'))
    if name.startswith('nat'):
        for k in ('patch_embed.proj.0.weight', 'patch_embed.proj.1.bias', 'patch_embed.norm.weight',
                  'levels.0.downsample.reduction.weight', 'levels.2.downsample.norm.bias',
                  'levels.3.blocks.1.attn.rpb', 'levels.1.blocks.0.attn.qkv.weight', 'levels.1.blocks.0.gamma2',
                  'levels.2.blocks.2.mlp.fc2.weight', 'norm.weight', 'head.weight'):
            assert k in official, k
        assert 'levels.3.downsample.reduction.weight' not in official
    else:
        for k in ('patch_embed.proj.weight', 'patch_embed.norm.bias', 'layers.0.downsample.reduction.weight',
                  'layers.0.downsample.norm.weight', 'layers.2.blocks.2.attn.rpb', 'head.bias'):
            assert k in official, k
    assert official['levels.3.blocks.0.attn.rpb' if name.startswith('nat') else 'layers.3.blocks.0.attn.rpb'
                    ].shape == (8, 13, 13)
    path = tmp_path / f'{name}_official.pth'
    torch.save({wrap: official} if wrap else official, path)

    torch.manual_seed(1)
    dst = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **cfg).eval()
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))
    # a different head size keeps the backbone and drops the classifier
    dst10 = timm.create_model(name, pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=str(path)),
                              **cfg)
    torch.testing.assert_close(dst10.stages[3].blocks[0].attn.rpb, src.stages[3].blocks[0].attn.rpb, rtol=0, atol=0)


def test_checkpoint_with_missing_keys_fails(tmp_path):
    model = _meta_model('nat_mini', **SMALL)
    official = _to_official({k: torch.zeros(v.shape) for k, v in model.state_dict().items()}, swin_layout=False)
    del official['levels.2.blocks.2.attn.rpb']
    path = tmp_path / 'broken.pth'
    torch.save(official, path)
    with pytest.raises(RuntimeError, match=r'stages\.2\.blocks\.2\.attn\.rpb'):
        timm.create_model('nat_mini', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **SMALL)


# ---------------------------------------------------------------------------------------------- NA module


def _axis_neighbours(length: int, k: int, d: int):
    """NATTEN's rule per axis: k consecutive positions of the query's dilation sub-grid, the window
    shifted (not cut) at the borders; returns per query [(key position, rpb index)]."""
    out = []
    for i in range(length):
        r, a = i % d, i // d
        n = len(range(r, length, d))
        start = min(max(a - k // 2, 0), n - k)
        out.append([(r + (start + t) * d, start + t - a + k - 1) for t in range(k)])
    return out


def _dense_na_module(mod: NeighborhoodAttention2D, x: torch.Tensor) -> torch.Tensor:
    """The module's forward written as full-matrix attention with an explicit NATTEN mask and bias."""
    B, H, W, C = x.shape
    k, d, nh, hd = mod.kernel_size, mod.dilation, mod.num_heads, mod.head_dim
    Hp, Wp = max(H, k * d), max(W, k * d)
    xp = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
    qkv = F.linear(xp, mod.qkv.weight, mod.qkv.bias).reshape(B, Hp * Wp, 3, nh, hd).permute(2, 0, 3, 1, 4)
    q, kk, v = qkv[0] * hd ** -0.5, qkv[1], qkv[2]
    rows, cols = _axis_neighbours(Hp, k, d), _axis_neighbours(Wp, k, d)
    qi, ki, bi, bj = [], [], [], []
    for i in range(Hp):
        for j in range(Wp):
            for kr, rr in rows[i]:
                for kc, rc in cols[j]:
                    qi.append(i * Wp + j)
                    ki.append(kr * Wp + kc)
                    bi.append(rr)
                    bj.append(rc)
    bias = torch.full((nh, Hp * Wp, Hp * Wp), float('-inf'))
    bias[:, qi, ki] = mod.rpb[:, bi, bj] if mod.rpb is not None else 0.
    attn = (q @ kk.transpose(-2, -1) + bias).softmax(-1)
    out = (attn @ v).transpose(1, 2).reshape(B, Hp, Wp, C)[:, :H, :W]
    return F.linear(out, mod.proj.weight, mod.proj.bias)


@pytest.mark.parametrize('H,W,k,d', [(13, 17, 5, 2), (9, 30, 3, 1), (14, 14, 7, 1), (12, 11, 3, 3),
                                     (5, 9, 3, 2), (3, 4, 7, 1)])
def test_na_module_with_bias_matches_dense(H, W, k, d):
    mod = NeighborhoodAttention2D(32, num_heads=2, kernel_size=k, dilation=d)
    with torch.no_grad():
        mod.rpb.normal_()  # large enough that a misplaced bias entry shows
    x = torch.randn(2, H, W, 32, requires_grad=True)
    out = mod(x)
    want = _dense_na_module(mod, x)
    assert out.shape == (2, H, W, 32)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, mod.rpb, mod.qkv.weight), g)
    grads_want = torch.autograd.grad(want, (x, mod.rpb, mod.qkv.weight), g)
    for a, b in zip(grads, grads_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_na_module_matches_natten():
    natten = pytest.importorskip('natten', reason='natten is the test oracle (pip install natten)')
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        # NAT-like: dim 64, 2 heads of 32 (natten's CPU backend needs a power-of-two head dim), k = 7
        for H, W, d in [(14, 14, 1), (17, 23, 2), (28, 15, 2)]:
            ref = natten.NeighborhoodAttention2D(64, 2, 7, dilation=d).eval()
            ours = NeighborhoodAttention2D(64, num_heads=2, kernel_size=7, dilation=d, rel_pos_bias=False).eval()
            ours.load_state_dict(ref.state_dict())
            x = torch.randn(2, H, W, 64)
            with torch.no_grad():
                torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
        # maps smaller than kernel * dilation: the official module zero-pads the input, then crops
        ref = natten.NeighborhoodAttention2D(64, 2, 7, dilation=2).eval()
        ours = NeighborhoodAttention2D(64, num_heads=2, kernel_size=7, dilation=2, rel_pos_bias=False).eval()
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(1, 9, 16, 64)
        with torch.no_grad():
            want = ref(F.pad(x, (0, 0, 0, 0, 0, 14 - 9)))[:, :9]
            torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-5)


def test_module_errors_and_registry():
    mod = blocks.create_mixer('neighborhood', 64, num_heads=2, kernel_size=5, dilation=2)
    assert isinstance(mod, NeighborhoodAttention2D)
    assert mod(torch.randn(1, 6, 7, 64)).shape == (1, 6, 7, 64)
    with pytest.raises(ValueError, match='kernel_size'):
        NeighborhoodAttention2D(64, 2, kernel_size=0)
    with pytest.raises(ValueError, match=r'stride: expected ints in \[1, kernel_size\], got 4'):
        NeighborhoodAttention2D(64, 2, kernel_size=3, stride=4)
    with pytest.raises(ValueError, match='rel_pos_bias: not defined with causal attention'):
        NeighborhoodAttention2D(64, 2, is_causal=(True, False))
    with pytest.raises(ValueError, match='dilation'):
        NeighborhoodAttention2D(64, 2, dilation=0)
    with pytest.raises(ValueError, match='num_heads'):
        NeighborhoodAttention2D(64, 3)
    with pytest.raises(ValueError, match=r'expected input \(B, H, W, 64\)'):
        mod(torch.randn(1, 64, 6, 7))
    drop = NeighborhoodAttention2D(64, 2, attn_drop=0.1)
    assert drop.eval()(torch.randn(1, 8, 8, 64)).shape == (1, 8, 8, 64)
    with pytest.raises(ValueError, match='attn_drop'):
        drop.train()(torch.randn(1, 8, 8, 64))


def test_block_layer_scale():
    blk = MixerBlock(32, 'neighborhood', dict(kernel_size=3), num_heads=1, mlp_ratio=2., layer_scale=1e-5)
    assert {n for n, _ in blk.named_parameters() if 'gamma' in n} == {'gamma1', 'gamma2'}
    x = torch.randn(1, 5, 6, 32)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), x, rtol=0, atol=1e-3)  # residual branches scaled by 1e-5
        blk.gamma1.fill_(1.)
        blk.gamma2.fill_(1.)
        y = x + blk.attn(blk.norm1(x))
        torch.testing.assert_close(blk(x), y + blk.mlp(blk.norm2(y)))


# ---------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize('name', ['dinat_mini', 'dinat_s_tiny'])
@pytest.mark.parametrize('size', [(200, 168), (33, 47)])
def test_any_input_size(name, size):
    model = timm.create_model(name, features_only=True).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, *size))
    for f, c, r in zip(feats, model.feature_info.channels(), model.feature_info.reduction()):
        assert f.shape == (1, c, -(-size[0] // r), -(-size[1] // r))
        assert torch.isfinite(f).all()
