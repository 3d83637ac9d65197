"""DaViT: timm's davit_* counts and weights (logit parity with timm's model built here, batch 2), the official
release layout through the key map, channel group attention against timm's at any size, any input size, dynamic
ONNX with both exporters, wrong files and bad arguments.

Parity with the official dingmyu/davit code needs that code, which is not part of this project: measured when the
family was added (official DaViT with random weights through checkpoint_filter_fn; see the README's DaViT section)."""
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from timm.models.davit import ChannelAttention

import zoo
from zoo.blocks import create_mixer
from zoo.weights.keymap import IncompatibleKeysError
from zoo.weights.onnx import export_onnx
from zoo.zoo_davit import checkpoint_filter_fn

SIZES = ('tiny', 'small', 'base', 'large', 'huge', 'giant')
NAMES = [f'zoo_davit_{s}' for s in SIZES]
# measured: timm.create_model('davit_*') parameter counts (timm 1.0.31)
TIMM_PARAMS = {'tiny': 28_360_168, 'small': 49_745_896, 'base': 87_954_408, 'large': 196_811_752,
               'huge': 348_922_856, 'giant': 1_406_470_120}
LAYOUT = json.loads((Path(__file__).parent / 'golden' / 'davit_official_layout.json').read_text())
SMALL = zoo.reduced_args('zoo_davit_tiny')


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope='module')
def timm_tiny():
    torch.manual_seed(0)
    ref = timm.create_model('davit_tiny').eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        logits = ref(x)
    return ref, x, logits


def test_names_and_pretrained_cfgs():
    assert sorted(timm.list_models(module='zoo_davit')) == sorted(NAMES)
    assert set(NAMES).isdisjoint(timm.list_models(module='davit'))
    for size in ('tiny', 'small', 'base'):
        ours = timm.models.get_pretrained_cfg(f'zoo_davit_{size}.msft_in1k')
        theirs = timm.models.get_pretrained_cfg(f'davit_{size}.msft_in1k')
        assert ours.hf_hub_id == f'timm/davit_{size}.msft_in1k'
        for field in ('input_size', 'crop_pct', 'interpolation', 'mean', 'std', 'num_classes', 'first_conv',
                      'classifier'):
            assert getattr(ours, field) == getattr(theirs, field), field


@pytest.mark.parametrize('size', SIZES)
def test_param_counts_equal_timm(size):
    with torch.device('meta'):
        ours = timm.create_model(f'zoo_davit_{size}')
    assert _num_params(ours) == TIMM_PARAMS[size]


@pytest.mark.parametrize('size', ['small', 'giant'])
def test_timm_state_dicts_map_one_to_one(size):
    """Every key of timm's model lands on a parameter of ours with its shape (built on the meta device)."""
    with torch.device('meta'):
        ref, ours = timm.create_model(f'davit_{size}'), timm.create_model(f'zoo_davit_{size}')
    mapped = checkpoint_filter_fn(ref.state_dict(), ours)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in ours.state_dict().items()}


def test_timm_parity_batch_2(timm_tiny, assert_close_to_scale):
    ref, x, want = timm_tiny
    ours = timm.create_model('zoo_davit_tiny').eval()
    ours.load_state_dict(checkpoint_filter_fn(ref.state_dict(), ours), strict=True)
    with torch.no_grad():
        got = ours(x)
    assert want.std() > 0.05 and not torch.allclose(want[0], want[1], atol=1e-3)
    assert_close_to_scale(got, want)  # fp32, 1e-5 of the logit scale


def test_load_timm_checkpoint_file(timm_tiny, tmp_path, assert_close_to_scale):
    from safetensors.torch import save_file
    ref, x, want = timm_tiny
    path = tmp_path / 'davit_tiny.safetensors'
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    model = timm.create_model('zoo_davit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        assert_close_to_scale(model(x), want)


def test_official_layout_loads_one_to_one(official_checkpoint, tmp_path):
    state, path = official_checkpoint(LAYOUT['DaViT_tiny'], tmp_path / 'davit_tiny_official.pth')
    model = timm.create_model('zoo_davit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    ours = model.state_dict()
    assert len(ours) == len(state)
    torch.testing.assert_close(ours['stages.2.blocks.5.pos_embed2.proj.weight'],
                               state['main_blocks.2.2.1.cpe.1.proj.weight'])
    torch.testing.assert_close(ours['stages.1.downsample.norm.weight'], state['patch_embeds.1.norm.weight'])
    torch.testing.assert_close(ours['head.norm.weight'], state['norms.weight'])


@pytest.mark.parametrize('other', ['davit_small', 'gcvit_tiny'])
def test_wrong_file_is_one_clear_error_and_nothing_loads(other, tmp_path):
    path = tmp_path / f'{other}.pth'
    with torch.device('meta'):
        state = timm.create_model(other).state_dict()
    torch.save({k: torch.zeros(v.shape) for k, v in state.items()}, path)
    with pytest.raises(IncompatibleKeysError, match='does not belong to zoo_davit_tiny'):
        timm.create_model('zoo_davit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


@pytest.mark.parametrize('hw', [(7, 7), (13, 22), (1, 5)])
def test_channel_group_attention_is_timms(hw):
    ref = ChannelAttention(48, num_heads=3, qkv_bias=True).eval()
    ours = create_mixer('channel_group', 48, num_heads=3).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, *hw, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x.flatten(1, 2)).view_as(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('size', [(97, 131), (320, 256)])
def test_any_size_is_timms_and_four_feature_maps(size, timm_tiny, assert_close_to_scale):
    """At sizes that are no multiple of the windows the padded tokens join the keys, as in timm and the official
    code, so the logits are still timm's."""
    ref = timm_tiny[0]
    model = timm.create_model('zoo_davit_tiny').eval()
    model.load_state_dict(checkpoint_filter_fn(ref.state_dict(), model), strict=True)
    feats = timm.create_model('zoo_davit_tiny', features_only=True).eval()
    feats.load_state_dict(model.state_dict(), strict=False)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out, maps, want = model(x), feats(x), ref(x)
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    assert_close_to_scale(out, want)
    assert len(maps) == 4
    for f, r, c in zip(maps, (4, 8, 16, 32), (96, 192, 384, 768)):
        assert f.shape == (2, c, -(-size[0] // r), -(-size[1] // r)) and torch.isfinite(f).all()


@pytest.mark.parametrize('exporter', ['legacy', 'dynamo'])
def test_dynamic_onnx_from_224(exporter, tmp_path):
    model = timm.create_model('zoo_davit_tiny', **SMALL).eval()
    report = export_onnx(model, tmp_path / 'davit.onnx', img_size=224, dynamic=True, exporter=exporter)
    assert [c['input_shape'][2:] for c in report['checks']] == [(224, 224), (160, 192), (320, 256)]
    assert all(c['max_abs_err'] <= c['tol'] for c in report['checks'])


def test_bad_input():
    model = timm.create_model('zoo_davit_tiny', **SMALL).eval()
    with pytest.raises(ValueError, match=r'expected H and W >= 32, got \(64, 20\)'):
        model(torch.randn(1, 3, 64, 20))
    with pytest.raises(ValueError, match='num_heads: expected a divisor of dim=32'):
        timm.create_model('zoo_davit_tiny', **dict(SMALL, num_heads=(1, 3, 4, 4)))
    with pytest.raises(ValueError, match='embed_dims, depths, num_heads: expected one entry per stage'):
        timm.create_model('zoo_davit_tiny', **dict(SMALL, num_heads=(1, 2, 4)))
