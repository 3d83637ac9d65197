"""Non-causal linear attention op (Efficient Attention, FLatten, InLine, MALA, L2ViT): one numerically safe op with
each method's normaliser, a pure-PyTorch reference (CPU production path, ONNX) and a fused Triton path."""
import math
from typing import Optional

import torch

from ..backend import get_backend, is_exporting, resolve_backend
from .reference import NORMALIZERS, linear_attention_ref, out_dtype

MAX_HEAD_DIM = 128  # widest d the Triton kernels take ('auto' runs the reference above it)

__all__ = ['linear_attention', 'linear_attention_ref', 'check_linear_args', 'NORMALIZERS', 'out_dtype']


def check_linear_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, normalizer: str, scale: float, eps: float,
                      clamp_min: float, q_norm: Optional[torch.Tensor], k_norm: Optional[torch.Tensor]) -> None:
    """Clear errors for anything `linear_attention` does not take (see its docstring)."""
    if normalizer not in NORMALIZERS:
        raise ValueError(f'normalizer: expected one of {NORMALIZERS}, got {normalizer!r}')
    for name, value in (('eps', eps), ('clamp_min', clamp_min)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f'{name}: expected a positive finite number, got {value!r}')
    if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f'scale: expected a finite number, got {scale!r}')
    if normalizer == 'none' and (q_norm is not None or k_norm is not None):
        raise ValueError("q_norm, k_norm: normalizer 'none' has no normaliser to feed them to; pass None")
    if is_exporting():
        return  # shapes are symbolic: a comparison would freeze them (they were checked in eager mode)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f'q, k, v: expected 4-D (B, heads, N, d), (B, heads, Nk, d), (B, heads, Nk, dv), got '
                         f'{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}')
    if k.shape[:2] != q.shape[:2] or v.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3] \
            or v.shape[2] != k.shape[2]:
        raise ValueError(f'q, k, v: expected q (B, heads, N, d), k (B, heads, Nk, d) and v (B, heads, Nk, dv) with '
                         f'one B, heads, d and Nk, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}')
    if k.shape[2] == 0:
        raise ValueError(f'k, v: expected at least one key token, got Nk = 0 (k {tuple(k.shape)})')
    for name, t, like in (('q_norm', q_norm, q), ('k_norm', k_norm, k)):
        if t is not None and t.shape != like.shape:
            raise ValueError(f'{name}: expected the shape of {name[0]}, {tuple(like.shape)}, got {tuple(t.shape)}')
    tensors = [t for t in (q, k, v, q_norm, k_norm) if t is not None]
    if len({t.device for t in tensors}) > 1:
        raise ValueError(f'q, k, v, q_norm, k_norm: expected one device, got {[str(t.device) for t in tensors]}')
    if any(not t.is_floating_point() for t in tensors):
        raise TypeError(f'q, k, v, q_norm, k_norm: expected floating-point tensors, got '
                        f'{[str(t.dtype) for t in tensors]}')


def linear_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        normalizer: str,
        scale: float = 1.0,
        eps: float = 1e-6,
        clamp_min: float = 100.0,
        q_norm: Optional[torch.Tensor] = None,
        k_norm: Optional[torch.Tensor] = None,
        backend: Optional[str] = None,
) -> torch.Tensor:
    """Non-causal linear attention ``O = phi(Q) (phi(K)^T V)`` with one method's normaliser.

    With ``S = (1/Nk) sum_j k_j^T v_j``, ``kbar = (1/Nk) sum_j k~_j``, ``vbar = (1/Nk) sum_j v_j``,
    ``q~ = q_norm or q``, ``k~ = k_norm or k``:

    * ``'none'`` (Efficient Attention): ``O = Nk (q S)``
    * ``'flatten'`` (FLatten): ``O = (q S) / (q~ . kbar + eps)``
    * ``'inline'`` (InLine): ``O = scale (q S) + (1 - scale q~ . kbar) vbar``
    * ``'mala'`` (MALA): ``z = scale q~ . kbar``; ``O = scale (q S) (1 + 1 / (z + eps)) - z vbar``
    * ``'l2vit'`` (L2ViT): ``O = Nk (q S) / max(Nk q~ . kbar, clamp_min)`` (its per-head temperature scales O
      linearly: the mixer applies it)

    Args:
        q: (B, heads, N, d) query features, after the feature map (and any rotation).
        k: (B, heads, Nk, d) key features; Nk may differ from N (keys from a reduced map), usually Nk = N.
        v: (B, heads, Nk, dv) values.
        normalizer: one of 'none', 'flatten', 'inline', 'mala', 'l2vit'.
        scale: InLine's / MALA's scale (head_dim ** -0.5 in the official code); unused by the others.
        eps: added to the FLatten / MALA denominators (> 0).
        clamp_min: L2ViT's denominator floor (> 0).
        q_norm, k_norm: features that feed the normaliser instead of q / k (shapes of q / k); MALA computes its
            normaliser before RoPE and the numerator after.
        backend: 'torch', 'triton' or 'auto' (see `kernels.backend`); export always takes the reference, and
            'auto' takes it for d > 128 (the widest head the kernels tile; dv may be any).

    Returns:
        (B, heads, N, dv) in v's dtype (under autocast: the autocast dtype); every sum over tokens and the
        normaliser are computed in fp32 whatever the input dtype.
    """
    check_linear_args(q, k, v, normalizer, scale, eps, clamp_min, q_norm, k_norm)
    tensors = [t for t in (q, k, v, q_norm, k_norm) if t is not None]
    path = resolve_backend(backend, *tensors)
    if path == 'triton' and q.shape[-1] > MAX_HEAD_DIM and (backend or get_backend()) == 'auto':
        path = 'torch'  # wider heads than the kernels tile: cuBLAS matmuls in the reference
    if path == 'triton':
        from .triton import linear_attention_triton
        return linear_attention_triton(q, k, v, normalizer, float(scale), float(eps), float(clamp_min),
                                       q_norm, k_norm)
    return linear_attention_ref(q, k, v, normalizer, float(scale), float(eps), float(clamp_min), q_norm, k_norm)
