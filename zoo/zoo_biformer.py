"""BiFormer on the zoo's routed attention op.

`BiFormer: Vision Transformer with Bi-Level Routing Attention` (Zhu et al., CVPR 2023) -
https://arxiv.org/abs/2303.08810. Official code and weights: https://github.com/rayleizhu/BiFormer

A stem (two 3x3 stride-2 convs with BatchNorm, GELU between), four stages of the one `MixerBlock` (3x3
depthwise conv position embedding, pre-norm LayerNorm eps 1e-6, mixer, MLP ratio 3) with a conv + BatchNorm
downsample before stages 2-4, a BatchNorm over the last features and a linear head. Stages 1-3 use bi-level
routing attention ('routing' mixer: n_win 7, top-k 1 / 4 / 16, head dim 32, qk_dim = dim, LePE 5x5 on V);
stage 4 is global attention with LePE on the normed input (top-k -2: 8 heads, no qkv bias), as officially.

Any input size works: the stem and downsamples give ceil(H / 2) per step, and routed stages pad their map to a
multiple of n_win and crop back (the official `auto_pad`; at 224 px nothing is padded). `KEY_MAP` loads the
official release files (`{'model': state_dict}`, key names of `models/biformer.py`).
"""
from functools import partial
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch.nn as nn
from timm.layers import ClassifierHead
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import init_weights_vit_timm

from zoo.weights.keymap import KeyMap, KeyRule, make_filter

from ._hierarchical import HierarchicalBackbone, StageSpec, build_backbone, build_stages, default_cfg

__all__ = ['BiFormer', 'KEY_MAP', 'checkpoint_filter_fn', 'biformer_stage_specs']

_LN_EPS = 1e-6  # the official blocks' LayerNorm eps ("important to avoid attention collapsing")


