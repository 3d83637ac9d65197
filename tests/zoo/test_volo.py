"""VOLO d1..d5 against timm's VOLO (the independent oracle, built here with the same random weights): logits of
volo_d1_224 through pretrained=True, parameter counts and key-map loads of every release size, the outlook mixer
against timm's OutlookAttention, stage features, the position table resized in the graph (any size, dynamic ONNX
with both exporters), drop-path schedule, bad input."""
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.volo import VOLO, OutlookAttention as TimmOutlook

import zoo
from zoo.blocks import create_mixer
from zoo.blocks.block import resize_pos_table
from zoo.weights.keymap import IncompatibleKeysError, remap_state_dict
from zoo.weights.onnx import export_onnx
from zoo.zoo_volo import KEY_MAP

SMALL = zoo.reduced_args('zoo_volo_d1')
# zoo name with tag -> timm name, every release timm has
RELEASES = {
    'zoo_volo_d1.sail_in1k_224': 'volo_d1_224', 'zoo_volo_d1.sail_in1k_384': 'volo_d1_384',
    'zoo_volo_d2.sail_in1k_224': 'volo_d2_224', 'zoo_volo_d2.sail_in1k_384': 'volo_d2_384',
    'zoo_volo_d3.sail_in1k_224': 'volo_d3_224', 'zoo_volo_d3.sail_in1k_448': 'volo_d3_448',
    'zoo_volo_d4.sail_in1k_224': 'volo_d4_224', 'zoo_volo_d4.sail_in1k_448': 'volo_d4_448',
    'zoo_volo_d5.sail_in1k_224': 'volo_d5_224', 'zoo_volo_d5.sail_in1k_448': 'volo_d5_448',
    'zoo_volo_d5.sail_in1k_512': 'volo_d5_512',
}


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Weights away from their init (zero biases, unit norms, BN statistics) so that every parameter matters."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith('running_mean'):
                b.normal_(0, 0.2)
            elif name.endswith('running_var'):
                b.uniform_(0.5, 1.5)
    return model.eval()


def _timm_reduced(**kwargs) -> torch.nn.Module:
    """timm's VOLO class at the reduced widths (its entrypoints fix the widths)."""
    return _randomise(VOLO(**dict(SMALL, **kwargs)))


def _save(model: torch.nn.Module, path) -> str:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def test_registered_with_timm_release_names():
    assert timm.list_models(module='zoo_volo') == [f'zoo_volo_d{i}' for i in range(1, 6)]
    assert sorted(timm.list_pretrained('zoo_volo_*')) == sorted(RELEASES)
    for ours, theirs in RELEASES.items():
        cfg = timm.models.get_pretrained_cfg(ours)
        size = int(ours.rsplit('_', 1)[1])
        assert cfg.hf_hub_id == f'timm/{theirs}.sail_in1k' and cfg.input_size == (3, size, size)
        assert cfg.url == timm.models.get_pretrained_cfg(f'{theirs}.sail_in1k').url


def test_d1_logits_equal_timm(tmp_path, assert_close_to_scale):
    """timm's volo_d1_224 with random weights, its state dict loaded unchanged with pretrained=True: equal logits
    (fp32, batch 2, max |diff| <= 1e-5 of the logit scale)."""
    ref = _randomise(timm.create_model('volo_d1_224'))
    path = _save(ref, tmp_path / 'volo_d1_224.safetensors')
    model = timm.create_model('zoo_volo_d1', pretrained=True, pretrained_cfg_overlay=dict(file=path)).eval()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = ref(x)
        got = model(x)
    assert want.abs().max() > 1
    assert_close_to_scale(got, want)


@pytest.mark.parametrize('pool', ['token', 'avg'])
def test_reduced_logits_and_stage_features_equal_timm(pool, tmp_path, assert_close_to_scale):
    ref = _timm_reduced(global_pool=pool)
    model = timm.create_model('zoo_volo_d1', pretrained=True, global_pool=pool,
                              pretrained_cfg_overlay=dict(file=_save(ref, tmp_path / 'v.safetensors')), **SMALL)
    model.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert_close_to_scale(model(x), ref(x))
        want = ref.forward_intermediates(x, intermediates_only=True)  # network 0, 2, 3, 4
        got = model.forward_intermediates(x, intermediates_only=True)  # stages 0, 1, 2
        for g, w in zip(got, (want[0], want[1], want[3])):
            assert_close_to_scale(g, w)
        # pre-logits: the class token (or the token mean) after the class attention and the norm
        assert_close_to_scale(model.forward_head(model.forward_features(x), pre_logits=True),
                              ref.forward_head(ref.forward_features(x), pre_logits=True))


