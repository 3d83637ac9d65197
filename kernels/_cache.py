"""One cache for the index / mask tables that ops build per input size."""
import functools
from typing import Callable, TypeVar

import torch

__all__ = ['size_cache']

F = TypeVar('F', bound=Callable)


def size_cache(maxsize: int) -> Callable[[F], F]:
    """`functools.lru_cache` for a table builder whose arguments are sizes (ints, tuples, dtypes, devices).

    The table is built outside inference mode (a table built under ``torch.inference_mode`` is an inference
    tensor, and a later call with autograd at the same size could not save it for backward) and outside any
    TorchScript trace (the legacy ONNX exporter then sees a constant, not a traced computation).
    """
    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def build(*args):
            state = torch._C._get_tracing_state()
            with torch.inference_mode(False):
                if state is None:
                    return fn(*args)
                torch._C._set_tracing_state(None)
                try:
                    return fn(*args)
                finally:
                    torch._C._set_tracing_state(state)
        return functools.lru_cache(maxsize=maxsize)(build)  # type: ignore[return-value]
    return decorate
