"""SHViT on the zoo's one block.

`SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design` - https://arxiv.org/abs/2401.16456
Official code and weights: https://github.com/ysj9909/SHViT; timm's `shvit.py` carries the same weights.

A stem, three stage specs and a key map. SHViT's block is the one `MixerBlock` in its conv style: no pre-norms
('identity'), a residual 3x3 depthwise conv + BatchNorm as the position embedding ('conv_bn'), the 'single_head'
mixer (single-head attention on the first `pdim` channels; none in the first stage) and a conv + BN FFN
('conv_bn_mlp'), ReLU throughout. Between stages: the 'se_merging' downsample. Size-free: every H x W runs (no
tables), odd sides are padded by the stride-2 convs. `KEY_MAP` loads timm's files and the official release (whose
layout timm cannot load). Model names are `zoo_` + timm's.
"""
from typing import Any, Dict, Sequence, Tuple

import torch
import torch.nn as nn
from timm.layers import ConvNormAct, NormMlpClassifierHead
from timm.models import generate_default_cfgs, register_model

from zoo.weights.keymap import KeyMap, KeyRule, make_filter

from ._hierarchical import HierarchicalBackbone, StageSpec, build_backbone, build_stages, default_cfg

__all__ = ['SHViT', 'KEY_MAP', 'checkpoint_filter_fn', 'shvit_stage_specs']


def shvit_stage_specs(
        embed_dims: Sequence[int],
        depths: Sequence[int],
        partial_dims: Sequence[int],
        qk_dim: int = 16,
        types: Sequence[str] = ('i', 's', 's'),
) -> Tuple[StageSpec, ...]:
    """SHViT's stages: type 's' blocks attend with one head over `partial_dims[i]` channels, type 'i' blocks do not;
    every block has a conv position embedding and a 2x conv FFN; stages after the first start with 'se_merging'."""
    lengths = {len(v) for v in (embed_dims, partial_dims, types)}
    if lengths != {len(depths)}:
        raise ValueError(f'depths, embed_dims, partial_dims, types: expected one entry per stage ({len(depths)}), '
                         f'got lengths {sorted(lengths)}')
    if set(types) - {'i', 's'}:
        raise ValueError(f"types: expected 'i' (no attention) or 's' (single-head attention) per stage, got {types}")
    return tuple(
        StageSpec(
            depth=depth, dim=dim, mixer=['single_head' if t == 's' else None] * depth, mixer_kwargs=dict(qk_dim=qk_dim),
            num_heads=1, head_dim=pdim, mlp_ratio=2., mlp_layer='conv_bn_mlp', pos_embed=3,
            downsample='se_merging' if i else None)
        for i, (depth, dim, pdim, t) in enumerate(zip(depths, embed_dims, partial_dims, types)))


class SHViT(HierarchicalBackbone):
    """SHViT. (B, in_chans, H, W) -> (B, num_classes), any H, W >= 16; features at strides 16, 32, 64.

    Args:
        in_chans: image channels.
        num_classes: classifier outputs (0 for none).
        global_pool: head pooling type.
        embed_dims: width per stage.
        depths: blocks per stage.
        partial_dims: channels the single-head attention sees per stage (the rest pass untouched).
        qk_dim: query / key channels of the attention.
        types: per stage, 's' (attention blocks) or 'i' (conv blocks only).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth rate, rising stage-wise to this value (SHViT trains without).
    """
    min_input_size = 16  # one token after the stride-16 stem

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Sequence[int] = (128, 224, 320),
            depths: Sequence[int] = (2, 4, 5),
            partial_dims: Sequence[int] = (32, 48, 68),
            qk_dim: int = 16,
            types: Sequence[str] = ('i', 's', 's'),
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ):
        super().__init__()
        specs = shvit_stage_specs(embed_dims, depths, partial_dims, qk_dim, types)
        stem_dim = embed_dims[0]
        widths = (in_chans, stem_dim // 8, stem_dim // 4, stem_dim // 2, stem_dim)
        stem = nn.Sequential(*[
            ConvNormAct(widths[i], widths[i + 1], 3, stride=2, apply_act=i < 3) for i in range(4)])
        stages, feature_info = build_stages(
            specs, stem_dim, 16, drop_path_rate, norm_layer='identity', act_layer='relu', pos_embed_layer='conv_bn')
        self.init_backbone(
            stem=stem,
            stages=stages,
            feature_info=feature_info,
            norm=None,
            head=NormMlpClassifierHead(
                embed_dims[-1], num_classes, pool_type=global_pool, drop_rate=drop_rate, norm_layer=nn.BatchNorm2d),
            num_classes=num_classes,
            in_chans=in_chans,
            num_features=embed_dims[-1],
        )
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=.02)
                nn.init.zeros_(m.bias)


def _official_stage(m) -> str:
    """ysj9909/SHViT's `blocksK.n` (K = 1..3) -> timm's `stages.{K-1}.downsample.i` / `stages.{K-1}.blocks.j`."""
    stage, n, rest = int(m.group(1)) - 1, int(m.group(2)), m.group(3)
    if stage == 0:
        return f'stages.0.blocks.{n}{rest}'
    if n == 0:  # blocksK.0.{0,1}: the conv block before the merging
        return f'stages.{stage}.downsample{rest}'
    if n == 1:
        return f'stages.{stage}.downsample.2{rest}'
    if n == 2:  # blocksK.2.{0,1}: the conv block after it
        return f'stages.{stage}.downsample.{int(rest[1]) + 3}{rest[2:]}'
    return f'stages.{stage}.blocks.{n - 3}{rest}'


