"""Window attention op (Swin W-MSA / SW-MSA, MaxViT block and grid attention)."""
from typing import Optional

import torch

from .._args import IntOr2 as _IntOr2
from .._args import pair as _pair
from ..backend import resolve_backend
from .reference import MASK_VALUE, window_attention_ref, window_partition, window_reverse, window_tables

__all__ = ['window_attention', 'window_attention_ref', 'window_partition', 'window_reverse', 'window_tables',
           'MASK_VALUE']



def window_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        window_size: _IntOr2,
        *,
        mode: str = 'block',
        shift: _IntOr2 = 0,
        rel_pos_bias: Optional[torch.Tensor] = None,
        scale: Optional[float] = None,
        backend: Optional[str] = None,
) -> torch.Tensor:
    """Multi-head attention inside windows of a 2-D map.

    Args:
        q, k, v: (B, H, W, heads, head_dim), any H and W (padded internally, cropped back).
        window_size: window (block mode) or grid (grid mode) size, int or (h, w).
        mode: 'block' for contiguous windows, 'grid' for MaxViT's strided grid.
        shift: cyclic shift of block windows (Swin SW-MSA), masked as in Swin.
        rel_pos_bias: optional table (heads, 2Mh - 1, 2Mw - 1) indexed by key - query + M - 1, M >= window.
        scale: logit scale, default head_dim ** -0.5.
        backend: 'torch', 'triton' or 'auto' (see `kernels.backend`).

    Returns:
        (B, H, W, heads, head_dim).
    """
    window_size = _pair(window_size, 'window_size')
    shift = _pair(shift, 'shift')
    if q.dim() != 5 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f'q, k, v: expected equal shapes (B, H, W, heads, head_dim), got '
                         f'{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}')
    if mode not in ('block', 'grid'):
        raise ValueError(f"mode: expected 'block' or 'grid', got {mode!r}")
    if min(window_size) < 1:
        raise ValueError(f'window_size: expected positive sizes, got {window_size}')
    if mode == 'grid' and any(shift):
        raise ValueError(f'shift: grid mode takes no shift, got {shift}')
    if any(s < 0 or s >= w for s, w in zip(shift, window_size)):
        raise ValueError(f'shift: expected 0 <= shift < window_size={window_size}, got {shift}')
    if rel_pos_bias is not None:
        heads = q.shape[3]
        th, tw = rel_pos_bias.shape[-2:] if rel_pos_bias.dim() == 3 else (0, 0)
        if (rel_pos_bias.dim() != 3 or rel_pos_bias.shape[0] != heads or th % 2 == 0 or tw % 2 == 0
                or th < 2 * window_size[0] - 1 or tw < 2 * window_size[1] - 1):
            raise ValueError(
                f'rel_pos_bias: expected (heads={heads}, 2Mh-1, 2Mw-1) with M >= window {window_size}, '
                f'got {tuple(rel_pos_bias.shape)}')
    tensors = (q, k, v) if rel_pos_bias is None else (q, k, v, rel_pos_bias)
    if resolve_backend(backend, *tensors) == 'triton':
        from .triton import window_attention_triton
        return window_attention_triton(q, k, v, window_size, mode, shift, rel_pos_bias, scale)
    return window_attention_ref(q, k, v, window_size, mode, shift, rel_pos_bias, scale)
