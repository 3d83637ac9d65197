"""MaxViT (the TF release) on the zoo's window attention op.

`MaxViT: Multi-Axis Vision Transformer` - https://arxiv.org/abs/2204.01697
Official code and weights: https://github.com/google-research/maxvit; timm ports the weights as
``maxvit_{tiny,small,base}_tf_224``, which load here through `checkpoint_filter_fn` (one key rename).

Same numerics as timm's ``maxvit_*_tf_224`` at 224, and any input size works: strided convs use TF 'same'
padding (output ceil(H / 2)), and block / grid attention pads and masks maps that are not multiples of the
partition (timm asserts divisibility instead).
"""
import math
from functools import partial
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    LayerNorm2d,
    NormMlpClassifierHead,
    calculate_drop_path_rates,
    create_conv2d,
    get_norm_act_layer,
    resize_rel_pos_bias_table,
)
from timm.models import generate_default_cfgs, named_apply, register_model

from zoo.blocks.multiaxis import MaxVitBlock, create_conv2d_same
from zoo.weights.keymap import KeyMap, KeyRule, make_filter

from ._hierarchical import HierarchicalBackbone, Stage, build_backbone, default_cfg

__all__ = ['MaxViT', 'KEY_MAP', 'checkpoint_filter_fn']


class Stem(nn.Module):
    """conv3x3 stride 2 -> BN-act -> conv3x3. (B, in_chs, H, W) -> (B, out_chs, ceil(H / 2), ceil(W / 2))."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            padding: str = 'same',
            act_layer: str = 'gelu_tanh',
            norm_eps: float = 1e-3,
    ):
        super().__init__()
        self.conv1 = create_conv2d_same(in_chs, out_chs, 3, stride=2, padding=padding, bias=True)
        self.norm1 = get_norm_act_layer('batchnorm2d', act_layer)(out_chs, eps=norm_eps)
        self.conv2 = create_conv2d(out_chs, out_chs, 3, stride=1, padding=padding, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.norm1(self.conv1(x)))


def _init_weights(module: nn.Module, name: str) -> None:
    """timm's 'vit_eff' scheme for the TF MaxViT: EfficientNet-style convs, ViT-style linears."""
    if isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0., math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            if 'mlp' in name:
                nn.init.normal_(module.bias, std=1e-6)
            else:
                nn.init.zeros_(module.bias)


class MaxViT(HierarchicalBackbone):
    """MaxViT (TF variant): stem -> 4 stages of MaxViT blocks -> pool, LN, tanh pre-logits, fc.

    (B, in_chans, H, W) -> (B, num_classes) for any H, W; stage features at strides 4, 8, 16, 32.

    Args:
        in_chans: image channels.
        num_classes: classifier outputs (0 for none).
        global_pool: head pooling type ('' keeps the map).
        embed_dim: width of each stage.
        depths: blocks per stage (the first block of each stage downsamples by 2).
        stem_width: stem channels.
        head_dim: channels per attention head.
        partition_size: block window and grid size P (7 for the 224 models).
        mlp_ratio: FFN hidden width / dim.
        expand_ratio: MBConv hidden width / dim.
        se_ratio: MBConv squeeze-excite width / dim.
        head_hidden_size: width of the tanh pre-logits layer (embed_dim[-1] if None, 0 for none).
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after attention projections and in the FFNs.
        drop_path_rate: stochastic depth rate, rising stage-wise to this value.
        img_size: accepted for timm compatibility and ignored (any input size works).
    """
    min_input_size = 1

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: Sequence[int] = (64, 128, 256, 512),
            depths: Sequence[int] = (2, 2, 5, 2),
            stem_width: int = 64,
            head_dim: int = 32,
            partition_size: Union[int, Tuple[int, int]] = 7,
            mlp_ratio: float = 4.,
            expand_ratio: float = 4.,
            se_ratio: float = 0.25,
            head_hidden_size: Optional[int] = None,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            img_size: Optional[Union[int, Sequence[int]]] = None,
    ):
        super().__init__()
        if len(embed_dim) != len(depths):
            raise ValueError(f'embed_dim: expected one width per stage ({len(depths)}), got {tuple(embed_dim)}')
        bad = [d for d in embed_dim if d % head_dim]
        if bad:
            raise ValueError(f'embed_dim: expected multiples of head_dim={head_dim}, got {tuple(embed_dim)}')
        num_stages = len(depths)
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)

        stem = Stem(in_chans, stem_width)
        stages, feature_info = [], []
        in_dim, reduction = stem_width, 2
        for i in range(num_stages):
            reduction *= 2
            blocks = [
                MaxVitBlock(
                    in_dim if j == 0 else embed_dim[i],
                    embed_dim[i],
                    stride=2 if j == 0 else 1,
                    partition_size=partition_size,
                    head_dim=head_dim,
                    mlp_ratio=mlp_ratio,
                    expand_ratio=expand_ratio,
                    se_ratio=se_ratio,
                    proj_drop=proj_drop_rate,
                    drop_path=dpr[i][j],
                )
                for j in range(depths[i])
            ]
            stages.append(Stage(blocks, fmt='NCHW'))
            feature_info.append(dict(num_chs=embed_dim[i], reduction=reduction, module=f'stages.{i}'))
            in_dim = embed_dim[i]

        head = NormMlpClassifierHead(
            embed_dim[-1],
            num_classes,
            hidden_size=embed_dim[-1] if head_hidden_size is None else head_hidden_size,
            pool_type=global_pool,
            drop_rate=drop_rate,
            norm_layer=partial(LayerNorm2d, eps=1e-5),
        )
        self.init_backbone(
            stem=stem,
            stages=stages,
            feature_info=feature_info,
            norm=None,
            head=head,
            num_classes=num_classes,
            in_chans=in_chans,
            num_features=embed_dim[-1],
            head_hidden_size=head.num_features,
        )
        named_apply(_init_weights, self.stem)
        named_apply(_init_weights, self.stages)


