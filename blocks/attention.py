"""Softmax attention over the whole map ('global'), and the 2-D rotary position embedding it shares with MALA's
linear attention.

'global' is softmax attention over every token of the map: the quadratic anchor the linear-attention family is
measured against, and MALA's stages 3-4 (`Rectifying Magnitude Neglect in Linear Attention`, Fan et al., ICCV 2025 -
https://github.com/qhfan/MALA, `VanillaSelfAttention`: 2-D RoPE on q and k, LePE on V, a linear output gate).
Everything channels-last: (B, H, W, C); any H x W (the RoPE tables are computed for the actual map, not learned).
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers.pos_embed_sincos import apply_rot_embed

from zoo.kernels.backend import is_exporting, is_fx_tracing

from ._registry import check_input, register_mixer, resolve_heads

# FX leaves, one graph node each: they read sizes and build per-size tables when called (any tracer; timm's registry
# lists them too, see __init__)
torch.fx.wrap('rope_2d')

__all__ = ['GlobalAttention', 'rope_2d', 'apply_rope', 'check_rope_dim', 'softmax_attention']


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float = 0.,
                      training: bool = False) -> torch.Tensor:
    """softmax(scale q k^T) v over (..., N, d) tensors (v may have another d); SDPA, or the plain form that both ONNX
    exporters take while exporting (FX records SDPA). Dropout on the weights only when `training`."""
    drop = dropout_p if training else 0.
    if is_exporting() and not is_fx_tracing():
        attn = torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1)
        return F.dropout(attn, drop, training) @ v
    return F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=scale)


def check_rope_dim(head_dim: int) -> None:
    """2-D RoPE rotates channel pairs, half of them by the row and half by the column: head_dim % 4 == 0."""
    if head_dim % 4:
        raise ValueError(f'rope: 2-D RoPE needs head_dim divisible by 4 (pairs per axis), got head_dim={head_dim}')


def rope_2d(
        height: int,
        width: int,
        head_dim: int,
        temperature: float = 10000.,
        device: Optional[torch.device] = None,
        dtype: torch.dtype = torch.float32,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sin, cos), each (height * width, head_dim), row-major tokens, for `apply_rope`; computed in `dtype`.

    MALA's layout (`RoPE` / `theta_shift`): channels [0, head_dim / 2) turn with the row index, the rest with the
    column index; within each half, pair (2i, 2i + 1) turns at frequency temperature ** -(i / (n - 1)),
    n = head_dim / 4 (a linspace of exponents from 0 to 1, both ends included).
    """
    check_rope_dim(head_dim)
    n = head_dim // 4
    bands = 1. / (temperature ** torch.linspace(0, 1, n, device=device, dtype=dtype))
    # timm's build_rotary_pos_embed gives the same tables, but its repeat_interleave layout does not survive a
    # dynamic-size ONNX export; these are plain broadcasts
    rows = (torch.arange(height, device=device, dtype=dtype)[:, None] * bands)[:, None, :].expand(-1, width, -1)
    cols = (torch.arange(width, device=device, dtype=dtype)[:, None] * bands)[None, :, :].expand(height, -1, -1)
    angle = torch.cat([rows, cols], dim=-1)  # (H, W, head_dim / 2): one angle per channel pair
    angle = torch.stack([angle, angle], dim=-1).reshape(-1, head_dim)  # each angle for both channels of its pair
    return angle.sin(), angle.cos()


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of x (..., N, head_dim) by the angles of `rope_2d`; out in the promoted dtype
    of x and the tables (fp32 tables make a half-precision x fp32)."""
    return apply_rot_embed(x, sin, cos)


@register_mixer('global', paper='Attention Is All You Need (Vaswani et al., 2017); RoPE / LePE / gate: MALA (Fan '
                'et al., ICCV 2025)', cost='O(N^2)', triton=False, torchscript=True)
class GlobalAttention(nn.Module):
    """Multi-head softmax attention over the whole map. (B, H, W, dim) -> (B, H, W, dim) for any H, W.

    out = proj(gate * (softmax(s q k^T) v + lepe(v))), with q, k rotated by 2-D RoPE when `rope`; without the
    options it is plain ViT attention. MALA's stages 3-4: rope=True, lepe=5, gate=True.

    Args:
        dim: input and output channels.
        num_heads: attention heads (see `resolve_heads`).
        head_dim: channels per head (see `resolve_heads`).
        rope: rotate q and k by the 2-D rotary embedding of `rope_2d` (head_dim divisible by 4).
        rope_temperature: RoPE base.
        lepe: kernel of the depthwise conv on V added to the attention output (LePE), 0 for none.
        gate: one projection `qkvo` gives q, k, v and a linear gate o that multiplies the output before `proj`
            (MALA); without it the projection is `qkv`.
        qkv_bias: bias in the q / k / v (/ o) projection.
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the output projection.
    """
    no_weight_decay_keys: Tuple[str, ...] = ()

    def __init__(
            self,
            dim: int,
            num_heads: Optional[int] = None,
            head_dim: Optional[int] = None,
            rope: bool = False,
            rope_temperature: float = 10000.,
            lepe: int = 0,
            gate: bool = False,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
    ):
        super().__init__()
        self.dim = dim
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        if rope:
            check_rope_dim(self.head_dim)
        if not isinstance(lepe, int) or lepe < 0 or (lepe and lepe % 2 == 0):
            raise ValueError(f'lepe: expected 0 or an odd positive kernel size, got {lepe!r}')
        if not 0. <= attn_drop < 1.:
            raise ValueError(f'attn_drop: expected a rate in [0, 1), got {attn_drop}')
        attn_dim = self.num_heads * self.head_dim
        self.attn_dim = attn_dim
        self.scale = self.head_dim ** -0.5
        self.rope, self.rope_temperature, self.gate = bool(rope), float(rope_temperature), bool(gate)
        self.attn_drop = float(attn_drop)
        if gate:
            self.qkvo = nn.Linear(dim, 4 * attn_dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, 3 * attn_dim, bias=qkv_bias)
        self.lepe = nn.Conv2d(attn_dim, attn_dim, lepe, padding=lepe // 2, groups=attn_dim) if lepe else None
        self.proj = nn.Linear(attn_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.dim, 'GlobalAttention')
        B, H, W, _ = x.shape
        parts = 4 if self.gate else 3
        if hasattr(self, 'qkvo'):  # self.gate; TorchScript resolves hasattr while compiling (there is no self.qkv)
            proj_in = self.qkvo(x)
        else:
            proj_in = self.qkv(x)
        # (B, H, W, parts * heads * d) -> parts x (B, heads, N, d)
        qkv = proj_in.reshape(B, H * W, parts, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.rope:
            sin, cos = rope_2d(H, W, self.head_dim, self.rope_temperature, device=x.device,
                               dtype=torch.promote_types(q.dtype, torch.float32))
            q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
        out = softmax_attention(q, k, v, self.scale, self.attn_drop, self.training)
        out = out.transpose(1, 2).reshape(B, H, W, self.attn_dim)
        if self.lepe is not None:
            v_map = v.transpose(1, 2).reshape(B, H, W, self.attn_dim).permute(0, 3, 1, 2)
            out = out + self.lepe(v_map).permute(0, 2, 3, 1)
        if self.gate:
            out = out * qkv[3].transpose(1, 2).reshape(B, H, W, self.attn_dim)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, rope={self.rope}, '
                f'lepe={self.lepe.kernel_size[0] if self.lepe is not None else 0}, gate={self.gate}')
