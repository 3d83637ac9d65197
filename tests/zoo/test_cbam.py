"""CBAM module against its formula, CBAM ResNet parameter counts, the official checkpoint layout, odd sizes."""
import re

import pytest
import timm
import torch
import torch.nn.functional as F

import zoo.blocks as blocks
import zoo  # noqa: F401  (registers the models)
from zoo.blocks.cbam import CBAM, ChannelGate
from zoo.zoo_cbam import checkpoint_filter_fn


def _randomize_bn(model: torch.nn.Module) -> None:
    """Non-trivial BN affine and running statistics, so eval-mode BN is not an identity."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g) * 0.2
            m.running_mean = torch.randn(n, generator=g) * 0.2
            m.running_var = torch.rand(n, generator=g) + 0.5


def _cbam_formula(x, w1, b1, w2, b2, wconv, bn_w, bn_b, bn_mean, bn_var, eps, spatial_order=('max', 'mean')):
    """CBAM written out: explicit pooling, explicit MLP, explicit conv on the 2-channel pooled map."""
    B, C, H, W = x.shape

    def mlp(v):
        return torch.relu(v @ w1.t() + b1) @ w2.t() + b2

    avg = x.reshape(B, C, H * W).sum(-1) / (H * W)
    mx = x.reshape(B, C, H * W).max(-1).values
    xc = x * torch.sigmoid(mlp(avg) + mlp(mx)).reshape(B, C, 1, 1)
    maps = {'max': xc.max(dim=1, keepdim=True).values, 'mean': xc.sum(dim=1, keepdim=True) / C}
    pooled = torch.cat([maps[k] for k in spatial_order], dim=1)
    s = F.conv2d(pooled, wconv, bias=None, padding=wconv.shape[-1] // 2)
    s = (s - bn_mean.reshape(1, -1, 1, 1)) / torch.sqrt(bn_var.reshape(1, -1, 1, 1) + eps)
    s = s * bn_w.reshape(1, -1, 1, 1) + bn_b.reshape(1, -1, 1, 1)
    return xc * torch.sigmoid(s)


def _formula_args(m: CBAM):
    mlp1, mlp3 = m.ChannelGate.mlp[1], m.ChannelGate.mlp[3]
    conv, bn = m.SpatialGate.spatial.conv, m.SpatialGate.spatial.bn
    return (mlp1.weight, mlp1.bias, mlp3.weight, mlp3.bias, conv.weight,
            bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)


def test_cbam_matches_formula_and_order_matters():
    m = blocks.create_gate('cbam', 48)
    assert isinstance(m, CBAM)
    _randomize_bn(m)
    with torch.no_grad():  # larger conv weights so the spatial gate is far from constant
        m.SpatialGate.spatial.conv.weight.normal_(0, 1.0)
    m.eval()
    x = torch.randn(2, 48, 9, 13)
    x_copy = x.clone()
    with torch.no_grad():
        out = m(x)  # the inference path (in-place spatial multiply on its own intermediate)
        want = _cbam_formula(x, *_formula_args(m))
        swapped = _cbam_formula(x, *_formula_args(m), spatial_order=('mean', 'max'))
    assert torch.equal(x, x_copy)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    out_grad = m(x.clone().requires_grad_())  # the autograd path
    torch.testing.assert_close(out_grad.detach(), want, rtol=1e-5, atol=1e-6)
    assert (out - swapped).abs().max() > 1e-2  # (mean, max), timm's order, gives a different result


def test_cbam_structure_matches_official():
    m = CBAM(64)
    names = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert names == {
        'ChannelGate.mlp.1.weight': (4, 64), 'ChannelGate.mlp.1.bias': (4,),
        'ChannelGate.mlp.3.weight': (64, 4), 'ChannelGate.mlp.3.bias': (64,),
        'SpatialGate.spatial.conv.weight': (1, 2, 7, 7),
        'SpatialGate.spatial.bn.weight': (1,), 'SpatialGate.spatial.bn.bias': (1,),
        'SpatialGate.spatial.bn.running_mean': (1,), 'SpatialGate.spatial.bn.running_var': (1,),
        'SpatialGate.spatial.bn.num_batches_tracked': (),
    }
    # BN momentum 0.01: one training step moves the running mean 1% of the way to the batch mean
    m.train()
    x = torch.randn(4, 64, 8, 8)
    with torch.no_grad():
        xc = m.ChannelGate(x)
        pooled = torch.cat([xc.amax(1, keepdim=True), xc.mean(1, keepdim=True)], 1)
        batch_mean = F.conv2d(pooled, m.SpatialGate.spatial.conv.weight, padding=3).mean()
        m(x)
    torch.testing.assert_close(m.SpatialGate.spatial.bn.running_mean, 0.01 * batch_mean.reshape(1))


def test_channel_gate_other_pools_and_errors():
    gate = ChannelGate(32, pool_types=('lp', 'lse')).eval()
    x = torch.randn(2, 32, 5, 6)
    lin1, lin3 = gate.mlp[1], gate.mlp[3]

    def mlp(v):
        return lin3(torch.relu(lin1(v)))

    lp = F.lp_pool2d(x, 2, (5, 6)).flatten(1)
    lse = torch.log(torch.exp(x).sum((2, 3)))
    with torch.no_grad():
        torch.testing.assert_close(gate(x), x * torch.sigmoid(mlp(lp) + mlp(lse))[:, :, None, None])
    no_spatial = CBAM(32, no_spatial=True)
    assert not any('SpatialGate' in k for k in no_spatial.state_dict())
    with pytest.raises(ValueError, match=r'expected input \(B, 32, H, W\)'):
        no_spatial(torch.randn(2, 31, 5, 5))
    with pytest.raises(ValueError, match='pool_types'):
        ChannelGate(32, pool_types=('avg', 'median'))
    with pytest.raises(ValueError, match='reduction_ratio'):
        CBAM(8, reduction_ratio=16)


def _expected_params(block: str, layers, with_cbam: bool = True, num_classes: int = 1000) -> int:
    """Parameter count of the official ResNet(+CBAM) from its definition."""
    total = 3 * 64 * 7 * 7 + 2 * 64  # conv1 + bn1
    inplanes = 64
    for i, (planes, depth) in enumerate(zip((64, 128, 256, 512), layers)):
        for j in range(depth):
            if block == 'basic':
                out = planes
                n = inplanes * planes * 9 + planes * planes * 9 + 2 * (2 * planes)
            else:
                out = planes * 4
                n = inplanes * planes + planes * planes * 9 + planes * out + 2 * (planes + planes + out)
            if j == 0 and (i > 0 or inplanes != out):
                n += inplanes * out + 2 * out  # 1x1 conv + BN shortcut
            if with_cbam:
                hidden = out // 16
                n += (out * hidden + hidden) + (hidden * out + out)  # MLP with biases
                n += 2 * 7 * 7 + 2  # spatial conv (no bias) + BN
            total += n
            inplanes = out
    return total + inplanes * num_classes + num_classes


@pytest.mark.parametrize('name,block,layers,timm_base', [
    ('cbam_resnet18', 'basic', (2, 2, 2, 2), 'resnet18'),
    ('cbam_resnet34', 'basic', (3, 4, 6, 3), 'resnet34'),
    ('cbam_resnet50', 'bottleneck', (3, 4, 6, 3), 'resnet50'),
])
def test_param_counts(name, block, layers, timm_base):
    count = sum(p.numel() for p in timm.create_model(name).parameters())
    assert count == _expected_params(block, layers)
    # the ResNet part of the formula agrees with timm's own ResNet
    base = sum(p.numel() for p in timm.create_model(timm_base).parameters())
    assert _expected_params(block, layers, with_cbam=False) == base
    if name == 'cbam_resnet50':
        assert abs(count / 1e6 - 28.09) / 28.09 < 0.01  # CBAM paper, Table 4: ResNet50 + CBAM 28.09M
        assert round(count / 1e6, 2) == 28.09


def test_no_timm_names_taken():
    ours = set(timm.list_models('cbam_*'))
    assert ours == {'cbam_resnet18', 'cbam_resnet34', 'cbam_resnet50'}
    assert not any('cbam' in n for n in timm.list_models(module='resnet'))


def _to_official(state_dict):
    """Our keys -> the layout of Jongchan/attention-module's train_imagenet.py checkpoints (DataParallel)."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith('stem.'):
            k = {'conv': 'conv1', 'bn': 'bn1'}[k.split('.')[1]] + '.' + k.split('.', 2)[2]
        elif k.startswith('head.fc.'):
            k = 'fc.' + k[len('head.fc.'):]
        else:
            stage, idx, rest = re.fullmatch(r'stages\.(\d+)\.blocks\.(\d+)\.(.+)', k).groups()
            rest = re.sub(r'^se\.', 'cbam.', rest)
            k = f'layer{int(stage) + 1}.{idx}.{rest}'
        out['module.' + k] = v.clone()
    return {'epoch': 100, 'arch': 'resnet', 'state_dict': out, 'best_prec1': 77.622}


