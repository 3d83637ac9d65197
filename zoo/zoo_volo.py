"""VOLO (Vision Outlooker) on the one block: outlook attention at stride 8, then global attention at stride 16.

`VOLO: Vision Outlooker for Visual Recognition` (Yuan, Hou, Jiang, Feng, Yan; TPAMI 2022) -
https://arxiv.org/abs/2106.13112. Official code and weights: https://github.com/sail-sg/volo; timm carries them as
`volo_d1_224` ... `volo_d5_512` (`timm.models.volo`), whose state dicts load here unchanged through `KEY_MAP`.

A conv stem (7x7 stride-2 conv, two 3x3 convs, each with BatchNorm + ReLU, then a 4x4 patch conv: stride 8), three
stages of the one `MixerBlock` - outlookers ('outlook' mixer) at stride 8; a 2x2 conv downsample, a learned absolute
position embedding and global attention blocks ('global') at stride 16; more global attention blocks - and a head
of two class-attention layers over a class token and the map, a LayerNorm, the classifier on the class token plus
half the max over tokens of the token-labeling classifier (`aux_head`). Any input size runs: the stem pads to
whole patches, the outlookers pad their windows, the downsample pads odd maps, and the position table is resized
in the graph (bicubic) to the actual map, so one dynamic ONNX export serves every size. timm's VOLO raises at any
size whose stride-16 grid is not its table's (and silently drops the trailing pixels at 223 ... 238 px).

Model names: `zoo_` + timm's name, sizes as tags: `zoo_volo_d1.sail_in1k_224` is timm's `volo_d1_224.sail_in1k`,
`zoo_volo_d1.sail_in1k_384` timm's `volo_d1_384.sail_in1k` (built with img_size=384: a 24 x 24 position table).
"""
from functools import partial
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import init_weights_vit_timm

from zoo.blocks import resolve_heads
from zoo.kernels._sizes import ceil_div
from zoo.weights.keymap import KeyMap, KeyRule, make_filter

from ._hierarchical import HierarchicalBackbone, StageSpec, build_backbone, build_stages, default_cfg, with_tag_args

__all__ = ['Volo', 'volo_stage_specs', 'ClassAttentionHead', 'KEY_MAP', 'checkpoint_filter_fn']

_POOL_TYPES = ('token', 'avg', '')


