"""The 'neighborhood' mixer's GNA options (stride, is_causal) and the 3-D mixer 'neighborhood_3d' on video-shaped
(B, T, H, W, C) input (kept out of the 2-D mixer contract tests, which list the 2-D mixers)."""
import pytest
import torch

from zoo import blocks
from zoo.blocks.neighborhood import NeighborhoodAttention2D, NeighborhoodAttention3D
from zoo.kernels import neighborhood_attention, neighborhood_attention_3d


def _by_hand(mod, x, op, **kwargs):
    """qkv -> the op -> proj, with no padding (maps at least kernel * dilation)."""
    q, k, v = mod.qkv(x).view(*x.shape[:-1], 3, mod.num_heads, mod.head_dim).unbind(-3)
    out = op(q, k, v, mod.kernel_size, mod.dilation, rel_pos_bias=mod.rpb, scale=mod.scale, stride=mod.stride,
             is_causal=mod.is_causal, **kwargs)
    return mod.proj(out.flatten(-2))


def test_registry_lists_3d_apart():
    assert 'neighborhood_3d' not in blocks.list_mixers()
    assert blocks.list_mixers(3) == ['neighborhood_3d'] and 'neighborhood' in blocks.list_mixers(None)
    info = blocks.mixer_info('neighborhood_3d')
    assert info.spatial_dims == 3 and blocks.mixer_info('neighborhood').spatial_dims == 2
    mod = blocks.create_mixer('neighborhood_3d', 32, num_heads=2, kernel_size=(2, 3, 3), rel_pos_bias=False,
                              is_causal=(True, False, False))
    assert isinstance(mod, NeighborhoodAttention3D)


def test_2d_mixer_stride_and_causal():
    mod = NeighborhoodAttention2D(32, num_heads=2, kernel_size=(4, 5), stride=(2, 5), is_causal=(False, True),
                                  rel_pos_bias=False).eval()
    x = torch.randn(2, 9, 12, 32)
    with torch.no_grad():
        torch.testing.assert_close(mod(x), _by_hand(mod, x, neighborhood_attention))
    assert 'stride=(2, 5), is_causal=(False, True)' in repr(mod)
    blocked = NeighborhoodAttention2D(32, num_heads=2, kernel_size=4, stride=4).eval()
    assert blocked.rpb.shape == (2, 7, 7)
    with torch.no_grad():
        x = torch.randn(1, 8, 8, 32)
        torch.testing.assert_close(blocked(x), _by_hand(blocked, x, neighborhood_attention))


@pytest.mark.parametrize('size', [(4, 6, 7), (2, 3, 9), (1, 1, 1)])
def test_3d_any_size_and_gradients(size):
    """Maps smaller than kernel * dilation are padded at the end of each axis and cropped back."""
    mod = NeighborhoodAttention3D(32, num_heads=2, kernel_size=(2, 3, 3), stride=(1, 3, 1), dilation=(1, 1, 2))
    x = torch.randn(2, *size, 32, requires_grad=True)
    out = mod(x)
    assert out.shape == x.shape
    out.square().sum().backward()
    assert x.grad.abs().sum() > 0 and mod.rpb.grad.shape == mod.rpb.shape and mod.rpb.grad.abs().sum() > 0


def test_3d_matches_op_and_is_causal_in_time():
    mod = NeighborhoodAttention3D(32, num_heads=2, kernel_size=(3, 3, 4), stride=(1, 2, 4),
                                  is_causal=(True, False, False), rel_pos_bias=False).eval()
    x = torch.randn(2, 5, 6, 8, 32)
    with torch.no_grad():
        out = mod(x)
        torch.testing.assert_close(out, _by_hand(mod, x, neighborhood_attention_3d))
        later = x.clone()
        later[:, 3:] = torch.randn_like(later[:, 3:])  # change the future frames only
        changed = mod(later)
    torch.testing.assert_close(changed[:, :3], out[:, :3])  # the past does not see the future
    assert not torch.allclose(changed[:, 3:], out[:, 3:])


def test_3d_errors():
    mod = NeighborhoodAttention3D(32, num_heads=2, kernel_size=3)
    with pytest.raises(ValueError, match=r'expected input \(B, T, H, W, 32\), got \(1, 4, 4, 32\)'):
        mod(torch.randn(1, 4, 4, 32))
    with pytest.raises(ValueError, match='kernel_size: expected an int or 3 ints'):
        NeighborhoodAttention3D(32, num_heads=2, kernel_size=(3, 3))
    with pytest.raises(ValueError, match='rel_pos_bias: not defined with causal attention'):
        NeighborhoodAttention3D(32, num_heads=2, is_causal=(True, False, False))


def test_3d_scripts(script_round_trip, assert_close_to_scale):
    mod = NeighborhoodAttention3D(32, num_heads=2, kernel_size=(2, 3, 3), stride=(1, 1, 3), dilation=(1, 2, 1)).eval()
    scripted = script_round_trip(mod)
    for size in [(3, 7, 9), (2, 4, 5)]:
        x = torch.randn(2, *size, 32)
        with torch.no_grad():
            assert_close_to_scale(scripted(x), mod(x))


@pytest.mark.triton
def test_3d_mixer_triton_matches_reference():
    """'neighborhood_3d' is registered triton=True: its Triton kernel (interpreter here) gives the reference's
    output and gradients, causal time axis and relative-position bias each on."""
    from zoo import kernels
    for kw in (dict(kernel_size=(2, 3, 3), is_causal=(True, False, False), rel_pos_bias=False),
               dict(kernel_size=3, stride=(1, 2, 1), rel_pos_bias=True)):
        torch.manual_seed(0)
        mixer = blocks.create_mixer('neighborhood_3d', 16, num_heads=2, **kw)
        if mixer.rpb is not None:
            torch.nn.init.normal_(mixer.rpb, std=0.5)
        x = torch.randn(1, 3, 4, 5, 16)
        results = {}
        for backend in ('torch', 'triton'):
            mixer.zero_grad()
            xb = x.clone().requires_grad_()
            with kernels.use_backend(backend):
                out = mixer(xb)
            out.square().sum().backward()
            results[backend] = (out.detach(), xb.grad, {n: p.grad.clone() for n, p in mixer.named_parameters()})
        (o_ref, gx_ref, gp_ref), (o_tri, gx_tri, gp_tri) = results['torch'], results['triton']
        torch.testing.assert_close(o_tri, o_ref, rtol=0, atol=1e-5 * o_ref.abs().max().item())
        torch.testing.assert_close(gx_tri, gx_ref, rtol=0, atol=1e-5 * gx_ref.abs().max().item())
        for n in gp_ref:
            torch.testing.assert_close(gp_tri[n], gp_ref[n], rtol=0, atol=1e-5 * gp_ref[n].abs().max().item(), msg=n)
