"""Generalized neighborhood attention ops (NATTEN semantics): 1-D, 2-D and 3-D, with per-axis kernel size (odd or
even), stride (strided / blocked attention), dilation and causal masking, and an optional relative-position bias.

Every op takes ``(B, *spatial, heads, head_dim)`` tensors and checks its arguments here; the pure-PyTorch
reference (`reference.gna_ref`) runs on CPU, exports and scripts; the Triton kernels run on CUDA (or under
``TRITON_INTERPRET=1``) for every configuration, 1-D, 2-D and 3-D.
"""
from typing import List, Optional, Tuple

import torch

from .._args import BoolOr2, BoolOr3, IntOr2, IntOr3, pair, per_axis, shape_str
from ..backend import resolve_backend
from .reference import DENSE_MAX_TOKENS, gna_ref, gna_tables, neighborhood_attention_ref

__all__ = ['neighborhood_attention', 'neighborhood_attention_1d', 'neighborhood_attention_3d',
           'neighborhood_attention_ref', 'gna_ref', 'gna_tables', 'DENSE_MAX_TOKENS', 'axis_names']



def axis_names(n: int) -> List[str]:
    """Names of the spatial axes of an n-D op, as error messages use them."""
    if n == 1:
        return ['length']
    if n == 2:
        return ['height', 'width']
    return ['depth', 'height', 'width']


def _fmt(values: List[int]) -> str:
    """[3, 3] -> '(3, 3)', as Python writes the tuple, in Python and TorchScript alike."""
    return '(' + ', '.join([str(x) for x in values]) + (',)' if len(values) == 1 else ')')


def _fmt_bools(values: List[bool]) -> str:
    return '(' + ', '.join([str(x) for x in values]) + (',)' if len(values) == 1 else ')')


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: List[int], stride: List[int],
                  dilation: List[int], causal: List[bool], rel_pos_bias: Optional[torch.Tensor], op: str) -> None:
    """NATTEN's argument rules, each failure one ValueError naming the argument, the axis and the value."""
    n = len(kernel)
    layout = 'B, ' + ', '.join(axis_names(n)) + ', heads, head_dim'
    if q.dim() != n + 3:
        raise ValueError(f'q: {op} expects a {n + 3}-D ({layout}) tensor, got {q.dim()}-D {shape_str(q)}')
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f'q, k, v: expected equal shapes ({layout}), got '
                         f'{shape_str(q)}, {shape_str(k)}, {shape_str(v)}')
    sizes = [q.shape[1 + a] for a in range(n)]
    for a in range(n):
        axis = axis_names(n)[a]
        if kernel[a] < 1:
            raise ValueError(f'kernel_size: expected positive sizes, got {_fmt(kernel)} ({axis} kernel {kernel[a]})')
        if stride[a] < 1:
            raise ValueError(f'stride: expected positive strides, got {_fmt(stride)} ({axis} stride {stride[a]})')
        if dilation[a] < 1:
            raise ValueError(f'dilation: expected positive dilations, got {_fmt(dilation)} '
                             f'({axis} dilation {dilation[a]})')
        if stride[a] > kernel[a]:
            raise ValueError(f'stride: must not exceed kernel_size on any axis, got {axis} stride {stride[a]} > '
                             f'kernel {kernel[a]} (stride={_fmt(stride)}, kernel_size={_fmt(kernel)})')
        if kernel[a] * dilation[a] > sizes[a]:
            raise ValueError(
                f'kernel_size * dilation must not exceed the input {axis}: {kernel[a]} * {dilation[a]} = '
                f'{kernel[a] * dilation[a]} > {sizes[a]} (input {" x ".join(axis_names(n))} = '
                f'{" x ".join([str(s) for s in sizes])})')
    if rel_pos_bias is not None:
        for a in range(n):
            if causal[a]:
                raise ValueError(f'rel_pos_bias: not defined with causal attention (NATTEN defines relative-position '
                                 f'bias only without is_causal), got is_causal={_fmt_bools(causal)} '
                                 f'({axis_names(n)[a]} causal)')
        expected = [q.shape[-2]] + [2 * kernel[a] - 1 for a in range(n)]
        if list(rel_pos_bias.shape) != expected:
            table = ', '.join(['2*k' + str(a) + '-1' for a in range(n)])
            raise ValueError(f'rel_pos_bias: expected shape (heads, {table}) = {_fmt(expected)}, '
                             f'got {shape_str(rel_pos_bias)}')


def _gna(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: List[int], stride: List[int],
         dilation: List[int], causal: List[bool], rel_pos_bias: Optional[torch.Tensor], scale: Optional[float],
         backend: Optional[str], op: str) -> torch.Tensor:
    _check_inputs(q, k, v, kernel, stride, dilation, causal, rel_pos_bias, op)
    if not torch.jit.is_scripting():
        if resolve_backend(backend, q, k, v, rel_pos_bias) == 'triton':
            return _neighborhood_attention_triton(q, k, v, kernel, stride, dilation, causal, rel_pos_bias, scale)
    return gna_ref(q, k, v, kernel, stride, dilation, causal, rel_pos_bias, scale)


def _ints(value: IntOr2, name: str) -> List[int]:
    p = pair(value, name)
    return [p[0], p[1]]


def _bools(value: BoolOr2, n: int, name: str) -> List[bool]:
    if isinstance(value, bool):
        return [value] * n
    if torch.jit.is_scripting():
        return [value[0], value[1]]
    return per_axis(value, n, name, bool)


