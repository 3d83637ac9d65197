"""L2ViT: local window attention and enhanced linear global attention, alternating.

`The Linear Attention Resurrection in Vision Transformer` (Zheng, 2025) - https://arxiv.org/abs/2501.16182
Official code and weights: https://github.com/ChuanyangZheng/L2ViT (`classification/models/l2vit.py`).

A conv stem (two 3x3 stride-2 convs with BatchNorm, ReLU between, then LayerNorm; the image zero-padded to a
multiple of 4 first, as official), four stages of the one `MixerBlock` with a LayerNorm + 2x2 stride-2 conv
downsample before stages 2-4, a final LayerNorm and a linear head. Blocks alternate (official
'mix_local_enhanced_vit'): even blocks are LWA - softmax attention in 7 x 7 windows with no bias and no shift
('window' mixer with rel_pos_bias=False), with a 3x3 depthwise conv position embedding (CPE) before the attention and another before
the MLP; odd blocks are LGA - L2ViT's linear attention over the whole map ('linear' mixer, variant 'l2vit') with a
CPE before it and the local concentration module (LCM) as a residual branch of its own after it. MLP ratio 4,
LayerNorm eps 1e-5, no layer scale. Any input size runs: windows pad and mask (officially the padding joins the
keys; every map at 224 px is a multiple of 7, so nothing is padded there).
"""
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ClassifierHead, LayerNorm2d
from timm.models import generate_default_cfgs, register_model
from timm.models.convnext import _init_weights as init_weights_convnext

from zoo.kernels._sizes import ceil_div
from zoo.weights.keymap import KeyMap, KeyRule, make_filter
from zoo.weights.sources import prefer_raw_weights

from ._hierarchical import HierarchicalBackbone, StageSpec, build_backbone, build_stages, default_cfg, with_tag_args

__all__ = ['L2ViT', 'l2vit_stage_specs', 'KEY_MAP', 'checkpoint_filter_fn']


