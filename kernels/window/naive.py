"""Brute-force dense oracle of window attention, for tests only (O((H W)^2) memory).

Written independently of `reference.py`: no roll, no partition. Every position of the padded map
is labelled one by one with its window, its (row, col) inside the window, and its Swin shift region
(the official three-slice construction on the shifted map) or "padding"; then one dense
(H_p W_p) x (H_p W_p) attention with -inf between windows, the bias table looked up per pair,
and -100 between different labels.
"""
from typing import List, Optional, Tuple

import torch

__all__ = ['window_attention_naive']

_PAD = -1


def _slices(size: int, window: int, shift: int) -> List[slice]:
    if shift == 0:
        return [slice(0, size)]
    return [slice(0, size - window), slice(size - window, size - shift), slice(size - shift, size)]


def _label_positions(
        H: int, W: int, window: Tuple[int, int], shift: Tuple[int, int], mode: str,
) -> Tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    wh, ww = window
    Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
    # Swin regions, labelled on the shifted map (the map after rolling by -shift)
    regions = [[0] * Wp for _ in range(Hp)]
    count = 0
    for hs in _slices(Hp, wh, shift[0]):
        for ws in _slices(Wp, ww, shift[1]):
            for i in range(Hp)[hs]:
                for j in range(Wp)[ws]:
                    regions[i][j] = count
            count += 1
    win, row, col, label = [], [], [], []
    for y in range(Hp):
        for x in range(Wp):
            if mode == 'block':
                ys, xs = (y - shift[0]) % Hp, (x - shift[1]) % Wp  # where the roll moves (y, x)
                win.append((ys // wh) * (Wp // ww) + xs // ww)
                row.append(ys % wh)
                col.append(xs % ww)
                region = regions[ys][xs]
            else:
                step_h, step_w = Hp // wh, Wp // ww
                win.append((y % step_h) * step_w + x % step_w)
                row.append(y // step_h)
                col.append(x // step_w)
                region = 0
            label.append(_PAD if y >= H or x >= W else region)
    as_t = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return Hp, Wp, as_t(win), as_t(row), as_t(col), as_t(label)


def window_attention_naive(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        window_size: Tuple[int, int],
        mode: str = 'block',
        shift: Tuple[int, int] = (0, 0),
        rel_pos_bias: Optional[torch.Tensor] = None,
        scale: Optional[float] = None,
) -> torch.Tensor:
    """Dense oracle. q, k, v: (B, H, W, heads, d) -> (B, H, W, heads, d); differentiable."""
    B, H, W, nh, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    Hp, Wp, win, row, col, label = _label_positions(H, W, tuple(window_size), tuple(shift), mode)
    dev = q.device
    win, row, col, label = win.to(dev), row.to(dev), col.to(dev), label.to(dev)

    def dense(t: torch.Tensor) -> torch.Tensor:  # zero-pad to (B, heads, Hp * Wp, d)
        full = t.new_zeros(B, Hp, Wp, nh, d)
        full[:, :H, :W] = t
        return full.reshape(B, Hp * Wp, nh, d).transpose(1, 2)

    qd, kd, vd = dense(q), dense(k), dense(v)
    logits = (qd @ kd.transpose(-2, -1)) * scale  # B, heads, N, N
    if rel_pos_bias is not None:
        Mh, Mw = (rel_pos_bias.shape[1] + 1) // 2, (rel_pos_bias.shape[2] + 1) // 2
        dr = row[None, :] - row[:, None] + Mh - 1  # key minus query
        dc = col[None, :] - col[:, None] + Mw - 1
        same = win[:, None] == win[None, :]
        dr, dc = torch.where(same, dr, 0), torch.where(same, dc, 0)  # other pairs are dropped below
        logits = logits + rel_pos_bias[:, dr, dc].to(logits.dtype)
    logits = logits + torch.where(label[:, None] != label[None, :], -100.0, 0.0).to(logits)
    logits = logits.masked_fill(win[:, None] != win[None, :], float('-inf'))
    out = logits.softmax(-1) @ vd  # B, heads, N, d
    return out.transpose(1, 2).reshape(B, Hp, Wp, nh, d)[:, :H, :W]