def test_tag_builds_the_release_size_and_loads_its_file(tmp_path, assert_close_to_scale):
    ref = _timm_reduced(img_size=384)
    path = _save(ref, tmp_path / 'volo_d1_384.safetensors')
    model = timm.create_model('zoo_volo_d1.sail_in1k_384', pretrained=True, pretrained_cfg_overlay=dict(file=path),
                              **SMALL).eval()
    assert model.stages[1].pos_embed.table.shape == (1, 24, 24, 32)
    assert model.pretrained_cfg['input_size'] == (3, 384, 384) and model.pretrained_cfg['pool_size'] == (24, 24)
    x = torch.randn(2, 3, 384, 384)
    with torch.no_grad():
        assert_close_to_scale(model(x), ref(x))
    with pytest.raises(IncompatibleKeysError, match=r"other shape .*'stages.1.pos_embed.table'"):
        timm.create_model('zoo_volo_d1', pretrained=True, pretrained_cfg_overlay=dict(file=path), **SMALL)


@pytest.mark.parametrize('release', sorted(RELEASES))
def test_param_counts_and_key_map_of_every_release(release):
    """Built on the meta device: timm's state dict of the release (names and shapes) maps one to one onto ours."""
    with torch.device('meta'):
        ref = timm.create_model(RELEASES[release])
        model = timm.create_model(release)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    mapped = remap_state_dict(ref.state_dict(), model, KEY_MAP, source=RELEASES[release])
    assert sorted(mapped) == sorted(model.state_dict())


def test_key_map_numbers_the_last_group_after_the_third():
    with torch.device('meta'):
        sd = timm.create_model('volo_d1_224').state_dict()  # groups 3 and 4: 8 and 2 blocks
        model = timm.create_model('zoo_volo_d1')
    mapped = remap_state_dict(sd, model, KEY_MAP)
    assert 'stages.2.blocks.9.attn.qkv.weight' in mapped and 'stages.2.blocks.10.attn.qkv.weight' not in mapped
    assert mapped['stages.1.pos_embed.table'].shape == (1, 14, 14, 384)
    assert [len(s.blocks) for s in model.stages] == [4, 4, 10]


@pytest.mark.parametrize('hw', [(28, 28), (13, 7), (1, 1), (6, 5)])
def test_outlook_mixer_equals_timm(hw, assert_close_to_scale):
    """timm's OutlookAttention (unfold / avg-pool with ceil_mode / fold), odd sizes included: same output and
    gradients with the same weights (fp64)."""
    ref = TimmOutlook(32, 4, kernel_size=3, padding=1, stride=2).double()
    mixer = create_mixer('outlook', 32, num_heads=4, qkv_bias=False).double()
    mixer.load_state_dict(ref.state_dict())
    x = torch.randn(2, *hw, 32, dtype=torch.float64, requires_grad=True)
    out, want = mixer(x), ref(x)
    assert_close_to_scale(out, want)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, [x, *mixer.parameters()], g),
                    torch.autograd.grad(want, [x, *ref.parameters()], g)):
        assert_close_to_scale(a, b)