@pytest.mark.parametrize('name', ['cbam_resnet18', 'cbam_resnet50'])
def test_official_checkpoint_round_trip(name, tmp_path):
    src = timm.create_model(name).eval()
    _randomize_bn(src)
    with torch.no_grad():
        for m in src.modules():
            if isinstance(m, CBAM):
                m.SpatialGate.spatial.bn.weight.fill_(0.7)
    ckpt = _to_official(src.state_dict())
    keys = set(ckpt['state_dict'])
    for k in ('module.conv1.weight', 'module.bn1.running_var', 'module.fc.bias',
              'module.layer1.0.cbam.ChannelGate.mlp.1.weight', 'module.layer1.0.cbam.ChannelGate.mlp.3.bias',
              'module.layer4.1.cbam.SpatialGate.spatial.conv.weight',
              'module.layer4.1.cbam.SpatialGate.spatial.bn.running_mean',
              'module.layer2.0.downsample.0.weight', 'module.layer2.0.downsample.1.weight'):
        assert k in keys, k
    assert not any(k.startswith(('module.stages', 'module.stem', 'module.head')) for k in keys)

    x = torch.randn(2, 3, 96, 112)
    with torch.no_grad():
        want = src(x)
    # the filter directly on the raw training checkpoint
    dst = timm.create_model(name).eval()
    dst.load_state_dict(checkpoint_filter_fn(ckpt, dst), strict=True)
    with torch.no_grad():
        assert torch.equal(dst(x), want)
    if name == 'cbam_resnet18':  # through timm's pretrained path with a local file
        path = tmp_path / 'official.pth.tar'
        torch.save(ckpt, path)
        loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
        with torch.no_grad():
            assert torch.equal(loaded(x), want)
    # an unknown official key is reported by strict loading
    ckpt['state_dict']['module.layer5.0.conv1.weight'] = torch.zeros(1)
    with pytest.raises(RuntimeError, match='layer5|stages.4'):
        dst.load_state_dict(checkpoint_filter_fn(ckpt, dst), strict=True)


def test_any_input_size_feature_strides():
    model = timm.create_model('cbam_resnet18', features_only=True).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [64, 128, 256, 512]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 97, 131))
    assert [tuple(f.shape[-2:]) for f in feats] == [(25, 33), (13, 17), (7, 9), (4, 5)]
    full = timm.create_model('cbam_resnet18', num_classes=10).eval()
    with torch.no_grad():
        out = full(torch.randn(2, 3, 97, 131))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_pretrained_cfg_has_no_fake_url():
    cfg = timm.models.get_pretrained_cfg('cbam_resnet50').to_dict()
    assert cfg['url'] == '' and not cfg.get('hf_hub_id')
    assert 'drive.google.com' in ' '.join(cfg['notes']) and cfg['crop_pct'] == 0.875
