"""Choose between the pure-PyTorch reference and the Triton path of an op.

Precedence: the ``backend=`` argument of an op, then `use_backend` / `set_backend`, then the
``ZOO_KERNEL_BACKEND`` environment variable (``torch``, ``triton`` or ``auto``), then ``auto``.

``auto`` takes Triton when every tensor is on CUDA in fp32/fp16/bf16, Triton imports, and nothing is
being exported, scripted, traced or compiled; otherwise the reference. ``triton`` forces the kernel, which on CPU
tensors needs ``TRITON_INTERPRET=1`` (the interpreter). Export always takes the reference.
"""
import contextlib
import functools
import os
from typing import Iterator, Optional

import torch

from ._args import KERNEL_DTYPES

__all__ = ['BACKENDS', 'ENV_VAR', 'get_backend', 'set_backend', 'use_backend', 'resolve_backend', 'is_exporting',
           'is_fx_tracing']

BACKENDS = ('auto', 'torch', 'triton')
ENV_VAR = 'ZOO_KERNEL_BACKEND'

_override: Optional[str] = None


def _check(name: str, where: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f'{where}: expected one of {BACKENDS}, got {name!r}')
    return name


def get_backend() -> str:
    """The backend in force when an op gets none: override, then environment, then 'auto'."""
    if _override is not None:
        return _override
    env = os.environ.get(ENV_VAR)
    return _check(env, f'environment variable {ENV_VAR}') if env else 'auto'


def set_backend(name: Optional[str]) -> None:
    """Set the process-wide backend (None clears the override)."""
    global _override
    _override = None if name is None else _check(name, 'set_backend')


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager form of `set_backend`."""
    global _override
    prev, _override = _override, _check(name, 'use_backend')
    try:
        yield
    finally:
        _override = prev


def is_fx_tracing() -> bool:
    """True while torch.fx symbolically traces (timm's feature_cls='fx', torchvision's create_feature_extractor).

    Scriptable: TorchScript compiles it to `False`."""
    if torch.jit.is_scripting():
        return False
    return torch.fx._symbolic_trace.is_fx_symbolic_tracing()


def is_exporting() -> bool:
    """True while torch.onnx / torch.export / TorchScript / torch.fx (symbolic tracing) or torch.compile is
    capturing: size-dependent code then takes its branch-free form, one graph for any input size.

    Scriptable: TorchScript compiles it to `True` (the rest is never compiled)."""
    if torch.jit.is_scripting():
        return True
    return torch.jit.is_tracing() or is_fx_tracing() or torch.onnx.is_in_onnx_export() or _compiler_capturing()


def _compiler_capturing() -> bool:
    compiler = getattr(torch, 'compiler', None)
    if compiler is not None:
        if getattr(compiler, 'is_exporting', lambda: False)() or compiler.is_compiling():
            return True
    return False


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def interpreter_on() -> bool:
    return os.environ.get('TRITON_INTERPRET', '0') == '1'


def resolve_backend(backend: Optional[str], *tensors: Optional[torch.Tensor]) -> str:
    """Return 'torch' or 'triton' for an op call on `tensors` (None entries, optional tensors not given, are skipped).

    Eager only: a scriptable op calls it behind `not torch.jit.is_scripting()` (scripted code runs the reference)."""
    tensors = [t for t in tensors if t is not None]
    name = _check(backend, 'backend') if backend is not None else get_backend()
    if name == 'torch' or is_exporting():
        return 'torch'
    on_cuda = all(t.is_cuda for t in tensors)
    if name == 'auto':
        kernel_dtypes = all(t.dtype in KERNEL_DTYPES for t in tensors)
        return 'triton' if on_cuda and kernel_dtypes and triton_available() else 'torch'
    if not triton_available():
        raise RuntimeError('backend "triton" was requested but triton does not import')
    if not on_cuda and not interpreter_on():
        raise RuntimeError(
            'backend "triton" needs CUDA tensors, or TRITON_INTERPRET=1 (set before importing triton) '
            f'to run the kernel in the interpreter; got tensors on {sorted({str(t.device) for t in tensors})}')
    return 'triton'
