"""Swin window attention: the W-MSA / SW-MSA mixer.

`Swin Transformer: Hierarchical Vision Transformer using Shifted Windows` - https://arxiv.org/abs/2103.14030

Parameter names follow the official implementation (microsoft/Swin-Transformer) so its checkpoints and
timm's map onto these modules by renaming a few prefixes. Everything channels-last: (B, H, W, C).
Any H and W work: the window attention op pads the map to window multiples and masks the padding, so the
window and shift stay what they were built with (a backbone picks them from its `img_size` with
`effective_window_shift`, as timm does) and one ONNX export serves every input size.
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import to_2tuple, trunc_normal_

from zoo.kernels._sizes import ceil_div
from zoo.kernels.window import window_attention

from ._registry import check_input, register_mixer, resolve_heads

# FX leaves, one graph node each: they read sizes and build per-size tables when called (any tracer; timm's registry
# lists them too, see __init__)
torch.fx.wrap('window_attention')
torch.fx.wrap('tile_global_query')
torch.fx.wrap('pad_to_windows')

__all__ = ['WindowAttention', 'effective_window_shift', 'tile_global_query', 'pad_to_windows']

_int_or_tuple_2_t = Union[int, Tuple[int, int]]


def effective_window_shift(
        size: Tuple[int, int],
        window_size: Tuple[int, int],
        shift_size: Tuple[int, int],
) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """Per axis, Swin's rule for a map of `size`: an axis no larger than the window is one window, unshifted.

    Backbones apply it once at construction to the feature size of their `img_size` (timm's rule).
    """
    window = tuple(min(w, s) for w, s in zip(window_size, size))
    shift = tuple(0 if s <= w else sh for s, w, sh in zip(size, window_size, shift_size))
    return window, shift


def tile_global_query(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-image window of queries repeated over a map: q (B, Mh, Mw, heads, d), x (B, H, W, ...) ->
    (B, H, W, heads, d), token (i, j) getting q[:, i % Mh, j % Mw] (the grid of windows, cropped to H x W)."""
    H, W = x.shape[1], x.shape[2]
    q = q.repeat(1, ceil_div(H, q.shape[1]), ceil_div(W, q.shape[2]), 1, 1)
    return q[:, :H, :W]


def pad_to_windows(x: torch.Tensor, window: Tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) zero-padded at the bottom / right to multiples of the window: (B, Hp, Wp, C)."""
    H, W = x.shape[1], x.shape[2]
    return F.pad(x, (0, 0, 0, ceil_div(W, window[1]) * window[1] - W, 0, ceil_div(H, window[0]) * window[0] - H))


@register_mixer('window', paper='Swin Transformer (Liu et al., ICCV 2021)', cost='O(N M^2), window M',
                triton=True, torchscript=True)
class WindowAttention(nn.Module):
    """Window multi-head self-attention with relative position bias (Swin W-MSA, SW-MSA when shifted).

    (B, H, W, dim) -> (B, H, W, dim) for any H, W.

    Args:
        dim: input and output channels.
        num_heads: attention heads (see `resolve_heads`).
        head_dim: channels per head (see `resolve_heads`).
        window_size: window height and width M (the bias table covers offsets up to M - 1).
        shift_size: cyclic shift of the windows (Swin uses M // 2 in every other block).
        rel_pos_bias: learn Swin's relative position bias table; False: plain window softmax with no bias
            (L2ViT's local window attention, Twins' locally grouped attention).
        mask_padding: at sizes that are no multiple of the window, mask the padded keys (default: outputs never
            depend on the padding). False: zero-pad the normed input before the qkv projection and let the padded
            tokens join the keys and values unmasked, as DaViT, GC ViT's detection code and Twins' locally grouped
            attention do (so their weights give their official outputs at any size).
        global_query: GC ViT's global attention: `qkv` projects keys and values only and the queries are the
            stage's global query, passed as `forward(x, global_query)` with shape (B, Mh, Mw, dim) (a stage
            with ``context='global_query'`` computes it once and hands it to every block). No shift.
        qkv_bias: bias in the qkv projection.
        attn_drop: attention dropout; the window op has none, so only 0 is accepted.
        proj_drop: dropout after the output projection.
    """
    no_weight_decay_keys = ('relative_position_bias_table',)

    def __init__(
            self,
            dim: int,
            num_heads: Optional[int] = None,
            head_dim: Optional[int] = None,
            window_size: _int_or_tuple_2_t = 7,
            shift_size: _int_or_tuple_2_t = 0,
            rel_pos_bias: bool = True,
            mask_padding: bool = True,
            global_query: bool = False,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
    ):
        super().__init__()
        if attn_drop:
            raise ValueError(f'attn_drop: the window attention op has no dropout, expected 0, got {attn_drop}')
        self.dim = dim
        num_heads, head_dim = resolve_heads(dim, num_heads, head_dim)
        self.num_heads, self.head_dim = num_heads, head_dim
        self.window_size = to_2tuple(window_size)
        self.shift_size = to_2tuple(shift_size)
        if min(self.window_size) < 1:
            raise ValueError(f'window_size: expected positive sizes, got {self.window_size}')
        if any(s < 0 or s >= w for s, w in zip(self.shift_size, self.window_size)):
            raise ValueError(f'shift_size: expected 0 <= shift < window_size={self.window_size}, got {self.shift_size}')
        attn_dim = head_dim * num_heads
        if global_query and (any(self.shift_size) or attn_dim != dim):
            raise ValueError(f'global_query: expected no shift and num_heads * head_dim == dim={dim}, got shift_size='
                             f'{self.shift_size}, num_heads={num_heads}, head_dim={head_dim}')
        self.global_query = global_query
        # the stage context this mixer reads (MixerBlock passes it on); None: it reads none
        self.stage_context: Optional[str] = 'global_query' if global_query else None
        self.scale = head_dim ** -0.5
        self.mask_padding = bool(mask_padding)
        win_h, win_w = self.window_size
        if rel_pos_bias:
            # Swin's layout: ((2Mh-1) * (2Mw-1), heads), row-major over the query-minus-key offset
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros((2 * win_h - 1) * (2 * win_w - 1), num_heads))
            trunc_normal_(self.relative_position_bias_table, std=.02)
        else:
            self.relative_position_bias_table = None
        self.qkv = nn.Linear(dim, attn_dim * (2 if global_query else 3), bias=qkv_bias)
        self.proj = nn.Linear(attn_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def rel_pos_bias(self) -> Optional[torch.Tensor]:
        """The bias table in the op's layout: (heads, 2Mh - 1, 2Mw - 1) indexed by key minus query; None without."""
        if self.relative_position_bias_table is None:
            return None
        win_h, win_w = self.window_size
        table = self.relative_position_bias_table.view(2 * win_h - 1, 2 * win_w - 1, self.num_heads)
        return table.flip(0, 1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, global_query: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, H, W, dim), global_query (B, Mh, Mw, dim) with global_query=True -> (B, H, W, dim)."""
        check_input(x, self.dim, 'WindowAttention')
        unpadded = x
        if not self.mask_padding:
            x = pad_to_windows(x, self.window_size)
        B, H, W, C = x.shape
        if self.global_query:
            if global_query is None:
                raise ValueError(
                    'WindowAttention(global_query=True): expected the stage\'s global query (B, Mh, Mw, dim) as the '
                    'second argument, got None (build the stage with context=\'global_query\')')
            k, v = self.qkv(x).view(B, H, W, 2, self.num_heads, self.head_dim).unbind(3)
            q = tile_global_query(global_query.reshape(
                global_query.shape[0], self.window_size[0], self.window_size[1], self.num_heads, self.head_dim), x)
        else:
            q, k, v = self.qkv(x).view(B, H, W, 3, self.num_heads, self.head_dim).unbind(3)
        x = window_attention(
            q, k, v, self.window_size, shift=self.shift_size, rel_pos_bias=self.rel_pos_bias(), scale=self.scale)
        x = self.proj(x.reshape(B, H, W, -1))
        if not self.mask_padding:
            x = x[:, :unpadded.shape[1], :unpadded.shape[2]]
        return self.proj_drop(x)

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, '
                f'shift_size={self.shift_size}, rel_pos_bias={self.relative_position_bias_table is not None}'
                + (', global_query=True' if self.global_query else '')
                + ('' if self.mask_padding else ', mask_padding=False'))
