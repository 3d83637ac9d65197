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
"""
import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

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


def _region_ids(size: int, padded: int, window: int, shift: int, device) -> torch.Tensor:
    """Per rolled position along one axis: Swin's shift region (0, 1, 2), or -1 for padding."""
    pos = torch.arange(padded, device=device)
    region = (pos >= padded - window).long() + (pos >= padded - shift).long() if shift else torch.zeros_like(pos)
    orig = (pos + shift) % padded
    return torch.where(orig < size, region, torch.full_like(region, -1))


def _build_tables(
        H: int, W: int, window: Tuple[int, int], shift: Tuple[int, int], mode: str, table_size: Tuple[int, int],
        device: torch.device,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    wh, ww = window
    Hp, Wp = H + _pad_to(H, wh), W + _pad_to(W, ww)
    # relative-position index, key minus query, into the flattened (2Mh-1, 2Mw-1) table
    r = torch.arange(wh, device=device).repeat_interleave(ww)
    c = torch.arange(ww, device=device).repeat(wh)
    Mh, Mw = table_size
    bias_index = (r[None, :] - r[:, None] + Mh - 1) * (2 * Mw - 1) + (c[None, :] - c[:, None] + Mw - 1)
    if Hp == H and Wp == W and not any(shift):
        return bias_index, None
    rh = _region_ids(H, Hp, wh, shift[0], device)
    rw = _region_ids(W, Wp, ww, shift[1], device)
    ids = rh[:, None] * 3 + rw[None, :]
    ids = torch.where((rh[:, None] < 0) | (rw[None, :] < 0), torch.full_like(ids, -1), ids)
    ids = window_partition(ids[None], window, mode)[0]  # nW, WA
    mask = (ids[:, :, None] != ids[:, None, :]).float() * MASK_VALUE
    return bias_index, mask


_cached_tables = functools.lru_cache(maxsize=256)(_build_tables)


def window_tables(
        H: int, W: int, window: Tuple[int, int], shift: Tuple[int, int], mode: str, table_size: Tuple[int, int],
        device: torch.device,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Bias index (WA, WA) and additive mask (num_windows, WA, WA) or None, cached per size."""
    if isinstance(H, int) and isinstance(W, int) and not torch.compiler.is_compiling():
        return _cached_tables(H, W, tuple(window), tuple(shift), mode, tuple(table_size), device)
    return _build_tables(H, W, window, shift, mode, table_size, device)


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
    scale = d ** -0.5 if scale is None else scale
    pad_h, pad_w = _pad_to(H, wh), _pad_to(W, ww)
    table_size = (window_size if rel_pos_bias is None else
                  ((rel_pos_bias.shape[-2] + 1) // 2, (rel_pos_bias.shape[-1] + 1) // 2))
    bias_index, mask = window_tables(H, W, (wh, ww), shift, mode, table_size, q.device)

    def split(t: torch.Tensor) -> torch.Tensor:
        if pad_h or pad_w:
            t = F.pad(t, (0, 0, 0, 0, 0, pad_w, 0, pad_h))
        if any(shift):
            t = torch.roll(t, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        return window_partition(t, (wh, ww), mode).transpose(2, 3)  # B, nW, heads, WA, d

    qw, kw, vw = split(q * scale), split(k), split(v)
    attn = qw @ kw.transpose(-2, -1)  # B, nW, heads, WA, WA
    if rel_pos_bias is not None:
        attn = attn + rel_pos_bias.flatten(1)[:, bias_index].to(attn.dtype)
    if mask is not None:
        attn = attn + mask[:, None].to(attn.dtype)
    attn = attn.softmax(dim=-1)
    out = (attn @ vw).transpose(2, 3)  # B, nW, WA, heads, d
    out = window_reverse(out, (wh, ww), (H + pad_h, W + pad_w), mode)
    if any(shift):
        out = torch.roll(out, shifts=shift, dims=(1, 2))
    if pad_h or pad_w:
        out = out[:, :H, :W]
    return out
