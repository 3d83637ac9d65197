"""Window attention in pure PyTorch: the ground truth and the CPU / ONNX path.

One op serves Swin (block windows, optionally cyclically shifted) and MaxViT (block and grid
partitions). Tensors are channels-last with heads split out: ``(B, H, W, heads, head_dim)``.

Semantics, for any H and W:
  * the map is zero-padded at the bottom/right to a multiple of the window (grid) size;
  * ``block`` mode groups contiguous ``wh x ww`` tiles of the map rolled by ``-shift``;
    ``grid`` mode groups the tokens ``(r * H_p / gh + a, c * W_p / gw + b)`` for ``r < gh, c < gw``;
  * padded keys and (with a shift) keys from another pre-shift region get -100 added to their
    logits, as in Swin's shift mask, so valid outputs never depend on the padding;
  * the relative-position bias is ``table[head, dr + Mh - 1, dc + Mw - 1]`` with ``(dr, dc)`` the
    key-minus-query offset inside the window (grid units in grid mode); the table
    ``(heads, 2Mh - 1, 2Mw - 1)`` may be larger than the window (its centre is used).

While a model is exported (``is_exporting()``), the map is always padded and cropped (maybe by 0) and the mask
is always built, in the graph from the runtime size with no branch on it and no cache, so one ONNX export runs
at any H x W; eager keeps the cached tables and the piecewise partition. TorchScript compiles only that export
form (the eager-only branches sit behind ``not torch.jit.is_scripting()``, which the compiler resolves).
"""
import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .._cache import size_cache
from .._sizes import ceil_div
from ..backend import is_exporting

__all__ = ['window_attention_ref', 'window_partition', 'window_reverse', 'window_tables', 'MASK_VALUE']

MASK_VALUE = -100.0
_MODES = ('block', 'grid')


def _pad_to(size: int, multiple: int) -> int:
    return (multiple - size % multiple) % multiple