class VoloStem(nn.Module):
    """7x7 stride-2 conv, two 3x3 convs (each conv without bias, BatchNorm, ReLU), then a 4x4 stride-4 patch conv;
    the conv map is zero-padded to whole patches first. (B, in_chans, H, W) -> (B, dim, ceil(H / 8), ceil(W / 8))."""

    def __init__(self, in_chans: int, dim: int, hidden_dim: int = 64, patch: int = 4):
        super().__init__()
        layers = []
        for i in range(3):
            layers += [
                nn.Conv2d(in_chans if i == 0 else hidden_dim, hidden_dim, 7 if i == 0 else 3, stride=2 if i == 0 else 1,
                          padding=3 if i == 0 else 1, bias=False),
                nn.BatchNorm2d(hidden_dim),
                nn.ReLU(inplace=True),
            ]
        self.conv = nn.Sequential(*layers)
        self.patch = patch
        self.proj = nn.Conv2d(hidden_dim, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        H, W = x.shape[-2:]
        p = self.patch
        return self.proj(F.pad(x, (0, ceil_div(W, p) * p - W, 0, ceil_div(H, p) * p - H)))


class ClassAttentionLayer(nn.Module):
    """One class-attention layer of the head: the class token attends to every token (itself included) and is
    the only token updated. cls += proj(softmax(q(cls) k^T / sqrt(d)) v) on LN(tokens); cls += mlp(LN(cls)).
    (B, 1 + N, C) -> (B, 1 + N, C)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4., qkv_bias: bool = False,
                 attn_drop: float = 0., proj_drop: float = 0.):
        super().__init__()
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads)
        self.scale = self.head_dim ** -0.5
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.Module()  # official parameter names: attn.q, attn.kv, attn.proj
        self.attn.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn.proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        t = self.norm1(x)
        k, v = self.attn.kv(t).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = self.attn.q(t[:, :1]).reshape(B, 1, self.num_heads, self.head_dim).transpose(1, 2) * self.scale
        a = self.attn_drop((q @ k.transpose(-2, -1)).softmax(dim=-1))
        cls = x[:, :1] + self.proj_drop(self.attn.proj((a @ v).transpose(1, 2).reshape(B, 1, C)))
        cls = cls + self.mlp(self.norm2(cls))
        return torch.cat([cls, x[:, 1:]], dim=1)


class ClassAttentionHead(nn.Module):
    """VOLO's head: class token + class-attention layers over the map's tokens, LayerNorm, classifier, plus the
    token-labeling classifier's max over tokens (halved). (B, C, H, W) -> (B, num_classes).

    Pooling: 'token' (the class token, VOLO's), 'avg' (mean of all tokens, class token included, as timm) or ''
    (no pooling: the normalised map (B, C, H, W), classified per position when num_classes > 0).
    `reset(..., reset_other=True)` (pruning) removes the class attention, its norm and the token-labeling classifier.
    """
    no_weight_decay_keys = ('cls_token',)

    def __init__(self, dim: int, num_classes: int, num_heads: int, depth: int = 2, mlp_ratio: float = 4.,
                 pool_type: str = 'token', drop_rate: float = 0., aux_head: bool = True, qkv_bias: bool = False,
                 attn_drop: float = 0.):
        super().__init__()
        self.in_features = dim
        self.use_aux_head = aux_head
        if depth:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            trunc_normal_(self.cls_token, std=.02)
            self.blocks = nn.ModuleList([
                ClassAttentionLayer(dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, attn_drop=attn_drop)
                for _ in range(depth)])
        else:
            self.cls_token, self.blocks = None, None
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(drop_rate)
        self.pool_type = self._check_pool(pool_type)
        self.fc: nn.Module = nn.Identity()
        self.aux_head: Optional[nn.Module] = None
        self._make_classifiers(num_classes)

    def _check_pool(self, pool_type: str) -> str:
        if pool_type not in _POOL_TYPES:
            raise ValueError(f'global_pool: expected one of {_POOL_TYPES}, got {pool_type!r}')
        if pool_type == 'token' and self.cls_token is None:
            raise ValueError("global_pool: 'token' needs the class token, which this head has not (pruned, or "
                             "no class-attention layers); use 'avg' or ''")
        return pool_type

    def _make_classifiers(self, num_classes: int) -> None:
        self.fc = nn.Linear(self.in_features, num_classes) if num_classes > 0 else nn.Identity()
        self.aux_head = nn.Linear(self.in_features, num_classes) if self.use_aux_head and num_classes > 0 else None

    def reset(self, num_classes: int, pool_type: Optional[str] = None, reset_other: bool = False,
              in_features: Optional[int] = None) -> None:
        if reset_other:
            self.cls_token, self.blocks, self.use_aux_head = None, None, False
            self.norm = nn.Identity()
            self.in_features = in_features or self.in_features
        if pool_type is not None:
            self.pool_type = self._check_pool(pool_type)
        elif self.pool_type == 'token' and self.cls_token is None:
            self.pool_type = 'avg'
        self._make_classifiers(num_classes)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        n_cls = 0
        if self.cls_token is not None and self.blocks is not None:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
            for layer in self.blocks:
                x = layer(x)
            n_cls = 1
        x = self.drop(self.norm(x))
        tokens = x[:, n_cls:]
        if self.pool_type == '':
            out = tokens
            if not pre_logits:
                out = self.fc(out)
            return out.transpose(1, 2).reshape(B, -1, H, W)
        out = x[:, 0] if self.pool_type == 'token' else x.mean(dim=1)
        if pre_logits:
            return out
        out = self.fc(out)
        if self.aux_head is not None:
            out = out + 0.5 * self.aux_head(tokens).max(dim=1)[0]
        return out


def volo_stage_specs(
        layers: Sequence[int],
        embed_dims: Sequence[int],
        num_heads: Sequence[int],
        mlp_ratio: float = 3.,
        pos_grid: Tuple[int, int] = (14, 14),
        kernel_size: int = 3,
        stride: int = 2,
) -> Tuple[StageSpec, ...]:
    """VOLO's four official block groups (layers) as three stages: the outlookers (stride 8, no drop path, as
    official); the 2x2 conv downsample, the position embedding and the first transformer group (stride 16); the
    other transformer groups (the official groups 3 and 4 share width and heads in every release)."""
    if not len(layers) == len(embed_dims) == len(num_heads) == 4:
        raise ValueError(f'layers, embed_dims, num_heads: expected 4 entries each (outlookers and three transformer '
                         f'groups), got {tuple(layers)}, {tuple(embed_dims)}, {tuple(num_heads)}')
    if len(set(embed_dims[1:])) != 1 or len(set(num_heads[1:])) != 1:
        raise ValueError(f'embed_dims, num_heads: the transformer groups 2-4 run at one width with one head count, '
                         f'got embed_dims={tuple(embed_dims)}, num_heads={tuple(num_heads)}')
    transformer = dict(mixer='global', num_heads=num_heads[1], mlp_ratio=mlp_ratio)
    return (
        StageSpec(depth=layers[0], dim=embed_dims[0], mixer='outlook', num_heads=num_heads[0], mlp_ratio=mlp_ratio,
                  mixer_kwargs=dict(kernel_size=kernel_size, stride=stride), block_kwargs=dict(drop_path=0.)),
        StageSpec(depth=layers[1], dim=embed_dims[1], downsample='conv2x2', abs_pos_embed=tuple(pos_grid),
                  **transformer),
        StageSpec(depth=layers[2] + layers[3], dim=embed_dims[2], **transformer),
    )


class Volo(HierarchicalBackbone):
    """VOLO. (B, in_chans, H, W) -> (B, num_classes), any H, W >= 16; features at strides 8, 16, 16.

    Args:
        layers: blocks of the outlooker group and the three transformer groups (official `layers`).
        embed_dims: width of each group.
        num_heads: attention heads of each group.
        img_size: the size the position table is sized for ((img_size / 16)^2 entries; any input size runs).
        in_chans: image channels.
        num_classes: classifier outputs (0 for none).
        global_pool: 'token' (class token), 'avg' or ''.
        stem_hidden_dim: width of the conv stem.
        mlp_ratio: MLP hidden width / dim (blocks and class attention).
        qkv_bias: bias in the value / qkv / q / kv projections (official: none).
        post_layers: class-attention layers of the head.
        use_aux_head: the token-labeling classifier (its max over tokens, halved, is added to the logits).
        drop_rate: dropout before the classifiers.
        proj_drop_rate: dropout after attention projections and in MLPs.
        attn_drop_rate: attention-weight dropout.
        drop_path_rate: stochastic depth of the transformer blocks, rising linearly over all blocks (as official).
    """
    min_input_size = 16  # one token at stride 16

    def __init__(
            self,
            layers: Sequence[int] = (4, 4, 8, 2),
            embed_dims: Sequence[int] = (192, 384, 384, 384),
            num_heads: Sequence[int] = (6, 12, 12, 12),
            img_size: Union[int, Sequence[int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            stem_hidden_dim: int = 64,
            mlp_ratio: float = 3.,
            qkv_bias: bool = False,
            post_layers: int = 2,
            use_aux_head: bool = True,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ):
        super().__init__()
        img_h, img_w = to_2tuple(img_size)
        if img_h < self.min_input_size or img_w < self.min_input_size:
            raise ValueError(f'img_size: expected H and W >= {self.min_input_size}, got {img_size!r}')
        specs = volo_stage_specs(layers, embed_dims, num_heads, mlp_ratio, (img_h // 16, img_w // 16))
        stages, feature_info = build_stages(
            specs, embed_dims[0], 8, drop_path_rate, qkv_bias=qkv_bias, attn_drop=attn_drop_rate,
            proj_drop=proj_drop_rate)
        dim = embed_dims[-1]
        self.init_backbone(
            stem=VoloStem(in_chans, embed_dims[0], stem_hidden_dim),
            stages=stages,
            feature_info=feature_info,
            norm=None,  # VOLO's final norm follows the class attention: it is the head's
            head=ClassAttentionHead(
                dim, num_classes, num_heads[-1], post_layers, mlp_ratio, global_pool, drop_rate, use_aux_head,
                qkv_bias=qkv_bias, attn_drop=attn_drop_rate),
            num_classes=num_classes,
            in_chans=in_chans,
            num_features=dim,
        )
        self.apply(partial(init_weights_vit_timm, needs_reset=False))  # trunc-normal(.02) Linear, zero bias


# timm (= official, weights under `state_dict`): `patch_embed.{conv.N, proj}`, `network.0.M` (outlookers),
# `network.1.proj` (downsample), `pos_embed`, `network.{2,3,4}.M` (transformer groups), `cls_token`,
# `post_network.N` (class attention), `norm`, `head`, `aux_head`. Our stage 2 holds groups 3 and 4: group 4's
# blocks continue group 3's numbering, so each group-3 block found in the file shifts them by one (the conditional
# rules count them; 64 covers every release). Our own layout passes through unchanged.
_MAX_GROUP = 64
KEY_MAP = KeyMap(rules=(
    KeyRule(r'^patch_embed\.conv\.', 'stem.conv.'),
    KeyRule(r'^patch_embed\.proj\.', 'stem.proj.'),
    KeyRule(r'^network\.0\.', 'stages.0.blocks.'),
    KeyRule(r'^network\.1\.proj\.', 'stages.1.downsample.conv.'),
    KeyRule(r'^pos_embed$', 'stages.1.pos_embed.table'),
    KeyRule(r'^network\.2\.', 'stages.1.blocks.'),
    *(KeyRule(r'^network\.4\.(\d+)\.', lambda m: f'network.4.{int(m.group(1)) + 1}.', when=rf'^network\.3\.{i}\.')
      for i in range(_MAX_GROUP)),
    KeyRule(r'^network\.[34]\.', 'stages.2.blocks.'),
    KeyRule(r'^cls_token$', 'head.cls_token'),
    KeyRule(r'^post_network\.', 'head.blocks.'),
    KeyRule(r'^norm\.', 'head.norm.'),
    KeyRule(r'^head\.(weight|bias)$', r'head.fc.\1'),
    KeyRule(r'^aux_head\.', 'head.aux_head.'),
))
checkpoint_filter_fn = make_filter(KEY_MAP)

# pretrained tag -> the build arguments its release needs: the position table of its size
_TAG_ARGS = {f'sail_in1k_{s}': dict(img_size=s) for s in (384, 448, 512)}


def _create_volo(variant: str, pretrained: bool = False, **kwargs) -> Volo:
    kwargs = with_tag_args(kwargs, _TAG_ARGS)
    return build_backbone(Volo, variant, pretrained, checkpoint_filter_fn=KEY_MAP, num_stages=3, **kwargs)


def _cfg(size: int, crop_pct: float, url: str = '', **kwargs) -> Dict[str, Any]:
    return default_cfg(
        url=url, input_size=(3, size, size), pool_size=(size // 16, size // 16), crop_pct=crop_pct,
        first_conv='stem.conv.0', classifier=('head.fc', 'head.aux_head'), license='apache-2.0',
        paper_ids='arXiv:2106.13112', origin_url='https://github.com/sail-sg/volo', **kwargs)


_RELEASE = 'https://github.com/sail-sg/volo/releases/download/volo_1'


def _release(variant: str, size: int, crop_pct: float, file: str) -> Tuple[str, Dict[str, Any]]:
    """('zoo_volo_dN.sail_in1k_<size>', cfg) for timm's 'volo_dN_<size>.sail_in1k'."""
    return f'zoo_volo_{variant}.sail_in1k_{size}', _cfg(
        size, crop_pct, url=f'{_RELEASE}/{file}', hf_hub_id=f'timm/volo_{variant}_{size}.sail_in1k')


default_cfgs = generate_default_cfgs(dict([
    _release('d1', 224, 0.96, 'd1_224_84.2.pth.tar'),
    _release('d1', 384, 1.0, 'd1_384_85.2.pth.tar'),
    _release('d2', 224, 0.96, 'd2_224_85.2.pth.tar'),
    _release('d2', 384, 1.0, 'd2_384_86.0.pth.tar'),
    _release('d3', 224, 0.96, 'd3_224_85.4.pth.tar'),
    _release('d3', 448, 1.0, 'd3_448_86.3.pth.tar'),
    _release('d4', 224, 0.96, 'd4_224_85.7.pth.tar'),
    _release('d4', 448, 1.15, 'd4_448_86.79.pth.tar'),
    _release('d5', 224, 0.96, 'd5_224_86.10.pth.tar'),
    _release('d5', 448, 1.15, 'd5_448_87.0.pth.tar'),
    _release('d5', 512, 1.15, 'd5_512_87.07.pth.tar'),
]))

# narrow and shallow, same structure: outlookers, downsample + position table, both transformer stages, class
# attention and the token-labeling head (see zoo.reduced_args)
REDUCED_ARGS = {
    'zoo_volo_*': dict(layers=(2, 1, 1, 1), embed_dims=(16, 32, 32, 32), num_heads=(2, 4, 4, 4), stem_hidden_dim=8),
}


@register_model
def zoo_volo_d1(pretrained: bool = False, **kwargs) -> Volo:
    """VOLO-D1 (timm `volo_d1_224` / `volo_d1_384`): layers (4, 4, 8, 2), dims (192, 384, 384, 384), heads
    (6, 12, 12, 12); 26.6M params at 224."""
    model_args = dict(layers=(4, 4, 8, 2), embed_dims=(192, 384, 384, 384), num_heads=(6, 12, 12, 12))
    return _create_volo('zoo_volo_d1', pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_volo_d2(pretrained: bool = False, **kwargs) -> Volo:
    """VOLO-D2 (timm `volo_d2_224` / `volo_d2_384`): layers (6, 4, 10, 4), dims (256, 512, 512, 512), heads
    (8, 16, 16, 16); 58.7M params at 224."""
    model_args = dict(layers=(6, 4, 10, 4), embed_dims=(256, 512, 512, 512), num_heads=(8, 16, 16, 16))
    return _create_volo('zoo_volo_d2', pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_volo_d3(pretrained: bool = False, **kwargs) -> Volo:
    """VOLO-D3 (timm `volo_d3_224` / `volo_d3_448`): layers (8, 8, 16, 4), dims (256, 512, 512, 512), heads
    (8, 16, 16, 16); 86.3M params at 224."""
    model_args = dict(layers=(8, 8, 16, 4), embed_dims=(256, 512, 512, 512), num_heads=(8, 16, 16, 16))
    return _create_volo('zoo_volo_d3', pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_volo_d4(pretrained: bool = False, **kwargs) -> Volo:
    """VOLO-D4 (timm `volo_d4_224` / `volo_d4_448`): layers (8, 8, 16, 4), dims (384, 768, 768, 768), heads
    (12, 16, 16, 16); 193.0M params at 224."""
    model_args = dict(layers=(8, 8, 16, 4), embed_dims=(384, 768, 768, 768), num_heads=(12, 16, 16, 16))
    return _create_volo('zoo_volo_d4', pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_volo_d5(pretrained: bool = False, **kwargs) -> Volo:
    """VOLO-D5 (timm `volo_d5_224` / `volo_d5_448` / `volo_d5_512`): layers (12, 12, 20, 4), dims
    (384, 768, 768, 768), heads (12, 16, 16, 16), MLP ratio 4, stem width 128; 295.5M params at 224."""
    model_args = dict(layers=(12, 12, 20, 4), embed_dims=(384, 768, 768, 768), num_heads=(12, 16, 16, 16),
                      mlp_ratio=4., stem_hidden_dim=128)
    return _create_volo('zoo_volo_d5', pretrained, **dict(model_args, **kwargs))
