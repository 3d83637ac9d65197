"""MALA T/S/B/L: official parameter counts and block layouts, the official checkpoint layout (recorded from the
official model definitions in golden/mala_official_layout.json: MALA_T and a reduced MALA) loading through the key
map, a wrong file refused, any input size, bad arguments.

Logit parity with the official model needs its code, which is not part of this project: measured when the family
was added (random official weights through checkpoint_filter_fn, max |diff| <= 1e-6 of the logit scale for T, S, B
and L at 224 x 224 and 200 x 264)."""
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import zoo
from zoo.blocks.attention import GlobalAttention
from zoo.blocks.block import ConvBnDownsample, ResDwConvMlp
from zoo.blocks.linear import LinearAttention
from zoo.weights.keymap import IncompatibleKeysError

NAMES = ['mala_tiny', 'mala_small', 'mala_base', 'mala_large']
# counted from the official MALA_T / _S / _B / _L definitions (classfication_release/model.py)
OFFICIAL_PARAMS = {'mala_tiny': 16_449_128, 'mala_small': 27_142_568, 'mala_base': 49_792_648,
                   'mala_large': 97_766_088}
LAYOUT = json.loads((Path(__file__).parent / 'golden' / 'mala_official_layout.json').read_text())
OTHER = json.loads((Path(__file__).parent / 'golden' / 'l2vit_official_layout.json').read_text())
SMALL = zoo.reduced_args('mala_tiny')


def test_registered_with_release_notes():
    assert sorted(timm.list_models(module='zoo_mala')) == sorted(NAMES)
    for name in NAMES:
        cfg = timm.models.get_pretrained_cfg(name)
        assert not cfg.url and 'huggingface.co/aldjalkdf/MAViT' in cfg.notes[0]
    with pytest.raises(RuntimeError, match='no pretrained weights to download.*pretrained_cfg_overlay'):
        timm.create_model('mala_tiny', pretrained=True)


@pytest.mark.parametrize('name', NAMES)
def test_param_counts_match_official(name):
    with torch.device('meta'):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[name]


@pytest.mark.parametrize('name, heads, head_dims, scales', [
    ('mala_tiny', (1, 2, 4, 8), (64, 64, 64, 64), (1., 1., 1., 1.)),
    ('mala_base', (1, 2, 6, 8), (96, 96, 64, 64), (1., 1., 1e-6, 1e-6)),
    ('mala_large', (1, 2, 7, 10), (96, 96, 64, 64), (1e-6,) * 4)])
def test_layout_per_stage(name, heads, head_dims, scales):
    """Stages 1-2 MALA linear attention, 3-4 softmax with RoPE, LePE 5 and the gate; the official heads and
    per-stage layer-scale inits; CPE 3, LayerNorm eps 1e-6, FFN with a residual depthwise conv, conv + BN downsample;
    the 1x1 projection to `projection` channels before the classifier."""
    with torch.device('meta'):
        model = timm.create_model(name)
    for i, stage in enumerate(model.stages):
        assert isinstance(stage.downsample, ConvBnDownsample) == (i > 0)
        for block in stage.blocks:
            attn = block.attn
            if i < 2:
                assert isinstance(attn, LinearAttention) and attn.variant == 'mala' and attn.rope
                assert attn.kernel_size == 5
            else:
                assert isinstance(attn, GlobalAttention) and attn.rope and attn.gate
                assert attn.lepe.kernel_size == (5, 5)
            assert (attn.num_heads, attn.head_dim) == (heads[i], head_dims[i])
            assert isinstance(block.mlp, ResDwConvMlp) and block.mlp.fc1.out_features == int(3.5 * attn.dim)
            assert block.pos_embed.proj.kernel_size == (3, 3) and block.norm1.eps == 1e-6
            assert block.gamma1.shape == (attn.dim,)
    small = timm.create_model(name, **SMALL)  # the inits, on real tensors
    assert [s.blocks[0].gamma1[0].item() for s in small.stages] == pytest.approx(scales)
    assert model.num_features == (2560 if name == 'mala_large' else 2048) == model.norm.conv.out_channels


@pytest.fixture
def official_file(official_checkpoint, tmp_path):
    return lambda layout, name='mala_official.pth': official_checkpoint(layout, tmp_path / name)


