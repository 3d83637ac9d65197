"""Gated ResNets: ResNet-18/34/50 with a conv-stage gate in every residual block. CBAM (Woo et al., ECCV 2018) by
default; Polarized Self-Attention (psa_resnet50) and Efficient Local Attention (ela_resnet18/50) on the same
scaffolding, any registered gate by `attn_layer`.

Follows the official Jongchan/attention-module (MODELS/model_resnet.py): 7x7/2 conv + BN + ReLU +
3x3/2 max-pool stem; BasicBlock / Bottleneck with the stride on the 3x3 conv (torchvision "v1.5")
and CBAM(C_out, 16) after the block's last BN, before the residual add; 1x1 conv + BN shortcut where
the shape changes; global average pool + linear classifier.

The residual blocks are timm's own (`timm.models.resnet`), with CBAM as their attention layer, so
a block's CBAM lives at `.se`; `checkpoint_filter_fn` maps the official key layout onto ours.

Where the gate sits (`attn_pos`): 'last' is timm's `se` slot, after the block's last conv + BN, before the
residual add (CBAM, SE, ELA); 'mid' is timm's `aa` slot, after the block's first 3x3 conv + BN + ReLU, where the
official HRNet-PSA puts its PSA (`deattn`, after conv1 of its BasicBlock) and where the Bottleneck's 3x3 conv is.
"""
from collections import OrderedDict
from functools import partial
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, DropPath
from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, downsample_conv

from zoo.blocks import create_gate
from zoo.blocks.cbam import CBAM
from zoo.weights.keymap import KeyMap, KeyRule, make_filter

from ._hierarchical import HierarchicalBackbone, Stage, build_backbone, default_cfg

__all__ = ['CbamResNet', 'KEY_MAP', 'checkpoint_filter_fn']

_BLOCKS = {'basic': BasicBlock, 'bottleneck': Bottleneck}
_ATTN_POS = ('last', 'mid')


class CbamResNet(HierarchicalBackbone):
    """ResNet with CBAM in every block. (B, in_chans, H, W) -> (B, num_classes); stages at strides 4, 8, 16, 32.

    Args:
        layers: blocks per stage.
        block: 'basic' (ResNet-18/34) or 'bottleneck' (ResNet-50+).
        num_classes, in_chans, global_pool, drop_rate: as in timm.
        drop_path_rate: stochastic depth, linear over blocks (0 in the official recipe).
        reduction_ratio: CBAM channel-MLP reduction.
        zero_init_last: zero the last BN of each block (off in the official recipe).
        attn_layer: the registered gate of every block ('cbam', 'psa_s', 'ela', ...; see `zoo mixers`).
        attn_kwargs: the gate's arguments (for 'cbam', `reduction_ratio` is used unless given here).
        attn_pos: 'last' (after the last conv + BN, timm's `.se`) or 'mid' (after the first 3x3 conv + BN + ReLU,
            timm's `.aa`).
    """
    min_input_size = 32

    def __init__(
            self,
            layers: Sequence[int] = (2, 2, 2, 2),
            block: str = 'basic',
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            reduction_ratio: int = 16,
            zero_init_last: bool = False,
            attn_layer: str = 'cbam',
            attn_kwargs: Optional[Mapping[str, Any]] = None,
            attn_pos: str = 'last',
    ):
        super().__init__()
        if attn_pos not in _ATTN_POS:
            raise ValueError(f'attn_pos: expected one of {_ATTN_POS}, got {attn_pos!r}')
        if block not in _BLOCKS:
            raise ValueError(f'block: expected one of {sorted(_BLOCKS)}, got {block!r}')
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f'layers: expected 4 positive block counts, got {tuple(layers)}')
        block_cls = _BLOCKS[block]
        stem_width = 64
        stem = nn.Sequential(OrderedDict([
            ('conv', nn.Conv2d(in_chans, stem_width, kernel_size=7, stride=2, padding=3, bias=False)),
            ('bn', nn.BatchNorm2d(stem_width)),
            ('act', nn.ReLU(inplace=True)),
            ('pool', nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]))

        attn_kwargs = dict(attn_kwargs or {})
        if attn_layer == 'cbam':
            attn_kwargs.setdefault('reduction_ratio', reduction_ratio)
        gate = partial(create_gate, attn_layer, **attn_kwargs)
        n_blocks = sum(layers)
        dpr = [drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]  # linear, as torch.linspace
        stages, feature_info = [], []
        in_chs, reduction, block_idx = stem_width, 4, 0
        for i, (planes, depth) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            out_chs = planes * block_cls.expansion
            blocks = []
            for j in range(depth):
                s = stride if j == 0 else 1
                shortcut = None
                if s != 1 or in_chs != out_chs:
                    shortcut = downsample_conv(in_chs, out_chs, kernel_size=1, stride=s)
                blk = block_cls(
                    in_chs, planes, stride=s, downsample=shortcut, attn_layer=gate if attn_pos == 'last' else None,
                    drop_path=DropPath(dpr[block_idx]) if dpr[block_idx] > 0 else None,
                )
                if attn_pos == 'mid':
                    blk.aa = gate(planes)  # the first 3x3 conv's width (base width 64, one group)
                blocks.append(blk)
                in_chs = out_chs
                block_idx += 1
            stages.append(Stage(blocks))
            feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f'stages.{i}'))

        head = ClassifierHead(in_chs, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.init_backbone(stem, stages, feature_info, None, head, num_classes, in_chans, in_chs)
        self._init_weights(zero_init_last)

    def _init_weights(self, zero_init_last: bool) -> None:
        # the official init: He (fan_out) convs, unit BN, zero biases, and a zero-weight spatial-gate BN
        # so every spatial gate starts at sigmoid(0) = 0.5
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, CBAM) and m.SpatialGate is not None:
                nn.init.zeros_(m.SpatialGate.spatial.bn.weight)
            elif zero_init_last and hasattr(m, 'zero_init_last'):
                m.zero_init_last()
        if isinstance(self.head.fc, nn.Linear):
            nn.init.kaiming_normal_(self.head.fc.weight)


