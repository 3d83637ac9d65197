"""The mixer contract, one test per clause, over every registered mixer (mixers added later join by
registering): construction from the shared arguments, the heads resolver, NHWC at any H x W, gradients,
owned no-weight-decay names, clear errors, and the Triton path equal to the reference where one exists.
Gates get the same for NCHW conv stages."""
import inspect

import pytest
import torch

import zoo.kernels as kernels
from zoo.blocks import (
    MixerBlock, create_gate, create_mixer, gate_info, list_gates, list_mixers, mixer_info, resolve_heads,
)

MIXERS = list_mixers()
GATES = list_gates()
CONTRACT = ('num_heads', 'head_dim', 'qkv_bias', 'attn_drop', 'proj_drop')


def test_registries_hold_every_family():
    assert {'window', 'block', 'grid', 'neighborhood'} <= set(MIXERS)
    assert {'cbam', 'se', 'eca'} <= set(GATES)
    assert not set(MIXERS) & set(GATES)


@pytest.mark.parametrize('name', MIXERS)
def test_metadata_and_signature(name):
    info = mixer_info(name)
    assert info.paper and info.cost.startswith('O(') and isinstance(info.triton, bool)
    params = inspect.signature(info.fn).parameters
    missing = [a for a in CONTRACT if a not in params]
    assert not missing, f'{name}: the contract arguments {missing} are not accepted'
    assert not any(a in info.arguments for a in CONTRACT)


def test_unknown_names_are_clear_errors():
    with pytest.raises(KeyError, match='unknown mixer'):
        create_mixer('no_such_mixer', 64)
    with pytest.raises(KeyError, match="'cbam' is a gate"):
        create_mixer('cbam', 64)
    with pytest.raises(KeyError, match="'window' is a token mixer"):
        create_gate('window', 64)


def test_heads_resolver():
    assert resolve_heads(96) == (3, 32)
    assert resolve_heads(96, num_heads=4) == (4, 24)
    assert resolve_heads(96, head_dim=16) == (6, 16)
    assert resolve_heads(96, num_heads=2, head_dim=64) == (2, 64)  # attention width 128 != dim
    for kwargs, match in ((dict(num_heads=5), 'num_heads: expected a divisor of dim=96'),
                          (dict(head_dim=20), 'head_dim: expected a divisor of dim=96'),
                          (dict(num_heads=0), 'num_heads: expected a positive int'),
                          (dict(head_dim=2.5), 'head_dim: expected a positive int')):
        with pytest.raises(ValueError, match=match):
            resolve_heads(96, **kwargs)
    with pytest.raises(ValueError, match='the default'):
        resolve_heads(48)


@pytest.mark.parametrize('name', MIXERS)
@pytest.mark.parametrize('heads', [dict(num_heads=2), dict(head_dim=16), dict(num_heads=2, head_dim=24), {}])
def test_heads_arguments_are_honoured(name, heads):
    mixer = create_mixer(name, 64, **heads)
    want = resolve_heads(64, heads.get('num_heads'), heads.get('head_dim'))
    assert (mixer.num_heads, mixer.head_dim) == want
    x = torch.randn(1, 9, 10, 64)
    assert mixer(x).shape == x.shape


@pytest.mark.parametrize('name', MIXERS)
@pytest.mark.parametrize('hw', [(11, 13), (16, 16), (3, 29), (1, 1)])
def test_any_size_same_shape_and_gradients(name, hw):
    mixer = create_mixer(name, 64, num_heads=2)
    x = torch.randn(2, *hw, 64, requires_grad=True)
    out = mixer(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    no_grad = [n for n, p in mixer.named_parameters() if p.grad is None]
    assert not no_grad, no_grad


@pytest.mark.parametrize('name', MIXERS)
def test_inference_mode_first_then_training(name):
    # a size no other test uses, so any per-size table is first built under inference mode
    mixer = create_mixer(name, 32, num_heads=2)
    x = torch.randn(1, 23, 37, 32)
    with torch.inference_mode():
        ref = mixer(x)
    x = x.clone().requires_grad_()
    out = mixer(x)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-6)
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize('name', MIXERS)
def test_batch_items_are_independent(name):
    mixer = create_mixer(name, 32, num_heads=2).eval()
    x = torch.randn(3, 9, 12, 32)
    with torch.no_grad():
        full = mixer(x)
        one = mixer(x[1:2])
    torch.testing.assert_close(one, full[1:2], rtol=1e-5, atol=1e-5 * full.abs().max().item())


