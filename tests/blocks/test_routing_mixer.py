"""The BiFormer mixer: routed mode against an independent composition (qkv, dense oracle, LePE on V, crop,
projection) including the official auto-pad semantics at sizes that are not multiples of n_win; global mode
against plain multi-head attention with LePE on the input; the official scale quirk; argument errors. The
shared contract (any size, heads, batch independence, Triton = reference) is tests/blocks/test_mixers.py."""
import pytest
import torch
import torch.nn.functional as F

from zoo.blocks import MixerBlock, create_mixer
from zoo.kernels.routing.naive import routed_attention_naive


def _oracle_routed(m, x):
    """The official BiLevelRoutingAttention(auto_pad=True) forward, composed from independent parts."""
    B, H, W, C = x.shape
    n = m.n_win
    Hp, Wp = -(-H // n) * n, -(-W // n) * n
    xp = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))  # zeros at the bottom / right, before the projection
    q, k, v = m.qkv(xp).split([m.qk_dim, m.qk_dim, m.num_heads * m.head_dim], dim=-1)
    nh = m.num_heads
    out = routed_attention_naive(q.reshape(B, Hp, Wp, nh, -1), k.reshape(B, Hp, Wp, nh, -1),
                                 v.reshape(B, Hp, Wp, nh, -1), n, m.topk, scale=m.qk_dim ** -0.5)
    out = out.reshape(B, Hp, Wp, -1) + m.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    return m.proj(out[:, :H, :W])


@pytest.mark.parametrize('hw', [(14, 14), (9, 13), (3, 2)])
@pytest.mark.parametrize('kwargs', [dict(n_win=7, topk=4, head_dim=16), dict(n_win=3, topk=2, qk_dim=32, num_heads=4)])
def test_routed_mode_matches_official_composition(hw, kwargs):
    m = create_mixer('routing', 48, **kwargs).double().eval()
    x = torch.randn(2, *hw, 48, dtype=torch.float64)
    torch.testing.assert_close(m(x), _oracle_routed(m, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('topk', [-2, -1])
def test_global_mode_is_attention_with_lepe_on_input(topk):
    m = create_mixer('routing', 64, num_heads=8, qkv_bias=False, topk=topk).double().eval()
    assert m.qkv.bias is None and (m.lepe is None) == (topk == -1)
    assert m.scale == 8 ** -0.5  # per-head scale in the global stage (official AttentionLePE)
    x = torch.randn(2, 5, 6, 64, dtype=torch.float64)
    q, k, v = m.qkv(x).reshape(2, 5, 6, 3, 8, 8).unbind(3)
    att = torch.nn.functional.scaled_dot_product_attention(
        *(t.reshape(2, 30, 8, 8).transpose(1, 2) for t in (q, k, v))).transpose(1, 2).reshape(2, 5, 6, 64)
    if topk == -2:
        att = att + m.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(m(x), m.proj(att), rtol=1e-10, atol=1e-12)


def test_official_layout_and_scale_quirk():
    m = create_mixer('routing', 64, head_dim=32, n_win=7, topk=1)  # BiFormer-T stage 1
    assert (m.num_heads, m.head_dim, m.qk_dim) == (2, 32, 64)
    assert m.scale == 64 ** -0.5  # the full qk_dim, not the head dim: the released weights need it
    assert m.qkv.weight.shape == (3 * 64, 64) and m.lepe.weight.shape == (64, 1, 5, 5)
    assert m.lepe.groups == 64 and m.proj.weight.shape == (64, 64)
    wide = create_mixer('routing', 64, num_heads=2, qk_dim=96)  # official qk_dim != dim: q/k wider than v
    assert wide.qkv.weight.shape == (96 + 96 + 64, 64)
    assert wide(torch.randn(1, 7, 7, 64)).shape == (1, 7, 7, 64)


def test_in_the_block_with_padding_and_gradients():
    block = MixerBlock(32, 'routing', dict(n_win=7, topk=4), num_heads=2, pos_embed=3, norm_eps=1e-6, mlp_ratio=3)
    x = torch.randn(2, 10, 17, 32, requires_grad=True)
    block(x).square().mean().backward()
    assert x.grad is not None and all(p.grad is not None for p in block.parameters())


def test_argument_errors():
    with pytest.raises(ValueError, match=r'topk: expected 1 <= topk <= n_win\^2 = 4 routed regions .* got 5'):
        create_mixer('routing', 32, n_win=2, topk=5)
    with pytest.raises(ValueError, match=r'n_win: expected a positive int .*got 0'):
        create_mixer('routing', 32, n_win=0)
    with pytest.raises(ValueError, match=r'qk_dim: expected a positive multiple of num_heads=2, got 33'):
        create_mixer('routing', 32, num_heads=2, qk_dim=33)
    with pytest.raises(ValueError, match=r'qk_dim: global attention \(topk=-2\) .*expected 32 .*got 64'):
        create_mixer('routing', 32, num_heads=2, qk_dim=64, topk=-2)
    with pytest.raises(ValueError, match=r'side_dwconv: expected 0 or an odd positive kernel size, got 4'):
        create_mixer('routing', 32, side_dwconv=4)
    with pytest.raises(ValueError, match=r'expected input \(B, H, W, 32\), got \(1, 7, 7, 16\)'):
        create_mixer('routing', 32)(torch.randn(1, 7, 7, 16))
    m = create_mixer('routing', 32, attn_drop=0.1).train()
    with pytest.raises(ValueError, match='attn_drop: the routed attention op has no attention dropout'):
        m(torch.randn(1, 7, 7, 32))
