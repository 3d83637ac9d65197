"""SHViT: logits equal timm's model with the same weights and BatchNorm statistics, timm's and the official layout
load through timm's pretrained machinery, parameter counts equal timm's, any size, clear errors."""
import re

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.shvit import SHSA

import zoo  # noqa: F401  (registers the models)
from zoo.blocks import MixerBlock, create_mixer
from zoo.weights import IncompatibleKeysError
from zoo.zoo_shvit import SHViT, checkpoint_filter_fn

VARIANTS = {  # ours -> timm's parameter count (research/families.md section 1, measured)
    'zoo_shvit_s1': 6_330_808, 'zoo_shvit_s2': 11_483_072, 'zoo_shvit_s3': 14_245_273, 'zoo_shvit_s4': 16_588_484,
}


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter perturbed and every BatchNorm given random statistics (zero-init BN weights too)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for n, t in model.state_dict().items():
            if n.endswith('running_var'):
                t.copy_(torch.rand_like(t) + 0.5)
            elif n.endswith('running_mean'):
                t.copy_(torch.randn_like(t) * 0.1)
            elif n.endswith('bn.weight') or n.endswith('norm.weight'):
                t.copy_(1 + 0.2 * torch.randn_like(t))
            elif t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.02)
    return model.eval()


def _official_state_dict(ref: torch.nn.Module) -> dict:
    """timm's weights in ysj9909/SHViT's layout (model/shvit.py): `blocks1..3` with each stage's downsample parts
    first (`blocksK.0.{0,1}`, `blocksK.1`, `blocksK.2.{0,1}`), under 'model'; as its releases, 1x1 conv weights of
    the attention's qkv stored without their trailing 1x1 dims (its builder unsqueezes them)."""
    out = {}
    for k, v in ref.state_dict().items():
        m = re.match(r'^stages\.(\d)\.(downsample|blocks)\.(\d+)(\..*)$', k)
        if m:
            stage, part, n, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            if part == 'blocks':
                k = f'blocks{stage + 1}.{n + (3 if stage else 0)}{rest}'
            else:
                k = {0: f'blocks{stage + 1}.0.0', 1: f'blocks{stage + 1}.0.1', 2: f'blocks{stage + 1}.1',
                     3: f'blocks{stage + 1}.2.0', 4: f'blocks{stage + 1}.2.1'}[n] + rest
        if k.endswith('qkv.c.weight'):
            v = v[:, :, 0, 0]
        out[k] = v.clone()
    assert 'blocks2.0.1.m.pw1.c.weight' in out and 'blocks3.3.mixer.m.qkv.c.weight' in out
    return {'model': out}


@pytest.fixture(scope='module')
def images() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope='module')
def s1(images):
    ref = _randomise(timm.create_model('shvit_s1'))
    with torch.no_grad():
        logits = ref(images)
    ours = timm.create_model('zoo_shvit_s1').eval()
    ours.load_state_dict(checkpoint_filter_fn(ref.state_dict(), ours), strict=True)
    return ref, ours, logits


def test_logits_match_timm(s1, images, assert_close_to_scale):
    ref, ours, logits = s1
    assert sum(p.numel() for p in ours.parameters()) == VARIANTS['zoo_shvit_s1']
    with torch.no_grad():
        got = ours(images)
        assert_close_to_scale(got, logits)
        assert_close_to_scale(ours(images[1:]), logits[1:])
        # every stage's features too (timm gives the same three strides)
        want = ref.forward_intermediates(images, intermediates_only=True)
        for a, b in zip(ours.forward_intermediates(images, intermediates_only=True), want):
            assert_close_to_scale(a, b)
    assert logits.std() > 0.1 * logits.abs().max()  # a network whose logits are not one constant


@pytest.mark.parametrize('name', list(VARIANTS))
def test_param_counts_and_key_map_equal_timm(name):
    with torch.device('meta'):
        ref = timm.create_model(name[len('zoo_'):])
        ours = timm.create_model(name)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == VARIANTS[name]
    sd = checkpoint_filter_fn(ref.state_dict(), ours)
    assert sd.keys() == ours.state_dict().keys()
    ours.load_state_dict(sd, strict=True, assign=True)
    official = checkpoint_filter_fn(_official_state_dict(ref), ours)
    assert official.keys() == sd.keys()


