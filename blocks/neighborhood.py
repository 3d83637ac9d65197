"""Neighborhood attention (NAT / DiNAT): the 2-D neighborhood attention mixer and the NAT block.

`Neighborhood Attention Transformer` - https://arxiv.org/abs/2204.07143
`Dilated Neighborhood Attention Transformer` - https://arxiv.org/abs/2209.15001
Official code and weights: https://github.com/SHI-Labs/Neighborhood-Attention-Transformer

Each query attends to the kernel x kernel neighbours around it (windows clamped inside the map, dilated
by `dilation`), with a learned relative position bias, exactly as NATTEN computes it. Parameter names
follow the official modules (`qkv`, `rpb`, `proj`, `gamma1`, `gamma2`) so released checkpoints load by
renaming prefixes only. Everything channels-last: (B, H, W, C).
"""
from typing import Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_

from kernels.neighborhood import neighborhood_attention

from ._registry import register_mixer

__all__ = ['NeighborhoodAttention2D', 'NATBlock']


@register_mixer('neighborhood')
class NeighborhoodAttention2D(nn.Module):
    """2-D (dilated) neighborhood multi-head self-attention with relative position bias.

    (B, H, W, dim) -> (B, H, W, dim) for any H, W. As in the NATTEN module the official checkpoints
    were trained with, a map smaller than kernel_size * dilation on an axis is zero-padded at the
    bottom / right up to that size before the qkv projection (the padded tokens take part as keys),
    and the output is cropped back.

    Args:
        dim: input and output channels.
        num_heads: attention heads (dim must divide evenly).
        kernel_size: neighborhood size k (odd, >= 1); each query sees k * k keys.
        dilation: spacing between neighbours (DiNAT); 1 is plain NAT.
        rel_pos_bias: learn a (heads, 2k - 1, 2k - 1) relative position bias `rpb`.
        qkv_bias: bias in the qkv projection.
        qk_scale: logit scale, head_dim ** -0.5 if None.
        attn_drop: attention-weight dropout. The neighborhood op has none, so a non-zero value is
            accepted (for config compatibility) but raises when the module runs in training mode.
        proj_drop: dropout after the output projection.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            kernel_size: int = 7,
            dilation: int = 1,
            rel_pos_bias: bool = True,
            qkv_bias: bool = True,
            qk_scale: Optional[float] = None,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
    ):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f'num_heads: expected a positive divisor of dim={dim}, got {num_heads}')
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f'kernel_size: expected an odd positive int, got {kernel_size!r}')
        if not isinstance(dilation, int) or dilation < 1:
            raise ValueError(f'dilation: expected an int >= 1, got {dilation!r}')
        if not 0. <= attn_drop < 1.:
            raise ValueError(f'attn_drop: expected a rate in [0, 1), got {attn_drop}')
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.scale = qk_scale or self.head_dim ** -0.5
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
            trunc_normal_(self.rpb, std=.02, a=-2., b=2.)
        else:
            self.register_parameter('rpb', None)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f'x: expected (B, H, W, {self.dim}), got {tuple(x.shape)}')
        if self.training and self.attn_drop > 0.:
            raise ValueError(f'attn_drop: the neighborhood attention op has no attention dropout; '
                             f'training needs attn_drop=0, got {self.attn_drop}')
        B, H, W, C = x.shape
        window = self.kernel_size * self.dilation
        pad_h, pad_w = max(window - H, 0), max(window - W, 0)
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        q, k, v = self.qkv(x).view(B, Hp, Wp, 3, self.num_heads, self.head_dim).unbind(3)
        x = neighborhood_attention(
            q, k, v, self.kernel_size, self.dilation, rel_pos_bias=self.rpb, scale=self.scale)
        x = x.reshape(B, Hp, Wp, C)
        if pad_h or pad_w:
            x = x[:, :H, :W]
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, '
                f'dilation={self.dilation}, rel_pos_bias={self.rpb is not None}')


class NATBlock(nn.Module):
    """NAT / DiNAT block: x + attn(norm1(x)), then x + mlp(norm2(x)). (B, H, W, dim) -> (B, H, W, dim).

    Args:
        dim: channels.
        num_heads: attention heads.
        kernel_size: neighborhood size.
        dilation: neighborhood dilation.
        mlp_ratio: MLP hidden width / dim.
        qkv_bias: bias in the qkv projection.
        qk_scale: logit scale override.
        proj_drop: dropout after the attention projection and in the MLP.
        attn_drop: attention dropout (must be 0 to train, see `NeighborhoodAttention2D`).
        drop_path: stochastic depth rate.
        layer_scale: layer-scale init; None for none. The scales are `gamma1` / `gamma2` as officially.
        act_layer: MLP activation.
        norm_layer: norm over channels.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            kernel_size: int = 7,
            dilation: int = 1,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            qk_scale: Optional[float] = None,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            layer_scale: Optional[float] = None,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = NeighborhoodAttention2D(
            dim,
            num_heads=num_heads,
            kernel_size=kernel_size,
            dilation=dilation,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        if layer_scale is not None:
            self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale)))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale)))
        else:
            self.gamma1 = self.gamma2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.attn(self.norm1(x))
        x = x + self.drop_path(y if self.gamma1 is None else self.gamma1 * y)
        y = self.mlp(self.norm2(x))
        x = x + self.drop_path(y if self.gamma2 is None else self.gamma2 * y)
        return x
