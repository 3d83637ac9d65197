"""NAT, DiNAT and DiNAT_s on the zoo's neighborhood attention op.

`Neighborhood Attention Transformer` - https://arxiv.org/abs/2204.07143
`Dilated Neighborhood Attention Transformer` - https://arxiv.org/abs/2209.15001
Official code and weights: https://github.com/SHI-Labs/Neighborhood-Attention-Transformer

One model class covers the three families:
  * NAT: overlapping conv tokenizer (two 3x3 stride-2 convs + LN), 3x3 stride-2 conv downsamplers, NA blocks.
  * DiNAT: NAT with a per-block dilation schedule (every other block dilated).
  * DiNAT_s: Swin's layout (4x4 patch embed, 2x2 patch merging) with Swin's W-MSA -> NA, SW-MSA -> DiNA.

Any input size works: the stems and downsamplers pad odd sizes, and neighborhood attention pads maps smaller
than kernel * dilation (as the official NATTEN module did). `checkpoint_filter_fn` loads the official
release files.
"""
from functools import partial
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ClassifierHead, LayerNorm2d, PatchEmbed
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import init_weights_vit_timm

from zoo.blocks.block import ConvTokenizer
from zoo.kernels._sizes import ceil_div
from zoo.weights.keymap import KeyMap, KeyRule, make_filter

from ._hierarchical import HierarchicalBackbone, StageSpec, build_backbone, build_stages, default_cfg

__all__ = ['NAT', 'KEY_MAP', 'checkpoint_filter_fn']

_LN_EPS = 1e-5  # nn.LayerNorm's default, used by the official models


class _PatchEmbed(PatchEmbed):
    """timm's PatchEmbed (DiNAT_s stem; same parameters) padding to a patch multiple without a modulo of the
    size, so a dynamic ONNX export keeps simple size expressions (see `zoo.kernels._sizes`). NCHW out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        ph, pw = self.patch_size
        x = F.pad(x, (0, ceil_div(W, pw) * pw - W, 0, ceil_div(H, ph) * ph - H))
        return self.norm(self.proj(x))


class NAT(HierarchicalBackbone):
    """NAT / DiNAT / DiNAT_s. (B, in_chans, H, W) -> (B, num_classes), any H, W.

    Args:
        in_chans: image channels.
        num_classes: classifier outputs (0 for none).
        global_pool: head pooling type.
        embed_dim: stage-1 width (doubles each stage).
        depths: blocks per stage.
        num_heads: attention heads per stage.
        kernel_size: neighborhood size.
        dilations: per stage, one dilation per block (None: all 1, plain NAT).
        layout: 'nat' (conv tokenizer + conv downsamplers) or 'swin' (patch embed + patch merging, DiNAT_s).
        patch_size: patch size of the 'swin' layout's stem (the 'nat' stem is fixed at stride 4).
        mlp_ratio: MLP hidden width / dim.
        qkv_bias: bias in the qkv projections.
        qk_scale: logit scale override (head_dim ** -0.5 if None).
        layer_scale: layer-scale init (None: none).
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after attention projections and in MLPs.
        attn_drop_rate: attention dropout (must be 0 to train: the neighborhood op has none).
        drop_path_rate: stochastic depth rate, rising linearly over blocks to this value.
        img_size: accepted for timm compatibility and ignored (any input size works).
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 64,
            depths: Tuple[int, ...] = (3, 4, 6, 5),
            num_heads: Tuple[int, ...] = (2, 4, 8, 16),
            kernel_size: int = 7,
            dilations: Optional[Sequence[Sequence[int]]] = None,
            layout: str = 'nat',
            patch_size: int = 4,
            mlp_ratio: float = 3.,
            qkv_bias: bool = True,
            qk_scale: Optional[float] = None,
            layer_scale: Optional[float] = None,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.2,
            img_size: Optional[Union[int, Sequence[int]]] = None,
    ):
        super().__init__()
        num_stages = len(depths)
        if len(num_heads) != num_stages:
            raise ValueError(f'num_heads: expected one entry per stage ({num_stages}), got {tuple(num_heads)}')
        if dilations is None:
            dilations = [[1] * d for d in depths]
        if len(dilations) != num_stages or any(len(s) != d for s, d in zip(dilations, depths)):
            raise ValueError(f'dilations: expected one list per stage with one entry per block '
                             f'(depths={tuple(depths)}), got {dilations}')
        if layout not in ('nat', 'swin'):
            raise ValueError(f"layout: expected 'nat' or 'swin', got {layout!r}")
        self.dilations = tuple(tuple(int(d) for d in s) for s in dilations)
        specs = [
            StageSpec(
                depth=depth, dim=int(embed_dim * 2 ** i), mixer='neighborhood', num_heads=num_heads[i],
                mixer_kwargs=[dict(kernel_size=kernel_size, dilation=d, qk_scale=qk_scale) for d in self.dilations[i]],
                mlp_ratio=mlp_ratio, layer_scale=layer_scale,
                downsample=None if i == 0 else ('conv' if layout == 'nat' else 'patch_merging'))
            for i, depth in enumerate(depths)
        ]
        dims = [spec.dim for spec in specs]
        if layout == 'nat':
            stem, reduction = ConvTokenizer(in_chans, dims[0], norm_eps=_LN_EPS), 4
        else:
            stem = _PatchEmbed(
                img_size=None, patch_size=patch_size, in_chans=in_chans, embed_dim=dims[0],
                norm_layer=partial(LayerNorm2d, eps=_LN_EPS), output_fmt='NCHW',
                strict_img_size=False, dynamic_img_pad=True)
            reduction = patch_size
        stages, feature_info = build_stages(
            specs, dims[0], reduction, drop_path_rate, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
            attn_drop=attn_drop_rate, norm_eps=_LN_EPS)

        self.init_backbone(
            stem=stem,
            stages=stages,
            feature_info=feature_info,
            norm=LayerNorm2d(dims[-1], eps=_LN_EPS),
            head=ClassifierHead(dims[-1], num_classes, pool_type=global_pool, drop_rate=drop_rate),
            num_classes=num_classes,
            in_chans=in_chans,
            num_features=dims[-1],
        )
        self.apply(partial(init_weights_vit_timm, needs_reset=False))  # trunc-normal Linear, zero bias


