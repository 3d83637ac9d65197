"""Agent attention in pure PyTorch: the ground truth and the CPU / ONNX path.

`Agent Attention: On the Integration of Softmax and Linear Attention` (Han et al., ECCV 2024).
Tensors are channels-last with heads split out: ``(B, H, W, heads, head_dim)``; N = H * W, n = gh * gw agents.

Semantics, for any H and W:
  * agents ``A = pool(Q)``: adaptive average pooling of the query map to a ``gh x gw`` grid (bin i of an axis
    of length L spans ``[floor(i L / g), ceil((i + 1) L / g))``, as ``nn.AdaptiveAvgPool2d``), done with two
    bin-averaging matrices so that non-divisible bins (56 -> 3) export with both ONNX exporters;
  * aggregation ``V_A = softmax(A K^T * scale + B1) V``: (B, heads, n, d);
  * broadcast ``O = softmax(Q A^T * scale + B2) V_A``: (B, heads, N, d);
  * ``fused=True`` computes each attention with ``F.scaled_dot_product_attention`` and the shared bias as a
    broadcast float mask (on CUDA its memory-efficient kernel never materialises the scores, bias gradient
    included); the default is the explicit softmax, which both ONNX exporters take;
  * each bias is built from three optional tables, resized to the map and shared by the batch (never copied
    per batch item): ``table (heads, n, th, tw)`` bilinearly resized to (H, W), plus ``row (heads, n, R)`` and
    ``col (heads, n, C)`` linearly resized to H and W. Resizing the row and column tables separately equals
    the official detection code's bilinear resize of their sum (bilinear weights factor per axis), and at the
    tables' own size the resize is the identity, which is the classification code's case.

Sizes are annotated `int`, what eager code and TorchScript pass; the legacy ONNX exporter passes 0-d tensors
(traced sizes), which the same code takes. TorchScript compiles the explicit path with tables built in the graph
(the cached bin matrices and the fused SDPA path sit behind ``not torch.jit.is_scripting()``).
"""
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from .._cache import size_cache

__all__ = ['AgentBias', 'agent_attention_ref', 'agent_pool', 'agent_bias_map', 'bin_matrix']


class AgentBias(NamedTuple):
    """Position bias between agents and tokens; any of the three may be None.

    table: (heads, n, th, tw), bilinearly resized to the map.
    row: (heads, n, R), linearly resized to the map height.
    col: (heads, n, C), linearly resized to the map width.
    """
    table: Optional[torch.Tensor] = None
    row: Optional[torch.Tensor] = None
    col: Optional[torch.Tensor] = None


def _build_bin_matrix(size: int, bins: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    i = torch.arange(bins, device=device)
    start = torch.div(i * size, bins, rounding_mode='floor')
    end = torch.div((i + 1) * size + bins - 1, bins, rounding_mode='floor')
    pos = torch.arange(size, device=device)
    inside = (pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])
    return inside.to(dtype) / (end - start)[:, None].to(dtype)


_cached_bin_matrix = size_cache(256)(_build_bin_matrix)


