"""VAN: Visual Attention Network, on the zoo's one block with the 'lka' mixer.

`Visual Attention Network` (Guo et al., 2022; CVMJ 2023) - https://arxiv.org/abs/2202.09741. Official code and
weights: https://github.com/Visual-Attention-Network/VAN-Classification (models/van.py).

An overlapping patch embedding stem (7x7 stride-4 conv + BatchNorm), four stages of the one `MixerBlock` with
BatchNorm as its norm ('batchnorm'), large-kernel attention as its mixer ('lka', whose inner residual adds the
normed input back, as officially), layer scale 1e-2 and the depthwise-conv MLP ('dwconv_mlp'); an overlapping
patch embedding (3x3 stride-2 conv + BatchNorm: the 'conv_bn' downsample) before stages 2-4; a LayerNorm (eps 1e-6)
ending every stage; global average pool and a linear head. Pure convolution: any input size.
`KEY_MAP` loads the official release files (`{'state_dict': ...}`, key names of models/van.py).
"""
from collections import OrderedDict
from functools import partial
import math
from typing import Any, Dict, Optional, Sequence, Union

import torch.nn as nn
from timm.layers import ClassifierHead, trunc_normal_
from timm.models import generate_default_cfgs, register_model

from zoo.weights.keymap import KeyMap, KeyRule, make_filter

from ._hierarchical import HierarchicalBackbone, StageSpec, build_backbone, build_stages, default_cfg

__all__ = ['VAN', 'KEY_MAP', 'checkpoint_filter_fn', 'van_stage_specs']

_STAGE_NORM_EPS = 1e-6


def _stem(in_chans: int, dim: int) -> nn.Sequential:
    """VAN's first overlapping patch embedding: (B, in_chans, H, W) -> (B, dim, ceil(H / 4), ceil(W / 4))."""
    return nn.Sequential(OrderedDict([
        ('proj', nn.Conv2d(in_chans, dim, kernel_size=7, stride=4, padding=3)),
        ('norm', nn.BatchNorm2d(dim)),
    ]))


def van_stage_specs(
        embed_dims: Sequence[int],
        depths: Sequence[int],
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        layer_scale: Optional[float] = 1e-2,
) -> Sequence[StageSpec]:
    """VAN's stages: 'lka' blocks with the depthwise-conv MLP, a 'conv_bn' patch embedding before stages 2-4."""
    if not len(embed_dims) == len(depths) == len(mlp_ratios):
        raise ValueError(f'embed_dims, depths, mlp_ratios: expected one entry per stage each, got '
                         f'{tuple(embed_dims)}, {tuple(depths)}, {tuple(mlp_ratios)}')
    return [
        StageSpec(depth=depth, dim=dim, mixer='lka', num_heads=1, mlp_ratio=ratio, mlp_layer='dwconv_mlp',
                  layer_scale=layer_scale, downsample='conv_bn' if i else None)
        for i, (dim, depth, ratio) in enumerate(zip(embed_dims, depths, mlp_ratios))
    ]


