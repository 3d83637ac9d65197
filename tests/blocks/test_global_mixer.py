"""The 'global' mixer (softmax attention over the whole map; MALA's RoPE, LePE and gate) and the 'window' mixer
without bias (L2ViT's LWA) against brute-force statements written here (explicit N x N attention, explicit pair
rotations, fp64, forward and gradients), MALA's RoPE layout, the export path, any size, and clear errors."""
import math

import pytest
import torch
import torch.nn.functional as F

import zoo.blocks.attention as attention
from zoo.blocks import create_mixer
from zoo.blocks.attention import GlobalAttention, apply_rope, rope_2d
from zoo.blocks.window import WindowAttention


def _rotate(x: torch.Tensor, H: int, W: int, temperature: float = 10000.) -> torch.Tensor:
    """MALA's 2-D RoPE, one channel pair at a time: x (..., H * W, d), tokens row-major. Pair p of the first half
    turns by row * theta_p, pair p of the second half by col * theta_p, theta_p = temperature ** (-p / (d/4 - 1))."""
    d = x.shape[-1]
    n = d // 4
    out = x.clone()
    for t in range(H * W):
        r, c = divmod(t, W)
        for p in range(d // 2):
            theta = temperature ** (-(p % n) / (n - 1)) if n > 1 else 1.
            a = (r if p < n else c) * theta
            x0, x1 = x[..., t, 2 * p], x[..., t, 2 * p + 1]
            out[..., t, 2 * p] = x0 * math.cos(a) - x1 * math.sin(a)
            out[..., t, 2 * p + 1] = x1 * math.cos(a) + x0 * math.sin(a)
    return out


@pytest.mark.parametrize('hw, d', [((3, 5), 16), ((4, 2), 8), ((2, 3), 4)])
def test_rope_is_malas_pair_rotation(hw, d):
    x = torch.randn(2, 3, hw[0] * hw[1], d, dtype=torch.float64)
    sin, cos = rope_2d(*hw, d)
    assert sin.shape == cos.shape == (hw[0] * hw[1], d)
    torch.testing.assert_close(apply_rope(x, sin, cos), _rotate(x, *hw), rtol=1e-6, atol=1e-6)


def _brute_force(m: GlobalAttention, x: torch.Tensor) -> torch.Tensor:
    """out = proj(gate * (A v + lepe(v))) with A = softmax(s q k^T) written as an explicit N x N matrix per head."""
    B, H, W, C = x.shape
    nh, d = m.num_heads, m.head_dim
    lin = m.qkvo if m.gate else m.qkv
    parts = F.linear(x, lin.weight, lin.bias).reshape(B, H * W, -1, nh, d).permute(2, 0, 3, 1, 4)
    q, k, v = parts[0], parts[1], parts[2]
    if m.rope:
        q, k = _rotate(q, H, W), _rotate(k, H, W)
    logits = torch.einsum('bhid,bhjd->bhij', q, k) * d ** -0.5
    A = logits.exp() / logits.exp().sum(-1, keepdim=True)
    out = torch.einsum('bhij,bhjd->bhid', A, v).permute(0, 2, 1, 3).reshape(B, H, W, nh * d)
    if m.lepe is not None:
        vm = v.permute(0, 2, 1, 3).reshape(B, H, W, nh * d).permute(0, 3, 1, 2)
        k_ = m.lepe.kernel_size[0]
        out = out + F.conv2d(vm, m.lepe.weight, m.lepe.bias, padding=k_ // 2, groups=nh * d).permute(0, 2, 3, 1)
    if m.gate:
        out = out * parts[3].permute(0, 2, 1, 3).reshape(B, H, W, nh * d)
    return F.linear(out, m.proj.weight, m.proj.bias)


@pytest.mark.parametrize('kwargs', [{}, dict(rope=True), dict(rope=True, lepe=5, gate=True), dict(lepe=3)])
@pytest.mark.parametrize('hw', [(4, 5), (1, 3)])
def test_global_is_the_brute_force_attention(kwargs, hw, assert_close_to_scale):
    torch.manual_seed(0)
    m = create_mixer('global', 32, num_heads=2, **kwargs).double()
    x = torch.randn(2, *hw, 32, dtype=torch.float64, requires_grad=True)
    out = m(x)
    want = _brute_force(m, x)
    assert_close_to_scale(out, want)
    g = torch.randn_like(out)
    params = [x] + list(m.parameters())
    got = torch.autograd.grad(out, params, g)
    ref = torch.autograd.grad(want, params, g)
    for (name, _), a, b in zip([('x', None)] + list(m.named_parameters()), got, ref):
        assert_close_to_scale(a, b, msg=name)


def test_export_path_is_the_same_attention(monkeypatch, assert_close_to_scale):
    """Under export the mixer takes plain matmul + softmax instead of SDPA: the same numbers."""
    m = create_mixer('global', 64, num_heads=2, rope=True, lepe=5, gate=True).eval()
    x = torch.randn(2, 6, 7, 64)
    with torch.no_grad():
        want = m(x)
        monkeypatch.setattr(attention, 'is_exporting', lambda: True)
        assert_close_to_scale(m(x), want)


def test_malas_configuration():
    m = create_mixer('global', 256, num_heads=4, rope=True, lepe=5, gate=True)
    assert isinstance(m, GlobalAttention) and m.head_dim == 64
    assert sorted(n for n, _ in m.named_parameters()) == [
        'lepe.bias', 'lepe.weight', 'proj.bias', 'proj.weight', 'qkvo.bias', 'qkvo.weight']
    assert m.qkvo.weight.shape == (1024, 256) and m.lepe.weight.shape == (256, 1, 5, 5)
    plain = create_mixer('global', 64)
    assert sorted(n for n, _ in plain.named_parameters()) == ['proj.bias', 'proj.weight', 'qkv.bias', 'qkv.weight']


def _windows_brute_force(m: WindowAttention, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention among the tokens of each M x M window (windows tile the map from the top left; a partial
    window at the bottom / right holds only real tokens), no bias."""
    B, H, W, C = x.shape
    nh, d = m.num_heads, m.head_dim
    q, k, v = F.linear(x, m.qkv.weight, m.qkv.bias).reshape(B, H, W, 3, nh, d).unbind(3)
    rows = torch.arange(H).repeat_interleave(W) // m.window_size[0]
    cols = torch.arange(W).repeat(H) // m.window_size[1]
    same = (rows[:, None] == rows[None]) & (cols[:, None] == cols[None])
    q, k, v = (t.reshape(B, H * W, nh, d).transpose(1, 2) for t in (q, k, v))
    logits = (q @ k.transpose(-2, -1)) * d ** -0.5
    logits = logits.masked_fill(~same, float('-inf'))
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, H, W, nh * d)
    return F.linear(out, m.proj.weight, m.proj.bias)


@pytest.mark.parametrize('hw', [(6, 9), (7, 5), (2, 2)])
def test_window_without_bias_is_plain_window_softmax(hw, assert_close_to_scale):
    torch.manual_seed(0)
    m = create_mixer('window', 32, num_heads=2, window_size=3, rel_pos_bias=False).double()
    assert sorted(n for n, _ in m.named_parameters()) == ['proj.bias', 'proj.weight', 'qkv.bias', 'qkv.weight']
    x = torch.randn(2, *hw, 32, dtype=torch.float64, requires_grad=True)
    out = m(x)
    want = _windows_brute_force(m, x)
    assert_close_to_scale(out, want)
    g = torch.randn_like(out)
    params = [x] + list(m.parameters())
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(want, params, g)):
        assert_close_to_scale(a, b)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r'rope: 2-D RoPE needs head_dim divisible by 4.*got head_dim=6'):
        create_mixer('global', 12, num_heads=2, rope=True)
    with pytest.raises(ValueError, match='lepe: expected 0 or an odd positive kernel size, got 4'):
        create_mixer('global', 32, lepe=4)
    with pytest.raises(ValueError, match='num_heads: expected a divisor of dim=32'):
        create_mixer('global', 32, num_heads=5)
    with pytest.raises(ValueError, match=r'attn_drop: expected a rate in \[0, 1\)'):
        create_mixer('global', 32, attn_drop=1.)
    with pytest.raises(ValueError, match=r'GlobalAttention: expected input \(B, H, W, 32\), got \(1, 4, 4, 16\)'):
        create_mixer('global', 32)(torch.randn(1, 4, 4, 16))
