"""Window attention in Triton: fused forward and backward, same semantics as `reference.py`.

One program per (batch, head, window) in the forward. Each program computes the map address of
every window token from its window index (block windows rolled by the shift, or the strided
grid), loads q, k, v straight from the strided ``(B, H, W, heads, d)`` tensors (no pad, roll or
partition copies; tokens of the padding are masked loads), keeps the whole score tile on chip,
adds the relative-position bias by index arithmetic on the table and the -100 padding/shift mask
from the token coordinates, does a single-pass fp32 softmax and stores the valid tokens only.

The window is padded to ``BLOCK_N`` = a power of two >= 16 tokens for ``tl.dot``; those extra
key columns are excluded with -inf (every row keeps at least one finite logit, so no NaN).

The backward recomputes P and produces dQ, dK, dV for a whole window in one program (windows
partition the map, so no atomics are needed for them). Programs loop over a few windows of the
same (batch, head), summing dS in fp32, and add that sum into the fp32 bias-table gradient with
one ``tl.atomic_add`` per program.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._args import check_kernel_tensors

__all__ = ['window_attention_triton']

MASK_VALUE = tl.constexpr(-100.0)  # reference.MASK_VALUE (Swin's shift mask)
_WINDOWS_PER_PROGRAM = 8  # backward: windows summed per program before the d_table atomics


@triton.jit
def _token_coords(
        w, H, W, Hp, Wp,
        WH: tl.constexpr, WW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        BLOCK_N: tl.constexpr, GRID: tl.constexpr,
):
    """Map row/col, in-map flag and shift-region id (-1 for padding) of the tokens of window w."""
    t = tl.arange(0, BLOCK_N)
    r = t // WW
    c = t % WW
    tok = t < WH * WW
    if GRID:
        step_h = Hp // WH
        step_w = Wp // WW
        y = r * step_h + w // step_w
        x = c * step_w + w % step_w
        region = tl.zeros([BLOCK_N], dtype=tl.int32)
    else:
        n_ww = Wp // WW
        yr = (w // n_ww) * WH + r  # position in the rolled, padded map
        xr = (w % n_ww) * WW + c
        y = (yr + SH) % Hp
        x = (xr + SW) % Wp
        region_y = tl.zeros([BLOCK_N], dtype=tl.int32)
        region_x = tl.zeros([BLOCK_N], dtype=tl.int32)
        if SH > 0:
            region_y = (yr >= Hp - WH).to(tl.int32) + (yr >= Hp - SH).to(tl.int32)
        if SW > 0:
            region_x = (xr >= Wp - WW).to(tl.int32) + (xr >= Wp - SW).to(tl.int32)
        region = region_y * 3 + region_x
    inside = tok & (y < H) & (x < W)
    region = tl.where(inside, region, -1)
    y = tl.where(inside, y, 0)
    x = tl.where(inside, x, 0)
    return y, x, inside, region


@triton.jit
def _offsets(b, head, y, x, inside, sb, sy, sx, sh, sd, D, BLOCK_D: tl.constexpr):
    """Element offsets (BLOCK_N, BLOCK_D) of a window's tokens in a strided (B, H, W, heads, d) tensor."""
    d = tl.arange(0, BLOCK_D)
    row = b.to(tl.int64) * sb + head.to(tl.int64) * sh + y.to(tl.int64) * sy + x.to(tl.int64) * sx
    offs = row[:, None] + d[None, :].to(tl.int64) * sd
    mask = inside[:, None] & (d[None, :] < D)
    return offs, mask


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # the interpreter multiplies bf16 tiles as raw uint16, so it gets fp32 operands
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _pair_offsets(MH, MW, WH: tl.constexpr, WW: tl.constexpr, BLOCK_N: tl.constexpr):
    """Bias-table row/col (key - query + M - 1) of every token pair, and which pairs are in the window."""
    t = tl.arange(0, BLOCK_N)
    r = t // WW
    c = t % WW
    tok = t < WH * WW
    pair = tok[:, None] & tok[None, :]
    dr = tl.where(pair, r[None, :] - r[:, None] + MH - 1, 0)
    dc = tl.where(pair, c[None, :] - c[:, None] + MW - 1, 0)
    return dr, dc, pair


