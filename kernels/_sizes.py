"""Arithmetic on runtime sizes that keeps an export dynamic.

While a model is exported, a size read from ``x.shape`` is not always a Python int: torch.export
(the dynamo ONNX exporter) hands out symbolic ints, and TorchScript tracing (the legacy ONNX exporter)
hands out 0-dim tensors. Python branches, ``min`` / ``max``, ``math.ceil`` or ``int()`` on them freeze the
traced size into the graph, and a modulo by or of a symbolic size makes symbolic shapes slow to reason
about (or impossible to lower). These helpers take all three kinds and return the same kind, with no
branch on the value, so one exported graph computes padding, masks and tables for any input size.

They are annotated with `int`, the kind TorchScript (`torch.jit.script`) passes, so scripted models compile
them as they are; the annotation does not restrict what Python passes.
"""
from typing import Union

import torch

__all__ = ['Size', 'ceil_div', 'size_max']

Size = Union[int, torch.SymInt, torch.Tensor]


def ceil_div(size: int, divisor: int) -> int:
    """ceil(size / divisor) for a positive int divisor, without a modulo."""
    return (size + (divisor - 1)) // divisor


def size_max(size: int, floor: int) -> int:
    """max(size, floor) with no Python branch on `size` (a guard or a frozen value while exporting).

    The branches are on the kind of `size`, which TorchScript resolves while compiling (an int there)."""
    if isinstance(size, torch.Tensor):
        return torch.clamp(size, min=floor)
    if isinstance(size, int):
        return max(size, floor)
    return torch.sym_max(size, floor)
