"""Neighborhood attention (NAT / DiNAT / GNA): the 2-D neighborhood attention mixer and its 3-D (video) sibling.

`Neighborhood Attention Transformer` - https://arxiv.org/abs/2204.07143
`Dilated Neighborhood Attention Transformer` - https://arxiv.org/abs/2209.15001
`Generalized Neighborhood Attention` (strided / blocked, causal) - https://arxiv.org/abs/2504.16922
Official code and weights: https://github.com/SHI-Labs/Neighborhood-Attention-Transformer

Each query attends to the kernel x kernel neighbours around it (windows clamped inside the map, dilated
by `dilation`), with a learned relative position bias, exactly as NATTEN computes it. Parameter names
follow the official modules (`qkv`, `rpb`, `proj`, `gamma1`, `gamma2`) so released checkpoints load by
renaming prefixes only (the block around it is `zoo.blocks.block.MixerBlock`). Everything channels-last: (B, H, W, C).
"""
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from zoo.kernels._args import per_axis, shape_str
from zoo.kernels._sizes import size_max
from zoo.kernels.backend import is_exporting
from zoo.kernels.neighborhood import neighborhood_attention, neighborhood_attention_3d

from ._registry import check_input, register_mixer, resolve_heads

# FX leaves, one graph node each: they read sizes and build per-size tables when called (any tracer; timm's registry
# lists them too, see __init__)
torch.fx.wrap('neighborhood_attention')
torch.fx.wrap('neighborhood_attention_3d')
torch.fx.wrap('size_max')

__all__ = ['NeighborhoodAttention2D', 'NeighborhoodAttention3D']


@register_mixer('neighborhood', paper='NAT (Hassani et al., CVPR 2023); DiNAT (Hassani & Shi, 2022); GNA (2025)',
                cost='O(N k^2), kernel k', triton=True, torchscript=True)
