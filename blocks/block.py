"""The one pre-norm residual block every attention stage is built from, and the layers around it.

    x = x + pos_embed(x)                                  (optional depthwise conv position embedding)
    (no mixer branch when mixer is None: SHViT's first-stage blocks and its downsample's conv / FFN pairs)
    x = x + drop_path(gamma1 * mixer(norm1(x)))           (mixer from `create_mixer`, layer scale optional; a mixer
                                                           that reads a stage context gets it: mixer(norm1(x), ctx))
    x = x + drop_path(local(norm3(x)))                    (optional local branch: L2ViT's LCM)
    x = x + pos_embed2(x)                                 (optional second position embedding: L2ViT's LWA)
    x = x + drop_path(gamma2 * mlp(norm2(x)))             (MLP, or MLP with a depthwise conv)

Swin, NAT / DiNAT / DiNAT_s and MaxViT's partition attention are this block with another mixer; per-block
variation (shift, dilation, window, ...) arrives as mixer kwargs. Parameter names (`norm1`, `attn`,
`norm2`, `mlp.fc1`, `mlp.fc2`, `gamma1`, `gamma2`) are those of the official Swin / NAT / timm checkpoints.
Everything channels-last: (B, H, W, C).
"""
from functools import partial
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ConvNormAct, DropPath, LayerNorm2d, Mlp, SqueezeExcite, get_act_layer, to_2tuple, trunc_normal_

from zoo.kernels._sizes import ceil_div
from zoo.kernels.backend import is_exporting

from ._registry import create_mixer
from .gcvit import GlobalQueryGen, MbConvDownsample
from .window import pad_to_windows

__all__ = [
    'MixerBlock', 'DwConvMlp', 'ConvPosEmbed', 'PatchMerging', 'ConvDownsample', 'ConvBnDownsample', 'ConvTokenizer',
    'create_downsample', 'ResDwConvMlp', 'LocalConcentration', 'NormConvDownsample', 'ConvBnMlp',
    'BatchNormChannelsLast', 'SeMerging', 'AbsPosEmbed', 'resize_pos_table', 'create_stage_context',
]

# FX leaf, one graph node: it reads sizes (any tracer; timm's registry lists it too, see __init__)
torch.fx.wrap('resize_pos_table')

_layer_t = Union[str, Callable[..., nn.Module]]


class ConvPosEmbed(nn.Module):
    """Conditional position embedding: x + depthwise conv(x), or x + BatchNorm(depthwise conv(x)) with `bn`
    (the conv then has no bias: SHViT). (B, H, W, C) -> (B, H, W, C)."""

    def __init__(self, dim: int, kernel_size: int = 3, bn: bool = False):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=not bn)
        self.bn = nn.BatchNorm2d(dim) if bn else None
        if self.bn is not None:
            nn.init.zeros_(self.bn.weight)  # the residual branch starts as identity (SHViT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x.permute(0, 3, 1, 2))
        if self.bn is not None:
            y = self.bn(y)
        return x + y.permute(0, 2, 3, 1)


