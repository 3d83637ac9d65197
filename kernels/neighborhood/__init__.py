"""Neighborhood attention op (NAT's NA and DiNAT's dilated NA) with relative-position bias."""
from typing import Optional

import torch

from .._args import IntOr2 as _IntOr2
from .._args import pair as _pair
from ..backend import resolve_backend
from .reference import DENSE_MAX_TOKENS, na_axis_tables, na_tables, neighborhood_attention_ref

__all__ = ['neighborhood_attention', 'neighborhood_attention_ref', 'na_axis_tables', 'na_tables',
           'DENSE_MAX_TOKENS']



def _check_inputs(q, k, v, kernel, dilation, rel_pos_bias) -> None:
    if q.dim() != 5 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f'q, k, v: expected equal shapes (B, H, W, heads, head_dim), got '
                         f'{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}')
    for axis, size, ks, dil in zip(('height', 'width'), q.shape[1:3], kernel, dilation):
        if ks < 1 or ks % 2 == 0:
            raise ValueError(f'kernel_size: expected odd positive sizes, got {kernel} ({axis} kernel {ks})')
        if dil < 1:
            raise ValueError(f'dilation: expected positive dilations, got {dilation}')
        if ks * dil > size:
            raise ValueError(
                f'kernel_size * dilation must not exceed the input {axis}: {ks} * {dil} = {ks * dil} > {size} '
                f'(input H x W = {q.shape[1]} x {q.shape[2]})')
    if rel_pos_bias is not None:
        expected = (q.shape[3], 2 * kernel[0] - 1, 2 * kernel[1] - 1)
        if tuple(rel_pos_bias.shape) != expected:
            raise ValueError(f'rel_pos_bias: expected shape (heads, 2*kh-1, 2*kw-1) = {expected}, '
                             f'got {tuple(rel_pos_bias.shape)}')


def neighborhood_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kernel_size: _IntOr2,
        dilation: _IntOr2 = 1,
        *,
        rel_pos_bias: Optional[torch.Tensor] = None,
        scale: Optional[float] = None,
        backend: Optional[str] = None,
) -> torch.Tensor:
    """2-D neighborhood attention with NATTEN semantics (clamped windows, dilation sub-grids).

    Args:
        q, k, v: (B, H, W, heads, head_dim).
        kernel_size: odd window size, int or (kh, kw).
        dilation: int or (dh, dw); kernel_size * dilation must not exceed H (W).
        rel_pos_bias: optional (heads, 2*kh - 1, 2*kw - 1) table indexed by key - query + k - 1,
            offsets counted in the dilation sub-grid.
        scale: logit scale applied to q, default head_dim ** -0.5.
        backend: 'torch', 'triton' or 'auto' (see `kernels.backend`).

    Returns:
        (B, H, W, heads, head_dim).
    """
    kernel = _pair(kernel_size, 'kernel_size')
    dil = _pair(dilation, 'dilation')
    _check_inputs(q, k, v, kernel, dil, rel_pos_bias)
    tensors = (q, k, v) if rel_pos_bias is None else (q, k, v, rel_pos_bias)
    if resolve_backend(backend, *tensors) == 'triton':
        from .triton import neighborhood_attention_triton
        return neighborhood_attention_triton(q, k, v, kernel, dil, rel_pos_bias, scale)
    return neighborhood_attention_ref(q, k, v, kernel, dil, rel_pos_bias, scale)