# Official Jongchan/attention-module ResNet checkpoints (the full training checkpoint {'state_dict': ...,
# 'optimizer': ...} or its state dict, DataParallel `module.` prefix or not): conv1, bn1,
# layer{1-4}.{j}.* with the block's CBAM at `.cbam` (ChannelGate.mlp.{1,3}, SpatialGate.spatial.{conv,bn}), fc.
KEY_MAP = KeyMap(rules=(
    KeyRule(r'^conv1\.', 'stem.conv.'),
    KeyRule(r'^bn1\.', 'stem.bn.'),
    KeyRule(r'^fc\.', 'head.fc.'),
    KeyRule(r'^layer(\d)\.(\d+)\.cbam\.', lambda m: f'layer{m.group(1)}.{m.group(2)}.se.'),
    KeyRule(r'^layer(\d)\.(\d+)\.', lambda m: f'stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}.'),
))
checkpoint_filter_fn = make_filter(KEY_MAP)


def _create(variant: str, pretrained: bool = False, **kwargs) -> CbamResNet:
    return build_backbone(CbamResNet, variant, pretrained, checkpoint_filter_fn=KEY_MAP, **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    # the official evaluation: Resize(256) + CenterCrop(224), bilinear, ImageNet mean/std
    kwargs = dict(dict(license='mit', origin_url='https://github.com/Jongchan/attention-module',
                       paper_ids='arXiv:1807.06521'), **kwargs)
    return default_cfg(crop_pct=0.875, interpolation='bilinear', **kwargs)


default_cfgs = generate_default_cfgs({
    'cbam_resnet18': _cfg(notes=('no official weights: the official repo releases only ResNet-50+CBAM',)),
    'cbam_resnet34': _cfg(notes=('no official weights: the official repo releases only ResNet-50+CBAM',)),
    'cbam_resnet50.official_in1k': _cfg(notes=(
        'official ResNet50+CBAM, 100 epochs, ImageNet-1k top-1 77.622 / top-5 93.948',
        'weights are on Google Drive only (no direct url): download '
        'https://drive.google.com/file/d/1mvAVvhLR_2XY_bPYxh-SEz4vDmGzSArO/view by hand and load it with '
        'pretrained=True, pretrained_cfg_overlay=dict(file=PATH); checkpoint_filter_fn converts it',
    )),
    'psa_resnet50': _cfg(
        origin_url='https://github.com/DeLightCMU/PSA', paper_ids='arXiv:2107.00782', license='',
        notes=('no official weights: the official repo releases HRNet-PSA (segmentation / keypoints) only',)),
    'ela_resnet18': _cfg(origin_url='', paper_ids='arXiv:2403.01123', license='',
                         notes=('no official code or weights',)),
    'ela_resnet50': _cfg(origin_url='', paper_ids='arXiv:2403.01123', license='',
                         notes=('no official code or weights',)),
})


# shallow, same structure (the ResNet widths are fixed; see zoo.reduced_args)
REDUCED_ARGS = {'cbam_resnet*': dict(layers=(1, 1, 1, 1)), 'psa_resnet*': dict(layers=(1, 1, 1, 1)),
                'ela_resnet*': dict(layers=(1, 1, 1, 1))}


@register_model
def cbam_resnet18(pretrained: bool = False, **kwargs) -> CbamResNet:
    """ResNet-18 + CBAM (11.78M params)."""
    return _create('cbam_resnet18', pretrained, **dict(dict(layers=(2, 2, 2, 2), block='basic'), **kwargs))


@register_model
def cbam_resnet34(pretrained: bool = False, **kwargs) -> CbamResNet:
    """ResNet-34 + CBAM (21.96M params)."""
    return _create('cbam_resnet34', pretrained, **dict(dict(layers=(3, 4, 6, 3), block='basic'), **kwargs))


@register_model
def cbam_resnet50(pretrained: bool = False, **kwargs) -> CbamResNet:
    """ResNet-50 + CBAM (28.09M params)."""
    return _create('cbam_resnet50', pretrained, **dict(dict(layers=(3, 4, 6, 3), block='bottleneck'), **kwargs))


@register_model
def psa_resnet50(pretrained: bool = False, **kwargs) -> CbamResNet:
    """ResNet-50 + PSA_s (official form) after the 3x3 conv of every bottleneck (27.69M params; ResNet-50 25.56M)."""
    model_args = dict(layers=(3, 4, 6, 3), block='bottleneck', attn_layer='psa_s', attn_pos='mid')
    return _create('psa_resnet50', pretrained, **dict(model_args, **kwargs))


@register_model
def ela_resnet18(pretrained: bool = False, **kwargs) -> CbamResNet:
    """ResNet-18 + ELA-B at the end of every residual branch (11.71M params; ResNet-18 11.69M)."""
    model_args = dict(layers=(2, 2, 2, 2), block='basic', attn_layer='ela', attn_kwargs=dict(variant='B'))
    return _create('ela_resnet18', pretrained, **dict(model_args, **kwargs))


@register_model
def ela_resnet50(pretrained: bool = False, **kwargs) -> CbamResNet:
    """ResNet-50 + ELA-S at the end of every residual branch (26.19M params; ResNet-50 25.56M)."""
    model_args = dict(layers=(3, 4, 6, 3), block='bottleneck', attn_layer='ela', attn_kwargs=dict(variant='S'))
    return _create('ela_resnet50', pretrained, **dict(model_args, **kwargs))
