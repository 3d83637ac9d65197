"""Non-causal linear attention in pure PyTorch: the ground truth and the CPU / ONNX path.

Tensors are head-major: q, k ``(B, heads, N, d)`` after the feature map, v ``(B, heads, Nk, dv)``. With
``S = (1/Nk) sum_j k_j^T v_j`` (d x dv), ``kbar = (1/Nk) sum_j k~_j`` and ``vbar = (1/Nk) sum_j v_j``, where
``q~ = q_norm`` if given else q and ``k~ = k_norm`` if given else k, each normalizer is one published form:

  * ``'none'``    (Efficient Attention):  ``O = q sum_j k_j^T v_j = Nk (q S)``
  * ``'flatten'`` (FLatten, the 2024 numerically fixed form):  ``O = (q S) / (q~ . kbar + eps)``
  * ``'inline'``  (InLine, injective):  ``O = scale (q S) + (1 - scale q~ . kbar) vbar``
  * ``'mala'``    (MALA):  ``z = scale q~ . kbar``,  ``O = scale (q S) (1 + 1 / (z + eps)) - z vbar``
  * ``'l2vit'``   (L2ViT):  ``O = q sum_j k_j^T v_j / max(q~ . sum_j k~_j, clamp_min)``

Every sum over tokens, the normaliser and the products run in fp32 (fp64 for fp64 inputs) with autocast off; the
result is cast to v's dtype, or to the autocast dtype under autocast, so half-precision training never sums N
values in 16 bits (the overflow behind the NaNs reported for FLatten, fast-transformers and L2ViT under AMP). Plain
matmuls and elementwise ops with no branch on data or size: both ONNX exporters take it at any token count. Memory
is O(N (d + dv)): the d x dv state replaces the N x N attention matrix.
"""
from typing import List, Optional, Tuple

import torch

__all__ = ['linear_attention_ref', 'NORMALIZERS', 'out_dtype']



def normalizer_names() -> List[str]:
    """The normalizers' names, as a function: TorchScript reads no global tuples (`NORMALIZERS` is this, for
    Python)."""
    return ['none', 'flatten', 'inline', 'mala', 'l2vit']


NORMALIZERS = tuple(normalizer_names())


def out_dtype(v: torch.Tensor) -> torch.dtype:
    """The op's output dtype: the autocast dtype while autocast is on for v's device (fp64 is left alone, as
    autocast does), else v's dtype."""
    device = v.device.type
    if v.dtype != torch.float64 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return v.dtype


def _sums(k: torch.Tensor, v: torch.Tensor, k_norm: Optional[torch.Tensor],
          normalizer: str) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """S = k^T v (summed for 'none' / 'l2vit', averaged otherwise), kbar (or sum k~), vbar where used."""
    kv = k.transpose(-2, -1) @ v  # B, heads, d, dv
    kn = k if k_norm is None else k_norm
    if normalizer == 'none':
        return kv, None, None
    if normalizer == 'l2vit':
        return kv, kn.sum(-2, keepdim=True), None
    kv = kv / k.shape[-2]
    vbar = v.mean(-2, keepdim=True) if normalizer == 'inline' or normalizer == 'mala' else None
    return kv, kn.mean(-2, keepdim=True), vbar  # kbar, vbar: B, heads, 1, d / dv


def _apply(q: torch.Tensor, kv: torch.Tensor, kbar: Optional[torch.Tensor], vbar: Optional[torch.Tensor],
           q_norm: Optional[torch.Tensor], normalizer: str, scale: float, eps: float, clamp_min: float) -> torch.Tensor:
    qn = q if q_norm is None else q_norm
    if normalizer == 'none':
        return q @ kv
    assert kbar is not None  # given by _sums for every normaliser but 'none' (and a type TorchScript can use)
    # the (N, 1) normalisers are inverted once and multiplied: a division of the (N, dv) output costs more on CPU,
    # and twice more in the backward
    if normalizer == 'flatten':
        return (q @ kv) * (qn @ kbar.transpose(-2, -1) + eps).reciprocal()
    if normalizer == 'l2vit':
        return (q @ kv) * (qn @ kbar.transpose(-2, -1)).clamp(min=clamp_min).reciprocal()
    assert vbar is not None  # given for 'inline' and 'mala'
    z = qn @ (kbar * scale).transpose(-2, -1)  # B, heads, N, 1
    if normalizer == 'inline':
        return q @ (kv * scale) + (1 - z) * vbar
    return (q @ (kv * scale)) * (1 + 1 / (z + eps)) - z * vbar  # mala


def _linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, normalizer: str, scale: float, eps: float,
                      clamp_min: float, q_norm: Optional[torch.Tensor], k_norm: Optional[torch.Tensor]) -> torch.Tensor:
    ct = torch.promote_types(torch.promote_types(q.dtype, v.dtype), torch.float32)
    q, k, v = q.to(ct), k.to(ct), v.to(ct)  # no copy when already fp32
    q_norm = None if q_norm is None else q_norm.to(ct)
    k_norm = None if k_norm is None else k_norm.to(ct)
    kv, kbar, vbar = _sums(k, v, k_norm, normalizer)
    return _apply(q, kv, kbar, vbar, q_norm, normalizer, scale, eps, clamp_min)


def linear_attention_ref(
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
    """Linear attention, reference path. q, q_norm: (B, heads, N, d); k, k_norm: (B, heads, Nk, d);
    v: (B, heads, Nk, dv) -> (B, heads, N, dv) in `out_dtype(v)`.

    Arguments are validated by `zoo.kernels.linear.linear_attention`. Scriptable: scripted code runs without
    autocast, so it computes in fp32 (fp64 for fp64 inputs) and returns v's dtype.
    """
    if not torch.jit.is_scripting():
        device = v.device.type
        if torch.is_autocast_enabled(device):
            dtype = out_dtype(v)
            with torch.autocast(device, enabled=False):
                out = _linear_attention(q, k, v, normalizer, scale, eps, clamp_min, q_norm, k_norm)
            return out.to(dtype)
    return _linear_attention(q, k, v, normalizer, scale, eps, clamp_min, q_norm, k_norm).to(v.dtype)
