"""L2ViT T/S/B: official parameter counts and block layouts (LWA / LGA alternating, CPEs, LCM), the official checkpoint
layout (recorded from the official model definitions in golden/l2vit_official_layout.json: L2ViT_Tiny and a reduced
L2ViT) loading through the key map, a wrong file refused, the LWA / LGA blocks against their official formulas,
any input size, bad arguments.

Logit parity with the official model needs its code, which is not part of this project: measured when the family
was added (random official weights through checkpoint_filter_fn, max |diff| <= 5e-7 of the logit scale for T, S and
B at 224 x 224 and 448 x 448)."""
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import zoo
from zoo.blocks import MixerBlock
from zoo.blocks.window import WindowAttention
from zoo.blocks.block import LocalConcentration, NormConvDownsample
from zoo.blocks.linear import LinearAttention
from zoo.weights.keymap import IncompatibleKeysError

NAMES = ['l2vit_tiny', 'l2vit_small', 'l2vit_base']
# counted from the official L2ViT_Tiny / _Small / _Base definitions (classification/models/l2vit.py)
OFFICIAL_PARAMS = {'l2vit_tiny': 28_596_781, 'l2vit_small': 50_199_157, 'l2vit_base': 88_577_188}
LAYOUT = json.loads((Path(__file__).parent / 'golden' / 'l2vit_official_layout.json').read_text())
OTHER = json.loads((Path(__file__).parent / 'golden' / 'mala_official_layout.json').read_text())
SMALL = zoo.reduced_args('l2vit_tiny')


def test_registered_with_release_urls():
    assert sorted(timm.list_models(module='zoo_l2vit')) == sorted(NAMES)
    for name, size in zip(NAMES, ('Tiny', 'Small', 'Base')):
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.url == f'https://github.com/ChuanyangZheng/L2ViT/releases/download/v1.0/L2ViT-{size}-' \
                          f'checkpoint-best-ema.pth'


@pytest.mark.parametrize('name', NAMES)
def test_param_counts_match_official(name):
    with torch.device('meta'):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[name]


@pytest.mark.parametrize('name, depths, heads', [('l2vit_tiny', (2, 2, 6, 2), (3, 6, 12, 24)),
                                                 ('l2vit_base', (2, 2, 18, 2), (4, 8, 16, 32))])
def test_layout_per_stage(name, depths, heads):
    """Even blocks: window 7 attention (no bias, no shift), CPE before attention and MLP; odd blocks: L2ViT linear
    attention, one CPE, the LCM branch; LayerNorm + 2x2 conv downsamples; no layer scale."""
    with torch.device('meta'):
        model = timm.create_model(name)
    assert [len(s.blocks) for s in model.stages] == list(depths)
    for i, stage in enumerate(model.stages):
        assert isinstance(stage.downsample, NormConvDownsample) == (i > 0)
        for j, block in enumerate(stage.blocks):
            assert block.attn.num_heads == heads[i] and block.gamma1 is None
            assert block.pos_embed.proj.kernel_size == (3, 3) and block.mlp.fc1.out_features == 4 * block.attn.dim
            if j % 2 == 0:
                assert isinstance(block.attn, WindowAttention) and block.attn.window_size == (7, 7)
                assert block.attn.shift_size == (0, 0) and block.attn.relative_position_bias_table is None
                assert block.pos_embed2.proj.kernel_size == (3, 3) and block.local is None
            else:
                assert isinstance(block.attn, LinearAttention) and block.attn.variant == 'l2vit'
                assert isinstance(block.local, LocalConcentration) and block.pos_embed2 is None


@pytest.fixture
def official_file(official_checkpoint, tmp_path):
    return lambda layout, name='l2vit_official.pth': official_checkpoint(layout, tmp_path / name)


