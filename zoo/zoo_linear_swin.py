"""FLatten-Swin and InLine-Swin: Swin Transformer with linear attention in its first stages.

`FLatten Transformer: Vision Transformer using Focused Linear Attention` - https://arxiv.org/abs/2308.00442
Official code and weights: https://github.com/LeapLabTHU/FLatten-Transformer
`Bridging the Divide: Reconsidering Softmax and Linear Attention` - https://arxiv.org/abs/2412.06590
Official code and weights: https://github.com/LeapLabTHU/InLine

Both are `zoo.zoo_swin.SwinTransformer` with a per-block mixer sequence from the official block-type strings:
'L' (FLatten) / 'I' (InLine) blocks are the 'linear' mixer over the whole stage map (the official window of 56,
96 at 384 px, covers every map), 'S' blocks Swin's shifted-window attention (window 7, 12 at 384 px), 'M<n>' a
stage whose first n blocks are linear. FLatten T / S / B 'LLSS'; InLine T 'IIIS', S 'IISS', B 'IIMS2'. FLatten's
positional encodings are stored at each stage's feature size for `img_size` and resized for any other input size.
"""
import dataclasses
import math
from typing import Any, Dict, Sequence, Union

import torch
from timm.layers import to_2tuple
from timm.models import generate_default_cfgs, register_model

from zoo.blocks.linear import resize_encoding
from zoo.weights.keymap import make_filter

from ._hierarchical import build_backbone, default_cfg
from .zoo_swin import KEY_MAP as _SWIN_KEY_MAP
from .zoo_swin import SwinTransformer, block_mixers, typed_swin_args

__all__ = ['linear_swin_layout', 'KEY_MAP', 'checkpoint_filter_fn']

# the official block-type letter of each family's linear blocks, and the variant they run
_FAMILIES = {'flatten': 'L', 'inline': 'I'}