# Official NAT / DiNAT: `patch_embed.proj.{0,1}`, `patch_embed.norm`, `levels.N.blocks.M.*`,
# `levels.N.downsample.{reduction,norm}` (at the end of stage N), `norm`, `head`. Official DiNAT_s:
# `patch_embed.{proj,norm}`, `layers.N.*` (Swin layout, downsample at the end of stage N), `norm`, `head`.
KEY_MAP = KeyMap(rules=(
    KeyRule(r'^(levels|layers)\.(\d+)\.downsample\.', lambda m: f'stages.{int(m.group(2)) + 1}.downsample.'),
    KeyRule(r'^(levels|layers)\.', 'stages.'),
    KeyRule(r'^patch_embed\.', 'stem.'),
    KeyRule(r'^head\.(weight|bias)$', r'head.fc.\1'),
))
checkpoint_filter_fn = make_filter(KEY_MAP)


def _create_nat(variant: str, pretrained: bool = False, **kwargs) -> NAT:
    return build_backbone(
        NAT, variant, pretrained, checkpoint_filter_fn=KEY_MAP,
        num_stages=len(kwargs.get('depths', (3, 4, 6, 5))), **kwargs)


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return default_cfg(
        url=url, crop_pct=0.875, license='mit',
        origin_url='https://github.com/SHI-Labs/Neighborhood-Attention-Transformer', **kwargs)


def _nat_cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return _cfg(url, first_conv='stem.proj.0', paper_ids='arXiv:2204.07143', **kwargs)


def _dinat_cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return _cfg(url, first_conv='stem.proj.0', paper_ids='arXiv:2209.15001', **kwargs)


def _dinat_s_cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return _cfg(url, first_conv='stem.proj', paper_ids='arXiv:2209.15001', **kwargs)


_NAT_URL = 'https://shi-labs.com/projects/nat/checkpoints/CLS'
_DINAT_URL = 'https://shi-labs.com/projects/dinat/checkpoints/imagenet1k'

default_cfgs = generate_default_cfgs({
    'nat_mini.in1k': _nat_cfg(f'{_NAT_URL}/nat_mini.pth'),
    'nat_tiny.in1k': _nat_cfg(f'{_NAT_URL}/nat_tiny.pth'),
    'nat_small.in1k': _nat_cfg(f'{_NAT_URL}/nat_small.pth'),
    'nat_base.in1k': _nat_cfg(f'{_NAT_URL}/nat_base.pth'),
    'dinat_mini.in1k': _dinat_cfg(f'{_DINAT_URL}/dinat_mini_in1k_224.pth'),
    'dinat_tiny.in1k': _dinat_cfg(f'{_DINAT_URL}/dinat_tiny_in1k_224.pth'),
    'dinat_small.in1k': _dinat_cfg(f'{_DINAT_URL}/dinat_small_in1k_224.pth'),
    'dinat_base.in1k': _dinat_cfg(f'{_DINAT_URL}/dinat_base_in1k_224.pth'),
    # the url the official model file downloads (its README links `dinat_s_*_1k_224.pth` instead)
    'dinat_s_tiny.in1k': _dinat_s_cfg(f'{_DINAT_URL}/dinat_s_tiny_in1k_224.pth'),
    'dinat_s_small.in1k': _dinat_s_cfg(f'{_DINAT_URL}/dinat_s_small_in1k_224.pth'),
    'dinat_s_base.in1k': _dinat_s_cfg(f'{_DINAT_URL}/dinat_s_base_in1k_224.pth'),
})

