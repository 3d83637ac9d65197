"""GC ViT: window attention alternating with global-query window attention, on the one block.

`Global Context Vision Transformers` (Hatamizadeh, Yin, Heinrich, Kautz, Molchanov; ICML 2023) -
https://arxiv.org/abs/2206.09959. Official code and weights: https://github.com/NVlabs/GCVit; timm carries the
models as ``gcvit_*`` with the converted weights, which load here unchanged through `KEY_MAP` (as does the
official release layout). Zoo names are ``zoo_`` + timm's name.

A stem (3x3 stride-2 conv, then GC ViT's downsample keeping the width: LayerNorm, fused MBConv with SE, 3x3
stride-2 conv, LayerNorm), four stages of the one `MixerBlock` (that downsample doubling the width before stages
2-4), a final LayerNorm and a linear head. Even blocks: window attention with Swin's relative position bias
('window'); odd blocks: the same with the queries taken from the stage's global query ('window',
``global_query=True``), which a stage context (`zoo.blocks.gcvit.GlobalQueryGen`: fused MBConvs and max-pools of
the stage input) computes once per stage, per image. Windows and pooling rounds are those of `img_size` (224:
windows 7, 7, 14, 7 and 3, 2, 0, 0 pools, timm's rule); any input size runs as in the official detection backbone:
each attention zero-pads its normed input to window multiples, the padded tokens joining the keys unmasked
(``mask_padding=False``), and the global query is resized to the window in the graph (bicubic).
"""
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, LayerNorm2d, to_2tuple
from timm.models import generate_default_cfgs, register_model

from zoo.blocks.gcvit import MbConvDownsample, pool_levels
from zoo.weights.keymap import KeyMap, KeyRule, make_filter

from ._hierarchical import HierarchicalBackbone, StageSpec, build_backbone, build_stages, default_cfg

__all__ = ['GlobalContextViT', 'gcvit_stage_specs', 'KEY_MAP', 'checkpoint_filter_fn']


