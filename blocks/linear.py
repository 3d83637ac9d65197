"""Linear attention: the 'linear' mixer and its variants (Efficient Attention, FLatten, InLine, ...).

Every variant is non-causal linear attention over the whole map, ``O = phi(Q) (phi(K)^T V)`` with the method's
normaliser, computed by one op (`zoo.kernels.linear.linear_attention`: sums over tokens in fp32, fused Triton path),
plus the method's own feature map and local term:

* 'efficient' - `Efficient Attention: Attention with Linear Complexities` (Shen et al., WACV 2021),
  https://github.com/cmsflash/efficient-attention: K softmax over positions, Q softmax over each head's channels,
  no normaliser, then the reprojection (`queries`, `keys`, `values`, `reprojection`; the official 1 x 1 convs are
  linear layers here, channels-last).
* 'flatten' - `FLatten Transformer: Vision Transformer using Focused Linear Attention` (Han et al., ICCV 2023),
  https://github.com/LeapLabTHU/FLatten-Transformer (`FocusedLinearAttention`, the 2024 numerically fixed form):
  ReLU + 1e-6 feature map divided by a learned softplus scale, focusing factor p, a learned positional encoding
  added to K, a depthwise conv on V shared by the heads (`qkv`, `scale`, `positional_encoding`, `dwc`, `proj`).
* 'inline' - `Bridging the Divide: Reconsidering Softmax and Linear Attention` (Han et al., NeurIPS 2024),
  https://github.com/LeapLabTHU/InLine (`InLineAttention`): the injective form with the mean-of-V term and a 3 x 3
  depthwise conv on V whose weights are predicted from the mean token (`qkv`, `residual`, `proj`).
* 'mala' - `Rectifying Magnitude Neglect in Linear Attention` (Fan et al., ICCV 2025), https://github.com/qhfan/MALA
  (`AddLinearAttention`): ELU + 1, the magnitude-aware scale and offset with the normaliser taken before 2-D RoPE,
  LePE on V and a linear gate (`qkvo`, `lepe`, `proj`).
* 'l2vit' - `The Linear Attention Resurrection in Vision Transformer` (Zheng, 2025),
  https://github.com/ChuanyangZheng/L2ViT (`LinearAttention`): ReLU, per-head temperature, denominator clamped at
  100 (`qkv`, `temperature`, `proj`); its local concentration module is a block branch (`MixerBlock(local_layer=)`).

Parameter names and shapes are the official ones, so release checkpoints load by renaming prefixes only. Tables
sized to a map at construction (FLatten's positional encoding) are resized in the graph to the actual H x W, so
any size runs and one ONNX export serves every size. Feature maps run in fp32 whatever the input dtype.

Adding a variant: subclass `LinearAttention` in its own section below and decorate it with `register_variant`.
The mixer scripts (`torch.jit.script`): ops and helpers compile to their export form.
Everything channels-last: (B, H, W, C).
"""
import inspect
from typing import ClassVar, Dict, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import to_2tuple

from zoo.kernels.backend import is_exporting
from zoo.kernels.linear import linear_attention

from ._registry import check_input, register_mixer, resolve_heads
from .attention import apply_rope, check_rope_dim, rope_2d

# FX leaves, one graph node each: they read sizes and build per-size tables when called (any tracer; timm's registry
# lists them too, see __init__)
torch.fx.wrap('linear_attention')
torch.fx.wrap('_at_least_fp32')
torch.fx.wrap('rope_2d')
torch.fx.wrap('dynamic_dwconv3x3')
torch.fx.wrap('elu_plus_one')

__all__ = ['LinearAttention', 'register_variant', 'list_variants', 'resize_encoding']


_VARIANTS: Dict[str, Type['LinearAttention']] = {}


def register_variant(cls: Type['LinearAttention']) -> Type['LinearAttention']:
    """Class decorator: make the `LinearAttention` subclass `cls` available as
    ``create_mixer('linear', dim, variant=cls.name, ...)``."""
    if not cls.name or cls.name in _VARIANTS and _VARIANTS[cls.name] is not cls:
        raise ValueError(f'linear variant {cls.name!r}: expected a new, non-empty name')
    _VARIANTS[cls.name] = cls
    return cls


