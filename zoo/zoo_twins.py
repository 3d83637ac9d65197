"""Twins (PCPVT and SVT) on the zoo's one block.

`Twins: Revisiting the Design of Spatial Attention in Vision Transformers` - https://arxiv.org/abs/2104.13840
Official code and weights: https://github.com/Meituan-AutoML/Twins; timm's `twins.py` carries the same weights.

A stem, a list of stage specs and a key map. PCPVT: spatial-reduction attention ('spatial_reduction') in every
block. SVT: locally grouped attention (the 'window' mixer with no bias table and unmasked zero padding, as the
official detection code and timm do) in even blocks, global sub-sampled attention ('spatial_reduction') in odd
ones. The conditional position encoding (PEG) after each stage's first block is the block's conv position
embedding of the second block. Any input size uses every pixel: the patch embeddings and the key / value
reductions zero-pad at the bottom / right where timm floors (it silently crops). Model names are `zoo_` + timm's.
"""
from functools import partial
from typing import Any, Dict, Optional, Sequence, Tuple

import torch.nn as nn
from timm.layers import ClassifierHead, LayerNorm2d
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import init_weights_vit_timm

from zoo.weights.keymap import KeyMap, KeyRule, make_filter

from ._hierarchical import HierarchicalBackbone, StageSpec, build_backbone, build_stages, default_cfg
from .zoo_swin import PatchEmbed

__all__ = ['Twins', 'KEY_MAP', 'checkpoint_filter_fn', 'twins_stage_specs']

_BLOCK_EPS = 1e-6  # blocks and the final norm; patch embeddings and the sr norm keep nn.LayerNorm's 1e-5


def twins_stage_specs(
        embed_dims: Sequence[int],
        depths: Sequence[int],
        num_heads: Sequence[int],
        mlp_ratios: Sequence[float],
        sr_ratios: Sequence[int],
        wss: Optional[Sequence[int]] = None,
) -> Tuple[StageSpec, ...]:
    """Twins' stages: with `wss` (SVT) even blocks attend in ws x ws windows, odd blocks (all blocks without:
    PCPVT) to a sr_ratio-times reduced map; the second block of each stage carries the PEG (3x3 depthwise conv)."""
    lengths = {len(v) for v in (embed_dims, num_heads, mlp_ratios, sr_ratios, *([wss] if wss else []))}
    if lengths != {len(depths)}:
        raise ValueError(f'depths, embed_dims, num_heads, mlp_ratios, sr_ratios, wss: expected one entry per stage '
                         f'({len(depths)}), got lengths {sorted(lengths)}')
    if any(d < 2 for d in depths):
        raise ValueError(f'depths: Twins puts its position encoding between the first two blocks of each stage, '
                         f'expected depths >= 2, got {tuple(depths)}')
    specs = []
    for i, depth in enumerate(depths):
        mixers, kwargs = [], []
        for j in range(depth):
            if wss is not None and j % 2 == 0:
                mixers.append('window')
                kwargs.append(dict(window_size=wss[i], rel_pos_bias=False, mask_padding=False))
            else:
                mixers.append('spatial_reduction')
                kwargs.append(dict(sr_ratio=sr_ratios[i]))
        specs.append(StageSpec(
            depth=depth, dim=embed_dims[i], mixer=mixers, mixer_kwargs=kwargs, num_heads=num_heads[i],
            mlp_ratio=mlp_ratios[i], downsample='conv' if i else None,
            block_kwargs=[dict(pos_embed=3 if j == 1 else 0) for j in range(depth)]))
    return tuple(specs)


class Twins(HierarchicalBackbone):
    """Twins-PCPVT (wss None) or Twins-SVT. (B, in_chans, H, W) -> (B, num_classes), any H, W >= 29.

    Args:
        in_chans: image channels.
        num_classes: classifier outputs (0 for none).
        global_pool: head pooling type.
        embed_dims: width per stage.
        depths: blocks per stage (>= 2).
        num_heads: attention heads per stage.
        mlp_ratios: MLP hidden width / dim per stage.
        sr_ratios: key / value reduction of the spatial-reduction attention per stage.
        wss: window size per stage of SVT's locally grouped attention (even blocks); None: PCPVT.
        patch_size: stem patch size (the later stages halve the map).
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after attention projections and in MLPs.
        attn_drop_rate: attention dropout (0 where a stage has window attention).
        drop_path_rate: stochastic depth rate, rising stage-wise to this value.
    """
    min_input_size = 29  # stage 1's 8x reduction needs a map of at least 8 x 8 (29 px -> 8 after the 4x stem)

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Sequence[int] = (64, 128, 256, 512),
            depths: Sequence[int] = (3, 4, 6, 3),
            num_heads: Sequence[int] = (1, 2, 4, 8),
            mlp_ratios: Sequence[float] = (4., 4., 4., 4.),
            sr_ratios: Sequence[int] = (8, 4, 2, 1),
            wss: Optional[Sequence[int]] = None,
            patch_size: int = 4,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ):
        super().__init__()
        specs = twins_stage_specs(embed_dims, depths, num_heads, mlp_ratios, sr_ratios, wss)
        dims = [spec.dim for spec in specs]
        stages, feature_info = build_stages(
            specs, dims[0], patch_size, drop_path_rate, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
            norm_eps=_BLOCK_EPS, downsample_kwargs=dict(kernel_size=2, bias=True))
        self.init_backbone(
            stem=PatchEmbed(in_chans, dims[0], patch_size),
            stages=stages,
            feature_info=feature_info,
            norm=LayerNorm2d(dims[-1], eps=_BLOCK_EPS),
            head=ClassifierHead(dims[-1], num_classes, pool_type=global_pool, drop_rate=drop_rate),
            num_classes=num_classes,
            in_chans=in_chans,
            num_features=dims[-1],
        )
        self.apply(partial(init_weights_vit_timm, needs_reset=False))


