"""MaxViT multi-axis blocks: MBConv, block / grid partition attention, the MaxViT block.

`MaxViT: Multi-Axis Vision Transformer` - https://arxiv.org/abs/2204.01697
Official code: https://github.com/google-research/maxvit (TF); the semantics and parameter names here follow
timm's port of the TF models (`timm/models/maxxvit.py`, ``maxvit_*_tf_*``) so its checkpoints load with one
key rename.

Attention mixers are channels-last (B, H, W, C); MBConv is NCHW. Any H and W work: the window attention op
pads the map to partition multiples and masks the padding (on a map smaller than P that is exactly
attention over the whole map, for 'block' and 'grid' alike), so nothing depends on the runtime size.
"""
from functools import partial
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import (
    AvgPool2dSame,
    Conv2dSame,
    DropPath,
    LayerNorm,
    SEModule,
    create_conv2d,
    create_pool2d,
    get_act_layer,
    get_norm_act_layer,
    make_divisible,
    to_2tuple,
)

from zoo.kernels._sizes import ceil_div, size_max
from zoo.kernels.window import window_attention

from ._registry import check_input, register_mixer, resolve_heads
from .block import MixerBlock

# FX leaves, one graph node each: they read sizes and build per-size tables when called (any tracer; timm's registry
# lists them too, see __init__)
torch.fx.wrap('window_attention')
torch.fx.wrap('size_max')

__all__ = ['MbConvBlock', 'ShortcutDownsample', 'PartitionAttention', 'MaxVitBlock', 'pad_same',
           'create_conv2d_same']

_int_or_tuple_2_t = Union[int, Tuple[int, int]]
_layer_t = Union[str, Callable[..., nn.Module]]


def pad_same(x: torch.Tensor, kernel_size: Tuple[int, int], stride: Tuple[int, int],
             dilation: Tuple[int, int] = (1, 1)) -> torch.Tensor:
    """Zero-pad the last two dims of `x` for TensorFlow 'SAME' (output ceil(size / stride)), as timm's `pad_same`.

    The amounts come from the runtime size in integer arithmetic only: timm's version takes math.ceil of a float
    division, which a dynamic torch.export turns into symbolic expressions that nest with every stride-2 stage
    (a reduced MaxViT then took more than 10 minutes to export). Same numbers, same padding.
    """
    ph = _same_total(x.shape[-2], kernel_size[0], stride[0], dilation[0])
    pw = _same_total(x.shape[-1], kernel_size[1], stride[1], dilation[1])
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


def _same_total(size: int, kernel_size: int, stride: int, dilation: int) -> int:
    """Total 'SAME' padding of one axis of `size` (an int, or a symbolic / traced size while exporting)."""
    total = (ceil_div(size, stride) - 1) * stride + (kernel_size - 1) * dilation + 1 - size
    if (kernel_size - 1) * dilation + 1 < stride:  # the only case where the total can be negative
        total = size_max(total, 0)
    return total


class _SameConv2d(Conv2dSame):
    """timm's Conv2dSame (same parameters and init) padding through `pad_same`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class _SameAvgPool2d(AvgPool2dSame):
    """timm's AvgPool2dSame padding through `pad_same`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.kernel_size, self.stride)
        return F.avg_pool2d(x, self.kernel_size, self.stride, 0, self.ceil_mode, self.count_include_pad)


def _same(module: nn.Module) -> nn.Module:
    # timm builds its dynamic-'SAME' classes; swap in the subclasses above (they only replace forward)
    if type(module) is Conv2dSame:
        module.__class__ = _SameConv2d
    elif type(module) is AvgPool2dSame:
        module.__class__ = _SameAvgPool2d
    return module


def create_conv2d_same(in_chs: int, out_chs: int, kernel_size: int, **kwargs) -> nn.Module:
    """timm's `create_conv2d`; a dynamic padding='same' conv pads with `pad_same` (exports stay fast and dynamic)."""
    return _same(create_conv2d(in_chs, out_chs, kernel_size, **kwargs))


class ShortcutDownsample(nn.Module):
    """Stride-2 shortcut of a downsampling MBConv: 2x2 avg pool, then a 1x1 conv when channels change.

    (B, in_chs, H, W) -> (B, out_chs, ceil(H / 2), ceil(W / 2)). With padding='same' (the TF models) odd maps
    are zero-padded at the bottom / right and the pad counts in the average, as in timm.
    """

    def __init__(self, in_chs: int, out_chs: int, padding: str = 'same', bias: bool = True):
        super().__init__()
        self.pool = _same(create_pool2d('avg', kernel_size=2, stride=2, padding=padding or 0))
        self.expand = nn.Conv2d(in_chs, out_chs, 1, bias=bias) if in_chs != out_chs else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.pool(x))


