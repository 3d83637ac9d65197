"""Bi-level routing attention (BiFormer) in pure PyTorch: the ground truth and the CPU / ONNX path.

Semantics (official `ops/bra_legacy.py`, kv_downsample_mode='identity', no routing params, hard routing):
  * the (H, W) map is split into n_win x n_win regions of (H / n_win) x (W / n_win) tokens (H and W must be
    multiples of n_win: the mixer pads, this op does not);
  * region routing: per image, the region means of q and k over all heads' channels (detached), logits
    ``(q_r * scale) @ k_r^T`` of shape (B, S^2, S^2), and the indices of the top-k key regions per query region;
  * token attention: each query attends, per head, to the tokens of its region's top-k regions,
    ``softmax((q * scale) k_sel^T) v_sel``;
  * top-k = -1 or -2 is plain global attention (BiFormer's last stage, where the map is one region grid cell).

The official code gathers a top-k-times copy of K/V out of a broadcast view, whose backward allocates a gradient
the size of S^2 copies of K/V (the slow "gather backward"). Here the map is permuted to region-major order once,
the routed regions are read with `index_select` over a flat (batch * heads * regions) axis (backward: one
`index_add` into a K/V-sized gradient), and attention runs as batched 4-D fused SDPA (manual softmax while
exporting). In training, an autograd Function saves only q, k, v and the routing and recomputes the routed K/V
and the probabilities in its backward. Maps whose (H W) x (H W) routing mask is no larger than one head's routed
K/V (`use_dense`: BiFormer's third stage at 224-448 px) run as one dense masked SDPA with no gather at all.
Memory: the routed K/V once (transiently), never S^2 copies, and N x N only below that bound.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .._cache import size_cache
from ..backend import is_exporting

__all__ = ['routed_attention_ref', 'region_routing', 'to_regions', 'from_regions', 'default_scale', 'use_dense',
           'GLOBAL_TOPK', 'is_global']

GLOBAL_TOPK = (-1, -2)  # official: -1 plain attention, -2 attention + LePE (the mixer's concern); both global here


def is_global(topk: int) -> bool:
    """topk in GLOBAL_TOPK, as a function: TorchScript reads no global tuples."""
    return topk == -1 or topk == -2


def default_scale(q: torch.Tensor, topk: int) -> float:
    """The official logit scale: (heads * head_dim) ** -0.5 (the full qk_dim) when routing, head_dim ** -0.5
    for global attention. q: (B, H, W, heads, head_dim)."""
    if is_global(topk):
        return q.shape[-1] ** -0.5
    return (q.shape[-2] * q.shape[-1]) ** -0.5


def to_regions(t: torch.Tensor, n_win: int) -> torch.Tensor:
    """(B, H, W, heads, d) -> (B, heads, n_win^2, wh * ww, d) contiguous, regions in raster order."""
    B, H, W, nh, d = t.shape
    wh, ww = H // n_win, W // n_win
    t = t.reshape(B, n_win, wh, n_win, ww, nh, d).permute(0, 5, 1, 3, 2, 4, 6)
    return t.reshape(B, nh, n_win * n_win, wh * ww, d).contiguous()


def from_regions(t: torch.Tensor, n_win: int, hw: Tuple[int, int]) -> torch.Tensor:
    """Inverse of `to_regions`: (B, heads, n_win^2, wh * ww, d) -> (B, H, W, heads, d)."""
    B, nh, _, _, d = t.shape
    H, W = hw
    wh, ww = H // n_win, W // n_win
    t = t.reshape(B, nh, n_win, n_win, wh, ww, d).permute(0, 2, 4, 3, 5, 1, 6)
    return t.reshape(B, H, W, nh, d)


def region_routing(q: torch.Tensor, k: torch.Tensor, n_win: int, topk: int, scale: float) -> torch.Tensor:
    """Top-k key regions of every query region: (B, n_win^2, topk) int64, from detached region means.

    q, k: (B, H, W, heads, d), H and W multiples of n_win. The means run over each region's tokens and every
    head's channels together, as in the official code (one routing for all heads).
    """
    B, H, W = q.shape[:3]
    wh, ww = H // n_win, W // n_win
    with torch.no_grad():
        q_r = q.detach().reshape(B, n_win, wh, n_win, ww, -1).mean((2, 4)).reshape(B, n_win * n_win, -1)
        k_r = k.detach().reshape(B, n_win, wh, n_win, ww, -1).mean((2, 4)).reshape(B, n_win * n_win, -1)
        logits = (q_r * scale) @ k_r.transpose(-2, -1)
        return torch.topk(logits, k=topk, dim=-1)[1]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax((q * scale) k^T + mask) v over the last two dims of 4-D tensors (fused on CPU/GPU, manual while
    exporting: ONNX lowers only 4-D SDPA under dynamo and nothing fused under the TorchScript exporter)."""
    if is_exporting():
        attn = (q * scale) @ k.transpose(-2, -1)
        if mask is not None:
            attn = attn + mask
        return attn.softmax(dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _flat_index(idx: torch.Tensor, heads: int, regions: int) -> torch.Tensor:
    """Rows of a flat (B * heads * regions) axis for `idx` (B, regions, topk): (B * heads * regions * topk,)."""
    B = idx.shape[0]
    base = torch.arange(B * heads, device=idx.device).view(B, heads, 1, 1) * regions
    return (base + idx.view(B, 1, regions, -1)).reshape(-1)


def use_dense(tokens: int, topk: int, dk: int, dv: int) -> bool:
    """Dense masked attention (fused SDPA with a routing mask) instead of gathering, when the (H W) x (H W) mask
    is no larger than one head's routed K/V: tokens <= topk * (dk + dv) (BiFormer's third stage at 224-448 px).
    So memory never exceeds the routed K/V size, and small maps skip the gather entirely."""
    return tokens <= topk * (dk + dv)


@size_cache(64)
def _token_regions(H: int, W: int, n_win: int, device: torch.device) -> torch.Tensor:
    rows = torch.arange(H, device=device) // (H // n_win)
    cols = torch.arange(W, device=device) // (W // n_win)
    return (rows[:, None] * n_win + cols[None, :]).reshape(-1)


def _dense_masked(q, k, v, idx, n_win: int, scale: float) -> torch.Tensor:
    """Routed attention as dense attention over all tokens with an additive mask (-inf outside the routed
    regions), in raster order: no region permutation, no gather. (B, H, W, heads, d) in and out."""
    B, H, W, nh, _ = q.shape
    p2 = n_win * n_win
    regions = _token_regions(H, W, n_win, q.device)
    routed = torch.zeros(B, p2, p2, dtype=torch.bool, device=q.device).scatter_(2, idx, True)
    visible = routed[:, regions][:, :, regions]  # B, N, N: key j visible to query i
    mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, float('-inf'))
    qf, kf, vf = (t.reshape(B, H * W, nh, t.shape[-1]).transpose(1, 2) for t in (q, k, v))
    out = _attend(qf, kf, vf, scale, mask[:, None])
    return out.transpose(1, 2).reshape(B, H, W, nh, -1)