class BatchNormChannelsLast(nn.BatchNorm2d):
    """BatchNorm2d (running statistics, momentum 0.1) over the channels of a channels-last map (VAN's block norms).

    (B, H, W, C) -> (B, H, W, C); the parameter and buffer names are BatchNorm2d's.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(num_features, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # written out (no super().forward): TorchScript has no super() and FX cannot trace BatchNorm2d's size check
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        x = F.batch_norm(x.permute(0, 3, 1, 2), self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, 0.1, self.eps)
        return x.permute(0, 2, 3, 1)


class ConvBnMlp(nn.Module):
    """1x1 conv + BN -> act -> 1x1 conv + BN (SHViT's FFN; the last BN starts at zero).

    (B, H, W, C) -> (B, H, W, C), computed channels-first.
    """

    def __init__(self, in_features: int, hidden_features: int, act_layer: Callable[..., nn.Module] = nn.ReLU,
                 drop: float = 0.):
        super().__init__()
        self.fc1 = ConvNormAct(in_features, hidden_features, 1, apply_act=False)
        self.act = act_layer()
        self.drop = nn.Dropout(drop)
        self.fc2 = ConvNormAct(hidden_features, in_features, 1, apply_act=False)
        nn.init.zeros_(self.fc2.bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc2(self.drop(self.act(self.fc1(x.permute(0, 3, 1, 2)))))
        return x.permute(0, 2, 3, 1)


def resize_pos_table(table: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A (1, h, w, C) position table resized to (1, height, width, C): bicubic, align_corners=False (the
    resize of VOLO's official fine-tuning and of ViTDet-style detection code), the table itself at its own size.
    While exporting it always interpolates (the identity at the table's size), so one graph serves any size."""
    if not is_exporting() and table.shape[1] == height and table.shape[2] == width:
        return table
    out = F.interpolate(table.permute(0, 3, 1, 2), size=[height, width], mode='bicubic', align_corners=False)
    return out.permute(0, 2, 3, 1)


class AbsPosEmbed(nn.Module):
    """Learned absolute position embedding sized to a grid, added to a map of any size (the table resized in the
    graph by `resize_pos_table`). (B, H, W, C) -> (B, H, W, C)."""
    no_weight_decay_keys = ('table',)

    def __init__(self, dim: int, grid_size: Union[int, Sequence[int]]):
        super().__init__()
        gh, gw = to_2tuple(grid_size)
        self.table = nn.Parameter(torch.zeros(1, gh, gw, dim))
        trunc_normal_(self.table, std=.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + resize_pos_table(self.table, x.shape[1], x.shape[2])


class DwConvMlp(nn.Module):
    """fc1 -> 3x3 depthwise conv -> act -> fc2 (the PVTv2-style MLP). (B, H, W, C) -> (B, H, W, C)."""

    def __init__(self, in_features: int, hidden_features: int, act_layer: Callable[..., nn.Module] = nn.GELU,
                 drop: float = 0.):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = nn.Conv2d(hidden_features, hidden_features, 3, padding=1, groups=hidden_features)
        self.act = act_layer()
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.fc2(self.drop(self.act(x)))


class ResDwConvMlp(nn.Module):
    """fc1 -> act -> x + 3x3 depthwise conv(x) -> fc2 (MALA's FFN). (B, H, W, C) -> (B, H, W, C)."""

    def __init__(self, in_features: int, hidden_features: int, act_layer: Callable[..., nn.Module] = nn.GELU,
                 drop: float = 0.):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.dwconv = nn.Conv2d(hidden_features, hidden_features, 3, padding=1, groups=hidden_features)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(x))
        x = x + self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.drop(self.fc2(x))


class LocalConcentration(nn.Module):
    """L2ViT's local concentration module: 7x7 depthwise conv -> act -> BatchNorm -> 7x7 depthwise conv.

    (B, H, W, C) -> (B, H, W, C).
    """

    def __init__(self, dim: int, kernel_size: int = 7, act_layer: Callable[..., nn.Module] = nn.GELU):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.act = act_layer()
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.bn(self.act(self.conv1(x.permute(0, 3, 1, 2)))))
        return x.permute(0, 2, 3, 1)


_MLPS = {'mlp': Mlp, 'dwconv_mlp': DwConvMlp, 'res_dwconv_mlp': ResDwConvMlp, 'conv_bn_mlp': ConvBnMlp}
_LOCAL_LAYERS = {'lcm': LocalConcentration}
_POS_EMBEDS = {'conv': ConvPosEmbed, 'conv_bn': partial(ConvPosEmbed, bn=True)}
# channels-last norms by name; each is built as norm(dim, eps=norm_eps)
_NORMS = {'layernorm': nn.LayerNorm, 'batchnorm': BatchNormChannelsLast, 'identity': nn.Identity}


