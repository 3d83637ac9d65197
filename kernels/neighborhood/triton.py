"""Generalized neighborhood attention in Triton: fused forward and backward, NATTEN 0.21.7 semantics.

One kernel serves 1-D, 2-D and 3-D: missing leading axes have length 1 (kernel 1, stride 1).
Per axis (length n, kernel k, stride s, dilation d, causal or not), a query at map position i belongs to
dilation group g = i mod d at sub-grid position p = i div d (group length L = ceil((n - g) / d)), and sees
the keys of its group at sub-grid positions

  non-causal: [c - k//2, c - k//2 + k), c = clamp(min(p//s*s + s//2, L-1), k//2, L-1 - (k//2 - 1 + k%2))
  causal:     [max(min(p//s*s + s - 1, L-1) - k + 1, 0), p]

(every query of a stride group shares the window start; even kernels have one more key on the left). The
neighborhood is the product of the per-axis windows; the relative-position bias (non-causal only) is
indexed by key - query + k - 1 per axis, counted in the sub-grid.

One program per (query tile, batch * head). A tile is TQ_t x TQ_h x TQ_w sub-grid positions of one dilation
group; window starts never decrease with p, so the keys of all its queries lie in a halo box starting at
the first query's window start, at most ``s * ((TQ + s - 2) // s) + k`` positions long per axis (``TQ - s + k``
when the tile is a multiple of the stride: ``k`` for blocked attention). The program walks the halo in chunks
of BLOCK_K keys (online softmax in fp32), masks each (query, key) pair from coordinates and loads the bias by
index arithmetic, straight from the strided ``(B, T, H, W, heads, d)`` tensors. The forward stores O and the
log-sum-exp.

The backward recomputes P from the LSE per query tile and writes dQ directly (tiles partition the queries).
Halos of neighboring tiles overlap, so dK and dV are accumulated with fp32 ``tl.atomic_add`` into fp32
buffers, and dBias with fp32 atomics into a per-program partial table summed afterwards. The order of those
atomic additions varies between runs, so dK, dV and dBias are not bitwise deterministic.
"""
from typing import Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl

from .._args import check_kernel_tensors, shape_str

__all__ = ['neighborhood_attention_1d_triton', 'neighborhood_attention_triton', 'neighborhood_attention_3d_triton',
           'tile_shape']

