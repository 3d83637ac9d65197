"""Brute-force dense oracle of bi-level routing attention, for tests only (O((H W)^2) memory).

Written independently of `reference.py`: no region permutation, no gather. Every token is labelled with its
region by coordinates; region means are taken with explicit per-region masks; the routing is a top-k over the
region-logit matrix; then one dense (H W) x (H W) attention per head where key j is visible to query i iff the
region of j is among the routed regions of i's region.
"""
from typing import Optional

import torch

__all__ = ['routed_attention_naive', 'region_labels']


def region_labels(H: int, W: int, n_win: int) -> torch.Tensor:
    """(H * W,) region index (raster order over the n_win x n_win grid) of each token in raster order."""
    wh, ww = H // n_win, W // n_win
    labels = [(y // wh) * n_win + (x // ww) for y in range(H) for x in range(W)]
    return torch.tensor(labels, dtype=torch.long)


def routed_attention_naive(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        n_win: int,
        topk: int,
        scale: Optional[float] = None,
        idx: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Dense oracle. q, k: (B, H, W, heads, dk); v: (B, H, W, heads, dv) -> (B, H, W, heads, dv)."""
    B, H, W, nh, dk = q.shape
    dv = v.shape[-1]
    N = H * W
    qf, kf, vf = q.reshape(B, N, nh, dk), k.reshape(B, N, nh, dk), v.reshape(B, N, nh, dv)
    if topk in (-1, -2):
        scale = dk ** -0.5 if scale is None else scale
        visible = torch.ones(B, N, N, dtype=torch.bool, device=q.device)
    else:
        scale = (nh * dk) ** -0.5 if scale is None else scale
        labels = region_labels(H, W, n_win).to(q.device)
        p2 = n_win * n_win
        if idx is None:
            q_r = torch.stack([qf[:, labels == r].detach().mean(1) for r in range(p2)], 1).flatten(2)
            k_r = torch.stack([kf[:, labels == r].detach().mean(1) for r in range(p2)], 1).flatten(2)
            idx = torch.topk(torch.einsum('brc,bsc->brs', q_r * scale, k_r), topk, dim=-1).indices
        routed = torch.zeros(B, p2, p2, dtype=torch.bool, device=q.device)
        routed.scatter_(2, idx, True)  # routed[b, r, s]: query region r sees key region s
        visible = routed[:, labels][:, :, labels]  # B, N, N
    logits = torch.einsum('bihc,bjhc->bhij', qf * scale, kf)
    logits = logits.masked_fill(~visible[:, None], float('-inf'))
    out = torch.einsum('bhij,bjhc->bihc', logits.softmax(-1), vf)
    return out.reshape(B, H, W, nh, dv)