def _resize_table(table: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A (heads, 2P-1, 2P-1) bias table of another partition size (the 384 / 512 releases) resized to ours."""
    shape = target.shape
    return resize_rel_pos_bias_table(
        table, new_window_size=((shape[-2] + 1) // 2, (shape[-1] + 1) // 2), new_bias_shape=shape)


# timm's ``maxvit_*_tf_*``: one rename, ``attn.rel_pos.relative_position_bias_table`` ->
# ``attn.relative_position_bias_table`` (same TF layout); timm's non-persistent lookups are dropped if saved.
KEY_MAP = KeyMap(
    rules=(KeyRule(r'attn\.rel_pos\.relative_position_bias_table$', 'attn.relative_position_bias_table'),),
    drop=(r'(height|width)_lookup$',),
    transforms=((r'relative_position_bias_table$', _resize_table),),
)
checkpoint_filter_fn = make_filter(KEY_MAP)


def _create_maxvit(variant: str, pretrained: bool = False, **kwargs) -> MaxViT:
    return build_backbone(
        MaxViT, variant, pretrained, checkpoint_filter_fn=KEY_MAP,
        num_stages=len(kwargs.get('depths', (2, 2, 5, 2))), **kwargs)


def _cfg(hf_hub_id: str = '', **kwargs) -> Dict[str, Any]:
    # timm's cfgs of the TF 224 in1k ports: ImageNet mean / std, crop 0.95, bicubic
    kwargs = dict(dict(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD), **kwargs)
    return default_cfg(
        hf_hub_id=hf_hub_id, crop_pct=0.95, first_conv='stem.conv1', license='apache-2.0',
        paper_ids='arXiv:2204.01697', origin_url='https://github.com/google-research/maxvit', **kwargs)


default_cfgs = generate_default_cfgs({
    'maxvit_tiny.in1k': _cfg(hf_hub_id='timm/maxvit_tiny_tf_224.in1k'),
    'maxvit_small.in1k': _cfg(hf_hub_id='timm/maxvit_small_tf_224.in1k'),
    'maxvit_base.in1k': _cfg(hf_hub_id='timm/maxvit_base_tf_224.in1k'),
    # ImageNet-21k pre-training (no fine-tune); timm's cfg keeps the TF 0.5 mean / std for it
    'maxvit_base.in21k': _cfg(
        hf_hub_id='timm/maxvit_base_tf_224.in21k', num_classes=21843, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
})


# narrow and shallow, same structure (see zoo.reduced_args)
REDUCED_ARGS = {'maxvit_*': dict(embed_dim=(16, 32, 32, 64), depths=(1, 1, 1, 1), stem_width=16, head_dim=16)}


@register_model
def maxvit_tiny(pretrained: bool = False, **kwargs) -> MaxViT:
    """MaxViT-T, 31M params (timm's maxvit_tiny_tf_224 weights)."""
    model_args = dict(embed_dim=(64, 128, 256, 512), depths=(2, 2, 5, 2), stem_width=64)
    return _create_maxvit('maxvit_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def maxvit_small(pretrained: bool = False, **kwargs) -> MaxViT:
    """MaxViT-S, 69M params (timm's maxvit_small_tf_224 weights)."""
    model_args = dict(embed_dim=(96, 192, 384, 768), depths=(2, 2, 5, 2), stem_width=64)
    return _create_maxvit('maxvit_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def maxvit_base(pretrained: bool = False, **kwargs) -> MaxViT:
    """MaxViT-B, 119M params (timm's maxvit_base_tf_224 weights)."""
    model_args = dict(embed_dim=(96, 192, 384, 768), depths=(2, 6, 14, 2), stem_width=64)
    return _create_maxvit('maxvit_base', pretrained=pretrained, **dict(model_args, **kwargs))
