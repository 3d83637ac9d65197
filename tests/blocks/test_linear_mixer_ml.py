"""The 'linear' mixer's 'mala' and 'l2vit' variants against brute-force statements of the official math written here
(an explicit N x N weight matrix per head, fp64, forward and the gradients of the input and of every parameter), the
mixer contract for both, half precision under autocast with large activations, and clear errors."""
import math

import pytest
import torch
import torch.nn.functional as F

from zoo.blocks import create_mixer
from zoo.blocks.linear import LinearAttention, list_variants

VARIANTS = ['mala', 'l2vit']


def _heads(t: torch.Tensor, nh: int) -> torch.Tensor:
    """(B, H, W, nh * d) -> (B, nh, N, d)."""
    B, H, W, C = t.shape
    return t.reshape(B, H * W, nh, C // nh).permute(0, 2, 1, 3)


def _unheads(t: torch.Tensor, H: int, W: int) -> torch.Tensor:
    B, nh, N, d = t.shape
    return t.permute(0, 2, 1, 3).reshape(B, H, W, nh * d)


def _rope(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """MALA's `theta_shift` as complex rotations: channel pair p is the complex number x[2p] + i x[2p + 1], turned by
    row * theta_p (first d/4 pairs) or col * theta_p (last d/4), theta_p = 10000 ** -(p / (d/4 - 1))."""
    d = x.shape[-1]
    n = d // 4
    theta = 10000. ** -(torch.arange(n, dtype=torch.float64) / (n - 1))
    rows = torch.arange(H, dtype=torch.float64).repeat_interleave(W)
    cols = torch.arange(W, dtype=torch.float64).repeat(H)
    angle = torch.cat([rows[:, None] * theta, cols[:, None] * theta], dim=1)  # (N, d / 2)
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], d // 2, 2).contiguous()) * torch.polar(
        torch.ones_like(angle), angle)
    return torch.view_as_real(z).reshape(x.shape)


def _mala(m: LinearAttention, x: torch.Tensor) -> torch.Tensor:
    """Official AddLinearAttention: phi = elu + 1; z_i = s q_i . mean_j k_j (before RoPE); with q', k' after RoPE,
    A[i, j] = s (q'_i . k'_j) / N (1 + 1 / (z_i + 1e-6)) - z_i / N; out = proj(o * (A v + lepe(v)))."""
    B, H, W, _ = x.shape
    N, nh, s = H * W, m.num_heads, m.head_dim ** -0.5
    q, k, v, o = F.linear(x, m.qkvo.weight, m.qkvo.bias).chunk(4, dim=-1)
    q, k = (F.elu(_heads(t, nh)) + 1 for t in (q, k))
    z = s * (q * k.mean(dim=2, keepdim=True)).sum(-1, keepdim=True)  # (B, nh, N, 1)
    qr, kr = _rope(q, H, W), _rope(k, H, W)
    A = s * (qr @ kr.transpose(-2, -1)) / N * (1 + 1 / (z + 1e-6)) - z / N
    out = _unheads(A @ _heads(v, nh), H, W)
    lepe = F.conv2d(v.permute(0, 3, 1, 2), m.lepe.weight, m.lepe.bias, padding=2, groups=m.attn_dim)
    return F.linear((out + lepe.permute(0, 2, 3, 1)) * o, m.proj.weight, m.proj.bias)


def _l2vit(m: LinearAttention, x: torch.Tensor) -> torch.Tensor:
    """Official LinearAttention: phi = relu; A[i, j] = t_h (q_i . k_j) / max(sum_j q_i . k_j, 100)."""
    B, H, W, _ = x.shape
    q, k, v = (_heads(t, m.num_heads) for t in F.linear(x, m.qkv.weight, m.qkv.bias).chunk(3, dim=-1))
    q, k = F.relu(q), F.relu(k)
    qk = q @ k.transpose(-2, -1)
    A = m.temperature * qk / qk.sum(-1, keepdim=True).clamp(min=100.)
    return F.linear(_unheads(A @ v, H, W), m.proj.weight, m.proj.bias)


_BRUTE = {'mala': _mala, 'l2vit': _l2vit}


@pytest.mark.parametrize('variant, scale', [('mala', 1.), ('l2vit', .1), ('l2vit', 30.)])
@pytest.mark.parametrize('hw', [(5, 7), (1, 3)])
def test_variant_is_the_brute_force_attention(variant, scale, hw, assert_close_to_scale):
    """l2vit at x0.1: every denominator below the clamp of 100; at x30 none: both branches of the max."""
    torch.manual_seed(0)
    m = create_mixer('linear', 32, num_heads=2, variant=variant).double()
    with torch.no_grad():
        for p in m.parameters():  # O(1) parameters: a dropped term or a transposed table shows
            p.normal_(0, 0.3)
        if variant == 'l2vit':
            m.temperature.uniform_(0.1, 1.)
    x = scale * torch.randn(2, *hw, 32, dtype=torch.float64, requires_grad=True)
    out = m(x)
    want = _BRUTE[variant](m, x)
    if variant == 'l2vit':
        qk_sums = F.relu(_heads(m.qkv(x)[..., :32], 2)) @ F.relu(_heads(m.qkv(x)[..., 32:64], 2)).transpose(-2, -1)
        clamped = (qk_sums.sum(-1) < 100).float().mean().item()
        assert clamped == (0. if scale > 1 else 1.), clamped
    assert_close_to_scale(out, want)
    g = torch.randn_like(out)
    params = [x] + list(m.parameters())
    names = ['x'] + [n for n, _ in m.named_parameters()]
    for name, a, b in zip(names, torch.autograd.grad(out, params, g), torch.autograd.grad(want, params, g)):
        assert_close_to_scale(a, b, msg=name)


