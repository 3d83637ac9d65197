"""Swin Transformer on the zoo's window attention op.

`Swin Transformer: Hierarchical Vision Transformer using Shifted Windows` - https://arxiv.org/abs/2103.14030
Official code and weights: https://github.com/microsoft/Swin-Transformer

A stem, a list of window-attention stage specs and a key map. Any input size works: the image is padded
to a multiple of the patch size, patch merging pads odd maps, and window attention pads and masks. The
window and shift of each stage follow Swin's rule for the feature size of `img_size` (fixed at construction,
as timm does), so one ONNX export runs at every size. `KEY_MAP` loads both timm's Swin checkpoints and the
official release files.
"""
from functools import partial
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ClassifierHead, LayerNorm2d, to_2tuple
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import init_weights_vit_timm

from zoo.blocks.window import effective_window_shift
from zoo.kernels._sizes import ceil_div
from zoo.weights.keymap import KeyMap, KeyRule, make_filter

from ._hierarchical import HierarchicalBackbone, StageSpec, build_backbone, build_stages, default_cfg, with_tag_args

__all__ = [
    'SwinTransformer', 'KEY_MAP', 'checkpoint_filter_fn', 'swin_stage_specs', 'block_mixers', 'typed_swin_args']

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
        H, W = x.shape[-2:]
        x = F.pad(x, (0, ceil_div(W, pw) * pw - W, 0, ceil_div(H, ph) * ph - H))  # no modulo: see zoo.kernels._sizes
        return self.norm(self.conv(x))