def list_variants() -> Tuple[str, ...]:
    """Names of the registered linear-attention variants."""
    return tuple(sorted(_VARIANTS))


def _variant_class(variant: str) -> Type['LinearAttention']:
    if variant not in _VARIANTS:
        raise ValueError(f'variant: expected one of {list_variants()}, got {variant!r}')
    return _VARIANTS[variant]


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Feature maps (powers, norms, exponentials) in fp32: half precision overflows in them."""
    return t.float() if t.dtype == torch.float16 or t.dtype == torch.bfloat16 else t


@register_mixer('linear', paper='Linear attention: Efficient Attention (WACV 2021), FLatten (ICCV 2023), '
                                'InLine (NeurIPS 2024), ...', cost='O(N d^2)', triton=True, torchscript=True)
class LinearAttention(nn.Module):
    """Linear attention over the whole map, one of several published variants. (B, H, W, dim) -> (B, H, W, dim),
    any H, W.

    ``LinearAttention(dim, variant=name, ...)`` builds the variant's subclass. A variant sets `name` and
    `normalizer` (one of `zoo.kernels.linear.NORMALIZERS`) and implements `configure` (its own keyword arguments,
    with the defaults of the official tiny model, checked and stored), `build` (its layers, under the official
    parameter names) and `mix` (the mixer's input (B, H, W, dim) to its output (B, H, W, dim)). The base provides
    `dim`, `num_heads`, `head_dim`, `attn_dim` (= num_heads * head_dim), `proj_drop` and the helpers `split_heads` /
    `merge_heads`.

    Args:
        dim: input and output channels.
        num_heads: attention heads (see `resolve_heads`).
        head_dim: channels per head (see `resolve_heads`).
        variant: 'flatten', 'inline', 'efficient', ... (`list_variants()`).
        qkv_bias: bias in the q / k / v projections.
        attn_drop: must be 0: linear attention has no attention matrix to drop from.
        proj_drop: dropout after the output projection.
        **variant_kwargs: the variant's own arguments (FLatten: focusing_factor, kernel_size, pe_size; InLine:
            kernel_func; Efficient: value_dim; MALA: kernel_size, rope; L2ViT: clamp_min), defaulting to the
            official tiny model's.
    """
    name: ClassVar[str] = ''
    normalizer: ClassVar[str] = ''
    no_weight_decay_keys = ()

    def __new__(cls, *args, **kwargs):
        if cls is LinearAttention:  # LinearAttention(dim, variant=...) builds the variant's class
            cls = _variant_class(args[3] if len(args) > 3 else kwargs.get('variant', 'flatten'))
        return super().__new__(cls)

    def __init__(
            self,
            dim: int,
            num_heads: Optional[int] = None,
            head_dim: Optional[int] = None,
            variant: str = 'flatten',
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            **variant_kwargs,
    ):
        super().__init__()
        if _variant_class(variant) is not type(self):
            raise ValueError(f'variant: {type(self).__name__} is the {self.name!r} variant, got {variant!r}')
        if attn_drop:
            raise ValueError(f'attn_drop: linear attention has no attention matrix to drop from; expected 0, '
                             f'got {attn_drop}')
        self.dim = dim
        self.num_heads, self.head_dim = resolve_heads(dim, num_heads, head_dim)
        self.attn_dim = self.num_heads * self.head_dim
        accepted = list(inspect.signature(self.configure).parameters)
        unknown = sorted(set(variant_kwargs) - set(accepted))
        if unknown:
            raise ValueError(f'variant {variant!r}: unexpected arguments {unknown}; it takes {accepted} (and the '
                             f'mixer contract: num_heads, head_dim, qkv_bias, attn_drop, proj_drop)')
        self.variant = variant
        self.configure(**variant_kwargs)
        self.build(qkv_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def configure(self) -> None:
        """Check and store the variant's own arguments (a variant takes them as keyword arguments here)."""

    def build(self, qkv_bias: bool) -> None:
        raise NotImplementedError

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, H, W, heads * d) -> (B, heads, H * W, d)."""
        B, H, W, _ = t.shape
        return t.reshape(B, H * W, self.num_heads, -1).transpose(1, 2)

    def merge_heads(self, t: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """(B, heads, H * W, d) -> (B, H, W, heads * d)."""
        return t.transpose(1, 2).reshape(t.shape[0], H, W, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.dim, 'LinearAttention')
        return self.mix(x)

    def extra_repr(self) -> str:
        extra = self.variant_repr()
        return f'dim={self.dim}, num_heads={self.num_heads}, variant={self.variant!r}' + (f', {extra}' if extra else '')

    def variant_repr(self) -> str:
        """The variant's own arguments, for `extra_repr`."""
        return ''


