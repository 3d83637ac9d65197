"""MALA: magnitude-aware linear attention in its first stages, softmax attention with RoPE in its last.

`Rectifying Magnitude Neglect in Linear Attention` (Fan et al., ICCV 2025) - https://arxiv.org/abs/2507.00698
Official code: https://github.com/qhfan/MALA (`classfication_release/model.py`); weights on Hugging Face
(https://huggingface.co/aldjalkdf/MAViT).

A conv stem (3x3 stride-2 conv, then two 3x3 convs, then a 3x3 stride-2 conv, BatchNorm after each, GELU between),
four stages of the one `MixerBlock` (3x3 depthwise conv position embedding, LayerNorm eps 1e-6, mixer, layer
scale, FFN with a residual 3x3 depthwise conv, mlp ratio 3.5) with a 3x3 stride-2 conv + BatchNorm downsample
before stages 2-4, then a 1x1 conv + BatchNorm + SiLU projection of the last map (the model's final `norm`, so
forward_features gives the projected map, as timm's EfficientNet does with its conv head) and a linear head.
Official block types (`flagss`): stages 1-2 MALA linear attention ('linear' mixer, variant 'mala'), stages 3-4
softmax attention with 2-D RoPE, LePE and the linear gate ('global' mixer); head_dim 64 (B and L: 96 in stages 1-2).
The RoPE tables are computed for the actual map, so any input size runs.
"""
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, ConvNormAct
from timm.models import generate_default_cfgs, register_model
from timm.models.convnext import _init_weights as init_weights_convnext

from zoo.weights.keymap import KeyMap, KeyRule, make_filter

from ._hierarchical import HierarchicalBackbone, StageSpec, build_backbone, build_stages, default_cfg

__all__ = ['Mala', 'mala_stage_specs', 'KEY_MAP', 'checkpoint_filter_fn']

_LN_EPS = 1e-6
_TYPES = {'L': ('linear', dict(variant='mala')), 'V': ('global', dict(rope=True, lepe=5, gate=True))}


def _stem(in_chans: int, dim: int) -> nn.Sequential:
    """(B, in_chans, H, W) -> (B, dim, ceil(H / 4), ceil(W / 4)), official `patch_embed.proj` layout."""
    half = dim // 2
    layers = []
    for i, (cin, cout, stride) in enumerate(((in_chans, half, 2), (half, half, 1), (half, half, 1), (half, dim, 2))):
        layers += [nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout)]
        if i < 3:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


def mala_stage_specs(
        embed_dim: Sequence[int],
        depths: Sequence[int],
        num_heads: Sequence[int],
        attn_types: str = 'LLVV',
        mlp_ratio: float = 3.5,
        layer_scale: Union[None, float, Sequence[Optional[float]]] = 1.,
) -> Tuple[StageSpec, ...]:
    """MALA's stages: one block type per stage ('L' MALA linear attention, 'V' softmax attention with RoPE)."""
    n = len(depths)
    if not len(embed_dim) == len(num_heads) == n:
        raise ValueError(f'embed_dim, depths, num_heads: expected one entry per stage each, got {tuple(embed_dim)}, '
                         f'{tuple(depths)}, {tuple(num_heads)}')
    if not isinstance(attn_types, str) or len(attn_types) != n or set(attn_types) - set(_TYPES):
        raise ValueError(f"attn_types: expected one of 'L' (MALA linear) or 'V' (softmax with RoPE) per stage ({n}), "
                         f"e.g. 'LLVV'; got {attn_types!r}")
    scales = list(layer_scale) if isinstance(layer_scale, (list, tuple)) else [layer_scale] * n
    if len(scales) != n:
        raise ValueError(f'layer_scale: expected one init per stage ({n}), got {tuple(scales)}')
    specs = []
    for i, (dim, depth, heads, kind) in enumerate(zip(embed_dim, depths, num_heads, attn_types)):
        mixer, mixer_kwargs = _TYPES[kind]
        specs.append(StageSpec(
            depth=depth, dim=dim, mixer=mixer, mixer_kwargs=mixer_kwargs, num_heads=heads, mlp_ratio=mlp_ratio,
            mlp_layer='res_dwconv_mlp', layer_scale=scales[i], pos_embed=3, downsample='conv_bn' if i else None))
    return tuple(specs)


