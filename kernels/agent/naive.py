"""Brute-force oracle of agent attention, for tests only (float64, loops over batch and heads).

Written independently of `reference.py`, the way the official code computes it: agents from
`nn.AdaptiveAvgPool2d`, the row and column biases summed first and resized together with a 2-D bilinear
resize (the official detection code), every bias copied per batch item, one head at a time.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .reference import AgentBias

__all__ = ['agent_attention_naive']


def _bias(bias: Optional[AgentBias], heads: int, n: int, H: int, W: int) -> torch.Tensor:
    """(heads, n, H, W) in float64."""
    out = torch.zeros(heads, n, H, W, dtype=torch.float64)
    if bias is None:
        return out
    if bias.table is not None:
        out = out + F.interpolate(bias.table.double(), size=(H, W), mode='bilinear', align_corners=False)
    if bias.row is not None or bias.col is not None:
        row = bias.row.double() if bias.row is not None else torch.zeros(heads, n, 1, dtype=torch.float64)
        col = bias.col.double() if bias.col is not None else torch.zeros(heads, n, 1, dtype=torch.float64)
        summed = row[..., :, None] + col[..., None, :]  # (heads, n, R, C) on the tables' own grid
        out = out + F.interpolate(summed, size=(H, W), mode='bilinear', align_corners=False)
    return out


def agent_attention_naive(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        grid: Tuple[int, int],
        agent_bias: Optional[AgentBias] = None,
        query_bias: Optional[AgentBias] = None,
        scale: Optional[float] = None,
) -> torch.Tensor:
    """q, k, v: (B, H, W, heads, d) -> (B, H, W, heads, d), in q's dtype."""
    B, H, W, nh, d = q.shape
    n = grid[0] * grid[1]
    scale = d ** -0.5 if scale is None else scale
    q64, k64, v64 = q.double(), k.double(), v.double()
    pooled = nn.AdaptiveAvgPool2d(grid)(q64.reshape(B, H, W, nh * d).permute(0, 3, 1, 2))  # B, C, gh, gw
    agents = pooled.flatten(2).transpose(1, 2).reshape(B, n, nh, d)
    b1 = _bias(agent_bias, nh, n, H, W).reshape(nh, n, H * W)
    b2 = _bias(query_bias, nh, n, H, W).reshape(nh, n, H * W)
    out = torch.zeros(B, H * W, nh, d, dtype=torch.float64)
    for b in range(B):
        for h in range(nh):
            a = agents[b, :, h]  # n, d
            kk, vv, qq = (t[b].reshape(H * W, nh, d)[:, h] for t in (k64, v64, q64))
            agent_v = torch.softmax(a @ kk.T * scale + b1[h], dim=-1) @ vv  # n, d
            out[b, :, h] = torch.softmax(qq @ a.T * scale + b2[h].T, dim=-1) @ agent_v
    return out.reshape(B, H, W, nh, d).to(q.dtype)