def _unsqueeze_1x1(t: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv weight stored as (out, in) -> (out, in, 1, 1); anything else is left to the shape check."""
    return t[:, :, None, None] if t.dim() == 2 and own.dim() == 4 and own.shape[2:] == (1, 1) else t


# timm (`shvit_s*`): `patch_embed.{0,2,4,6}`, `stages.K.downsample.{0..4}` (Residual(dw conv), Residual(FFN),
# PatchMerging, Residual(dw conv), Residual(FFN)), `stages.K.blocks.J.{conv.m, mixer.m, ffn.m}`, `head.{bn,l}`;
# conv + BN pairs are `{c,bn}`. Official (ysj9909/SHViT, weights under `model`): `blocks1..3` (see `_official_stage`),
# the same names below them. Our own layout passes through.
KEY_MAP = KeyMap(
    rules=(
        KeyRule(r'^blocks(\d)\.(\d+)(\..*)$', _official_stage, when=r'^blocks1\.'),
        KeyRule(r'^patch_embed\.(\d)\.', lambda m: f'stem.{int(m.group(1)) // 2}.'),
        KeyRule(r'\.downsample\.0\.m\.', '.downsample.pre.conv.m.'),
        KeyRule(r'\.downsample\.1\.m\.', '.downsample.pre.ffn.m.'),
        KeyRule(r'\.downsample\.2\.', '.downsample.'),
        KeyRule(r'\.downsample\.3\.m\.', '.downsample.post.conv.m.'),
        KeyRule(r'\.downsample\.4\.m\.', '.downsample.post.ffn.m.'),
        KeyRule(r'\.conv\.m\.c\.', '.pos_embed.proj.'),
        KeyRule(r'\.conv\.m\.bn\.', '.pos_embed.bn.'),
        KeyRule(r'\.mixer\.m\.proj\.1\.', '.attn.proj.'),
        KeyRule(r'\.mixer\.m\.', '.attn.'),
        KeyRule(r'\.ffn\.m\.pw(\d)\.', r'.mlp.fc\1.'),
        KeyRule(r'\.c\.weight$', '.conv.weight'),
        KeyRule(r'^head\.bn\.', 'head.norm.'),
        KeyRule(r'^head\.l\.', 'head.fc.'),
    ),
    transforms=((r'\.weight$', _unsqueeze_1x1),),
)
checkpoint_filter_fn = make_filter(KEY_MAP)


def _create_shvit(variant: str, pretrained: bool = False, **kwargs) -> SHViT:
    return build_backbone(SHViT, variant, pretrained, checkpoint_filter_fn=KEY_MAP,
                          num_stages=len(kwargs.get('depths', (2, 4, 5))), **kwargs)


def _cfg(hf_hub_id: str = '', **kwargs) -> Dict[str, Any]:
    return default_cfg(
        hf_hub_id=hf_hub_id, license='mit', crop_pct=0.875, pool_size=(4, 4), first_conv='stem.0.conv',
        classifier='head.fc', paper_ids='arXiv:2401.16456', origin_url='https://github.com/ysj9909/SHViT', **kwargs)


default_cfgs = generate_default_cfgs({
    'zoo_shvit_s1.in1k': _cfg(hf_hub_id='timm/shvit_s1.in1k'),
    'zoo_shvit_s2.in1k': _cfg(hf_hub_id='timm/shvit_s2.in1k'),
    'zoo_shvit_s3.in1k': _cfg(hf_hub_id='timm/shvit_s3.in1k'),
    'zoo_shvit_s4.in1k': _cfg(hf_hub_id='timm/shvit_s4.in1k', input_size=(3, 256, 256)),
})

# narrow and shallow, same structure (see zoo.reduced_args)
REDUCED_ARGS = {'zoo_shvit_*': dict(embed_dims=(32, 48, 64), depths=(1, 2, 1), partial_dims=(8, 12, 16), qk_dim=8)}


@register_model
def zoo_shvit_s1(pretrained: bool = False, **kwargs) -> SHViT:
    """SHViT-S1 (timm's shvit_s1): dims (128, 224, 320), depths (2, 4, 5), pdims (32, 48, 68); 6.3M params."""
    model_args = dict(embed_dims=(128, 224, 320), depths=(2, 4, 5), partial_dims=(32, 48, 68))
    return _create_shvit('zoo_shvit_s1', pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_shvit_s2(pretrained: bool = False, **kwargs) -> SHViT:
    """SHViT-S2 (timm's shvit_s2): dims (128, 308, 448), depths (2, 4, 5), pdims (32, 66, 96); 11.5M params."""
    model_args = dict(embed_dims=(128, 308, 448), depths=(2, 4, 5), partial_dims=(32, 66, 96))
    return _create_shvit('zoo_shvit_s2', pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_shvit_s3(pretrained: bool = False, **kwargs) -> SHViT:
    """SHViT-S3 (timm's shvit_s3): dims (192, 352, 448), depths (3, 5, 5), pdims (48, 75, 96); 14.2M params."""
    model_args = dict(embed_dims=(192, 352, 448), depths=(3, 5, 5), partial_dims=(48, 75, 96))
    return _create_shvit('zoo_shvit_s3', pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_shvit_s4(pretrained: bool = False, **kwargs) -> SHViT:
    """SHViT-S4 (timm's shvit_s4): dims (224, 336, 448), depths (4, 7, 6), pdims (48, 72, 96); 16.6M params."""
    model_args = dict(embed_dims=(224, 336, 448), depths=(4, 7, 6), partial_dims=(48, 72, 96))
    return _create_shvit('zoo_shvit_s4', pretrained, **dict(model_args, **kwargs))