def _routed_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, n_win: int,
                    scale: float) -> torch.Tensor:
    B, H, W, nh, dk = q.shape
    dv = v.shape[-1]
    p2, w2, topk = n_win * n_win, (H // n_win) * (W // n_win), idx.shape[-1]
    qr, kr, vr = to_regions(q, n_win), to_regions(k, n_win), to_regions(v, n_win)  # B, heads, p2, w2, d
    rows = _flat_index(idx, nh, p2)
    k_sel = kr.reshape(B * nh * p2, w2 * dk).index_select(0, rows).view(B * nh, p2, topk * w2, dk)
    v_sel = vr.reshape(B * nh * p2, w2 * dv).index_select(0, rows).view(B * nh, p2, topk * w2, dv)
    out = _attend(qr.reshape(B * nh, p2, w2, dk), k_sel, v_sel, scale)  # B * heads, p2, w2, dv
    return from_regions(out.view(B, nh, p2, w2, dv), n_win, (H, W))


class _RoutedAttention(torch.autograd.Function):
    """Training path: saves only q, k, v (views of the mixer's qkv output, alive anyway) and the routing; the
    backward re-gathers the routed K/V, recomputes the probabilities and scatters dK / dV with one `index_add`
    each. No routed copy, score matrix or output is held between forward and backward."""

    @staticmethod
    def forward(ctx, q, k, v, idx, n_win, scale):
        ctx.save_for_backward(q, k, v, idx)
        ctx.n_win, ctx.scale = n_win, scale
        return _routed_forward(q, k, v, idx, n_win, scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, idx = ctx.saved_tensors
        n_win, scale = ctx.n_win, ctx.scale
        B, H, W, nh, dk = q.shape
        dv = v.shape[-1]
        p2, w2, topk = n_win * n_win, (H // n_win) * (W // n_win), idx.shape[-1]
        rows = _flat_index(idx, nh, p2)
        qr = to_regions(q, n_win).view(B * nh, p2, w2, dk)
        kr = to_regions(k, n_win).view(B * nh * p2, w2 * dk)
        vr = to_regions(v, n_win).view(B * nh * p2, w2 * dv)
        k_sel = kr.index_select(0, rows).view(B * nh, p2, topk * w2, dk)
        v_sel = vr.index_select(0, rows).view(B * nh, p2, topk * w2, dv)
        g = to_regions(grad_out.to(q.dtype), n_win).view(B * nh, p2, w2, dv)
        p = ((qr * scale) @ k_sel.transpose(-2, -1)).softmax(dim=-1)  # B * heads, p2, w2, topk * w2
        grad_v = p.transpose(-2, -1) @ g
        ds = g @ v_sel.transpose(-2, -1)  # dP
        ds -= (p * ds).sum(-1, keepdim=True)  # rowsum(P * dP) = rowsum(dO * O): O is not needed
        ds *= p
        grad_q = (ds @ k_sel).mul_(scale) if ctx.needs_input_grad[0] else None
        grad_k = None
        if ctx.needs_input_grad[1]:
            grad_k = torch.zeros_like(kr).index_add_(0, rows, (ds.transpose(-2, -1) @ qr).mul_(scale).view(-1, w2 * dk))
        grad_v = torch.zeros_like(vr).index_add_(0, rows, grad_v.view(-1, w2 * dv)) if ctx.needs_input_grad[2] else None
        back = lambda t, d: None if t is None else from_regions(t.view(B, nh, p2, w2, d), n_win, (H, W))  # noqa: E731
        return back(grad_q, dk), back(grad_k, dk), back(grad_v, dv), None, None, None


def routed_attention_ref(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        n_win: int,
        topk: int,
        scale: Optional[float] = None,
        idx: Optional[torch.Tensor] = None,
        impl: Optional[str] = None,
) -> torch.Tensor:
    """Bi-level routing attention. q, k: (B, H, W, heads, dk); v: (B, H, W, heads, dv) -> (B, H, W, heads, dv).

    `idx` (B, n_win^2, topk) overrides the routing (computed by `region_routing` when None). `impl`: 'gather'
    (region-major index_select + batched attention; the training path saves only q, k, v), 'dense' (masked
    attention over all tokens) or None: dense when `use_dense` says so, except while exporting.
    Arguments are validated by `zoo.kernels.routing.routed_attention`. Scriptable: scripted code runs the export
    form (the gather path without the autograd Function; `impl` is not used there).
    """
    B, H, W, nh, dk = q.shape
    dv = v.shape[-1]
    logit_scale = default_scale(q, topk) if scale is None else scale
    if is_global(topk):
        qf = q.reshape(B, H * W, nh, q.shape[-1]).transpose(1, 2)
        kf = k.reshape(B, H * W, nh, k.shape[-1]).transpose(1, 2)
        vf = v.reshape(B, H * W, nh, v.shape[-1]).transpose(1, 2)
        out = _attend(qf, kf, vf, logit_scale)  # B, heads, N, dv
        return out.transpose(1, 2).reshape(B, H, W, nh, dv)
    if idx is None:
        idx = region_routing(q, k, n_win, topk, logit_scale)
    if impl is not None and impl != 'gather' and impl != 'dense':
        raise ValueError(f"impl: expected None, 'gather' or 'dense', got '{impl}'")
    if not torch.jit.is_scripting():
        if impl == 'dense' or (impl is None and not is_exporting() and use_dense(H * W, idx.shape[-1], dk, dv)):
            return _dense_masked(q, k, v, idx, n_win, logit_scale)
        if torch.is_grad_enabled() and not is_exporting() and any(t.requires_grad for t in (q, k, v)):
            return _RoutedAttention.apply(q, k, v, idx, n_win, logit_scale)
    return _routed_forward(q, k, v, idx, n_win, logit_scale)