# the class's signature is __init__'s (inspect would report __new__'s `(*args, **kwargs)`): the registry lists it
LinearAttention.__signature__ = inspect.signature(LinearAttention.__init__).replace(
    parameters=list(inspect.signature(LinearAttention.__init__).parameters.values())[1:])


# ------------------------------------------------------------------------------------------------ efficient

@register_variant
class EfficientLinearAttention(LinearAttention):
    """Efficient Attention: per head, softmax of K over positions, of Q over channels; O = Q (K^T V), reprojected.

    Args:
        value_dim: value channels (official `value_channels`), default the attention width.
    """
    name = 'efficient'
    normalizer = 'none'

    def configure(self, value_dim: Optional[int] = None) -> None:
        value_dim = value_dim or self.attn_dim
        if value_dim % self.num_heads:
            raise ValueError(f'value_dim: expected a multiple of num_heads={self.num_heads}, got {value_dim}')
        self.value_dim = value_dim

    def build(self, qkv_bias: bool) -> None:
        self.keys = nn.Linear(self.dim, self.attn_dim, bias=qkv_bias)
        self.queries = nn.Linear(self.dim, self.attn_dim, bias=qkv_bias)
        self.values = nn.Linear(self.dim, self.value_dim, bias=qkv_bias)
        self.reprojection = nn.Linear(self.value_dim, self.dim)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        _, H, W, _ = x.shape
        q = _at_least_fp32(self.split_heads(self.queries(x))).softmax(dim=-1)  # over each head's channels
        k = _at_least_fp32(self.split_heads(self.keys(x))).softmax(dim=-2)  # over positions
        out = linear_attention(q, k, self.split_heads(self.values(x)), normalizer='none')
        return self.proj_drop(self.reprojection(self.merge_heads(out, H, W)))

    def variant_repr(self) -> str:
        return f'value_dim={self.value_dim}'


# ------------------------------------------------------------------------------------------------ flatten

def resize_encoding(table: torch.Tensor, size: Tuple[int, int], new_size: Tuple[int, int]) -> torch.Tensor:
    """A positional encoding (1, rows * cols, C) stored for a `size` = (rows, cols) map, bilinearly resized to
    `new_size` (ints, or traced sizes while exporting): (1, H, W, C); the identity at its own size."""
    table = table.reshape(1, size[0], size[1], -1).permute(0, 3, 1, 2)
    return F.interpolate(table, size=[new_size[0], new_size[1]], mode='bilinear', align_corners=False).permute(0, 2, 3, 1)


