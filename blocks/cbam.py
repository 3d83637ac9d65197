"""CBAM: Convolutional Block Attention Module (Woo et al., ECCV 2018), official semantics.

Channel gate then spatial gate, each multiplied into its input; (B, C, H, W) in and out.

    channel:  M_c = sigmoid(MLP(avgpool(x)) + MLP(maxpool(x))),  MLP = Linear(C, C/r) -> ReLU -> Linear(C/r, C)
    spatial:  M_s = sigmoid(BN(conv7x7(cat[max_c(x'), mean_c(x')])))  (conv bias=False, BN momentum 0.01)

This follows Jongchan/attention-module (MODELS/cbam.py), whose checkpoints use these parameter
names (ChannelGate.mlp.{1,3}, SpatialGate.spatial.{conv,bn}). `timm.layers.cbam.CbamModule` is a
different variant and cannot load those weights as-is: it pools the spatial map as (mean, max)
instead of (max, mean), its MLP is bias-free 1x1 convs by default, and its BN keeps momentum 0.1.
"""
from typing import Sequence

import torch
import torch.nn as nn
from timm.layers import ConvNormAct, EcaModule, SEModule

from zoo.kernels.backend import is_exporting

from ._registry import check_input, register_gate

__all__ = ['ChannelGate', 'SpatialGate', 'CBAM']


POOL_TYPES = ('avg', 'max', 'lp', 'lse')


def _pool(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Global pooling of (B, C, H, W) to (B, C): 'avg', 'max', 'lp' (the L2 norm, F.lp_pool2d(x, 2, (H, W))) or 'lse'."""
    if kind == 'avg':
        return x.mean((2, 3))
    if kind == 'max':
        return x.amax((2, 3))
    if kind == 'lp':
        return x.flatten(2).norm(p=2, dim=2)
    return x.flatten(2).logsumexp(2)


def _inplace_ok(x: torch.Tensor) -> bool:
    if torch.jit.is_scripting():
        return False
    else:
        return not (is_exporting() or torch.is_grad_enabled() and x.requires_grad)


class ChannelGate(nn.Module):
    """x * sigmoid(sum_p MLP(pool_p(x))): (B, C, H, W) -> (B, C, H, W). The MLP is shared by the pools."""

    def __init__(
            self,
            gate_channels: int,
            reduction_ratio: int = 16,
            pool_types: Sequence[str] = ('avg', 'max'),
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        hidden = gate_channels // reduction_ratio
        if hidden < 1:
            raise ValueError(f'reduction_ratio: expected <= gate_channels ({gate_channels}), got {reduction_ratio}')
        bad = [p for p in pool_types if p not in POOL_TYPES]
        if bad or not pool_types:
            raise ValueError(f'pool_types: expected a non-empty subset of {POOL_TYPES}, got {list(pool_types)}')
        self.gate_channels = gate_channels
        self.pool_types = tuple(pool_types)
        # Flatten at index 0 keeps the official indices mlp.1 / mlp.3 for the two Linear layers
        self.mlp = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(gate_channels, hidden, **dd),
            nn.ReLU(),
            nn.Linear(hidden, gate_channels, **dd),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        # all pooled vectors go through the shared MLP as one batch: (P * B, C)
        pooled = torch.cat([_pool(x, p) for p in self.pool_types], dim=0)
        att = self.mlp(pooled).unflatten(0, (len(self.pool_types), batch)).sum(0)
        return x * torch.sigmoid(att)[:, :, None, None]


class SpatialGate(nn.Module):
    """x * sigmoid(BN(conv(cat[max_c x, mean_c x]))): (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, kernel_size: int = 7, device=None, dtype=None):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f'kernel_size: expected an odd positive int, got {kernel_size}')
        self.spatial = ConvNormAct(
            2, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False, apply_act=False,
            norm_kwargs=dict(momentum=0.01), device=device, dtype=dtype,
        )

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The gate M_s: (B, C, H, W) -> (B, 1, H, W) in (0, 1)."""
        # (max, mean) order: the official weights depend on it
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.spatial(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x)


@register_gate('cbam', paper='CBAM (Woo et al., ECCV 2018)')
class CBAM(nn.Module):
    """Channel gate then spatial gate. A conv-stage gate: (B, C, H, W) -> (B, C, H, W), any H, W.

    Args:
        dim: channels C.
        reduction_ratio: MLP hidden width is C // reduction_ratio.
        pool_types: channel-gate poolings, any of 'avg', 'max', 'lp', 'lse'.
        no_spatial: drop the spatial gate.
        kernel_size: spatial-gate conv size.
    """
    def __init__(
            self,
            dim: int,
            reduction_ratio: int = 16,
            pool_types: Sequence[str] = ('avg', 'max'),
            no_spatial: bool = False,
            kernel_size: int = 7,
            device=None,
            dtype=None,
    ):
        super().__init__()
        self.dim = dim
        self.ChannelGate = ChannelGate(dim, reduction_ratio, pool_types, device=device, dtype=dtype)
        self.no_spatial = no_spatial
        self.SpatialGate = None if no_spatial else SpatialGate(kernel_size, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.dim, 'CBAM', channels_last=False)
        x = self.ChannelGate(x)
        if self.SpatialGate is None:
            return x
        gate = self.SpatialGate.attention(x)
        if _inplace_ok(x):
            return x.mul_(gate)  # x is our own channel-gated tensor: saves an allocation in inference
        return x * gate


@register_gate('se', paper='Squeeze-and-Excitation (Hu et al., CVPR 2018)')
def se_gate(channels: int, rd_ratio: float = 1. / 16, **kwargs) -> nn.Module:
    """timm's SEModule: x * sigmoid(MLP(avgpool(x))). (B, C, H, W) -> (B, C, H, W)."""
    return SEModule(channels, rd_ratio=rd_ratio, **kwargs)


@register_gate('eca', paper='ECA-Net (Wang et al., CVPR 2020)')
def eca_gate(channels: int, **kwargs) -> nn.Module:
    """timm's EcaModule: x * sigmoid(conv1d(avgpool(x))). (B, C, H, W) -> (B, C, H, W)."""
    return EcaModule(channels, **kwargs)