class ConvStem(nn.Module):
    """(B, in_chans, H, W) -> (B, dim, ceil(H / 4), ceil(W / 4)): zero-pad to multiples of 4, conv-BN-ReLU-conv-BN,
    LayerNorm over channels (official `downsample_layers.0`)."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, dim // 2, kernel_size=3, stride=2, padding=1),
            nn.BatchNorm2d(dim // 2),
            nn.ReLU(),
            nn.Conv2d(dim // 2, dim, kernel_size=3, stride=2, padding=1),
            nn.BatchNorm2d(dim),
        )
        self.norm = LayerNorm2d(dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        x = F.pad(x, (0, 4 * ceil_div(W, 4) - W, 0, 4 * ceil_div(H, 4) - H))
        return self.norm(self.proj(x))


def l2vit_stage_specs(
        embed_dim: Sequence[int],
        depths: Sequence[int],
        num_heads: Sequence[int],
        window_size: int = 7,
        mlp_ratio: float = 4.,
        cpe_kernel: int = 3,
        lcm: bool = True,
) -> Tuple[StageSpec, ...]:
    """L2ViT's stages: even blocks LWA (window attention, CPE before attention and MLP), odd blocks LGA (linear
    attention, CPE, then the LCM branch unless `lcm` is False)."""
    n = len(depths)
    if not len(embed_dim) == len(num_heads) == n:
        raise ValueError(f'embed_dim, depths, num_heads: expected one entry per stage each, got {tuple(embed_dim)}, '
                         f'{tuple(depths)}, {tuple(num_heads)}')
    lwa = ('window', dict(window_size=window_size, rel_pos_bias=False), dict(mlp_pos_embed=cpe_kernel))
    lga = ('linear', dict(variant='l2vit'), dict(local_layer='lcm') if lcm else {})
    specs = []
    for i, (dim, depth, heads) in enumerate(zip(embed_dim, depths, num_heads)):
        kinds = [lga if j % 2 else lwa for j in range(depth)]
        specs.append(StageSpec(
            depth=depth, dim=dim, mixer=[k[0] for k in kinds], mixer_kwargs=[k[1] for k in kinds],
            num_heads=heads, mlp_ratio=mlp_ratio, pos_embed=cpe_kernel, block_kwargs=[k[2] for k in kinds],
            downsample='norm_conv' if i else None))
    return tuple(specs)


class L2ViT(HierarchicalBackbone):
    """L2ViT. (B, in_chans, H, W) -> (B, num_classes), any H, W.

    Args:
        in_chans: image channels.
        num_classes: classifier outputs (0 for none).
        global_pool: head pooling type.
        embed_dim: width of each stage.
        depths: blocks per stage.
        num_heads: attention heads per stage.
        window_size: window of the LWA blocks (official 7; 12 for the 384 px fine-tune).
        mlp_ratio: MLP hidden width / dim.
        cpe_kernel: kernel of the depthwise conv position embeddings.
        lcm: the LGA blocks' local concentration module.
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after attention projections and in MLPs.
        drop_path_rate: stochastic depth rate, rising linearly over blocks to this value.
        img_size: accepted for timm compatibility and ignored (any input size works).
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: Sequence[int] = (96, 192, 384, 768),
            depths: Sequence[int] = (2, 2, 6, 2),
            num_heads: Sequence[int] = (3, 6, 12, 24),
            window_size: int = 7,
            mlp_ratio: float = 4.,
            cpe_kernel: int = 3,
            lcm: bool = True,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            img_size: Optional[Union[int, Sequence[int]]] = None,
    ):
        super().__init__()
        specs = l2vit_stage_specs(embed_dim, depths, num_heads, window_size, mlp_ratio, cpe_kernel, lcm)
        stages, feature_info = build_stages(
            specs, embed_dim[0], 4, drop_path_rate, qkv_bias=True, proj_drop=proj_drop_rate)
        self.init_backbone(
            stem=ConvStem(in_chans, embed_dim[0]),
            stages=stages,
            feature_info=feature_info,
            norm=LayerNorm2d(embed_dim[-1], eps=1e-5),
            head=ClassifierHead(embed_dim[-1], num_classes, pool_type=global_pool, drop_rate=drop_rate),
            num_classes=num_classes,
            in_chans=in_chans,
            num_features=embed_dim[-1],
        )
        self.apply(init_weights_convnext)  # the official init: trunc-normal(0.02) conv / linear weights, zero bias


# Official (`l2vit.py`, files {'model': ..., 'model_ema': ...}): `downsample_layers.0.{proj.proj.{0,1,3,4}, norm}`
# (stem), `downsample_layers.N.{norm, proj}` (LayerNorm + 2x2 conv before stage N), `stages.N.M.{cpe.0.proj, norm1,
# attn.{qkv, proj, temperature}, norm2, mlp.{fc1, fc2}}` plus `cpe.1.proj` (LWA) or `norm3`, `local_mp.{conv1, bn,
# conv2}` (LGA), `norm`, `head`. Our own layout passes through unchanged.
KEY_MAP = KeyMap(rules=(
    KeyRule(r'^downsample_layers\.0\.proj\.proj\.', 'stem.proj.'),
    KeyRule(r'^downsample_layers\.0\.norm\.', 'stem.norm.'),
    KeyRule(r'^downsample_layers\.(\d+)\.proj\.', r'stages.\1.downsample.conv.'),
    KeyRule(r'^downsample_layers\.(\d+)\.norm\.', r'stages.\1.downsample.norm.'),
    KeyRule(r'^stages\.(\d+)\.(\d+)\.', r'stages.\1.blocks.\2.'),
    KeyRule(r'\.cpe\.0\.', '.pos_embed.'),
    KeyRule(r'\.cpe\.1\.', '.pos_embed2.'),
    KeyRule(r'\.local_mp\.', '.local.'),
    KeyRule(r'^head\.(weight|bias)$', r'head.fc.\1'),
))
checkpoint_filter_fn = make_filter(KEY_MAP)


