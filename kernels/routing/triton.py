"""Routed block-sparse attention in Triton (BiFormer's token attention): forward and backward.

Same semantics as `reference.py` for routed top-k (the routing indices come from `region_routing` in PyTorch:
tiny (B, S^2, S^2) matrices). No gathered copies: each forward program owns one query region of one
(batch, head); it computes the map address of its tokens from the region index (no region permutation copy),
loops over the region's top-k routed key regions, loads each one's K/V tile straight from the strided
un-gathered (B, H, W, heads, d) tensors, and runs an online softmax with fp32 accumulators. It stores O and the
per-token log-sum-exp.

The backward recomputes P from the LSE. dQ is accumulated in the same pattern; dK and dV are scattered to the
routed regions with fp32 `tl.atomic_add` (a key region receives from a variable number of query regions), then
cast to the input dtype. Regions hold wh * ww tokens, padded to a power of two >= 16 for `tl.dot`; padded key
columns are -inf (every real row keeps finite logits) and padded rows are masked out of loads, stores and
atomics.

Global attention (top-k -1 / -2, BiFormer's last stage) is not routed: the op sends it to the fused SDPA path.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl

from .._args import check_kernel_tensors

__all__ = ['routed_attention_triton']


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # the interpreter multiplies bf16 tiles as raw integers: give it fp32 operands
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _region_tokens(r, n_win, WH, WW, BLOCK: tl.constexpr):
    """Map row / col of the tokens of region r (raster order inside the region) and which are real."""
    t = tl.arange(0, BLOCK)
    ok = t < WH * WW
    y = tl.where(ok, (r // n_win) * WH + t // WW, 0)
    x = tl.where(ok, (r % n_win) * WW + t % WW, 0)
    return y, x, ok


@triton.jit
def _tile(b, head, y, x, ok, sb, sy, sx, sh, sd, D, BLOCK_D: tl.constexpr):
    """Element offsets (BLOCK, BLOCK_D) and mask of tokens (y, x) in a strided (B, H, W, heads, d) tensor."""
    d = tl.arange(0, BLOCK_D)
    row = b.to(tl.int64) * sb + head.to(tl.int64) * sh + y.to(tl.int64) * sy + x.to(tl.int64) * sx
    return row[:, None] + d[None, :].to(tl.int64) * sd, ok[:, None] & (d[None, :] < D)


@triton.jit
def _routed_fwd_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, idx_ptr,
        sqb, sqy, sqx, sqh, sqd,
        skb, sky, skx, skh, skd,
        svb, svy, svx, svh, svd,
        sob, soy, sox, soh, sod,
        slb, sly, slx, slh,
        sib, sir, sij,
        heads, n_win, WH, WW, DK, DV, TOPK, scale,
        BLOCK: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)  # one flat axis over (batch, head, query region)
    p2 = n_win * n_win
    r = pid % p2
    bh = pid // p2
    b = bh // heads
    head = bh % heads
    y, x, ok = _region_tokens(r, n_win, WH, WW, BLOCK)
    offs, mask = _tile(b, head, y, x, ok, sqb, sqy, sqx, sqh, sqd, DK, BLOCK_DK)
    q = tl.load(q_ptr + offs, mask=mask, other=0.0)
    qs = (q.to(tl.float32) * scale).to(q.dtype)

    m_i = tl.full([BLOCK], float('-inf'), dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_DV], dtype=tl.float32)
    for j in range(TOPK):
        s_reg = tl.load(idx_ptr + b.to(tl.int64) * sib + r * sir + j * sij)
        ky, kx, kok = _region_tokens(s_reg, n_win, WH, WW, BLOCK)
        offs, mask = _tile(b, head, ky, kx, kok, skb, sky, skx, skh, skd, DK, BLOCK_DK)
        k = tl.load(k_ptr + offs, mask=mask, other=0.0)
        offs, mask = _tile(b, head, ky, kx, kok, svb, svy, svx, svh, svd, DV, BLOCK_DV)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        s = _dot(qs, tl.trans(k), PRECISION, UPCAST)
        s = tl.where(kok[None, :], s, float('-inf'))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every region has >= 1 real key
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new
    out = acc / l_i[:, None]
    offs, mask = _tile(b, head, y, x, ok, sob, soy, sox, soh, sod, DV, BLOCK_DV)
    tl.store(o_ptr + offs, out.to(o_ptr.dtype.element_ty), mask=mask)
    lse_offs = b.to(tl.int64) * slb + head.to(tl.int64) * slh + y.to(tl.int64) * sly + x.to(tl.int64) * slx
    tl.store(lse_ptr + lse_offs, m_i + tl.log(l_i), mask=ok)


@triton.jit
def _routed_bwd_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, idx_ptr, dq_ptr, dk_ptr, dv_ptr,
        sqb, sqy, sqx, sqh, sqd,
        skb, sky, skx, skh, skd,
        svb, svy, svx, svh, svd,
        sdb, sdy, sdx, sdh, sdd,
        slb, sly, slx, slh,
        sib, sir, sij,
        sgqb, sgqy, sgqx, sgqh, sgqd,
        sgkb, sgky, sgkx, sgkh, sgkd,
        sgvb, sgvy, sgvx, sgvh, sgvd,
        heads, n_win, WH, WW, DK, DV, TOPK, scale,
        BLOCK: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # dq has strides sgq*; dk / dv are fp32 (B, H, W, heads, d) accumulators with strides sgk* / sgv*
    pid = tl.program_id(0)
    p2 = n_win * n_win
    r = pid % p2
    bh = pid // p2
    b = bh // heads
    head = bh % heads
    y, x, ok = _region_tokens(r, n_win, WH, WW, BLOCK)
    offs, mask = _tile(b, head, y, x, ok, sqb, sqy, sqx, sqh, sqd, DK, BLOCK_DK)
    q = tl.load(q_ptr + offs, mask=mask, other=0.0)
    qs = (q.to(tl.float32) * scale).to(q.dtype)
    offs, mask = _tile(b, head, y, x, ok, sdb, sdy, sdx, sdh, sdd, DV, BLOCK_DV)
    do = tl.load(do_ptr + offs, mask=mask, other=0.0)
    row = b.to(tl.int64) * slb + head.to(tl.int64) * slh + y.to(tl.int64) * sly + x.to(tl.int64) * slx
    lse = tl.load(lse_ptr + row, mask=ok, other=0.0)
    delta = tl.load(delta_ptr + row, mask=ok, other=0.0)

    dq = tl.zeros([BLOCK, BLOCK_DK], dtype=tl.float32)
    for j in range(TOPK):
        s_reg = tl.load(idx_ptr + b.to(tl.int64) * sib + r * sir + j * sij)
        ky, kx, kok = _region_tokens(s_reg, n_win, WH, WW, BLOCK)
        offs, mask = _tile(b, head, ky, kx, kok, skb, sky, skx, skh, skd, DK, BLOCK_DK)
        k = tl.load(k_ptr + offs, mask=mask, other=0.0)
        offs, mask = _tile(b, head, ky, kx, kok, svb, svy, svx, svh, svd, DV, BLOCK_DV)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        s = _dot(qs, tl.trans(k), PRECISION, UPCAST)
        p = tl.exp(s - lse[:, None])
        p = tl.where(ok[:, None] & kok[None, :], p, 0.0)
        dv = _dot(tl.trans(p.to(do.dtype)), do, PRECISION, UPCAST)
        dp = _dot(do, tl.trans(v), PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PRECISION, UPCAST)
        dk = _dot(tl.trans(ds.to(qs.dtype)), qs, PRECISION, UPCAST)
        offs, mask = _tile(b, head, ky, kx, kok, sgkb, sgky, sgkx, sgkh, sgkd, DK, BLOCK_DK)
        tl.atomic_add(dk_ptr + offs, dk, mask=mask)
        offs, mask = _tile(b, head, ky, kx, kok, sgvb, sgvy, sgvx, sgvh, sgvd, DV, BLOCK_DV)
        tl.atomic_add(dv_ptr + offs, dv, mask=mask)
    offs, mask = _tile(b, head, y, x, ok, sgqb, sgqy, sgqx, sgqh, sgqd, DK, BLOCK_DK)
    tl.store(dq_ptr + offs, (dq * scale).to(dq_ptr.dtype.element_ty), mask=mask)


def _config(q: torch.Tensor, v: torch.Tensor, n_win: int) -> dict:
    B, H, W, nh, dk = q.shape
    wh, ww = H // n_win, W // n_win
    block = max(16, triton.next_power_of_2(wh * ww))
    if q.dtype == torch.float32:
        precision = 'ieee' if torch.get_float32_matmul_precision() == 'highest' else 'tf32'
    else:
        precision = 'ieee'  # unused for 16-bit inputs
    return dict(wh=wh, ww=ww, block=block, block_dk=max(16, triton.next_power_of_2(dk)),
                block_dv=max(16, triton.next_power_of_2(v.shape[-1])), precision=precision,
                upcast=q.dtype == torch.bfloat16 and not q.is_cuda, num_warps=4 if block <= 64 else 8,
                grid=(B * nh * n_win * n_win,))


def _st(t: torch.Tensor) -> Tuple[int, ...]:
    return tuple(t.stride())


class _RoutedAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, idx, n_win, scale):
        B, H, W, nh, _ = q.shape
        cfg = _config(q, v, n_win)
        out = torch.empty((B, H, W, nh, v.shape[-1]), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, H, W, nh), dtype=torch.float32, device=q.device)
        _routed_fwd_kernel[cfg['grid']](
            q, k, v, out, lse, idx,
            *_st(q), *_st(k), *_st(v), *_st(out), *_st(lse), *_st(idx),
            nh, n_win, cfg['wh'], cfg['ww'], q.shape[-1], v.shape[-1], idx.shape[-1], float(scale),
            BLOCK=cfg['block'], BLOCK_DK=cfg['block_dk'], BLOCK_DV=cfg['block_dv'],
            PRECISION=cfg['precision'], UPCAST=cfg['upcast'], num_warps=cfg['num_warps'],
        )
        ctx.save_for_backward(q, k, v, out, lse, idx)
        ctx.n_win, ctx.scale = n_win, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, idx = ctx.saved_tensors
        n_win, scale = ctx.n_win, ctx.scale
        cfg = _config(q, v, n_win)
        grad_out = grad_out.to(q.dtype)
        delta = (grad_out.float() * out.float()).sum(-1).contiguous()  # (B, H, W, heads) like lse: dO . O
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        _routed_bwd_kernel[cfg['grid']](
            q, k, v, grad_out, lse, delta, idx, dq, dk, dv,
            *_st(q), *_st(k), *_st(v), *_st(grad_out), *_st(lse), *_st(idx), *_st(dq), *_st(dk), *_st(dv),
            q.shape[3], n_win, cfg['wh'], cfg['ww'], q.shape[-1], v.shape[-1], idx.shape[-1], float(scale),
            BLOCK=cfg['block'], BLOCK_DK=cfg['block_dk'], BLOCK_DV=cfg['block_dv'],
            PRECISION=cfg['precision'], UPCAST=cfg['upcast'], num_warps=cfg['num_warps'],
        )
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None


def routed_attention_triton(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        n_win: int,
        idx: torch.Tensor,
        scale: float,
) -> torch.Tensor:
    """Routed token attention, Triton path. q, k: (B, H, W, heads, dk); v: (B, H, W, heads, dv);
    idx: (B, n_win^2, topk) routed key regions -> (B, H, W, heads, dv).

    Arguments are validated by `zoo.kernels.routing.routed_attention`; q, k, v may be strided views (e.g. slices
    of one qkv projection). CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1``.
    """
    check_kernel_tensors(q, k, v, None)
    if q.numel() == 0:
        return q.new_empty((*q.shape[:4], v.shape[-1]))
    idx = idx.to(device=q.device, dtype=torch.int32)
    return _RoutedAttention.apply(q, k, v, idx, int(n_win), float(scale))
