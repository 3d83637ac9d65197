"""Bi-level routing attention (BiFormer): the region-routed attention mixer.

`BiFormer: Vision Transformer with Bi-Level Routing Attention` (Zhu et al., CVPR 2023) -
https://arxiv.org/abs/2303.08810. Official code and weights: https://github.com/rayleizhu/BiFormer

The map is split into n_win x n_win regions; each query region attends to the tokens of the top-k regions
whose mean key best matches its mean query (`zoo.kernels.routing`), plus a local context term (LePE: a
depthwise conv on V). Top-k -1 / -2 is plain global attention (BiFormer's last stage, official
`Attention` / `AttentionLePE`: head-dim scale, and with -2 the LePE conv runs on the mixer's input).
Parameter names: `qkv` (one linear, outputs [q | k | v]), `lepe`, `proj` (official `qkv.qkv`, `lepe`, `wo`
in routed stages; `qkv`, `lepe`, `proj` in the global stage). Everything channels-last: (B, H, W, C).
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from zoo.kernels.backend import is_exporting
from zoo.kernels.routing import GLOBAL_TOPK, check_routing_args, routed_attention

from ._registry import check_input, register_mixer, resolve_heads

# FX leaves, one graph node each: they read sizes and build per-size tables when called (any tracer; timm's registry
# lists them too, see __init__)
torch.fx.wrap('routed_attention')

__all__ = ['BiLevelRoutingAttention']


@register_mixer('routing', paper='BiFormer (Zhu et al., CVPR 2023)',
                cost='O(N^2 k / S^2), S x S regions, top-k', triton=True, torchscript=True)
class BiLevelRoutingAttention(nn.Module):
    """Bi-level routing attention with LePE. (B, H, W, dim) -> (B, H, W, dim) for any H, W.

    A map whose sides are not multiples of n_win is zero-padded at the bottom / right before the qkv
    projection and cropped after it, exactly as the official `auto_pad=True` (its detection and segmentation
    setting): padded tokens project to the qkv bias and take part in the region means and as keys, and the
    LePE conv sees their values. At sizes that are multiples of n_win nothing is padded.

    Args:
        dim: input and output channels.
        num_heads: attention heads (see `resolve_heads`); V and the output have num_heads * head_dim channels.
        head_dim: channels per head of V (see `resolve_heads`).
        n_win: regions per side S (fixed count: region size follows the map size).
        topk: routed key regions per query region (1..S^2), or -1 / -2 for global attention without / with
            LePE on the input.
        qk_dim: channels of q and k (official `qk_dim`), a multiple of num_heads; default num_heads * head_dim.
        qk_scale: logit scale; default the official one: qk_dim ** -0.5 (the full width, not per head) when
            routing, head_dim ** -0.5 for global attention.
        side_dwconv: LePE depthwise kernel size (0: no LePE).
        qkv_bias: bias in the qkv projection.
        attn_drop: attention-weight dropout. The routed op has none, so a non-zero value is accepted (for config
            compatibility) but raises when the module runs in training mode.
        proj_drop: dropout after the output projection.
    """
    no_weight_decay_keys = ()

    def __init__(
            self,
            dim: int,
            num_heads: Optional[int] = None,
            head_dim: Optional[int] = None,
            n_win: int = 7,
            topk: int = 4,
            qk_dim: Optional[int] = None,
            qk_scale: Optional[float] = None,
            side_dwconv: int = 5,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
    ):
        super().__init__()
        check_routing_args(n_win, topk)
        if not isinstance(side_dwconv, int) or side_dwconv < 0 or (side_dwconv and side_dwconv % 2 == 0):
            raise ValueError(f'side_dwconv: expected 0 or an odd positive kernel size, got {side_dwconv!r}')
        if not 0. <= attn_drop < 1.:
            raise ValueError(f'attn_drop: expected a rate in [0, 1), got {attn_drop}')
        self.dim = dim
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        attn_dim = self.num_heads * self.head_dim
        self.qk_dim = attn_dim if qk_dim is None else qk_dim
        if not isinstance(self.qk_dim, int) or self.qk_dim < 1 or self.qk_dim % self.num_heads:
            raise ValueError(f'qk_dim: expected a positive multiple of num_heads={self.num_heads}, got {qk_dim!r}')
        self.is_global = topk in GLOBAL_TOPK
        if self.is_global and self.qk_dim != attn_dim:
            raise ValueError(f'qk_dim: global attention (topk={topk}) uses q, k, v of one width, expected '
                             f'{attn_dim} (num_heads * head_dim), got {self.qk_dim}')
        self.n_win = n_win
        self.topk = topk
        self.scale = qk_scale or (self.head_dim ** -0.5 if self.is_global else self.qk_dim ** -0.5)
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 2 * self.qk_dim + attn_dim, bias=qkv_bias)
        # LePE on V when routing; on the (normed) input for the global -2 stage, as in the official models
        lepe_in = dim if topk == -2 else attn_dim
        if side_dwconv and topk != -1:
            self.lepe = nn.Conv2d(lepe_in, attn_dim, side_dwconv, padding=side_dwconv // 2,
                                  groups=math.gcd(lepe_in, attn_dim))
        else:
            self.register_module('lepe', None)
        self.proj = nn.Linear(attn_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.qkv.weight, std=.02)
        trunc_normal_(self.proj.weight, std=.02)
        for lin in (self.qkv, self.proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def _lepe(self, t: torch.Tensor) -> torch.Tensor:
        return self.lepe(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.dim, 'BiLevelRoutingAttention')
        if self.training and self.attn_drop > 0.:
            raise ValueError(f'attn_drop: the routed attention op has no attention dropout; '
                             f'training needs attn_drop=0, got {self.attn_drop}')
        B, H, W, _ = x.shape
        nh, qk = self.num_heads, self.qk_dim
        if self.is_global:
            q, k, v = self.qkv(x).view(B, H, W, 3, nh, self.head_dim).unbind(3)
            out = routed_attention(q, k, v, self.n_win, self.topk, scale=self.scale).reshape(B, H, W, -1)
            if self.lepe is not None:
                out = out + self._lepe(x)
            return self.proj_drop(self.proj(out))
        pad_h, pad_w = -H % self.n_win, -W % self.n_win
        padded = is_exporting() or pad_h != 0 or pad_w != 0  # exports always pad / crop: one graph for any H, W
        if padded:
            x = F.pad(x, [0, 0, 0, pad_w, 0, pad_h])
        Hp, Wp = H + pad_h, W + pad_w
        qkv = self.qkv(x)
        q = qkv[..., :qk].view(B, Hp, Wp, nh, qk // nh)
        k = qkv[..., qk:2 * qk].view(B, Hp, Wp, nh, qk // nh)
        v = qkv[..., 2 * qk:]
        out = routed_attention(q, k, v.view(B, Hp, Wp, nh, self.head_dim), self.n_win, self.topk,
                               scale=self.scale).reshape(B, Hp, Wp, -1)
        if self.lepe is not None:
            out = out + self._lepe(v)
        if padded:
            out = out[:, :H, :W]
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, qk_dim={self.qk_dim}, n_win={self.n_win}, '
                f'topk={self.topk}, scale={self.scale:.4g}')