def window_partition(x: torch.Tensor, window: Tuple[int, int], mode: str = 'block') -> torch.Tensor:
    """(B, Hp, Wp, *rest) -> (B, num_windows, wh * ww, *rest); Hp, Wp multiples of the window."""
    B, Hp, Wp = x.shape[:3]
    rest = x.shape[3:]
    wh, ww = window
    if mode == 'block':
        x = x.reshape(B, Hp // wh, wh, Wp // ww, ww, *rest).transpose(2, 3)
    else:
        x = x.reshape(B, wh, Hp // wh, ww, Wp // ww, *rest).permute(0, 2, 4, 1, 3, *range(5, 5 + len(rest)))
    return x.reshape(B, -1, wh * ww, *rest)


def window_reverse(x: torch.Tensor, window: Tuple[int, int], hw: Tuple[int, int], mode: str = 'block') -> torch.Tensor:
    """Inverse of `window_partition`: (B, num_windows, wh * ww, *rest) -> (B, Hp, Wp, *rest)."""
    B = x.shape[0]
    rest = x.shape[3:]
    Hp, Wp = hw
    wh, ww = window
    if mode == 'block':
        x = x.reshape(B, Hp // wh, Wp // ww, wh, ww, *rest).transpose(2, 3)
    else:
        x = x.reshape(B, Hp // wh, Wp // ww, wh, ww, *rest).permute(0, 3, 1, 4, 2, *range(5, 5 + len(rest)))
    return x.reshape(B, Hp, Wp, *rest)


def _region_ids(size: int, padded: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """Per rolled position along one axis: Swin's shift region (0, 1, 2), or -1 for padding."""
    pos = torch.arange(padded, device=device)
    region = (pos >= padded - window).long() + (pos >= padded - shift).long() if shift else torch.zeros_like(pos)
    orig = pos + shift  # (pos + shift) % padded without a modulo by a symbolic size, which ONNX export can't lower
    orig = torch.where(orig >= padded, orig - padded, orig)
    return torch.where(orig < size, region, torch.full_like(region, -1))


def _build_tables(
        H: int, W: int, window: Tuple[int, int], shift: Tuple[int, int], mode: str, table_size: Tuple[int, int],
        device: torch.device,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    wh, ww = window
    Hp, Wp = H + _pad_to(H, wh), W + _pad_to(W, ww)
    bias_index = _bias_index(window, table_size, device)
    if Hp == H and Wp == W and not any(shift):
        return bias_index, None
    rh = _region_ids(H, Hp, wh, shift[0], device)
    rw = _region_ids(W, Wp, ww, shift[1], device)
    ids = rh[:, None] * 3 + rw[None, :]
    ids = torch.where((rh[:, None] < 0) | (rw[None, :] < 0), torch.full_like(ids, -1), ids)
    ids = window_partition(ids[None], window, mode)[0]  # nW, WA
    mask = (ids[:, :, None] != ids[:, None, :]).float() * MASK_VALUE
    return bias_index, mask


_cached_tables = size_cache(256)(_build_tables)


def _bias_index(window: Tuple[int, int], table_size: Tuple[int, int], device: torch.device) -> torch.Tensor:
    """Relative-position index (WA, WA), key minus query, into the flattened (2Mh-1, 2Mw-1) table."""
    wh, ww = window
    r = torch.arange(wh, device=device).repeat_interleave(ww)
    c = torch.arange(ww, device=device).repeat(wh)
    Mh, Mw = table_size
    return (r[None, :] - r[:, None] + Mh - 1) * (2 * Mw - 1) + (c[None, :] - c[:, None] + Mw - 1)


def _export_mask(
        H: int, W: int, window: Tuple[int, int], shift: Tuple[int, int], mode: str, device: torch.device,
        mask_value: float = MASK_VALUE,  # an argument: TorchScript reads no global floats
) -> torch.Tensor:
    """The additive mask (num_windows, WA, WA) computed in the graph from the runtime (H, W).

    Export path: H and W may be symbolic, so nothing branches on them. The mask is always built (all zeros
    when the size needs no padding and there is no shift, which adds exactly nothing to the logits), and the
    padded size is ``ceil(H / wh) * wh``, never a modulo, so symbolic shapes stay cheap to reason about.
    """
    wh, ww = window
    nh, nw = ceil_div(H, wh), ceil_div(W, ww)
    rh = _region_ids(H, nh * wh, wh, shift[0], device)
    rw = _region_ids(W, nw * ww, ww, shift[1], device)
    ids = rh[:, None] * 3 + rw[None, :]
    ids = torch.where((rh[:, None] < 0) | (rw[None, :] < 0), torch.full_like(ids, -1), ids)
    if mode == 'block':
        ids = ids.reshape(nh, wh, nw, ww).transpose(1, 2)
    else:
        ids = ids.reshape(wh, nh, ww, nw).permute(1, 3, 0, 2)
    ids = ids.reshape(-1, wh * ww)  # nW, WA
    return (ids[:, :, None] != ids[:, None, :]).float() * mask_value


def window_tables(
        H: int, W: int, window: Tuple[int, int], shift: Tuple[int, int], mode: str, table_size: Tuple[int, int],
        device: torch.device,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Bias index (WA, WA) and additive mask (num_windows, WA, WA) or None, cached per size."""
    if isinstance(H, int) and isinstance(W, int) and not torch.compiler.is_compiling():
        return _cached_tables(H, W, tuple(window), tuple(shift), mode, tuple(table_size), device)
    return _build_tables(H, W, window, shift, mode, table_size, device)


@functools.lru_cache(maxsize=256)
def _axis_pieces(size: int, window: int, shift: int) -> Tuple[Tuple[int, int, int, int, int], ...]:
    """One axis of pad + roll(-shift) + block partition as rectangles ``(win0, win1, off0, off1, src0)``.

    Windows ``win0:win1`` at in-window offsets ``off0:off1`` hold the source positions
    ``src0 : src0 + (win1 - win0) * (off1 - off0)`` in order, or padding when ``src0 < 0``.
    """
    padded = size + _pad_to(size, window)
    pieces = []
    for p in range(padded):
        src = (p + shift) % padded
        src = src if src < size else -1
        win, off = divmod(p, window)
        if pieces:
            w0, w1, o0, o1, s0 = pieces[-1]
            n = (w1 - w0) * (o1 - o0)
            if w1 - w0 == 1 and w0 == win and o1 == off and (s0 < 0) == (src < 0) and (src < 0 or src == s0 + n):
                pieces[-1] = (w0, w1, o0, off + 1, s0)
                continue
        pieces.append((win, win + 1, off, off + 1, src))
    merged = []  # runs of whole windows with consecutive sources become one piece
    for w0, w1, o0, o1, s0 in pieces:
        if merged and o0 == 0 and o1 == window:
            m0, m1, n0, n1, t0 = merged[-1]
            if n0 == 0 and n1 == window and m1 == w0 and (t0 < 0) == (s0 < 0) and (
                    s0 < 0 or s0 == t0 + (m1 - m0) * window):
                merged[-1] = (m0, w1, 0, window, t0)
                continue
        merged.append((w0, w1, o0, o1, s0))
    return tuple(merged)


def _pieces_2d(H: int, W: int, window: Tuple[int, int], shift: Tuple[int, int]):
    for hp in _axis_pieces(H, window[0], shift[0]):
        for wp in _axis_pieces(W, window[1], shift[1]):
            yield hp, wp


def _to_windows(t: torch.Tensor, window: Tuple[int, int], shift: Tuple[int, int], mode: str,
                exporting: Optional[bool] = None) -> torch.Tensor:
    """Pad + roll + partition: (B, H, W, heads, d) -> (B, nW, heads, wh * ww, d), contiguous.

    Eager block mode does it in one pass of slice copies; export / compile and grid mode pad, roll, reshape.
    """
    B, H, W, nh, d = t.shape
    wh, ww = window
    exporting = is_exporting() if exporting is None else exporting
    if not torch.jit.is_scripting() and mode == 'block' and not exporting:
        return _ToWindows.apply(t, window, shift).view(B, -1, nh, wh * ww, d)
    nH, nW = ceil_div(H, wh), ceil_div(W, ww)
    if exporting or nH * wh != H or nW * ww != W:  # exporting: no branch on the (symbolic) size
        t = F.pad(t, (0, 0, 0, 0, 0, nW * ww - W, 0, nH * wh - H))
    if any(shift):
        t = torch.roll(t, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    if mode == 'block':
        t = t.reshape(B, nH, wh, nW, ww, nh, d).permute(0, 1, 3, 5, 2, 4, 6)
    else:
        t = t.reshape(B, wh, nH, ww, nW, nh, d).permute(0, 2, 4, 5, 1, 3, 6)
    return t.reshape(B, -1, nh, wh * ww, d)


def _from_windows(
        t: torch.Tensor, hw: Tuple[int, int], window: Tuple[int, int], shift: Tuple[int, int], mode: str,
        exporting: Optional[bool] = None,
) -> torch.Tensor:
    """Inverse of `_to_windows`, padding cropped: (B, nW, heads, wh * ww, d) -> (B, H, W, heads, d)."""
    B, _, nh, _, d = t.shape
    H, W = hw
    wh, ww = window
    nH, nW = ceil_div(H, wh), ceil_div(W, ww)
    t = t.reshape(B, nH, nW, nh, wh, ww, d)
    exporting = is_exporting() if exporting is None else exporting
    if not torch.jit.is_scripting() and mode == 'block' and not exporting:
        return _FromWindows.apply(t, (H, W), window, shift)
    if mode == 'block':
        t = t.permute(0, 1, 4, 2, 5, 3, 6)
    else:
        t = t.permute(0, 4, 1, 5, 2, 3, 6)
    t = t.reshape(B, nH * wh, nW * ww, nh, d)
    if any(shift):
        t = torch.roll(t, shifts=shift, dims=(1, 2))
    return t[:, :H, :W] if exporting or nH * wh != H or nW * ww != W else t


def _to_windows_copies(t: torch.Tensor, window: Tuple[int, int], shift: Tuple[int, int]) -> torch.Tensor:
    """(B, H, W, heads, d) -> (B, Hp / wh, Wp / ww, heads, wh, ww, d): one slice copy (or zero fill) per piece."""
    B, H, W, nh, d = t.shape
    wh, ww = window
    out = t.new_empty(B, -(-H // wh), -(-W // ww), nh, wh, ww, d)
    for (h0, h1, i0, i1, r0), (w0, w1, j0, j1, c0) in _pieces_2d(H, W, window, shift):
        dst = out[:, h0:h1, w0:w1, :, i0:i1, j0:j1]
        if r0 < 0 or c0 < 0:
            dst.zero_()
        else:
            nr, nc = (h1 - h0) * (i1 - i0), (w1 - w0) * (j1 - j0)
            src = t[:, r0:r0 + nr, c0:c0 + nc].reshape(B, h1 - h0, i1 - i0, w1 - w0, j1 - j0, nh, d)
            dst.copy_(src.permute(0, 1, 3, 5, 2, 4, 6))
    return out


def _from_windows_copies(
        t: torch.Tensor, hw: Tuple[int, int], window: Tuple[int, int], shift: Tuple[int, int],
) -> torch.Tensor:
    """(B, Hp / wh, Wp / ww, heads, wh, ww, d) -> (B, H, W, heads, d), dropping the padding."""
    B, nh, d = t.shape[0], t.shape[3], t.shape[6]
    H, W = hw
    out = t.new_empty(B, H, W, nh, d)
    for (h0, h1, i0, i1, r0), (w0, w1, j0, j1, c0) in _pieces_2d(H, W, window, shift):
        if r0 >= 0 and c0 >= 0:
            nr, nc = (h1 - h0) * (i1 - i0), (w1 - w0) * (j1 - j0)
            dst = out[:, r0:r0 + nr, c0:c0 + nc].view(B, h1 - h0, i1 - i0, w1 - w0, j1 - j0, nh, d)
            dst.copy_(t[:, h0:h1, w0:w1, :, i0:i1, j0:j1].permute(0, 1, 4, 2, 5, 3, 6))
    return out


class _ToWindows(torch.autograd.Function):
    """The piecewise partition; its backward is the piecewise reverse (its adjoint) and vice versa, so
    autograd records one node instead of a full-size CopySlices per piece."""

    @staticmethod
    def forward(ctx, t, window, shift):
        ctx.hw, ctx.window, ctx.shift = tuple(t.shape[1:3]), window, shift
        return _to_windows_copies(t, window, shift)

    @staticmethod
    def backward(ctx, grad):
        return _FromWindows.apply(grad, ctx.hw, ctx.window, ctx.shift), None, None


class _FromWindows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, hw, window, shift):
        ctx.window, ctx.shift = window, shift
        return _from_windows_copies(t, hw, window, shift)

    @staticmethod
    def backward(ctx, grad):
        return _ToWindows.apply(grad, ctx.window, ctx.shift), None, None, None


def window_attention_ref(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        window_size: Tuple[int, int],
        mode: str = 'block',
        shift: Tuple[int, int] = (0, 0),
        rel_pos_bias: Optional[torch.Tensor] = None,
        scale: Optional[float] = None,
) -> torch.Tensor:
    """Windowed multi-head attention. q, k, v: (B, H, W, heads, d) -> (B, H, W, heads, d)."""
    B, H, W, nh, d = q.shape
    wh, ww = window_size
    logit_scale = d ** -0.5 if scale is None else scale
    table_size = (window_size if rel_pos_bias is None else
                  ((rel_pos_bias.shape[-2] + 1) // 2, (rel_pos_bias.shape[-1] + 1) // 2))
    exporting = is_exporting()
    if not torch.jit.is_scripting() and not exporting:
        bias_index, mask = window_tables(H, W, (wh, ww), shift, mode, table_size, q.device)
    else:  # tables in the graph, from the runtime size: one export serves every H x W
        bias_index = _bias_index((wh, ww), table_size, q.device)
        mask = _export_mask(H, W, (wh, ww), shift, mode, q.device)

    qw, kw, vw = [_to_windows(t, (wh, ww), shift, mode, exporting) for t in [q, k, v]]  # B, nW, heads, WA, d
    attn = (qw * logit_scale) @ kw.transpose(-2, -1)  # B, nW, heads, WA, WA
    bias: Optional[torch.Tensor] = None
    if rel_pos_bias is not None:
        bias = rel_pos_bias.flatten(1)[:, bias_index].to(attn.dtype)
    if mask is not None:
        bias = mask[:, None].to(attn.dtype) if bias is None else bias + mask[:, None].to(attn.dtype)
    if bias is not None:
        attn = attn + bias
    # fp32 softmax for 16-bit inputs (TF MaxViT); fp32 / fp64 keep their own precision
    attn = attn.softmax(dim=-1, dtype=torch.float32 if attn.element_size() < 4 else None).to(vw.dtype)
    return _from_windows(attn @ vw, (H, W), (wh, ww), shift, mode, exporting)
