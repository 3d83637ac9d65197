"""Attention for convolutional stages: VAN's large-kernel attention (a mixer), Polarized Self-Attention and
Efficient Local Attention (gates).

- 'lka' mixer: VAN's attention module (Guo et al., "Visual Attention Network", 2022; official code
  Visual-Attention-Network/VAN-Classification, models/van.py)::

      u = GELU(proj_1(x));  a = conv1(dw7x7_dilation3(dw5x5(u)));  out = proj_2(u * a) + x

  with its own inner residual (`+ x`, the block's normed input), as officially. Channels-last in and out; the
  convolutions run channels-first inside. No heads: `num_heads` / `head_dim` are checked and recorded only.
- 'psa_p' / 'psa_s' gates: Polarized Self-Attention (Liu et al., 2021; official code DeLightCMU/PSA,
  semantic-segmentation/network/PSA.py), a channel-only and a spatial-only branch in parallel ('p') or in
  sequence ('s'). `form='official'` (default) is the official modules' math, `form='paper'` the paper's equations;
  the parameter names are the official ones, so the official state dicts load as they are.
- 'ela' gate: Efficient Local Attention (Xu & Wan, 2024; no official code): strip pooling along each axis, one
  1-D convolution and one GroupNorm shared by both axes, a sigmoid per axis; the paper's ELA-T / B / S / L.
"""
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import get_act_layer

from ._registry import check_input, register_gate, register_mixer, resolve_heads

__all__ = ['LKA', 'LargeKernelAttention', 'PolarizedSelfAttention', 'EfficientLocalAttention', 'ELA_VARIANTS']


