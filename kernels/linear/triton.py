"""Non-causal linear attention in Triton: two fused passes forward, two backward, fp32 state.

With one constant per normaliser folded in on the host (``a = 1`` for 'none' / 'l2vit', ``1/Nk`` for 'flatten',
``scale/Nk`` for 'inline' / 'mala'):

  forward
    * reduce (`_reduce_kernel`, one program per (batch*head, split of the keys)): one pass over the keys
      accumulates ``sum_j k_j^T v_j``, ``sum_j k~_j`` and ``sum_j v_j`` in fp32; the splits are added on the host,
      giving ``S' = a sum k^T v``, ``kbar' = a sum k~``, ``vbar = (1/Nk) sum v`` (tiny, saved for backward);
    * apply (`_apply_kernel`, one program per (batch*head, query tile)): ``qs = q S'``, ``den = q~ . kbar'`` and
      the normaliser, ``O = f(qs, den, vbar)``, stored in the output dtype.
  backward (nothing N-sized saved: qs and den are recomputed)
    * queries (`_query_bwd_kernel`, per (batch*head, split of the queries)): ``dqs = df/dqs dO``,
      ``dden = df/dden . dO``; writes ``dq = dqs S'^T (+ dden kbar')`` and ``dq_norm = dden kbar'``, and reduces
      ``dS' = sum_i q_i^T dqs_i``, ``dkbar' = sum_i dden_i q~_i``, ``dvbar = sum_i c_i dO_i`` (c = 1 - den for InLine, -den for
      MALA) in fp32;
    * keys (`_key_bwd_kernel`, per (batch*head, key tile)): ``dk = a v dS'^T (+ a dkbar')``,
      ``dv = a k dS' + dvbar / Nk``; ``dk_norm = a dkbar'`` is a broadcast.

Every reduction is a plain store of per-program partials added on the host: no atomics (the interpreter runs
no bf16 atomics), fp32 accumulators throughout. Tensors may be strided views (slices of one qkv projection).
Head dims d up to 128 in one block; values wider than 64 columns run in 64-column chunks (every normaliser acts
on an output column through that column of v alone).
"""
import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._args import KERNEL_DTYPES
from . import MAX_HEAD_DIM
from .reference import out_dtype

__all__ = ['linear_attention_triton']

