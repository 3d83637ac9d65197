"""Swin window attention blocks: W-MSA / SW-MSA mixer, the Swin block and patch merging.

`Swin Transformer: Hierarchical Vision Transformer using Shifted Windows` - https://arxiv.org/abs/2103.14030

Parameter names follow the official implementation (microsoft/Swin-Transformer) so its checkpoints and
timm's map onto these modules by renaming a few prefixes. Everything channels-last: (B, H, W, C).
Any H and W work: the window shrinks to the map on axes no larger than it (where the shift is dropped),
and the window attention op pads and masks whatever is left over.
"""
from typing import Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp, to_2tuple, trunc_normal_

from kernels.window import window_attention

from ._registry import register_mixer

__all__ = ['WindowAttention', 'SwinBlock', 'PatchMerging', 'effective_window_shift']

_int_or_tuple_2_t = Union[int, Tuple[int, int]]


def effective_window_shift(
        size: Tuple[int, int],
        window_size: Tuple[int, int],
        shift_size: Tuple[int, int],
) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """Per axis, Swin's rule for a map of `size`: an axis no larger than the window is one window, unshifted."""
    window = tuple(min(w, s) for w, s in zip(window_size, size))
    shift = tuple(0 if s <= w else sh for s, w, sh in zip(size, window_size, shift_size))
    return window, shift


@register_mixer('window')
class WindowAttention(nn.Module):
    """Window multi-head self-attention with relative position bias (Swin W-MSA, SW-MSA when shifted).

    (B, H, W, dim) -> (B, H, W, dim) for any H, W.

    Args:
        dim: input and output channels.
        num_heads: attention heads.
        head_dim: channels per head (dim // num_heads if None).
        window_size: window height and width M (the bias table covers offsets up to M - 1).
        shift_size: cyclic shift of the windows (Swin uses M // 2 in every other block).
        qkv_bias: bias in the qkv projection.
        attn_drop: attention dropout; the window op has none, so only 0 is accepted.
        proj_drop: dropout after the output projection.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            head_dim: Optional[int] = None,
            window_size: _int_or_tuple_2_t = 7,
            shift_size: _int_or_tuple_2_t = 0,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
    ):
        super().__init__()
        if num_heads < 1 or (head_dim is None and dim % num_heads):
            raise ValueError(f'num_heads: expected a positive divisor of dim={dim}, got {num_heads}')
        if attn_drop:
            raise ValueError(f'attn_drop: the window attention op has no dropout, expected 0, got {attn_drop}')
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        self.window_size = to_2tuple(window_size)
        self.shift_size = to_2tuple(shift_size)
        if min(self.window_size) < 1:
            raise ValueError(f'window_size: expected positive sizes, got {self.window_size}')
        if any(s < 0 or s >= w for s, w in zip(self.shift_size, self.window_size)):
            raise ValueError(f'shift_size: expected 0 <= shift < window_size={self.window_size}, got {self.shift_size}')
        attn_dim = self.head_dim * num_heads
        self.scale = self.head_dim ** -0.5
        win_h, win_w = self.window_size
        # Swin's layout: ((2Mh-1) * (2Mw-1), heads), row-major over the query-minus-key offset
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * win_h - 1) * (2 * win_w - 1), num_heads))
        self.qkv = nn.Linear(dim, attn_dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(attn_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=.02)

    def rel_pos_bias(self) -> torch.Tensor:
        """The bias table in the op's layout: (heads, 2Mh - 1, 2Mw - 1) indexed by key minus query."""
        win_h, win_w = self.window_size
        table = self.relative_position_bias_table.view(2 * win_h - 1, 2 * win_w - 1, self.num_heads)
        return table.flip(0, 1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        window, shift = effective_window_shift((H, W), self.window_size, self.shift_size)
        q, k, v = self.qkv(x).view(B, H, W, 3, self.num_heads, self.head_dim).unbind(3)
        x = window_attention(q, k, v, window, shift=shift, rel_pos_bias=self.rel_pos_bias(), scale=self.scale)
        x = self.proj(x.reshape(B, H, W, -1))
        return self.proj_drop(x)

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, '
                f'shift_size={self.shift_size}')


class SwinBlock(nn.Module):
    """Swin block: x + attn(norm1(x)), then x + mlp(norm2(x)). (B, H, W, dim) -> (B, H, W, dim).

    Args:
        dim: channels.
        num_heads: attention heads.
        window_size: window size M.
        shift_size: window shift (0 for W-MSA, M // 2 for SW-MSA).
        mlp_ratio: MLP hidden width / dim.
        qkv_bias: bias in the qkv projection.
        proj_drop: dropout after the attention projection and in the MLP.
        attn_drop: attention dropout (must be 0, see `WindowAttention`).
        drop_path: stochastic depth rate.
        init_values: layer-scale init, None for no layer scale (official Swin).
        act_layer: MLP activation.
        norm_layer: norm over channels.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            window_size: _int_or_tuple_2_t = 7,
            shift_size: _int_or_tuple_2_t = 0,
            head_dim: Optional[int] = None,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            init_values: Optional[float] = None,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(
            dim,
            num_heads=num_heads,
            head_dim=head_dim,
            window_size=window_size,
            shift_size=shift_size,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
        )
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class PatchMerging(nn.Module):
    """Concatenate each 2x2 patch (official Swin order), norm, project.

    (B, H, W, dim) -> (B, ceil(H / 2), ceil(W / 2), out_dim); odd H or W is zero-padded at the bottom / right.
    """

    def __init__(self, dim: int, out_dim: Optional[int] = None, norm_layer: Type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.out_dim = out_dim or 2 * dim
        self.norm = norm_layer(4 * dim)
        self.reduction = nn.Linear(4 * dim, self.out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            H, W = H + H % 2, W + W % 2
        # channel blocks ordered (row 0, col 0), (row 1, col 0), (row 0, col 1), (row 1, col 1)
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))
