"""The mixer contract, for every registered mixer: any H and W in, same shape out, gradients everywhere,
and the Triton path (interpreter) equal to the reference path, forward and backward."""
import pytest
import torch

import zoo.kernels as kernels
from zoo.blocks import create_mixer, list_mixers

MIXERS = list_mixers()


def _build(name: str, dim: int = 64) -> torch.nn.Module:
    probe = create_mixer(name, dim) if name == 'cbam' else create_mixer(name, dim, num_heads=2)
    return probe


def _layout(mixer: torch.nn.Module) -> str:
    return getattr(mixer, 'input_fmt', 'NHWC')


def _input(mixer: torch.nn.Module, B: int, H: int, W: int, dim: int = 64) -> torch.Tensor:
    return torch.randn(B, dim, H, W) if _layout(mixer) == 'NCHW' else torch.randn(B, H, W, dim)


def test_registry_has_every_family():
    assert {'window', 'block', 'grid', 'neighborhood', 'cbam'} <= set(MIXERS)


def test_unknown_mixer_is_a_clear_error():
    with pytest.raises(KeyError, match='unknown mixer'):
        create_mixer('no_such_mixer', 64)


@pytest.mark.parametrize('name', MIXERS)
@pytest.mark.parametrize('hw', [(11, 13), (16, 16), (3, 29)])
def test_any_size_same_shape(name, hw):
    mixer = _build(name)
    x = _input(mixer, 2, *hw).requires_grad_()
    out = mixer(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    no_grad = [n for n, p in mixer.named_parameters() if p.grad is None]
    assert not no_grad, no_grad


@pytest.mark.triton
@pytest.mark.parametrize('name', [m for m in MIXERS if m != 'cbam'])
def test_triton_matches_reference(name):
    torch.manual_seed(0)
    mixer = _build(name, dim=32)
    x = _input(mixer, 1, 9, 10, dim=32)
    results = {}
    for backend in ('torch', 'triton'):
        mixer.zero_grad()
        xb = x.clone().requires_grad_()
        with kernels.use_backend(backend):
            out = mixer(xb)
        out.square().sum().backward()
        results[backend] = (out.detach(), xb.grad, {n: p.grad.clone() for n, p in mixer.named_parameters()})
    (o_ref, gx_ref, gp_ref), (o_tri, gx_tri, gp_tri) = results['torch'], results['triton']
    torch.testing.assert_close(o_tri, o_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx_tri, gx_ref, rtol=1e-4, atol=1e-4)
    for n in gp_ref:
        torch.testing.assert_close(gp_tri[n], gp_ref[n], rtol=1e-4, atol=1e-4, msg=n)
