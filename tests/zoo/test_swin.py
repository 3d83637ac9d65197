"""Swin family: exact parity with timm's Swin (timm and official checkpoint layouts), loading through
timm's pretrained machinery, parameter counts, any input size."""
import re

import pytest
import timm
import torch
from safetensors.torch import save_file

import zoo  # noqa: F401  (registers the models)
from zoo.weights import IncompatibleKeysError
from zoo.zoo_swin import SwinTransformer, checkpoint_filter_fn

VARIANTS = {  # ours -> (timm's model, paper parameter count)
    'swin_tiny': ('swin_tiny_patch4_window7_224', 28e6),
    'swin_small': ('swin_small_patch4_window7_224', 50e6),
    'swin_base': ('swin_base_patch4_window7_224', 88e6),
}


def _timm_model(name: str) -> torch.nn.Module:
    """A timm Swin with every parameter perturbed, so a mis-mapped tensor cannot hide behind init values."""
    torch.manual_seed(0)
    model = timm.create_model(VARIANTS[name][0]).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if 'relative_position_bias_table' in n else 0.02))
    return model


@pytest.fixture(scope='module')
def images() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope='module')
def tiny_pair(images):
    ref = _timm_model('swin_tiny')
    ours = _ours_from(ref, 'swin_tiny')
    with torch.no_grad():
        logits = ref(images)
    return ref, ours, logits