def linear_swin_layout(
        variant: str,
        attn_type: str,
        depths: Sequence[int],
        img_size: Union[int, Sequence[int]] = 224,
        patch_size: int = 4,
        **variant_kwargs,
) -> Dict[str, Any]:
    """`SwinTransformer` arguments `mixer` (one name per block) and `mixer_kwargs` (the linear variant and, for
    FLatten, the positional encoding's size per stage) for the official block types `attn_type`."""
    if variant not in _FAMILIES:
        raise ValueError(f'variant: expected one of {tuple(_FAMILIES)}, got {variant!r}')
    mixer = block_mixers(attn_type, depths, {_FAMILIES[variant]: 'linear', 'S': 'window'})
    img_h, img_w = to_2tuple(img_size)
    mixer_kwargs = []
    for i in range(len(depths)):
        stride = patch_size * 2 ** i
        kwargs = dict(variant=variant, **variant_kwargs)
        if variant == 'flatten':
            kwargs['pe_size'] = (-(-img_h // stride), -(-img_w // stride))
        mixer_kwargs.append({'linear': kwargs})
    return dict(mixer=mixer, mixer_kwargs=mixer_kwargs)


def _resize_encoding(table: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """An official positional encoding (1, s * s, C) of a square map bilinearly resized to `target`'s square map
    (a file trained at one size loaded into a model built for another); anything else is left to the key check."""
    src, dst = (math.isqrt(t.shape[1]) if t.dim() == 3 else 0 for t in (table, target))
    if not src or src * src != table.shape[1] or dst * dst != target.shape[1] or table.shape[2] != target.shape[2]:
        return table  # not a square-to-square resize: the key check reports the shape
    return resize_encoding(table.float(), (src, src), (dst, dst)).reshape(1, dst * dst, -1).to(table.dtype)


# The official flatten_swin.py / inline_swin.py name everything as the official Swin does (the linear mixers'
# layers under `attn.`), so Swin's map applies; a file trained at another size gets its encodings resized.
KEY_MAP = dataclasses.replace(_SWIN_KEY_MAP, transforms=((r'\.attn\.positional_encoding$', _resize_encoding),))
checkpoint_filter_fn = make_filter(KEY_MAP)


# the official fine-tuned release: trained at 384 px with Swin windows of 12 (official WINDOW_SIZE 96)
_TAG_ARGS = {'in1k_384': dict(img_size=384, window_size=12)}


def _create_linear_swin(variant: str, family: str, pretrained: bool = False, **kwargs) -> SwinTransformer:
    kwargs = typed_swin_args(variant, kwargs, _TAG_ARGS, 'attn_type')
    family_kwargs = {k: kwargs.pop(k) for k in ('focusing_factor', 'kernel_size', 'kernel_func') if k in kwargs}
    layout = linear_swin_layout(family, kwargs.pop('attn_type'), kwargs['depths'], kwargs.get('img_size') or 224,
                                kwargs.get('patch_size', 4), **family_kwargs)
    return build_backbone(
        SwinTransformer, variant, pretrained, checkpoint_filter_fn=KEY_MAP, num_stages=len(kwargs['depths']),
        **layout, **kwargs)


def _cfg(download: str, paper: str, origin: str, **kwargs) -> Dict[str, Any]:
    # official evaluation: resize to 256 / 224 of the size (squashed), centre crop; bicubic
    kwargs = dict(dict(crop_pct=0.875, crop_mode='squash'), **kwargs)
    return default_cfg(
        license='mit', paper_ids=paper, origin_url=origin,
        notes=(f'official weights: {download} (a TsinghuaCloud share without a file url): download the file, then '
               f"pretrained=True, pretrained_cfg_overlay=dict(file='<the file>.pth')",), **kwargs)


_CLOUD = 'https://cloud.tsinghua.edu.cn/f'
_FLATTEN = dict(paper='arXiv:2308.00442', origin='https://github.com/LeapLabTHU/FLatten-Transformer')
_INLINE = dict(paper='arXiv:2412.06590', origin='https://github.com/LeapLabTHU/InLine')

default_cfgs = generate_default_cfgs({
    'flatten_swin_tiny.in1k': _cfg(f'{_CLOUD}/e1518e76703e4e57a7f2/?dl=1', **_FLATTEN),
    'flatten_swin_small.in1k': _cfg(f'{_CLOUD}/94188e52af354bf4a88b/?dl=1', **_FLATTEN),
    'flatten_swin_base.in1k': _cfg(f'{_CLOUD}/7a9e5186bad04e7fb3a9/?dl=1', **_FLATTEN),
    'flatten_swin_base.in1k_384': _cfg(f'{_CLOUD}/0d0330cf2e5249f1abb6/?dl=1', input_size=(3, 384, 384),
                                       pool_size=(12, 12), crop_pct=1.0, **_FLATTEN),
    'inline_swin_tiny.in1k': _cfg(f'{_CLOUD}/32810869fcc34410966b/?dl=1', **_INLINE),
    'inline_swin_small.in1k': _cfg(f'{_CLOUD}/e9657fd247c04c7cb1a1/?dl=1', **_INLINE),
    'inline_swin_base.in1k': _cfg(f'{_CLOUD}/bf23564bb64c420aafe1/?dl=1', **_INLINE),
})


# narrow and shallow, same structure: InLine-Swin-B keeps linear and window blocks in stage 3 (see zoo.reduced_args)
REDUCED_ARGS = {
    'inline_swin_base': dict(embed_dim=16, depths=(2, 2, 3, 2), num_heads=(1, 2, 4, 8)),
    '*_swin_*': dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8)),
}


@register_model
def flatten_swin_tiny(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """FLatten-Swin-T: Swin-T (dim 96, depths (2, 2, 6, 2), heads (3, 6, 12, 24)), blocks LLSS, focusing factor 3,
    5 x 5 conv on V; 29.2M params."""
    model_args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), attn_type='LLSS',
                       drop_path_rate=0.2)
    return _create_linear_swin('flatten_swin_tiny', 'flatten', pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_swin_small(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """FLatten-Swin-S: Swin-S (dim 96, depths (2, 2, 18, 2), heads (3, 6, 12, 24)), blocks LLSS; 50.5M params."""
    model_args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), attn_type='LLSS',
                       drop_path_rate=0.3)
    return _create_linear_swin('flatten_swin_small', 'flatten', pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_swin_base(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """FLatten-Swin-B: Swin-B (dim 128, depths (2, 2, 18, 2), heads (4, 8, 16, 32)), blocks LLSS; 89.0M params
    (91.4M at 384 px: 'flatten_swin_base.in1k_384')."""
    model_args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), attn_type='LLSS',
                       drop_path_rate=0.5)
    return _create_linear_swin('flatten_swin_base', 'flatten', pretrained, **dict(model_args, **kwargs))


@register_model
def inline_swin_tiny(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """InLine-Swin-T: Swin-T (dim 96, depths (2, 2, 6, 2), heads (3, 6, 12, 24)), blocks IIIS; 29.2M params."""
    model_args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), attn_type='IIIS',
                       drop_path_rate=0.2)
    return _create_linear_swin('inline_swin_tiny', 'inline', pretrained, **dict(model_args, **kwargs))


@register_model
def inline_swin_small(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """InLine-Swin-S: Swin-S (dim 96, depths (2, 2, 18, 2), heads (3, 6, 12, 24)), blocks IISS; 49.8M params."""
    model_args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), attn_type='IISS',
                       drop_path_rate=0.3)
    return _create_linear_swin('inline_swin_small', 'inline', pretrained, **dict(model_args, **kwargs))


@register_model
def inline_swin_base(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """InLine-Swin-B: Swin-B (dim 128, depths (2, 2, 18, 2), heads (4, 8, 16, 32)), blocks IIMS2 (stage 3: 2
    linear then 16 window blocks); 88.4M params."""
    model_args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), attn_type='IIMS2',
                       drop_path_rate=0.5)
    return _create_linear_swin('inline_swin_base', 'inline', pretrained, **dict(model_args, **kwargs))
