"""Twins (PCPVT, SVT): logits equal timm's model with the same weights, timm's and the official layout load through
timm's pretrained machinery, parameter counts equal timm's, every pixel used at any size, clear errors."""
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.twins import GlobalSubSampleAttn, LocallyGroupedAttn

import zoo  # noqa: F401  (registers the models)
from zoo.blocks import create_mixer
from zoo.weights import IncompatibleKeysError
from zoo.zoo_twins import Twins, checkpoint_filter_fn

VARIANTS = {  # ours -> timm's parameter count (research/families.md section 1, measured)
    'zoo_twins_pcpvt_small': 24_106_216, 'zoo_twins_pcpvt_base': 43_828_456, 'zoo_twins_pcpvt_large': 60_989_672,
    'zoo_twins_svt_small': 24_060_776, 'zoo_twins_svt_base': 56_070_952, 'zoo_twins_svt_large': 99_271_400,
}
SMALL = ['zoo_twins_pcpvt_small', 'zoo_twins_svt_small']


def _timm_name(name: str) -> str:
    return name[len('zoo_'):]


def _timm_model(name: str) -> torch.nn.Module:
    """timm's model with every parameter perturbed, so a mis-mapped tensor cannot hide behind init values."""
    torch.manual_seed(0)
    model = timm.create_model(_timm_name(name)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _ours_from(ref: torch.nn.Module, name: str) -> torch.nn.Module:
    with torch.device('meta'):
        ours = timm.create_model(name)
    sd = checkpoint_filter_fn({k: v.clone() for k, v in ref.state_dict().items()}, ours)
    ours.load_state_dict(sd, strict=True, assign=True)
    return ours.eval()


@pytest.fixture(scope='module')
def images() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope='module', params=SMALL)
def pair(request, images):
    ref = _timm_model(request.param)
    with torch.no_grad():
        logits = ref(images)
    return request.param, ref, _ours_from(ref, request.param), logits


def test_logits_match_timm(pair, images, assert_close_to_scale):
    name, ref, ours, logits = pair
    assert sum(p.numel() for p in ours.parameters()) == VARIANTS[name]
    with torch.no_grad():
        got = ours(images)
    assert got.shape == (2, 1000)
    assert_close_to_scale(got, logits)
    # batch items stay independent: the second image alone gives its own logits
    with torch.no_grad():
        assert_close_to_scale(ours(images[1:]), logits[1:])


@pytest.mark.parametrize('name', list(VARIANTS))
def test_param_counts_and_key_map_equal_timm(name):
    with torch.device('meta'):
        ref = timm.create_model(_timm_name(name))
        ours = timm.create_model(name)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == VARIANTS[name]
    sd = checkpoint_filter_fn(ref.state_dict(), ours)  # checks every key and shape
    assert sd.keys() == ours.state_dict().keys()
    ours.load_state_dict(sd, strict=True, assign=True)


@pytest.mark.parametrize('fmt', ['safetensors', 'official_pth'])
def test_pretrained_file_through_timm(fmt, pair, images, tmp_path, assert_close_to_scale):
    name, ref, _, logits = pair
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    if fmt == 'safetensors':
        path = tmp_path / f'{name}.safetensors'
        save_file(sd, str(path))
    else:  # Meituan-AutoML/Twins saves timm's key names under 'model' (research/families.md 5.4)
        path = tmp_path / f'{name}.pth'
        torch.save({'model': sd, 'epoch': 299}, path)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        assert_close_to_scale(model(images), logits)


