"""The hybrid backbone with every registered mixer and gate in every stage position (small width): forward,
backward, odd size, features_only and ONNX. Mixers and gates registered later join automatically."""
import pytest
import timm
import torch

import zoo
from zoo.blocks import MixerBlock, list_gates, list_mixers
from zoo.weights.onnx import export_onnx

BASE = ('cbam', 'window', 'neighborhood', 'grid')
SMALL = zoo.reduced_args('hybrid_tiny')
CASES = [(name, pos) for name in list_mixers() + list_gates() for pos in range(4)]


def _mixers(name: str, pos: int):
    return tuple(name if i == pos else m for i, m in enumerate(BASE))


@pytest.mark.parametrize('name, pos', CASES)
def test_every_mixer_in_every_stage(name, pos, tmp_path):
    mixers = _mixers(name, pos)
    model = timm.create_model('hybrid_tiny', mixers=mixers, num_classes=5, **SMALL)
    stage = model.stages[pos]
    if name in list_gates():
        assert stage.fmt == 'NCHW' and all(hasattr(b, 'se') for b in stage.blocks)
    else:
        assert stage.fmt == 'NHWC' and all(isinstance(b, MixerBlock) for b in stage.blocks)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 5)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())

    model.eval()
    with torch.no_grad():
        odd = model.forward_intermediates(torch.randn(1, 3, 45, 71), intermediates_only=True)
    assert [tuple(f.shape[-2:]) for f in odd] == [(-(-45 // r), -(-71 // r)) for r in (4, 8, 16, 32)]

    feats = timm.create_model('hybrid_tiny', mixers=mixers, features_only=True, out_indices=(pos,), **SMALL).eval()
    with torch.no_grad():
        (f,) = feats(x)
    assert f.shape == (2, feats.feature_info.channels()[0], 64 // 2 ** (pos + 2), 64 // 2 ** (pos + 2))

    with torch.no_grad():
        scale = model(x).abs().max().item()
    atol = max(1e-5, 1e-5 * scale)
    report = export_onnx(model, tmp_path / 'hybrid.onnx', example_input=x, exporter='legacy', atol=atol)
    assert report['max_abs_err'] <= atol, report


def test_per_block_mixers_and_kwargs():
    model = timm.create_model(
        'hybrid_tiny', mixers=('se', ('window', 'window'), ('neighborhood', 'grid'), 'block'),
        mixer_kwargs={'neighborhood': dict(kernel_size=5), 'window': dict(window_size=4)}, **SMALL)
    s1, s2 = model.stages[1].blocks, model.stages[2].blocks
    assert [b.attn.shift_size for b in s1] == [(0, 0), (2, 2)] and s1[0].attn.window_size == (4, 4)
    assert s2[0].attn.kernel_size == 5 and s2[1].attn.partition_type == 'grid'
    assert model(torch.randn(1, 3, 64, 96)).shape == (1, 1000)


def test_window_follows_img_size():
    # Swin's rule at construction: a stage map no larger than the window is one unshifted window
    big = timm.create_model('hybrid_tiny', mixers=('window',) * 4, **SMALL)
    small = timm.create_model('hybrid_tiny', mixers=('window',) * 4, img_size=96, **SMALL)
    assert big.stages[2].blocks[1].attn.shift_size == (3, 3) and big.stages[3].blocks[0].attn.window_size == (7, 7)
    assert small.stages[2].blocks[1].attn.window_size == (6, 6) and small.stages[2].blocks[1].attn.shift_size == (0, 0)


def test_bad_specs():
    with pytest.raises(ValueError, match='one entry per stage'):
        timm.create_model('hybrid_tiny', mixers=('cbam', 'window'), **SMALL)
    with pytest.raises(ValueError, match='one mixer per block'):
        timm.create_model('hybrid_tiny', mixers=('cbam', ('window',) * 3, 'grid', 'grid'), **SMALL)
    with pytest.raises(ValueError, match='all gates'):
        timm.create_model('hybrid_tiny', mixers=('cbam', ('se', 'window'), 'grid', 'grid'), **SMALL)
    with pytest.raises(ValueError, match="unknown mixer 'windw'; known mixers: agent, block"):
        timm.create_model('hybrid_tiny', mixers=('cbam', 'windw', 'grid', 'grid'), **SMALL)


def test_full_size_param_counts():
    counts = {n: sum(p.numel() for p in timm.create_model(n).parameters()) for n in ('hybrid_tiny', 'hybrid_small')}
    assert counts == {'hybrid_tiny': 30_369_792, 'hybrid_small': 51_687_696}