# DiNAT at 224 px: in each stage every other block is dilated so a 7x7 neighborhood spans the stage's map
# (56 / 7 = 8, 28 / 7 = 4, 14 / 7 = 2); the last stage (7x7) is undilated.
_DINAT_DILATIONS_MINI = ((1, 8, 1), (1, 4, 1, 4), (1, 2) * 3, (1,) * 5)
_DINAT_DILATIONS = ((1, 8, 1), (1, 4, 1, 4), (1, 2) * 9, (1,) * 5)
_DINAT_S_DILATIONS_TINY = ((1, 8), (1, 4), (1, 2) * 3, (1, 1))
_DINAT_S_DILATIONS = ((1, 8), (1, 4), (1, 2) * 9, (1, 1))


# narrow and shallow, same structure: DiNAT keeps a dilated block in every stage (see zoo.reduced_args)
REDUCED_ARGS = {
    'nat_*': dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8)),
    'dinat_*': dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), dilations=((1, 8), (1, 4), (1, 2), (1, 1))),
}


@register_model
def nat_mini(pretrained: bool = False, **kwargs) -> NAT:
    """NAT-Mini: dim 64, depths (3, 4, 6, 5), heads (2, 4, 8, 16), mlp 3; 20.0M params."""
    model_args = dict(embed_dim=64, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3., drop_path_rate=0.2)
    return _create_nat('nat_mini', pretrained, **dict(model_args, **kwargs))


@register_model
def nat_tiny(pretrained: bool = False, **kwargs) -> NAT:
    """NAT-Tiny: dim 64, depths (3, 4, 18, 5), heads (2, 4, 8, 16), mlp 3; 27.9M params."""
    model_args = dict(embed_dim=64, depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3., drop_path_rate=0.2)
    return _create_nat('nat_tiny', pretrained, **dict(model_args, **kwargs))


@register_model
def nat_small(pretrained: bool = False, **kwargs) -> NAT:
    """NAT-Small: dim 96, depths (3, 4, 18, 5), heads (3, 6, 12, 24), mlp 2, layer scale 1e-5; 50.7M params."""
    model_args = dict(embed_dim=96, depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), mlp_ratio=2.,
                      layer_scale=1e-5, drop_path_rate=0.3)
    return _create_nat('nat_small', pretrained, **dict(model_args, **kwargs))


@register_model
def nat_base(pretrained: bool = False, **kwargs) -> NAT:
    """NAT-Base: dim 128, depths (3, 4, 18, 5), heads (4, 8, 16, 32), mlp 2, layer scale 1e-5; 89.8M params."""
    model_args = dict(embed_dim=128, depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32), mlp_ratio=2.,
                      layer_scale=1e-5, drop_path_rate=0.5)
    return _create_nat('nat_base', pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_mini(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Mini: NAT-Mini with dilations (1, 8, 1), (1, 4, 1, 4), (1, 2) x 3, (1,) x 5; 20.0M params."""
    model_args = dict(embed_dim=64, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.,
                      dilations=_DINAT_DILATIONS_MINI, drop_path_rate=0.2)
    return _create_nat('dinat_mini', pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_tiny(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Tiny: NAT-Tiny with dilations (1, 8, 1), (1, 4, 1, 4), (1, 2) x 9, (1,) x 5; 27.9M params."""
    model_args = dict(embed_dim=64, depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.,
                      dilations=_DINAT_DILATIONS, drop_path_rate=0.2)
    return _create_nat('dinat_tiny', pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_small(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Small: NAT-Small's shape with dilations and no layer scale; 50.7M params."""
    model_args = dict(embed_dim=96, depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), mlp_ratio=2.,
                      dilations=_DINAT_DILATIONS, drop_path_rate=0.3)
    return _create_nat('dinat_small', pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_base(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Base: NAT-Base with dilations, layer scale 1e-5; 89.8M params."""
    model_args = dict(embed_dim=128, depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32), mlp_ratio=2.,
                      layer_scale=1e-5, dilations=_DINAT_DILATIONS, drop_path_rate=0.5)
    return _create_nat('dinat_base', pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_s_tiny(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT_s-Tiny: Swin-T layout (dim 96, depths (2, 2, 6, 2), heads (3, 6, 12, 24), mlp 4), NA / DiNA; 28M params."""
    model_args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), mlp_ratio=4., layout='swin',
                      dilations=_DINAT_S_DILATIONS_TINY, drop_path_rate=0.2)
    return _create_nat('dinat_s_tiny', pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_s_small(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT_s-Small: Swin-S layout (dim 96, depths (2, 2, 18, 2), heads (3, 6, 12, 24)), NA / DiNA; 50M params."""
    model_args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), mlp_ratio=4., layout='swin',
                      dilations=_DINAT_S_DILATIONS, drop_path_rate=0.3)
    return _create_nat('dinat_s_small', pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_s_base(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT_s-Base: Swin-B layout (dim 128, depths (2, 2, 18, 2), heads (4, 8, 16, 32)), NA / DiNA; 88M params."""
    model_args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), mlp_ratio=4., layout='swin',
                      dilations=_DINAT_S_DILATIONS, drop_path_rate=0.5)
    return _create_nat('dinat_s_base', pretrained, **dict(model_args, **kwargs))