_IntOrSeq = Union[int, Sequence[int]]
_BoolOrSeq = Union[bool, Sequence[bool]]


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # the interpreter cannot multiply bf16 tiles, so it gets fp32 operands
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _window(p, L, K: tl.constexpr, S: tl.constexpr, CAUSAL: tl.constexpr):
    """Window [start, end) in sub-grid positions of the queries at sub-grid positions p (group length L)."""
    if CAUSAL:
        lead = tl.minimum((p // S) * S + S - 1, L - 1)
        start = tl.maximum(lead - K + 1, 0)
        end = p + 1
    else:
        lead = tl.minimum((p // S) * S + S // 2, L - 1)
        centre = tl.minimum(tl.maximum(lead, K // 2), L - 1 - (K // 2 - 1 + K % 2))
        start = centre - K // 2
        end = start + K
    return start, end


@triton.jit
def _axis(tile, group, N, DIL, q_off, TQ: tl.constexpr, K: tl.constexpr, S: tl.constexpr,
          CAUSAL: tl.constexpr):
    """One axis of a tile: group length, the queries' sub-grid positions and windows, the halo start."""
    L = (N - group + DIL - 1) // DIL
    p = tile * TQ + q_off
    start, end = _window(p, L, K, S, CAUSAL)
    halo_start, _ = _window(tile * TQ, L, K, S, CAUSAL)
    return L, p, start, end, halo_start


@triton.jit
def _tile(
        tile, T, H, W, DT, DH, DW, NT_T, NT_H, NT_W,
        KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
        ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr,
        TQT: tl.constexpr, TQH: tl.constexpr, TQW: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """The tile's queries (map coordinates, validity, windows) and its halo origin, per axis t / h / w."""
    tw = tile % NT_W
    rest = tile // NT_W
    th = rest % NT_H
    rest = rest // NT_H
    tt = rest % NT_T
    rest = rest // NT_T
    gw = rest % DW
    rest = rest // DW
    gh = rest % DH
    gt = rest // DH
    qi = tl.arange(0, BLOCK_Q)
    Lt, pt, st, et, ht = _axis(tt, gt, T, DT, qi // (TQH * TQW), TQT, KT, ST, CT)
    Lh, ph, sh, eh, hh = _axis(th, gh, H, DH, (qi // TQW) % TQH, TQH, KH, SH, CH)
    Lw, pw, sw, ew, hw = _axis(tw, gw, W, DW, qi % TQW, TQW, KW, SW, CW)
    q_ok = (qi < TQT * TQH * TQW) & (pt < Lt) & (ph < Lh) & (pw < Lw)
    # map token index of each query, 0 for padding queries
    q_tok = tl.where(q_ok, ((gt + DT * pt) * H + gh + DH * ph) * W + gw + DW * pw, 0)
    return (gt, gh, gw, Lt, Lh, Lw, pt, ph, pw, st, sh, sw, et, eh, ew, ht, hh, hw, q_ok, q_tok)


@triton.jit
def _chunk(
        start, H, W, DT, DH, DW, gt, gh, gw, Lt, Lh, Lw, pt, ph, pw, st, sh, sw, et, eh, ew, ht, hh, hw, q_ok,
        KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
        HALO_H: tl.constexpr, HALO_W: tl.constexpr, HALO_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Keys start .. start + BLOCK_K of the halo (row-major): map token index, validity, the neighbor mask
    of every (query, key) pair and its bias-table index (0 off the neighborhood)."""
    ki = start + tl.arange(0, BLOCK_K)
    kt = ht + ki // (HALO_H * HALO_W)
    kh = hh + (ki // HALO_W) % HALO_H
    kw = hw + ki % HALO_W
    k_ok = (ki < HALO_N) & (kt < Lt) & (kh < Lh) & (kw < Lw)
    k_tok = tl.where(k_ok, ((gt + DT * kt) * H + gh + DH * kh) * W + gw + DW * kw, 0)
    nbr = ((kt[None, :] >= st[:, None]) & (kt[None, :] < et[:, None])
           & (kh[None, :] >= sh[:, None]) & (kh[None, :] < eh[:, None])
           & (kw[None, :] >= sw[:, None]) & (kw[None, :] < ew[:, None])
           & q_ok[:, None] & k_ok[None, :])
    rel = (((kt[None, :] - pt[:, None] + KT - 1) * (2 * KH - 1) + kh[None, :] - ph[:, None] + KH - 1)
           * (2 * KW - 1) + kw[None, :] - pw[:, None] + KW - 1)
    return k_ok, k_tok, nbr, tl.where(nbr, rel, 0)


@triton.jit
def _offsets(b, head, tok, ok, H, W, sb, st, sy, sx, sh, sd, D, BLOCK_D: tl.constexpr):
    """Element offsets (BLOCK, BLOCK_D) and mask of map tokens `tok` in a strided (B, T, H, W, heads, d)
    tensor."""
    d = tl.arange(0, BLOCK_D)
    t = tok // (H * W)
    y = (tok // W) % H
    x = tok % W
    row = (b.to(tl.int64) * sb + head.to(tl.int64) * sh + t.to(tl.int64) * st + y.to(tl.int64) * sy
           + x.to(tl.int64) * sx)
    return row[:, None] + d[None, :].to(tl.int64) * sd, ok[:, None] & (d[None, :] < D)


@triton.jit
def _logits(q, k, nbr, rel, bias_ptr, head, scale, NB: tl.constexpr, HAS_BIAS: tl.constexpr,
            PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 (q k^T) * scale + bias, -inf off the neighborhood."""
    s = _dot(q, tl.trans(k), PRECISION, UPCAST) * scale
    if HAS_BIAS:
        s += tl.load(bias_ptr + head * NB + rel, mask=nbr, other=0.0).to(tl.float32)
    return tl.where(nbr, s, float('-inf'))


@triton.jit
def _na_fwd_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, bias_ptr,
        sqb, sqt, sqy, sqx, sqh, sqd,
        skb, skt, sky, skx, skh, skd,
        svb, svt, svy, svx, svh, svd,
        sob, sot, soy, sox, soh, sod,
        heads, T, H, W, D, DT, DH, DW, NT_T, NT_H, NT_W, scale,
        KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
        ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr,
        TQT: tl.constexpr, TQH: tl.constexpr, TQW: tl.constexpr,
        HALO_H: tl.constexpr, HALO_W: tl.constexpr, HALO_N: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    head = bh % heads
    NB: tl.constexpr = (2 * KT - 1) * (2 * KH - 1) * (2 * KW - 1)
    HW = H * W
    (gt, gh, gw, Lt, Lh, Lw, pt, ph, pw, st, sh, sw, et, eh, ew, ht, hh, hw, q_ok, q_tok) = _tile(
        tile, T, H, W, DT, DH, DW, NT_T, NT_H, NT_W, KT, KH, KW, ST, SH, SW, CT, CH, CW, TQT, TQH, TQW, BLOCK_Q)

    offs, mask = _offsets(b, head, q_tok, q_ok, H, W, sqb, sqt, sqy, sqx, sqh, sqd, D, BLOCK_D)
    q = tl.load(q_ptr + offs, mask=mask, other=0.0)
    m = tl.full((BLOCK_Q,), float('-inf'), tl.float32)
    denom = tl.zeros((BLOCK_Q,), tl.float32)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), tl.float32)
    for start in range(0, HALO_N, BLOCK_K):
        k_ok, k_tok, nbr, rel = _chunk(
            start, H, W, DT, DH, DW, gt, gh, gw, Lt, Lh, Lw, pt, ph, pw, st, sh, sw, et, eh, ew, ht, hh, hw, q_ok,
            KT, KH, KW, HALO_H, HALO_W, HALO_N, BLOCK_K)
        k_offs, k_mask = _offsets(b, head, k_tok, k_ok, H, W, skb, skt, sky, skx, skh, skd, D, BLOCK_D)
        k = tl.load(k_ptr + k_offs, mask=k_mask, other=0.0)
        k_offs, k_mask = _offsets(b, head, k_tok, k_ok, H, W, svb, svt, svy, svx, svh, svd, D, BLOCK_D)
        v = tl.load(v_ptr + k_offs, mask=k_mask, other=0.0)
        s = _logits(q, k, nbr, rel, bias_ptr, head, scale, NB, HAS_BIAS, PRECISION, UPCAST)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float('-inf'), 0.0, m_new)  # no neighbor yet: keep exp finite
        alpha = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe[:, None])
        denom = denom * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m = m_new
    m = tl.where(q_ok, m, 0.0)  # padding queries have no neighbor: keep them finite, never stored
    denom = tl.where(q_ok, denom, 1.0)
    o = acc / denom[:, None]

    offs, mask = _offsets(b, head, q_tok, q_ok, H, W, sob, sot, soy, sox, soh, sod, D, BLOCK_D)
    tl.store(o_ptr + offs, o.to(o_ptr.dtype.element_ty), mask=mask)
    # lse is a contiguous fp32 (B * heads, T * H * W) buffer
    tl.store(lse_ptr + bh.to(tl.int64) * T * HW + q_tok, m + tl.log(denom), mask=q_ok)


@triton.jit
def _na_bwd_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, bias_ptr, dq_ptr, dk_ptr, dv_ptr, dbias_ptr,
        sqb, sqt, sqy, sqx, sqh, sqd,
        skb, skt, sky, skx, skh, skd,
        svb, svt, svy, svx, svh, svd,
        sob, sot, soy, sox, soh, sod,
        sdob, sdot, sdoy, sdox, sdoh, sdod,
        sgb, sgt, sgy, sgx, sgh, sgd,
        heads, T, H, W, D, DT, DH, DW, NT_T, NT_H, NT_W, scale,
        KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
        ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr,
        TQT: tl.constexpr, TQH: tl.constexpr, TQW: tl.constexpr,
        HALO_H: tl.constexpr, HALO_W: tl.constexpr, HALO_N: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_BIAS: tl.constexpr, NEED_DBIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # dq, dk, dv share the strides sg* (dk, dv: fp32 accumulators; dq: output dtype)
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    head = bh % heads
    NB: tl.constexpr = (2 * KT - 1) * (2 * KH - 1) * (2 * KW - 1)
    HW = H * W
    (gt, gh, gw, Lt, Lh, Lw, pt, ph, pw, st, sh, sw, et, eh, ew, ht, hh, hw, q_ok, q_tok) = _tile(
        tile, T, H, W, DT, DH, DW, NT_T, NT_H, NT_W, KT, KH, KW, ST, SH, SW, CT, CH, CW, TQT, TQH, TQW, BLOCK_Q)

    offs, mask = _offsets(b, head, q_tok, q_ok, H, W, sqb, sqt, sqy, sqx, sqh, sqd, D, BLOCK_D)
    q = tl.load(q_ptr + offs, mask=mask, other=0.0)
    offs, mask = _offsets(b, head, q_tok, q_ok, H, W, sob, sot, soy, sox, soh, sod, D, BLOCK_D)
    o = tl.load(o_ptr + offs, mask=mask, other=0.0)
    offs, mask = _offsets(b, head, q_tok, q_ok, H, W, sdob, sdot, sdoy, sdox, sdoh, sdod, D, BLOCK_D)
    do = tl.load(do_ptr + offs, mask=mask, other=0.0)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * T * HW + q_tok, mask=q_ok, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    dq = tl.zeros((BLOCK_Q, BLOCK_D), tl.float32)
    # dbias is a contiguous fp32 (tiles, B * heads, NB) buffer of per-program partials
    part = (tile.to(tl.int64) * tl.num_programs(1) + bh) * NB
    for start in range(0, HALO_N, BLOCK_K):
        k_ok, k_tok, nbr, rel = _chunk(
            start, H, W, DT, DH, DW, gt, gh, gw, Lt, Lh, Lw, pt, ph, pw, st, sh, sw, et, eh, ew, ht, hh, hw, q_ok,
            KT, KH, KW, HALO_H, HALO_W, HALO_N, BLOCK_K)
        k_offs, k_mask = _offsets(b, head, k_tok, k_ok, H, W, skb, skt, sky, skx, skh, skd, D, BLOCK_D)
        k = tl.load(k_ptr + k_offs, mask=k_mask, other=0.0)
        k_offs, k_mask = _offsets(b, head, k_tok, k_ok, H, W, svb, svt, svy, svx, svh, svd, D, BLOCK_D)
        v = tl.load(v_ptr + k_offs, mask=k_mask, other=0.0)
        s = _logits(q, k, nbr, rel, bias_ptr, head, scale, NB, HAS_BIAS, PRECISION, UPCAST)
        p = tl.exp(s - lse[:, None])  # exactly 0 off the neighborhood and for padding queries
        dv = _dot(tl.trans(p.to(do.dtype)), do, PRECISION, UPCAST)
        dp = _dot(do, tl.trans(v), PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])  # d logits (before the scale)
        dq += _dot(ds.to(k.dtype), k, PRECISION, UPCAST)
        dk = _dot(tl.trans(ds.to(q.dtype)), q, PRECISION, UPCAST) * scale
        k_offs, k_mask = _offsets(b, head, k_tok, k_ok, H, W, sgb, sgt, sgy, sgx, sgh, sgd, D, BLOCK_D)
        tl.atomic_add(dk_ptr + k_offs, dk, mask=k_mask)
        tl.atomic_add(dv_ptr + k_offs, dv, mask=k_mask)
        if NEED_DBIAS:
            tl.atomic_add(dbias_ptr + part + rel, ds, mask=nbr)

    offs, mask = _offsets(b, head, q_tok, q_ok, H, W, sgb, sgt, sgy, sgx, sgh, sgd, D, BLOCK_D)
    tl.store(dq_ptr + offs, (dq * scale).to(dq_ptr.dtype.element_ty), mask=mask)


def _tile_side(stride: int, side: int) -> int:
    """Tile length on one axis: `side` rounded down to a multiple of the stride when the stride fits."""
    return side // stride * stride if stride <= side else side


def tile_shape(kernel: Sequence[int], stride: Sequence[int], sub_size: Sequence[int]) -> Tuple[int, ...]:
    """Query tile in sub-grid positions, one length per axis: 64 in 1-D, 8 x 8 in 2-D, 4 x 4 x 4 in 3-D, each
    rounded down to a multiple of the stride where it fits, shrunk to the sub-grid size."""
    side = {1: 64, 2: 8}.get(len(kernel), 4)
    return tuple(min(_tile_side(s, side), n) for s, n in zip(stride, sub_size))


def _halo(tile: int, kernel: int, stride: int, sub: int) -> int:
    """Keys spanned on one axis by the windows of the queries of any tile (tiles start at multiples of `tile`),
    at most `sub`: window starts grow by at most the stride per stride group the tile touches."""
    groups = tile // stride - 1 if tile % stride == 0 else (tile + stride - 2) // stride
    return min(stride * groups + kernel, sub)


def _config(q: torch.Tensor, kernel, stride, dilation, causal, tile, key_block) -> dict:
    spatial, d = q.shape[1:4], q.shape[-1]
    sub = [-(-n // dil) for n, dil in zip(spatial, dilation)]
    tile = tuple(min(t, n) for t, n in zip(tile, sub))
    n_tiles = [-(-n // t) for n, t in zip(sub, tile)]
    halo = [_halo(t, k, s, n) for t, k, s, n in zip(tile, kernel, stride, sub)]
    halo_n = halo[0] * halo[1] * halo[2]
    if q.dtype == torch.float32:
        precision = 'ieee' if torch.get_float32_matmul_precision() == 'highest' else 'tf32'
    else:
        precision = 'ieee'  # unused for 16-bit inputs
    block_k = key_block or min(128, max(16, triton.next_power_of_2(halo_n)))
    return dict(
        fwd_stages=3, bwd_stages=2,  # fp16 backward of a 7x7 kernel, 3 stages: 104 KB of shared memory on sm_86
        n_tiles=n_tiles, grid_tiles=dilation[0] * dilation[1] * dilation[2] * n_tiles[0] * n_tiles[1] * n_tiles[2],
        meta=dict(KT=kernel[0], KH=kernel[1], KW=kernel[2], ST=stride[0], SH=stride[1], SW=stride[2],
                  CT=causal[0], CH=causal[1], CW=causal[2], TQT=tile[0], TQH=tile[1], TQW=tile[2],
                  HALO_H=halo[1], HALO_W=halo[2], HALO_N=halo_n,
                  BLOCK_Q=max(16, triton.next_power_of_2(tile[0] * tile[1] * tile[2])), BLOCK_K=block_k,
                  BLOCK_D=max(16, triton.next_power_of_2(d)), PRECISION=precision,
                  UPCAST=q.dtype == torch.bfloat16 and not q.is_cuda, num_warps=4))


class _NeighborhoodAttention(torch.autograd.Function):
    """q, k, v: (B, T, H, W, heads, d); bias: (heads, 2kt-1, 2kh-1, 2kw-1) or None; per-axis tuples of 3."""

    @staticmethod
    def forward(ctx, q, k, v, bias, kernel, stride, dilation, causal, scale, tile, key_block):
        B, T, H, W, nh, d = q.shape
        cfg = _config(q, kernel, stride, dilation, causal, tile, key_block)
        out = torch.empty((B, T, H, W, nh, d), dtype=q.dtype, device=q.device)
        lse = torch.empty((B * nh, T * H * W), dtype=torch.float32, device=q.device)
        has_bias = bias is not None
        bias_arg = bias.contiguous() if has_bias else q  # never read without HAS_BIAS
        _na_fwd_kernel[(cfg['grid_tiles'], B * nh)](
            q, k, v, out, lse, bias_arg,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            nh, T, H, W, d, *dilation, *cfg['n_tiles'], float(scale),
            HAS_BIAS=has_bias, num_stages=cfg['fwd_stages'], **cfg['meta'])
        ctx.save_for_backward(q, k, v, out, lse, bias_arg if has_bias else None)
        ctx.args = kernel, stride, dilation, causal, scale, tile, key_block
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, bias = ctx.saved_tensors
        B, T, H, W, nh, d = q.shape
        kernel, stride, dilation, causal, scale, tile, key_block = ctx.args
        cfg = _config(q, kernel, stride, dilation, causal, tile, key_block)
        if grad_out.dtype != q.dtype:
            grad_out = grad_out.to(q.dtype)
        dq = torch.empty((B, T, H, W, nh, d), dtype=q.dtype, device=q.device)
        dk = torch.zeros((B, T, H, W, nh, d), dtype=torch.float32, device=q.device)
        dv = torch.zeros_like(dk)
        has_bias = bias is not None
        need_dbias = has_bias and ctx.needs_input_grad[3]
        nb = (2 * kernel[0] - 1) * (2 * kernel[1] - 1) * (2 * kernel[2] - 1)
        dbias = (torch.zeros((cfg['grid_tiles'], B * nh, nb), dtype=torch.float32, device=q.device) if need_dbias
                 else torch.empty(1, dtype=torch.float32, device=q.device))
        _na_bwd_kernel[(cfg['grid_tiles'], B * nh)](
            q, k, v, out, grad_out, lse, bias if has_bias else q, dq, dk, dv, dbias,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *grad_out.stride(), *dk.stride(),
            nh, T, H, W, d, *dilation, *cfg['n_tiles'], float(scale),
            HAS_BIAS=has_bias, NEED_DBIAS=need_dbias, num_stages=cfg['bwd_stages'], **cfg['meta'])
        dbias_out = None
        if need_dbias:
            dbias_out = dbias.view(cfg['grid_tiles'], B, nh, nb).sum((0, 1)).view(bias.shape).to(bias.dtype)
        return dq, dk.to(k.dtype), dv.to(v.dtype), dbias_out, None, None, None, None, None, None, None


def _per_axis(value, n: int, name: str, kind: type) -> Tuple:
    """An int (bool) or a sequence of `n` of them -> a tuple of `n`; a clear error naming `name` otherwise."""
    if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return (value,) * n
    try:
        result = tuple(value)
    except TypeError:
        result = ()
    if len(result) != n or not all(isinstance(v, kind) and (kind is bool or not isinstance(v, bool))
                                   for v in result):
        raise TypeError(f'{name}: expected {"a bool" if kind is bool else "an int"} or a sequence of {n}, '
                        f'got {value!r}')
    return result


def _gna_triton(q, k, v, kernel_size, stride, dilation, is_causal, rel_pos_bias, scale, tile, key_block,
                n: int):
    """Validate the per-axis arguments of an n-D call (n = 1, 2 or 3) and run the 3-D kernel."""
    names = ('length',) if n == 1 else ('time', 'height', 'width')[3 - n:]
    check_kernel_tensors(q, k, v, rel_pos_bias)
    if q.dim() != n + 3 or k.shape != q.shape or v.shape != q.shape:
        layout = ('(B, L, heads, head_dim)', '(B, H, W, heads, head_dim)', '(B, T, H, W, heads, head_dim)')[n - 1]
        raise ValueError(f'q, k, v: expected equal shapes {layout}, got '
                         f'{shape_str(q)}, {shape_str(k)}, {shape_str(v)}')
    kernel = _per_axis(kernel_size, n, 'kernel_size', int)
    stride = _per_axis(stride, n, 'stride', int)
    dilation = _per_axis(dilation, n, 'dilation', int)
    causal = _per_axis(is_causal, n, 'is_causal', bool)
    for axis, size, ks, st, dil in zip(names, q.shape[1:n + 1], kernel, stride, dilation):
        if ks < 1 or dil < 1 or not 1 <= st <= ks:
            raise ValueError(f'kernel_size, stride, dilation: expected kernel >= 1, 1 <= stride <= kernel and '
                             f'dilation >= 1 on every axis, got kernel {ks}, stride {st}, dilation {dil} on {axis}')
        if ks * dil > size:
            raise ValueError(f'kernel_size * dilation must not exceed the input {axis}: {ks} * {dil} = {ks * dil} '
                             f'> {size}')
    if rel_pos_bias is not None:
        if any(causal):
            raise ValueError(f'rel_pos_bias: not defined with causal masking (NATTEN defines no bias there), '
                             f'got is_causal={causal}')
        expected = (q.shape[-2],) + tuple(2 * ks - 1 for ks in kernel)
        if tuple(rel_pos_bias.shape) != expected:
            raise ValueError(f'rel_pos_bias: expected shape (heads, 2*k-1 per axis) = {expected}, '
                             f'got {shape_str(rel_pos_bias)}')
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if q.numel() == 0:
        return q.new_empty(q.shape)
    if tile is None:
        tile = tile_shape(kernel, stride, [-(-size // dil) for size, dil in zip(q.shape[1:n + 1], dilation)])
    # fewer than 3 axes: leading axes of length 1 (kernel 1, stride 1, dilation 1, not causal)
    lead = (slice(None),) + (None,) * (3 - n)
    ones = (1,) * (3 - n)
    out = _NeighborhoodAttention.apply(
        q[lead], k[lead], v[lead], None if rel_pos_bias is None else rel_pos_bias[lead], ones + kernel,
        ones + stride, ones + dilation, (False,) * (3 - n) + causal, scale, ones + tuple(tile), key_block)
    return out[(slice(None),) + (0,) * (3 - n)]


def neighborhood_attention_1d_triton(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kernel_size: _IntOrSeq,
        stride: _IntOrSeq = 1,
        dilation: _IntOrSeq = 1,
        is_causal: _BoolOrSeq = False,
        rel_pos_bias: Optional[torch.Tensor] = None,
        scale: Optional[float] = None,
        tile: Optional[Tuple[int]] = None,
        key_block: Optional[int] = None,
) -> torch.Tensor:
    """1-D generalized neighborhood attention, Triton path (NATTEN 0.21.7 `na1d` semantics), differentiable.

    q, k, v: (B, L, heads, head_dim) -> (B, L, heads, head_dim); rel_pos_bias: (heads, 2k-1). Other arguments
    as `neighborhood_attention_triton`, one value per argument.
    """
    return _gna_triton(q, k, v, kernel_size, stride, dilation, is_causal, rel_pos_bias, scale, tile, key_block, 1)


def neighborhood_attention_triton(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kernel_size: _IntOrSeq,
        stride: _IntOrSeq = 1,
        dilation: _IntOrSeq = 1,
        is_causal: _BoolOrSeq = False,
        rel_pos_bias: Optional[torch.Tensor] = None,
        scale: Optional[float] = None,
        tile: Optional[Tuple[int, int]] = None,
        key_block: Optional[int] = None,
) -> torch.Tensor:
    """2-D generalized neighborhood attention, Triton path (NATTEN 0.21.7 `na2d` semantics), differentiable.

    Args:
        q, k, v: (B, H, W, heads, head_dim), fp32 / fp16 / bf16 (fp32 accumulation); may be strided views.
        kernel_size: int or (kh, kw), odd or even, kernel * dilation <= size per axis.
        stride: int or (sh, sw), 1 <= stride <= kernel (stride == kernel: blocked attention).
        dilation: int or (dh, dw).
        is_causal: bool or (ch, cw), causal masking per axis.
        rel_pos_bias: optional (heads, 2kh-1, 2kw-1) table indexed by key - query + k - 1 in the dilation
            sub-grid; only without causal masking.
        scale: logit scale, default head_dim ** -0.5.
        tile, key_block: query tile (sub-grid positions per axis) and keys per step of the halo walk (a power
            of two >= 16): override the defaults, for tests.

    Returns:
        (B, H, W, heads, head_dim).

    CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1``.
    """
    return _gna_triton(q, k, v, kernel_size, stride, dilation, is_causal, rel_pos_bias, scale, tile, key_block, 2)


def neighborhood_attention_3d_triton(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kernel_size: _IntOrSeq,
        stride: _IntOrSeq = 1,
        dilation: _IntOrSeq = 1,
        is_causal: _BoolOrSeq = False,
        rel_pos_bias: Optional[torch.Tensor] = None,
        scale: Optional[float] = None,
        tile: Optional[Tuple[int, int, int]] = None,
        key_block: Optional[int] = None,
) -> torch.Tensor:
    """3-D generalized neighborhood attention, Triton path (NATTEN 0.21.7 `na3d` semantics), differentiable.

    Args:
        q, k, v: (B, T, H, W, heads, head_dim), fp32 / fp16 / bf16 (fp32 accumulation); may be strided views.
        kernel_size, stride, dilation: int or (t, h, w); 1 <= stride <= kernel, kernel * dilation <= size.
        is_causal: bool or (ct, ch, cw), causal masking per axis.
        rel_pos_bias: optional (heads, 2kt-1, 2kh-1, 2kw-1) table indexed by key - query + k - 1 per axis in
            the dilation sub-grid; only without causal masking.
        scale: logit scale, default head_dim ** -0.5.
        tile, key_block: query tile (sub-grid positions per axis) and keys per step of the halo walk (a power
            of two >= 16): override the defaults, for tests.

    Returns:
        (B, T, H, W, heads, head_dim).

    CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1``.
    """
    return _gna_triton(q, k, v, kernel_size, stride, dilation, is_causal, rel_pos_bias, scale, tile, key_block, 3)