@pytest.mark.parametrize('which', ['reduced', 'mala_tiny'])
def test_official_checkpoint_layout_loads(which, official_file):
    state, path = official_file(LAYOUT[which])
    args = SMALL if which == 'reduced' else {}
    model = timm.create_model('mala_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **args)
    ours = model.state_dict()
    dropped = [k for k in state if k.endswith('RoPE.angle')]
    assert len(dropped) == 4 and len(ours) == len(state) - 4  # everything else loaded, one to one
    pairs = {
        'patch_embed.proj.0.weight': 'stem.0.weight', 'patch_embed.proj.10.running_var': 'stem.10.running_var',
        'layers.0.downsample.reduction.weight': 'stages.1.downsample.conv.weight',
        'layers.2.downsample.norm.bias': 'stages.3.downsample.norm.bias',
        'layers.0.blocks.0.pos.weight': 'stages.0.blocks.0.pos_embed.proj.weight',
        'layers.1.blocks.0.norm1.norm.weight': 'stages.1.blocks.0.norm1.weight',
        'layers.1.blocks.0.attn.lepe.weight': 'stages.1.blocks.0.attn.lepe.weight',
        'layers.3.blocks.0.attn.qkvo.bias': 'stages.3.blocks.0.attn.qkvo.bias',
        'layers.2.blocks.1.ffn.dwconv.weight': 'stages.2.blocks.1.mlp.dwconv.weight',
        'proj.bias': 'norm.conv.bias', 'norm.running_mean': 'norm.bn.running_mean', 'head.bias': 'head.fc.bias',
    }
    reshaped = {
        'layers.0.blocks.0.attn.qkvo.weight': 'stages.0.blocks.0.attn.qkvo.weight',
        'layers.2.blocks.0.attn.proj.weight': 'stages.2.blocks.0.attn.proj.weight',
        'layers.3.blocks.0.ffn.fc2.weight': 'stages.3.blocks.0.mlp.fc2.weight',
        'layers.0.blocks.0.gamma_2': 'stages.0.blocks.0.gamma2', 'proj.weight': 'norm.conv.weight',
        'head.weight': 'head.fc.weight',
    }
    for theirs, own in {**pairs, **reshaped}.items():
        want = state[theirs].reshape(ours[own].shape) if theirs in reshaped else state[theirs]
        assert state[theirs].shape == want.shape or theirs in reshaped
        torch.testing.assert_close(ours[own], want, rtol=0, atol=0, msg=theirs)
    assert state['head.weight'].dim() == 4 and ours['head.fc.weight'].dim() == 2


def test_own_layout_and_new_classifier(tmp_path):
    """Our own state dict passes the key map unchanged; another class count keeps everything but the classifier."""
    model = timm.create_model('mala_tiny', **SMALL)
    path = tmp_path / 'ours.pth'
    torch.save(model.state_dict(), path)
    again = timm.create_model('mala_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              num_classes=10, **SMALL)
    torch.testing.assert_close(again.norm.conv.weight, model.norm.conv.weight, rtol=0, atol=0)
    assert again.head.fc.out_features == 10


def test_wrong_file_is_an_error(official_file):
    _, path = official_file(OTHER['reduced'], 'l2vit.pth')
    with pytest.raises(IncompatibleKeysError, match='does not belong to mala_tiny'):
        timm.create_model('mala_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **SMALL)
    state, path = official_file(LAYOUT['reduced'])
    with pytest.raises(IncompatibleKeysError, match=r"other shape \(\d+\): 'stem.0.weight'"):
        timm.create_model('mala_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                          **dict(SMALL, embed_dim=(32, 32, 64, 64)))


def test_any_input_size():
    model = timm.create_model('mala_tiny', features_only=True, **SMALL).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 97, 131))
    assert [tuple(f.shape[-2:]) for f in feats] == [(25, 33), (13, 17), (7, 9), (4, 5)]
    assert all(torch.isfinite(f).all() for f in feats)


def test_bad_arguments():
    with pytest.raises(ValueError, match="attn_types: expected one of 'L' .* or 'V' .* per stage"):
        timm.create_model('mala_tiny', attn_types='LLV', **SMALL)
    with pytest.raises(ValueError, match='layer_scale: expected one init per stage'):
        timm.create_model('mala_tiny', layer_scale=(1., 1.), **SMALL)
    with pytest.raises(ValueError, match='rope: 2-D RoPE needs head_dim divisible by 4'):
        timm.create_model('mala_tiny', **dict(SMALL, num_heads=(2, 2, 4, 4), embed_dim=(12, 32, 64, 64)))


def test_block_is_the_official_formula(assert_close_to_scale):
    """Official Block: x + pos(x), then x + gamma_1 * attn(norm1(x)), then x + gamma_2 * ffn(norm2(x)) with
    ffn = fc2(h + dwconv(h)), h = gelu(fc1(x))."""
    model = timm.create_model('mala_tiny', **SMALL).eval()
    with torch.no_grad():
        for t in model.parameters():
            t.normal_(0, 0.2)
        for block in (model.stages[0].blocks[0], model.stages[2].blocks[0]):
            x = torch.randn(2, 9, 13, block.attn.dim)
            y = x + block.pos_embed.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            y = y + block.gamma1 * block.attn(F.layer_norm(y, y.shape[-1:], block.norm1.weight, block.norm1.bias,
                                                           1e-6))
            mlp = block.mlp
            h = F.gelu(F.linear(F.layer_norm(y, y.shape[-1:], block.norm2.weight, block.norm2.bias, 1e-6),
                                mlp.fc1.weight, mlp.fc1.bias))
            h = h + F.conv2d(h.permute(0, 3, 1, 2), mlp.dwconv.weight, mlp.dwconv.bias, padding=1,
                             groups=h.shape[-1]).permute(0, 2, 3, 1)
            want = y + block.gamma2 * F.linear(h, mlp.fc2.weight, mlp.fc2.bias)
            assert_close_to_scale(block(x), want)