class MbConvBlock(nn.Module):
    """Pre-norm inverted bottleneck: BN -> 1x1 -> BN-act -> depthwise kxk (strided) -> BN-act -> SE -> 1x1.

    (B, in_chs, H, W) -> (B, out_chs, H / stride, W / stride), rounded up with padding='same'.

    Args:
        in_chs: input channels.
        out_chs: output channels.
        stride: 1, or 2 to downsample (the shortcut then pools and projects, see `ShortcutDownsample`).
        expand_ratio: hidden width / out_chs.
        kernel_size: depthwise kernel size.
        se_ratio: squeeze-excite width / out_chs.
        padding: conv padding mode; 'same' is TF's (asymmetric on strided convs), '' is symmetric.
        act_layer: activation after the inner norms.
        se_act_layer: activation inside the squeeze-excite.
        norm_layer: norm (a norm-act type is derived from it).
        norm_eps: norm epsilon.
        drop_path: stochastic depth rate.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            stride: int = 1,
            expand_ratio: float = 4.,
            kernel_size: int = 3,
            se_ratio: float = 0.25,
            padding: str = 'same',
            act_layer: _layer_t = 'gelu_tanh',
            se_act_layer: _layer_t = 'silu',
            norm_layer: _layer_t = 'batchnorm2d',
            norm_eps: float = 1e-3,
            drop_path: float = 0.,
    ):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f'stride: expected 1 or 2, got {stride}')
        if stride == 1 and in_chs != out_chs:
            raise ValueError(f'out_chs: a stride-1 MBConv keeps the width, expected {in_chs}, got {out_chs}')
        norm_act_layer = partial(get_norm_act_layer(norm_layer, act_layer), eps=norm_eps)
        mid_chs = make_divisible(out_chs * expand_ratio)

        self.shortcut = ShortcutDownsample(in_chs, out_chs, padding=padding) if stride == 2 else nn.Identity()
        self.pre_norm = norm_act_layer(in_chs, apply_act=False)
        self.conv1_1x1 = create_conv2d(in_chs, mid_chs, 1)
        self.norm1 = norm_act_layer(mid_chs)
        self.conv2_kxk = create_conv2d_same(mid_chs, mid_chs, kernel_size, stride=stride, depthwise=True,
                                            padding=padding)
        self.norm2 = norm_act_layer(mid_chs)
        self.se = SEModule(mid_chs, rd_channels=int(se_ratio * out_chs), act_layer=get_act_layer(se_act_layer))
        self.conv3_1x1 = create_conv2d(mid_chs, out_chs, 1, bias=True)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        x = self.norm1(self.conv1_1x1(self.pre_norm(x)))
        x = self.se(self.norm2(self.conv2_kxk(x)))
        x = self.conv3_1x1(x)
        return self.drop_path(x) + shortcut


class PartitionAttention(nn.Module):
    """Multi-head self-attention inside block or grid partitions, with a TF-layout relative position bias.

    (B, H, W, dim) -> (B, H, W, dim) for any H, W.

    'block' attends within contiguous P x P windows; 'grid' within the P x P tokens spaced H_p / P apart
    (MaxViT's dilated global mixing). The bias table (heads, 2P - 1, 2P - 1) is indexed by the key-minus-query
    offset (in grid steps for 'grid'), which is the layout of the TF checkpoints and of the window op.

    Args:
        dim: input and output channels.
        num_heads: attention heads (see `resolve_heads`).
        head_dim: channels per head (see `resolve_heads`; 32 in MaxViT).
        partition_size: P, the window ('block') or grid ('grid') size.
        partition_type: 'block' or 'grid'.
        qkv_bias: bias in the qkv projection.
        attn_drop: attention dropout; the window op has none, so only 0 is accepted.
        proj_drop: dropout after the output projection.
    """
    no_weight_decay_keys = ('relative_position_bias_table',)

    def __init__(
            self,
            dim: int,
            num_heads: Optional[int] = None,
            head_dim: Optional[int] = None,
            partition_size: _int_or_tuple_2_t = 7,
            partition_type: str = 'block',
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
    ):
        super().__init__()
        if partition_type not in ('block', 'grid'):
            raise ValueError(f"partition_type: expected 'block' or 'grid', got {partition_type!r}")
        if attn_drop:
            raise ValueError(f'attn_drop: the window attention op has no dropout, expected 0, got {attn_drop}')
        self.partition_size = to_2tuple(partition_size)
        if min(self.partition_size) < 1:
            raise ValueError(f'partition_size: expected positive sizes, got {self.partition_size}')
        self.dim = dim
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        attn_dim = self.num_heads * self.head_dim
        self.partition_type = partition_type
        ph, pw = self.partition_size
        self.qkv = nn.Linear(dim, attn_dim * 3, bias=qkv_bias)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(self.num_heads, 2 * ph - 1, 2 * pw - 1))
        self.proj = nn.Linear(attn_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.normal_(self.relative_position_bias_table, std=.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.dim, 'PartitionAttention')
        B, H, W, C = x.shape
        # qkv channels are (3, heads, head_dim): timm's head_first=False / the TF layout
        q, k, v = self.qkv(x).view(B, H, W, 3, self.num_heads, self.head_dim).unbind(3)
        x = window_attention(
            q, k, v,
            self.partition_size,
            mode=self.partition_type,
            rel_pos_bias=self.relative_position_bias_table,
        )
        return self.proj_drop(self.proj(x.reshape(B, H, W, -1)))

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, partition_size={self.partition_size}, '
                f'partition_type={self.partition_type!r}')


# MaxViT block attention (contiguous P x P windows) and grid attention (P x P tokens strided over the map)
register_mixer('block', paper='MaxViT (Tu et al., ECCV 2022)', cost='O(N P^2), partition P', triton=True,
               torchscript=True)(
    partial(PartitionAttention, partition_type='block'))
register_mixer('grid', paper='MaxViT (Tu et al., ECCV 2022)', cost='O(N P^2), grid P', triton=True,
               torchscript=True)(
    partial(PartitionAttention, partition_type='grid'))


class MaxVitBlock(nn.Module):
    """MaxViT block: MBConv -> block attention + FFN -> grid attention + FFN.

    (B, dim, H, W) -> (B, dim_out, H / stride, W / stride) (rounded up); attention runs channels-last.

    Args:
        dim: input channels.
        dim_out: output channels.
        stride: MBConv stride (2 in the first block of a stage).
        partition_size: block window and grid size P.
        head_dim: channels per attention head.
        mlp_ratio: FFN hidden width / dim_out.
        expand_ratio: MBConv hidden width / dim_out.
        se_ratio: MBConv squeeze-excite width / dim_out.
        padding: MBConv padding mode ('same' for the TF models).
        act_layer: MBConv and FFN activation.
        conv_norm_eps: MBConv BatchNorm epsilon.
        norm_eps: attention-block LayerNorm epsilon.
        proj_drop: dropout in the attention blocks.
        drop_path: stochastic depth rate of all three residual branches.
    """

    def __init__(
            self,
            dim: int,
            dim_out: int,
            stride: int = 1,
            partition_size: _int_or_tuple_2_t = 7,
            head_dim: int = 32,
            mlp_ratio: float = 4.,
            expand_ratio: float = 4.,
            se_ratio: float = 0.25,
            padding: str = 'same',
            act_layer: _layer_t = 'gelu_tanh',
            conv_norm_eps: float = 1e-3,
            norm_eps: float = 1e-5,
            proj_drop: float = 0.,
            drop_path: float = 0.,
    ):
        super().__init__()
        self.conv = MbConvBlock(
            dim,
            dim_out,
            stride=stride,
            expand_ratio=expand_ratio,
            se_ratio=se_ratio,
            padding=padding,
            act_layer=act_layer,
            norm_eps=conv_norm_eps,
            drop_path=drop_path,
        )
        attn_kwargs = dict(
            head_dim=head_dim,
            mixer_kwargs=dict(partition_size=partition_size),
            mlp_ratio=mlp_ratio,
            proj_drop=proj_drop,
            drop_path=drop_path,
            act_layer=act_layer,
            norm_layer=LayerNorm,
            norm_eps=norm_eps,
        )
        self.attn_block = MixerBlock(dim_out, 'block', **attn_kwargs)
        self.attn_grid = MixerBlock(dim_out, 'grid', **attn_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x).permute(0, 2, 3, 1)
        x = self.attn_grid(self.attn_block(x))
        return x.permute(0, 3, 1, 2)
