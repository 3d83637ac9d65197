"""Argument checks shared by the ops: int-or-pair sizes, and what the Triton kernels accept."""
from typing import Optional, Sequence, Tuple, Union

import torch

# an int or a pair of ints: Python may pass any sequence of two ints, TorchScript an int or a 2-tuple
IntOr2 = Union[int, Tuple[int, int]]

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def pair(value: IntOr2, name: str) -> Tuple[int, int]:
    """An int or a pair of ints -> (int, int); a clear error naming `name` otherwise."""
    if isinstance(value, int):
        return value, value
    if torch.jit.is_scripting():  # resolved while compiling; TorchScript's types already say (int, int)
        return value
    return _pair_of_sequence(value, name)


def _pair_of_sequence(value: Sequence[int], name: str) -> Tuple[int, int]:
    try:
        result = tuple(int(v) for v in value)
    except TypeError:
        raise TypeError(f'{name}: expected an int or a pair of ints, got {value!r}') from None
    if len(result) != 2:
        raise ValueError(f'{name}: expected an int or a pair of ints, got {value!r}')
    return result


def shape_str(t: torch.Tensor) -> str:
    """`t`'s shape written as Python writes the tuple, '(1, 3, 64, 64)', in Python and in TorchScript alike."""
    dims = [str(n) for n in t.shape]
    return '(' + ', '.join(dims) + (',)' if len(dims) == 1 else ')')


def check_kernel_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """q, k, v share one kernel dtype (fp32/fp16/bf16); q, k, v and the bias table share one device."""
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in KERNEL_DTYPES:
        raise TypeError(f'q, k, v: expected one dtype among float32/float16/bfloat16, got '
                        f'{q.dtype}, {k.dtype}, {v.dtype}')
    if not (q.device == k.device == v.device) or (bias is not None and bias.device != q.device):
        devices = [str(t.device) for t in (q, k, v, bias) if t is not None]
        raise ValueError(f'q, k, v, rel_pos_bias: expected one device, got {devices}')


# an int or a triple of ints (3-D ops); a bool or a tuple of bools (per-axis flags)
IntOr3 = Union[int, Tuple[int, int, int]]
BoolOr2 = Union[bool, Tuple[bool, bool]]
BoolOr3 = Union[bool, Tuple[bool, bool, bool]]


def per_axis(value, n: int, name: str, kind: type = int) -> list:
    """An int (bool) or a sequence of `n` of them -> a list of `n`; a clear error naming `name` otherwise (Python)."""
    what = 'bool' if kind is bool else 'int'
    article = 'a' if kind is bool else 'an'
    if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return [value] * n
    try:
        result = list(value)
    except TypeError:
        result = None
    if result is None or len(result) != n or not all(
            isinstance(v, kind) and (kind is bool or not isinstance(v, bool)) for v in result):
        raise (TypeError if result is None and kind is not bool else ValueError)(
            f'{name}: expected {article} {what} or {n} {what}s (one per spatial axis), got {value!r}')
    return result
