"""Bi-level routing attention op (BiFormer): region routing + token attention over the routed regions."""
from typing import Optional

import torch

from ..backend import is_exporting, resolve_backend
from .._args import shape_str
from .reference import (GLOBAL_TOPK, default_scale, from_regions, is_global, region_routing, routed_attention_ref,
                        to_regions)

__all__ = ['routed_attention', 'routed_attention_ref', 'region_routing', 'to_regions', 'from_regions',
           'default_scale', 'check_routing_args', 'GLOBAL_TOPK', 'is_global']


def check_routing_args(n_win: int, topk: int) -> None:
    """Clear errors for an n_win that is not a positive int, and a top-k that is neither a region count in
    [1, n_win^2] nor -1 / -2 (global attention)."""
    if not torch.jit.is_scripting():  # TorchScript's types already say int
        _check_int(n_win, 'n_win', 'a positive int (regions per side)')
    if n_win < 1:
        raise ValueError(f'n_win: expected a positive int (regions per side), got {n_win}')
    if not torch.jit.is_scripting():
        _check_int(topk, 'topk', 'an int')
    if not is_global(topk) and not 1 <= topk <= n_win * n_win:
        raise ValueError(f'topk: expected 1 <= topk <= n_win^2 = {n_win * n_win} routed regions (n_win={n_win}), '
                         f'or -1 / -2 for global attention, got {topk}')


def _check_int(value, name: str, expected: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f'{name}: expected {expected}, got {value!r}')


def routed_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        n_win: int,
        topk: int,
        scale: Optional[float] = None,
        idx: Optional[torch.Tensor] = None,
        backend: Optional[str] = None,
) -> torch.Tensor:
    """BiFormer's bi-level routing attention with exact official semantics.

    Args:
        q, k: (B, H, W, heads, dk); v: (B, H, W, heads, dv). H and W multiples of n_win (pad first; the
            BiFormer mixer does).
        n_win: regions per side (S); the map holds S x S regions of (H / S) x (W / S) tokens.
        topk: key regions each query region attends to (1..S^2), from detached region means of q and k;
            -1 or -2: plain global attention over all tokens (BiFormer's last stage).
        scale: logit scale, used for routing and attention. Default: the official one, (heads * dk) ** -0.5
            (the full qk_dim, which the released weights need) when routing, dk ** -0.5 for global attention.
        idx: optional (B, S^2, topk) routed regions (default: `region_routing`).
        backend: 'torch', 'triton' or 'auto' (see `kernels.backend`); global attention always takes the
            fused SDPA of the torch path.

    Returns:
        (B, H, W, heads, dv).

    Scriptable (`torch.jit.script`): scripted code always runs the reference in its export form, as exports do.
    Pass the arguments after `topk` by name (they are not keyword-only because TorchScript cannot compile
    keyword-only arguments with defaults).
    """
    check_routing_args(n_win, topk)
    if q.dim() != 5 or k.shape != q.shape or v.dim() != 5 or v.shape[:4] != q.shape[:4]:
        raise ValueError('q, k, v: expected q and k (B, H, W, heads, dk) and v (B, H, W, heads, dv), got '
                         + shape_str(q) + ', ' + shape_str(k) + ', ' + shape_str(v))
    H, W = q.shape[1], q.shape[2]
    exporting = not torch.jit.is_scripting() and is_exporting()  # sizes may be symbolic: no check on them
    if not is_global(topk) and not exporting and (H % n_win != 0 or W % n_win != 0):
        raise ValueError(f'n_win: the map must split into n_win x n_win = {n_win} x {n_win} equal regions: '
                         f'expected H and W multiples of {n_win}, got H x W = {H} x {W} (pad to '
                         f'{-(-H // n_win) * n_win} x {-(-W // n_win) * n_win} first)')
    logit_scale = default_scale(q, topk) if scale is None else float(scale)
    if is_global(topk):
        return routed_attention_ref(q, k, v, n_win, topk, logit_scale)
    if idx is None:
        idx = region_routing(q, k, n_win, topk, logit_scale)
    elif list(idx.shape) != [q.shape[0], n_win * n_win, topk]:
        raise ValueError(f'idx: expected (B, n_win^2, topk) = ({q.shape[0]}, {n_win * n_win}, {topk}), '
                         f'got ' + shape_str(idx))
    if not torch.jit.is_scripting():
        if resolve_backend(backend, q, k, v) == 'triton':
            return _routed_attention_triton(q, k, v, n_win, idx, logit_scale)
    return routed_attention_ref(q, k, v, n_win, topk, logit_scale, idx=idx)


def _routed_attention_triton(*args) -> torch.Tensor:
    from .triton import routed_attention_triton  # imports triton: only when the kernel runs
    return routed_attention_triton(*args)