@pytest.mark.parametrize('name', MIXERS)
def test_contract_arguments_and_errors(name):
    mixer = create_mixer(name, 32, num_heads=2, qkv_bias=False, proj_drop=0.1)
    assert all(not n.endswith('qkv.bias') for n, _ in mixer.named_parameters())
    with pytest.raises(ValueError, match=r'expected input \(B, H, W, 32\)'):
        mixer(torch.randn(1, 8, 8, 48))
    with pytest.raises(ValueError, match='num_heads'):
        create_mixer(name, 32, num_heads=3)


@pytest.mark.parametrize('name', MIXERS)
def test_no_weight_decay_names_are_own_parameters(name):
    mixer = create_mixer(name, 32, num_heads=2)
    keys = getattr(mixer, 'no_weight_decay_keys', ())
    params = dict(mixer.named_parameters())
    assert all(k in params for k in keys), (keys, list(params))
    block = MixerBlock(32, name, num_heads=2)
    names = {n for n, _ in block.named_parameters()}
    assert {f'attn.{k}' for k in keys} <= names


@pytest.mark.parametrize('name', MIXERS)
def test_block_carries_any_mixer(name):
    block = MixerBlock(32, name, num_heads=2, layer_scale=1e-5, pos_embed=3, mlp_layer='dwconv_mlp', drop_path=0.1)
    x = torch.randn(2, 7, 11, 32, requires_grad=True)
    block(x).sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in block.parameters())
    block.eval()
    with torch.no_grad():  # layer scale 1e-5: the block starts near identity (plus the position conv)
        y = block.pos_embed(x)
        torch.testing.assert_close(block(x), y, rtol=0, atol=1e-3)


@pytest.mark.triton
@pytest.mark.parametrize('name', [m for m in MIXERS if mixer_info(m).triton])
def test_triton_matches_reference(name):
    torch.manual_seed(0)
    mixer = create_mixer(name, 32, num_heads=2)
    x = torch.randn(1, 9, 10, 32)
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


@pytest.mark.parametrize('name', GATES)
@pytest.mark.parametrize('hw', [(9, 13), (1, 1)])
def test_gates_nchw_any_size(name, hw):
    info = gate_info(name)
    assert info.paper
    gate = create_gate(name, 64)
    x = torch.randn(2, 64, *hw, requires_grad=True)
    out = gate(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    assert x.grad is not None
    assert all(p.grad is not None for p in gate.parameters())


def test_mixer_without_torchscript_refuses_scripting(monkeypatch):
    """A mixer registered torchscript=False (every zoo mixer scripts today) makes torch.jit.script fail at once,
    naming it, inside any model that holds it."""
    from zoo.blocks import _registry
    monkeypatch.setitem(_registry._MIXERS, 'unscriptable', _registry.MixerInfo(
        name='unscriptable', fn=lambda dim, **kw: torch.nn.Linear(dim, dim), paper='-', cost='O(N)', triton=False,
        onnx_dynamic=True, torchscript=False))
    model = torch.nn.Sequential(create_mixer('unscriptable', 8), create_mixer('window', 8, num_heads=2, window_size=4))
    with pytest.raises(RuntimeError, match=r"the 'unscriptable' mixer does not support TorchScript"):
        torch.jit.script(model)
    torch.jit.script(model[1])  # the refusal is the mixer's, not the model's