class Stem(nn.Module):
    """(B, in_chans, H, W) -> (B, dim, ceil(H / 4), ceil(W / 4)): 3x3 stride-2 conv, then GC ViT's downsample at
    constant width."""

    def __init__(self, in_chans: int, dim: int, norm_eps: float = 1e-5):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim, kernel_size=3, stride=2, padding=1)
        self.down = MbConvDownsample(dim, dim, norm_eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.conv1(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def gcvit_stage_specs(
        embed_dim: int,
        depths: Sequence[int],
        num_heads: Sequence[int],
        window_size: Sequence[Tuple[int, int]],
        pool_levels: Sequence[int],
        mlp_ratio: float = 3.,
        layer_scale: Optional[float] = None,
) -> Tuple[StageSpec, ...]:
    """GC ViT's stages: width embed_dim * 2^i, local (even) and global-query (odd) window blocks, the global query
    as the stage context, GC ViT's downsample before stages 2-4."""
    n = len(depths)
    if not len(num_heads) == len(window_size) == len(pool_levels) == n:
        raise ValueError(f'depths, num_heads, window_size: expected one entry per stage each, got {tuple(depths)}, '
                         f'{tuple(num_heads)}, {tuple(window_size)}')
    specs = []
    for i, (depth, heads, window, levels) in enumerate(zip(depths, num_heads, window_size, pool_levels)):
        if depth < 2:
            raise ValueError(f'depths: expected >= 2 blocks per stage (a local and a global one), got {tuple(depths)}')
        specs.append(StageSpec(
            depth=depth, dim=embed_dim * 2 ** i, mixer='window',
            mixer_kwargs=[dict(window_size=window, global_query=bool(j % 2), mask_padding=False)
                          for j in range(depth)],
            num_heads=heads, mlp_ratio=mlp_ratio, layer_scale=layer_scale, downsample='mbconv' if i else None,
            context='global_query', context_kwargs=dict(window_size=window, levels=levels)))
    return tuple(specs)


def _windows_and_pools(
        img_size: Tuple[int, int], num_stages: int, window_ratio: Sequence[int],
        window_size: Optional[Union[int, Sequence]],
) -> Tuple[Tuple[Tuple[int, int], ...], Tuple[int, ...]]:
    """timm's rule: windows img_size // window_ratio (unless given), pools log2(map / window) at img_size."""
    if window_size is None:
        windows = tuple((img_size[0] // r, img_size[1] // r) for r in window_ratio)
    elif isinstance(window_size, int):
        windows = ((window_size, window_size),) * num_stages
    else:
        windows = tuple(to_2tuple(w) for w in window_size)
    if len(windows) != num_stages or min(min(w) for w in windows) < 1:
        raise ValueError(f'window_size: expected {num_stages} positive windows (from img_size={img_size} and '
                         f'window_ratio={tuple(window_ratio)}), got {windows}')
    feats = [(img_size[0] // 4 // 2 ** i, img_size[1] // 4 // 2 ** i) for i in range(num_stages)]
    pools = tuple(pool_levels(f, w) for f, w in zip(feats, windows))
    return windows, pools


class GlobalContextViT(HierarchicalBackbone):
    """GC ViT. (B, in_chans, H, W) -> (B, num_classes), any H, W; stage features at strides 4, 8, 16, 32.

    Args:
        in_chans: image channels.
        num_classes: classifier outputs (0 for none).
        global_pool: head pooling type.
        img_size: the size windows and global-query pooling are laid out for (timm's rule); any size runs.
        window_ratio: per stage, img_size / window (timm: 32, 32, 16, 32).
        window_size: windows per stage (int or per-stage sizes), overriding window_ratio.
        embed_dim: width of the first stage (doubling per stage).
        depths: blocks per stage (even: local, odd: global-query window attention).
        num_heads: attention heads per stage.
        mlp_ratio: MLP hidden width / dim.
        layer_scale: layer-scale init (small, base: 1e-5), None for none.
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after attention projections and in MLPs.
        attn_drop_rate: accepted for timm compatibility; only 0 (the window op has no attention dropout).
        drop_path_rate: stochastic depth rate, rising stage-wise to this value.
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            img_size: Union[int, Tuple[int, int]] = 224,
            window_ratio: Sequence[int] = (32, 32, 16, 32),
            window_size: Optional[Union[int, Sequence]] = None,
            embed_dim: int = 64,
            depths: Sequence[int] = (3, 4, 19, 5),
            num_heads: Sequence[int] = (2, 4, 8, 16),
            mlp_ratio: float = 3.,
            layer_scale: Optional[float] = None,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ):
        super().__init__()
        windows, pools = _windows_and_pools(to_2tuple(img_size), len(depths), window_ratio, window_size)
        specs = gcvit_stage_specs(embed_dim, depths, num_heads, windows, pools, mlp_ratio, layer_scale)
        stages, feature_info = build_stages(
            specs, embed_dim, 4, drop_path_rate, qkv_bias=True, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate)
        num_features = specs[-1].dim
        self.init_backbone(
            stem=Stem(in_chans, embed_dim),
            stages=stages,
            feature_info=feature_info,
            norm=LayerNorm2d(num_features, eps=1e-5),
            head=ClassifierHead(num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate),
            num_classes=num_classes,
            in_chans=in_chans,
            num_features=num_features,
        )


def _se_weight(tensor: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The official SE's Linear weights (r, C) as the 1x1 convs (r, C, 1, 1) they equal."""
    return tensor.reshape(target.shape) if tensor.dim() == 2 and tensor.numel() == target.numel() else tensor


_OFFICIAL = r'^(levels|patch_embed)\.'
_MBCONV = {'0': 'conv_dw', '2.fc.0': 'se.fc1', '2.fc.2': 'se.fc2', '3': 'conv_pw'}  # official Sequential -> ours
# timm's ``gcvit_*``: `global_block` -> `context`, `rel_pos.` and `ls{1,2}.gamma` flattened, the last stage's norm
# -> `norm`. The official release (`levels.{i}`, downsample at the end of each level, MBConvs as `conv.{0,2,3}`
# Sequentials with a Linear SE) is renamed onto the same layout; `relative_position_index` buffers are dropped.
KEY_MAP = KeyMap(
    rules=(
        KeyRule(r'^patch_embed\.proj\.', 'stem.conv1.', when=_OFFICIAL),
        KeyRule(r'^patch_embed\.conv_down\.', 'stem.down.', when=_OFFICIAL),
        KeyRule(r'^levels\.(\d+)\.downsample\.', lambda m: f'stages.{int(m[1]) + 1}.downsample.', when=_OFFICIAL),
        KeyRule(r'^levels\.(\d+)\.q_global_gen\.to_q_global\.(\d+)\.conv\.',
                lambda m: f'stages.{m[1]}.context.blocks.conv{int(m[2]) + 1}.', when=_OFFICIAL),
        KeyRule(r'^levels\.', 'stages.', when=_OFFICIAL),
        KeyRule(r'\.(down|downsample)\.conv\.(0|2\.fc\.0|2\.fc\.2|3)\.weight$',
                lambda m: f'.{m[1]}.conv_block.{_MBCONV[m[2]]}.weight', when=_OFFICIAL),
        KeyRule(r'\.context\.blocks\.(conv\d+)\.(0|2\.fc\.0|2\.fc\.2|3)\.weight$',
                lambda m: f'.context.blocks.{m[1]}.{_MBCONV[m[2]]}.weight', when=_OFFICIAL),
        KeyRule(r'^head\.(weight|bias)$', r'head.fc.\1'),
        KeyRule(r'\.global_block\.', '.context.'),
        KeyRule(r'\.attn\.rel_pos\.', '.attn.'),
        KeyRule(r'\.ls(\d)\.gamma$', r'.gamma\1'),
        KeyRule(r'^stages\.\d+\.norm\.', 'norm.'),
    ),
    drop=(r'relative_position_index$',),
    transforms=((r'\.se\.fc\d\.weight$', _se_weight),),
)
checkpoint_filter_fn = make_filter(KEY_MAP)


def _create_gcvit(variant: str, pretrained: bool = False, **kwargs) -> GlobalContextViT:
    return build_backbone(
        GlobalContextViT, variant, pretrained, checkpoint_filter_fn=KEY_MAP,
        num_stages=len(kwargs.get('depths', (3, 4, 19, 5))), **kwargs)


def _cfg(hf_hub_id: str = '', **kwargs) -> Dict[str, Any]:
    # timm's cfgs of the converted NVIDIA weights (their licence: CC BY-NC-SA 4.0)
    return default_cfg(
        hf_hub_id=hf_hub_id, crop_pct=0.875, first_conv='stem.conv1', license='cc-by-nc-sa-4.0',
        paper_ids='arXiv:2206.09959', origin_url='https://github.com/NVlabs/GCVit', **kwargs)


default_cfgs = generate_default_cfgs({
    f'zoo_gcvit_{size}.in1k': _cfg(hf_hub_id=f'timm/gcvit_{size}.in1k')
    for size in ('xxtiny', 'xtiny', 'tiny', 'small', 'base')
})

# narrow and shallow, same structure: a local and a global block in every stage (see zoo.reduced_args)
REDUCED_ARGS = {'zoo_gcvit_*': dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))}


@register_model
def zoo_gcvit_xxtiny(pretrained: bool = False, **kwargs) -> GlobalContextViT:
    """GC ViT-XXT: dim 64, depths (2, 2, 6, 2), heads (2, 4, 8, 16), MLP ratio 3; 12.0M params (timm's gcvit_xxtiny)."""
    model_args = dict(depths=(2, 2, 6, 2), num_heads=(2, 4, 8, 16))
    return _create_gcvit('zoo_gcvit_xxtiny', pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_gcvit_xtiny(pretrained: bool = False, **kwargs) -> GlobalContextViT:
    """GC ViT-XT: dim 64, depths (3, 4, 6, 5), heads (2, 4, 8, 16), MLP ratio 3; 20.0M params (timm's gcvit_xtiny)."""
    model_args = dict(depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16))
    return _create_gcvit('zoo_gcvit_xtiny', pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_gcvit_tiny(pretrained: bool = False, **kwargs) -> GlobalContextViT:
    """GC ViT-T: dim 64, depths (3, 4, 19, 5), heads (2, 4, 8, 16), MLP ratio 3; 28.2M params (timm's gcvit_tiny)."""
    model_args = dict(depths=(3, 4, 19, 5), num_heads=(2, 4, 8, 16))
    return _create_gcvit('zoo_gcvit_tiny', pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_gcvit_small(pretrained: bool = False, **kwargs) -> GlobalContextViT:
    """GC ViT-S: dim 96, depths (3, 4, 19, 5), heads (3, 6, 12, 24), MLP ratio 2, layer scale 1e-5; 51.1M params."""
    model_args = dict(embed_dim=96, depths=(3, 4, 19, 5), num_heads=(3, 6, 12, 24), mlp_ratio=2, layer_scale=1e-5)
    return _create_gcvit('zoo_gcvit_small', pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_gcvit_base(pretrained: bool = False, **kwargs) -> GlobalContextViT:
    """GC ViT-B: dim 128, depths (3, 4, 19, 5), heads (4, 8, 16, 32), MLP ratio 2, layer scale 1e-5; 90.3M params."""
    model_args = dict(embed_dim=128, depths=(3, 4, 19, 5), num_heads=(4, 8, 16, 32), mlp_ratio=2, layer_scale=1e-5)
    return _create_gcvit('zoo_gcvit_base', pretrained, **dict(model_args, **kwargs))
