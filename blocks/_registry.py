"""The mixer and gate registries: any stage of any backbone takes any token mixer (or conv gate) by name.

Mixer contract (checked for every registered mixer by tests/blocks/test_mixers.py)::

    create_mixer(name, dim, *, num_heads=None, head_dim=None, qkv_bias=True, attn_drop=0., proj_drop=0.,
                 **family_kwargs)  ->  module: (B, H, W, dim) -> (B, H, W, dim) for any H, W

Heads come from one resolver (`resolve_heads`); a mixer owns its parameter init and names its
no-weight-decay parameters in `no_weight_decay_keys`. Gates (CBAM, SE, ECA) are conv-stage modules,
(B, C, H, W) -> (B, C, H, W), built by `create_gate(name, channels, **kwargs)`.
"""
import inspect
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from zoo.kernels._args import shape_str

__all__ = [
    'MixerInfo', 'register_mixer', 'create_mixer', 'list_mixers', 'mixer_info',
    'register_gate', 'create_gate', 'list_gates', 'gate_info', 'resolve_heads', 'check_input', 'shape_str',
    'DEFAULT_HEAD_DIM',
]

DEFAULT_HEAD_DIM = 32


@dataclass(frozen=True)
class MixerInfo:
    """What a registered mixer or gate is: its paper, cost in tokens N, and which paths it has."""
    name: str
    fn: Callable[..., nn.Module]
    paper: str
    cost: str
    triton: bool
    onnx_dynamic: bool
    torchscript: bool
    spatial_dims: int = 2  # 2: (B, H, W, C) in and out (the shared contract); 3: (B, T, H, W, C)

    def family_params(self) -> List[inspect.Parameter]:
        """The family arguments (those of the shared contract left out), in signature order."""
        shared = {'self', 'dim', 'channels', 'num_heads', 'head_dim', 'qkv_bias', 'attn_drop', 'proj_drop', 'device',
                  'dtype'}
        params = inspect.signature(self.fn).parameters.values()
        return [p for p in params if p.name not in shared and p.kind is p.POSITIONAL_OR_KEYWORD]

    @property
    def arguments(self) -> str:
        """The family arguments with their defaults."""
        return ', '.join(p.name if p.default is inspect.Parameter.empty else f'{p.name}={p.default!r}'
                         for p in self.family_params())


_MIXERS: Dict[str, MixerInfo] = {}
_GATES: Dict[str, MixerInfo] = {}


def _register(table: Dict[str, MixerInfo], kind: str, name: str, **info) -> Callable:
    def _add(fn: Callable) -> Callable:
        other = _MIXERS.get(name) or _GATES.get(name)
        if other is not None and other.fn is not fn:
            raise ValueError(f'{kind} {name!r} is already registered to {other.fn!r}')
        table[name] = MixerInfo(name=name, fn=fn, **info)
        return fn
    return _add


def register_mixer(name: str, *, paper: str, cost: str, triton: bool = False, onnx_dynamic: bool = True,
                   torchscript: bool = False, spatial_dims: int = 2) -> Callable:
    """Decorator: register a channels-last token mixer class or factory under `name`.

    `paper` cites the method, `cost` is its time in tokens N (e.g. 'O(N k^2)'), `triton` says whether a
    Triton path exists, `onnx_dynamic` whether one ONNX export runs at any H x W, `torchscript` whether
    `torch.jit.script` compiles it (otherwise scripting a module that holds one fails at once, naming it);
    `spatial_dims` 3 marks a video-shaped (B, T, H, W, C) mixer, left out of the 2-D listing.
    """
    return _register(_MIXERS, 'mixer', name, paper=paper, cost=cost, triton=triton, onnx_dynamic=onnx_dynamic,
                     torchscript=torchscript, spatial_dims=spatial_dims)


def register_gate(name: str, *, paper: str, cost: str = 'O(N)') -> Callable:
    """Decorator: register a conv-stage gate `fn(channels, **kwargs)`, (B, C, H, W) -> (B, C, H, W)."""
    return _register(_GATES, 'gate', name, paper=paper, cost=cost, triton=False, onnx_dynamic=True, torchscript=True)


