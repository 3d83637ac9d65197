"""FLatten-Swin and InLine-Swin: official parameter counts and block layouts, the official checkpoint layout loading
through the key map (renamed keys, dropped buffers, encodings resized for another size), foreign files refused,
any input size, bad arguments.

`_official_layout` states the official state dicts' names and shapes (flatten_swin.py / inline_swin.py, buffers
included); it was checked equal to the official models' state dicts for FLatten T / S and InLine T / B. Logit parity
with the official models needs their code, which is not part of this project; the figures are in the report of the
change (max abs diff ~3e-7 on logits of ~0.8 at 224 and 384 px)."""
import pytest
import timm
import torch
import torch.nn.functional as F

import zoo
from zoo.blocks.linear import LinearAttention
from zoo.blocks.window import WindowAttention
from zoo.weights.keymap import IncompatibleKeysError

NAMES = ['flatten_swin_tiny', 'flatten_swin_small', 'flatten_swin_base', 'inline_swin_tiny', 'inline_swin_small',
         'inline_swin_base']
# counted from the official FLattenSwinTransformer / InLineSwin definitions with the official configs
OFFICIAL_PARAMS = {
    'flatten_swin_tiny': 29_192_384, 'flatten_swin_small': 50_510_288, 'flatten_swin_base': 88_972_488,
    'inline_swin_tiny': 29_223_544, 'inline_swin_small': 49_793_296, 'inline_swin_base': 88_350_120,
}
CONFIGS = {  # embed dim, depths, heads, official block types
    'flatten_swin_tiny': (96, (2, 2, 6, 2), (3, 6, 12, 24), 'LLSS'),
    'flatten_swin_small': (96, (2, 2, 18, 2), (3, 6, 12, 24), 'LLSS'),
    'flatten_swin_base': (128, (2, 2, 18, 2), (4, 8, 16, 32), 'LLSS'),
    'inline_swin_tiny': (96, (2, 2, 6, 2), (3, 6, 12, 24), 'IIIS'),
    'inline_swin_small': (96, (2, 2, 18, 2), (3, 6, 12, 24), 'IISS'),
    'inline_swin_base': (128, (2, 2, 18, 2), (4, 8, 16, 32), 'IIMS2'),
}
TYPES = {  # per stage: L linear, S window
    'flatten_swin_tiny': ('LL', 'LL', 'S' * 6, 'SS'), 'flatten_swin_small': ('LL', 'LL', 'S' * 18, 'SS'),
    'flatten_swin_base': ('LL', 'LL', 'S' * 18, 'SS'), 'inline_swin_tiny': ('LL', 'LL', 'L' * 6, 'SS'),
    'inline_swin_small': ('LL', 'LL', 'S' * 18, 'SS'), 'inline_swin_base': ('LL', 'LL', 'LL' + 'S' * 16, 'SS'),
}


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _official_layout(name: str, img: int = 224, window: int = 7):
    """(key, shape) of the official state dict of `name`, buffers included."""
    dim, depths, heads, attn_type = CONFIGS[name]
    letter = 'L' if name.startswith('flatten') else 'I'
    out = [('patch_embed.proj.weight', (dim, 3, 4, 4)), ('patch_embed.proj.bias', (dim,)),
           ('patch_embed.norm.weight', (dim,)), ('patch_embed.norm.bias', (dim,))]
    for i, depth in enumerate(depths):
        c, size, nh = dim * 2 ** i, img // 4 // 2 ** i, heads[i]
        for j in range(depth):
            t, p = attn_type[i], f'layers.{i}.blocks.{j}.'
            linear = t == letter or (t == 'M' and j < int(attn_type[4:]))
            out += [(p + 'norm1.weight', (c,)), (p + 'norm1.bias', (c,))]
            qkv = [(p + 'attn.qkv.weight', (3 * c, c)), (p + 'attn.qkv.bias', (3 * c,)),
                   (p + 'attn.proj.weight', (c, c)), (p + 'attn.proj.bias', (c,))]
            if linear and letter == 'L':
                out += [(p + 'attn.scale', (1, 1, c)), (p + 'attn.positional_encoding', (1, size * size, c))] + qkv
                out += [(p + 'attn.dwc.weight', (c // nh, 1, 5, 5)), (p + 'attn.dwc.bias', (c // nh,))]
            elif linear:
                out += qkv + [(p + 'attn.residual.0.weight', (c, c // nh, 1)), (p + 'attn.residual.0.bias', (c,)),
                              (p + 'attn.residual.2.weight', (9 * c, c // nh, 1)),
                              (p + 'attn.residual.2.bias', (9 * c,))]
            else:
                w = min(window, size)
                out += [(p + 'attn.relative_position_bias_table', ((2 * w - 1) ** 2, nh)),
                        (p + 'attn.relative_position_index', (w * w, w * w))] + qkv
            out += [(p + 'norm2.weight', (c,)), (p + 'norm2.bias', (c,)), (p + 'mlp.fc1.weight', (4 * c, c)),
                    (p + 'mlp.fc1.bias', (4 * c,)), (p + 'mlp.fc2.weight', (c, 4 * c)), (p + 'mlp.fc2.bias', (c,))]
            if not linear and j % 2 and size > window:
                out.append((p + 'attn_mask', ((size // window) ** 2, window ** 2, window ** 2)))
        if i < len(depths) - 1:
            out += [(f'layers.{i}.downsample.reduction.weight', (2 * c, 4 * c)),
                    (f'layers.{i}.downsample.norm.weight', (4 * c,)), (f'layers.{i}.downsample.norm.bias', (4 * c,))]
    c = dim * 2 ** (len(depths) - 1)
    return out + [('norm.weight', (c,)), ('norm.bias', (c,)), ('head.weight', (1000, c)), ('head.bias', (1000,))]


@pytest.fixture
def official_file(official_checkpoint, tmp_path):
    return lambda name: official_checkpoint(_official_layout(name), tmp_path / f'{name}_official.pth')


def test_registered_with_release_notes():
    assert sorted(timm.list_models(module='zoo_linear_swin')) == sorted(NAMES)
    for name in NAMES:
        cfg = timm.models.get_pretrained_cfg(name)
        assert not cfg.url and 'cloud.tsinghua.edu.cn/f/' in cfg.notes[0]
    with pytest.raises(RuntimeError, match='no pretrained weights to download.*pretrained_cfg_overlay'):
        timm.create_model('flatten_swin_tiny', pretrained=True)


@pytest.mark.parametrize('name', NAMES)
def test_param_counts_match_official(name):
    with torch.device('meta'):
        model = timm.create_model(name)
    assert _count(model) == OFFICIAL_PARAMS[name]


@pytest.mark.parametrize('tag, kwargs, params', [
    ('flatten_swin_base.in1k_384', {}, 91_433_928),  # the release: encodings at 96 / 48, Swin windows 12
    ('inline_swin_base', dict(img_size=384, window_size=12), 88_465_320),  # official cfg inline_swin_b_384
])
def test_384_configs_match_official(tag, kwargs, params):
    with torch.device('meta'):
        model = timm.create_model(tag, **kwargs)
    assert _count(model) == params
    assert model.stages[2].blocks[-1].attn.window_size == (12, 12)
    assert model.stages[2].blocks[-1].attn.shift_size == (6, 6)


@pytest.mark.parametrize('name', NAMES)
def test_block_layout(name):
    with torch.device('meta'):
        model = timm.create_model(name)
    variant = name.split('_')[0]
    for i, (stage, types) in enumerate(zip(model.stages, TYPES[name])):
        size = 56 // 2 ** i
        got = ''.join('L' if isinstance(b.attn, LinearAttention) else 'S' for b in stage.blocks)
        assert got == types, (i, got)
        for j, block in enumerate(stage.blocks):
            attn = block.attn
            if isinstance(attn, LinearAttention):  # global; FLatten's encoding at the stage's size for 224 px
                assert attn.variant == variant and attn.num_heads == CONFIGS[name][2][i]
                if variant == 'flatten':
                    assert attn.pe_size == (size, size) and attn.focusing_factor == 3
            else:  # Swin's window 7 (clamped), shifted in odd blocks while the map is larger than the window
                assert isinstance(attn, WindowAttention) and attn.window_size == (min(7, size),) * 2
                assert attn.shift_size == ((3, 3) if j % 2 and size > 7 else (0, 0))
    other = timm.create_model('flatten_swin_tiny', img_size=(288, 160), **zoo.reduced_args('flatten_swin_tiny'))
    assert [s.blocks[0].attn.pe_size for s in other.stages[:2]] == [(72, 40), (36, 20)]


@pytest.mark.parametrize('name', ['flatten_swin_tiny', 'inline_swin_base'])
def test_official_checkpoint_layout_loads(name, official_file):
    state, path = official_file(name)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    ours = model.state_dict()
    buffers = [k for k in state if k.endswith(('relative_position_index', 'attn_mask'))]
    assert buffers and len(ours) == len(state) - len(buffers)  # everything else loaded, one to one
    pairs = {
        'patch_embed.proj.weight': 'stem.conv.weight', 'patch_embed.norm.bias': 'stem.norm.bias',
        'layers.0.downsample.reduction.weight': 'stages.1.downsample.reduction.weight',
        'layers.2.downsample.norm.weight': 'stages.3.downsample.norm.weight',
        'layers.1.blocks.1.attn.qkv.weight': 'stages.1.blocks.1.attn.qkv.weight',
        'layers.3.blocks.1.attn.relative_position_bias_table': 'stages.3.blocks.1.attn.relative_position_bias_table',
        'norm.weight': 'norm.weight', 'head.weight': 'head.fc.weight', 'head.bias': 'head.fc.bias',
    }
    if name.startswith('flatten'):
        pairs.update({'layers.0.blocks.1.attn.positional_encoding': 'stages.0.blocks.1.attn.positional_encoding',
                      'layers.1.blocks.0.attn.scale': 'stages.1.blocks.0.attn.scale',
                      'layers.0.blocks.0.attn.dwc.weight': 'stages.0.blocks.0.attn.dwc.weight'})
    else:
        pairs.update({'layers.2.blocks.1.attn.residual.2.weight': 'stages.2.blocks.1.attn.residual.2.weight',
                      'layers.2.blocks.2.attn.relative_position_bias_table':
                          'stages.2.blocks.2.attn.relative_position_bias_table'})
    for theirs, own in pairs.items():
        torch.testing.assert_close(ours[own], state[theirs], rtol=0, atol=0, msg=theirs)


def test_file_for_224_loads_into_another_size(official_file):
    """Positional encodings are bilinearly resized to the stage sizes of img_size (here 288 px: 72 and 36)."""
    state, path = official_file('flatten_swin_tiny')
    model = timm.create_model('flatten_swin_tiny', img_size=288, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)))
    got = model.stages[1].blocks[0].attn.positional_encoding
    table = state['layers.1.blocks.0.attn.positional_encoding'].reshape(1, 28, 28, -1).permute(0, 3, 1, 2)
    want = F.interpolate(table, size=(36, 36), mode='bilinear', align_corners=False).permute(0, 2, 3, 1)
    assert got.shape == (1, 36 * 36, 192)
    torch.testing.assert_close(got.detach(), want.reshape(1, 36 * 36, 192), rtol=0, atol=1e-6)


def test_foreign_or_wrong_shape_files_are_errors(official_file):
    _, path = official_file('inline_swin_tiny')
    with pytest.raises(IncompatibleKeysError, match=r'does not belong to flatten_swin_tiny(.|\n)*this looks like a '
                                                   r'inline_swin_tiny checkpoint'):
        timm.create_model('flatten_swin_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    state, path = official_file('flatten_swin_tiny')
    state['layers.0.blocks.0.attn.scale'] = torch.zeros(1, 1, 64)
    torch.save({'model': state}, path)
    with pytest.raises(IncompatibleKeysError, match=r"other shape .*attn.scale' is \(1, 1, 64\) in the file"):
        timm.create_model('flatten_swin_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


@pytest.mark.parametrize('name', ['flatten_swin_tiny', 'inline_swin_base'])
def test_any_input_size(name):
    model = timm.create_model(name, features_only=True, **zoo.reduced_args(name)).eval()
    for size in [(97, 131), (224, 224), (320, 192)]:
        with torch.no_grad():
            feats = model(torch.randn(1, 3, *size))
        assert [tuple(f.shape[-2:]) for f in feats] == [tuple(-(-s // r) for s in size) for r in (4, 8, 16, 32)]
        assert all(torch.isfinite(f).all() for f in feats)


def test_bad_arguments():
    small = zoo.reduced_args('flatten_swin_tiny')
    with pytest.raises(ValueError, match=r"attn_type: expected one of 'L' \(linear\), 'S' \(window\), 'M'"):
        timm.create_model('flatten_swin_tiny', attn_type='LLAS', **small)
    with pytest.raises(ValueError, match="attn_type: expected .*'IIMS2'"):
        timm.create_model('inline_swin_tiny', attn_type='IIMS', **small)
    with pytest.raises(ValueError, match='the mixers follow attn_type'):
        timm.create_model('inline_swin_tiny', mixer='window', **small)
    with pytest.raises(ValueError, match='focusing_factor: expected a number > 0'):
        timm.create_model('flatten_swin_tiny', focusing_factor=0, **small)
    with pytest.raises(ValueError, match=r"variant 'flatten': unexpected arguments \['kernel_func'\]"):
        timm.create_model('flatten_swin_tiny', kernel_func='relu', **small)
