"""DaViT: spatial window attention alternating with channel group attention, on the one block.

`DaViT: Dual Attention Vision Transformers` (Ding, Xiao, Codella, Luo, Wang, Yuan; ECCV 2022) -
https://arxiv.org/abs/2204.03645. Official code and weights: https://github.com/dingmyu/davit; timm carries the
models as ``davit_*`` (``.msft_in1k`` weights for tiny, small, base), which load here unchanged through `KEY_MAP`
(as does the official release layout). Zoo names are ``zoo_`` + timm's name.

A stem (7x7 stride-4 conv, LayerNorm), four stages of the one `MixerBlock` with a LayerNorm + 2x2 stride-2 conv
downsample before stages 2-4, and timm's norm head (pool, LayerNorm, linear). Blocks alternate: even blocks are
spatial attention in 7 x 7 windows with no bias and no shift ('window' with rel_pos_bias=False), odd blocks channel
group attention ('channel_group'); every block has a 3x3 depthwise conv position embedding before the attention
and another before the MLP (ConvPosEnc). MLP ratio 4, LayerNorm eps 1e-5, no layer scale. Any input size runs, with
timm's and the official outputs: the stem and downsamples pad as they do, and the spatial attention zero-pads its
normed input to window multiples and lets the padded tokens join the keys unmasked, as they do
(``mask_padding=False``; every map at 224 px is a multiple of 7, so nothing is padded there).
"""
from functools import partial
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import LayerNorm2d, NormMlpClassifierHead
from timm.models import generate_default_cfgs, register_model

from zoo.weights.keymap import KeyMap, KeyRule, make_filter

from ._hierarchical import HierarchicalBackbone, StageSpec, build_backbone, build_stages, default_cfg

__all__ = ['DaViT', 'davit_stage_specs', 'KEY_MAP', 'checkpoint_filter_fn']