@register_variant
class FlattenLinearAttention(LinearAttention):
    """FLatten's focused linear attention (the 2024 numerically fixed form).

    phi(x) = f_p(ReLU(x) + 1e-6) / softplus(scale)) with f_p(t) = ||t|| t^p / ||t^p|| (norms over all attention
    channels, as official); K gets the learned positional encoding first; O = (q S) / (q . kbar + 1e-6) plus a
    depthwise conv on V shared by the heads.

    Args:
        focusing_factor: p > 0 (official 3).
        kernel_size: odd size of the depthwise conv on V (official 5).
        pe_size: (rows, cols) the positional encoding is stored at: the map the model is built for
            (FLatten-Swin: the stage's feature size at `img_size`, 56 in its first stage at 224 px); any other
            map size gets it bilinearly resized.
    """
    name = 'flatten'
    normalizer = 'flatten'

    def configure(self, focusing_factor: float = 3, kernel_size: int = 5,
                  pe_size: Union[int, Tuple[int, int]] = 56) -> None:
        if not isinstance(focusing_factor, (int, float)) or isinstance(focusing_factor, bool) or \
                not focusing_factor > 0:
            raise ValueError(f'focusing_factor: expected a number > 0, got {focusing_factor!r}')
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f'kernel_size: expected an odd positive int, got {kernel_size!r}')
        pe_size = tuple(to_2tuple(pe_size))
        if len(pe_size) != 2 or not all(isinstance(s, int) and s >= 1 for s in pe_size):
            raise ValueError(f'pe_size: expected a positive int or (rows, cols), got {pe_size!r}')
        self.focusing_factor, self.kernel_size, self.pe_size = focusing_factor, kernel_size, pe_size

    def build(self, qkv_bias: bool) -> None:
        d, rows, cols = self.head_dim, *self.pe_size
        self.qkv = nn.Linear(self.dim, self.attn_dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(self.attn_dim, self.dim)
        self.dwc = nn.Conv2d(d, d, self.kernel_size, padding=self.kernel_size // 2, groups=d)
        self.scale = nn.Parameter(torch.zeros(1, 1, self.attn_dim))
        self.positional_encoding = nn.Parameter(torch.zeros(1, rows * cols, self.attn_dim))  # official: zeros

    def resized_encoding(self, H: int, W: int) -> torch.Tensor:
        """The table resized to the map (in the graph: any size exports): (1, H, W, attn_dim)."""
        return resize_encoding(self.positional_encoding, self.pe_size, (H, W))

    def focus(self, t: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
        t = (F.relu(_at_least_fp32(t)) + 1e-6) * inv_scale
        # ||t|| t^p / ||t^p||, with t divided by its largest entry first: the same value (so the divisor needs no
        # gradient), and no power can overflow or underflow to 0 / 0. Entries are > 0, so the norms are > 0 and
        # are taken as sqrt(sum of squares), whose backward is cheaper than norm's
        norm = (t * t).sum(-1, keepdim=True).sqrt()
        t = (t * t.amax(dim=-1, keepdim=True).detach().reciprocal()) ** self.focusing_factor
        return t * (norm * (t * t).sum(-1, keepdim=True).rsqrt())

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, H, W, 3, self.attn_dim).unbind(3)
        k = _at_least_fp32(k) + self.resized_encoding(H, W)
        inv_scale = F.softplus(_at_least_fp32(self.scale)).reciprocal()
        q, k = self.focus(q, inv_scale), self.focus(k, inv_scale)
        out = linear_attention(self.split_heads(q), self.split_heads(k), self.split_heads(v), normalizer='flatten',
                               eps=1e-6)
        out = self.merge_heads(out, H, W)
        # the conv is shared by the heads: as one depthwise conv over all heads' channels with the weights repeated,
        # on the channels-last layout as it is (no copies; ~2x faster on CPU than heads moved to the batch)
        nh = self.num_heads
        dwc_bias = self.dwc.bias
        bias = None if dwc_bias is None else dwc_bias.repeat(nh)
        local = F.conv2d(v.permute(0, 3, 1, 2), self.dwc.weight.repeat(nh, 1, 1, 1), bias,
                         padding=self.kernel_size // 2, groups=self.attn_dim).permute(0, 2, 3, 1)
        return self.proj_drop(self.proj(out + local.to(out.dtype)))

    def variant_repr(self) -> str:
        return f'focusing_factor={self.focusing_factor}, kernel_size={self.kernel_size}, pe_size={self.pe_size}'


# ------------------------------------------------------------------------------------------------ inline

INLINE_KERNELS = ('identity', 'relu', 'leakyrelu', 'exp')


def dynamic_dwconv3x3(v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-sample 3 x 3 depthwise cross-correlation, zero padding 1: v (B, H, W, C), weight (B, C, 3, 3) ->
    (B, H, W, C). Eager: one conv with a group per (sample, channel). While exporting: nine shifted multiply-adds
    (the same sums), since a group count that depends on the batch cannot stay dynamic in an ONNX graph."""
    B, H, W, C = v.shape
    if not is_exporting():
        x = v.permute(0, 3, 1, 2).reshape(1, B * C, H, W)
        out = F.conv2d(x, weight.reshape(B * C, 1, 3, 3), padding=1, groups=B * C)
        return out.reshape(B, C, H, W).permute(0, 2, 3, 1)
    vp = F.pad(v, (0, 0, 1, 1, 1, 1))
    w = weight.permute(0, 2, 3, 1)[:, :, :, None, None, :]  # B, 3, 3, 1, 1, C
    out = vp[:, :H, :W] * w[:, 0, 0]
    for i in range(3):
        for j in range(3):
            if i != 0 or j != 0:
                out = out + vp[:, i:i + H, j:j + W] * w[:, i, j]
    return out


@register_variant
class InLineLinearAttention(LinearAttention):
    """InLine attention: O = s (q S) + (1 - s q . kbar) vbar with s = head_dim ** -0.5 (injective, rows of the
    implied attention sum to 1), plus a 3 x 3 depthwise conv on V whose weights a grouped two-layer 1 x 1 conv
    predicts from the mean input token.

    Args:
        kernel_func: feature map of Q and K: 'identity' (official default), 'relu', 'leakyrelu' or 'exp'
            (exp(0.2 x)).
    """
    name = 'inline'
    normalizer = 'inline'

    def configure(self, kernel_func: str = 'identity') -> None:
        if kernel_func not in INLINE_KERNELS:
            raise ValueError(f'kernel_func: expected one of {INLINE_KERNELS}, got {kernel_func!r}')
        self.kernel_func = kernel_func

    def build(self, qkv_bias: bool) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f'num_heads: the conv predicting the local weights is grouped by head, so num_heads '
                             f'must divide dim={self.dim}; got {self.num_heads}')
        self.qkv = nn.Linear(self.dim, self.attn_dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(self.attn_dim, self.dim)
        self.residual = nn.Sequential(
            nn.Conv1d(self.dim, self.attn_dim, kernel_size=1, groups=self.num_heads),
            nn.GELU(),
            nn.Conv1d(self.attn_dim, self.attn_dim * 9, kernel_size=1, groups=self.num_heads),
        )

    def feature_map(self, t: torch.Tensor) -> torch.Tensor:
        """`kernel_func` on Q or K (in fp32); 'identity' leaves them as they are."""
        if self.kernel_func == 'identity':
            return t
        t = _at_least_fp32(t)
        if self.kernel_func == 'relu':
            return F.relu(t)
        if self.kernel_func == 'leakyrelu':
            return F.leaky_relu(t)
        return (0.2 * t).exp()

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, H, W, 3, self.attn_dim).unbind(3)
        q, k = self.feature_map(q), self.feature_map(k)
        out = linear_attention(self.split_heads(q), self.split_heads(k), self.split_heads(v), normalizer='inline',
                               scale=self.head_dim ** -0.5)
        weight = self.residual(x.mean(dim=(1, 2))[:, :, None]).reshape(B, self.attn_dim, 3, 3)
        out = self.merge_heads(out, H, W) + dynamic_dwconv3x3(v, weight).to(out.dtype)
        return self.proj_drop(self.proj(out))

    def variant_repr(self) -> str:
        return f'kernel_func={self.kernel_func!r}'

# ------------------------------------------------------------------------------------------------ mala

class _EluPlusOne(torch.autograd.Function):
    """ELU(x) + 1 = relu(x) + exp(min(x, 0)), vectorised (F.elu's expm1 is not, on CPU); saves only its output y,
    since the gradient is y where x <= 0 and 1 elsewhere, i.e. min(y, 1)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(x) + x.clamp(max=0).exp()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        y, = ctx.saved_tensors
        return grad * y.clamp(max=1)


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """ELU(x) + 1, the same values and gradients as ``F.elu(x) + 1`` (several times faster on CPU, the memory of
    one saved tensor); exports and scripts as ``F.elu(x) + 1``."""
    if not torch.jit.is_scripting() and not is_exporting():
        return _EluPlusOne.apply(x)
    return F.elu(x) + 1


@register_variant
class MalaLinearAttention(LinearAttention):
    """MALA's magnitude-aware linear attention (qhfan/MALA `AddLinearAttention`).

    phi = ELU + 1 on q and k; the normaliser z = s q . kbar (s = head_dim ** -0.5) comes from these features, the
    numerator from them after MALA's 2-D RoPE (`zoo.blocks.attention.rope_2d`, computed for the actual map):
    O = s (q' S') (1 + 1 / (z + 1e-6)) - z vbar. Then LePE (depthwise conv on V) is added, the result is multiplied
    by the linear gate o, and projected. One projection `qkvo` gives q, k, v and o (official 1 x 1 convs
    `qkvo`, `lepe`, `proj`; linear layers here, channels-last).

    Args:
        kernel_size: odd size of the LePE depthwise conv on V (official 5).
        rope: rotate q and k by 2-D RoPE before the numerator (official True; head_dim divisible by 4).
    """
    name = 'mala'
    normalizer = 'mala'

    def configure(self, kernel_size: int = 5, rope: bool = True) -> None:
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f'kernel_size: expected an odd positive int, got {kernel_size!r}')
        self.kernel_size, self.rope = kernel_size, bool(rope)

    def build(self, qkv_bias: bool) -> None:
        if self.rope:
            check_rope_dim(self.head_dim)
        self.qkvo = nn.Linear(self.dim, self.attn_dim * 4, bias=qkv_bias)
        self.lepe = nn.Conv2d(self.attn_dim, self.attn_dim, self.kernel_size, padding=self.kernel_size // 2,
                              groups=self.attn_dim)
        self.proj = nn.Linear(self.attn_dim, self.dim)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        q, k, v, o = self.qkvo(x).reshape(B, H, W, 4, self.attn_dim).unbind(3)
        q = elu_plus_one(_at_least_fp32(self.split_heads(q)))
        k = elu_plus_one(_at_least_fp32(self.split_heads(k)))
        q_rot, k_rot = q, k
        if self.rope:
            sin, cos = rope_2d(H, W, self.head_dim, device=x.device, dtype=q.dtype)  # q: fp32 or fp64
            q_rot, k_rot = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
        out = linear_attention(q_rot, k_rot, self.split_heads(v), normalizer='mala', scale=self.head_dim ** -0.5,
                               eps=1e-6, q_norm=q, k_norm=k)
        local = self.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        out = self.merge_heads(out, H, W) + local.to(out.dtype)
        return self.proj_drop(self.proj(out * o.to(out.dtype)))

    def variant_repr(self) -> str:
        return f'kernel_size={self.kernel_size}, rope={self.rope}'


# ------------------------------------------------------------------------------------------------ l2vit

@register_variant
class L2ViTLinearAttention(LinearAttention):
    """L2ViT's linear global attention (ChuanyangZheng/L2ViT `LinearAttention`).

    phi = ReLU on q and k; O = t_h (q sum_j k_j^T v_j) / max(q . sum_j k_j, clamp_min) with a learned per-head
    temperature t_h (official init head_dim ** -0.5; a 3-D parameter, so the official recipe decays it) and the
    official floor of 100 on the denominator. Parameters `qkv`, `temperature`, `proj` as official.

    The local concentration module (LCM: depthwise 7 x 7 -> GELU -> BatchNorm -> depthwise 7 x 7) is not part of
    the mixer: officially it is a residual branch of its own, with its own norm, after the attention branch of
    the LGA block; `MixerBlock(local_layer='lcm')` adds it there.

    Args:
        clamp_min: floor of the denominator (official 100).
    """
    name = 'l2vit'
    normalizer = 'l2vit'

    def configure(self, clamp_min: float = 100.) -> None:
        if not isinstance(clamp_min, (int, float)) or isinstance(clamp_min, bool) or not clamp_min > 0:
            raise ValueError(f'clamp_min: expected a number > 0, got {clamp_min!r}')
        self.clamp_min = float(clamp_min)

    def build(self, qkv_bias: bool) -> None:
        self.qkv = nn.Linear(self.dim, self.attn_dim * 3, bias=qkv_bias)
        self.temperature = nn.Parameter(torch.full((self.num_heads, 1, 1), self.head_dim ** -0.5))
        self.proj = nn.Linear(self.attn_dim, self.dim)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, H, W, 3, self.attn_dim).unbind(3)
        q = F.relu(_at_least_fp32(self.split_heads(q)))
        k = F.relu(_at_least_fp32(self.split_heads(k)))
        out = linear_attention(q, k, self.split_heads(v), normalizer='l2vit', clamp_min=self.clamp_min)
        out = out * self.temperature.to(out.dtype)
        return self.proj_drop(self.proj(self.merge_heads(out, H, W)))

    def variant_repr(self) -> str:
        return f'clamp_min={self.clamp_min}'
