"""VOLO's outlook attention: the 'outlook' mixer.

`VOLO: Vision Outlooker for Visual Recognition` (Yuan et al., TPAMI 2022) - https://arxiv.org/abs/2106.13112
Official code and weights: https://github.com/sail-sg/volo (timm: `timm.models.volo`).

Each output position is a sum over the K x K windows that cover it (centres every `stride` pixels); a window's
K^2 x K^2 attention weights are not q . k but predicted by a linear layer from the window centre's (stride x
stride average-pooled) token, and they mix the window's values. Parameter names follow the official module
(`v`, `attn`, `proj`). Everything channels-last: (B, H, W, C); any H x W: the map is zero-padded for the windows
and the overlapping window outputs are summed back onto the map and cropped to H x W (the semantics of
`F.unfold` / `F.fold` with padding K // 2, as in the official code). The windows are strided slices; the sum back is
`F.fold` in eager code and pads and slices while exporting (col2im does not export with a dynamic size), so one
dynamic ONNX export serves every size.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.kernels._sizes import ceil_div
from zoo.kernels.backend import is_exporting

from ._registry import check_input, register_mixer, resolve_heads

# FX leaves, one graph node each: they read sizes (any tracer; timm's registry lists them too, see __init__)
torch.fx.wrap('outlook_windows')
torch.fx.wrap('outlook_fold')
torch.fx.wrap('outlook_pool')

__all__ = ['OutlookAttention', 'outlook_windows', 'outlook_fold', 'outlook_pool']


def outlook_pool(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Average over each stride x stride cell, partial cells at the bottom / right averaged over their valid pixels
    (`AvgPool2d(stride, stride, ceil_mode=True)`). (B, H, W, C) -> (B, ceil(H / s), ceil(W / s), C)."""
    if stride == 1:
        return x
    H, W = x.shape[1], x.shape[2]
    pad = (0, ceil_div(W, stride) * stride - W, 0, ceil_div(H, stride) * stride - H)
    # zero-padded cells averaged, then divided by their valid fraction (1 where nothing is padded): no ceil_mode
    # pooling, whose partial cells exporters do not all lower alike
    mean = F.avg_pool2d(F.pad(x.permute(0, 3, 1, 2), pad), stride, stride)
    valid = F.avg_pool2d(F.pad(torch.ones_like(x[:1, :, :, 0]), pad)[:, None], stride, stride)
    return (mean / valid).permute(0, 2, 3, 1)


def outlook_windows(v: torch.Tensor, kernel_size: int, stride: int) -> torch.Tensor:
    """The K x K windows (zero padding K // 2) at every `stride`-th position, row-major within the window.

    (B, H, W, C) -> (B, h, w, K * K, C) with h = ceil(H / stride), w = ceil(W / stride)."""
    B, H, W, C = v.shape
    k, p = kernel_size, kernel_size // 2
    h, w = ceil_div(H, stride), ceil_div(W, stride)
    # padded so that the last window (top-left at stride * (h - 1)) fits: K + stride * (h - 1) rows
    v = F.pad(v, (0, 0, p, k + stride * (w - 1) - p - W, p, k + stride * (h - 1) - p - H))
    windows = []
    for i in range(k):
        row = v[:, i:i + stride * h:stride]
        for j in range(k):
            windows.append(row[:, :, j:j + stride * w:stride])
    return torch.stack(windows, dim=3)


def _place(y: torch.Tensor, dim: int, kernel_size: int, stride: int) -> torch.Tensor:
    """Sum window offsets back along one axis: y has the axis (size n) at `dim` and the window offset (size K) at
    dim 3; offset i of position j lands at stride * j + i. Out: that axis of size stride * n + K - 1, the offset
    axis gone."""
    out = torch.zeros(0)  # replaced at i = 0 (TorchScript wants one type)
    for i in range(kernel_size):
        t = y.select(3, i)
        if stride > 1:  # zeros between the positions: position j at stride * j
            t = torch.stack([t] + [torch.zeros_like(t)] * (stride - 1), dim=dim + 1).flatten(dim, dim + 1)
        t = F.pad(t, [0, 0] * (t.dim() - 1 - dim) + [i, kernel_size - 1 - i])
        out = t if i == 0 else out + t
    return out