class MixerBlock(nn.Module):
    """Pre-norm residual block around any registered mixer. (B, H, W, dim) -> (B, H, W, dim).

    Args:
        dim: channels.
        mixer: registered mixer name (see `list_mixers()`), or None for no mixer branch (and no norm1).
        mixer_kwargs: the mixer's family arguments (window_size, shift_size, kernel_size, dilation, ...).
        num_heads, head_dim, qkv_bias, attn_drop: the mixer contract's arguments.
        proj_drop: dropout after the mixer's projection and in the MLP.
        mlp_ratio: MLP hidden width / dim.
        mlp_layer: 'mlp' (Linear-act-Linear), 'dwconv_mlp' (with a 3x3 depthwise conv), 'res_dwconv_mlp'
            (fc1, act, then a residual 3x3 depthwise conv, fc2: MALA) or 'conv_bn_mlp' (1x1 conv + BN pairs: SHViT).
        pos_embed: kernel size of a depthwise conv position embedding before the block, 0 for none.
        pos_embed_layer: kind of both position embeddings: 'conv' (with bias) or 'conv_bn' (conv, BatchNorm: SHViT).
        mlp_pos_embed: kernel size of a second one between the mixer and the MLP branches (L2ViT's LWA block).
        local_layer: None, or 'lcm': a third residual branch between the mixer and the MLP, x + drop_path(
            lcm(norm3(x))), with L2ViT's local concentration module (its LGA block).
        layer_scale: init of the per-channel scales `gamma1` / `gamma2`, None for none.
        drop_path: stochastic depth rate of both branches.
        act_layer: MLP activation (name or class).
        norm_layer: norm over channels: a name ('layernorm', 'batchnorm', 'identity') or a class, built as
            norm_layer(dim, eps=norm_eps).
        norm_eps: norm epsilon.
    """

    def __init__(
            self,
            dim: int,
            mixer: Optional[str] = 'window',
            mixer_kwargs: Optional[Mapping[str, Any]] = None,
            num_heads: Optional[int] = None,
            head_dim: Optional[int] = None,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            mlp_ratio: float = 4.,
            mlp_layer: str = 'mlp',
            pos_embed: int = 0,
            layer_scale: Optional[float] = None,
            drop_path: float = 0.,
            act_layer: _layer_t = 'gelu',
            norm_layer: Union[str, Callable[..., nn.Module]] = nn.LayerNorm,
            norm_eps: float = 1e-5,
            mlp_pos_embed: int = 0,
            local_layer: Optional[str] = None,
            pos_embed_layer: str = 'conv',
    ):
        super().__init__()
        if isinstance(norm_layer, str):
            if norm_layer not in _NORMS:
                raise ValueError(f'norm_layer: expected one of {sorted(_NORMS)} or a class, got {norm_layer!r}')
            norm_layer = _NORMS[norm_layer]
        if pos_embed_layer not in _POS_EMBEDS:
            raise ValueError(f'pos_embed_layer: expected one of {sorted(_POS_EMBEDS)}, got {pos_embed_layer!r}')
        pos_embed_cls = _POS_EMBEDS[pos_embed_layer]
        if mlp_layer not in _MLPS:
            raise ValueError(f'mlp_layer: expected one of {sorted(_MLPS)}, got {mlp_layer!r}')
        if local_layer is not None and local_layer not in _LOCAL_LAYERS:
            raise ValueError(f'local_layer: expected None or one of {sorted(_LOCAL_LAYERS)}, got {local_layer!r}')
        self.pos_embed = pos_embed_cls(dim, pos_embed) if pos_embed else None
        if mixer is None:
            self.norm1 = self.attn = None
        else:
            self.norm1 = norm_layer(dim, eps=norm_eps)
            self.attn = create_mixer(
                mixer, dim, num_heads=num_heads, head_dim=head_dim, qkv_bias=qkv_bias, attn_drop=attn_drop,
                proj_drop=proj_drop, **(mixer_kwargs or {}))
            context = getattr(self.attn, 'stage_context', None)
            if context is not None:
                # set only on blocks whose mixer reads the stage context: TorchScript resolves hasattr while compiling
                self.stage_context = context
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        act = get_act_layer(act_layer) if isinstance(act_layer, str) else act_layer
        if local_layer is not None:
            self.norm3 = norm_layer(dim, eps=norm_eps)
            self.local = _LOCAL_LAYERS[local_layer](dim, act_layer=act)
        else:
            self.local = None
        self.pos_embed2 = pos_embed_cls(dim, mlp_pos_embed) if mlp_pos_embed else None
        self.norm2 = norm_layer(dim, eps=norm_eps)
        self.mlp = _MLPS[mlp_layer](dim, int(dim * mlp_ratio), act_layer=act, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        scaled = layer_scale is not None
        self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale))) if scaled and mixer is not None else None
        self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale))) if scaled else None

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, H, W, dim) -> (B, H, W, dim); `context`: the stage context (e.g. GC ViT's global query), given to
        the mixer if it reads one (`mixer.stage_context`), ignored otherwise."""
        if self.pos_embed is not None:
            x = self.pos_embed(x)
        if self.attn is not None and self.norm1 is not None:
            if hasattr(self, 'stage_context'):
                y = self.attn(self.norm1(x), context)
            else:
                y = self.attn(self.norm1(x))
            x = x + self.drop_path1(y if self.gamma1 is None else self.gamma1 * y)
        if self.local is not None:
            x = x + self.drop_path1(self.local(self.norm3(x)))
        if self.pos_embed2 is not None:
            x = self.pos_embed2(x)
        y = self.mlp(self.norm2(x))
        x = x + self.drop_path2(y if self.gamma2 is None else self.gamma2 * y)
        return x


class PatchMerging(nn.Module):
    """Swin's downsample: concatenate each 2x2 patch (official order), norm, project.

    (B, H, W, dim) -> (B, ceil(H / 2), ceil(W / 2), out_dim); odd H or W is zero-padded at the bottom / right.
    """

    def __init__(self, dim: int, out_dim: Optional[int] = None, norm_layer: Callable[..., nn.Module] = nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.out_dim = out_dim or 2 * dim
        self.norm = norm_layer(4 * dim)
        self.reduction = nn.Linear(4 * dim, self.out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        h, w = ceil_div(H, 2), ceil_div(W, 2)  # no modulo of the size: exports stay dynamic and fast
        x = F.pad(x, (0, 0, 0, 2 * w - W, 0, 2 * h - H))
        # channel blocks ordered (row 0, col 0), (row 1, col 0), (row 0, col 1), (row 1, col 1)
        x = x.reshape(B, h, 2, w, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class ConvDownsample(nn.Module):
    """Stride-2 conv + LayerNorm. (B, H, W, dim) -> (B, ceil(H/2), ceil(W/2), out_dim).

    NAT's downsample: kernel_size=3 (padding 1), no bias. Twins' patch embedding: kernel_size=2 with bias; odd H
    or W is then zero-padded at the bottom / right (every pixel is used, none cropped).
    """

    def __init__(self, dim: int, out_dim: Optional[int] = None, norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
                 kernel_size: int = 3, bias: bool = False):
        super().__init__()
        if kernel_size not in (2, 3):
            raise ValueError(f'kernel_size: expected 2 or 3, got {kernel_size!r}')
        self.pad_to_even = kernel_size == 2
        self.reduction = nn.Conv2d(dim, out_dim or 2 * dim, kernel_size=kernel_size, stride=2,
                                   padding=kernel_size // 2 if kernel_size == 3 else 0, bias=bias)
        self.norm = norm_layer(out_dim or 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_to_even:
            x = pad_to_windows(x, (2, 2))
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class ConvTokenizer(nn.Module):
    """NAT's stem: two 3x3 stride-2 convs (no activation between) + LayerNorm.

    (B, C, H, W) -> (B, dim, ceil(H / 4), ceil(W / 4)).
    """

    def __init__(self, in_chans: int, dim: int, norm_eps: float = 1e-5):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, dim // 2, kernel_size=3, stride=2, padding=1),
            nn.Conv2d(dim // 2, dim, kernel_size=3, stride=2, padding=1),
        )
        self.norm = LayerNorm2d(dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class ConvBnDownsample(nn.Module):
    """BiFormer's downsample: 3x3 stride-2 conv (with bias) + BatchNorm.

    (B, H, W, dim) -> (B, ceil(H / 2), ceil(W / 2), out_dim).
    """

    def __init__(self, dim: int, out_dim: Optional[int] = None):
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim or 2 * dim, kernel_size=3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(out_dim or 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)


class NormConvDownsample(nn.Module):
    """L2ViT's downsample: LayerNorm, then a 2x2 stride-2 conv (with bias); odd H or W is zero-padded at the
    bottom / right after the norm. Without `norm_layer` (None), VOLO's plain 2x2 conv ('conv2x2').
    (B, H, W, dim) -> (B, ceil(H / 2), ceil(W / 2), out_dim)."""

    def __init__(self, dim: int, out_dim: Optional[int] = None,
                 norm_layer: Optional[Callable[..., nn.Module]] = nn.LayerNorm):
        super().__init__()
        self.norm = norm_layer(dim) if norm_layer is not None else nn.Identity()
        self.conv = nn.Conv2d(dim, out_dim or 2 * dim, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_to_windows(self.norm(x), (2, 2))
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class SeMerging(nn.Module):
    """SHViT's downsample: a conv block (residual 3x3 depthwise conv + BN, residual conv-BN FFN) at each width
    around an inverted residual with squeeze-excite: 1x1 conv + BN (4x) -> act -> 3x3 stride-2 depthwise conv + BN ->
    act -> SE -> 1x1 conv + BN. (B, H, W, dim) -> (B, ceil(H / 2), ceil(W / 2), out_dim); the convs run channels-first.
    """

    def __init__(self, dim: int, out_dim: Optional[int] = None, act_layer: _layer_t = 'relu'):
        super().__init__()
        out_dim = out_dim or 2 * dim
        hidden = 4 * dim
        act = get_act_layer(act_layer) if isinstance(act_layer, str) else act_layer
        conv_block = partial(MixerBlock, mixer=None, mlp_ratio=2., mlp_layer='conv_bn_mlp', pos_embed=3,
                             pos_embed_layer='conv_bn', norm_layer='identity', act_layer=act)
        self.pre = conv_block(dim)
        self.conv1 = ConvNormAct(dim, hidden, 1, act_layer=act)
        self.conv2 = ConvNormAct(hidden, hidden, 3, stride=2, groups=hidden, act_layer=act)
        self.se = SqueezeExcite(hidden, rd_ratio=0.25)
        self.conv3 = ConvNormAct(hidden, out_dim, 1, apply_act=False)
        self.post = conv_block(out_dim)
        for block in (self.pre, self.post):  # unlike the blocks' own, these depthwise branches start at full weight
            nn.init.ones_(block.pos_embed.bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x).permute(0, 3, 1, 2)
        x = self.conv3(self.se(self.conv2(self.conv1(x))))
        return self.post(x.permute(0, 2, 3, 1))


_DOWNSAMPLES = {'patch_merging': PatchMerging, 'conv': ConvDownsample, 'conv_bn': ConvBnDownsample,
                'norm_conv': NormConvDownsample, 'se_merging': SeMerging,
                'conv2x2': partial(NormConvDownsample, norm_layer=None), 'mbconv': MbConvDownsample}


def create_downsample(name: str, dim: int, out_dim: int, **kwargs) -> nn.Module:
    """A channels-last stride-2 downsample by name ('patch_merging', 'conv', 'conv_bn', 'norm_conv', 'se_merging',
    'conv2x2', 'mbconv')."""
    if name not in _DOWNSAMPLES:
        raise ValueError(f'downsample: expected one of {sorted(_DOWNSAMPLES)}, got {name!r}')
    return _DOWNSAMPLES[name](dim, out_dim, **kwargs)


# stage contexts: computed once per stage from its input (after the downsample), handed to every block; a mixer
# that reads one names it in `stage_context`
_STAGE_CONTEXTS = {'global_query': GlobalQueryGen}


def create_stage_context(name: str, dim: int, **kwargs) -> nn.Module:
    """A stage context by name ('global_query': GC ViT's global query): (B, H, W, dim) -> the context tensor."""
    if name not in _STAGE_CONTEXTS:
        raise ValueError(f'context: expected one of {sorted(_STAGE_CONTEXTS)}, got {name!r}')
    return _STAGE_CONTEXTS[name](dim, **kwargs)
