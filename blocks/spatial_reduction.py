"""Spatial-reduction attention: every token queries keys and values of a map shrunk by a strided conv.

`Pyramid Vision Transformer` (Wang et al., ICCV 2021) - https://arxiv.org/abs/2102.12122; used by Twins
(`Twins: Revisiting the Design of Spatial Attention in Vision Transformers`, Chu et al., NeurIPS 2021 -
https://github.com/Meituan-AutoML/Twins) in every PCPVT block and as SVT's global sub-sampled attention.
Parameter names (`q`, `kv`, `sr`, `norm`, `proj`) are those of the official Twins / timm checkpoints.
Everything channels-last: (B, H, W, C); any H x W with H, W >= sr_ratio.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.kernels._sizes import ceil_div

from ._registry import check_input, register_mixer, resolve_heads
from .attention import softmax_attention

__all__ = ['SpatialReductionAttention']


@register_mixer('spatial_reduction', paper='PVT (Wang et al., ICCV 2021); Twins (Chu et al., NeurIPS 2021)',
                cost='O(N^2 / r^2), reduction r', triton=False, torchscript=True)
class SpatialReductionAttention(nn.Module):
    """Multi-head attention of all tokens over a sr_ratio-times smaller key / value map.

    (B, H, W, dim) -> (B, H, W, dim) for any H, W >= sr_ratio.

    q = q(x); with sr_ratio r > 1 the map is zero-padded at the bottom / right to a multiple of r (every pixel
    counts; at sizes that divide, this is Twins / timm exactly), reduced by an r x r stride-r conv and a
    LayerNorm, then k, v = kv(reduced); r = 1 is plain global attention with separate q and kv projections.

    Args:
        dim: input and output channels.
        num_heads: attention heads (see `resolve_heads`).
        head_dim: channels per head (see `resolve_heads`).
        sr_ratio: spatial reduction r of the keys and values (kernel and stride of the `sr` conv).
        norm_eps: epsilon of the LayerNorm after the reduction (Twins: 1e-5).
        qkv_bias: bias in the q and kv projections.
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the output projection.
    """
    no_weight_decay_keys = ()

    def __init__(
            self,
            dim: int,
            num_heads: Optional[int] = None,
            head_dim: Optional[int] = None,
            sr_ratio: int = 1,
            norm_eps: float = 1e-5,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
    ):
        super().__init__()
        if not isinstance(sr_ratio, int) or isinstance(sr_ratio, bool) or sr_ratio < 1:
            raise ValueError(f'sr_ratio: expected a positive int, got {sr_ratio!r}')
        if not 0. <= attn_drop < 1.:
            raise ValueError(f'attn_drop: expected a rate in [0, 1), got {attn_drop}')
        self.dim = dim
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        self.attn_dim = self.num_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.sr_ratio = sr_ratio
        self.attn_drop = float(attn_drop)
        self.q = nn.Linear(dim, self.attn_dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * self.attn_dim, bias=qkv_bias)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=norm_eps)
        else:
            self.sr = None
            self.norm = None
        self.proj = nn.Linear(self.attn_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _check_size(self, x: torch.Tensor) -> None:
        if not torch.jit.is_scripting():
            if torch.jit.is_tracing() or isinstance(x, torch.fx.Proxy):
                return
        if x.shape[1] < self.sr_ratio or x.shape[2] < self.sr_ratio:
            raise ValueError(f'SpatialReductionAttention: sr_ratio={self.sr_ratio} is larger than the map: expected '
                             f'H and W >= {self.sr_ratio}, got ({x.shape[1]}, {x.shape[2]})')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.dim, 'SpatialReductionAttention')
        self._check_size(x)
        B, H, W, _ = x.shape
        q = self.q(x).reshape(B, H * W, self.num_heads, self.head_dim).transpose(1, 2)
        kv_in = x
        if self.sr is not None and self.norm is not None:
            r = self.sr_ratio
            kv_in = F.pad(x, (0, 0, 0, ceil_div(W, r) * r - W, 0, ceil_div(H, r) * r - H))
            kv_in = self.norm(self.sr(kv_in.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        kv = self.kv(kv_in).reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        out = softmax_attention(q, k, v, self.scale, self.attn_drop, self.training)
        out = out.transpose(1, 2).reshape(B, H, W, self.attn_dim)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f'dim={self.dim}, num_heads={self.num_heads}, sr_ratio={self.sr_ratio}'
