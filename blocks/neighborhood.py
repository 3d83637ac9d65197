"""Neighborhood attention (NAT / DiNAT): the 2-D neighborhood attention mixer.

`Neighborhood Attention Transformer` - https://arxiv.org/abs/2204.07143
`Dilated Neighborhood Attention Transformer` - https://arxiv.org/abs/2209.15001
Official code and weights: https://github.com/SHI-Labs/Neighborhood-Attention-Transformer

Each query attends to the kernel x kernel neighbours around it (windows clamped inside the map, dilated
by `dilation`), with a learned relative position bias, exactly as NATTEN computes it. Parameter names
follow the official modules (`qkv`, `rpb`, `proj`, `gamma1`, `gamma2`) so released checkpoints load by
renaming prefixes only (the block around it is `zoo.blocks.block.MixerBlock`). Everything channels-last: (B, H, W, C).
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from zoo.kernels._sizes import size_max
from zoo.kernels.backend import is_exporting
from zoo.kernels.neighborhood import neighborhood_attention

from ._registry import check_input, register_mixer, resolve_heads

# FX leaves, one graph node each: they read sizes and build per-size tables when called (any tracer; timm's registry
# lists them too, see __init__)
torch.fx.wrap('neighborhood_attention')
torch.fx.wrap('size_max')

__all__ = ['NeighborhoodAttention2D']


@register_mixer('neighborhood', paper='NAT (Hassani et al., CVPR 2023); DiNAT (Hassani & Shi, 2022)',
                cost='O(N k^2), kernel k', triton=True, torchscript=True)
class NeighborhoodAttention2D(nn.Module):
    """2-D (dilated) neighborhood multi-head self-attention with relative position bias.

    (B, H, W, dim) -> (B, H, W, dim) for any H, W. As in the NATTEN module the official checkpoints
    were trained with, a map smaller than kernel_size * dilation on an axis is zero-padded at the
    bottom / right up to that size before the qkv projection (the padded tokens take part as keys),
    and the output is cropped back.

    Args:
        dim: input and output channels.
        num_heads: attention heads (see `resolve_heads`).
        head_dim: channels per head (see `resolve_heads`).
        kernel_size: neighborhood size k (odd, >= 1); each query sees k * k keys.
        dilation: spacing between neighbours (DiNAT); 1 is plain NAT.
        rel_pos_bias: learn a (heads, 2k - 1, 2k - 1) relative position bias `rpb`.
        qkv_bias: bias in the qkv projection.
        qk_scale: logit scale, head_dim ** -0.5 if None.
        attn_drop: attention-weight dropout. The neighborhood op has none, so a non-zero value is
            accepted (for config compatibility) but raises when the module runs in training mode.
        proj_drop: dropout after the output projection.
    """
    no_weight_decay_keys = ('rpb',)

    def __init__(
            self,
            dim: int,
            num_heads: Optional[int] = None,
            head_dim: Optional[int] = None,
            kernel_size: int = 7,
            dilation: int = 1,
            rel_pos_bias: bool = True,
            qkv_bias: bool = True,
            qk_scale: Optional[float] = None,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
    ):
        super().__init__()
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f'kernel_size: expected an odd positive int, got {kernel_size!r}')
        if not isinstance(dilation, int) or dilation < 1:
            raise ValueError(f'dilation: expected an int >= 1, got {dilation!r}')
        if not 0. <= attn_drop < 1.:
            raise ValueError(f'attn_drop: expected a rate in [0, 1), got {attn_drop}')
        self.dim = dim
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        attn_dim = self.num_heads * self.head_dim
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.scale = qk_scale or self.head_dim ** -0.5
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, attn_dim * 3, bias=qkv_bias)
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros(self.num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
            trunc_normal_(self.rpb, std=.02, a=-2., b=2.)
        else:
            self.register_parameter('rpb', None)
        self.proj = nn.Linear(attn_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        who = 'NeighborhoodAttention2D'  # scripted code: TorchScript has no type()
        if not torch.jit.is_scripting():
            who = type(self).__name__
        check_input(x, self.dim, who)
        if self.training and self.attn_drop > 0.:
            raise ValueError(f'attn_drop: the neighborhood attention op has no attention dropout; '
                             f'training needs attn_drop=0, got {self.attn_drop}')
        B, H, W, C = x.shape
        window = self.kernel_size * self.dilation
        # exporting: max without a branch on the (symbolic) size, and always pad / crop (maybe by 0)
        exporting = is_exporting()
        Hp, Wp = size_max(H, window), size_max(W, window)
        padded = exporting or Hp != H or Wp != W
        if padded:
            x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
        q, k, v = self.qkv(x).view(B, Hp, Wp, 3, self.num_heads, self.head_dim).unbind(3)
        x = neighborhood_attention(
            q, k, v, self.kernel_size, self.dilation, rel_pos_bias=self.rpb, scale=self.scale)
        x = x.reshape(B, Hp, Wp, -1)
        if padded:
            x = x[:, :H, :W]
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, '
                f'dilation={self.dilation}, rel_pos_bias={self.rpb is not None}')