# timm and the official release (Meituan-AutoML/Twins, weights under `model`) share one layout:
# `patch_embeds.i.{proj,norm}`, `blocks.i.j.*`, `pos_block.i.proj.0.*` (the PEG after block 0), `norm`, `head`.
KEY_MAP = KeyMap(
    rules=(
        KeyRule(r'^patch_embeds\.0\.proj\.', 'stem.conv.'),
        KeyRule(r'^patch_embeds\.0\.norm\.', 'stem.norm.'),
        KeyRule(r'^patch_embeds\.(\d+)\.proj\.', r'stages.\1.downsample.reduction.'),
        KeyRule(r'^patch_embeds\.(\d+)\.norm\.', r'stages.\1.downsample.norm.'),
        KeyRule(r'^blocks\.(\d+)\.', r'stages.\1.blocks.'),
        KeyRule(r'^pos_block\.(\d+)\.proj\.0\.', r'stages.\1.blocks.1.pos_embed.proj.'),
        KeyRule(r'^head\.(weight|bias)$', r'head.fc.\1'),
    ),
    reject=((r'^(cls_token|pos_embeds?)\b', 'the class token and absolute position embeddings of PVT / CPVT v1 '
             'are not part of Twins'),),
)
checkpoint_filter_fn = make_filter(KEY_MAP)


def _create_twins(variant: str, pretrained: bool = False, **kwargs) -> Twins:
    return build_backbone(Twins, variant, pretrained, checkpoint_filter_fn=KEY_MAP,
                          num_stages=len(kwargs.get('depths', (3, 4, 6, 3))), **kwargs)


def _cfg(hf_hub_id: str = '', **kwargs) -> Dict[str, Any]:
    return default_cfg(
        hf_hub_id=hf_hub_id, license='apache-2.0', crop_pct=0.9, first_conv='stem.conv', classifier='head.fc',
        paper_ids='arXiv:2104.13840', origin_url='https://github.com/Meituan-AutoML/Twins', **kwargs)


default_cfgs = generate_default_cfgs({
    f'zoo_twins_{v}.in1k': _cfg(hf_hub_id=f'timm/twins_{v}.in1k')
    for v in ('pcpvt_small', 'pcpvt_base', 'pcpvt_large', 'svt_small', 'svt_base', 'svt_large')
})

# narrow and shallow, same structure (see zoo.reduced_args)
REDUCED_ARGS = {
    'zoo_twins_pcpvt_*': dict(embed_dims=(16, 32, 48, 64), depths=(2, 2, 2, 2), num_heads=(1, 2, 3, 4),
                              mlp_ratios=(2, 2, 2, 2)),
    'zoo_twins_svt_*': dict(embed_dims=(16, 32, 64, 64), depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 4),
                            mlp_ratios=(2, 2, 2, 2)),
}

_PCPVT = dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 2, 1))
_SVT = dict(mlp_ratios=(4, 4, 4, 4), sr_ratios=(8, 4, 2, 1), wss=(7, 7, 7, 7))


@register_model
def zoo_twins_pcpvt_small(pretrained: bool = False, **kwargs) -> Twins:
    """Twins-PCPVT-S (timm's twins_pcpvt_small): depths (3, 4, 6, 3); 24.1M params."""
    return _create_twins('zoo_twins_pcpvt_small', pretrained, **{**_PCPVT, 'depths': (3, 4, 6, 3), **kwargs})


@register_model
def zoo_twins_pcpvt_base(pretrained: bool = False, **kwargs) -> Twins:
    """Twins-PCPVT-B (timm's twins_pcpvt_base): depths (3, 4, 18, 3); 43.8M params."""
    return _create_twins('zoo_twins_pcpvt_base', pretrained, **{**_PCPVT, 'depths': (3, 4, 18, 3), **kwargs})


@register_model
def zoo_twins_pcpvt_large(pretrained: bool = False, **kwargs) -> Twins:
    """Twins-PCPVT-L (timm's twins_pcpvt_large): depths (3, 8, 27, 3); 61.0M params."""
    return _create_twins('zoo_twins_pcpvt_large', pretrained, **{**_PCPVT, 'depths': (3, 8, 27, 3), **kwargs})


@register_model
def zoo_twins_svt_small(pretrained: bool = False, **kwargs) -> Twins:
    """Twins-SVT-S (timm's twins_svt_small): dims 64..512, heads (2, 4, 8, 16), depths (2, 2, 10, 4); 24.1M."""
    model_args = dict(_SVT, embed_dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16), depths=(2, 2, 10, 4))
    return _create_twins('zoo_twins_svt_small', pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_twins_svt_base(pretrained: bool = False, **kwargs) -> Twins:
    """Twins-SVT-B (timm's twins_svt_base): dims 96..768, heads (3, 6, 12, 24), depths (2, 2, 18, 2); 56.1M."""
    model_args = dict(_SVT, embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24), depths=(2, 2, 18, 2))
    return _create_twins('zoo_twins_svt_base', pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_twins_svt_large(pretrained: bool = False, **kwargs) -> Twins:
    """Twins-SVT-L (timm's twins_svt_large): dims 128..1024, heads (4, 8, 16, 32), depths (2, 2, 18, 2); 99.3M."""
    model_args = dict(_SVT, embed_dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32), depths=(2, 2, 18, 2))
    return _create_twins('zoo_twins_svt_large', pretrained, **dict(model_args, **kwargs))