def outlook_fold(y: torch.Tensor, size: Tuple[int, int], kernel_size: int, stride: int) -> torch.Tensor:
    """Sum overlapping window outputs onto the map and crop the padding (`F.fold` with padding K // 2).

    (B, h, w, K, K, C) (window offsets row, column) -> (B, H, W, C) for size = (H, W)."""
    H, W = size
    p = kernel_size // 2
    if not is_exporting():  # F.fold (col2im) is the fast eager path; it does not export with a dynamic size
        B, h, w, C = y.shape[0], y.shape[1], y.shape[2], y.shape[-1]
        cols = y.permute(0, 5, 3, 4, 1, 2).reshape(B, C * kernel_size * kernel_size, h * w)
        return F.fold(cols, (H, W), kernel_size, padding=p, stride=stride).permute(0, 2, 3, 1)
    y = _place(y, 1, kernel_size, stride)  # (B, rows, w, K, C)
    y = _place(y, 2, kernel_size, stride)  # (B, rows, cols, C)
    return y[:, p:p + H, p:p + W]


@register_mixer('outlook', paper='VOLO (Yuan et al., TPAMI 2022)', cost='O(N K^4), window K', triton=False,
                torchscript=True)
class OutlookAttention(nn.Module):
    """Outlook attention. (B, H, W, dim) -> (B, H, W, dim) for any H, W.

    For each window centre (every `stride` pixels), a = softmax(scale * attn(pool(x))) reshaped to
    (heads, K^2, K^2) mixes the window's K^2 values v(x) per head; the window outputs are summed onto the positions
    they cover, then projected. The released VOLO models use K = 3, stride 2.

    Args:
        dim: input and output channels.
        num_heads: attention heads (see `resolve_heads`).
        head_dim: channels per head (see `resolve_heads`).
        kernel_size: window size K (odd).
        stride: spacing of the window centres (1 <= stride <= K); the attention is predicted from the
            stride x stride average-pooled map.
        qkv_bias: bias in the value projection `v` (VOLO: none).
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the output projection.
    """
    no_weight_decay_keys: Tuple[str, ...] = ()

    def __init__(
            self,
            dim: int,
            num_heads: Optional[int] = None,
            head_dim: Optional[int] = None,
            kernel_size: int = 3,
            stride: int = 2,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
    ):
        super().__init__()
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f'kernel_size: expected an odd positive int, got {kernel_size!r}')
        if not isinstance(stride, int) or not 1 <= stride <= kernel_size:
            raise ValueError(f'stride: expected an int in [1, kernel_size={kernel_size}], got {stride!r}')
        if not 0. <= attn_drop < 1.:
            raise ValueError(f'attn_drop: expected a rate in [0, 1), got {attn_drop}')
        self.dim = dim
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        self.attn_dim = self.num_heads * self.head_dim
        self.kernel_size, self.stride = kernel_size, stride
        self.scale = self.head_dim ** -0.5
        self.v = nn.Linear(dim, self.attn_dim, bias=qkv_bias)
        self.attn = nn.Linear(dim, kernel_size ** 4 * self.num_heads)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(self.attn_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.dim, 'OutlookAttention')
        B, H, W, _ = x.shape
        kk, heads = self.kernel_size * self.kernel_size, self.num_heads
        v = outlook_windows(self.v(x), self.kernel_size, self.stride)  # (B, h, w, K^2, heads * d)
        h, w = v.shape[1], v.shape[2]
        v = v.reshape(B, h, w, kk, heads, self.head_dim).transpose(3, 4)  # (B, h, w, heads, K^2, d)
        a = self.attn(outlook_pool(x, self.stride)).reshape(B, h, w, heads, kk, kk)
        a = self.attn_drop((a * self.scale).softmax(dim=-1))
        y = (a @ v).transpose(3, 4).reshape(B, h, w, self.kernel_size, self.kernel_size, self.attn_dim)
        y = outlook_fold(y, (H, W), self.kernel_size, self.stride)
        return self.proj_drop(self.proj(y))

    def extra_repr(self) -> str:
        return f'dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, stride={self.stride}'
