"""Brute-force neighborhood attention: a dense oracle for tests, independent of `reference.py`'s tables.

Window starts come from a per-position Python loop over NATTEN's own formula (``get_window_start`` of
natten 0.17's CPU kernels, written in full-grid coordinates with its explicit ragged-group branch), the
score matrix is the full N x N one, and non-neighbors are set to -inf. Slow; small maps only.
"""
from typing import List, Optional, Tuple

import torch

__all__ = ['window_start', 'neighborhood_attention_naive']


def window_start(index: int, length: int, kernel: int, dilation: int) -> int:
    """First key position of the window of `index` along one axis (full-grid coordinates)."""
    half = kernel // 2
    if dilation <= 1:
        return max(index - half, 0) + (index + half >= length) * (length - index - half - 1)
    if index - half * dilation < 0:
        return index % dilation
    if index + half * dilation >= length:
        residue = index % dilation
        full = (length // dilation) * dilation
        short = length - full
        if residue < short:
            return length - short + residue - 2 * half * dilation
        return full + residue - kernel * dilation
    return index - half * dilation


def _axis_keys(length: int, kernel: int, dilation: int) -> List[List[int]]:
    keys = []
    for i in range(length):
        s = window_start(i, length, kernel, dilation)
        keys.append([s + t * dilation for t in range(kernel)])
    return keys


def neighborhood_attention_naive(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kernel_size: Tuple[int, int],
        dilation: Tuple[int, int] = (1, 1),
        rel_pos_bias: Optional[torch.Tensor] = None,
        scale: Optional[float] = None,
) -> torch.Tensor:
    """q, k, v: (B, H, W, heads, d) -> (B, H, W, heads, d); differentiable in q, k, v and rel_pos_bias."""
    B, H, W, nh, d = q.shape
    kh, kw = kernel_size
    dh, dw = dilation
    scale = d ** -0.5 if scale is None else scale
    rows, cols = _axis_keys(H, kh, dh), _axis_keys(W, kw, dw)
    N = H * W
    allowed = torch.zeros(N, N, dtype=torch.bool)
    rel_r = torch.zeros(N, N, dtype=torch.long)
    rel_c = torch.zeros(N, N, dtype=torch.long)
    for i in range(H):
        for j in range(W):
            for r in rows[i]:
                for c in cols[j]:
                    allowed[i * W + j, r * W + c] = True
                    # key - query, in units of the dilation sub-grid, shifted to a table index
                    rel_r[i * W + j, r * W + c] = (r - i) // dh + kh - 1
                    rel_c[i * W + j, r * W + c] = (c - j) // dw + kw - 1
    qf = q.reshape(B, N, nh, d).transpose(1, 2).to(torch.float64) * scale
    kf = k.reshape(B, N, nh, d).transpose(1, 2).to(torch.float64)
    vf = v.reshape(B, N, nh, d).transpose(1, 2).to(torch.float64)
    scores = qf @ kf.transpose(-2, -1)  # B, heads, N, N
    if rel_pos_bias is not None:
        scores = scores + rel_pos_bias.to(torch.float64)[:, rel_r, rel_c]
    scores = scores.masked_fill(~allowed, float('-inf'))
    out = scores.softmax(dim=-1) @ vf
    return out.transpose(1, 2).reshape(B, H, W, nh, d).to(q.dtype)