class LKA(nn.Module):
    """VAN's large-kernel attention proper: x * conv1x1(dw7x7 dilation 3(dw5x5(x))). (B, C, H, W) -> same."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv0 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv_spatial = nn.Conv2d(dim, dim, 7, padding=9, groups=dim, dilation=3)
        self.conv1 = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.conv1(self.conv_spatial(self.conv0(x)))


@register_mixer('lka', paper='VAN: Visual Attention Network (Guo et al., 2022)', cost='O(N (k_5^2 + k_7^2 + C))',
                torchscript=True)
class LargeKernelAttention(nn.Module):
    """VAN's attention module as a mixer: (B, H, W, dim) -> (B, H, W, dim), any H, W.

    Args:
        dim: channels.
        num_heads, head_dim: the mixer contract's heads; checked by `resolve_heads` and recorded (LKA has none).
        qkv_bias, attn_drop: accepted for the contract; LKA has no qkv and no attention matrix.
        proj_drop: dropout after proj_2 (0 officially).
        act_layer: activation after proj_1 (GELU officially).
    """

    def __init__(
            self,
            dim: int,
            num_heads: Optional[int] = None,
            head_dim: Optional[int] = None,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            act_layer: str = 'gelu',
    ):
        super().__init__()
        self.dim = dim
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        self.proj_1 = nn.Conv2d(dim, dim, 1)
        self.activation = get_act_layer(act_layer)()
        self.spatial_gating_unit = LKA(dim)
        self.proj_2 = nn.Conv2d(dim, dim, 1)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.dim, 'LargeKernelAttention')
        shortcut = x.permute(0, 3, 1, 2)
        y = self.proj_2(self.spatial_gating_unit(self.activation(self.proj_1(shortcut))))
        return (self.proj_drop(y) + shortcut).permute(0, 2, 3, 1)


# ----------------------------------------------------------------------------------------- Polarized Self-Attention

PSA_MODES = ('p', 's')
PSA_FORMS = ('official', 'paper')


class PolarizedSelfAttention(nn.Module):
    """Polarized Self-Attention: (B, C, H, W) -> (B, C, H, W), any H, W.

    channel mask (B, C, 1, 1):  sigmoid(conv_up(W_v(x) softmax_HW(W_q(x))))      W_v = conv_v_right, W_q = conv_q_right
    spatial mask (B, 1, H, W):  sigmoid(GAP(W_q'(x)) . W_v'(x))                   W_q' = conv_q_left, W_v' = conv_v_left
    mode 'p': x * ch(x) + x * sp(x);  mode 's': y = x * ch(x), y * sp(y).

    Where the forms differ:
        official 'p': conv_up = conv(C/2 -> C, no bias); the spatial product is softmaxed over HW before the sigmoid.
        official 's': conv_up = conv(C/2 -> C/8) -> LayerNorm([C/8, 1, 1]) -> ReLU -> conv(C/8 -> C), with biases;
            W_v'(x) is softmaxed over HW per channel before the product.
        paper (both modes): conv_up = conv(C/2 -> C, no bias) -> LayerNorm([C, 1, 1]); GAP(W_q'(x)) is softmaxed
            over its C/2 channels before the product.

    Args:
        channels: C (even; at least 8 for the official 's' form).
        mode: 'p' (parallel) or 's' (sequential).
        form: 'official' (DeLightCMU/PSA's modules) or 'paper' (the paper's equations).
    """

    def __init__(self, channels: int, mode: str = 'p', form: str = 'official', device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if mode not in PSA_MODES:
            raise ValueError(f"mode: expected 'p' (parallel) or 's' (sequential), got {mode!r}")
        if form not in PSA_FORMS:
            raise ValueError(f'form: expected one of {PSA_FORMS}, got {form!r}')
        min_channels = 8 if (mode, form) == ('s', 'official') else 2
        if not isinstance(channels, int) or channels < min_channels or channels % 2:
            raise ValueError(f'channels: expected an even int >= {min_channels} for PSA mode {mode!r} form {form!r}, '
                             f'got {channels!r}')
        self.channels, self.mode, self.form = channels, mode, form
        inter = channels // 2
        self.conv_q_right = nn.Conv2d(channels, 1, 1, bias=False, **dd)
        self.conv_v_right = nn.Conv2d(channels, inter, 1, bias=False, **dd)
        if form == 'paper':
            self.conv_up = nn.Sequential(
                nn.Conv2d(inter, channels, 1, bias=False, **dd), nn.LayerNorm([channels, 1, 1], **dd))
        elif mode == 'p':
            self.conv_up = nn.Conv2d(inter, channels, 1, bias=False, **dd)  # official key conv_up.weight
        else:
            hidden = inter // 4
            self.conv_up = nn.Sequential(
                nn.Conv2d(inter, hidden, 1, **dd), nn.LayerNorm([hidden, 1, 1], **dd), nn.ReLU(),
                nn.Conv2d(hidden, channels, 1, **dd))
        self.conv_q_left = nn.Conv2d(channels, inter, 1, bias=False, **dd)
        self.conv_v_left = nn.Conv2d(channels, inter, 1, bias=False, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # the official init: He normal (fan_in) for the four projections, PyTorch defaults elsewhere
        for conv in (self.conv_q_right, self.conv_v_right, self.conv_q_left, self.conv_v_left):
            nn.init.kaiming_normal_(conv.weight, mode='fan_in', nonlinearity='relu')

    def channel_mask(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, 1, 1) in (0, 1) (the official code's `spatial_pool`)."""
        v = self.conv_v_right(x).flatten(2)                               # (B, C/2, N)
        q = torch.softmax(self.conv_q_right(x).flatten(2), dim=-1)        # (B, 1, N)
        context = torch.matmul(v, q.transpose(1, 2)).unsqueeze(-1)         # (B, C/2, 1, 1)
        return torch.sigmoid(self.conv_up(context))

    def spatial_mask(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1, H, W) in (0, 1) (the official code's `channel_pool`)."""
        q = self.conv_q_left(x).mean((2, 3)).unsqueeze(1)                 # (B, 1, C/2)
        v = self.conv_v_left(x).flatten(2)                                 # (B, C/2, N)
        if self.form == 'paper':
            context = torch.matmul(torch.softmax(q, dim=-1), v)
        elif self.mode == 'p':
            context = torch.softmax(torch.matmul(q, v), dim=-1)
        else:
            context = torch.matmul(q, torch.softmax(v, dim=-1))
        return torch.sigmoid(context).reshape(x.shape[0], 1, x.shape[2], x.shape[3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, 'PolarizedSelfAttention', channels_last=False)
        if self.mode == 'p':
            return x * self.channel_mask(x) + x * self.spatial_mask(x)
        y = x * self.channel_mask(x)
        return y * self.spatial_mask(y)


@register_gate('psa_p', paper='Polarized Self-Attention, parallel (Liu et al., 2021)')
def psa_p(channels: int, form: str = 'official', device=None, dtype=None) -> PolarizedSelfAttention:
    """PSA_p: channel-only and spatial-only branches in parallel. (B, C, H, W) -> (B, C, H, W)."""
    return PolarizedSelfAttention(channels, mode='p', form=form, device=device, dtype=dtype)


@register_gate('psa_s', paper='Polarized Self-Attention, sequential (Liu et al., 2021)')
def psa_s(channels: int, form: str = 'official', device=None, dtype=None) -> PolarizedSelfAttention:
    """PSA_s: the channel-only branch, then the spatial-only branch. (B, C, H, W) -> (B, C, H, W)."""
    return PolarizedSelfAttention(channels, mode='s', form=form, device=device, dtype=dtype)


# -------------------------------------------------------------------------------------- Efficient Local Attention

# the paper's table: (kernel size, channels per Conv1d group, GroupNorm groups); ELA-T / B group the conv per
# channel (groups = C), ELA-S / L in groups of 8 channels (groups = C / 8)
ELA_VARIANTS = {'T': (5, 1, 32), 'B': (7, 1, 16), 'S': (5, 8, 16), 'L': (7, 8, 16)}
ELA_KERNELS = (5, 7)


class EfficientLocalAttention(nn.Module):
    """ELA: x * sigmoid(GN(conv1d(mean_W x))) * sigmoid(GN(conv1d(mean_H x))). (B, C, H, W) -> same, any H, W.

    The one Conv1d (no bias) and the one GroupNorm are shared by the two axes, as in the paper's listing.

    Args:
        channels: C.
        variant: 'T', 'B', 'S' or 'L' (the paper's ELA-T / B / S / L).
        kernel_size: override the variant's kernel size (the paper defines 5 and 7).
        gn_groups: override the variant's GroupNorm groups (must divide C).
    """

    def __init__(self, channels: int, variant: str = 'B', kernel_size: Optional[int] = None,
                 gn_groups: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if variant not in ELA_VARIANTS:
            raise ValueError(f'variant: expected one of {sorted(ELA_VARIANTS)} (ELA-T / B / S / L), got {variant!r}')
        k, per_group, groups = ELA_VARIANTS[variant]
        kernel_size = k if kernel_size is None else kernel_size
        gn_groups = groups if gn_groups is None else gn_groups
        if kernel_size not in ELA_KERNELS:
            raise ValueError(f'kernel_size: expected one of {ELA_KERNELS} (the kernel sizes of the ELA paper), '
                             f'got {kernel_size!r}')
        if not isinstance(gn_groups, int) or gn_groups < 1 or channels % gn_groups:
            raise ValueError(f'channels: expected a multiple of the GroupNorm groups ({gn_groups}, ELA-{variant}), '
                             f'got {channels}')
        if channels % per_group:
            raise ValueError(f'channels: expected a multiple of {per_group} (the Conv1d groups of ELA-{variant} have '
                             f'{per_group} channels each), got {channels}')
        self.channels = channels
        self.conv = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2,
                              groups=channels // per_group, bias=False, **dd)
        self.gn = nn.GroupNorm(gn_groups, channels, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, 'EfficientLocalAttention', channels_last=False)
        a_h = torch.sigmoid(self.gn(self.conv(x.mean(3))))  # (B, C, H)
        a_w = torch.sigmoid(self.gn(self.conv(x.mean(2))))  # (B, C, W)
        return x * a_h.unsqueeze(3) * a_w.unsqueeze(2)


@register_gate('ela', paper='ELA: Efficient Local Attention (Xu & Wan, 2024)')
def ela(channels: int, variant: str = 'B', kernel_size: Optional[int] = None,
        gn_groups: Optional[int] = None, device=None, dtype=None) -> EfficientLocalAttention:
    """ELA (default ELA-B: kernel 7, depthwise, GroupNorm 16). (B, C, H, W) -> (B, C, H, W)."""
    return EfficientLocalAttention(channels, variant, kernel_size, gn_groups, device=device, dtype=dtype)
