"""GC ViT: timm's gcvit_* counts and weights (logit parity with timm's model built here, batch 2), the official
release layout through the key map, each image's windows with its own global query, any input size, dynamic ONNX
with both exporters, wrong files and bad arguments.

Parity with the official NVlabs code needs that code, which is not part of this project: measured when the family
was added (official GCViT with random weights through checkpoint_filter_fn; see the README's GC ViT section)."""
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn

import zoo
from zoo.blocks import MixerBlock, create_mixer
from zoo.blocks.gcvit import GlobalQueryGen
from zoo.weights.keymap import IncompatibleKeysError
from zoo.weights.onnx import export_onnx
from zoo.zoo_gcvit import checkpoint_filter_fn

SIZES = ('xxtiny', 'xtiny', 'tiny', 'small', 'base')
NAMES = [f'zoo_gcvit_{s}' for s in SIZES]
# measured: timm.create_model('gcvit_*') parameter counts (timm 1.0.31)
TIMM_PARAMS = {'xxtiny': 11_995_428, 'xtiny': 19_981_294, 'tiny': 28_221_974, 'small': 51_092_173,
               'base': 90_320_836}
LAYOUT = json.loads((Path(__file__).parent / 'golden' / 'gcvit_official_layout.json').read_text())
SMALL = zoo.reduced_args('zoo_gcvit_xxtiny')


def _randomise(model: nn.Module) -> nn.Module:
    """Bias tables and layer scales away from their near-zero init, so the mapping of each one matters."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith('relative_position_bias_table') or 'gamma' in n:
                p.normal_(0., 1.)
    return model.eval()


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope='module')
def timm_xxtiny():
    torch.manual_seed(0)
    ref = _randomise(timm.create_model('gcvit_xxtiny'))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        logits = ref(x)
    return ref, x, logits


def test_names_and_pretrained_cfgs():
    assert sorted(timm.list_models(module='zoo_gcvit')) == sorted(NAMES)
    assert set(NAMES).isdisjoint(timm.list_models(module='gcvit'))
    for size in SIZES:
        ours = timm.models.get_pretrained_cfg(f'zoo_gcvit_{size}.in1k')
        theirs = timm.models.get_pretrained_cfg(f'gcvit_{size}.in1k')
        assert ours.hf_hub_id == f'timm/gcvit_{size}.in1k'
        for field in ('input_size', 'crop_pct', 'interpolation', 'mean', 'std', 'num_classes', 'classifier'):
            assert getattr(ours, field) == getattr(theirs, field), field
        assert theirs.fixed_input_size and not ours.fixed_input_size


@pytest.mark.parametrize('size', SIZES)
def test_param_counts_equal_timm(size):
    with torch.device('meta'):
        ours = timm.create_model(f'zoo_gcvit_{size}')
    assert _num_params(ours) == TIMM_PARAMS[size]


@pytest.mark.parametrize('size', ['xtiny', 'small'])
def test_timm_state_dicts_map_one_to_one(size):
    """Every key of timm's model lands on a parameter of ours with its shape (built on the meta device)."""
    with torch.device('meta'):
        ref, ours = timm.create_model(f'gcvit_{size}'), timm.create_model(f'zoo_gcvit_{size}')
    mapped = checkpoint_filter_fn(ref.state_dict(), ours)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in ours.state_dict().items()}


def test_timm_parity_batch_2(timm_xxtiny, assert_close_to_scale):
    ref, x, want = timm_xxtiny
    ours = timm.create_model('zoo_gcvit_xxtiny').eval()
    ours.load_state_dict(checkpoint_filter_fn(ref.state_dict(), ours), strict=True)
    with torch.no_grad():
        got = ours(x)
    assert want.std() > 0.05 and not torch.allclose(want[0], want[1], atol=1e-3)
    assert_close_to_scale(got, want)  # fp32, 1e-5 of the logit scale
    with torch.no_grad():  # each image's windows read that image's global query
        one = ours(x[1:])
    assert_close_to_scale(one, want[1:])


