"""Agent attention op (Agent Attention, Han et al., ECCV 2024).

No Triton path. The two attentions are (n x N) and (N x n) with n <= 49 agents: about 3 % of Agent-Swin-T's FLOPs
but, computed explicitly, about 30 % of the bytes its forward writes (score-sized tensors and head-major copies).
On CUDA the 'auto' backend computes both with `F.scaled_dot_product_attention` and the shared bias as a broadcast
mask, whose memory-efficient kernel removes that traffic, which is the fusion a custom kernel would give; what a
kernel could add beyond it is small (figures: `python -m zoo.bench.agent --parts analysis`, README). Everywhere
else, and whenever a model is exported, the explicit reference runs (the CPU production path; both ONNX exporters,
any H x W).
"""
from typing import Optional

import torch

from .._args import IntOr2 as _IntOr2
from .._args import pair as _pair
from .._args import shape_str
from ..backend import BACKENDS, get_backend, is_exporting
from .reference import AgentBias, agent_attention_ref, agent_bias_map, agent_pool, bin_matrix

__all__ = ['agent_attention', 'agent_attention_ref', 'AgentBias', 'agent_pool', 'agent_bias_map', 'bin_matrix']


def _check_bias(bias: Optional[AgentBias], name: str, heads: int, n: int) -> None:
    if bias is None:
        return
    if not torch.jit.is_scripting():  # TorchScript's types already say AgentBias
        if not isinstance(bias, AgentBias):
            raise TypeError(f'{name}: expected an AgentBias(table, row, col), got {type(bias).__name__}')
    _check_table(bias.table, name + '.table', '(heads, n, th, tw)', 4, heads, n)
    _check_table(bias.row, name + '.row', '(heads, n, R)', 3, heads, n)
    _check_table(bias.col, name + '.col', '(heads, n, C)', 3, heads, n)


def _check_table(t: Optional[torch.Tensor], name: str, want: str, dims: int, heads: int, n: int) -> None:
    if t is not None and (t.dim() != dims or t.shape[0] != heads or t.shape[1] != n):
        raise ValueError(f'{name}: expected {want} with heads={heads}, n={n} agents, got {shape_str(t)}')


def agent_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        agent_grid: _IntOr2,
        agent_bias: Optional[AgentBias] = None,
        query_bias: Optional[AgentBias] = None,
        scale: Optional[float] = None,
        dropout_p: float = 0.,
        backend: Optional[str] = None,
) -> torch.Tensor:
    """Agent attention over a whole 2-D map: agents pooled from the queries aggregate the keys and values,
    then every query attends to the agents.

    Args:
        q, k, v: (B, H, W, heads, head_dim), any H and W (maps smaller than the agent grid pool overlapping
            bins, as adaptive pooling does).
        agent_grid: agent grid (gh, gw) or its side; n = gh * gw agents.
        agent_bias: B1, biases of the agent -> key logits: tables (heads, n, th, tw) / (heads, n, R) /
            (heads, n, C) resized to the map (see `AgentBias`).
        query_bias: B2, biases of the query -> agent logits, same layout.
        scale: logit scale, default head_dim ** -0.5.
        dropout_p: dropout on both attention maps (pass 0 in eval).
        backend: 'torch' (explicit reference), 'auto' (fused SDPA for CUDA tensors, else the reference) or
            'triton' (no Triton kernel for this op: as 'auto'); default from `kernels.backend`.

    Returns:
        (B, H, W, heads, head_dim).

    Scriptable (`torch.jit.script`): scripted code runs the explicit reference, as exports do, whatever the backend.
    Pass the arguments after `agent_grid` by name (they are not keyword-only because TorchScript cannot compile
    keyword-only arguments with defaults).
    """
    grid = _pair(agent_grid, 'agent_grid')
    if grid[0] < 1 or grid[1] < 1:
        raise ValueError(f'agent_grid: expected positive sizes, got {grid}')
    if q.dim() != 5 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError('q, k, v: expected equal shapes (B, H, W, heads, head_dim), got '
                         + shape_str(q) + ', ' + shape_str(k) + ', ' + shape_str(v))
    if not 0. <= dropout_p < 1.:
        raise ValueError(f'dropout_p: expected 0 <= p < 1, got {dropout_p}')
    heads, n = q.shape[3], grid[0] * grid[1]
    _check_bias(agent_bias, 'agent_bias', heads, n)
    _check_bias(query_bias, 'query_bias', heads, n)
    fused = False
    if not torch.jit.is_scripting():
        fused = _takes_sdpa(backend, q)
    return agent_attention_ref(q, k, v, grid, agent_bias, query_bias, scale, dropout_p, fused)


def _takes_sdpa(backend: Optional[str], q: torch.Tensor) -> bool:
    """Whether an eager call takes the fused SDPA path: a backend other than 'torch', CUDA tensors, no export."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f'backend: expected one of {BACKENDS}, got {backend!r}')
    name = backend if backend is not None else get_backend()
    return name != 'torch' and q.is_cuda and not is_exporting()
