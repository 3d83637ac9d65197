"""Single-head self-attention on a fraction of the channels (SHSA).

`SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design` (Yun and Ro, CVPR 2024) -
https://arxiv.org/abs/2401.16456, official code https://github.com/ysj9909/SHViT.
Channels-last in and out, (B, H, W, C), any H x W (global attention over the map: no tables); computed
channels-first inside (GroupNorm and the conv + BatchNorm projections of the release).
"""
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import ConvNormAct, GroupNorm1

from ._registry import check_input, register_mixer, resolve_heads
from .attention import softmax_attention

__all__ = ['PartialSingleHeadAttention']


@register_mixer('single_head', paper='SHViT (Yun and Ro, CVPR 2024)', cost='O(N^2)', triton=False, torchscript=True)
class PartialSingleHeadAttention(nn.Module):
    """Attention over the first p = num_heads * head_dim channels; the other C - p pass untouched.

    (B, H, W, dim) -> (B, H, W, dim) for any H, W.

    x1, x2 = x[..., :p], x[..., p:]; q, k, v = BN(conv1x1(GroupNorm1(x1))) with qk_dim query / key channels per
    head and head_dim value channels; x1 = softmax(q k^T / sqrt(qk_dim)) v; out = BN(conv1x1(act(cat(x1, x2)))).
    SHViT: num_heads=1, head_dim=p (its `pdim`), qk_dim=16; the last BN starts at zero.

    Args:
        dim: input and output channels.
        num_heads: attention heads (see `resolve_heads`; SHViT: 1).
        head_dim: value channels per head (see `resolve_heads`; num_heads * head_dim <= dim).
        qk_dim: query / key channels per head.
        act_layer: activation before the output projection (on all channels).
        qkv_bias: accepted for the contract; the projections are conv + BatchNorm (BN has the bias).
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the output projection.
    """
    no_weight_decay_keys = ()

    def __init__(
            self,
            dim: int,
            num_heads: Optional[int] = None,
            head_dim: Optional[int] = None,
            qk_dim: int = 16,
            act_layer=nn.ReLU,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
    ):
        super().__init__()
        self.dim = dim
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        self.pdim = self.num_heads * self.head_dim
        if self.pdim > dim:
            raise ValueError(f'num_heads * head_dim: expected at most dim={dim} (the attended channels), '
                             f'got {self.num_heads} * {self.head_dim} = {self.pdim}')
        if not isinstance(qk_dim, int) or qk_dim < 1:
            raise ValueError(f'qk_dim: expected a positive int, got {qk_dim!r}')
        if not 0. <= attn_drop < 1.:
            raise ValueError(f'attn_drop: expected a rate in [0, 1), got {attn_drop}')
        self.qk_dim = qk_dim
        self.scale = qk_dim ** -0.5
        self.attn_drop = float(attn_drop)
        self.pre_norm = GroupNorm1(self.pdim)
        self.qkv = ConvNormAct(self.pdim, 2 * self.num_heads * qk_dim + self.pdim, 1, apply_act=False)
        self.act = act_layer()
        self.proj = ConvNormAct(dim, dim, 1, apply_act=False)
        nn.init.zeros_(self.proj.bn.weight)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.dim, 'PartialSingleHeadAttention')
        B, H, W, C = x.shape
        x = x.permute(0, 3, 1, 2)
        x1, x2 = x[:, :self.pdim], x[:, self.pdim:]
        qkv = self.qkv(self.pre_norm(x1)).flatten(2).transpose(1, 2)  # (B, N, 2 heads qk_dim + p)
        qk = self.num_heads * self.qk_dim
        q = qkv[..., :qk].reshape(B, H * W, self.num_heads, self.qk_dim).transpose(1, 2)
        k = qkv[..., qk:2 * qk].reshape(B, H * W, self.num_heads, self.qk_dim).transpose(1, 2)
        v = qkv[..., 2 * qk:].reshape(B, H * W, self.num_heads, self.head_dim).transpose(1, 2)
        x1 = softmax_attention(q, k, v, self.scale, self.attn_drop, self.training)
        x1 = x1.permute(0, 1, 3, 2).reshape(B, self.pdim, H, W)
        x = self.proj(self.act(torch.cat([x1, x2], dim=1)))
        return self.proj_drop(x.permute(0, 2, 3, 1))

    def extra_repr(self) -> str:
        return f'dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, qk_dim={self.qk_dim}'
