"""Swin Transformer on the zoo's window attention op.

`Swin Transformer: Hierarchical Vision Transformer using Shifted Windows` - https://arxiv.org/abs/2103.14030
Official code and weights: https://github.com/microsoft/Swin-Transformer

Any input size works: the image is padded to a multiple of the patch size, patch merging pads odd maps,
and window attention pads and masks. `checkpoint_filter_fn` loads both timm's Swin checkpoints and the
official release files.
"""
import re
from functools import partial
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ClassifierHead, LayerNorm2d, calculate_drop_path_rates, to_2tuple
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import init_weights_vit_timm

from blocks.window import PatchMerging, SwinBlock

from ._hierarchical import HierarchicalBackbone, Stage, build_backbone, default_cfg

__all__ = ['SwinTransformer', 'checkpoint_filter_fn']

_LN_EPS = 1e-5  # nn.LayerNorm's default, used by the official model


class PatchEmbed(nn.Module):
    """Non-overlapping patch conv + LayerNorm. (B, C, H, W) -> (B, dim, ceil(H / p), ceil(W / p)).

    The image is zero-padded at the bottom / right to a multiple of the patch size.
    """

    def __init__(self, in_chans: int, dim: int, patch_size: int = 4):
        super().__init__()
        self.patch_size = to_2tuple(patch_size)
        self.conv = nn.Conv2d(in_chans, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = LayerNorm2d(dim, eps=_LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = self.patch_size
        pad_h, pad_w = -x.shape[-2] % ph, -x.shape[-1] % pw
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.norm(self.conv(x))


class SwinTransformer(HierarchicalBackbone):
    """Swin Transformer (v1). (B, in_chans, H, W) -> (B, num_classes), any H, W.

    Args:
        in_chans: image channels.
        num_classes: classifier outputs (0 for none).
        global_pool: head pooling type.
        embed_dim: stage-1 width (doubles each stage).
        depths: blocks per stage.
        num_heads: attention heads per stage.
        head_dim: channels per head (dim // heads if None).
        patch_size: stem patch size.
        window_size: attention window size M (shift M // 2 in every other block).
        mlp_ratio: MLP hidden width / dim.
        qkv_bias: bias in the qkv projections.
        init_values: layer-scale init (None: no layer scale, as in the paper).
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after attention projections and in MLPs.
        attn_drop_rate: attention dropout (must be 0: the window op has none).
        drop_path_rate: stochastic depth rate, rising stage-wise to this value.
        img_size: accepted for timm compatibility and ignored (any input size works).
    """
    no_weight_decay_keys = ('relative_position_bias_table',)

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 96,
            depths: Tuple[int, ...] = (2, 2, 6, 2),
            num_heads: Tuple[int, ...] = (3, 6, 12, 24),
            head_dim: Optional[int] = None,
            patch_size: int = 4,
            window_size: Union[int, Tuple[int, int]] = 7,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            init_values: Optional[float] = None,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.1,
            img_size: Optional[Union[int, Sequence[int]]] = None,
    ):
        super().__init__()
        if len(num_heads) != len(depths):
            raise ValueError(f'num_heads: expected one entry per stage ({len(depths)}), got {tuple(num_heads)}')
        num_stages = len(depths)
        dims = [int(embed_dim * 2 ** i) for i in range(num_stages)]
        window_size = to_2tuple(window_size)
        shift_size = tuple(w // 2 for w in window_size)
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)

        stem = PatchEmbed(in_chans, dims[0], patch_size)
        stages, feature_info = [], []
        reduction = patch_size
        for i in range(num_stages):
            if i > 0:
                reduction *= 2
            blocks = [
                SwinBlock(
                    dims[i],
                    num_heads=num_heads[i],
                    window_size=window_size,
                    shift_size=0 if j % 2 == 0 else shift_size,
                    head_dim=head_dim,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[i][j],
                    init_values=init_values,
                )
                for j in range(depths[i])
            ]
            downsample = PatchMerging(dims[i - 1], dims[i]) if i > 0 else None
            stages.append(Stage(blocks, downsample, fmt='NHWC'))
            feature_info.append(dict(num_chs=dims[i], reduction=reduction, module=f'stages.{i}'))

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


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map a timm or an official Swin checkpoint onto this model's names.

    timm (`swin_*_patch4_window7_224`): `patch_embed.*`, `layers.N.*` (downsample at the start of stage N),
    `head.fc.*`. Official (microsoft/Swin-Transformer, weights under `model`): downsample at the end of
    stage N, `head.*`, plus the `relative_position_index` / `attn_mask` buffers, which are dropped.
    A state dict already in this model's layout passes through unchanged.
    """
    if 'model' in state_dict and not torch.is_tensor(state_dict['model']):
        state_dict = state_dict['model']
    if 'state_dict' in state_dict and not torch.is_tensor(state_dict['state_dict']):
        state_dict = state_dict['state_dict']
    if 'absolute_pos_embed' in state_dict:
        raise ValueError('state_dict: absolute position embeddings (ape=True) are not supported by this model')
    # the official layout puts a downsample at the end of stage 0; timm's never has one there
    official = 'layers.0.downsample.reduction.weight' in state_dict
    out = {}
    for k, v in state_dict.items():
        if k.endswith(('relative_position_index', 'attn_mask')):
            continue
        if official:
            k = re.sub(r'^layers\.(\d+)\.downsample', lambda m: f'layers.{int(m.group(1)) + 1}.downsample', k)
            k = re.sub(r'^head\.(weight|bias)$', r'head.fc.\1', k)
        k = re.sub(r'^patch_embed\.proj\.', 'stem.conv.', k)
        k = re.sub(r'^patch_embed\.norm\.', 'stem.norm.', k)
        k = re.sub(r'^layers\.', 'stages.', k)
        out[k] = v
    return out


def _create_swin(variant: str, pretrained: bool = False, **kwargs) -> SwinTransformer:
    return build_backbone(
        SwinTransformer, variant, pretrained, checkpoint_filter_fn=checkpoint_filter_fn,
        num_stages=len(kwargs.get('depths', (2, 2, 6, 2))), **kwargs)


def _cfg(hf_hub_id: str = '', url: str = '', **kwargs) -> Dict[str, Any]:
    return default_cfg(
        url=url, hf_hub_id=hf_hub_id, license='mit',
        paper_ids='arXiv:2103.14030', origin_url='https://github.com/microsoft/Swin-Transformer', **kwargs)


_RELEASES = 'https://github.com/SwinTransformer/storage/releases/download'

default_cfgs = generate_default_cfgs({
    'swin_tiny.ms_in1k': _cfg(
        hf_hub_id='timm/swin_tiny_patch4_window7_224.ms_in1k',
        url=f'{_RELEASES}/v1.0.0/swin_tiny_patch4_window7_224.pth'),
    'swin_small.ms_in1k': _cfg(
        hf_hub_id='timm/swin_small_patch4_window7_224.ms_in1k',
        url=f'{_RELEASES}/v1.0.0/swin_small_patch4_window7_224.pth'),
    'swin_base.ms_in1k': _cfg(
        hf_hub_id='timm/swin_base_patch4_window7_224.ms_in1k',
        url=f'{_RELEASES}/v1.0.0/swin_base_patch4_window7_224.pth'),
    'swin_tiny.ms_in22k_ft_in1k': _cfg(
        hf_hub_id='timm/swin_tiny_patch4_window7_224.ms_in22k_ft_in1k',
        url=f'{_RELEASES}/v1.0.8/swin_tiny_patch4_window7_224_22kto1k_finetune.pth'),
    'swin_small.ms_in22k_ft_in1k': _cfg(
        hf_hub_id='timm/swin_small_patch4_window7_224.ms_in22k_ft_in1k',
        url=f'{_RELEASES}/v1.0.8/swin_small_patch4_window7_224_22kto1k_finetune.pth'),
    'swin_base.ms_in22k_ft_in1k': _cfg(
        hf_hub_id='timm/swin_base_patch4_window7_224.ms_in22k_ft_in1k',
        url=f'{_RELEASES}/v1.0.0/swin_base_patch4_window7_224_22kto1k.pth'),
})


@register_model
def swin_tiny(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """Swin-T: dim 96, depths (2, 2, 6, 2), heads (3, 6, 12, 24), window 7; 28M params."""
    model_args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), patch_size=4, window_size=7)
    return _create_swin('swin_tiny', pretrained, **dict(model_args, **kwargs))


@register_model
def swin_small(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """Swin-S: dim 96, depths (2, 2, 18, 2), heads (3, 6, 12, 24), window 7; 50M params."""
    model_args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), patch_size=4, window_size=7)
    return _create_swin('swin_small', pretrained, **dict(model_args, **kwargs))


@register_model
def swin_base(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """Swin-B: dim 128, depths (2, 2, 18, 2), heads (4, 8, 16, 32), window 7; 88M params."""
    model_args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), patch_size=4, window_size=7)
    return _create_swin('swin_base', pretrained, **dict(model_args, **kwargs))
