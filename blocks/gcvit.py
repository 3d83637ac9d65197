"""GC ViT's conv parts: the fused MBConv, its downsample and the stage's global query generator.

`Global Context Vision Transformers` (Hatamizadeh et al., ICML 2023) - https://arxiv.org/abs/2206.09959
Official code: https://github.com/NVlabs/GCVit. Parameter names follow timm's `gcvit.py` (`conv_dw`, `se.fc1`,
`se.fc2`, `conv_pw`, `norm1`, `conv_block`, `reduction`, `norm2`, `blocks.conv{i}`), so its checkpoints load with
a few prefix renames.

The attention itself is the 'window' mixer (local blocks) and the 'window' mixer with ``global_query=True``
(global blocks: queries from `GlobalQueryGen`, computed once per stage). Any H and W work: the generator pools
as many times as it was built for (the layout at the model's `img_size`) and resizes the result to the window
in the graph (bicubic, as the official detection backbone does), an identity when the sizes already agree.
"""
import math
from typing import Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import SEModule, to_2tuple

__all__ = ['SeMbConv', 'MbConvDownsample', 'GlobalQueryGen', 'pool_levels']


def pool_levels(size: Tuple[int, int], window: Tuple[int, int]) -> int:
    """GC ViT's pooling rounds for a map of `size` and a window: floor(log2(min(size) / min(window))), >= 0."""
    return max(0, int(math.log2(max(1, min(size)) / min(window))))


class SeMbConv(nn.Module):
    """x + pw(SE(GELU(dw3x3(x)))), no norm, no biases (GC ViT's fused MBConv). (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)
        self.act = nn.GELU()
        self.se = SEModule(dim, rd_ratio=0.25, act_layer=nn.GELU, bias=False)
        self.conv_pw = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_pw(self.se(self.act(self.conv_dw(x))))


class MbConvDownsample(nn.Module):
    """GC ViT's downsample: LayerNorm, fused MBConv, 3x3 stride-2 conv (no bias), LayerNorm.

    (B, H, W, dim) -> (B, ceil(H / 2), ceil(W / 2), out_dim), channels-last like every zoo downsample.
    """

    def __init__(self, dim: int, out_dim: Union[int, None] = None, norm_eps: float = 1e-5):
        super().__init__()
        out_dim = out_dim or 2 * dim
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.conv_block = SeMbConv(dim)
        self.reduction = nn.Conv2d(dim, out_dim, 3, stride=2, padding=1, bias=False)
        self.norm2 = nn.LayerNorm(out_dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_block(self.norm1(x).permute(0, 3, 1, 2))
        return self.norm2(self.reduction(x).permute(0, 2, 3, 1))


class GlobalQueryGen(nn.Module):
    """GC ViT's global query of a stage: `levels` rounds of fused MBConv + 3x3 stride-2 max-pool (one MBConv and no
    pool when `levels` is 0), resized to the window. (B, H, W, dim) -> (B, Mh, Mw, dim).

    Args:
        dim: channels.
        window_size: the window of the stage's attention (Mh, Mw), the grid of the query.
        levels: pooling rounds, log2(map / window) at the model's `img_size` (timm / official classification:
            3, 2, 0, 0 at 224 px).
    """

    def __init__(self, dim: int, window_size: Union[int, Tuple[int, int]] = 7, levels: int = 0):
        super().__init__()
        if levels < 0:
            raise ValueError(f'levels: expected an int >= 0, got {levels}')
        self.window_size = to_2tuple(window_size)
        self.blocks = nn.Sequential()
        for i in range(max(1, levels)):
            self.blocks.add_module(f'conv{i + 1}', SeMbConv(dim))
            if i < levels:
                self.blocks.add_module(f'pool{i + 1}', nn.MaxPool2d(kernel_size=3, stride=2, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(x.permute(0, 3, 1, 2))
        # a constant target size: traced, scripted and exported graphs resize whatever the pooled map is
        x = F.interpolate(x, size=self.window_size, mode='bicubic', align_corners=False)
        return x.permute(0, 2, 3, 1)

    def extra_repr(self) -> str:
        return f'window_size={self.window_size}'
