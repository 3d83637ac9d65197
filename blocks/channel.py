"""DaViT's channel group attention: tokens attend across channels inside each channel group.

`DaViT: Dual Attention Vision Transformers` (Ding et al., ECCV 2022) - https://arxiv.org/abs/2204.03645
Official code: https://github.com/dingmyu/davit; parameter names (`qkv`, `proj`) are those of the official and timm
checkpoints. Channels-last (B, H, W, C), any H and W: the whole map is one sequence, nothing is sized to it.
"""
from typing import Optional

import torch
import torch.nn as nn

from ._registry import check_input, register_mixer, resolve_heads

__all__ = ['ChannelGroupAttention']


@register_mixer('channel_group', paper='DaViT (Ding et al., ECCV 2022)', cost='O(N d^2), group width d',
                triton=False, torchscript=True)
class ChannelGroupAttention(nn.Module):
    """Channel group attention (DaViT v1, as released). (B, H, W, dim) -> (B, H, W, dim) for any H, W.

    Per group (one per head) of d channels, with q, k, v (N, d) from one projection in that order:
    G = softmax_rows((k * d^-1/2)^T v) (d x d), out = q G^T, then the output projection. The logits sum over all
    N tokens, unnormalised by N (the released models' formula; the paper's Q, K, V are the code's k, v, q).

    Args:
        dim: input and output channels.
        num_heads: channel groups (see `resolve_heads`).
        head_dim: channels per group (see `resolve_heads`).
        qkv_bias: bias in the qkv projection.
        attn_drop: dropout on the d x d group attention.
        proj_drop: dropout after the output projection.
    """

    def __init__(
            self,
            dim: int,
            num_heads: Optional[int] = None,
            head_dim: Optional[int] = None,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
    ):
        super().__init__()
        self.dim = dim
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        attn_dim = self.num_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, attn_dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(attn_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.dim, 'ChannelGroupAttention')
        shape = x.shape
        qkv = self.qkv(x.flatten(1, 2)).unflatten(-1, (3, self.num_heads, self.head_dim))  # B, N, 3, heads, d
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # B, heads, N, d
        attn = ((k * self.scale).transpose(-2, -1) @ v).softmax(dim=-1)  # B, heads, d, d
        attn = self.attn_drop(attn)
        out = (q @ attn.transpose(-2, -1)).transpose(1, 2).flatten(2)  # B, N, heads * d
        out = self.proj(out)
        return self.proj_drop(out.reshape(shape[0], shape[1], shape[2], -1))

    def extra_repr(self) -> str:
        return f'dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}'