class NeighborhoodAttention2D(nn.Module):
    """2-D generalized neighborhood multi-head self-attention with relative position bias (NAT / DiNAT / GNA).

    (B, H, W, dim) -> (B, H, W, dim) for any H, W. As in the NATTEN module the official checkpoints
    were trained with, a map smaller than kernel_size * dilation on an axis is zero-padded at the
    bottom / right up to that size before the qkv projection (the padded tokens take part as keys),
    and the output is cropped back.

    Args:
        dim: input and output channels.
        num_heads: attention heads (see `resolve_heads`).
        head_dim: channels per head (see `resolve_heads`).
        kernel_size: neighborhood size k per axis (int or tuple, odd or even); each query sees prod(k) keys.
        dilation: spacing between neighbours (DiNAT); 1 is plain NAT.
        rel_pos_bias: learn a (heads, 2k - 1, ...) relative position bias `rpb` (not with is_causal).
        qkv_bias: bias in the qkv projection.
        qk_scale: logit scale, head_dim ** -0.5 if None.
        attn_drop: attention-weight dropout. The neighborhood op has none, so a non-zero value is
            accepted (for config compatibility) but raises when the module runs in training mode.
        proj_drop: dropout after the output projection.
        stride: queries per shared window, per axis (GNA); stride == kernel_size is blocked attention.
        is_causal: causal masking, per axis (bool or tuple).
    """
    no_weight_decay_keys = ('rpb',)
    spatial_dims = 2

    def __init__(
            self,
            dim: int,
            num_heads: Optional[int] = None,
            head_dim: Optional[int] = None,
            kernel_size: Union[int, Tuple[int, ...]] = 7,
            dilation: Union[int, Tuple[int, ...]] = 1,
            rel_pos_bias: bool = True,
            qkv_bias: bool = True,
            qk_scale: Optional[float] = None,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            stride: Union[int, Tuple[int, ...]] = 1,
            is_causal: Union[bool, Tuple[bool, ...]] = False,
    ):
        super().__init__()
        n = self.spatial_dims
        kernel, dil = per_axis(kernel_size, n, 'kernel_size'), per_axis(dilation, n, 'dilation')
        st, causal = per_axis(stride, n, 'stride'), per_axis(is_causal, n, 'is_causal', bool)
        if min(kernel) < 1:
            raise ValueError(f'kernel_size: expected positive sizes, got {kernel_size!r}')
        if min(dil) < 1:
            raise ValueError(f'dilation: expected ints >= 1, got {dilation!r}')
        if min(st) < 1 or any(s > k for s, k in zip(st, kernel)):
            raise ValueError(f'stride: expected ints in [1, kernel_size], got {stride!r} (kernel_size {kernel_size!r})')
        if rel_pos_bias and any(causal):
            raise ValueError(f'rel_pos_bias: not defined with causal attention (NATTEN defines relative-position bias '
                             f'only without is_causal), got is_causal={is_causal!r}; pass rel_pos_bias=False')
        if not 0. <= attn_drop < 1.:
            raise ValueError(f'attn_drop: expected a rate in [0, 1), got {attn_drop}')
        self.dim = dim
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        attn_dim = self.num_heads * self.head_dim
        # ints when every axis agrees (as NAT / DiNAT configs give them), tuples otherwise
        self.kernel_size = kernel[0] if len(set(kernel)) == 1 else tuple(kernel)
        self.dilation = dil[0] if len(set(dil)) == 1 else tuple(dil)
        self.stride = st[0] if len(set(st)) == 1 else tuple(st)
        self.is_causal = causal[0] if len(set(causal)) == 1 else tuple(causal)
        self.window = [k * d for k, d in zip(kernel, dil)]
        self.scale = qk_scale or self.head_dim ** -0.5
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, attn_dim * 3, bias=qkv_bias)
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros([self.num_heads] + [2 * k - 1 for k in kernel]))
            trunc_normal_(self.rpb, std=.02, a=-2., b=2.)
        else:
            self.register_parameter('rpb', None)
        self.proj = nn.Linear(attn_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _check(self, x: torch.Tensor) -> None:
        who = 'NeighborhoodAttention2D'  # scripted code: TorchScript has no type()
        if not torch.jit.is_scripting():
            who = type(self).__name__
        check_input(x, self.dim, who)
        self._check_dropout()

    def _check_dropout(self) -> None:
        if self.training and self.attn_drop > 0.:
            raise ValueError(f'attn_drop: the neighborhood attention op has no attention dropout; '
                             f'training needs attn_drop=0, got {self.attn_drop}')

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return neighborhood_attention(q, k, v, self.kernel_size, self.dilation, rel_pos_bias=self.rpb,
                                      scale=self.scale, stride=self.stride, is_causal=self.is_causal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        sizes = x.shape[1:-1]
        # exporting: max without a branch on the (symbolic) size, and always pad / crop (maybe by 0)
        padded = is_exporting()
        padded_sizes: List[int] = []
        pad: List[int] = [0, 0]
        n = len(self.window)  # not len(sizes): a Proxy while FX traces
        for a in range(n):
            size = size_max(sizes[a], self.window[a])
            padded_sizes.append(size)
            padded = padded or size != sizes[a]
        for a in range(n - 1, -1, -1):  # F.pad lists the last axis first
            pad += [0, padded_sizes[a] - sizes[a]]
        if padded:
            x = F.pad(x, pad)
        q, k, v = self.qkv(x).view([x.shape[0]] + padded_sizes + [3, self.num_heads, self.head_dim]).unbind(-3)
        x = self._attend(q, k, v).flatten(-2)
        if padded:
            for a in range(n):
                x = x.narrow(1 + a, 0, sizes[a])
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        extra = '' if self.stride == 1 and self.is_causal is False else (
            f', stride={self.stride}, is_causal={self.is_causal}')
        return (f'dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, '
                f'dilation={self.dilation}, rel_pos_bias={self.rpb is not None}' + extra)


@register_mixer('neighborhood_3d', paper='GNA (Hassani et al., 2025); NATTEN na3d', cost='O(N k^3), kernel k',
                triton=True, torchscript=True, spatial_dims=3)
class NeighborhoodAttention3D(NeighborhoodAttention2D):
    """3-D generalized neighborhood attention for video-shaped input: (B, T, H, W, dim) -> (B, T, H, W, dim).

    The arguments of `NeighborhoodAttention2D`, per axis (T, H, W) when given as tuples; e.g.
    ``is_causal=(True, False, False), rel_pos_bias=False`` attends causally in time.
    """
    spatial_dims = 3

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 5 or x.shape[-1] != self.dim:
            raise ValueError(f'NeighborhoodAttention3D: expected input (B, T, H, W, {self.dim}), got {shape_str(x)}')
        self._check_dropout()

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return neighborhood_attention_3d(q, k, v, self.kernel_size, self.dilation, rel_pos_bias=self.rpb,
                                         scale=self.scale, stride=self.stride, is_causal=self.is_causal)