def neighborhood_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kernel_size: IntOr2,
        dilation: IntOr2 = 1,
        rel_pos_bias: Optional[torch.Tensor] = None,
        scale: Optional[float] = None,
        backend: Optional[str] = None,
        stride: IntOr2 = 1,
        is_causal: BoolOr2 = False,
) -> torch.Tensor:
    """2-D generalized neighborhood attention with NATTEN semantics (``natten.functional.na2d``).

    Args:
        q, k, v: (B, H, W, heads, head_dim).
        kernel_size: window size, int or (kh, kw), odd or even (an even kernel has one more key before the centre).
        dilation: int or (dh, dw); kernel_size * dilation must not exceed H (W).
        rel_pos_bias: optional (heads, 2*kh - 1, 2*kw - 1) table indexed by key - query + k - 1 (offsets in the
            dilation group); not defined with a causal axis.
        scale: logit scale applied to q, default head_dim ** -0.5.
        backend: 'torch', 'triton' or 'auto' (see `kernels.backend`).
        stride: int or (sh, sw), at most kernel_size: each tile of `stride` queries shares one window
            (stride == kernel_size is blocked attention).
        is_causal: bool or (bool, bool): causal masking per axis.

    Returns:
        (B, H, W, heads, head_dim).

    Scriptable (`torch.jit.script`): scripted code always runs the reference in its export form, as exports do.
    Pass the arguments after `dilation` by name (they are not keyword-only because TorchScript cannot compile
    keyword-only arguments with defaults).
    """
    return _gna(q, k, v, _ints(kernel_size, 'kernel_size'), _ints(stride, 'stride'), _ints(dilation, 'dilation'),
                _bools(is_causal, 2, 'is_causal'), rel_pos_bias, scale, backend, 'neighborhood_attention')


def neighborhood_attention_1d(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kernel_size: int,
        dilation: int = 1,
        rel_pos_bias: Optional[torch.Tensor] = None,
        scale: Optional[float] = None,
        backend: Optional[str] = None,
        stride: int = 1,
        is_causal: bool = False,
) -> torch.Tensor:
    """1-D generalized neighborhood attention (``natten.functional.na1d``).

    q, k, v: (B, L, heads, head_dim) -> (B, L, heads, head_dim). kernel_size, dilation, stride: ints (or 1-tuples
    in Python); is_causal: bool; rel_pos_bias: (heads, 2*k - 1). Other arguments as `neighborhood_attention`.
    """
    if torch.jit.is_scripting():
        kernel, dil, st, causal = [kernel_size], [dilation], [stride], [is_causal]
    else:
        kernel, dil = per_axis(kernel_size, 1, 'kernel_size'), per_axis(dilation, 1, 'dilation')
        st, causal = per_axis(stride, 1, 'stride'), per_axis(is_causal, 1, 'is_causal', bool)
    return _gna(q, k, v, kernel, st, dil, causal, rel_pos_bias, scale, backend, 'neighborhood_attention_1d')


def _triple(value: IntOr3, name: str) -> List[int]:
    if isinstance(value, int):
        return [value, value, value]
    if torch.jit.is_scripting():
        return [value[0], value[1], value[2]]
    return per_axis(value, 3, name)


def _bools3(value: BoolOr3, name: str) -> List[bool]:
    if isinstance(value, bool):
        return [value, value, value]
    if torch.jit.is_scripting():
        return [value[0], value[1], value[2]]
    return per_axis(value, 3, name, bool)


def neighborhood_attention_3d(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kernel_size: IntOr3,
        dilation: IntOr3 = 1,
        rel_pos_bias: Optional[torch.Tensor] = None,
        scale: Optional[float] = None,
        backend: Optional[str] = None,
        stride: IntOr3 = 1,
        is_causal: BoolOr3 = False,
) -> torch.Tensor:
    """3-D generalized neighborhood attention (``natten.functional.na3d``), e.g. video (T, H, W).

    q, k, v: (B, D, H, W, heads, head_dim) -> (B, D, H, W, heads, head_dim). kernel_size, dilation, stride: int or
    3-tuple; is_causal: bool or 3-tuple (e.g. (True, False, False): causal in time); rel_pos_bias:
    (heads, 2*kd - 1, 2*kh - 1, 2*kw - 1). Other arguments as `neighborhood_attention`.
    """
    return _gna(q, k, v, _triple(kernel_size, 'kernel_size'), _triple(stride, 'stride'),
                _triple(dilation, 'dilation'), _bools3(is_causal, 'is_causal'), rel_pos_bias, scale, backend,
                'neighborhood_attention_3d')


def _neighborhood_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: List[int],
                                   stride: List[int], dilation: List[int], causal: List[bool],
                                   rel_pos_bias: Optional[torch.Tensor], scale: Optional[float]) -> torch.Tensor:
    """The Triton kernel of the op's rank (1-D, 2-D or 3-D); every configuration the reference takes."""
    from .triton import (neighborhood_attention_1d_triton, neighborhood_attention_3d_triton,  # imports triton
                         neighborhood_attention_triton)
    fn = (neighborhood_attention_1d_triton, neighborhood_attention_triton, neighborhood_attention_3d_triton)[
        len(kernel) - 1]
    return fn(q, k, v, tuple(kernel), tuple(stride), tuple(dilation), tuple(causal), rel_pos_bias, scale)
