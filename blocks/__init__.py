"""Token mixers, conv-stage gates and the one block, built on the `zoo.kernels` ops.

Importing this package registers every mixer and gate (`list_mixers()`, `list_gates()`).
"""
import importlib
import pkgutil

from ._registry import (
    MixerInfo, create_gate, create_mixer, gate_info, list_gates, list_mixers, mixer_info, register_gate,
    register_mixer, resolve_heads,
)
from .block import MixerBlock

for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith('_'):
        importlib.import_module(f'{__name__}.{_m.name}')

__all__ = [
    'MixerBlock', 'MixerInfo', 'create_gate', 'create_mixer', 'gate_info', 'list_gates', 'list_mixers', 'mixer_info',
    'register_gate', 'register_mixer', 'resolve_heads',
]
