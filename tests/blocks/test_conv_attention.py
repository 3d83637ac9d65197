"""Conv-stage attention: the 'lka' mixer, the 'psa_p' / 'psa_s' / 'ela' gates against their formulas written out
here (explicit loops and sums, independent of the modules' code paths), the official PSA key layout, the paper's
ELA table, and the bad-input errors. The contract (any size, gradients, FX, ONNX, the hybrid backbone) is tested
for every registered mixer and gate by tests/blocks/test_mixers.py and tests/zoo/test_hybrid.py."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from zoo.blocks import MixerBlock, create_gate, create_mixer, list_gates, list_mixers
from zoo.blocks.conv_attention import ELA_VARIANTS, EfficientLocalAttention, PolarizedSelfAttention

OFFICIAL_PSA_KEYS = json.loads(
    (Path(__file__).parents[1] / 'zoo' / 'golden' / 'psa_official_keys_c64.json').read_text())


def _randomise(module: torch.nn.Module, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1. if p.dim() == 3 and p.shape[1:] == (1, 1) else 0.))


def test_registered():
    assert 'lka' in list_mixers()
    assert {'psa_p', 'psa_s', 'ela'} <= set(list_gates())


# ------------------------------------------------------------------------------------------------------------ LKA

def _lka_formula(x, m):
    """VAN's attention module on (B, H, W, C), NCHW convs spelled with F.conv2d and explicit padding."""
    u = x.permute(0, 3, 1, 2)
    C = u.shape[1]
    a = F.gelu(F.conv2d(u, m.proj_1.weight, m.proj_1.bias))
    s = m.spatial_gating_unit
    b = F.conv2d(F.pad(a, (2, 2, 2, 2)), s.conv0.weight, s.conv0.bias, groups=C)
    b = F.conv2d(F.pad(b, (9, 9, 9, 9)), s.conv_spatial.weight, s.conv_spatial.bias, dilation=3, groups=C)
    b = F.conv2d(b, s.conv1.weight, s.conv1.bias)
    out = F.conv2d(a * b, m.proj_2.weight, m.proj_2.bias) + u
    return out.permute(0, 2, 3, 1)


@pytest.mark.parametrize('hw', [(7, 9), (1, 1), (20, 3)])
def test_lka_matches_formula_any_size(hw):
    m = create_mixer('lka', 16, num_heads=1)
    _randomise(m)
    x = torch.randn(2, *hw, 16)
    torch.testing.assert_close(m(x), _lka_formula(x, m), rtol=1e-5, atol=1e-5)


def test_lka_official_structure_and_block():
    m = create_mixer('lka', 32)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        'proj_1.weight': (32, 32, 1, 1), 'proj_1.bias': (32,),
        'spatial_gating_unit.conv0.weight': (32, 1, 5, 5), 'spatial_gating_unit.conv0.bias': (32,),
        'spatial_gating_unit.conv_spatial.weight': (32, 1, 7, 7), 'spatial_gating_unit.conv_spatial.bias': (32,),
        'spatial_gating_unit.conv1.weight': (32, 32, 1, 1), 'spatial_gating_unit.conv1.bias': (32,),
        'proj_2.weight': (32, 32, 1, 1), 'proj_2.bias': (32,),
    }
    assert m.spatial_gating_unit.conv_spatial.dilation == (3, 3)
    block = MixerBlock(32, 'lka', num_heads=1, norm_layer='batchnorm', mlp_layer='dwconv_mlp', layer_scale=1e-2)
    assert isinstance(block.norm1, torch.nn.BatchNorm2d) and block.norm1.eps == 1e-5
    x = torch.randn(2, 5, 6, 32)
    block.eval()
    assert block(x).shape == x.shape
    with pytest.raises(ValueError, match="norm_layer: expected one of \\['batchnorm', 'identity', 'layernorm'\\] or a class, got 'groupnorm'"):
        MixerBlock(32, 'lka', norm_layer='groupnorm')


def test_lka_scripts():
    m = create_mixer('lka', 16, num_heads=1).eval()
    x = torch.randn(1, 9, 11, 16)
    torch.testing.assert_close(torch.jit.script(m)(x), m(x))


# ------------------------------------------------------------------------------------------------------------ PSA

