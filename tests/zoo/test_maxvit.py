"""MaxViT: parity with timm's maxvit_*_tf_224 (the TF release), weights loading, any-size inputs, and the
block / grid attention semantics against a dense brute-force oracle."""
import copy
from dataclasses import replace

import pytest
import timm
import torch
from timm.layers import LayerNorm
import torch.nn as nn
from timm.models.maxxvit import MbConvBlock as TimmMbConv
from timm.models.maxxvit import PartitionAttentionCl, _tf_cfg

import zoo  # noqa: F401  (registers the models)
from zoo.blocks import create_mixer
from zoo.blocks import MixerBlock
from zoo.blocks.multiaxis import MbConvBlock, PartitionAttention
from zoo.zoo_maxvit import checkpoint_filter_fn

# ours -> (timm's TF port, paper parameter count)
MODELS = {
    'maxvit_tiny': ('maxvit_tiny_tf_224', 31e6),
    'maxvit_small': ('maxvit_small_tf_224', 69e6),
    'maxvit_base': ('maxvit_base_tf_224', 119e6),
}


def _randomise(model: nn.Module) -> nn.Module:
    """Make BN running stats / affine and the (small at init) bias tables matter."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0., 0.2)
                m.running_var.uniform_(0.5, 2.)
                m.weight.normal_(1., 0.2)
                m.bias.normal_(0., 0.2)
        for n, p in model.named_parameters():
            if n.endswith('relative_position_bias_table'):
                p.normal_(0., 1.)
    return model.eval()


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope='module')
def timm_tiny():
    """Randomised timm maxvit_tiny_tf_224, an input batch at 224 and its logits."""
    torch.manual_seed(0)
    ref = _randomise(timm.create_model('maxvit_tiny_tf_224'))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        logits = ref(x)
    return ref, x, logits


@pytest.fixture(scope='module')
def ours_tiny():
    torch.manual_seed(0)
    return _randomise(timm.create_model('maxvit_tiny'))


def test_names_are_new_to_timm():
    timm_own = set(timm.list_models(module='maxxvit'))
    assert set(MODELS).isdisjoint(timm_own)
    assert {ref for ref, _ in MODELS.values()} <= timm_own
    assert set(timm.list_models(module='zoo_maxvit')) == set(MODELS)


@pytest.mark.parametrize('name', list(MODELS))
def test_timm_parity_and_param_count(name, request, assert_close_to_scale):
    """The same function as timm's port, compared in float64. In float32 the randomised maxvit_base amplifies
    rounding (its last stages reach ~3e3) so much that timm's own float32 logits are ~2e-4 from its float64 ones:
    a float32 comparison would test the rounding of two op orders, not the weight mapping."""
    timm_name, paper_params = MODELS[name]
    if name == 'maxvit_tiny':
        ref, x, _ = request.getfixturevalue('timm_tiny')
        ref, x = copy.deepcopy(ref), x[:1]
    else:
        torch.manual_seed(0)
        ref = _randomise(timm.create_model(timm_name))
        x = torch.randn(1, 3, 224, 224)
    ours = timm.create_model(name).eval()
    assert _num_params(ours) == _num_params(ref)
    assert abs(_num_params(ours) - paper_params) / paper_params < 0.01
    ours.load_state_dict(checkpoint_filter_fn(ref.state_dict(), ours), strict=True)
    ref, ours, x = ref.double(), ours.double(), x.double()
    with torch.no_grad():
        want, got = ref(x), ours(x)
    assert want.std() > 0.05  # the comparison is not between two near-constant outputs
    assert_close_to_scale(got, want)


@pytest.mark.parametrize('ext', ['safetensors', 'pth'])
def test_load_timm_checkpoint_file(ext, tmp_path, timm_tiny, assert_close_to_scale):
    ref, x, want = timm_tiny
    path = tmp_path / f'maxvit_tiny_tf_224.{ext}'
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    if ext == 'safetensors':
        from safetensors.torch import save_file
        save_file(state, str(path))
    else:
        torch.save(state, path)
    model = timm.create_model('maxvit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        got = model(x)
    assert_close_to_scale(got, want)


def test_pretrained_cfgs_match_timm():
    for name, (timm_name, _) in MODELS.items():
        ours = timm.models.get_pretrained_cfg(name)
        theirs = timm.models.get_pretrained_cfg(f'{timm_name}.in1k')
        assert ours.hf_hub_id == f'timm/{timm_name}.in1k'
        for field in ('input_size', 'crop_pct', 'interpolation', 'mean', 'std', 'num_classes', 'first_conv',
                      'classifier'):
            assert getattr(ours, field) == getattr(theirs, field), field
        assert not ours.fixed_input_size
    in21k = timm.models.get_pretrained_cfg('maxvit_base.in21k')
    theirs = timm.models.get_pretrained_cfg('maxvit_base_tf_224.in21k')
    assert (in21k.hf_hub_id, in21k.num_classes, in21k.mean) == ('timm/maxvit_base_tf_224.in21k', 21843, theirs.mean)


@pytest.mark.parametrize('size', [(97, 131), (200, 168), (20, 13)])
def test_any_input_size_and_feature_strides(size, ours_tiny):
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        final, feats = ours_tiny.forward_intermediates(x)
    assert [f['reduction'] for f in ours_tiny.feature_info] == [4, 8, 16, 32]
    for f, info in zip(feats, ours_tiny.feature_info):
        assert f.shape == (1, info['num_chs'], *(-(-s // info['reduction']) for s in size))
        assert torch.isfinite(f).all()
    with torch.no_grad():
        assert ours_tiny.forward_head(final).shape == (1, 1000)


def test_timm_kwargs_accepted():
    model = timm.create_model(
        'maxvit_tiny', num_classes=10, in_chans=1, global_pool='max', drop_rate=0.1, drop_path_rate=0.2,
        img_size=200).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 40, 56)).shape == (2, 10)
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == 'DropPath']
    assert rates and max(rates) == pytest.approx(0.2)
    assert model.head.drop.p == 0.1 and model.head.global_pool.pool_type == 'max'


def test_no_weight_decay_is_the_bias_tables(ours_tiny):
    nwd = ours_tiny.no_weight_decay()
    assert len(nwd) == 2 * sum((2, 2, 5, 2))
    assert nwd == {n for n, _ in ours_tiny.named_parameters() if n.endswith('relative_position_bias_table')}


@pytest.mark.parametrize('stride,in_chs,size', [(2, 32, (15, 22)), (2, 48, (16, 16)), (1, 48, (9, 14))])
def test_mbconv_matches_timm_any_size(stride, in_chs, size):
    ref = _randomise(TimmMbConv(in_chs, 48, stride=stride, cfg=_tf_cfg()['conv_cfg']))
    ours = MbConvBlock(in_chs, 48, stride=stride).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, in_chs, *size)
    with torch.no_grad():
        want, got = ref(x), ours(x)
    assert got.shape == (2, 48, *(-(-s // stride) for s in size))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('partition_type', ['block', 'grid'])
def test_partition_block_matches_timm(partition_type):
    cfg = replace(_tf_cfg()['transformer_cfg'], window_size=(7, 7), grid_size=(7, 7))
    ref = _randomise(PartitionAttentionCl(64, partition_type, cfg=cfg))
    ours = MixerBlock(64, partition_type, dict(partition_size=7), head_dim=32, act_layer='gelu_tanh',
                      norm_layer=LayerNorm).eval()
    ours.load_state_dict(checkpoint_filter_fn(ref.state_dict(), ours), strict=True)
    x = torch.randn(2, 14, 21, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def _dense_oracle(mixer: PartitionAttention, x: torch.Tensor) -> torch.Tensor:
    """Partition attention as one dense masked attention over the map, from the definition.

    Block: token (i, j) sits in window (i // P, j // P) at (i % P, j % P). Grid: with the map padded to a
    multiple of P, stride s = H_p / P, token (i, j) sits in window (i % s, j % s) at (i // s, j // s).
    Tokens attend within their window; the bias is table[key - query + P - 1] in in-window coordinates.
    """
    B, H, W, C = x.shape
    heads, d = mixer.num_heads, mixer.head_dim
    ph, pw = min(mixer.partition_size[0], H), min(mixer.partition_size[1], W)
    i, j = torch.meshgrid(torch.arange(H), torch.arange(W), indexing='ij')
    i, j = i.flatten(), j.flatten()
    if mixer.partition_type == 'block':
        win, pos = (i // ph, j // pw), (i % ph, j % pw)
    else:
        sh, sw = -(-H // ph), -(-W // pw)
        win, pos = (i % sh, j % sw), (i // sh, j // sw)
    same = (win[0][:, None] == win[0][None]) & (win[1][:, None] == win[1][None])
    Th, Tw = mixer.relative_position_bias_table.shape[-2:]
    dr = pos[0][None, :] - pos[0][:, None] + (Th - 1) // 2
    dc = pos[1][None, :] - pos[1][:, None] + (Tw - 1) // 2
    bias = mixer.relative_position_bias_table[:, dr, dc]  # heads, N, N
    q, k, v = mixer.qkv(x.reshape(B, H * W, C)).view(B, H * W, 3, heads, d).permute(2, 0, 3, 1, 4)
    logits = (q * d ** -0.5) @ k.transpose(-2, -1) + bias
    logits = logits.masked_fill(~same, float('-inf'))
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, H, W, C)
    return mixer.proj(out)


@pytest.mark.parametrize('partition_type', ['block', 'grid'])
@pytest.mark.parametrize('size,partition', [((14, 21), 7), ((10, 9), 7), ((4, 5), 7), ((12, 15), (3, 5))])
def test_partition_attention_matches_dense_oracle(partition_type, size, partition):
    mixer = create_mixer(partition_type, 32, head_dim=16, partition_size=partition).eval()
    with torch.no_grad():
        mixer.relative_position_bias_table.normal_(0., 1.)
        x = torch.randn(2, *size, 32)
        torch.testing.assert_close(mixer(x), _dense_oracle(mixer, x), rtol=1e-5, atol=1e-5)


def test_grid_attention_is_block_attention_on_the_grid_permuted_map():
    H, W, (gh, gw) = 12, 15, (3, 5)
    grid = create_mixer('grid', 32, head_dim=8, partition_size=(gh, gw)).eval()
    block = create_mixer('block', 32, head_dim=8, partition_size=(gh, gw)).eval()
    with torch.no_grad():
        grid.relative_position_bias_table.normal_(0., 1.)
    block.load_state_dict(grid.state_dict())
    # permuted map: y[a * gh + r, b * gw + c] = x[r * (H / gh) + a, c * (W / gw) + b]
    rows = torch.tensor([(i % gh) * (H // gh) + i // gh for i in range(H)])
    cols = torch.tensor([(j % gw) * (W // gw) + j // gw for j in range(W)])
    x = torch.randn(2, H, W, 32)
    with torch.no_grad():
        y = block(x[:, rows][:, :, cols])
        back = torch.empty_like(y)
        back[:, rows[:, None], cols[None, :]] = y
        torch.testing.assert_close(grid(x), back, rtol=1e-5, atol=1e-5)
        assert (grid(x) - block(x)).abs().max() > 1e-2  # the two modes differ on the unpermuted map


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match='head_dim'):
        PartitionAttention(48, head_dim=32)
    with pytest.raises(ValueError, match='partition_type'):
        PartitionAttention(64, partition_type='window')
    with pytest.raises(ValueError, match='stride'):
        MbConvBlock(32, 64, stride=3)
    with pytest.raises(ValueError, match='embed_dim'):
        timm.create_model('maxvit_tiny', embed_dim=(64, 128, 256, 500))