class VAN(HierarchicalBackbone):
    """Visual Attention Network. (B, in_chans, H, W) -> (B, num_classes), any H, W.

    Args:
        in_chans: image channels.
        num_classes: classifier outputs (0 for none).
        global_pool: head pooling type.
        embed_dims: width of each stage.
        depths: blocks per stage.
        mlp_ratios: MLP hidden width / dim per stage.
        layer_scale: layer-scale init (1e-2 officially; None: none).
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout in the MLPs and after the attention projection (officially `drop_rate`).
        drop_path_rate: stochastic depth rate.
        img_size: accepted for timm compatibility and ignored (any input size works).
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Sequence[int] = (64, 128, 320, 512),
            depths: Sequence[int] = (3, 3, 12, 3),
            mlp_ratios: Sequence[float] = (8, 8, 4, 4),
            layer_scale: Optional[float] = 1e-2,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            img_size: Optional[Union[int, Sequence[int]]] = None,
    ):
        super().__init__()
        specs = van_stage_specs(embed_dims, depths, mlp_ratios, layer_scale)
        stages, feature_info = build_stages(
            specs, embed_dims[0], 4, drop_path_rate, norm_layer='batchnorm', proj_drop=proj_drop_rate,
            stage_norm=partial(nn.LayerNorm, eps=_STAGE_NORM_EPS))
        self.init_backbone(
            stem=_stem(in_chans, embed_dims[0]),
            stages=stages,
            feature_info=feature_info,
            norm=None,  # the last stage's own LayerNorm is the final norm
            head=ClassifierHead(embed_dims[-1], num_classes, pool_type=global_pool, drop_rate=drop_rate),
            num_classes=num_classes,
            in_chans=in_chans,
            num_features=embed_dims[-1],
        )
        self.apply(_init_weights)


def _init_weights(m: nn.Module) -> None:
    # the official init: He normal over fan-out for convs, zero biases, trunc-normal linears
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _conv1x1_to_linear(v, own):
    # the official MLP's 1x1 convs (out, in, 1, 1) are our Linear layers (out, in); other shapes stay as they are
    # so that a file of another variant is reported as a shape mismatch
    return v.flatten(1) if v.dim() == 4 and tuple(v.shape[2:]) == (1, 1) and own.dim() == 2 else v


# Official (models/van.py, weights under 'state_dict'): `patch_embed1.{proj,norm}` (stem), `patch_embed{i}.{proj,norm}`
# (before stage i), `block{i}.{j}.{norm1, attn.{proj_1, spatial_gating_unit.{conv0, conv_spatial, conv1}, proj_2},
# layer_scale_1, norm2, mlp.{fc1, dwconv.dwconv, fc2}, layer_scale_2}`, `norm{i}` (end of stage i), `head`.
KEY_MAP = KeyMap(
    rules=(
        KeyRule(r'^patch_embed1\.', 'stem.'),
        KeyRule(r'^patch_embed(\d)\.proj\.', lambda m: f'stages.{int(m.group(1)) - 1}.downsample.conv.'),
        KeyRule(r'^patch_embed(\d)\.norm\.', lambda m: f'stages.{int(m.group(1)) - 1}.downsample.norm.'),
        KeyRule(r'^block(\d)\.(\d+)\.', lambda m: f'stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}.'),
        KeyRule(r'^norm(\d)\.', lambda m: f'stages.{int(m.group(1)) - 1}.norm.'),
        KeyRule(r'\.layer_scale_1$', '.gamma1'),
        KeyRule(r'\.layer_scale_2$', '.gamma2'),
        KeyRule(r'\.mlp\.dwconv\.dwconv\.', '.mlp.dwconv.'),
        KeyRule(r'^head\.(weight|bias)$', r'head.fc.\1'),
    ),
    transforms=((r'\.mlp\.fc[12]\.weight$', _conv1x1_to_linear),),
)
checkpoint_filter_fn = make_filter(KEY_MAP)


def _create_van(variant: str, pretrained: bool = False, **kwargs) -> VAN:
    return build_backbone(VAN, variant, pretrained, checkpoint_filter_fn=KEY_MAP,
                          num_stages=len(kwargs.get('depths', (3, 3, 12, 3))), **kwargs)


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return default_cfg(url=url, first_conv='stem.proj', license='apache-2.0', paper_ids='arXiv:2202.09741',
                       origin_url='https://github.com/Visual-Attention-Network/VAN-Classification', **kwargs)


_HF = 'https://huggingface.co/Visual-Attention-Network'
_NO_WEIGHTS = ('no official weights (the official README lists them as TODO)',)

default_cfgs = generate_default_cfgs({
    'van_b0.in1k': _cfg(f'{_HF}/VAN-Tiny-original/resolve/main/van_tiny_754.pth.tar'),
    'van_b1.in1k': _cfg(f'{_HF}/VAN-Small-original/resolve/main/van_small_811.pth.tar'),
    'van_b2.in1k': _cfg(f'{_HF}/VAN-Base-original/resolve/main/van_base_828.pth.tar'),
    'van_b3.in1k': _cfg(f'{_HF}/VAN-Large-original/resolve/main/van_large_839.pth.tar'),
    'van_b4': _cfg(notes=_NO_WEIGHTS),
    'van_b5': _cfg(notes=_NO_WEIGHTS),
    'van_b6': _cfg(notes=_NO_WEIGHTS),
})

# narrow and shallow, same structure (see zoo.reduced_args)
REDUCED_ARGS = {'van_b*': dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 2, 1))}

_VARIANTS = {
    'van_b0': dict(embed_dims=(32, 64, 160, 256), depths=(3, 3, 5, 2)),
    'van_b1': dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 4, 2)),
    'van_b2': dict(embed_dims=(64, 128, 320, 512), depths=(3, 3, 12, 3)),
    'van_b3': dict(embed_dims=(64, 128, 320, 512), depths=(3, 5, 27, 3)),
    'van_b4': dict(embed_dims=(64, 128, 320, 512), depths=(3, 6, 40, 3)),
    'van_b5': dict(embed_dims=(96, 192, 480, 768), depths=(3, 3, 24, 3)),
    'van_b6': dict(embed_dims=(96, 192, 384, 768), depths=(6, 6, 90, 6)),
}


def _van(variant: str, pretrained: bool, kwargs: Dict[str, Any]) -> VAN:
    return _create_van(variant, pretrained, **dict(dict(_VARIANTS[variant], mlp_ratios=(8, 8, 4, 4)), **kwargs))


@register_model
def van_b0(pretrained: bool = False, **kwargs) -> VAN:
    """VAN-B0: dims (32, 64, 160, 256), depths (3, 3, 5, 2); 4,105,800 params."""
    return _van('van_b0', pretrained, kwargs)


@register_model
def van_b1(pretrained: bool = False, **kwargs) -> VAN:
    """VAN-B1: dims (64, 128, 320, 512), depths (2, 2, 4, 2); 13,861,800 params."""
    return _van('van_b1', pretrained, kwargs)


@register_model
def van_b2(pretrained: bool = False, **kwargs) -> VAN:
    """VAN-B2: dims (64, 128, 320, 512), depths (3, 3, 12, 3); 26,578,472 params."""
    return _van('van_b2', pretrained, kwargs)


@register_model
def van_b3(pretrained: bool = False, **kwargs) -> VAN:
    """VAN-B3: dims (64, 128, 320, 512), depths (3, 5, 27, 3); 44,765,608 params."""
    return _van('van_b3', pretrained, kwargs)


@register_model
def van_b4(pretrained: bool = False, **kwargs) -> VAN:
    """VAN-B4: dims (64, 128, 320, 512), depths (3, 6, 40, 3); 60,283,176 params."""
    return _van('van_b4', pretrained, kwargs)


@register_model
def van_b5(pretrained: bool = False, **kwargs) -> VAN:
    """VAN-B5: dims (96, 192, 480, 768), depths (3, 3, 24, 3); 89,967,688 params."""
    return _van('van_b5', pretrained, kwargs)


@register_model
def van_b6(pretrained: bool = False, **kwargs) -> VAN:
    """VAN-B6: dims (96, 192, 384, 768), depths (6, 6, 90, 6); 199,829,416 params."""
    return _van('van_b6', pretrained, kwargs)