def bin_matrix(size: int, bins: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(bins, size) matrix whose row i averages adaptive-pooling bin i of an axis of `size`; cached per size
    (built in the graph while a traced size, 0-d tensor, comes in, under torch.compile, and in scripted code)."""
    if not torch.jit.is_scripting():
        if isinstance(size, int) and not torch.compiler.is_compiling():
            return _cached_bin_matrix(size, bins, dtype, device)
    return _build_bin_matrix(size, bins, dtype, device)


def agent_pool(x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """Adaptive average pooling of a channels-last map: (B, H, W, *rest) -> (B, gh, gw, *rest)."""
    B, H, W = x.shape[0], x.shape[1], x.shape[2]
    ph = bin_matrix(H, grid[0], x.dtype, x.device)
    pw = bin_matrix(W, grid[1], x.dtype, x.device)
    y = x.reshape(B, H, W, -1).permute(0, 3, 1, 2)  # B, C, H, W
    y = ph @ y @ pw.transpose(0, 1)  # B, C, gh, gw
    return y.permute(0, 2, 3, 1).reshape([B, grid[0], grid[1]] + list(x.shape[3:]))


def agent_bias_map(bias: AgentBias, H: int, W: int) -> Optional[torch.Tensor]:
    """The bias of every (agent, token) pair at map size H x W: (heads, n, H * W), or None without tables."""
    table, row, col = bias.table, bias.row, bias.col
    out: Optional[torch.Tensor] = None
    if table is not None:
        out = F.interpolate(table, size=(H, W), mode='bilinear', align_corners=False).flatten(2)
    line: Optional[torch.Tensor] = None
    if row is not None:
        line = F.interpolate(row, size=H, mode='linear', align_corners=False)[..., :, None]
    if col is not None:
        col = F.interpolate(col, size=W, mode='linear', align_corners=False)[..., None, :]
        line = col if line is None else line + col
    if line is not None:
        # a no-op unless only one of row / col is given
        line = line.expand(line.shape[0], line.shape[1], H, W).flatten(2)
        out = line if out is None else out + line
    return out


def _sdpa_mask(bias: Optional[torch.Tensor], rows: int, cols: int, B: int, nh: int,
               dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The fused path's attention mask: the shared bias (heads, rows, cols) as a batch-broadcast (B, heads, rows, cols)
    view whose row stride is padded to 16, so the memory-efficient kernel takes it as is."""
    if bias is None:
        return None
    pad = -cols % 16
    bias = F.pad(bias.to(dtype), (0, pad))[..., :cols] if pad else bias.to(dtype).contiguous()
    return bias[None].expand(B, nh, rows, cols)


def agent_attention_ref(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        grid: Tuple[int, int],
        agent_bias: Optional[AgentBias] = None,
        query_bias: Optional[AgentBias] = None,
        scale: Optional[float] = None,
        dropout_p: float = 0.,
        fused: bool = False,
) -> torch.Tensor:
    """Agent attention. q, k, v: (B, H, W, heads, d) -> (B, H, W, heads, d).

    `agent_bias` is added to the agent -> key logits (B1), `query_bias` to the query -> agent logits (B2, given in
    the same (heads, n, ...) layout); `dropout_p` drops attention probabilities of both softmaxes; `fused` takes
    `F.scaled_dot_product_attention` for both attentions.
    """
    B, H, W, nh, d = q.shape
    logit_scale = d ** -0.5 if scale is None else scale
    n = grid[0] * grid[1]
    agents = agent_pool(q, grid).reshape(B, n, nh, d).transpose(1, 2)  # B, heads, n, d
    qh, kh, vh = [t.reshape(B, H * W, nh, d).transpose(1, 2) for t in [q, k, v]]  # B, heads, N, d
    b1 = agent_bias_map(agent_bias, H, W) if agent_bias is not None else None
    b2 = agent_bias_map(query_bias, H, W) if query_bias is not None else None
    if fused:
        mask1 = _sdpa_mask(b1, n, H * W, B, nh, q.dtype)
        mask2 = _sdpa_mask(None if b2 is None else b2.transpose(-2, -1), H * W, n, B, nh, q.dtype)
        agent_v = F.scaled_dot_product_attention(agents, kh, vh, attn_mask=mask1, dropout_p=dropout_p,
                                                 scale=logit_scale)
        out = F.scaled_dot_product_attention(qh, agents, agent_v, attn_mask=mask2, dropout_p=dropout_p,
                                             scale=logit_scale)
        return out.transpose(1, 2).reshape(B, H, W, nh, d)

    # fp32 softmax for 16-bit inputs; fp32 / fp64 keep their own precision
    acc: Optional[torch.dtype] = torch.float32 if q.element_size() < 4 else None
    attn = (agents * logit_scale) @ kh.transpose(-2, -1)  # B, heads, n, N
    if b1 is not None:
        attn = attn + b1.to(attn.dtype)
    attn = attn.softmax(dim=-1, dtype=acc).to(vh.dtype)
    if dropout_p != 0.:
        attn = F.dropout(attn, dropout_p)
    agent_v = attn @ vh  # B, heads, n, d

    attn = qh @ (agents * logit_scale).transpose(-2, -1)  # B, heads, N, n; scaling the n agents, not the N queries
    if b2 is not None:
        attn = attn + b2.transpose(-2, -1).to(attn.dtype)
    attn = attn.softmax(dim=-1, dtype=acc).to(vh.dtype)
    if dropout_p != 0.:
        attn = F.dropout(attn, dropout_p)
    out = attn @ agent_v  # B, heads, N, d
    return out.transpose(1, 2).reshape(B, H, W, nh, d)
