"""Token mixers, conv-stage gates and the one block, built on the `zoo.kernels` ops.

Importing this package registers every mixer and gate (`list_mixers()`, `list_gates()`).
"""
import importlib
import pkgutil

from timm.layers import register_notrace_function

from ._registry import (
    MixerInfo, create_gate, create_mixer, gate_info, list_gates, list_mixers, mixer_info, register_gate,
    register_mixer, resolve_heads,
)
from .block import MixerBlock

for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith('_'):
        importlib.import_module(f'{__name__}.{_m.name}')

# the size-dependent functions the mixers call, FX leaves for timm's tracers (each module also torch.fx.wraps them)
from . import agent, attention, block, linear, multiaxis, neighborhood, outlook, routing, window  # noqa: E402

for _fn in (attention.rope_2d, linear.linear_attention, linear._at_least_fp32, linear.dynamic_dwconv3x3,
            linear.elu_plus_one, multiaxis.size_max,
            window.window_attention, window.tile_global_query, window.pad_to_windows,
            neighborhood.neighborhood_attention, routing.routed_attention, agent.agent_attention,
            outlook.outlook_windows, outlook.outlook_fold, outlook.outlook_pool, block.resize_pos_table):
    register_notrace_function(_fn)

__all__ = [
    'MixerBlock', 'MixerInfo', 'create_gate', 'create_mixer', 'gate_info', 'list_gates', 'list_mixers', 'mixer_info',
    'register_gate', 'register_mixer', 'resolve_heads',
]