class Mala(HierarchicalBackbone):
    """MALA. (B, in_chans, H, W) -> (B, num_classes), any H, W.

    Args:
        in_chans: image channels.
        num_classes: classifier outputs (0 for none).
        global_pool: head pooling type.
        embed_dim: width of each stage.
        depths: blocks per stage.
        num_heads: attention heads per stage.
        attn_types: block type per stage, 'L' (MALA linear attention) or 'V' (softmax attention with RoPE).
        mlp_ratio: FFN hidden width / dim.
        layer_scale: layer-scale init, one value or one per stage (None: no layer scale).
        projection: channels of the final 1x1 projection (the features the classifier sees).
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after attention projections and in FFNs.
        attn_drop_rate: attention dropout of the softmax stages (linear attention has none: must be 0 with 'L').
        drop_path_rate: stochastic depth rate, rising linearly over blocks to this value.
        img_size: accepted for timm compatibility and ignored (any input size works).
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: Sequence[int] = (64, 128, 256, 512),
            depths: Sequence[int] = (2, 2, 6, 2),
            num_heads: Sequence[int] = (1, 2, 4, 8),
            attn_types: str = 'LLVV',
            mlp_ratio: float = 3.5,
            layer_scale: Union[None, float, Sequence[Optional[float]]] = 1.,
            projection: int = 2048,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            img_size: Optional[Union[int, Sequence[int]]] = None,
    ):
        super().__init__()
        specs = mala_stage_specs(embed_dim, depths, num_heads, attn_types, mlp_ratio, layer_scale)
        stages, feature_info = build_stages(
            specs, embed_dim[0], 4, drop_path_rate, qkv_bias=True, proj_drop=proj_drop_rate,
            attn_drop=attn_drop_rate, norm_eps=_LN_EPS)
        self.init_backbone(
            stem=_stem(in_chans, embed_dim[0]),
            stages=stages,
            feature_info=feature_info,
            norm=ConvNormAct(embed_dim[-1], projection, 1, bias=True, act_layer=nn.SiLU),
            head=ClassifierHead(projection, num_classes, pool_type=global_pool, drop_rate=drop_rate),
            num_classes=num_classes,
            in_chans=in_chans,
            num_features=projection,
        )
        self.apply(init_weights_convnext)  # the official init: trunc-normal(0.02) conv / linear weights, zero bias


def _to_model_shape(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Official 1x1 conv weights (o, i, 1, 1) and layer scales (1, C, 1, 1) in our linear / vector shapes."""
    return t.reshape(ref.shape) if t.numel() == ref.numel() else t


# Official (`model.py`, files {'model': ..., 'model_ema': ...}): `patch_embed.proj.{0..10}` (stem),
# `layers.N.blocks.M.{pos, norm1.norm, attn.{qkvo, lepe, proj}, gamma_1, norm2.norm, ffn.{fc1, dwconv, fc2},
# gamma_2}` (1x1 convs), `layers.N.downsample.{reduction, norm}` at the END of stage N (ours: start of N + 1),
# `layers.N.RoPE.angle` (a constant: dropped), `proj` + `norm` (the final projection, ours `norm.conv` + `norm.bn`),
# `head` (a 1x1 conv). Our own layout passes through unchanged.
KEY_MAP = KeyMap(
    rules=(
        KeyRule(r'^patch_embed\.proj\.', 'stem.'),
        KeyRule(r'^layers\.(\d+)\.downsample\.reduction\.', lambda m: f'stages.{int(m[1]) + 1}.downsample.conv.'),
        KeyRule(r'^layers\.(\d+)\.downsample\.norm\.', lambda m: f'stages.{int(m[1]) + 1}.downsample.norm.'),
        KeyRule(r'^layers\.(\d+)\.blocks\.', r'stages.\1.blocks.'),
        KeyRule(r'\.pos\.(weight|bias)$', r'.pos_embed.proj.\1'),
        KeyRule(r'\.norm([12])\.norm\.', r'.norm\1.'),
        KeyRule(r'\.gamma_([12])$', r'.gamma\1'),
        KeyRule(r'\.ffn\.', '.mlp.'),
        KeyRule(r'^proj\.(weight|bias)$', r'norm.conv.\1'),
        KeyRule(r'^norm\.(weight|bias|running_mean|running_var|num_batches_tracked)$', r'norm.bn.\1'),
        KeyRule(r'^head\.(weight|bias)$', r'head.fc.\1'),
    ),
    drop=(r'\.RoPE\.angle$',),
    transforms=((r'(\.attn\.(qkvo|proj)|\.mlp\.fc[12]|^head\.fc)\.weight$|\.gamma[12]$', _to_model_shape),),
)
checkpoint_filter_fn = make_filter(KEY_MAP)