def _official_state_dict(ref: torch.nn.Module) -> dict:
    """timm's weights rewritten in microsoft/Swin-Transformer's layout (models/swin_transformer.py):
    PatchMerging at the END of stage N (`layers.N.downsample`, N = 0..2), classifier `head`, and the
    persistent buffers `attn.relative_position_index` (every block) and `attn_mask` (shifted blocks of
    stages whose map is larger than the window)."""
    out = {}
    for k, v in ref.state_dict().items():
        k = re.sub(r'^layers\.(\d+)\.downsample', lambda m: f'layers.{int(m.group(1)) - 1}.downsample', k)
        k = k.replace('head.fc.', 'head.')
        out[k] = v.clone()
    for i, stage in enumerate(ref.layers):
        for j, block in enumerate(stage.blocks):
            n = block.window_size[0] * block.window_size[1]
            out[f'layers.{i}.blocks.{j}.attn.relative_position_index'] = torch.randint(0, 169, (n, n))
            if any(block.shift_size):
                num_windows = (56 // 2 ** i // 7) ** 2
                out[f'layers.{i}.blocks.{j}.attn_mask'] = torch.zeros(num_windows, n, n)
    assert 'layers.0.downsample.reduction.weight' in out and 'layers.3.downsample.norm.weight' not in out
    assert 'layers.0.blocks.1.attn_mask' in out and 'layers.3.blocks.1.attn_mask' not in out
    return {'model': out}


def _ours_from(ref: torch.nn.Module, name: str) -> torch.nn.Module:
    """Our model built on the meta device (no init cost), every tensor assigned from timm's state dict."""
    with torch.device('meta'):
        ours = timm.create_model(name)
    sd = checkpoint_filter_fn({k: v.clone() for k, v in ref.state_dict().items()}, ours)
    ours.load_state_dict(sd, strict=True, assign=True)
    return ours.eval()


@pytest.mark.parametrize('name', list(VARIANTS))
def test_logits_match_timm(name, images, tiny_pair, assert_close_to_scale):
    if name == 'swin_tiny':
        ref, ours, ref_logits = tiny_pair
    else:
        ref = _timm_model(name)
        ours = _ours_from(ref, name)
        images = images[:1]
    n_ref = sum(p.numel() for p in ref.parameters())
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == n_ref
    # the paper rounds to whole millions (Swin-T has 28.29M, +1.03% over "28M")
    assert round(n_ours / 1e6) == VARIANTS[name][1] / 1e6
    with torch.no_grad():
        a = ref_logits if name == 'swin_tiny' else ref(images)
        b = ours(images)
    assert a.shape == b.shape == (images.shape[0], 1000)
    assert_close_to_scale(b, a)


def test_official_layout_loads_to_same_logits(tiny_pair, images, assert_close_to_scale):
    ref, _, logits = tiny_pair
    official = _official_state_dict(ref)
    model = timm.create_model('swin_tiny').eval()
    filtered = checkpoint_filter_fn(official, model)
    assert not [k for k in filtered if k.endswith(('relative_position_index', 'attn_mask'))]
    model.load_state_dict(filtered, strict=True)
    with torch.no_grad():
        assert_close_to_scale(model(images), logits)


def test_own_layout_passes_through(tiny_pair):
    _, ours, _ = tiny_pair
    sd = ours.state_dict()
    assert checkpoint_filter_fn(sd, ours).keys() == sd.keys()


@pytest.mark.parametrize('fmt', ['safetensors', 'pth', 'official_pth'])
def test_pretrained_file_through_timm(fmt, tiny_pair, images, tmp_path, assert_close_to_scale):
    ref, _, logits = tiny_pair
    if fmt == 'safetensors':
        path = tmp_path / 'swin_tiny.safetensors'
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    elif fmt == 'pth':
        path = tmp_path / 'swin_tiny.pth'
        torch.save(ref.state_dict(), path)
    else:
        path = tmp_path / 'swin_tiny_official.pth'
        torch.save(_official_state_dict(ref), path)
    model = timm.create_model('swin_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        assert_close_to_scale(model(images), logits)


def test_pretrained_file_new_head(tiny_pair, tmp_path):
    ref, ours, _ = tiny_pair
    path = tmp_path / 'swin_tiny.safetensors'
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    model = timm.create_model('swin_tiny', pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=str(path)))
    assert model.get_classifier().out_features == 10
    expected = ours.state_dict()
    for k, v in model.state_dict().items():
        if not k.startswith('head.fc.'):
            assert torch.equal(v, expected[k]), k


def test_pretrained_cfgs():
    for name, (timm_name, _) in VARIANTS.items():
        model_cfg = timm.models.get_pretrained_cfg(name)
        timm_cfg = timm.models.get_pretrained_cfg(f'{timm_name}.ms_in1k')
        assert model_cfg.tag == 'ms_in1k'
        assert model_cfg.hf_hub_id == f'timm/{timm_name}.ms_in1k' == timm_cfg.hf_hub_id
        assert model_cfg.url == timm_cfg.url and model_cfg.url.startswith(
            'https://github.com/SwinTransformer/storage/releases/download/')
        assert not model_cfg.fixed_input_size
    assert timm.models.get_pretrained_cfg('swin_base.ms_in22k_ft_in1k').hf_hub_id == \
        'timm/swin_base_patch4_window7_224.ms_in22k_ft_in1k'


def test_registry_and_interface(tiny_pair):
    _, ours, _ = tiny_pair
    for name in VARIANTS:
        assert timm.models._registry._model_to_module[name] == 'zoo_swin'
    assert isinstance(ours, SwinTransformer)
    params = dict(ours.named_parameters())
    cfg = ours.pretrained_cfg
    assert cfg['first_conv'] + '.weight' in params and cfg['classifier'] + '.weight' in params
    nwd = ours.no_weight_decay()
    tables = {n for n in params if n.endswith('relative_position_bias_table')}
    assert len(tables) == 12 and tables <= nwd
    assert [f['reduction'] for f in ours.feature_info] == [4, 8, 16, 32]
    assert [f['num_chs'] for f in ours.feature_info] == [96, 192, 384, 768]


@pytest.mark.parametrize('hw', [(97, 131), (200, 168)])
def test_any_input_size(hw, tiny_pair):
    _, ours, _ = tiny_pair
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        feats = ours.forward_intermediates(x, intermediates_only=True)
        logits = ours(x)
    expected = [tuple(-(-s // r) for s in hw) for r in (4, 8, 16, 32)]
    assert [tuple(f.shape[-2:]) for f in feats] == expected
    assert [f.shape[1] for f in feats] == [96, 192, 384, 768]
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()


def test_bad_kwargs():
    with pytest.raises(ValueError, match='attn_drop'):
        SwinTransformer(depths=(1, 1), num_heads=(1, 2), embed_dim=16, attn_drop_rate=0.1)
    with pytest.raises(ValueError, match='num_heads'):
        SwinTransformer(depths=(1, 1), num_heads=(1,), embed_dim=16)
    with pytest.raises(IncompatibleKeysError, match='absolute position'):
        checkpoint_filter_fn({'absolute_pos_embed': torch.zeros(1)}, SwinTransformer(depths=(1, 1), num_heads=(1, 2)))