@pytest.mark.parametrize('fmt', ['safetensors', 'official_pth'])
def test_pretrained_file_through_timm(fmt, s1, images, tmp_path, assert_close_to_scale):
    ref, _, logits = s1
    if fmt == 'safetensors':
        path = tmp_path / 'shvit_s1.safetensors'
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    else:
        path = tmp_path / 'shvit_s1_official.pth'
        torch.save(_official_state_dict(ref), path)
    model = timm.create_model('zoo_shvit_s1', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        assert_close_to_scale(model(images), logits)


def test_foreign_files_are_refused(s1, tmp_path):
    ref, _, _ = s1
    path = tmp_path / 'w.safetensors'
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    for target in ('zoo_shvit_s2', 'zoo_twins_pcpvt_small'):
        with pytest.raises(IncompatibleKeysError):
            timm.create_model(target, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    twins = timm.create_model('zoo_twins_svt_small', **zoo.reduced_args('zoo_twins_svt_small'))
    with pytest.raises(IncompatibleKeysError):
        checkpoint_filter_fn(twins.state_dict(), timm.create_model('zoo_shvit_s1', **zoo.reduced_args('zoo_shvit_s1')))


def test_pretrained_cfgs():
    for name in VARIANTS:
        cfg = timm.models.get_pretrained_cfg(name)
        timm_cfg = timm.models.get_pretrained_cfg(name[len('zoo_'):] + '.in1k')
        assert cfg.tag == 'in1k' and cfg.hf_hub_id == timm_cfg.hf_hub_id == f'timm/{name[4:]}.in1k'
        assert cfg.input_size == timm_cfg.input_size and cfg.crop_pct == timm_cfg.crop_pct
        assert timm.models._registry._model_to_module[name] == 'zoo_shvit'


@pytest.mark.parametrize('hw', [(97, 131), (320, 256)])
def test_any_size(s1, hw, assert_close_to_scale):
    ref, ours, _ = s1
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        feats = ours.forward_intermediates(x, intermediates_only=True)
        assert [tuple(f.shape[-2:]) for f in feats] == [tuple(-(-s // r) for s in hw) for r in (16, 32, 64)]
        assert_close_to_scale(ours(x), ref(x))  # size-free in both: same logits at any size


def test_single_head_mixer_is_timm_shsa(assert_close_to_scale):
    ref = _randomise(SHSA(48, qk_dim=16, pdim=20))
    ours = _randomise(create_mixer('single_head', 48, num_heads=1, head_dim=20, qk_dim=16))
    mapped = {re.sub(r'^proj\.1\.', 'proj.', k).replace('.c.', '.conv.'): v for k, v in ref.state_dict().items()}
    ours.load_state_dict(mapped, strict=True)
    x = torch.randn(2, 9, 11, 48)
    with torch.no_grad():
        assert_close_to_scale(ours(x), ref(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


def test_block_parts():
    block = MixerBlock(32, 'single_head', num_heads=1, head_dim=8, norm_layer='identity', pos_embed=3,
                       pos_embed_layer='conv_bn', mlp_layer='conv_bn_mlp', act_layer='relu')
    assert {n.split('.')[0] for n, _ in block.named_parameters()} == {'pos_embed', 'attn', 'mlp'}
    plain = MixerBlock(32, None, pos_embed=3, norm_layer='batchnorm')
    assert plain.attn is None and plain.norm1 is None and type(plain.norm2).__name__ == 'BatchNormChannelsLast'
    x = torch.randn(2, 5, 7, 32)
    assert block(x).shape == plain(x).shape == x.shape
    with pytest.raises(ValueError, match="norm_layer: expected one of .*'batchnorm'.* got 'bn'"):
        MixerBlock(32, 'window', norm_layer='bn')
    with pytest.raises(ValueError, match='pos_embed_layer'):
        MixerBlock(32, 'window', pos_embed=3, pos_embed_layer='conv_ln')


def test_bad_input():
    with pytest.raises(ValueError, match=r'num_heads \* head_dim: expected at most dim=32'):
        create_mixer('single_head', 32, num_heads=2, head_dim=20)
    with pytest.raises(ValueError, match='num_heads: expected a divisor of dim=32'):
        create_mixer('single_head', 32, num_heads=3)
    with pytest.raises(ValueError, match='types'):
        SHViT(types=('i', 's', 'x'))
    with pytest.raises(ValueError, match='one entry per stage'):
        SHViT(depths=(1, 1))
    model = timm.create_model('zoo_shvit_s1', **zoo.reduced_args('zoo_shvit_s1')).eval()
    with pytest.raises(ValueError, match=r'expected H and W >= 16, got \(15, 64\)'):
        model(torch.randn(1, 3, 15, 64))
    with pytest.raises(ValueError, match=r'expected input \(B, 3, H, W\)'):
        model(torch.randn(1, 1, 64, 64))