class Stem(nn.Module):
    """(B, in_chans, H, W) -> (B, dim, ceil(H / 4), ceil(W / 4)): 7x7 stride-4 conv (padding 3), LayerNorm.

    timm / official zero-pad the image to multiples of 4 first; with padding 3 that reads the same zeros."""

    def __init__(self, in_chans: int, dim: int, norm_eps: float = 1e-5):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, dim, kernel_size=7, stride=4, padding=3)
        self.norm = LayerNorm2d(dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


def davit_stage_specs(
        embed_dims: Sequence[int],
        depths: Sequence[int],
        num_heads: Sequence[int],
        window_size: int = 7,
        mlp_ratio: float = 4.,
        cpe_kernel: int = 3,
) -> Tuple[StageSpec, ...]:
    """DaViT's stages: `depths[i]` (spatial, channel) block pairs, each block with a CPE before the attention and
    another before the MLP; LayerNorm + 2x2 conv downsamples before stages 2-4."""
    if not len(embed_dims) == len(depths) == len(num_heads):
        raise ValueError(f'embed_dims, depths, num_heads: expected one entry per stage each, got {tuple(embed_dims)}, '
                         f'{tuple(depths)}, {tuple(num_heads)}')
    spatial = ('window', dict(window_size=window_size, rel_pos_bias=False, mask_padding=False))
    channel = ('channel_group', {})
    return tuple(
        StageSpec(
            depth=2 * depth, dim=dim, mixer=[spatial[0], channel[0]] * depth,
            mixer_kwargs=[spatial[1], channel[1]] * depth, num_heads=heads, mlp_ratio=mlp_ratio,
            pos_embed=cpe_kernel, block_kwargs=dict(mlp_pos_embed=cpe_kernel),
            downsample='norm_conv' if i else None)
        for i, (dim, depth, heads) in enumerate(zip(embed_dims, depths, num_heads)))


class DaViT(HierarchicalBackbone):
    """DaViT. (B, in_chans, H, W) -> (B, num_classes), any H, W; stage features at strides 4, 8, 16, 32.

    Args:
        in_chans: image channels.
        num_classes: classifier outputs (0 for none).
        global_pool: head pooling type.
        embed_dims: width of each stage.
        depths: (spatial, channel) block pairs per stage.
        num_heads: heads (= channel groups) per stage.
        window_size: spatial attention window.
        mlp_ratio: MLP hidden width / dim.
        qkv_bias: bias in the qkv projections.
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after attention projections and in MLPs.
        drop_path_rate: stochastic depth rate, rising stage-wise to this value.
        img_size: accepted for timm compatibility and ignored (any input size works).
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Sequence[int] = (96, 192, 384, 768),
            depths: Sequence[int] = (1, 1, 3, 1),
            num_heads: Sequence[int] = (3, 6, 12, 24),
            window_size: int = 7,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            img_size: Optional[Union[int, Sequence[int]]] = None,
    ):
        super().__init__()
        specs = davit_stage_specs(embed_dims, depths, num_heads, window_size, mlp_ratio)
        stages, feature_info = build_stages(
            specs, embed_dims[0], 4, drop_path_rate, qkv_bias=qkv_bias, proj_drop=proj_drop_rate)
        head = NormMlpClassifierHead(
            embed_dims[-1], num_classes, pool_type=global_pool, drop_rate=drop_rate,
            norm_layer=partial(LayerNorm2d, eps=1e-5))
        self.init_backbone(
            stem=Stem(in_chans, embed_dims[0]),
            stages=stages,
            feature_info=feature_info,
            norm=None,
            head=head,
            num_classes=num_classes,
            in_chans=in_chans,
            num_features=embed_dims[-1],
            head_hidden_size=head.num_features,
        )


def _block_index(m) -> str:
    return f'stages.{m[1]}.blocks.{2 * int(m[2]) + int(m[3])}.'


# timm's ``davit_*``: block pairs `blocks.{j}.{0,1}` flattened to `blocks.{2j}`, `blocks.{2j+1}`; `cpe1` / `cpe2`
# -> `pos_embed` / `pos_embed2`. The official release (`patch_embeds.{i}.{proj,norm}`, `main_blocks.{i}.{j}.{k}`,
# `cpe.{0,1}`, `norms`, `head`) is renamed onto the same layout (timm's own `checkpoint_filter_fn` renames).
KEY_MAP = KeyMap(
    rules=(
        KeyRule(r'^patch_embeds\.0\.proj\.', 'stem.conv.'),
        KeyRule(r'^patch_embeds\.0\.norm\.', 'stem.norm.'),
        KeyRule(r'^patch_embeds\.(\d+)\.proj\.', r'stages.\1.downsample.conv.'),
        KeyRule(r'^patch_embeds\.(\d+)\.norm\.', r'stages.\1.downsample.norm.'),
        KeyRule(r'^main_blocks\.(\d+)\.(\d+)\.(\d)\.', _block_index),
        KeyRule(r'^stages\.(\d+)\.blocks\.(\d+)\.(\d)\.', _block_index),
        KeyRule(r'\.cpe\.0\.', '.pos_embed.'),
        KeyRule(r'\.cpe\.1\.', '.pos_embed2.'),
        KeyRule(r'\.cpe1\.', '.pos_embed.'),
        KeyRule(r'\.cpe2\.', '.pos_embed2.'),
        KeyRule(r'^norms\.', 'head.norm.'),
        KeyRule(r'^head\.(weight|bias)$', r'head.fc.\1'),
    ),
)
checkpoint_filter_fn = make_filter(KEY_MAP)


def _create_davit(variant: str, pretrained: bool = False, **kwargs) -> DaViT:
    return build_backbone(
        DaViT, variant, pretrained, checkpoint_filter_fn=KEY_MAP,
        num_stages=len(kwargs.get('depths', (1, 1, 3, 1))), **kwargs)


def _cfg(hf_hub_id: str = '', **kwargs) -> Dict[str, Any]:
    # timm's cfgs of the converted Microsoft weights
    return default_cfg(
        hf_hub_id=hf_hub_id, crop_pct=0.95, first_conv='stem.conv', classifier='head.fc', license='apache-2.0',
        paper_ids='arXiv:2204.03645', origin_url='https://github.com/dingmyu/davit', **kwargs)


default_cfgs = generate_default_cfgs({
    'zoo_davit_tiny.msft_in1k': _cfg(hf_hub_id='timm/davit_tiny.msft_in1k'),
    'zoo_davit_small.msft_in1k': _cfg(hf_hub_id='timm/davit_small.msft_in1k'),
    'zoo_davit_base.msft_in1k': _cfg(hf_hub_id='timm/davit_base.msft_in1k'),
    'zoo_davit_large': _cfg(notes=('no released weights',)),
    'zoo_davit_huge': _cfg(notes=('no released weights',)),
    'zoo_davit_giant': _cfg(notes=('no released weights',)),
})

# narrow and shallow, same structure: a spatial and a channel block in every stage (see zoo.reduced_args)
REDUCED_ARGS = {'zoo_davit_*': dict(embed_dims=(16, 32, 64, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 4))}


def _entry(variant: str, pretrained: bool, kwargs: Dict[str, Any], **model_args) -> DaViT:
    return _create_davit(variant, pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_davit_tiny(pretrained: bool = False, **kwargs) -> DaViT:
    """DaViT-T: dims (96, 192, 384, 768), pairs (1, 1, 3, 1), heads (3, 6, 12, 24); 28.4M params."""
    return _entry('zoo_davit_tiny', pretrained, kwargs, depths=(1, 1, 3, 1))


@register_model
def zoo_davit_small(pretrained: bool = False, **kwargs) -> DaViT:
    """DaViT-S: dims (96, 192, 384, 768), pairs (1, 1, 9, 1), heads (3, 6, 12, 24); 49.7M params."""
    return _entry('zoo_davit_small', pretrained, kwargs, depths=(1, 1, 9, 1))


@register_model
def zoo_davit_base(pretrained: bool = False, **kwargs) -> DaViT:
    """DaViT-B: dims (128, 256, 512, 1024), pairs (1, 1, 9, 1), heads (4, 8, 16, 32); 88.0M params."""
    return _entry('zoo_davit_base', pretrained, kwargs, depths=(1, 1, 9, 1), embed_dims=(128, 256, 512, 1024),
                  num_heads=(4, 8, 16, 32))


@register_model
def zoo_davit_large(pretrained: bool = False, **kwargs) -> DaViT:
    """DaViT-L: dims (192, 384, 768, 1536), pairs (1, 1, 9, 1), heads (6, 12, 24, 48); 196.8M params."""
    return _entry('zoo_davit_large', pretrained, kwargs, depths=(1, 1, 9, 1), embed_dims=(192, 384, 768, 1536),
                  num_heads=(6, 12, 24, 48))


@register_model
def zoo_davit_huge(pretrained: bool = False, **kwargs) -> DaViT:
    """DaViT-H: dims (256, 512, 1024, 2048), pairs (1, 1, 9, 1), heads (8, 16, 32, 64); 348.9M params."""
    return _entry('zoo_davit_huge', pretrained, kwargs, depths=(1, 1, 9, 1), embed_dims=(256, 512, 1024, 2048),
                  num_heads=(8, 16, 32, 64))


@register_model
def zoo_davit_giant(pretrained: bool = False, **kwargs) -> DaViT:
    """DaViT-G: dims (384, 768, 1536, 3072), pairs (1, 1, 12, 3), heads (12, 24, 48, 96); 1406.5M params."""
    return _entry('zoo_davit_giant', pretrained, kwargs, depths=(1, 1, 12, 3), embed_dims=(384, 768, 1536, 3072),
                  num_heads=(12, 24, 48, 96))