_CODES = {'none': 0, 'flatten': 1, 'inline': 2, 'mala': 3, 'l2vit': 4}


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _base(bh, heads, sb, sh):
    """Element offset of (batch, head) = divmod(bh, heads) in a strided (B, heads, N, D) tensor."""
    return (bh // heads).to(tl.int64) * sb + (bh % heads).to(tl.int64) * sh


@triton.jit
def _tile(ptr, base, n0, sn, sd, N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """A (BLOCK_N, BLOCK_D) fp32 tile of rows n0.. of one (batch, head) at `base`, zeros outside (N, D)."""
    rows = n0 + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    offs = base + rows[:, None].to(tl.int64) * sn + cols[None, :].to(tl.int64) * sd
    mask = (rows[:, None] < N) & (cols[None, :] < D)
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store(ptr, val, base, n0, sn, sd, N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = n0 + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    offs = base + rows[:, None].to(tl.int64) * sn + cols[None, :].to(tl.int64) * sd
    tl.store(ptr + offs, val.to(ptr.dtype.element_ty), mask=(rows[:, None] < N) & (cols[None, :] < D))


@triton.jit
def _state(s_ptr, kb_ptr, vb_ptr, row, D, DV, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Row `row` of contiguous fp32 (rows, D, DV), (rows, D), (rows, DV) buffers, zero-padded to the blocks."""
    d = tl.arange(0, BLOCK_D)
    e = tl.arange(0, BLOCK_DV)
    row = row.to(tl.int64)
    s = tl.load(s_ptr + row * D * DV + d[:, None] * DV + e[None, :],
                mask=(d[:, None] < D) & (e[None, :] < DV), other=0.0)
    kb = tl.load(kb_ptr + row * D + d, mask=d < D, other=0.0)
    vb = tl.load(vb_ptr + row * DV + e, mask=e < DV, other=0.0)
    return s, kb, vb


@triton.jit
def _store_state(s_ptr, kb_ptr, vb_ptr, s, kb, vb, row, D, DV, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Inverse of `_state`: store one row of (D, DV), (D,), (DV,) fp32 partials."""
    d = tl.arange(0, BLOCK_D)
    e = tl.arange(0, BLOCK_DV)
    tl.store(s_ptr + row * D * DV + d[:, None] * DV + e[None, :], s, mask=(d[:, None] < D) & (e[None, :] < DV))
    tl.store(kb_ptr + row * D + d, kb, mask=d < D)
    tl.store(vb_ptr + row * DV + e, vb, mask=e < DV)


@triton.jit
def _reduce_kernel(
        k_ptr, v_ptr, kn_ptr, s_ptr, ks_ptr, vs_ptr,
        skb, skh, skn, skd, svb, svh, svn, svd, snb, snh, snn, snd,
        heads, NK, D, DV, TILES_PER_SPLIT, SPLITS,
        HAS_KN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    k_base = _base(bh, heads, skb, skh)
    v_base = _base(bh, heads, svb, svh)
    kn_base = _base(bh, heads, snb, snh)
    s = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
    ks = tl.zeros([BLOCK_D], dtype=tl.float32)
    vs = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for t in range(TILES_PER_SPLIT):
        n0 = (split * TILES_PER_SPLIT + t) * BLOCK_N
        k = _tile(k_ptr, k_base, n0, skn, skd, NK, D, BLOCK_N, BLOCK_D)
        v = _tile(v_ptr, v_base, n0, svn, svd, NK, DV, BLOCK_N, BLOCK_DV)
        s += _dot(tl.trans(k), v, PRECISION)
        if HAS_KN:
            ks += tl.sum(_tile(kn_ptr, kn_base, n0, snn, snd, NK, D, BLOCK_N, BLOCK_D), axis=0)
        else:
            ks += tl.sum(k, axis=0)
        vs += tl.sum(v, axis=0)
    _store_state(s_ptr, ks_ptr, vs_ptr, s, ks, vs, bh.to(tl.int64) * SPLITS + split, D, DV, BLOCK_D, BLOCK_DV)


@triton.jit
def _normalise(qs, den, vb, eps, clamp_min, NORM: tl.constexpr):
    """O from qs = q S' (BLOCK_N, BLOCK_DV), den = q~ . kbar' (BLOCK_N,) and vbar, per normaliser."""
    if NORM == 0:
        out = qs
    elif NORM == 1:
        out = qs / (den + eps)[:, None]
    elif NORM == 2:
        out = qs + (1.0 - den)[:, None] * vb[None, :]
    elif NORM == 3:
        out = qs * (1.0 + 1.0 / (den + eps))[:, None] - den[:, None] * vb[None, :]
    else:
        out = qs / tl.maximum(den, clamp_min)[:, None]
    return out


@triton.jit
def _apply_kernel(
        q_ptr, qn_ptr, s_ptr, kb_ptr, vb_ptr, o_ptr,
        sqb, sqh, sqn, sqd, snb, snh, snn, snd, sob, soh, son, sod,
        heads, N, D, DV, eps, clamp_min,
        NORM: tl.constexpr, HAS_QN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    s, kb, vb = _state(s_ptr, kb_ptr, vb_ptr, bh, D, DV, BLOCK_D, BLOCK_DV)
    q = _tile(q_ptr, _base(bh, heads, sqb, sqh), n0, sqn, sqd, N, D, BLOCK_N, BLOCK_D)
    if HAS_QN:
        qn = _tile(qn_ptr, _base(bh, heads, snb, snh), n0, snn, snd, N, D, BLOCK_N, BLOCK_D)
    else:
        qn = q
    qs = _dot(q, s, PRECISION)
    den = tl.sum(qn * kb[None, :], axis=1)
    out = _normalise(qs, den, vb, eps, clamp_min, NORM)
    _store(o_ptr, out, _base(bh, heads, sob, soh), n0, son, sod, N, DV, BLOCK_N, BLOCK_DV)


@triton.jit
def _query_bwd_kernel(
        q_ptr, qn_ptr, do_ptr, s_ptr, kb_ptr, vb_ptr, dq_ptr, dqn_ptr, ds_ptr, dkb_ptr, dvb_ptr,
        sqb, sqh, sqn, sqd, snb, snh, snn, snd, sdb, sdh, sdn, sdd,
        sgb, sgh, sgn, sgd, srb, srh, srn, srd,
        heads, N, D, DV, eps, clamp_min, TILES_PER_SPLIT, SPLITS,
        NORM: tl.constexpr, HAS_QN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    # dq has strides sg*, dq_norm sr*
    bh = tl.program_id(0)
    split = tl.program_id(1)
    q_base = _base(bh, heads, sqb, sqh)
    qn_base = _base(bh, heads, snb, snh)
    do_base = _base(bh, heads, sdb, sdh)
    dq_base = _base(bh, heads, sgb, sgh)
    dqn_base = _base(bh, heads, srb, srh)
    s, kb, vb = _state(s_ptr, kb_ptr, vb_ptr, bh, D, DV, BLOCK_D, BLOCK_DV)
    ds = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
    dkb = tl.zeros([BLOCK_D], dtype=tl.float32)
    dvb = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for t in range(TILES_PER_SPLIT):
        n0 = (split * TILES_PER_SPLIT + t) * BLOCK_N
        q = _tile(q_ptr, q_base, n0, sqn, sqd, N, D, BLOCK_N, BLOCK_D)
        if HAS_QN:
            qn = _tile(qn_ptr, qn_base, n0, snn, snd, N, D, BLOCK_N, BLOCK_D)
        else:
            qn = q
        do = _tile(do_ptr, do_base, n0, sdn, sdd, N, DV, BLOCK_N, BLOCK_DV)
        qs = _dot(q, s, PRECISION)
        den = tl.sum(qn * kb[None, :], axis=1)
        if NORM == 0:
            dqs = do
            dden = tl.zeros([BLOCK_N], dtype=tl.float32)
        elif NORM == 1:
            r = 1.0 / (den + eps)
            dqs = do * r[:, None]
            dden = -tl.sum(do * qs, axis=1) * r * r
        elif NORM == 2:
            dqs = do
            dden = -tl.sum(do * vb[None, :], axis=1)
            dvb += tl.sum((1.0 - den)[:, None] * do, axis=0)
        elif NORM == 3:
            r = 1.0 / (den + eps)
            dqs = do * (1.0 + r)[:, None]
            dden = -tl.sum(do * qs, axis=1) * r * r - tl.sum(do * vb[None, :], axis=1)
            dvb -= tl.sum(den[:, None] * do, axis=0)
        else:
            m = tl.maximum(den, clamp_min)
            dqs = do / m[:, None]
            dden = tl.where(den >= clamp_min, -tl.sum(do * qs, axis=1) / (m * m), 0.0)
        dq = _dot(dqs, tl.trans(s), PRECISION)
        if HAS_QN:
            _store(dqn_ptr, dden[:, None] * kb[None, :], dqn_base, n0, srn, srd, N, D, BLOCK_N, BLOCK_D)
        else:
            dq += dden[:, None] * kb[None, :]
        _store(dq_ptr, dq, dq_base, n0, sgn, sgd, N, D, BLOCK_N, BLOCK_D)
        ds += _dot(tl.trans(q), dqs, PRECISION)
        dkb += tl.sum(dden[:, None] * qn, axis=0)
    _store_state(ds_ptr, dkb_ptr, dvb_ptr, ds, dkb, dvb, bh.to(tl.int64) * SPLITS + split, D, DV, BLOCK_D, BLOCK_DV)


@triton.jit
def _key_bwd_kernel(
        k_ptr, v_ptr, ds_ptr, dkb_ptr, dvb_ptr, dk_ptr, dv_ptr,
        skb, skh, skn, skd, svb, svh, svn, svd, sgb, sgh, sgn, sgd, srb, srh, srn, srd,
        heads, NK, D, DV,
        ADD_DKB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        PRECISION: tl.constexpr,
):
    # dS', dkbar', dvbar arrive with the constants a, a, 1/Nk folded in; dk has strides sg*, dv sr*
    bh = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    ds, dkb, dvb = _state(ds_ptr, dkb_ptr, dvb_ptr, bh, D, DV, BLOCK_D, BLOCK_DV)
    k = _tile(k_ptr, _base(bh, heads, skb, skh), n0, skn, skd, NK, D, BLOCK_N, BLOCK_D)
    v = _tile(v_ptr, _base(bh, heads, svb, svh), n0, svn, svd, NK, DV, BLOCK_N, BLOCK_DV)
    dk = _dot(v, tl.trans(ds), PRECISION)
    if ADD_DKB:
        dk += dkb[None, :]
    dv = _dot(k, ds, PRECISION) + dvb[None, :]
    _store(dk_ptr, dk, _base(bh, heads, sgb, sgh), n0, sgn, sgd, NK, D, BLOCK_N, BLOCK_D)
    _store(dv_ptr, dv, _base(bh, heads, srb, srh), n0, srn, srd, NK, DV, BLOCK_N, BLOCK_DV)


DV_CHUNK = 64  # dv is processed in chunks of DV_CHUNK columns; d up to MAX_HEAD_DIM in one block


def _config(q: torch.Tensor, v: torch.Tensor) -> dict:
    """Tile sizes: d x dv state blocks of up to 128 x 64 fp32, token tiles that keep the backward's shared memory
    within 99 KB (sm_86 / sm_89; checked by compiling for sm_80 in the tests)."""
    if q.dtype == torch.float32 and torch.get_float32_matmul_precision() == 'highest' or not q.is_cuda:
        precision = 'ieee'
    else:
        precision = 'tf32'  # 16-bit inputs: tf32 holds their mantissas exactly; fp32 inputs: torch's own setting
    block_d = max(16, triton.next_power_of_2(q.shape[-1]))
    block_dv = max(16, triton.next_power_of_2(v.shape[-1]))
    if not q.is_cuda:
        block_n = 16  # the interpreter: small tiles, so the tests cover several tiles and a ragged last one
    else:
        block_n = 64 if max(block_d, block_dv) <= 32 else 32 if block_d <= 64 else 16
    return dict(BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, PRECISION=precision, num_warps=4)


def _splits(bh: int, n: int, block_n: int, device: torch.device) -> Tuple[int, int]:
    """(tiles per split, splits) of a reduction over n tokens: enough programs to fill the GPU; two splits on CPU
    (the interpreter), so that the tests run the second-stage sum."""
    tiles = triton.cdiv(n, block_n)
    if device.type == 'cuda':
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 2 * bh
    splits = max(1, min(tiles, triton.cdiv(target, bh)))
    per = triton.cdiv(tiles, splits)
    return per, triton.cdiv(tiles, per)


def _constants(normalizer: str, scale: float, nk: int) -> float:
    """The constant on sum k^T v and on sum k~ of each normaliser (a = b)."""
    if normalizer in ('none', 'l2vit'):
        return 1.0
    return 1.0 / nk if normalizer == 'flatten' else scale / nk


def _partials(bh: int, n: int, D: int, DV: int, cfg: dict, device: torch.device):
    """Launch grid of a split reduction over n tokens, tiles per split, and its empty fp32 partial buffers
    (bh, splits, D, DV), (bh, splits, D), (bh, splits, DV)."""
    per, splits = _splits(bh, n, cfg['BLOCK_N'], device)
    parts = [torch.empty(bh, splits, *shape, dtype=torch.float32, device=device) for shape in ((D, DV), (D,), (DV,))]
    return (bh, splits), per, parts


def _finish(parts, a: float, nk: int):
    """Sum the splits: a * (D, DV) state, a * (D,) key sum, (DV,) value sum / nk; each (bh, ...) contiguous."""
    return parts[0].sum(1).mul_(a), parts[1].sum(1).mul_(a), parts[2].sum(1).div_(nk)


class _LinearAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, q_norm, k_norm, normalizer, scale, eps, clamp_min, dtype):
        B, nh, N, D = q.shape
        NK, DV = k.shape[2], v.shape[-1]
        cfg = _config(q, v)
        qn = q if q_norm is None else q_norm
        kn = k if k_norm is None else k_norm
        grid, per, parts = _partials(B * nh, NK, D, DV, cfg, q.device)
        _reduce_kernel[grid](k, v, kn, *parts, *k.stride(), *v.stride(), *kn.stride(),
                             nh, NK, D, DV, per, grid[1], HAS_KN=k_norm is not None, **cfg)
        s, kbar, vbar = _finish(parts, _constants(normalizer, scale, NK), NK)
        out = torch.empty(B, nh, N, DV, dtype=dtype, device=q.device)
        _apply_kernel[(B * nh, triton.cdiv(N, cfg['BLOCK_N']))](
            q, qn, s, kbar, vbar, out, *q.stride(), *qn.stride(), *out.stride(),
            nh, N, D, DV, eps, clamp_min, NORM=_CODES[normalizer], HAS_QN=q_norm is not None, **cfg)
        ctx.save_for_backward(q, k, v, q_norm, k_norm, s, kbar, vbar)
        ctx.args = (normalizer, scale, eps, clamp_min)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, q_norm, k_norm, s, kbar, vbar = ctx.saved_tensors
        normalizer, scale, eps, clamp_min = ctx.args
        B, nh, N, D = q.shape
        NK, DV = k.shape[2], v.shape[-1]
        cfg = _config(q, v)
        qn = q if q_norm is None else q_norm
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dqn = dq if q_norm is None else torch.empty(q_norm.shape, dtype=q_norm.dtype, device=q.device)
        grid, per, parts = _partials(B * nh, N, D, DV, cfg, q.device)
        _query_bwd_kernel[grid](
            q, qn, grad_out, s, kbar, vbar, dq, dqn, *parts,
            *q.stride(), *qn.stride(), *grad_out.stride(), *dq.stride(), *dqn.stride(),
            nh, N, D, DV, eps, clamp_min, per, grid[1], NORM=_CODES[normalizer], HAS_QN=q_norm is not None, **cfg)
        ds, dkb, dvb = _finish(parts, _constants(normalizer, scale, NK), NK)
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        _key_bwd_kernel[(B * nh, triton.cdiv(NK, cfg['BLOCK_N']))](
            k, v, ds, dkb, dvb, dk, dv, *k.stride(), *v.stride(), *dk.stride(), *dv.stride(),
            nh, NK, D, DV, ADD_DKB=k_norm is None, **cfg)
        dkn = None if k_norm is None else dkb.view(B, nh, 1, D).to(k_norm.dtype).expand(k_norm.shape)
        return dq, dk, dv, None if q_norm is None else dqn, dkn, None, None, None, None, None


def linear_attention_triton(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        normalizer: str,
        scale: float,
        eps: float,
        clamp_min: float,
        q_norm: Optional[torch.Tensor] = None,
        k_norm: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Linear attention, Triton path. q, q_norm: (B, heads, N, d); k, k_norm: (B, heads, Nk, d);
    v: (B, heads, Nk, dv) -> (B, heads, N, dv) in `out_dtype(v)`.

    Arguments are validated by `zoo.kernels.linear.linear_attention`; q, k, v may be strided views. CUDA tensors,
    or CPU tensors with ``TRITON_INTERPRET=1``; inputs of mixed dtypes are promoted to one.
    """
    dtype = out_dtype(v)
    tensors = [t for t in (q, k, v, q_norm, k_norm) if t is not None]
    common = functools.reduce(torch.promote_types, [t.dtype for t in tensors])
    if common not in KERNEL_DTYPES:
        raise TypeError(f'q, k, v: the Triton path takes float32/float16/bfloat16, got {common}')
    q, k, v = q.to(common), k.to(common), v.to(common)
    q_norm = None if q_norm is None else q_norm.to(common)
    k_norm = None if k_norm is None else k_norm.to(common)
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f'q, k: the Triton path takes head dims d <= {MAX_HEAD_DIM}, got d = {q.shape[-1]} '
                         "(use backend='torch' or 'auto')")
    if q.numel() == 0:
        return q.new_zeros((*q.shape[:3], v.shape[-1]), dtype=dtype)
    # every normaliser acts on each output column through v's column alone: wide values run in column chunks
    outs = [_LinearAttention.apply(q, k, v[..., i:i + DV_CHUNK], q_norm, k_norm, normalizer, scale, eps, clamp_min,
                                   dtype) for i in range(0, v.shape[-1], DV_CHUNK)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, -1)