def test_official_parameter_names_and_shapes():
    m = create_mixer('linear', 128, num_heads=2, variant='mala')
    assert {n: tuple(p.shape) for n, p in m.named_parameters()} == {
        'qkvo.weight': (512, 128), 'qkvo.bias': (512,), 'lepe.weight': (128, 1, 5, 5), 'lepe.bias': (128,),
        'proj.weight': (128, 128), 'proj.bias': (128,)}
    m = create_mixer('linear', 96, num_heads=3, variant='l2vit')
    assert {n: tuple(p.shape) for n, p in m.named_parameters()} == {
        'qkv.weight': (288, 96), 'qkv.bias': (288,), 'temperature': (3, 1, 1), 'proj.weight': (96, 96),
        'proj.bias': (96,)}
    torch.testing.assert_close(m.temperature.detach(), torch.full((3, 1, 1), 32 ** -0.5))
    assert m.no_weight_decay_keys == ()  # official: a 3-D parameter, decayed


@pytest.mark.parametrize('variant', VARIANTS)
@pytest.mark.parametrize('heads', [dict(num_heads=2), dict(head_dim=16), dict(num_heads=2, head_dim=24)])
@pytest.mark.parametrize('hw', [(1, 1), (3, 29)])
def test_contract_for_both_variants(variant, heads, hw):
    m = create_mixer('linear', 64, variant=variant, **heads)
    assert isinstance(m, LinearAttention) and m.variant == variant and variant in list_variants()
    x = torch.randn(2, *hw, 64, requires_grad=True)
    out = m(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all() and all(p.grad is not None for p in m.parameters())
    with torch.no_grad():  # batch items are independent
        torch.testing.assert_close(m(x[1:]), out[1:], rtol=1e-5, atol=1e-5 * out.abs().max().item())


def test_mala_rope_follows_the_map():
    """The RoPE tables are computed for the actual map: a map and its transpose give different outputs unless the
    rotation is off (then attention is permutation-equivariant and the transpose commutes)."""
    torch.manual_seed(0)
    for rope in (True, False):
        m = create_mixer('linear', 32, num_heads=2, variant='mala', rope=rope, kernel_size=1)
        x = torch.randn(1, 4, 6, 32)
        with torch.no_grad():
            a, b = m(x).transpose(1, 2), m(x.transpose(1, 2))
        assert torch.allclose(a, b, atol=1e-5) != rope


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"variant: expected one of \(.*'l2vit'.*'mala'.*\), got 'malaa'"):
        create_mixer('linear', 64, variant='malaa')
    with pytest.raises(ValueError, match=r'rope: 2-D RoPE needs head_dim divisible by 4.*got head_dim=6'):
        create_mixer('linear', 12, num_heads=2, variant='mala')
    create_mixer('linear', 12, num_heads=2, variant='mala', rope=False)  # no rotation: any head_dim
    with pytest.raises(ValueError, match='kernel_size: expected an odd positive int, got 4'):
        create_mixer('linear', 64, variant='mala', kernel_size=4)
    with pytest.raises(ValueError, match='clamp_min: expected a number > 0, got 0'):
        create_mixer('linear', 64, variant='l2vit', clamp_min=0)
    with pytest.raises(ValueError, match=r"variant 'l2vit': unexpected arguments \['focusing_factor'\]"):
        create_mixer('linear', 64, variant='l2vit', focusing_factor=3)
    with pytest.raises(ValueError, match='num_heads: expected a divisor of dim=64'):
        create_mixer('linear', 64, num_heads=5, variant='mala')
    assert math.isclose(create_mixer('linear', 64, variant='l2vit').clamp_min, 100.)


def test_elu_plus_one_is_elu_plus_one():
    from zoo.blocks.linear import elu_plus_one
    x = torch.tensor([-40., -1., -1e-4, 0., 1e-4, 3.], dtype=torch.float64, requires_grad=True)
    want = F.elu(x) + 1
    got = elu_plus_one(x)
    torch.testing.assert_close(got, want, rtol=1e-15, atol=1e-15)
    g_got, = torch.autograd.grad(got.sum(), x)
    g_want, = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(g_got, g_want, rtol=1e-15, atol=1e-15)  # 1 at 0, like ELU
