"""Brute-force neighborhood attention: a dense oracle for tests, independent of `reference.py`'s tables.

Each axis's neighbours come from a per-position Python loop: for stride 1 without causal masking, NATTEN's own
``get_window_start`` (natten 0.17's CPU kernels, in full-grid coordinates with its explicit ragged-group branch);
otherwise the GNA rules of NATTEN 0.21 written per query in integers (stride-group leader, clamped centre,
causal start). The N-D neighbourhood is the product of the axes' ones, the score matrix the full N x N one
(in fp64) with non-neighbours at -inf. Slow; small maps only.
"""
import itertools
from typing import List, Optional, Sequence

import torch

__all__ = ['window_start', 'axis_neighbors', 'neighborhood_attention_naive']


def window_start(index: int, length: int, kernel: int, dilation: int) -> int:
    """First key position of the (stride 1, non-causal, odd-kernel) window of `index` (full-grid coordinates)."""
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


def axis_neighbors(length: int, kernel: int, stride: int = 1, dilation: int = 1,
                   causal: bool = False) -> List[List[int]]:
    """Key positions of every query position along one axis (full-grid coordinates)."""
    keys = []
    for i in range(length):
        if stride == 1 and not causal and kernel % 2 == 1:
            s = window_start(i, length, kernel, dilation)
            keys.append([s + t * dilation for t in range(kernel)])
            continue
        group, sub = i % dilation, i // dilation
        group_len = len(range(group, length, dilation))
        first = sub - sub % stride  # first query of the stride group
        if causal:
            lead = min(first + stride - 1, group_len - 1)
            subs = [j for j in range(group_len) if lead - kernel < j <= sub]
        else:
            lead = min(first + stride // 2, group_len - 1)
            before, after = kernel // 2, kernel // 2 - (1 - kernel % 2)
            centre = min(max(lead, before), group_len - 1 - after)
            subs = list(range(centre - before, centre + after + 1))
        keys.append([group + dilation * j for j in subs])
    return keys


def neighborhood_attention_naive(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kernel_size: Sequence[int],
        dilation: Optional[Sequence[int]] = None,
        rel_pos_bias: Optional[torch.Tensor] = None,
        scale: Optional[float] = None,
        stride: Optional[Sequence[int]] = None,
        is_causal: Optional[Sequence[bool]] = None,
) -> torch.Tensor:
    """q, k, v: (B, *spatial, heads, d) -> (B, *spatial, heads, d); differentiable in q, k, v and rel_pos_bias.

    Per-axis sequences for kernel_size, dilation, stride and is_causal (defaults 1, 1, False)."""
    sizes = list(q.shape[1:-2])
    n = len(sizes)
    dilation = list(dilation or [1] * n)
    stride = list(stride or [1] * n)
    is_causal = list(is_causal or [False] * n)
    B, nh, d = q.shape[0], q.shape[-2], q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    per_axis = [axis_neighbors(sizes[a], kernel_size[a], stride[a], dilation[a], is_causal[a]) for a in range(n)]
    positions = list(itertools.product(*[range(s) for s in sizes]))
    flat = {p: i for i, p in enumerate(positions)}
    N = len(positions)
    allowed = torch.zeros(N, N, dtype=torch.bool)
    rel = torch.zeros(n, N, N, dtype=torch.long)
    for qi, p in enumerate(positions):
        for key in itertools.product(*[per_axis[a][p[a]] for a in range(n)]):
            ki = flat[key]
            allowed[qi, ki] = True
            for a in range(n):  # key - query in units of the dilation group, shifted to a table index
                rel[a, qi, ki] = (key[a] - p[a]) // dilation[a] + kernel_size[a] - 1
    qf = q.reshape(B, N, nh, d).transpose(1, 2).to(torch.float64) * scale
    kf = k.reshape(B, N, nh, d).transpose(1, 2).to(torch.float64)
    vf = v.reshape(B, N, nh, -1).transpose(1, 2).to(torch.float64)
    scores = qf @ kf.transpose(-2, -1)  # B, heads, N, N
    if rel_pos_bias is not None:
        scores = scores + rel_pos_bias.to(torch.float64)[(slice(None),) + tuple(rel)]
    scores = scores.masked_fill(~allowed, float('-inf'))
    out = scores.softmax(dim=-1) @ vf
    return out.transpose(1, 2).reshape(q.shape[:-1] + (-1,)).to(q.dtype)
