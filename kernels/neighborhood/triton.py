"""Neighborhood attention in Triton: fused forward and backward, same semantics as `reference.py`.

One program per (query tile, batch * head). Dilation is handled by token permutation done purely
in index arithmetic: the map splits into ``dh * dw`` dilation sub-grids, each cut into tiles of
``TQH x TQW`` sub-grid positions, and a program maps its tile back to map rows ``g + d * p``. The
program loads the tile's queries and the halo of keys covering all their clamped windows,
``(TQH + kh - 1) x (TQW + kw - 1)`` sub-grid positions starting at the first query's window start
(window starts are non-decreasing), straight from the strided ``(B, H, W, heads, d)`` tensors.
The neighbor mask (clamped windows of ragged sub-grids) is computed from coordinates, the
relative-position bias is loaded from the ``(heads, 2kh - 1, 2kw - 1)`` table by index arithmetic,
and the softmax is single-pass in fp32 (all keys of the tile are resident). The forward stores O
and the log-sum-exp.

The backward recomputes P from the LSE per query tile and writes dQ directly (tiles partition
the queries). Halos of neighboring tiles overlap, so dK and dV are accumulated with fp32
``tl.atomic_add`` into fp32 buffers, and dRPB with fp32 atomics into a per-program partial table
that is summed afterwards (less contention than one shared table). The order of those fp32 atomic
additions varies between runs, so dK, dV and dRPB are not bitwise deterministic.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._args import check_kernel_tensors

__all__ = ['neighborhood_attention_triton', 'tile_shape']


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # the interpreter cannot multiply bf16 tiles, so it gets fp32 operands
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _tile_coords(
        tile, H, W, DH, DW, n_tr, n_tc,
        KH: tl.constexpr, KW: tl.constexpr, TQH: tl.constexpr, TQW: tl.constexpr,
        HALO_W: tl.constexpr, HALO_N: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Sub-grid coordinates of a tile's queries and halo keys, their map rows/cols and validity."""
    tc = tile % n_tc
    rest = tile // n_tc
    tr = rest % n_tr
    rest = rest // n_tr
    gc = rest % DW
    gr = rest // DW
    len_r = (H - gr + DH - 1) // DH  # this sub-grid's length (ragged groups are one shorter)
    len_c = (W - gc + DW - 1) // DW

    qi = tl.arange(0, BLOCK_Q)
    pr = tr * TQH + qi // TQW
    pc = tc * TQW + qi % TQW
    q_ok = (qi < TQH * TQW) & (pr < len_r) & (pc < len_c)

    ki = tl.arange(0, BLOCK_K)
    sr = tl.minimum(tl.maximum(tr * TQH - KH // 2, 0), len_r - KH) + ki // HALO_W
    sc = tl.minimum(tl.maximum(tc * TQW - KW // 2, 0), len_c - KW) + ki % HALO_W
    k_ok = (ki < HALO_N) & (sr < len_r) & (sc < len_c)

    start_r = tl.minimum(tl.maximum(pr - KH // 2, 0), len_r - KH)
    start_c = tl.minimum(tl.maximum(pc - KW // 2, 0), len_c - KW)
    nbr = ((sr[None, :] >= start_r[:, None]) & (sr[None, :] < start_r[:, None] + KH)
           & (sc[None, :] >= start_c[:, None]) & (sc[None, :] < start_c[:, None] + KW)
           & q_ok[:, None] & k_ok[None, :])
    # rpb index of each (query, key) pair, 0 off-neighborhood
    rel = tl.where(nbr, (sr[None, :] - pr[:, None] + KH - 1) * (2 * KW - 1) + (sc[None, :] - pc[:, None] + KW - 1), 0)
    q_row = tl.where(q_ok, gr + DH * pr, 0)
    q_col = tl.where(q_ok, gc + DW * pc, 0)
    k_row = tl.where(k_ok, gr + DH * sr, 0)
    k_col = tl.where(k_ok, gc + DW * sc, 0)
    return q_row, q_col, q_ok, k_row, k_col, k_ok, nbr, rel


@triton.jit
def _offsets(b, head, y, x, ok, sb, sy, sx, sh, sd, D, BLOCK_D: tl.constexpr):
    """Element offsets (BLOCK, BLOCK_D) and mask of tokens (y, x) in a strided (B, H, W, heads, d) tensor."""
    d = tl.arange(0, BLOCK_D)
    row = b.to(tl.int64) * sb + head.to(tl.int64) * sh + y.to(tl.int64) * sy + x.to(tl.int64) * sx
    return row[:, None] + d[None, :].to(tl.int64) * sd, ok[:, None] & (d[None, :] < D)


@triton.jit
def _logits(q, k, nbr, rel, rpb_ptr, head, scale, NB: tl.constexpr, HAS_RPB: tl.constexpr,
            PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 (q k^T) * scale + rpb, -inf off the neighborhood."""
    s = _dot(q, tl.trans(k), PRECISION, UPCAST) * scale
    if HAS_RPB:
        s += tl.load(rpb_ptr + head * NB + rel, mask=nbr, other=0.0).to(tl.float32)
    return tl.where(nbr, s, float('-inf'))


@triton.jit
def _na_fwd_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, rpb_ptr,
        sqb, sqy, sqx, sqh, sqd,
        skb, sky, skx, skh, skd,
        svb, svy, svx, svh, svd,
        sob, soy, sox, soh, sod,
        heads, H, W, D, DH, DW, n_tr, n_tc, scale,
        KH: tl.constexpr, KW: tl.constexpr, TQH: tl.constexpr, TQW: tl.constexpr,
        HALO_W: tl.constexpr, HALO_N: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr, HAS_RPB: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    head = bh % heads
    q_row, q_col, q_ok, k_row, k_col, k_ok, nbr, rel = _tile_coords(
        tile, H, W, DH, DW, n_tr, n_tc, KH, KW, TQH, TQW, HALO_W, HALO_N, BLOCK_Q, BLOCK_K)

    offs, mask = _offsets(b, head, q_row, q_col, q_ok, sqb, sqy, sqx, sqh, sqd, D, BLOCK_D)
    q = tl.load(q_ptr + offs, mask=mask, other=0.0)
    offs, mask = _offsets(b, head, k_row, k_col, k_ok, skb, sky, skx, skh, skd, D, BLOCK_D)
    k = tl.load(k_ptr + offs, mask=mask, other=0.0)
    offs, mask = _offsets(b, head, k_row, k_col, k_ok, svb, svy, svx, svh, svd, D, BLOCK_D)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)

    s = _logits(q, k, nbr, rel, rpb_ptr, head, scale, (2 * KH - 1) * (2 * KW - 1), HAS_RPB, PRECISION, UPCAST)
    m = tl.max(s, axis=1)
    m = tl.where(q_ok, m, 0.0)  # padding queries have no neighbor: keep them finite, never stored
    p = tl.exp(s - m[:, None])
    denom = tl.sum(p, axis=1)
    denom = tl.where(q_ok, denom, 1.0)
    o = _dot((p / denom[:, None]).to(v.dtype), v, PRECISION, UPCAST)

    offs, mask = _offsets(b, head, q_row, q_col, q_ok, sob, soy, sox, soh, sod, D, BLOCK_D)
    tl.store(o_ptr + offs, o.to(o_ptr.dtype.element_ty), mask=mask)
    # lse is a contiguous fp32 (B * heads, H, W) buffer
    tl.store(lse_ptr + bh.to(tl.int64) * H * W + q_row * W + q_col, m + tl.log(denom), mask=q_ok)


@triton.jit
def _na_bwd_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, rpb_ptr, dq_ptr, dk_ptr, dv_ptr, drpb_ptr,
        sqb, sqy, sqx, sqh, sqd,
        skb, sky, skx, skh, skd,
        svb, svy, svx, svh, svd,
        sob, soy, sox, soh, sod,
        sdob, sdoy, sdox, sdoh, sdod,
        sgb, sgy, sgx, sgh, sgd,
        heads, H, W, D, DH, DW, n_tr, n_tc, scale,
        KH: tl.constexpr, KW: tl.constexpr, TQH: tl.constexpr, TQW: tl.constexpr,
        HALO_W: tl.constexpr, HALO_N: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr, HAS_RPB: tl.constexpr, NEED_DRPB: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # dq, dk, dv share the strides sg* (dk, dv: fp32 accumulators; dq: output dtype)
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    head = bh % heads
    NB: tl.constexpr = (2 * KH - 1) * (2 * KW - 1)
    q_row, q_col, q_ok, k_row, k_col, k_ok, nbr, rel = _tile_coords(
        tile, H, W, DH, DW, n_tr, n_tc, KH, KW, TQH, TQW, HALO_W, HALO_N, BLOCK_Q, BLOCK_K)

    offs, q_mask = _offsets(b, head, q_row, q_col, q_ok, sqb, sqy, sqx, sqh, sqd, D, BLOCK_D)
    q = tl.load(q_ptr + offs, mask=q_mask, other=0.0)
    offs, mask = _offsets(b, head, q_row, q_col, q_ok, sob, soy, sox, soh, sod, D, BLOCK_D)
    o = tl.load(o_ptr + offs, mask=mask, other=0.0)
    offs, mask = _offsets(b, head, q_row, q_col, q_ok, sdob, sdoy, sdox, sdoh, sdod, D, BLOCK_D)
    do = tl.load(do_ptr + offs, mask=mask, other=0.0)
    offs, mask = _offsets(b, head, k_row, k_col, k_ok, skb, sky, skx, skh, skd, D, BLOCK_D)
    k = tl.load(k_ptr + offs, mask=mask, other=0.0)
    offs, mask = _offsets(b, head, k_row, k_col, k_ok, svb, svy, svx, svh, svd, D, BLOCK_D)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * H * W + q_row * W + q_col, mask=q_ok, other=0.0)

    s = _logits(q, k, nbr, rel, rpb_ptr, head, scale, NB, HAS_RPB, PRECISION, UPCAST)
    p = tl.exp(s - lse[:, None])  # exactly 0 off the neighborhood and for padding queries
    dv = _dot(tl.trans(p.to(do.dtype)), do, PRECISION, UPCAST)
    dp = _dot(do, tl.trans(v), PRECISION, UPCAST)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    ds = p * (dp - delta[:, None])  # d logits (before the scale)
    dq = _dot(ds.to(k.dtype), k, PRECISION, UPCAST) * scale
    dk = _dot(tl.trans(ds.to(q.dtype)), q, PRECISION, UPCAST) * scale

    offs, mask = _offsets(b, head, q_row, q_col, q_ok, sgb, sgy, sgx, sgh, sgd, D, BLOCK_D)
    tl.store(dq_ptr + offs, dq.to(dq_ptr.dtype.element_ty), mask=mask)
    offs, mask = _offsets(b, head, k_row, k_col, k_ok, sgb, sgy, sgx, sgh, sgd, D, BLOCK_D)
    tl.atomic_add(dk_ptr + offs, dk, mask=mask)
    tl.atomic_add(dv_ptr + offs, dv, mask=mask)
    if NEED_DRPB:
        # drpb is a contiguous fp32 (tiles, B * heads, NB) buffer of per-program partials
        part = (tile.to(tl.int64) * tl.num_programs(1) + bh) * NB
        tl.atomic_add(drpb_ptr + part + rel, ds, mask=nbr)


def tile_shape(kernel: Tuple[int, int], sub_size: Tuple[int, int]) -> Tuple[int, int]:
    """Query tile (TQH, TQW) in sub-grid positions: 8 x 8 for kernels up to 9 (halo <= 256 keys), 4 x 4 above,
    shrunk to the sub-grid size."""
    side = 8 if max(kernel) <= 9 else 4
    return min(side, sub_size[0]), min(side, sub_size[1])


def _config(q: torch.Tensor, kernel, dilation, tile) -> dict:
    B, H, W, nh, d = q.shape
    sub = (-(-H // dilation[0]), -(-W // dilation[1]))
    tqh, tqw = tile if tile is not None else tile_shape(kernel, sub)
    n_tr, n_tc = -(-sub[0] // tqh), -(-sub[1] // tqw)
    halo_h, halo_w = tqh + kernel[0] - 1, tqw + kernel[1] - 1
    block_k = max(16, triton.next_power_of_2(halo_h * halo_w))
    if q.dtype == torch.float32:
        precision = 'ieee' if torch.get_float32_matmul_precision() == 'highest' else 'tf32'
    else:
        precision = 'ieee'  # unused for 16-bit inputs
    return dict(
        n_tr=n_tr, n_tc=n_tc, n_tiles=dilation[0] * dilation[1] * n_tr * n_tc,
        meta=dict(KH=kernel[0], KW=kernel[1], TQH=tqh, TQW=tqw, HALO_W=halo_w, HALO_N=halo_h * halo_w,
                  BLOCK_Q=max(16, triton.next_power_of_2(tqh * tqw)), BLOCK_K=block_k,
                  BLOCK_D=max(16, triton.next_power_of_2(d)), PRECISION=precision,
                  UPCAST=q.dtype == torch.bfloat16 and not q.is_cuda, num_warps=4 if block_k <= 128 else 8))


class _NeighborhoodAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, rpb, kernel, dilation, scale, tile):
        B, H, W, nh, d = q.shape
        cfg = _config(q, kernel, dilation, tile)
        out = torch.empty((B, H, W, nh, d), dtype=q.dtype, device=q.device)
        lse = torch.empty((B * nh, H, W), dtype=torch.float32, device=q.device)
        has_rpb = rpb is not None
        rpb_arg = rpb.contiguous() if has_rpb else q  # never read without HAS_RPB
        _na_fwd_kernel[(cfg['n_tiles'], B * nh)](
            q, k, v, out, lse, rpb_arg,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            nh, H, W, d, dilation[0], dilation[1], cfg['n_tr'], cfg['n_tc'], float(scale),
            HAS_RPB=has_rpb, **cfg['meta'])
        ctx.save_for_backward(q, k, v, out, lse, rpb_arg if has_rpb else None)
        ctx.kernel, ctx.dilation, ctx.scale, ctx.tile = kernel, dilation, scale, tile
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, rpb = ctx.saved_tensors
        B, H, W, nh, d = q.shape
        kernel, dilation = ctx.kernel, ctx.dilation
        cfg = _config(q, kernel, dilation, ctx.tile)
        if grad_out.dtype != q.dtype:
            grad_out = grad_out.to(q.dtype)
        dq = torch.empty((B, H, W, nh, d), dtype=q.dtype, device=q.device)
        dk = torch.zeros((B, H, W, nh, d), dtype=torch.float32, device=q.device)
        dv = torch.zeros_like(dk)
        has_rpb = rpb is not None
        need_drpb = has_rpb and ctx.needs_input_grad[3]
        nb = (2 * kernel[0] - 1) * (2 * kernel[1] - 1)
        drpb = (torch.zeros((cfg['n_tiles'], B * nh, nb), dtype=torch.float32, device=q.device) if need_drpb
                else torch.empty(1, dtype=torch.float32, device=q.device))
        _na_bwd_kernel[(cfg['n_tiles'], B * nh)](
            q, k, v, out, grad_out, lse, rpb if has_rpb else q, dq, dk, dv, drpb,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *grad_out.stride(), *dk.stride(),
            nh, H, W, d, dilation[0], dilation[1], cfg['n_tr'], cfg['n_tc'], float(ctx.scale),
            HAS_RPB=has_rpb, NEED_DRPB=need_drpb, **cfg['meta'])
        drpb_out = None
        if need_drpb:
            drpb_out = drpb.view(cfg['n_tiles'], B, nh, nb).sum((0, 1)).view(rpb.shape).to(rpb.dtype)
        return dq, dk.to(k.dtype), dv.to(v.dtype), drpb_out, None, None, None, None


def neighborhood_attention_triton(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kernel_size: Tuple[int, int],
        dilation: Tuple[int, int] = (1, 1),
        rel_pos_bias: Optional[torch.Tensor] = None,
        scale: Optional[float] = None,
        tile: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    """2-D neighborhood attention, Triton path. q, k, v: (B, H, W, heads, d) -> (B, H, W, heads, d).

    Arguments as `neighborhood_attention_ref` (validated by `kernels.neighborhood.neighborhood_attention`);
    q, k, v may be non-contiguous views. `tile` overrides the query tile (sub-grid positions), for tests.
    CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1``.
    """
    check_kernel_tensors(q, k, v, rel_pos_bias)
    kernel = (int(kernel_size[0]), int(kernel_size[1]))
    dilation = (int(dilation[0]), int(dilation[1]))
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if q.numel() == 0:
        return q.new_empty(q.shape)
    return _NeighborhoodAttention.apply(q, k, v, rel_pos_bias, kernel, dilation, scale, tile)