def _create_mala(variant: str, pretrained: bool = False, **kwargs) -> Mala:
    return build_backbone(
        Mala, variant, pretrained, checkpoint_filter_fn=KEY_MAP,
        num_stages=len(kwargs.get('depths', (2, 2, 6, 2))), **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    # the released files sit in a Hugging Face repo whose file names the official README does not give
    return default_cfg(
        url='', first_conv='stem.0', classifier='head.fc', license='unknown', paper_ids='arXiv:2507.00698',
        origin_url='https://github.com/qhfan/MALA', crop_pct=0.875,
        notes=('official weights: https://huggingface.co/aldjalkdf/MAViT (download the file, then pretrained=True, '
               "pretrained_cfg_overlay=dict(file='...pth'))",), **kwargs)


default_cfgs = generate_default_cfgs({
    'mala_tiny.in1k': _cfg(),
    'mala_small.in1k': _cfg(),
    'mala_base.in1k': _cfg(),
    'mala_large.in1k': _cfg(),
})

# narrow and shallow, same structure: two MALA linear stages, two softmax-with-RoPE stages (see zoo.reduced_args)
REDUCED_ARGS = {
    'mala_*': dict(embed_dim=(16, 32, 64, 64), depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 4), projection=64),
}


@register_model
def mala_tiny(pretrained: bool = False, **kwargs) -> Mala:
    """MALA-T: dims (64, 128, 256, 512), depths (2, 2, 6, 2), heads (1, 2, 4, 8), mlp 3.5; 16.4M params."""
    model_args = dict(embed_dim=(64, 128, 256, 512), depths=(2, 2, 6, 2), num_heads=(1, 2, 4, 8),
                      layer_scale=1., projection=2048, drop_path_rate=0.1)
    return _create_mala('mala_tiny', pretrained, **dict(model_args, **kwargs))


@register_model
def mala_small(pretrained: bool = False, **kwargs) -> Mala:
    """MALA-S: dims (64, 128, 320, 512), depths (3, 5, 9, 3), heads (1, 2, 5, 8), mlp 3.5; 27.1M params."""
    model_args = dict(embed_dim=(64, 128, 320, 512), depths=(3, 5, 9, 3), num_heads=(1, 2, 5, 8),
                      layer_scale=1., projection=2048, drop_path_rate=0.15)
    return _create_mala('mala_small', pretrained, **dict(model_args, **kwargs))


@register_model
def mala_base(pretrained: bool = False, **kwargs) -> Mala:
    """MALA-B: dims (96, 192, 384, 512), depths (4, 6, 12, 6), heads (1, 2, 6, 8), mlp 3.5; 49.8M params."""
    model_args = dict(embed_dim=(96, 192, 384, 512), depths=(4, 6, 12, 6), num_heads=(1, 2, 6, 8),
                      layer_scale=(1., 1., 1e-6, 1e-6), projection=2048, drop_path_rate=0.4)
    return _create_mala('mala_base', pretrained, **dict(model_args, **kwargs))


@register_model
def mala_large(pretrained: bool = False, **kwargs) -> Mala:
    """MALA-L: dims (96, 192, 448, 640), depths (4, 7, 19, 8), heads (1, 2, 7, 10), mlp 3.5; 97.8M params."""
    model_args = dict(embed_dim=(96, 192, 448, 640), depths=(4, 7, 19, 8), num_heads=(1, 2, 7, 10),
                      layer_scale=1e-6, projection=2560, drop_path_rate=0.55)
    return _create_mala('mala_large', pretrained, **dict(model_args, **kwargs))