def test_load_timm_checkpoint_file(timm_xxtiny, tmp_path, assert_close_to_scale):
    from safetensors.torch import save_file
    ref, x, want = timm_xxtiny
    path = tmp_path / 'gcvit_xxtiny.safetensors'
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    model = timm.create_model('zoo_gcvit_xxtiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        assert_close_to_scale(model(x), want)


def test_official_layout_loads_one_to_one(official_checkpoint, tmp_path):
    state, path = official_checkpoint(LAYOUT['gc_vit_xxtiny'], tmp_path / 'gcvit_xxtiny_official.pth')
    model = timm.create_model('zoo_gcvit_xxtiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    ours = model.state_dict()
    assert len(ours) == len(state) - 12  # the official relative_position_index buffers are dropped
    torch.testing.assert_close(ours['stages.1.downsample.reduction.weight'],
                               state['levels.0.downsample.reduction.weight'])
    torch.testing.assert_close(ours['stages.0.context.blocks.conv3.se.fc1.weight'].flatten(1),
                               state['levels.0.q_global_gen.to_q_global.2.conv.2.fc.0.weight'])
    torch.testing.assert_close(ours['head.fc.weight'], state['head.weight'])


@pytest.mark.parametrize('other', ['gcvit_xtiny', 'davit_tiny'])
def test_wrong_file_is_one_clear_error_and_nothing_loads(other, tmp_path):
    path = tmp_path / f'{other}.pth'
    with torch.device('meta'):
        state = timm.create_model(other).state_dict()
    torch.save({k: torch.zeros(v.shape) for k, v in state.items()}, path)
    with pytest.raises(IncompatibleKeysError, match='does not belong to zoo_gcvit_xxtiny'):
        timm.create_model('zoo_gcvit_xxtiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


@pytest.mark.parametrize('size', [(97, 131), (320, 256)])
def test_any_size_and_four_feature_maps(size):
    torch.manual_seed(0)
    model = _randomise(timm.create_model('zoo_gcvit_xxtiny'))
    feats = timm.create_model('zoo_gcvit_xxtiny', features_only=True).eval()
    feats.load_state_dict(model.state_dict(), strict=False)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out, maps = model(x), feats(x)
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    assert len(maps) == 4
    for f, r, c in zip(maps, (4, 8, 16, 32), (64, 128, 256, 512)):
        assert f.shape == (2, c, -(-size[0] // r), -(-size[1] // r)) and torch.isfinite(f).all()


def test_global_query_is_resized_to_the_window_in_the_graph():
    """At 224 the pooled map is the window (the resize is an identity); at other sizes it is resized to it."""
    gen = GlobalQueryGen(16, window_size=7, levels=3).eval()
    x = torch.randn(2, 56, 56, 16)
    with torch.no_grad():
        pooled = gen.blocks(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        assert pooled.shape == (2, 7, 7, 16)
        torch.testing.assert_close(gen(x), pooled, rtol=0, atol=1e-6)
        for hw in ((24, 33), (80, 64)):
            assert gen(torch.randn(2, *hw, 16)).shape == (2, 7, 7, 16)


@pytest.mark.parametrize('exporter', ['legacy', 'dynamo'])
def test_dynamic_onnx_from_224(exporter, tmp_path):
    model = timm.create_model('zoo_gcvit_xxtiny', **SMALL).eval()
    report = export_onnx(model, tmp_path / 'gcvit.onnx', img_size=224, dynamic=True, exporter=exporter)
    assert [c['input_shape'][2:] for c in report['checks']] == [(224, 224), (160, 192), (320, 256)]
    assert all(c['max_abs_err'] <= c['tol'] for c in report['checks'])


@pytest.mark.parametrize('global_query', [False, True])
def test_unmasked_padding_is_attention_over_the_padded_input(global_query):
    """mask_padding=False (GC ViT, DaViT): the same as the padded input through the mixer, cropped."""
    unmasked = create_mixer('window', 32, num_heads=2, window_size=4, global_query=global_query, mask_padding=False)
    masked = create_mixer('window', 32, num_heads=2, window_size=4, global_query=global_query)
    masked.load_state_dict(unmasked.state_dict())
    x, q = torch.randn(2, 9, 6, 32), torch.randn(2, 4, 4, 32)
    args = (q,) if global_query else ()
    padded = torch.nn.functional.pad(x, (0, 0, 0, 2, 0, 3))
    with torch.no_grad():
        got = unmasked(x, *args)
        torch.testing.assert_close(got, masked(padded, *args)[:, :9, :6], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got, masked(x, *args), atol=1e-3)


def test_global_query_window_option():
    mixer = create_mixer('window', 32, num_heads=2, window_size=4, global_query=True)
    assert mixer.qkv.out_features == 64 and mixer.stage_context == 'global_query'
    x = torch.randn(2, 9, 6, 32)
    q = torch.randn(2, 4, 4, 32)
    out = mixer(x, q)
    assert out.shape == x.shape
    with pytest.raises(ValueError, match='expected the stage\'s global query'):
        mixer(x)
    with pytest.raises(ValueError, match='global_query: expected no shift'):
        create_mixer('window', 32, num_heads=2, window_size=4, shift_size=2, global_query=True)
    block = MixerBlock(32, 'window', dict(window_size=4, global_query=True), num_heads=2)
    assert block(x, q).shape == x.shape


def test_bad_input():
    model = timm.create_model('zoo_gcvit_xxtiny', **SMALL).eval()
    with pytest.raises(ValueError, match=r'expected H and W >= 32, got \(31, 64\)'):
        model(torch.randn(1, 3, 31, 64))
    with pytest.raises(ValueError, match='num_heads: expected a divisor of dim=16'):
        timm.create_model('zoo_gcvit_xxtiny', **dict(SMALL, num_heads=(3, 2, 2, 4)))
    with pytest.raises(ValueError, match='depths: expected >= 2 blocks per stage'):
        timm.create_model('zoo_gcvit_xxtiny', **dict(SMALL, depths=(2, 1, 2, 2)))
    with pytest.raises(ValueError, match='context'):
        from zoo import StageSpec, build_stages
        build_stages([StageSpec(depth=2, dim=16, num_heads=2,
                                mixer_kwargs=dict(window_size=4, global_query=True))], 16, 4)


def test_global_query_window_in_any_hybrid_stage():
    """GC ViT's global attention (and its per-stage query) in any stage of hybrid_tiny, at any size."""
    small = zoo.reduced_args('hybrid_tiny')
    for pos in range(4):
        mixers = ['se'] + ['grid'] * 3
        mixers[pos] = ('window', 'window')
        model = timm.create_model('hybrid_tiny', mixers=mixers, mixer_kwargs={'window': dict(global_query=True)},
                                  **dict(small, depths=(2, 2, 2, 2)))
        stage = model.stages[pos]
        assert isinstance(stage.context, GlobalQueryGen) and all(b.attn.global_query for b in stage.blocks)
        out = model(torch.randn(2, 3, 97, 131))
        out.mean().backward()
        assert torch.isfinite(out).all() and all(p.grad is not None for p in stage.parameters())