def list_mixers(spatial_dims: Optional[int] = 2) -> List[str]:
    """Names of the registered token mixers over `spatial_dims` axes (2: the (B, H, W, C) ones; None: all)."""
    return sorted(n for n, info in _MIXERS.items() if spatial_dims is None or info.spatial_dims == spatial_dims)


def list_gates() -> List[str]:
    """Names of the registered conv-stage gates."""
    return sorted(_GATES)


def mixer_info(name: str) -> MixerInfo:
    if name not in _MIXERS:
        hint = f' ({name!r} is a gate for conv stages: use create_gate)' if name in _GATES else ''
        raise KeyError(f'unknown mixer {name!r}{hint}; expected one of {list_mixers(None)}')
    return _MIXERS[name]


def gate_info(name: str) -> MixerInfo:
    if name not in _GATES:
        hint = f' ({name!r} is a token mixer: use create_mixer)' if name in _MIXERS else ''
        raise KeyError(f'unknown gate {name!r}{hint}; expected one of {list_gates()}')
    return _GATES[name]


def create_mixer(
        name: str,
        dim: int,
        *,
        num_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.,
        proj_drop: float = 0.,
        **family_kwargs,
) -> nn.Module:
    """Build the registered mixer `name`: (B, H, W, dim) -> (B, H, W, dim)."""
    info = mixer_info(name)
    module = info.fn(dim, num_heads=num_heads, head_dim=head_dim, qkv_bias=qkv_bias, attn_drop=attn_drop,
                     proj_drop=proj_drop, **family_kwargs)
    if not info.torchscript:
        # torch.jit.script calls this on every submodule before compiling anything
        module.__prepare_scriptable__ = partial(_refuse_script, name)
    return module


def _refuse_script(name: str) -> nn.Module:
    raise RuntimeError(
        f'torch.jit.script: the {name!r} mixer does not support TorchScript (its op dispatches between the Triton '
        f'kernel and a reference path with per-size cached tables at call time; TorchScript is deprecated in torch '
        f'2.x). Use FX (timm.create_model(..., features_only=True, feature_cls=\'fx\') or torchvision\'s '
        f'create_feature_extractor), torch.export, or `zoo export` (ONNX). Mixers that script: '
        f'{[n for n in list_mixers() if _MIXERS[n].torchscript]}')


def create_gate(name: str, channels: int, **kwargs) -> nn.Module:
    """Build the registered gate `name`: (B, channels, H, W) -> (B, channels, H, W)."""
    return gate_info(name).fn(channels, **kwargs)


def resolve_heads(
        dim: int,
        num_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        default_head_dim: int = DEFAULT_HEAD_DIM,
) -> Tuple[int, int]:
    """(num_heads, head_dim) of an attention mixer over `dim` channels.

    Given one of the two, the other is dim divided by it (it must divide dim); given both, the attention
    width num_heads * head_dim may differ from dim; given neither, head_dim is `default_head_dim`.
    """
    for arg, value in (('num_heads', num_heads), ('head_dim', head_dim)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f'{arg}: expected a positive int, got {value!r}')
    if num_heads is not None and head_dim is not None:
        return num_heads, head_dim
    if num_heads is not None:
        if dim % num_heads:
            raise ValueError(f'num_heads: expected a divisor of dim={dim}, got {num_heads}')
        return num_heads, dim // num_heads
    head_dim = head_dim or default_head_dim
    if dim % head_dim:
        raise ValueError(f'head_dim: expected a divisor of dim={dim}, got {head_dim}'
                         f'{" (the default)" if head_dim == default_head_dim else ""}; pass num_heads or head_dim')
    return dim // head_dim, head_dim


def check_input(x: torch.Tensor, dim: int, who: str, channels_last: bool = True) -> None:
    """Raise a clear ValueError unless x is (B, H, W, dim) (or (B, dim, H, W)); skipped while tracing."""
    if not torch.jit.is_scripting():
        if torch.jit.is_tracing() or isinstance(x, torch.fx.Proxy):
            return
    if x.dim() != 4 or x.shape[-1 if channels_last else 1] != dim:
        want = f'(B, H, W, {dim})' if channels_last else f'(B, {dim}, H, W)'
        raise ValueError(f'{who}: expected input {want}, got {shape_str(x)}')