def test_outlook_other_kernel_and_stride_equal_unfold_fold(assert_close_to_scale):
    """kernel 5 / stride 3 and kernel 3 / stride 1 against the same computation written with F.unfold / F.fold."""
    for k, s in ((5, 3), (3, 1)):
        m = create_mixer('outlook', 16, num_heads=2, kernel_size=k, stride=s).double()
        x = torch.randn(2, 10, 7, 16, dtype=torch.float64)
        H, W = x.shape[1:3]
        h, w = -(-H // s), -(-W // s)
        v = F.unfold(m.v(x).permute(0, 3, 1, 2), k, padding=k // 2, stride=s)  # (B, C * k^2, h * w)
        v = v.reshape(2, 2, 8, k * k, h * w).permute(0, 1, 4, 3, 2)
        a = F.avg_pool2d(x.permute(0, 3, 1, 2), s, s, ceil_mode=True).permute(0, 2, 3, 1)
        a = (m.attn(a).reshape(2, h * w, 2, k * k, k * k).permute(0, 2, 1, 3, 4) * 8 ** -0.5).softmax(-1)
        y = (a @ v).permute(0, 1, 4, 3, 2).reshape(2, 16 * k * k, h * w)
        y = F.fold(y, (H, W), k, padding=k // 2, stride=s).permute(0, 2, 3, 1)
        assert_close_to_scale(m(x), m.proj(y))


def test_position_table_resized_in_the_graph(assert_close_to_scale):
    """At the table's own size the table itself; elsewhere the bicubic resize (align_corners=False); ours at
    320 x 256 equals timm's VOLO built for that size with the resized table."""
    table = torch.randn(1, 14, 14, 8)
    assert resize_pos_table(table, 14, 14) is table
    for h, w in ((20, 16), (7, 9)):
        want = F.interpolate(table.permute(0, 3, 1, 2), (h, w), mode='bicubic', align_corners=False)
        assert torch.equal(resize_pos_table(table, h, w), want.permute(0, 2, 3, 1))
    # the export path interpolates at the table's size too: exactly the table
    exported = F.interpolate(table.permute(0, 3, 1, 2), (14, 14), mode='bicubic', align_corners=False)
    assert torch.equal(exported.permute(0, 2, 3, 1), table)

    ref = _timm_reduced()
    model = timm.create_model('zoo_volo_d1', **SMALL).eval()
    model.load_state_dict(remap_state_dict(ref.state_dict(), model, KEY_MAP))
    sized = _timm_reduced(img_size=(320, 256))
    sd = dict(ref.state_dict(), pos_embed=resize_pos_table(ref.pos_embed, 20, 16))
    sized.load_state_dict(sd)
    x = torch.randn(2, 3, 320, 256)
    with torch.no_grad():
        assert_close_to_scale(model(x), sized(x))


@pytest.mark.parametrize('hw', [(97, 131), (320, 256), (16, 16)])
def test_any_size_finite_with_three_feature_maps(hw):
    model = timm.create_model('zoo_volo_d1', **SMALL).eval()
    feats = timm.create_model('zoo_volo_d1', features_only=True, **SMALL).eval()
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        out = model(x)
        maps = feats(x)
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    assert len(maps) == 3 and feats.feature_info.reduction() == [8, 16, 16]
    for f, r in zip(maps, (8, 16, 16)):
        assert f.shape[-2:] == (-(-hw[0] // r), -(-hw[1] // r)) and torch.isfinite(f).all()


@pytest.mark.parametrize('exporter', ['legacy', 'dynamo'])
def test_dynamic_onnx_from_224_serves_other_sizes(exporter, tmp_path):
    """One export at 224 checked in onnxruntime at 160 x 192 and 320 x 256 (export_onnx's other sizes); the
    position table is made large so that a baked or wrong resize would show."""
    model = timm.create_model('zoo_volo_d1', num_classes=0, global_pool='', **SMALL).eval()
    with torch.no_grad():
        model.stages[1].pos_embed.table.normal_(0, 3.)
    report = export_onnx(model, tmp_path / 'volo.onnx', img_size=224, dynamic=True, exporter=exporter)
    assert [c['input_shape'][2:] for c in report['checks']] == [(224, 224), (160, 192), (320, 256)]
    assert all(c['max_abs_err'] <= c['tol'] for c in report['checks']), report['checks']


def test_drop_path_as_official():
    """No drop path in the outlookers; the transformer blocks' rates rise linearly over all blocks, as timm's."""
    model = timm.create_model('zoo_volo_d1', drop_path_rate=0.3)
    ref = timm.create_model('volo_d1_224', drop_path_rate=0.3)
    ours = [getattr(b.drop_path1, 'drop_prob', 0.) for s in model.stages for b in s.blocks]
    theirs = [getattr(b.drop_path1, 'drop_prob', 0.) for g in (0, 2, 3, 4) for b in ref.network[g]]
    assert ours[:4] == [0.] * 4 and max(ours) > 0.
    assert ours == pytest.approx(theirs)


def test_bad_input(tmp_path):
    model = timm.create_model('zoo_volo_d1', **SMALL).eval()
    with pytest.raises(ValueError, match=r'expected H and W >= 16, got \(15, 64\)'):
        model(torch.randn(1, 3, 15, 64))
    with pytest.raises(ValueError, match='img_size: expected H and W >= 16'):
        timm.create_model('zoo_volo_d1', img_size=8, **SMALL)
    with pytest.raises(ValueError, match='num_heads: expected a divisor of dim=16, got 3'):
        timm.create_model('zoo_volo_d1', **dict(SMALL, num_heads=(3, 4, 4, 4)))
    with pytest.raises(ValueError, match='num_heads: expected a divisor of dim=32, got 5'):
        timm.create_model('zoo_volo_d1', **dict(SMALL, num_heads=(2, 5, 5, 5)))
    with pytest.raises(ValueError, match='one width with one head count'):
        timm.create_model('zoo_volo_d1', **dict(SMALL, embed_dims=(16, 32, 32, 64)))
    with pytest.raises(ValueError, match="global_pool: expected one of"):
        timm.create_model('zoo_volo_d1', global_pool='max', **SMALL)


@pytest.mark.parametrize('other', ['volo_d1_224-deeper', 'volo_d2_224', 'swin_tiny'])
def test_foreign_file_is_refused_whole(other, tmp_path):
    """A timm file of another variant (other depth, other widths) or another family: one IncompatibleKeysError
    naming the file, and no model comes out (nothing is loaded partially)."""
    if other == 'swin_tiny':
        ref = timm.create_model('swin_tiny_patch4_window7_224', embed_dim=16, depths=(1, 1, 1, 1),
                                num_heads=(1, 2, 4, 8))
    elif other == 'volo_d2_224':
        ref = VOLO(**dict(SMALL, embed_dims=(32, 64, 64, 64)))
    else:
        ref = VOLO(**dict(SMALL, layers=(2, 1, 2, 1)))
    path = _save(ref, tmp_path / f'{other}.safetensors')
    with pytest.raises(IncompatibleKeysError, match='does not belong to'):
        timm.create_model('zoo_volo_d1', pretrained=True, pretrained_cfg_overlay=dict(file=path), **SMALL)


def test_pruned_head_and_classifier_reset():
    model = timm.create_model('zoo_volo_d1', **SMALL).eval()
    assert model.no_weight_decay() == {'stages.1.pos_embed.table', 'head.cls_token'}  # timm's pos_embed, cls_token
    model.reset_classifier(10)
    assert model.head.fc.out_features == model.head.aux_head.out_features == 10
    x = torch.randn(1, 3, 64, 64)
    assert model(x).shape == (1, 10)
    model.prune_intermediate_layers([0, 1])
    assert model.head.cls_token is None and model.head.blocks is None and model.head.aux_head is None
    assert model(x).shape == (1, 32, 4, 4)
    with pytest.raises(ValueError, match="'token' needs the class token"):
        model.reset_classifier(5, 'token')
    model.reset_classifier(5, 'avg')
    assert model(x).shape == (1, 5)


@pytest.mark.parametrize('k, s', [(3, 2), (5, 3), (3, 1), (1, 1)])
@pytest.mark.parametrize('hw', [(9, 14), (1, 1), (8, 8)])
def test_outlook_export_path_equals_eager(k, s, hw, monkeypatch, assert_close_to_scale):
    """While exporting, outlook attention sums the windows back with pads and slices instead of F.fold: the same
    output and gradients."""
    import zoo.blocks.outlook as outlook
    m = create_mixer('outlook', 16, num_heads=2, kernel_size=k, stride=s).double()
    x = torch.randn(2, *hw, 16, dtype=torch.float64, requires_grad=True)
    want = m(x)
    (gx_want,) = torch.autograd.grad(want.square().sum(), x)
    monkeypatch.setattr(outlook, 'is_exporting', lambda: True)
    got = m(x)
    (gx,) = torch.autograd.grad(got.square().sum(), x)
    assert_close_to_scale(got, want)
    assert_close_to_scale(gx, gx_want)
