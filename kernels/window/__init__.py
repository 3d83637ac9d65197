"""Window attention op (Swin W-MSA / SW-MSA, MaxViT block and grid attention)."""
from typing import Optional, Tuple

import torch

from .._args import IntOr2 as _IntOr2
from .._args import pair as _pair
from .._args import shape_str
from ..backend import resolve_backend
from .reference import MASK_VALUE, window_attention_ref, window_partition, window_reverse, window_tables

__all__ = ['window_attention', 'window_attention_ref', 'window_partition', 'window_reverse', 'window_tables',
           'MASK_VALUE']


def window_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        window_size: _IntOr2,
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

    Scriptable (`torch.jit.script`): scripted code always runs the reference in its export form, as exports do.
    Pass the arguments after `window_size` by name (they are not keyword-only because TorchScript cannot compile
    keyword-only arguments with defaults).
    """
    window_size = _pair(window_size, 'window_size')
    shift = _pair(shift, 'shift')
    _check_args(q, k, v, window_size, mode, shift, rel_pos_bias)
    if not torch.jit.is_scripting():
        if _use_triton(backend, q, k, v, rel_pos_bias):
            return _window_attention_triton(q, k, v, window_size, mode, shift, rel_pos_bias, scale)
    return window_attention_ref(q, k, v, window_size, mode, shift, rel_pos_bias, scale)


def _check_args(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        window_size: Tuple[int, int],
        mode: str,
        shift: Tuple[int, int],
        rel_pos_bias: Optional[torch.Tensor],
) -> None:
    if q.dim() != 5 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError('q, k, v: expected equal shapes (B, H, W, heads, head_dim), got '
                         + shape_str(q) + ', ' + shape_str(k) + ', ' + shape_str(v))
    if mode != 'block' and mode != 'grid':
        raise ValueError(f"mode: expected 'block' or 'grid', got '{mode}'")
    if window_size[0] < 1 or window_size[1] < 1:
        raise ValueError(f'window_size: expected positive sizes, got {window_size}')
    if mode == 'grid' and (shift[0] != 0 or shift[1] != 0):
        raise ValueError(f'shift: grid mode takes no shift, got {shift}')
    if not (0 <= shift[0] < window_size[0] and 0 <= shift[1] < window_size[1]):
        raise ValueError(f'shift: expected 0 <= shift < window_size={window_size}, got {shift}')
    if rel_pos_bias is not None:
        heads = q.shape[3]
        dims = rel_pos_bias.shape
        if (len(dims) != 3 or dims[0] != heads or dims[1] % 2 == 0 or dims[2] % 2 == 0
                or dims[1] < 2 * window_size[0] - 1 or dims[2] < 2 * window_size[1] - 1):
            raise ValueError(
                f'rel_pos_bias: expected (heads={heads}, 2Mh-1, 2Mw-1) with M >= window {window_size}, '
                f'got {shape_str(rel_pos_bias)}')


def _use_triton(backend: Optional[str], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                rel_pos_bias: Optional[torch.Tensor]) -> bool:
    tensors = (q, k, v) if rel_pos_bias is None else (q, k, v, rel_pos_bias)
    return resolve_backend(backend, *tensors) == 'triton'


def _window_attention_triton(*args) -> torch.Tensor:
    from .triton import window_attention_triton  # imports triton: only when the kernel runs
    return window_attention_triton(*args)
