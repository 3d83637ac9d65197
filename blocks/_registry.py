"""The mixer registry: any stage of any backbone can take any token mixer by name."""
from typing import Callable, Dict, List

import torch.nn as nn

__all__ = ['register_mixer', 'create_mixer', 'list_mixers']

_MIXERS: Dict[str, Callable[..., nn.Module]] = {}


def register_mixer(name: str) -> Callable:
    """Decorator: register a mixer class or factory `fn(dim, num_heads=..., **kw) -> nn.Module`."""
    def _register(fn: Callable) -> Callable:
        if name in _MIXERS and _MIXERS[name] is not fn:
            raise ValueError(f'mixer {name!r} is already registered to {_MIXERS[name]!r}')
        _MIXERS[name] = fn
        return fn
    return _register


def list_mixers() -> List[str]:
    return sorted(_MIXERS)


def create_mixer(name: str, dim: int, **kwargs) -> nn.Module:
    """Build a registered mixer. Attention mixers map (B, H, W, dim) -> (B, H, W, dim)."""
    if name not in _MIXERS:
        raise KeyError(f'unknown mixer {name!r}; expected one of {list_mixers()}')
    return _MIXERS[name](dim, **kwargs)
