"""Agent attention: the mixer of Agent-Swin's 'A' blocks.

`Agent Attention: On the Integration of Softmax and Linear Attention` - https://arxiv.org/abs/2312.08874
Official code and weights: https://github.com/LeapLabTHU/Agent-Attention

Parameter names and shapes follow the official `AgentAttention` (agent_transformer/models/agent_swin.py), so its
checkpoints load by renaming prefixes only. The official module assumes a square map of its construction size;
this one runs at any H x W (non-square too): the agent / token tables are resized to the actual map as the
official detection code does, and the agents pool the actual map. Everything channels-last: (B, H, W, C).
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import to_2tuple, trunc_normal_

from zoo.kernels.agent import AgentBias, agent_attention

from ._registry import check_input, register_mixer, resolve_heads

# FX leaves, one graph node each: they read sizes and build per-size tables when called (any tracer; timm's registry
# lists them too, see __init__)
torch.fx.wrap('agent_attention')

__all__ = ['AgentAttention']

_TABLE = 7  # the official an / na tables are 7 x 7 whatever the map size


@register_mixer('agent', paper='Agent Attention (Han et al., ECCV 2024)', cost='O(N n), n agents', triton=False,
                torchscript=True)
class AgentAttention(nn.Module):
    """Agent attention over the whole map, plus a depthwise conv on V. (B, H, W, dim) -> (B, H, W, dim), any H, W.

    Args:
        dim: input and output channels.
        num_heads: attention heads (see `resolve_heads`).
        head_dim: channels per head (see `resolve_heads`).
        agent_num: number of agents n, a perfect square (the agents pool a sqrt(n) x sqrt(n) grid of the queries).
        bias_size: (rows, cols) the row / column bias tables are stored at: the map size the model was built
            for (Agent-Swin: the stage's feature size at `img_size`); other sizes resize them.
        qkv_bias: bias in the qkv projection.
        attn_drop: dropout on both attention maps.
        proj_drop: dropout after the output projection.
        dwc_kernel: kernel size of the depthwise conv on V.

    Weight decay applies to every table, as in the official training recipe (`no_weight_decay_keys` is empty).
    """
    no_weight_decay_keys: Tuple[str, ...] = ()

    def __init__(
            self,
            dim: int,
            num_heads: Optional[int] = None,
            head_dim: Optional[int] = None,
            agent_num: int = 49,
            bias_size: Union[int, Tuple[int, int]] = 7,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            dwc_kernel: int = 3,
    ):
        super().__init__()
        self.dim = dim
        num_heads, head_dim = resolve_heads(dim, num_heads, head_dim)
        self.num_heads, self.head_dim = num_heads, head_dim
        side = math.isqrt(agent_num) if isinstance(agent_num, int) and agent_num > 0 else 0
        if side < 1 or side * side != agent_num:
            raise ValueError(f'agent_num: expected a perfect square (the agents pool a sqrt(n) x sqrt(n) grid), '
                             f'got {agent_num!r}')
        self.bias_size = tuple(int(s) for s in to_2tuple(bias_size))
        if min(self.bias_size) < 1:
            raise ValueError(f'bias_size: expected positive sizes, got {self.bias_size}')
        if side > min(self.bias_size):
            raise ValueError(f'agent_num: {agent_num} agents ({side} x {side}) exceed the tokens of the '
                             f'{self.bias_size[0]} x {self.bias_size[1]} map they are built for (bias_size)')
        if dwc_kernel < 1 or dwc_kernel % 2 == 0:
            raise ValueError(f'dwc_kernel: expected an odd positive size, got {dwc_kernel}')
        self.agent_num, self.agent_grid = agent_num, (side, side)
        self.attn_drop = float(attn_drop)
        attn_dim = num_heads * head_dim
        self.scale = head_dim ** -0.5
        rows, cols = self.bias_size
        self.qkv = nn.Linear(dim, attn_dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(attn_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(attn_dim, attn_dim, dwc_kernel, padding=dwc_kernel // 2, groups=attn_dim)
        # official layouts: agent -> token (an, ah, aw) and token -> agent (na, ha, wa)
        self.an_bias = nn.Parameter(torch.zeros(num_heads, agent_num, _TABLE, _TABLE))
        self.na_bias = nn.Parameter(torch.zeros(num_heads, agent_num, _TABLE, _TABLE))
        self.ah_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, rows, 1))
        self.aw_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, 1, cols))
        self.ha_bias = nn.Parameter(torch.zeros(1, num_heads, rows, 1, agent_num))
        self.wa_bias = nn.Parameter(torch.zeros(1, num_heads, 1, cols, agent_num))
        for p in (self.an_bias, self.na_bias, self.ah_bias, self.aw_bias, self.ha_bias, self.wa_bias):
            trunc_normal_(p, std=.02)

    def biases(self) -> Tuple[AgentBias, AgentBias]:
        """(B1, B2) tables in the op's (heads, n, ...) layout: views of the parameters."""
        nh, n = self.num_heads, self.agent_num
        rows, cols = self.bias_size
        b1 = AgentBias(self.an_bias, self.ah_bias.view(nh, n, rows), self.aw_bias.view(nh, n, cols))
        b2 = AgentBias(self.na_bias, self.ha_bias.view(nh, rows, n).transpose(1, 2),
                       self.wa_bias.view(nh, cols, n).transpose(1, 2))
        return b1, b2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        who = 'AgentAttention'  # scripted code: TorchScript has no type()
        if not torch.jit.is_scripting():
            who = type(self).__name__
        check_input(x, self.dim, who)
        B, H, W, _ = x.shape
        q, k, v = self.qkv(x).view(B, H, W, 3, self.num_heads, self.head_dim).unbind(3)
        b1, b2 = self.biases()
        out = agent_attention(q, k, v, self.agent_grid, agent_bias=b1, query_bias=b2, scale=self.scale,
                              dropout_p=self.attn_drop if self.training else 0.)
        out = out.reshape(B, H, W, -1)
        out = out + self.dwc(v.reshape(B, H, W, -1).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, agent_num={self.agent_num}, '
                f'bias_size={self.bias_size}')
