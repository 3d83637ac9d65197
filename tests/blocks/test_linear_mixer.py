"""The 'linear' mixer: each variant against a brute-force statement of its official math (an explicit N x N weight
matrix per head, fp64, forward and the gradients of the input and of every parameter), the mixer contract for every
variant (the registry's contract test builds the default one), position tables at other sizes, half precision under
autocast with large activations, and clear errors."""
import pytest
import torch
import torch.nn.functional as F

import zoo.kernels as kernels
from zoo.blocks import create_mixer, mixer_info
from zoo.blocks.linear import LinearAttention, list_variants

VARIANTS = ['efficient', 'flatten', 'inline']


def _heads(t: torch.Tensor, nh: int) -> torch.Tensor:
    """(B, H, W, nh * d) -> (B, nh, N, d)."""
    B, H, W, C = t.shape
    return t.reshape(B, H * W, nh, C // nh).permute(0, 2, 1, 3)


def _unheads(t: torch.Tensor, H: int, W: int) -> torch.Tensor:
    B, nh, N, d = t.shape
    return t.permute(0, 2, 1, 3).reshape(B, H, W, nh * d)


def _efficient(m, x):
    """Official EfficientAttention: per head, K softmax over positions, Q softmax over channels, out = (K V^T)^T Q;
    as attention: A[i, j] = softmax_c(q_i) . softmax_N(k)_j."""
    B, H, W, _ = x.shape
    q = _heads(F.linear(x, m.queries.weight, m.queries.bias), m.num_heads).softmax(-1)
    k = _heads(F.linear(x, m.keys.weight, m.keys.bias), m.num_heads).softmax(-2)
    v = _heads(F.linear(x, m.values.weight, m.values.bias), m.num_heads)
    attn = torch.einsum('bhid,bhjd->bhij', q, k)  # explicit N x N
    out = _unheads(torch.einsum('bhij,bhjd->bhid', attn, v), H, W)
    return F.linear(out, m.reprojection.weight, m.reprojection.bias)


def _flatten(m, x):
    """Official FocusedLinearAttention (2024 form): A[i, j] = phi(q_i) . phi(k_j) / (sum_j' phi(q_i) . phi(k_j') +
    N 1e-6), phi the focused ReLU map with norms over all channels, K + positional encoding, a depthwise conv on
    V whose one kernel serves every head."""
    B, H, W, C = x.shape
    nh, p = m.num_heads, m.focusing_factor
    q, k, v = F.linear(x, m.qkv.weight, m.qkv.bias).chunk(3, dim=-1)
    rows, cols = m.pe_size
    pe = m.positional_encoding.reshape(1, rows, cols, -1)
    if (H, W) != (rows, cols):
        pe = F.interpolate(pe.permute(0, 3, 1, 2), size=(H, W), mode='bilinear', align_corners=False).permute(
            0, 2, 3, 1)
    k = k + pe
    s = F.softplus(m.scale)

    def phi(t):
        t = (torch.relu(t) + 1e-6) / s
        n = t.norm(dim=-1, keepdim=True)
        t = t ** p
        return t / t.norm(dim=-1, keepdim=True) * n

    q, k = _heads(phi(q), nh), _heads(phi(k), nh)
    sim = torch.einsum('bhid,bhjd->bhij', q, k)
    attn = sim / (sim.sum(-1, keepdim=True) + H * W * 1e-6)
    out = _unheads(attn @ _heads(v, nh), H, W)
    w = m.dwc.weight.repeat(nh, 1, 1, 1)  # (C, 1, k, k): the head_dim kernel repeated for each head
    b = m.dwc.bias.repeat(nh)
    local = F.conv2d(v.permute(0, 3, 1, 2), w, b, padding=m.dwc.padding, groups=C).permute(0, 2, 3, 1)
    return F.linear(out + local, m.proj.weight, m.proj.bias)


def _inline(m, x):
    """Official InLineAttention: A[i, j] = s (q_i . k_j - q_i . mean_j' k_j') / N + 1 / N with s = head_dim^-1/2
    (rows sum to 1), plus a per-sample 3 x 3 depthwise conv on V predicted from the mean token."""
    B, H, W, C = x.shape
    nh, N, s = m.num_heads, H * W, m.head_dim ** -0.5
    q, k, v = (_heads(t, nh) for t in F.linear(x, m.qkv.weight, m.qkv.bias).chunk(3, dim=-1))
    sim = torch.einsum('bhid,bhjd->bhij', q, k)
    attn = s * (sim - sim.mean(-1, keepdim=True)) / N + 1. / N
    out = _unheads(attn @ v, H, W)
    r = m.residual
    h = F.gelu(F.conv1d(x.mean(dim=(1, 2))[:, :, None], r[0].weight, r[0].bias, groups=nh))
    weight = F.conv1d(h, r[2].weight, r[2].bias, groups=nh).reshape(B * C, 1, 3, 3)
    vmap = _unheads(v, H, W).permute(0, 3, 1, 2).reshape(1, B * C, H, W)
    local = F.conv2d(vmap, weight, padding=1, groups=B * C).reshape(B, C, H, W).permute(0, 2, 3, 1)
    return F.linear(out + local, m.proj.weight, m.proj.bias)


BRUTE = {'efficient': _efficient, 'flatten': _flatten, 'inline': _inline}


def _randomise(m):
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name in ('scale', 'positional_encoding'):  # zeros at init: give them values that show mistakes
                p.normal_(0., 0.5)


@pytest.mark.parametrize('variant, kwargs, hw', [
    ('efficient', {}, (5, 7)),
    ('efficient', dict(value_dim=48), (4, 4)),
    ('flatten', dict(pe_size=(5, 7)), (5, 7)),  # the table as stored
    ('flatten', dict(pe_size=6, focusing_factor=2.5, kernel_size=3), (4, 9)),  # resized to another map
    ('inline', {}, (5, 7)),
    ('inline', dict(kernel_func='identity'), (1, 6)),
])
def test_variant_is_the_brute_force_attention(variant, kwargs, hw, assert_close_to_scale):
    torch.manual_seed(0)
    m = create_mixer('linear', 32, num_heads=2, variant=variant, **kwargs).double()
    _randomise(m)
    x = torch.randn(2, *hw, 32, dtype=torch.float64, requires_grad=True)
    params = [p for _, p in m.named_parameters()]
    out, want = m(x), BRUTE[variant](m, x)
    assert_close_to_scale(out, want, msg='forward')
    weight = torch.randn_like(want)  # a random cotangent: every output element matters
    got = torch.autograd.grad((out * weight).sum(), [x] + params)
    ref = torch.autograd.grad((want * weight).sum(), [x] + params)
    names = ['x'] + [n for n, _ in m.named_parameters()]
    for name, g, r in zip(names, got, ref):
        assert_close_to_scale(g, r, msg=f'grad {name}')


@pytest.mark.parametrize('kernel_func', ['relu', 'leakyrelu', 'exp'])
def test_inline_kernel_functions(kernel_func, assert_close_to_scale):
    m = create_mixer('linear', 32, num_heads=2, variant='inline', kernel_func=kernel_func).double()
    phi = {'relu': torch.relu, 'leakyrelu': F.leaky_relu, 'exp': lambda t: (0.2 * t).exp()}[kernel_func]
    x = torch.randn(1, 4, 5, 32, dtype=torch.float64)
    # the brute force on the mapped features: q, k through phi, v as it is
    qkv = m.qkv
    wq, wk, wv = qkv.weight.chunk(3)
    bq, bk, bv = qkv.bias.chunk(3)
    nh, s, N = 2, m.head_dim ** -0.5, 20
    q, k = (_heads(phi(F.linear(x, w, b)), nh) for w, b in ((wq, bq), (wk, bk)))
    v = _heads(F.linear(x, wv, bv), nh)
    sim = torch.einsum('bhid,bhjd->bhij', q, k)
    out = _unheads((s * (sim - sim.mean(-1, keepdim=True)) / N + 1. / N) @ v, 4, 5)
    with torch.no_grad():
        m.residual[2].weight.zero_()  # no local term: the attention alone
        m.residual[2].bias.zero_()
        assert_close_to_scale(m(x), F.linear(out, m.proj.weight, m.proj.bias))


@pytest.mark.triton
@pytest.mark.parametrize('variant', ['efficient', 'inline'])  # 'flatten' (the default): tests/blocks/test_mixers.py
def test_triton_path_matches_reference(variant, assert_close_to_scale):
    m = create_mixer('linear', 32, num_heads=2, variant=variant)
    x = torch.randn(1, 5, 6, 32)
    results = []
    for backend in ('torch', 'triton'):
        xb = x.clone().requires_grad_()
        with kernels.use_backend(backend):
            out = m(xb)
        grads = torch.autograd.grad(out.square().sum(), [xb] + list(m.parameters()))
        results.append((out.detach(),) + grads)
    for got, want in zip(*results):
        assert_close_to_scale(got, want, rel=1e-4, floor=1e-5)


def test_inline_export_path_equals_eager(monkeypatch, assert_close_to_scale):
    """InLine's per-sample 3 x 3 conv: one grouped conv in eager mode, shifted multiply-adds while exporting."""
    import zoo.blocks.linear as linear
    m = create_mixer('linear', 32, num_heads=2, variant='inline').double()
    x = torch.randn(3, 7, 10, 32, dtype=torch.float64, requires_grad=True)
    outs = []
    for exporting in (False, True):
        monkeypatch.setattr(linear, 'is_exporting', lambda: exporting)
        out = m(x)
        outs.append((out, torch.autograd.grad(out.square().sum(), [x] + list(m.parameters()))))
    assert_close_to_scale(outs[1][0], outs[0][0])
    for a, b in zip(outs[1][1], outs[0][1]):
        assert_close_to_scale(a, b)


def test_official_parameter_names_and_shapes():
    f = create_mixer('linear', 96, num_heads=3, variant='flatten')
    assert {n: tuple(p.shape) for n, p in f.named_parameters()} == {
        'qkv.weight': (288, 96), 'qkv.bias': (288,), 'proj.weight': (96, 96), 'proj.bias': (96,),
        'dwc.weight': (32, 1, 5, 5), 'dwc.bias': (32,), 'scale': (1, 1, 96), 'positional_encoding': (1, 3136, 96)}
    i = create_mixer('linear', 96, num_heads=3, variant='inline')
    assert {n: tuple(p.shape) for n, p in i.named_parameters()} == {
        'qkv.weight': (288, 96), 'qkv.bias': (288,), 'proj.weight': (96, 96), 'proj.bias': (96,),
        'residual.0.weight': (96, 32, 1), 'residual.0.bias': (96,), 'residual.2.weight': (864, 32, 1),
        'residual.2.bias': (864,)}
    e = create_mixer('linear', 96, num_heads=3, variant='efficient')
    assert sorted(n.split('.')[0] for n, _ in e.named_parameters()) == sorted(
        ['keys', 'queries', 'values', 'reprojection'] * 2)


@pytest.mark.parametrize('variant', VARIANTS)
@pytest.mark.parametrize('heads', [dict(num_heads=2), dict(head_dim=16), dict(num_heads=2, head_dim=24)])
@pytest.mark.parametrize('hw', [(1, 1), (3, 29)])
def test_contract_for_every_variant(variant, heads, hw):
    """The registry's contract test builds the default variant; here every variant: heads, any size, gradients."""
    m = create_mixer('linear', 64, variant=variant, **heads)
    assert isinstance(m, LinearAttention) and m.variant == variant
    x = torch.randn(2, *hw, 64, requires_grad=True)
    out = m(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all() and all(p.grad is not None for p in m.parameters())
    with torch.no_grad():  # batch items are independent
        torch.testing.assert_close(m(x[1:]), out[1:], rtol=1e-5, atol=1e-5 * out.abs().max().item())


def test_default_is_flatten_with_the_official_tiny_arguments():
    m = create_mixer('linear', 96, num_heads=3)
    assert m.variant == 'flatten' and (m.focusing_factor, m.kernel_size, m.pe_size) == (3, 5, (56, 56))
    assert set(list_variants()) >= set(VARIANTS) and mixer_info('linear').triton


# input scale per variant: large activations whose fp32 output still fits fp16 (InLine's output grows as the cube)
# per variant, large activations whose fp32 output still fits fp16
_LARGE = {'efficient': 100., 'flatten': 300., 'inline': 30., 'mala': 10., 'l2vit': 300.}


@pytest.mark.parametrize('variant', sorted(_LARGE))
@pytest.mark.parametrize('dtype, rel', [(torch.bfloat16, 0.25), (torch.float16, 0.05)])
def test_half_precision_autocast_with_large_activations(variant, dtype, rel):
    """Activations of tens to hundreds: FLatten's q ** 3 and the sums of N products overflow fp16 if done in it; the
    feature maps run in fp32 and the op sums in fp32, so the output is finite. It is as close to fp32's as the
    half-precision projections allow (bf16's 8-bit mantissa moves Efficient's softmax logits of ~100 by ~1). Every
    registered variant is covered."""
    assert sorted(_LARGE) == sorted(list_variants())
    torch.manual_seed(0)
    kwargs = dict(pe_size=16) if variant == 'flatten' else {}
    m = create_mixer('linear', 32, num_heads=2, variant=variant, **kwargs)
    x = _LARGE[variant] * torch.randn(1, 16, 16, 32)
    with torch.no_grad():
        ref = m(x)
        with torch.autocast('cpu', dtype=dtype):
            out = m(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    err = (out.float() - ref).abs().max().item()
    assert err <= rel * ref.abs().max().item(), (err, ref.abs().max().item())


def test_pe_resize_is_identity_at_its_own_size():
    m = create_mixer('linear', 32, num_heads=2, variant='flatten', pe_size=(3, 5))
    with torch.no_grad():
        m.positional_encoding.normal_()
        got = m.resized_encoding(3, 5)
    torch.testing.assert_close(got, m.positional_encoding.reshape(1, 3, 5, 32), rtol=0, atol=0)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"variant: expected one of \(.*'efficient', 'flatten', 'inline'.*\), "
                                         r"got 'softmax'"):
        create_mixer('linear', 64, variant='softmax')
    for bad in (0, -1, float('nan')):
        with pytest.raises(ValueError, match='focusing_factor: expected a number > 0'):
            create_mixer('linear', 64, variant='flatten', focusing_factor=bad)
    with pytest.raises(ValueError, match='num_heads: expected a divisor of dim=64'):
        create_mixer('linear', 64, num_heads=3, variant='inline')
    with pytest.raises(ValueError, match='kernel_size: expected an odd positive int'):
        create_mixer('linear', 64, variant='flatten', kernel_size=4)
    with pytest.raises(ValueError, match="kernel_func: expected one of .*'identity'"):
        create_mixer('linear', 64, variant='inline', kernel_func='gelu')
    with pytest.raises(ValueError, match=r"variant 'inline': unexpected arguments \['focusing_factor'\]; it takes "
                                         r"\['kernel_func'\]"):
        create_mixer('linear', 64, variant='inline', focusing_factor=3)
    with pytest.raises(ValueError, match='attn_drop: linear attention has no attention matrix'):
        create_mixer('linear', 64, attn_drop=0.1)
    with pytest.raises(ValueError, match=r'LinearAttention: expected input \(B, H, W, 64\), got \(1, 4, 4, 32\)'):
        create_mixer('linear', 64, variant='efficient')(torch.randn(1, 4, 4, 32))