def swin_stage_specs(
        embed_dim: int,
        depths: Sequence[int],
        num_heads: Sequence[int],
        window_size: Union[int, Tuple[int, int]] = 7,
        img_size: Union[int, Sequence[int]] = 224,
        patch_size: int = 4,
        mixer: Union[str, Sequence[Union[str, Sequence[str]]]] = 'window',
        mixer_kwargs: Optional[Sequence[Mapping[str, Mapping[str, Any]]]] = None,
        **spec_kwargs,
) -> Tuple[StageSpec, ...]:
    """Swin's stages: widths doubling from `embed_dim`, patch merging between stages, window attention
    shifted by half a window in every other block. Window and shift per stage follow Swin's rule for the
    feature size of `img_size`. `mixer` is a name for all blocks, or per stage a name or one name per block
    (blocks that are not 'window' get no window arguments). `mixer_kwargs`: per stage, family arguments per mixer
    name (e.g. Agent-Swin's agent counts), given to every block of that mixer in the stage."""
    img_h, img_w = to_2tuple(img_size)
    if mixer_kwargs is not None and len(mixer_kwargs) != len(depths):
        raise ValueError(f'mixer_kwargs: expected one mapping per stage ({len(depths)}), got {len(mixer_kwargs)}')
    window = to_2tuple(window_size)
    specs = []
    for i, (depth, heads) in enumerate(zip(depths, num_heads)):
        size = (-(-img_h // (patch_size * 2 ** i)), -(-img_w // (patch_size * 2 ** i)))
        win, shift = effective_window_shift(size, window, tuple(w // 2 for w in window))
        names = mixer if isinstance(mixer, str) else mixer[i]
        names = [names] * depth if isinstance(names, str) else list(names)
        family = mixer_kwargs[i] if mixer_kwargs is not None else {}
        kwargs = [dict(family.get(n, {}), **(dict(window_size=win, shift_size=shift if j % 2 else 0)
                                             if n == 'window' else {}))
                  for j, n in enumerate(names)]
        specs.append(StageSpec(
            depth=depth, dim=int(embed_dim * 2 ** i), mixer=names, mixer_kwargs=kwargs, num_heads=heads,
            downsample='patch_merging' if i else None, **spec_kwargs))
    return tuple(specs)


def block_mixers(attn_type: str, depths: Sequence[int], letters: Mapping[str, str]) -> List[List[str]]:
    """An official block-type string of the Swin-based families -> per stage, one mixer name per block.

    `letters` maps each stage letter to a mixer name, 'window' (Swin's) among them, e.g. {'A': 'agent', 'B':
    'window'}. A stage is one letter, or 'M' (mixed): its first n blocks the other mixer, the rest window, with n
    the number after the stage letters: Agent-Swin 'AAAB' / 'AAMB2', FLatten-Swin 'LLSS', InLine-Swin 'IIMS2'.
    """
    num_stages = len(depths)
    head, tail = attn_type[:num_stages], attn_type[num_stages:]
    other = [c for c, name in letters.items() if name != 'window']
    window = [c for c, name in letters.items() if name == 'window']
    if len(other) != 1 or len(window) != 1:
        raise ValueError(f'letters: expected one window letter and one other, got {dict(letters)}')
    if len(head) != num_stages or any(c not in letters and c != 'M' for c in head) or ('M' in head) != bool(tail) \
            or (tail and not tail.isdigit()):
        choices = ', '.join(f'{c!r} ({name})' for c, name in letters.items())
        raise ValueError(f"attn_type: expected one of {choices}, 'M' (mixed) per stage ({num_stages}), then the "
                         f"number of leading {letters[other[0]]} blocks of the 'M' stages, e.g. "
                         f"'{other[0] * 2}M{window[0]}2'; got {attn_type!r}")
    out = []
    for c, depth in zip(head, depths):
        n = min(int(tail), depth) if c == 'M' else depth if c == other[0] else 0
        out.append([letters[other[0]]] * n + ['window'] * (depth - n))
    return out


def typed_swin_args(variant: str, kwargs: Dict[str, Any], tag_args: Mapping[str, Mapping[str, Any]],
                    layout_args: str) -> Dict[str, Any]:
    """`kwargs` of a Swin-based family whose mixers follow an official block-type string: the pretrained tag's
    build arguments filled in (e.g. '.in1k_384' -> img_size 384, window 12: the model that release fits), and
    mixer / mixer_kwargs refused (`layout_args` names what sets them instead)."""
    kwargs = with_tag_args(kwargs, tag_args)
    if 'mixer' in kwargs or 'mixer_kwargs' in kwargs:
        raise ValueError(f'{variant}: the mixers follow {layout_args}; pass that instead of mixer / mixer_kwargs '
                         f'(or build zoo.zoo_swin.SwinTransformer with them)')
    return kwargs


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
        window_size: attention window size M (shift M // 2 in every other block), clamped per stage to the
            feature size of `img_size`.
        mlp_ratio: MLP hidden width / dim.
        qkv_bias: bias in the qkv projections.
        init_values: layer-scale init (None: no layer scale, as in the paper).
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after attention projections and in MLPs.
        attn_drop_rate: attention dropout (must be 0: the window op has none).
        drop_path_rate: stochastic depth rate, rising stage-wise to this value.
        img_size: the size the windows are chosen for (any input size runs).
        mixer: per-block mixers (see `swin_stage_specs`); 'window' everywhere is Swin.
        mixer_kwargs: per stage, family arguments per mixer name (see `swin_stage_specs`).
    """

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
            mixer: Union[str, Sequence[Union[str, Sequence[str]]]] = 'window',
            mixer_kwargs: Optional[Sequence[Mapping[str, Mapping[str, Any]]]] = None,
    ):
        super().__init__()
        if len(num_heads) != len(depths):
            raise ValueError(f'num_heads: expected one entry per stage ({len(depths)}), got {tuple(num_heads)}')
        specs = swin_stage_specs(
            embed_dim, depths, num_heads, window_size, img_size or 224, patch_size, mixer=mixer,
            mixer_kwargs=mixer_kwargs, head_dim=head_dim, mlp_ratio=mlp_ratio, layer_scale=init_values)
        dims = [spec.dim for spec in specs]
        stem = PatchEmbed(in_chans, dims[0], patch_size)
        stages, feature_info = build_stages(
            specs, dims[0], patch_size, drop_path_rate, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
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


# timm (`swin_*_patch4_window7_224`): `patch_embed.*`, `layers.N.*` (downsample at the start of stage N),
# `head.fc.*`. Official (microsoft/Swin-Transformer, weights under `model`): downsample at the end of stage N,
# `head.*`, and the `relative_position_index` / `attn_mask` buffers. Our own layout passes through.
_OFFICIAL = r'^layers\.0\.downsample\.'
KEY_MAP = KeyMap(
    rules=(
        KeyRule(r'^layers\.(\d+)\.downsample', lambda m: f'layers.{int(m.group(1)) + 1}.downsample', when=_OFFICIAL),
        KeyRule(r'^head\.(weight|bias)$', r'head.fc.\1', when=_OFFICIAL),
        KeyRule(r'^patch_embed\.proj\.', 'stem.conv.'),
        KeyRule(r'^patch_embed\.norm\.', 'stem.norm.'),
        KeyRule(r'^layers\.', 'stages.'),
    ),
    drop=(r'relative_position_index$', r'attn_mask$'),
    reject=((r'^absolute_pos_embed$', 'absolute position embeddings (ape=True) are not supported by this model'),),
)
checkpoint_filter_fn = make_filter(KEY_MAP)


def _create_swin(variant: str, pretrained: bool = False, **kwargs) -> SwinTransformer:
    return build_backbone(
        SwinTransformer, variant, pretrained, checkpoint_filter_fn=KEY_MAP,
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


# narrow and shallow, same structure (see zoo.reduced_args)
REDUCED_ARGS = {'swin_*': dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))}


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