@triton.jit
def _bias_tile(
        table_ptr, head, st_h, st_r, st_c, MH, MW,
        WH: tl.constexpr, WW: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """fp32 (BLOCK_N, BLOCK_N): the relative-position bias, -inf on key columns past the window."""
    t = tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        dr, dc, pair = _pair_offsets(MH, MW, WH, WW, BLOCK_N)
        bias = tl.load(table_ptr + head * st_h + dr * st_r + dc * st_c, mask=pair, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_N, BLOCK_N], dtype=tl.float32)
    return tl.where((t < WH * WW)[None, :], bias, float('-inf'))


@triton.jit
def _probs(qs, k, base, region, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Softmax over keys of (q * scale) k^T + base + shift/padding mask, fp32 (BLOCK_N, BLOCK_N)."""
    s = _dot(qs, tl.trans(k), PRECISION, UPCAST) + base
    s += tl.where(region[:, None] != region[None, :], MASK_VALUE, 0.0)
    m = tl.max(s, axis=1)
    m = tl.where(m == float('-inf'), 0.0, m)  # a row with no finite logit stays all-zero, not NaN
    p = tl.exp(s - m[:, None])
    denom = tl.sum(p, axis=1)
    denom = tl.where(denom == 0.0, 1.0, denom)
    return p / denom[:, None]


@triton.jit
def _window_fwd_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, table_ptr,
        sqb, sqy, sqx, sqh, sqd,
        skb, sky, skx, skh, skd,
        svb, svy, svx, svh, svd,
        sob, soy, sox, soh, sod,
        st_h, st_r, st_c,
        heads, H, W, Hp, Wp, D, MH, MW, scale, num_windows,
        WH: tl.constexpr, WW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GRID: tl.constexpr, HAS_BIAS: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)  # one flat axis: grid axes 1 and 2 stop at 65535
    w = pid % num_windows
    bh = pid // num_windows
    b = bh // heads
    head = bh % heads
    y, x, inside, region = _token_coords(w, H, W, Hp, Wp, WH, WW, SH, SW, BLOCK_N, GRID)

    offs, mask = _offsets(b, head, y, x, inside, sqb, sqy, sqx, sqh, sqd, D, BLOCK_D)
    q = tl.load(q_ptr + offs, mask=mask, other=0.0)
    qs = (q.to(tl.float32) * scale).to(q.dtype)
    offs, mask = _offsets(b, head, y, x, inside, skb, sky, skx, skh, skd, D, BLOCK_D)
    k = tl.load(k_ptr + offs, mask=mask, other=0.0)
    offs, mask = _offsets(b, head, y, x, inside, svb, svy, svx, svh, svd, D, BLOCK_D)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)

    base = _bias_tile(table_ptr, head, st_h, st_r, st_c, MH, MW, WH, WW, BLOCK_N, HAS_BIAS)
    p = _probs(qs, k, base, region, PRECISION, UPCAST)
    o = _dot(p.to(v.dtype), v, PRECISION, UPCAST)

    offs, mask = _offsets(b, head, y, x, inside, sob, soy, sox, soh, sod, D, BLOCK_D)
    tl.store(o_ptr + offs, o.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _window_bwd_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, table_ptr, dtable_ptr,
        sqb, sqy, sqx, sqh, sqd,
        skb, sky, skx, skh, skd,
        svb, svy, svx, svh, svd,
        sob, soy, sox, soh, sod,
        sdob, sdoy, sdox, sdoh, sdod,
        sgb, sgy, sgx, sgh, sgd,
        st_h, st_r, st_c,
        heads, H, W, Hp, Wp, D, MH, MW, scale, num_windows, windows_per_program,
        WH: tl.constexpr, WW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GRID: tl.constexpr, HAS_BIAS: tl.constexpr,
        NEED_DBIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # dq, dk, dv are contiguous (B, H, W, heads, d) tensors sharing the strides sg*
    pid = tl.program_id(0)
    n_groups = tl.cdiv(num_windows, windows_per_program)
    w_start = (pid % n_groups) * windows_per_program
    w_end = tl.minimum(w_start + windows_per_program, num_windows)
    bh = pid // n_groups
    b = bh // heads
    head = bh % heads
    base = _bias_tile(table_ptr, head, st_h, st_r, st_c, MH, MW, WH, WW, BLOCK_N, HAS_BIAS)  # same for all windows
    ds_sum = tl.zeros([BLOCK_N, BLOCK_N], dtype=tl.float32)
    for w in range(w_start, w_end):
        y, x, inside, region = _token_coords(w, H, W, Hp, Wp, WH, WW, SH, SW, BLOCK_N, GRID)
        offs, mask = _offsets(b, head, y, x, inside, sqb, sqy, sqx, sqh, sqd, D, BLOCK_D)
        q = tl.load(q_ptr + offs, mask=mask, other=0.0)
        qs = (q.to(tl.float32) * scale).to(q.dtype)
        offs, mask = _offsets(b, head, y, x, inside, skb, sky, skx, skh, skd, D, BLOCK_D)
        k = tl.load(k_ptr + offs, mask=mask, other=0.0)
        offs, mask = _offsets(b, head, y, x, inside, svb, svy, svx, svh, svd, D, BLOCK_D)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        offs, mask = _offsets(b, head, y, x, inside, sob, soy, sox, soh, sod, D, BLOCK_D)
        o = tl.load(o_ptr + offs, mask=mask, other=0.0)
        offs, mask = _offsets(b, head, y, x, inside, sdob, sdoy, sdox, sdoh, sdod, D, BLOCK_D)
        do = tl.load(do_ptr + offs, mask=mask, other=0.0)

        p = _probs(qs, k, base, region, PRECISION, UPCAST)
        dv = _dot(tl.trans(p.to(do.dtype)), do, PRECISION, UPCAST)
        dp = _dot(do, tl.trans(v), PRECISION, UPCAST)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, PRECISION, UPCAST) * scale
        dk = _dot(tl.trans(ds.to(qs.dtype)), qs, PRECISION, UPCAST)
        if NEED_DBIAS:
            ds_sum += ds

        offs, mask = _offsets(b, head, y, x, inside, sgb, sgy, sgx, sgh, sgd, D, BLOCK_D)
        tl.store(dq_ptr + offs, dq.to(dq_ptr.dtype.element_ty), mask=mask)
        tl.store(dk_ptr + offs, dk.to(dk_ptr.dtype.element_ty), mask=mask)
        tl.store(dv_ptr + offs, dv.to(dv_ptr.dtype.element_ty), mask=mask)

    if NEED_DBIAS:
        dr, dc, pair = _pair_offsets(MH, MW, WH, WW, BLOCK_N)
        # d_table is a contiguous fp32 (heads, 2MH - 1, 2MW - 1) buffer
        idx = head * (2 * MH - 1) * (2 * MW - 1) + dr * (2 * MW - 1) + dc
        tl.atomic_add(dtable_ptr + idx, ds_sum, mask=pair)


def _launch_config(q: torch.Tensor, window: Tuple[int, int]) -> dict:
    B, H, W, nh, d = q.shape
    wh, ww = window
    Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
    block_n = max(16, triton.next_power_of_2(wh * ww))
    block_d = max(16, triton.next_power_of_2(d))
    if q.dtype == torch.float32:
        precision = 'ieee' if torch.get_float32_matmul_precision() == 'highest' else 'tf32'
    else:
        precision = 'ieee'  # unused for 16-bit inputs
    return dict(Hp=Hp, Wp=Wp, num_windows=(Hp // wh) * (Wp // ww), block_n=block_n, block_d=block_d,
                precision=precision, upcast=q.dtype == torch.bfloat16 and not q.is_cuda,
                num_warps=4 if block_n <= 32 else 8,
                # pipelining the backward's window loop multi-buffers its loads (104 KB of shared memory in fp32)
                bwd_stages=1)


def _strides(t: torch.Tensor) -> Tuple[int, ...]:
    return tuple(t.stride())


class _WindowAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, table, window, mode, shift, scale):
        B, H, W, nh, d = q.shape
        cfg = _launch_config(q, window)
        out = torch.empty((B, H, W, nh, d), dtype=q.dtype, device=q.device)
        has_bias = table is not None
        table_arg = table if has_bias else q  # never read without HAS_BIAS
        st = table.stride() if has_bias else (0, 0, 0)
        MH, MW = ((table.shape[1] + 1) // 2, (table.shape[2] + 1) // 2) if has_bias else window
        grid = (cfg['num_windows'] * B * nh,)
        _window_fwd_kernel[grid](
            q, k, v, out, table_arg,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out), *st,
            nh, H, W, cfg['Hp'], cfg['Wp'], d, MH, MW, float(scale), cfg['num_windows'],
            WH=window[0], WW=window[1], SH=shift[0], SW=shift[1],
            BLOCK_N=cfg['block_n'], BLOCK_D=cfg['block_d'], GRID=mode == 'grid', HAS_BIAS=has_bias,
            PRECISION=cfg['precision'], UPCAST=cfg['upcast'], num_warps=cfg['num_warps'],
        )
        ctx.save_for_backward(q, k, v, out, table)
        ctx.window, ctx.mode, ctx.shift, ctx.scale = window, mode, shift, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, table = ctx.saved_tensors
        window, mode, shift, scale = ctx.window, ctx.mode, ctx.shift, ctx.scale
        B, H, W, nh, d = q.shape
        cfg = _launch_config(q, window)
        if grad_out.dtype != q.dtype:
            grad_out = grad_out.to(q.dtype)
        dq = torch.empty((B, H, W, nh, d), dtype=q.dtype, device=q.device)
        dk = torch.empty_like(dq)
        dv = torch.empty_like(dq)
        has_bias = table is not None
        need_dbias = has_bias and ctx.needs_input_grad[3]
        table_arg = table if has_bias else q
        st = table.stride() if has_bias else (0, 0, 0)
        MH, MW = ((table.shape[1] + 1) // 2, (table.shape[2] + 1) // 2) if has_bias else window
        dtable = (torch.zeros(table.shape, dtype=torch.float32, device=q.device) if need_dbias else
                  torch.empty(1, dtype=torch.float32, device=q.device))
        per_program = min(_WINDOWS_PER_PROGRAM, cfg['num_windows']) if need_dbias else 1
        grid = (triton.cdiv(cfg['num_windows'], per_program) * B * nh,)
        _window_bwd_kernel[grid](
            q, k, v, out, grad_out, dq, dk, dv, table_arg, dtable,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(grad_out), *_strides(dq), *st,
            nh, H, W, cfg['Hp'], cfg['Wp'], d, MH, MW, float(scale), cfg['num_windows'], per_program,
            WH=window[0], WW=window[1], SH=shift[0], SW=shift[1],
            BLOCK_N=cfg['block_n'], BLOCK_D=cfg['block_d'], GRID=mode == 'grid', HAS_BIAS=has_bias,
            NEED_DBIAS=need_dbias, PRECISION=cfg['precision'], UPCAST=cfg['upcast'], num_warps=cfg['num_warps'],
            num_stages=cfg['bwd_stages'],
        )
        dtable = dtable.to(table.dtype) if need_dbias else None
        return dq, dk, dv, dtable, None, None, None, None


def window_attention_triton(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        window_size: Tuple[int, int],
        mode: str = 'block',
        shift: Tuple[int, int] = (0, 0),
        rel_pos_bias: Optional[torch.Tensor] = None,
        scale: Optional[float] = None,
) -> torch.Tensor:
    """Windowed multi-head attention, Triton path. q, k, v: (B, H, W, heads, d) -> (B, H, W, heads, d).

    Arguments as `window_attention_ref` (validated by `kernels.window.window_attention`); q, k, v
    may be non-contiguous views. CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1``.
    """
    check_kernel_tensors(q, k, v, rel_pos_bias)
    window = (int(window_size[0]), int(window_size[1]))
    shift = (int(shift[0]), int(shift[1]))
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if q.numel() == 0:
        return q.new_empty(q.shape)
    return _WindowAttention.apply(q, k, v, rel_pos_bias, window, mode, shift, scale)