# the official evaluation (`main.py --eval true --resume <file>`) loads each release file's raw weights ('model'),
# though the files also hold EMA weights ('model_ema')
prefer_raw_weights('l2vit_')
# the 384 px fine-tune uses windows of 12 (official `L2ViT_Base_384`)
_TAG_ARGS = {'in22k_ft_in1k_384': dict(window_size=12)}


def _create_l2vit(variant: str, pretrained: bool = False, **kwargs) -> L2ViT:
    kwargs = with_tag_args(kwargs, _TAG_ARGS)
    return build_backbone(
        L2ViT, variant, pretrained, checkpoint_filter_fn=KEY_MAP,
        num_stages=len(kwargs.get('depths', (2, 2, 6, 2))), **kwargs)


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    # official evaluation: ConvNeXt's (resize to 256 / 224 of the size, centre crop, bicubic)
    kwargs = dict(dict(crop_pct=0.875), **kwargs)
    return default_cfg(
        url=url, first_conv='stem.proj.0', license='mit', paper_ids='arXiv:2501.16182',
        origin_url='https://github.com/ChuanyangZheng/L2ViT', **kwargs)


_RELEASE = 'https://github.com/ChuanyangZheng/L2ViT/releases/download/v1.0'

default_cfgs = generate_default_cfgs({
    'l2vit_tiny.in1k': _cfg(f'{_RELEASE}/L2ViT-Tiny-checkpoint-best-ema.pth'),
    'l2vit_small.in1k': _cfg(f'{_RELEASE}/L2ViT-Small-checkpoint-best-ema.pth'),
    'l2vit_base.in1k': _cfg(f'{_RELEASE}/L2ViT-Base-checkpoint-best-ema.pth'),
    # ImageNet-22k pre-training (the official 22k -> 1k class mapping), fine-tuned on ImageNet-1k
    'l2vit_base.in22k_ft_in1k': _cfg(f'{_RELEASE}/L2ViT-Base-22k21k-finetune-224-checkpoint-best.pth'),
    # official evaluation at 384: resized to 384 x 384, no crop
    'l2vit_base.in22k_ft_in1k_384': _cfg(f'{_RELEASE}/L2ViT-Base-22k21k-finetune-384-checkpoint-best.pth',
                                         input_size=(3, 384, 384), crop_pct=1.0, crop_mode='squash'),
})

# narrow and shallow, same structure: LWA and LGA blocks in every stage (see zoo.reduced_args)
REDUCED_ARGS = {
    'l2vit_*': dict(embed_dim=(16, 32, 64, 64), depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 4)),
}


@register_model
def l2vit_tiny(pretrained: bool = False, **kwargs) -> L2ViT:
    """L2ViT-T: dims (96, 192, 384, 768), depths (2, 2, 6, 2), heads (3, 6, 12, 24), window 7; 28.6M params."""
    model_args = dict(embed_dim=(96, 192, 384, 768), depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    return _create_l2vit('l2vit_tiny', pretrained, **dict(model_args, **kwargs))


@register_model
def l2vit_small(pretrained: bool = False, **kwargs) -> L2ViT:
    """L2ViT-S: dims (96, 192, 384, 768), depths (2, 2, 18, 2), heads (3, 6, 12, 24), window 7; 50.2M params."""
    model_args = dict(embed_dim=(96, 192, 384, 768), depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
    return _create_l2vit('l2vit_small', pretrained, **dict(model_args, **kwargs))


@register_model
def l2vit_base(pretrained: bool = False, **kwargs) -> L2ViT:
    """L2ViT-B: dims (128, 256, 512, 1024), depths (2, 2, 18, 2), heads (4, 8, 16, 32), window 7; 88.6M params."""
    model_args = dict(embed_dim=(128, 256, 512, 1024), depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
    return _create_l2vit('l2vit_base', pretrained, **dict(model_args, **kwargs))
