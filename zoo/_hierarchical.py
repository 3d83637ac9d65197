"""Shared scaffolding of every zoo backbone: stages, the timm model interface, the builder.

A family builds a stem, a list of `Stage`s, a final norm and a head, then calls
`HierarchicalBackbone.init_backbone`. Everything timm expects of a model (forward_features,
forward_head, reset_classifier, feature_info, forward_intermediates, prune_intermediate_layers,
grad checkpointing, group_matcher, no_weight_decay) is implemented here once.

Layout contract: images and every stage boundary are NCHW (so `features_only` lists, the getter
wrapper and forward_features all give NCHW). A stage whose blocks mix channels-last (B, H, W, C)
declares ``fmt='NHWC'``; the permutes it needs are views, no copies.
"""
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, checkpoint_seq
from timm.models._features import feature_take_indices

__all__ = ['Stage', 'HierarchicalBackbone', 'build_backbone', 'default_cfg']


class Stage(nn.Module):
    """Optional downsample then a sequence of blocks; NCHW in, NCHW out.

    Args:
        blocks: the blocks, run in order.
        downsample: module run first (in the stage's layout), or None.
        fmt: layout the downsample and blocks work in, 'NCHW' or 'NHWC'.
    """

    def __init__(self, blocks: Sequence[nn.Module], downsample: Optional[nn.Module] = None, fmt: str = 'NCHW'):
        super().__init__()
        if fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"fmt: expected 'NCHW' or 'NHWC', got {fmt!r}")
        self.fmt = fmt
        self.grad_checkpointing = False
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt == 'NHWC':
            x = x.permute(0, 2, 3, 1)
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        if self.fmt == 'NHWC':
            x = x.permute(0, 3, 1, 2)
        return x


class HierarchicalBackbone(nn.Module):
    """Base class: stem -> stages -> norm -> head, with timm's full model interface.

    Subclasses set `no_weight_decay_keys` (leaf parameter names excluded from weight decay) and
    `min_input_size` (smallest H, W accepted), build their parts and call `init_backbone`.
    """
    output_fmt = 'NCHW'
    no_weight_decay_keys: Tuple[str, ...] = ()
    min_input_size: int = 32

    def init_backbone(
            self,
            stem: nn.Module,
            stages: Sequence[nn.Module],
            feature_info: List[Dict[str, Any]],
            norm: Optional[nn.Module],
            head: nn.Module,
            num_classes: int,
            in_chans: int,
            num_features: int,
            head_hidden_size: Optional[int] = None,
    ) -> None:
        """Register the parts in execution order and the attributes timm reads.

        `feature_info` has one dict(num_chs, reduction, module='stages.i') per stage.
        `head` is a timm-style head: forward(x, pre_logits=False), reset(num_classes, pool_type, ...), .fc.
        """
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = num_features
        self.head_hidden_size = head_hidden_size or num_features
        self.feature_info = feature_info
        self.stem = stem
        self.stages = nn.Sequential(*stages)
        self.norm = norm if norm is not None else nn.Identity()
        self.head = head

    def _check_input(self, x: torch.Tensor) -> None:
        if torch.jit.is_scripting() or torch.jit.is_tracing() or isinstance(x, torch.fx.Proxy):
            return
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f'{type(self).__name__}: expected input (B, {self.in_chans}, H, W), '
                             f'got {tuple(x.shape)}')
        if x.shape[-2] < self.min_input_size or x.shape[-1] < self.min_input_size:
            raise ValueError(f'{type(self).__name__}: expected H and W >= {self.min_input_size}, '
                             f'got {tuple(x.shape[-2:])}')

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {n for n, _ in self.named_parameters() if n.rsplit('.', 1)[-1] in self.no_weight_decay_keys}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (NCHW) for `indices` (last n if int, all if None), and the final features."""
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt: expected 'NCHW', got {output_fmt!r}")
        self._check_input(x)
        num_stages = len(self.stages)
        take_indices, max_index = feature_take_indices(num_stages, indices)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]
        intermediates = []
        x = self.stem(x)
        last = -1
        for last, stage in enumerate(stages):
            x = stage(x)
            if last in take_indices:
                intermediates.append(self.norm(x) if norm and last == num_stages - 1 else x)
        if intermediates_only:
            return intermediates
        if last == num_stages - 1:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages (and norm / head) that the requested intermediates do not need."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.num_classes = 0
            self.head.reset(0, pool_type='', reset_other=True, in_features=self.num_features)
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, num_features, H / 32, W / 32)."""
        self._check_input(x)
        x = self.stem(x)
        x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def default_cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    """Pretrained cfg defaults shared by the zoo (ImageNet-1k, 224 px, any input size)."""
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.9, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv', 'classifier': 'head.fc',
        **kwargs,
    }


def build_backbone(
        model_cls: Type[nn.Module],
        variant: str,
        pretrained: bool = False,
        checkpoint_filter_fn: Optional[Callable] = None,
        num_stages: int = 4,
        **kwargs,
) -> nn.Module:
    """`build_model_with_cfg` with the zoo's feature defaults (all stages, NCHW)."""
    out_indices = kwargs.pop('out_indices', tuple(range(num_stages)))
    return build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs,
    )