def _psa_formula(x, m, mode, form):
    """PSA from the definitions, per image, with explicit sums over pixels / channels."""
    B, C, H, W = x.shape
    outs = []
    for b in range(B):
        def ch_mask(xb):
            flat = xb.reshape(C, H * W)
            q = m.conv_q_right.weight.reshape(1, C) @ flat                          # (1, N)
            v = m.conv_v_right.weight.reshape(C // 2, C) @ flat                     # (C/2, N)
            w = torch.exp(q - q.max()) / torch.exp(q - q.max()).sum()
            z = (v * w).sum(1)                                                      # (C/2,)
            if form == 'paper':
                y = m.conv_up[0].weight.reshape(C, C // 2) @ z
                ln = m.conv_up[1]
                y = (y - y.mean()) / torch.sqrt(y.var(unbiased=False) + ln.eps) * ln.weight.flatten() + ln.bias.flatten()
            elif mode == 'p':
                y = m.conv_up.weight.reshape(C, C // 2) @ z
            else:
                c0, ln, c3 = m.conv_up[0], m.conv_up[1], m.conv_up[3]
                h = c0.weight.reshape(-1, C // 2) @ z + c0.bias
                h = (h - h.mean()) / torch.sqrt(h.var(unbiased=False) + ln.eps) * ln.weight.flatten() + ln.bias.flatten()
                y = c3.weight.reshape(C, -1) @ torch.relu(h) + c3.bias
            return torch.sigmoid(y).reshape(C, 1, 1)

        def sp_mask(xb):
            flat = xb.reshape(C, H * W)
            g = (m.conv_q_left.weight.reshape(C // 2, C) @ flat).mean(1)           # (C/2,)
            theta = m.conv_v_left.weight.reshape(C // 2, C) @ flat                 # (C/2, N)
            if form == 'paper':
                s = (torch.softmax(g, 0)[:, None] * theta).sum(0)
            elif mode == 'p':
                s = torch.softmax((g[:, None] * theta).sum(0), 0)
            else:
                s = (g[:, None] * torch.softmax(theta, 1)).sum(0)
            return torch.sigmoid(s).reshape(1, H, W)

        xb = x[b]
        if mode == 'p':
            outs.append(xb * ch_mask(xb) + xb * sp_mask(xb))
        else:
            y = xb * ch_mask(xb)
            outs.append(y * sp_mask(y))
    return torch.stack(outs)


@pytest.mark.parametrize('mode', ['p', 's'])
@pytest.mark.parametrize('form', ['official', 'paper'])
def test_psa_matches_formula(mode, form):
    m = create_gate(f'psa_{mode}', 32, form=form)
    _randomise(m)
    x = torch.randn(2, 32, 7, 10)
    torch.testing.assert_close(m(x), _psa_formula(x, m, mode, form), rtol=1e-5, atol=1e-5)


def test_psa_forms_differ():
    x = torch.randn(2, 32, 6, 5)
    for mode in 'ps':
        official = create_gate(f'psa_{mode}', 32)
        paper = create_gate(f'psa_{mode}', 32, form='paper')
        _randomise(official)
        _randomise(paper)
        paper.conv_q_left.load_state_dict(official.conv_q_left.state_dict())
        paper.conv_v_left.load_state_dict(official.conv_v_left.state_dict())
        assert (official.spatial_mask(x) - paper.spatial_mask(x)).abs().max() > 1e-3


@pytest.mark.parametrize('cls', ['PSA_p', 'PSA_s'])
def test_psa_official_state_dict_layout(cls):
    # recorded from DeLightCMU/PSA semantic-segmentation/network/PSA.py, PSA_x(64, 64)
    ours = create_gate(f'psa_{cls[-1]}', 64)
    assert [[k, list(v.shape)] for k, v in ours.state_dict().items()] == OFFICIAL_PSA_KEYS[cls]


def test_psa_param_counts():
    # the official modules at C = 256: PSA_p 2C^2 + C, PSA_s 1.6875 C^2 + 2.375 C
    assert sum(p.numel() for p in create_gate('psa_p', 256).parameters()) == 131_328
    assert sum(p.numel() for p in create_gate('psa_s', 256).parameters()) == 111_200


def test_psa_p_spatial_gate_range():
    # official PSA_p: softmax over HW then sigmoid, so the gate lies in (0.5, sigmoid(1)]
    m = create_gate('psa_p', 32)
    _randomise(m)
    mask = m.spatial_mask(torch.randn(2, 32, 9, 9))
    assert mask.min() > 0.5 and mask.max() <= torch.sigmoid(torch.tensor(1.)) + 1e-6


def test_psa_bad_input():
    with pytest.raises(ValueError, match=r"mode: expected 'p' \(parallel\) or 's' \(sequential\), got 'q'"):
        PolarizedSelfAttention(64, mode='q')
    with pytest.raises(ValueError, match="form: expected one of"):
        create_gate('psa_s', 64, form='official_v2')
    with pytest.raises(ValueError, match='channels: expected an even int >= 8'):
        create_gate('psa_s', 6)
    with pytest.raises(ValueError, match=r'expected input \(B, 64, H, W\)'):
        create_gate('psa_p', 64)(torch.randn(1, 32, 4, 4))


# ------------------------------------------------------------------------------------------------------------ ELA

def _ela_formula(x, conv_w, groups, gn):
    """ELA from its definition: strip means, a grouped 1-D conv spelled as sums, GroupNorm by hand."""
    B, C, H, W = x.shape
    k = conv_w.shape[-1]
    per = C // groups

    def conv1d(z):  # (C, L) -> (C, L), zero padding k // 2, no bias
        L = z.shape[1]
        zp = F.pad(z, (k // 2, k // 2))
        out = torch.zeros(C, L)
        for c in range(C):
            g = c // per
            for i in range(per):
                for t in range(k):
                    out[c] += conv_w[c, i, t] * zp[g * per + i, t:t + L]
        return out

    def group_norm(y):
        G = gn.num_groups
        y = y.reshape(G, -1)
        y = (y - y.mean(1, keepdim=True)) / torch.sqrt(y.var(1, unbiased=False, keepdim=True) + gn.eps)
        return y.reshape(C, -1) * gn.weight[:, None] + gn.bias[:, None]

    outs = []
    for b in range(B):
        a_h = torch.sigmoid(group_norm(conv1d(x[b].mean(2))))   # (C, H)
        a_w = torch.sigmoid(group_norm(conv1d(x[b].mean(1))))   # (C, W)
        outs.append(x[b] * a_h[:, :, None] * a_w[:, None, :])
    return torch.stack(outs)


@pytest.mark.parametrize('variant', ['T', 'B', 'S', 'L'])
def test_ela_matches_formula(variant):
    m = create_gate('ela', 32, variant=variant)
    _randomise(m, std=0.5)
    x = torch.randn(2, 32, 6, 9)  # non-square: the two axes' gates must not be swapped
    k, per, gn = ELA_VARIANTS[variant]
    assert m.conv.kernel_size == (k,) and m.conv.groups == 32 // per and m.gn.num_groups == gn
    with torch.no_grad():
        want = _ela_formula(x, m.conv.weight, m.conv.groups, m.gn)
        torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)


def test_ela_paper_table_and_param_formula():
    assert ELA_VARIANTS == {'T': (5, 1, 32), 'B': (7, 1, 16), 'S': (5, 8, 16), 'L': (7, 8, 16)}
    for variant, (k, per, _) in ELA_VARIANTS.items():
        C = 256
        m = create_gate('ela', C, variant=variant)
        assert sum(p.numel() for p in m.parameters()) == C * k * per + 2 * C  # C k (C / groups) + GN affine
        assert m.conv.bias is None


def test_ela_bad_input():
    with pytest.raises(ValueError, match=r'channels: expected a multiple of the GroupNorm groups \(16, ELA-B\), got 40'):
        create_gate('ela', 40)
    with pytest.raises(ValueError, match=r'channels: expected a multiple of the GroupNorm groups \(32, ELA-T\), got 48'):
        EfficientLocalAttention(48, 'T')
    with pytest.raises(ValueError, match=r'kernel_size: expected one of \(5, 7\) \(the kernel sizes of the ELA paper\), '
                                         r'got 3'):
        create_gate('ela', 64, kernel_size=3)
    with pytest.raises(ValueError, match="variant: expected one of \\['B', 'L', 'S', 'T'\\]"):
        create_gate('ela', 64, variant='XL')
    with pytest.raises(ValueError, match=r'expected input \(B, 64, H, W\)'):
        create_gate('ela', 64)(torch.randn(1, 4, 4, 64))


def test_batchnorm_norm_equals_batchnorm2d_in_train_and_eval():
    from zoo.blocks.block import BatchNormChannelsLast
    ours, ref = BatchNormChannelsLast(8), torch.nn.BatchNorm2d(8)
    _randomise(ref)
    ours.load_state_dict(ref.state_dict())
    for _ in range(2):  # training: batch statistics, running statistics and the batch counter updated alike
        x = torch.randn(3, 5, 7, 8) * 2 + 1
        torch.testing.assert_close(ours(x), ref(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v)
    assert int(ours.num_batches_tracked) == 2
    ours.eval(), ref.eval()
    x = torch.randn(2, 4, 3, 8)
    torch.testing.assert_close(ours(x), ref(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
