"""Attention ops: a pure-PyTorch reference per op plus a Triton path, chosen by `kernels.backend`."""
from .agent import agent_attention
from .backend import get_backend, resolve_backend, set_backend, use_backend
from .linear import linear_attention
from .neighborhood import neighborhood_attention, neighborhood_attention_1d, neighborhood_attention_3d
from .routing import routed_attention
from .window import window_attention

__all__ = ['get_backend', 'resolve_backend', 'set_backend', 'use_backend', 'window_attention',
           'neighborhood_attention', 'neighborhood_attention_1d', 'neighborhood_attention_3d', 'agent_attention',
           'routed_attention', 'linear_attention']
