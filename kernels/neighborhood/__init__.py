"""Neighborhood attention op (NAT's NA and DiNAT's dilated NA) with relative-position bias."""
from typing import Optional, Tuple

import torch

from .._args import IntOr2 as _IntOr2
from .._args import pair as _pair
from .._args import shape_str
from ..backend import resolve_backend
from .reference import DENSE_MAX_TOKENS, na_axis_tables, na_tables, neighborhood_attention_ref

__all__ = ['neighborhood_attention', 'neighborhood_attention_ref', 'na_axis_tables', 'na_tables',
           'DENSE_MAX_TOKENS']


def _check_inputs(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kernel: Tuple[int, int],
        dilation: Tuple[int, int],
        rel_pos_bias: Optional[torch.Tensor],
) -> None:
    if q.dim() != 5 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError('q, k, v: expected equal shapes (B, H, W, heads, head_dim), got '
                         + shape_str(q) + ', ' + shape_str(k) + ', ' + shape_str(v))
    H, W = q.shape[1], q.shape[2]
    _check_axis('height', H, kernel[0], dilation[0], kernel, dilation, H, W)
    _check_axis('width', W, kernel[1], dilation[1], kernel, dilation, H, W)
    if rel_pos_bias is not None:
        expected = (q.shape[3], 2 * kernel[0] - 1, 2 * kernel[1] - 1)
        dims = rel_pos_bias.shape
        if len(dims) != 3 or dims[0] != expected[0] or dims[1] != expected[1] or dims[2] != expected[2]:
            raise ValueError(f'rel_pos_bias: expected shape (heads, 2*kh-1, 2*kw-1) = {expected}, '
                             f'got {shape_str(rel_pos_bias)}')


def _check_axis(axis: str, size: int, ks: int, dil: int, kernel: Tuple[int, int], dilation: Tuple[int, int],
                H: int, W: int) -> None:
    """One axis of `_check_inputs`: an odd kernel, a positive dilation, kernel * dilation within the map."""
    if ks < 1 or ks % 2 == 0:
        raise ValueError(f'kernel_size: expected odd positive sizes, got {kernel} ({axis} kernel {ks})')
    if dil < 1:
        raise ValueError(f'dilation: expected positive dilations, got {dilation}')
    if ks * dil > size:
        raise ValueError(
            f'kernel_size * dilation must not exceed the input {axis}: {ks} * {dil} = {ks * dil} > {size} '
            f'(input H x W = {H} x {W})')


def neighborhood_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kernel_size: _IntOr2,
        dilation: _IntOr2 = 1,
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

    Scriptable (`torch.jit.script`): scripted code always runs the reference in its export form, as exports do.
    Pass the arguments after `dilation` by name (they are not keyword-only because TorchScript cannot compile
    keyword-only arguments with defaults).
    """
    kernel = _pair(kernel_size, 'kernel_size')
    dil = _pair(dilation, 'dilation')
    _check_inputs(q, k, v, kernel, dil, rel_pos_bias)
    if not torch.jit.is_scripting():
        if resolve_backend(backend, q, k, v, rel_pos_bias) == 'triton':
            return _neighborhood_attention_triton(q, k, v, kernel, dil, rel_pos_bias, scale)
    return neighborhood_attention_ref(q, k, v, kernel, dil, rel_pos_bias, scale)


def _neighborhood_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: Tuple[int, int],
                                   dilation: Tuple[int, int], rel_pos_bias: Optional[torch.Tensor],
                                   scale: Optional[float]) -> torch.Tensor:
    from .triton import neighborhood_attention_triton  # imports triton: only when the kernel runs
    return neighborhood_attention_triton(q, k, v, kernel, dilation=dilation, rel_pos_bias=rel_pos_bias, scale=scale)