def _stem(in_chans: int, dim: int) -> nn.Sequential:
    """(B, in_chans, H, W) -> (B, dim, ceil(H / 4), ceil(W / 4)): conv-BN-GELU-conv-BN (official layout)."""
    return nn.Sequential(
        nn.Conv2d(in_chans, dim // 2, kernel_size=3, stride=2, padding=1),
        nn.BatchNorm2d(dim // 2),
        nn.GELU(),
        nn.Conv2d(dim // 2, dim, kernel_size=3, stride=2, padding=1),
        nn.BatchNorm2d(dim),
    )


def biformer_stage_specs(
        embed_dim: Sequence[int],
        depths: Sequence[int],
        topks: Sequence[int] = (1, 4, 16, -2),
        head_dim: int = 32,
        qk_dims: Optional[Sequence[Optional[int]]] = None,
        n_win: int = 7,
        global_heads: int = 8,
        side_dwconv: int = 5,
        mlp_ratio: float = 3.,
        pos_embed: int = 3,
        layer_scale: Optional[float] = None,
) -> Tuple[StageSpec, ...]:
    """BiFormer's stages: routed stages with qk_dim / head_dim heads, global stages (top-k -1 / -2) with
    `global_heads` heads and no qkv bias (official `Attention` / `AttentionLePE` defaults)."""
    if not len(embed_dim) == len(depths) == len(topks):
        raise ValueError(f'topks: expected one entry per stage ({len(depths)}), got {tuple(topks)} '
                         f'(embed_dim has {len(embed_dim)}, depths {len(depths)})')
    qk_dims = [None] * len(depths) if qk_dims is None else list(qk_dims)
    if len(qk_dims) != len(depths):
        raise ValueError(f'qk_dims: expected one entry per stage ({len(depths)}), got {tuple(qk_dims)}')
    specs = []
    for i, (dim, depth, topk) in enumerate(zip(embed_dim, depths, topks)):
        is_global = topk in (-1, -2)
        qk_dim = qk_dims[i] or dim
        if is_global:
            heads, kwargs, qkv_bias = global_heads, dict(topk=topk, side_dwconv=side_dwconv), False
        else:
            if qk_dim % head_dim:
                raise ValueError(f'qk_dims[{i}]: expected a multiple of head_dim={head_dim}, got {qk_dim}')
            heads, qkv_bias = qk_dim // head_dim, None
            kwargs = dict(n_win=n_win, topk=topk, qk_dim=qk_dim, side_dwconv=side_dwconv)
        specs.append(StageSpec(
            depth=depth, dim=dim, mixer='routing', mixer_kwargs=kwargs, num_heads=heads, mlp_ratio=mlp_ratio,
            layer_scale=layer_scale, pos_embed=pos_embed, qkv_bias=qkv_bias, downsample='conv_bn' if i else None))
    return tuple(specs)


class BiFormer(HierarchicalBackbone):
    """BiFormer. (B, in_chans, H, W) -> (B, num_classes), any H, W.

    Args:
        in_chans: image channels.
        num_classes: classifier outputs (0 for none).
        global_pool: head pooling type.
        embed_dim: width of each stage.
        depths: blocks per stage.
        topks: routed regions per stage (-2: global attention with LePE, -1: without).
        head_dim: channels per head of the routed stages (heads = qk_dim / head_dim).
        qk_dims: q / k width per stage (None entries: the stage width).
        n_win: regions per side in routed stages.
        global_heads: heads of global-attention stages.
        side_dwconv: LePE kernel size (0: none).
        mlp_ratio: MLP hidden width / dim.
        pos_embed: kernel of the depthwise conv position embedding before each block (0: none).
        layer_scale: layer-scale init (None: none, as in the official models).
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after attention projections and in MLPs.
        attn_drop_rate: attention dropout (must be 0 to train: the routed op has none).
        drop_path_rate: stochastic depth rate, rising linearly over blocks to this value.
        img_size: accepted for timm compatibility and ignored (any input size works).
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: Sequence[int] = (64, 128, 256, 512),
            depths: Sequence[int] = (2, 2, 8, 2),
            topks: Sequence[int] = (1, 4, 16, -2),
            head_dim: int = 32,
            qk_dims: Optional[Sequence[Optional[int]]] = None,
            n_win: int = 7,
            global_heads: int = 8,
            side_dwconv: int = 5,
            mlp_ratio: float = 3.,
            pos_embed: int = 3,
            layer_scale: Optional[float] = None,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            img_size: Optional[Union[int, Sequence[int]]] = None,
    ):
        super().__init__()
        specs = biformer_stage_specs(
            embed_dim, depths, topks, head_dim, qk_dims, n_win, global_heads, side_dwconv, mlp_ratio, pos_embed,
            layer_scale)
        dims = [spec.dim for spec in specs]
        stages, feature_info = build_stages(
            specs, dims[0], 4, drop_path_rate, qkv_bias=True, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
            norm_eps=_LN_EPS)
        self.init_backbone(
            stem=_stem(in_chans, dims[0]),
            stages=stages,
            feature_info=feature_info,
            norm=nn.BatchNorm2d(dims[-1]),
            head=ClassifierHead(dims[-1], num_classes, pool_type=global_pool, drop_rate=drop_rate),
            num_classes=num_classes,
            in_chans=in_chans,
            num_features=dims[-1],
        )
        self.apply(partial(init_weights_vit_timm, needs_reset=False))  # trunc-normal Linear, zero bias


# Official (`models/biformer.py`, weights under 'model'): `downsample_layers.0.{0,1,3,4}` (stem),
# `downsample_layers.N.{0,1}` (conv + BN before stage N), `stages.N.M.{pos_embed, norm1, attn, norm2, mlp.{0,3}}`
# with routed attention `attn.{qkv.qkv, lepe, wo}` and global attention `attn.{qkv, lepe, proj}`, `norm` (BN),
# `head`. Our own layout passes through unchanged.
KEY_MAP = KeyMap(rules=(
    KeyRule(r'^downsample_layers\.0\.', 'stem.'),
    KeyRule(r'^downsample_layers\.(\d+)\.0\.', r'stages.\1.downsample.conv.'),
    KeyRule(r'^downsample_layers\.(\d+)\.1\.', r'stages.\1.downsample.norm.'),
    KeyRule(r'^stages\.(\d+)\.(\d+)\.', r'stages.\1.blocks.\2.'),
    KeyRule(r'\.pos_embed\.(weight|bias)$', r'.pos_embed.proj.\1'),
    KeyRule(r'\.attn\.qkv\.qkv\.', '.attn.qkv.'),
    KeyRule(r'\.attn\.wo\.', '.attn.proj.'),
    KeyRule(r'\.mlp\.0\.', '.mlp.fc1.'),
    KeyRule(r'\.mlp\.3\.', '.mlp.fc2.'),
    KeyRule(r'^head\.(weight|bias)$', r'head.fc.\1'),
))
checkpoint_filter_fn = make_filter(KEY_MAP)


def _create_biformer(variant: str, pretrained: bool = False, **kwargs) -> BiFormer:
    return build_backbone(
        BiFormer, variant, pretrained, checkpoint_filter_fn=KEY_MAP,
        num_stages=len(kwargs.get('depths', (2, 2, 8, 2))), **kwargs)


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return default_cfg(
        url=url, first_conv='stem.0', license='mit', paper_ids='arXiv:2303.08810',
        origin_url='https://github.com/rayleizhu/BiFormer', **kwargs)


# the official release files (`model_urls` in models/biformer.py; OneDrive share links)
_ONEDRIVE = 'https://api.onedrive.com/v1.0/shares'

default_cfgs = generate_default_cfgs({
    'biformer_tiny.in1k': _cfg(f'{_ONEDRIVE}/s!AkBbczdRlZvChHEOoGkgwgQzEDlM/root/content'),
    'biformer_small.in1k': _cfg(f'{_ONEDRIVE}/s!AkBbczdRlZvChHDyM-x9KWRBZ832/root/content'),
    'biformer_base.in1k': _cfg(f'{_ONEDRIVE}/s!AkBbczdRlZvChHI_XPhoadjaNxtO/root/content'),
})

# narrow and shallow, same structure: three routed stages (top-k 1 / 4 / 16) and a global one (see zoo.reduced_args)
REDUCED_ARGS = {
    'biformer_*': dict(embed_dim=(16, 32, 64, 64), depths=(1, 1, 2, 1), head_dim=16, global_heads=4),
}


@register_model
def biformer_tiny(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-T: dims (64, 128, 256, 512), depths (2, 2, 8, 2), top-k (1, 4, 16, -2), mlp 3; 13.1M params."""
    model_args = dict(embed_dim=(64, 128, 256, 512), depths=(2, 2, 8, 2), topks=(1, 4, 16, -2), head_dim=32,
                      n_win=7, mlp_ratio=3.)
    return _create_biformer('biformer_tiny', pretrained, **dict(model_args, **kwargs))


@register_model
def biformer_small(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-S: dims (64, 128, 256, 512), depths (4, 4, 18, 4), top-k (1, 4, 16, -2), mlp 3; 25.5M params."""
    model_args = dict(embed_dim=(64, 128, 256, 512), depths=(4, 4, 18, 4), topks=(1, 4, 16, -2), head_dim=32,
                      n_win=7, mlp_ratio=3.)
    return _create_biformer('biformer_small', pretrained, **dict(model_args, **kwargs))


@register_model
def biformer_base(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-B: dims (96, 192, 384, 768), depths (4, 4, 18, 4), top-k (1, 4, 16, -2), mlp 3; 56.8M params."""
    model_args = dict(embed_dim=(96, 192, 384, 768), depths=(4, 4, 18, 4), topks=(1, 4, 16, -2), head_dim=32,
                      n_win=7, mlp_ratio=3.)
    return _create_biformer('biformer_base', pretrained, **dict(model_args, **kwargs))
