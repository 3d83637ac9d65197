"""Textbook linear attention, one readable formula per normaliser, for tests only.

Written independently of `reference.py`: unnormalised sums over the keys (``sum_j k_j^T v_j``, ``sum_j k~_j``,
``sum_j v_j``) with the 1/Nk folded into each formula, einsums, and everything in the input dtype (no fp32
upcast, autocast left alone). In fp64 it is a second oracle; in fp16 it shows the overflow the reference avoids:
a sum over thousands of tokens of values ~1e2 exceeds fp16's 65504.
"""
from typing import Optional

import torch

__all__ = ['linear_attention_naive']


def linear_attention_naive(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        normalizer: str,
        scale: float = 1.0,
        eps: float = 1e-6,
        clamp_min: float = 100.0,
        q_norm: Optional[torch.Tensor] = None,
        k_norm: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """q, q_norm: (B, heads, N, d); k, k_norm: (B, heads, Nk, d); v: (B, heads, Nk, dv) -> (B, heads, N, dv)."""
    n = k.shape[2]
    qn = q if q_norm is None else q_norm
    kn = k if k_norm is None else k_norm
    kv = torch.einsum('bhjd,bhje->bhde', k, v)  # sum_j k_j^T v_j
    num = torch.einsum('bhid,bhde->bhie', q, kv)  # q_i sum_j k_j^T v_j
    qk_sum = torch.einsum('bhid,bhd->bhi', qn, kn.sum(2))[..., None]  # q~_i . sum_j k~_j
    v_sum = v.sum(2)[:, :, None]
    if normalizer == 'none':
        return num
    if normalizer == 'flatten':
        return num / (qk_sum + n * eps)
    if normalizer == 'inline':
        return scale * num / n + (1 - scale * qk_sum / n) * v_sum / n
    if normalizer == 'mala':
        z = scale * qk_sum / n
        return scale * num / n * (1 + 1 / (z + eps)) - z * v_sum / n
    if normalizer == 'l2vit':
        return num / torch.clamp(qk_sum, min=clamp_min)
    raise ValueError(f'normalizer: unknown {normalizer!r}')
