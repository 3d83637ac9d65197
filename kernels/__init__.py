"""Attention ops: a pure-PyTorch reference per op plus a Triton path, chosen by `kernels.backend`."""
from .backend import get_backend, resolve_backend, set_backend, use_backend
from .window import window_attention

__all__ = ['get_backend', 'resolve_backend', 'set_backend', 'use_backend', 'window_attention']