@pytest.mark.parametrize('which', ['reduced', 'l2vit_tiny'])
def test_official_checkpoint_layout_loads(which, official_file):
    state, path = official_file(LAYOUT[which])
    args = SMALL if which == 'reduced' else {}
    model = timm.create_model('l2vit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **args)
    ours = model.state_dict()
    assert len(ours) == len(state)  # one to one
    pairs = {
        'downsample_layers.0.proj.proj.0.weight': 'stem.proj.0.weight',
        'downsample_layers.0.proj.proj.4.running_mean': 'stem.proj.4.running_mean',
        'downsample_layers.0.norm.bias': 'stem.norm.bias',
        'downsample_layers.2.norm.weight': 'stages.2.downsample.norm.weight',
        'downsample_layers.3.proj.weight': 'stages.3.downsample.conv.weight',
        'stages.0.0.cpe.0.proj.weight': 'stages.0.blocks.0.pos_embed.proj.weight',
        'stages.1.0.cpe.1.proj.bias': 'stages.1.blocks.0.pos_embed2.proj.bias',
        'stages.2.1.attn.temperature': 'stages.2.blocks.1.attn.temperature',
        'stages.2.1.norm3.weight': 'stages.2.blocks.1.norm3.weight',
        'stages.3.1.local_mp.conv2.weight': 'stages.3.blocks.1.local.conv2.weight',
        'stages.3.1.local_mp.bn.running_var': 'stages.3.blocks.1.local.bn.running_var',
        'stages.3.0.attn.qkv.weight': 'stages.3.blocks.0.attn.qkv.weight',
        'stages.0.1.mlp.fc2.bias': 'stages.0.blocks.1.mlp.fc2.bias',
        'norm.weight': 'norm.weight', 'head.weight': 'head.fc.weight',
    }
    for theirs, own in pairs.items():
        torch.testing.assert_close(ours[own], state[theirs], rtol=0, atol=0, msg=theirs)


def test_wrong_file_is_an_error(official_file):
    _, path = official_file(OTHER['reduced'], 'mala.pth')
    with pytest.raises(IncompatibleKeysError, match='does not belong to l2vit_tiny'):
        timm.create_model('l2vit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **SMALL)
    _, path = official_file(LAYOUT['reduced'])
    with pytest.raises(IncompatibleKeysError, match=r'missing from the file \(\d+\)'):
        timm.create_model('l2vit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                          **dict(SMALL, depths=(2, 2, 3, 2)))


def _official_blocks(block: MixerBlock, x: torch.Tensor) -> torch.Tensor:
    """The official LWABlock / LGABlock forward (eval), restated with the block's parameters: (B, H, W, C)."""
    def cpe(conv, t):
        return t + F.conv2d(t.permute(0, 3, 1, 2), conv.weight, conv.bias, padding=1,
                            groups=t.shape[-1]).permute(0, 2, 3, 1)
    x = cpe(block.pos_embed.proj, x)
    x = x + block.attn(block.norm1(x))
    if block.local is not None:  # LGA: norm3 -> conv1 -> GELU -> BN -> conv2
        t = block.norm3(x).permute(0, 3, 1, 2)
        lcm = block.local
        t = F.conv2d(t, lcm.conv1.weight, lcm.conv1.bias, padding=3, groups=t.shape[1])
        t = F.batch_norm(F.gelu(t), lcm.bn.running_mean, lcm.bn.running_var, lcm.bn.weight, lcm.bn.bias,
                         eps=lcm.bn.eps)
        t = F.conv2d(t, lcm.conv2.weight, lcm.conv2.bias, padding=3, groups=t.shape[1])
        x = x + t.permute(0, 2, 3, 1)
    else:  # LWA: the second CPE before the MLP
        x = cpe(block.pos_embed2.proj, x)
    return x + block.mlp(block.norm2(x))


def test_blocks_are_the_official_formulas(assert_close_to_scale):
    model = timm.create_model('l2vit_tiny', **SMALL).eval()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith('running_var'):
                t.uniform_(0.5, 2.)
            elif t.is_floating_point():
                t.normal_(0, 0.2)
        x = torch.randn(2, 14, 21, 16)
        for block in model.stages[0].blocks:
            assert_close_to_scale(block(x), _official_blocks(block, x))


def test_any_input_size():
    model = timm.create_model('l2vit_tiny', features_only=True, **SMALL).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 97, 131))
    assert [tuple(f.shape[-2:]) for f in feats] == [(25, 33), (13, 17), (7, 9), (4, 5)]
    assert all(torch.isfinite(f).all() for f in feats)


def test_bad_arguments():
    with pytest.raises(ValueError, match='embed_dim, depths, num_heads: expected one entry per stage'):
        timm.create_model('l2vit_tiny', **dict(SMALL, num_heads=(1, 2, 4)))
    with pytest.raises(ValueError, match='window_size: expected positive sizes'):
        timm.create_model('l2vit_tiny', window_size=0, **SMALL)
    with pytest.raises(ValueError, match=r"local_layer: expected None or one of \['lcm'\], got 'lcn'"):
        MixerBlock(32, 'linear', dict(variant='l2vit'), local_layer='lcn')
    with pytest.raises(ValueError, match=r'StageSpec: expected one block_kwargs per block \(depth=2\), got 1'):
        zoo.StageSpec(2, 32, block_kwargs=[{}]).blocks_kwargs()


def test_stem_and_downsample_pad_odd_sizes_as_official(assert_close_to_scale):
    """Official PatchEmbed: the image zero-padded to a multiple of 4 before the stem; before the 2x2 conv, the
    LayerNorm-ed map zero-padded to even sizes at the bottom / right."""
    model = timm.create_model('l2vit_tiny', **SMALL).eval()
    x = torch.randn(1, 3, 37, 42)
    with torch.no_grad():
        want = model.stem.norm(model.stem.proj(F.pad(x, (0, 2, 0, 3))))
        assert_close_to_scale(model.stem(x), want)
        down = model.stages[1].downsample
        t = torch.randn(1, 9, 11, 16)
        want = down.conv(F.pad(down.norm(t), (0, 0, 0, 1, 0, 1)).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        assert_close_to_scale(down(t), want)
        assert down(t).shape == (1, 5, 6, 32)