def test_foreign_files_are_refused(pair, tmp_path):
    name, ref, _, _ = pair
    other = 'zoo_twins_svt_small' if 'pcpvt' in name else 'zoo_twins_pcpvt_small'
    path = tmp_path / 'w.safetensors'
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    for target in (other, name.replace('small', 'base')):
        with pytest.raises(IncompatibleKeysError):
            timm.create_model(target, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    swin = timm.create_model('swin_tiny', **zoo.reduced_args('swin_tiny'))
    with pytest.raises(IncompatibleKeysError):
        checkpoint_filter_fn(swin.state_dict(), timm.create_model(name, **zoo.reduced_args(name)))


def test_pretrained_cfgs():
    for name in VARIANTS:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.tag == 'in1k' and cfg.hf_hub_id == f'timm/{_timm_name(name)}.in1k'
        assert cfg.hf_hub_id == timm.models.get_pretrained_cfg(_timm_name(name) + '.in1k').hf_hub_id
        assert not cfg.fixed_input_size
        assert timm.models._registry._model_to_module[name] == 'zoo_twins'


@pytest.mark.parametrize('hw', [(97, 131), (320, 256)])
def test_any_size_uses_every_pixel(pair, hw, assert_close_to_scale):
    name, ref, ours, _ = pair
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        feats = ours.forward_intermediates(x, intermediates_only=True)
        logits = ours(x)
    assert [tuple(f.shape[-2:]) for f in feats] == [tuple(-(-s // r) for s in hw) for r in (4, 8, 16, 32)]
    assert torch.isfinite(logits).all()
    if hw == (320, 256):  # every stride and reduction divides: timm's result exactly
        with torch.no_grad():
            assert_close_to_scale(logits, ref(x))
    if hw == (97, 131):
        crop = x[..., :96, :128]
        with torch.no_grad():
            # timm crops silently: the last row / column of pixels does not change its output; ours does
            torch.testing.assert_close(ref(x), ref(crop), rtol=0, atol=0)
            changed = x.clone()
            changed[..., 96:, :] += 1.
            assert not torch.allclose(ours(changed), logits)


def test_window_option_is_twins_locally_grouped_attention(assert_close_to_scale):
    torch.manual_seed(0)
    ref = LocallyGroupedAttn(32, num_heads=2, ws=7).eval()
    ours = create_mixer('window', 32, num_heads=2, window_size=7, rel_pos_bias=False, mask_padding=False).eval()
    ours.load_state_dict(ref.state_dict())
    masked = create_mixer('window', 32, num_heads=2, window_size=7, rel_pos_bias=False).eval()
    masked.load_state_dict(ref.state_dict())
    x = torch.randn(2, 11, 13, 32)
    with torch.no_grad():
        want = ref(x.flatten(1, 2), (11, 13)).view(2, 11, 13, 32)
        assert_close_to_scale(ours(x), want)
        assert not torch.allclose(masked(x), want, atol=1e-4)  # Swin's masking is another result


@pytest.mark.parametrize('sr', [1, 2])
def test_spatial_reduction_is_timm_global_subsampled_attention(sr, assert_close_to_scale):
    torch.manual_seed(0)
    ref = GlobalSubSampleAttn(32, num_heads=2, sr_ratio=sr).eval()
    ours = create_mixer('spatial_reduction', 32, num_heads=2, sr_ratio=sr).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 10, 12, 32)
    with torch.no_grad():
        assert_close_to_scale(ours(x), ref(x.flatten(1, 2), (10, 12)).view(2, 10, 12, 32))


def test_bad_input():
    mixer = create_mixer('spatial_reduction', 32, num_heads=2, sr_ratio=4)
    with pytest.raises(ValueError, match=r'sr_ratio=4 is larger than the map: expected H and W >= 4, got \(3, 9\)'):
        mixer(torch.randn(1, 3, 9, 32))
    with pytest.raises(ValueError, match='sr_ratio: expected a positive int'):
        create_mixer('spatial_reduction', 32, sr_ratio=0)
    with pytest.raises(ValueError, match='num_heads: expected a divisor of dim=16'):
        timm.create_model('zoo_twins_svt_small', **dict(zoo.reduced_args('zoo_twins_svt_small'),
                                                        num_heads=(3, 2, 4, 4)))
    with pytest.raises(ValueError, match='depths: .* expected depths >= 2'):
        Twins(depths=(1, 2, 2, 2), embed_dims=(16, 32, 48, 64))
    with pytest.raises(ValueError, match='expected one entry per stage'):
        Twins(depths=(2, 2, 2), embed_dims=(16, 32, 48, 64))
    model = timm.create_model('zoo_twins_pcpvt_small', **zoo.reduced_args('zoo_twins_pcpvt_small')).eval()
    with pytest.raises(ValueError, match=r'expected H and W >= 29, got \(28, 64\)'):
        model(torch.randn(1, 3, 28, 64))
    assert model(torch.randn(1, 3, 29, 29)).shape == (1, 1000)
