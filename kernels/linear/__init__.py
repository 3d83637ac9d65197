"""Non-causal linear attention op (Efficient Attention, FLatten, InLine, MALA, L2ViT): one numerically safe op with
each method's normaliser, a pure-PyTorch reference (CPU production path, ONNX) and a fused Triton path."""
import math
from typing import Optional

import torch

from .._args import shape_str
from ..backend import get_backend, is_exporting, resolve_backend
from .reference import NORMALIZERS, linear_attention_ref, normalizer_names, out_dtype

MAX_HEAD_DIM = 128  # widest d the Triton kernels take ('auto' runs the reference above it)

__all__ = ['linear_attention', 'linear_attention_ref', 'check_linear_args', 'NORMALIZERS', 'out_dtype']


def check_linear_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, normalizer: str, scale: float, eps: float,
                      clamp_min: float, q_norm: Optional[torch.Tensor], k_norm: Optional[torch.Tensor]) -> None:
    """Clear errors for anything `linear_attention` does not take (see its docstring). Scriptable: TorchScript
    compiles the checks of the arguments and shapes (the numbers' types are already fixed there)."""
    names = normalizer_names()
    if normalizer not in names:
        raise ValueError('normalizer: expected one of (' + ', '.join(["'" + n + "'" for n in names])
                         + "), got '" + normalizer + "'")
    if not torch.jit.is_scripting():  # TorchScript's types already say float
        _check_numbers(scale, eps, clamp_min)
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f'eps: expected a positive finite number, got {eps}')
    if not (math.isfinite(clamp_min) and clamp_min > 0):
        raise ValueError(f'clamp_min: expected a positive finite number, got {clamp_min}')
    if not math.isfinite(scale):
        raise ValueError(f'scale: expected a finite number, got {scale}')
    if normalizer == 'none' and (q_norm is not None or k_norm is not None):
        raise ValueError("q_norm, k_norm: normalizer 'none' has no normaliser to feed them to; pass None")
    if not torch.jit.is_scripting() and is_exporting():
        return  # shapes are symbolic: a comparison would freeze them (they were checked in eager mode)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError('q, k, v: expected 4-D (B, heads, N, d), (B, heads, Nk, d), (B, heads, Nk, dv), got '
                         + shape_str(q) + ', ' + shape_str(k) + ', ' + shape_str(v))
    if k.shape[:2] != q.shape[:2] or v.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3] \
            or v.shape[2] != k.shape[2]:
        raise ValueError('q, k, v: expected q (B, heads, N, d), k (B, heads, Nk, d) and v (B, heads, Nk, dv) with '
                         'one B, heads, d and Nk, got ' + shape_str(q) + ', ' + shape_str(k) + ', ' + shape_str(v))
    if k.shape[2] == 0:
        raise ValueError('k, v: expected at least one key token, got Nk = 0 (k ' + shape_str(k) + ')')
    if q_norm is not None and q_norm.shape != q.shape:
        raise ValueError('q_norm: expected the shape of q, ' + shape_str(q) + ', got ' + shape_str(q_norm))
    if k_norm is not None and k_norm.shape != k.shape:
        raise ValueError('k_norm: expected the shape of k, ' + shape_str(k) + ', got ' + shape_str(k_norm))
    if not torch.jit.is_scripting():
        _check_tensors(q, k, v, q_norm, k_norm)


def _check_numbers(scale: float, eps: float, clamp_min: float) -> None:
    for name, value in (('eps', eps), ('clamp_min', clamp_min), ('scale', scale)):
        if not isinstance(value, (int, float)):
            raise ValueError(f'{name}: expected a {"finite" if name == "scale" else "positive finite"} number, '
                             f'got {value!r}')


def _check_tensors(*tensors: Optional[torch.Tensor]) -> None:
    """One device and floating-point dtypes (Python only: scripted code compiles neither check)."""
    tensors = [t for t in tensors if t is not None]
    if len({t.device for t in tensors}) > 1:
        raise ValueError(f'q, k, v, q_norm, k_norm: expected one device, got {[str(t.device) for t in tensors]}')
    if any(not t.is_floating_point() for t in tensors):
        raise TypeError(f'q, k, v, q_norm, k_norm: expected floating-point tensors, got '
                        f'{[str(t.dtype) for t in tensors]}')


def linear_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
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

    Scriptable (`torch.jit.script`): scripted code always runs the reference, as exports do (without autocast).
    Pass the arguments after `v` by name (they are not keyword-only because TorchScript cannot compile
    keyword-only arguments with defaults).
    """
    check_linear_args(q, k, v, normalizer, scale, eps, clamp_min, q_norm, k_norm)
    if not torch.jit.is_scripting():
        if _use_triton(backend, q, k, v, q_norm, k_norm):
            return _linear_attention_triton(q, k, v, normalizer, float(scale), float(eps), float(clamp_min),
                                            q_norm, k_norm)
    return linear_attention_ref(q, k, v, normalizer, float(scale), float(eps), float(clamp_min), q_norm, k_norm)


def _use_triton(backend: Optional[str], q: torch.Tensor, *others: Optional[torch.Tensor]) -> bool:
    tensors = [t for t in (q, *others) if t is not None]
    path = resolve_backend(backend, *tensors)
    if path == 'triton' and q.shape[-1] > MAX_HEAD_DIM and (backend or get_backend()) == 'auto':
        path = 'torch'  # wider heads than the kernels tile: cuBLAS matmuls in the reference
    return path == 'triton'


def _linear_attention_triton(*args) -> torch.Tensor:
    from .triton import linear_attention_triton  # imports triton: only when the kernel runs
    return linear_attention_triton(*args)
