"""Shared scaffolding of every zoo backbone: stage specs, stages, the timm model interface, the builder.

A family is a stem, a list of `StageSpec`s (turned into `Stage`s by `build_stages`), a final norm, a head
and a key map; it calls `HierarchicalBackbone.init_backbone`. Everything timm expects of a model (forward_features,
forward_head, reset_classifier, feature_info, forward_intermediates, prune_intermediate_layers,
grad checkpointing, group_matcher, no_weight_decay) is implemented here once.

Layout contract: images and every stage boundary are NCHW (so `features_only` lists, the getter
wrapper and forward_features all give NCHW). A stage whose blocks mix channels-last (B, H, W, C)
declares ``fmt='NHWC'``; the permutes it needs are views, no copies.
"""
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import calculate_drop_path_rates
from timm.models import build_model_with_cfg, checkpoint_seq
from timm.models._features import feature_take_indices
from timm.models.resnet import BasicBlock, downsample_conv

from zoo.blocks import MixerBlock, create_gate, list_gates
from zoo.blocks._registry import shape_str
from zoo.blocks.block import AbsPosEmbed, create_downsample, create_stage_context
from zoo.kernels.backend import ENV_VAR, get_backend
from zoo.weights.keymap import KeyMap, make_filter
from zoo.weights.sources import prepare_pretrained, release_pretrained_state_dict

__all__ = ['StageSpec', 'Stage', 'build_stages', 'HierarchicalBackbone', 'build_backbone', 'default_cfg',
           'with_tag_args']


@dataclass
class StageSpec:
    """One stage, declaratively: an optional stride-2 downsample, then `depth` blocks of width `dim`.

    Args:
        depth: number of blocks.
        dim: channels of the stage.
        mixer: registered mixer name (attention stage of `MixerBlock`s, channels-last), or registered gate name
            (conv stage of ResNet basic blocks with that gate, NCHW); or one name per block (of one kind).
        mixer_kwargs: the mixers' family arguments, shared by the blocks or one mapping per block.
        num_heads, head_dim: the mixer contract's heads (see `zoo.blocks.resolve_heads`).
        mlp_ratio, mlp_layer, layer_scale, pos_embed: `MixerBlock` arguments.
        qkv_bias: this stage's qkv bias, overriding `build_stages`' block-wide one (None: keep that one);
            BiFormer's last stage has none while its other stages do.
        downsample: a name of `create_downsample` for attention stages; for conv stages any
            non-None value makes the first block stride 2. None: no downsample.
        block_kwargs: further `MixerBlock` arguments (mlp_pos_embed, local_layer, ...), shared by the blocks or
            one mapping per block (L2ViT alternates two block kinds); they override the stage-wide ones (Twins
            gives only its second block a pos_embed; VOLO's outlookers have no drop_path).
        abs_pos_embed: grid (h, w) of a learned absolute position embedding added after the downsample, resized
            in the graph to the actual map (`AbsPosEmbed`); None for none.
        context: a stage context computed once from the stage input (after the downsample) and given to every
            block, e.g. 'global_query' (GC ViT); None for none. Required when a block's mixer reads one.
        context_kwargs: the context's arguments (e.g. window_size, levels).
    """
    depth: int
    dim: int
    mixer: Union[str, Sequence[str]] = 'window'
    mixer_kwargs: Union[Mapping[str, Any], Sequence[Mapping[str, Any]]] = field(default_factory=dict)
    num_heads: Optional[int] = None
    head_dim: Optional[int] = None
    mlp_ratio: float = 4.
    mlp_layer: str = 'mlp'
    layer_scale: Optional[float] = None
    pos_embed: int = 0
    qkv_bias: Optional[bool] = None
    downsample: Optional[str] = None
    block_kwargs: Union[Mapping[str, Any], Sequence[Mapping[str, Any]]] = field(default_factory=dict)
    abs_pos_embed: Optional[Tuple[int, int]] = None
    context: Optional[str] = None
    context_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def blocks_kwargs(self) -> List[Dict[str, Any]]:
        """The extra `MixerBlock` arguments of each block."""
        if isinstance(self.block_kwargs, Mapping):
            return [dict(self.block_kwargs)] * self.depth
        if len(self.block_kwargs) != self.depth:
            raise ValueError(f'StageSpec: expected one block_kwargs per block (depth={self.depth}), '
                             f'got {len(self.block_kwargs)}')
        return [dict(k) for k in self.block_kwargs]

    def per_block(self) -> List[Tuple[str, Dict[str, Any]]]:
        """(mixer name, mixer kwargs) of each block."""
        names = [self.mixer] * self.depth if isinstance(self.mixer, str) else list(self.mixer)
        kwargs = [dict(self.mixer_kwargs)] * self.depth if isinstance(self.mixer_kwargs, Mapping) \
            else [dict(k) for k in self.mixer_kwargs]
        if len(names) != self.depth or len(kwargs) != self.depth:
            raise ValueError(f'StageSpec: expected one mixer and one mixer_kwargs per block (depth={self.depth}), '
                             f'got {len(names)} mixers and {len(kwargs)} mixer_kwargs')
        return list(zip(names, kwargs))

    @property
    def is_conv(self) -> bool:
        """A conv stage (gates) rather than an attention stage (mixers)."""
        names = {n for n, _ in self.per_block()}
        gates = names & set(list_gates())
        if gates and gates != names:
            raise ValueError(f'StageSpec: a stage is all gates (conv) or all mixers (attention), got {sorted(names)}')
        return bool(gates)


class Stage(nn.Module):
    """Optional downsample (and position embedding), optional stage context, then a sequence of blocks; NCHW in,
    NCHW out.

    Args:
        blocks: the blocks, run in order (given the context as a second argument when there is one).
        downsample: module run first (in the stage's layout), or None.
        fmt: layout the downsample and blocks work in, 'NCHW' or 'NHWC'.
        pos_embed: module run after the downsample (an `AbsPosEmbed`), or None.
        context: module computing the stage context from the downsampled input (GC ViT's global query), or None.
        norm: module run last (in the stage's layout), or None: VAN ends every stage with a LayerNorm.
    """

    def __init__(self, blocks: Sequence[nn.Module], downsample: Optional[nn.Module] = None, fmt: str = 'NCHW',
                 pos_embed: Optional[nn.Module] = None, context: Optional[nn.Module] = None,
                 norm: Optional[nn.Module] = None):
        super().__init__()
        if fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"fmt: expected 'NCHW' or 'NHWC', got {fmt!r}")
        self.fmt = fmt
        self.grad_checkpointing = False
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.pos_embed = pos_embed
        self.context = context
        self.blocks = nn.Sequential(*blocks)
        self.norm = norm if norm is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt == 'NHWC':
            x = x.permute(0, 2, 3, 1)
        x = self.downsample(x)
        if self.pos_embed is not None:
            x = self.pos_embed(x)
        if self.context is not None:
            context = self.context(x)
            for block in self.blocks:
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x = checkpoint(block, x, context, use_reentrant=False)
                else:
                    x = block(x, context)
        elif self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        x = self.norm(x)
        if self.fmt == 'NHWC':
            x = x.permute(0, 3, 1, 2)
        return x


def build_stages(
        specs: Sequence[StageSpec],
        in_dim: int,
        reduction: int,
        drop_path_rate: float = 0.,
        **block_kwargs,
) -> Tuple[List[Stage], List[Dict[str, Any]]]:
    """Stages and their feature_info from specs; `in_dim` / `reduction` are those of the stem's output.

    `block_kwargs` go to every `MixerBlock` (qkv_bias, attn_drop, proj_drop, act_layer, norm_layer, norm_eps,
    ...); `downsample_kwargs` in them go to the downsamples; `stage_norm` (a callable dim -> module), if given, ends
    every attention stage (VAN). Drop path rises stage-wise to `drop_path_rate`.
    """
    downsample_kwargs = block_kwargs.pop('downsample_kwargs', {})
    stage_norm = block_kwargs.pop('stage_norm', None)
    dpr = calculate_drop_path_rates(drop_path_rate, [s.depth for s in specs], stagewise=True)
    stages, feature_info = [], []
    for i, spec in enumerate(specs):
        if spec.downsample is not None:
            reduction *= 2
        if spec.is_conv:
            blocks = []
            for j, (gate, gate_kwargs) in enumerate(spec.per_block()):
                stride = 2 if j == 0 and spec.downsample is not None else 1
                shortcut = None
                if stride != 1 or in_dim != spec.dim:
                    shortcut = downsample_conv(in_dim, spec.dim, kernel_size=1, stride=stride)
                blocks.append(BasicBlock(
                    in_dim, spec.dim, stride=stride, downsample=shortcut,
                    attn_layer=partial(create_gate, gate, **gate_kwargs)))
                in_dim = spec.dim
            stages.append(Stage(blocks, fmt='NCHW'))
        else:
            downsample = None
            if spec.downsample is not None:
                downsample = create_downsample(spec.downsample, in_dim, spec.dim, **downsample_kwargs)
            elif in_dim != spec.dim:
                raise ValueError(f'StageSpec {i}: dim changes from {in_dim} to {spec.dim} without a downsample')
            stage_kwargs = dict(block_kwargs) if spec.qkv_bias is None else dict(block_kwargs, qkv_bias=spec.qkv_bias)
            blocks = [
                MixerBlock(
                    spec.dim, mixer, mixer_kwargs, num_heads=spec.num_heads, head_dim=spec.head_dim,
                    mlp_ratio=spec.mlp_ratio, mlp_layer=spec.mlp_layer, layer_scale=spec.layer_scale,
                    **{**stage_kwargs, 'pos_embed': spec.pos_embed, 'drop_path': dpr[i][j], **extra})
                for j, ((mixer, mixer_kwargs), extra) in enumerate(zip(spec.per_block(), spec.blocks_kwargs()))
            ]
            context = None
            needs = sorted({getattr(b.attn, 'stage_context', None) for b in blocks} - {None})
            if needs != ([spec.context] if spec.context is not None else []):
                raise ValueError(
                    f'StageSpec {i}: its mixers read the stage context {needs}, got context={spec.context!r}')
            if spec.context is not None:
                context = create_stage_context(spec.context, spec.dim, **spec.context_kwargs)
            pos_embed = AbsPosEmbed(spec.dim, spec.abs_pos_embed) if spec.abs_pos_embed is not None else None
            norm = stage_norm(spec.dim) if stage_norm is not None else None
            stages.append(Stage(blocks, downsample, fmt='NHWC', pos_embed=pos_embed, context=context, norm=norm))
            in_dim = spec.dim
        feature_info.append(dict(num_chs=spec.dim, reduction=reduction, module=f'stages.{i}'))
    return stages, feature_info


class HierarchicalBackbone(nn.Module):
    """Base class: stem -> stages -> norm -> head, with timm's full model interface.

    Subclasses set `min_input_size` (smallest H, W accepted), build their parts and call `init_backbone`.
    Parameters excluded from weight decay are those each module names in its `no_weight_decay_keys`
    (mixers name their position tables) plus the model's own `no_weight_decay_keys`.
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
        self.min_input_size = type(self).min_input_size  # on the instance: TorchScript reads no class attributes
        self.num_classes = num_classes
        self.num_features = num_features
        self.head_hidden_size = head_hidden_size or num_features
        self.feature_info = feature_info
        self.stem = stem
        self.stages = nn.Sequential(*stages)
        self.norm = norm if norm is not None else nn.Identity()
        self.head = head

    def _check_input(self, x: torch.Tensor) -> None:
        name = 'model'
        if not torch.jit.is_scripting():
            if torch.jit.is_tracing() or isinstance(x, torch.fx.Proxy):
                return
            name = type(self).__name__
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f'{name}: expected input (B, {self.in_chans}, H, W), got {shape_str(x)}')
        if x.shape[-2] < self.min_input_size or x.shape[-1] < self.min_input_size:
            raise ValueError(f'{name}: expected H and W >= {self.min_input_size}, '
                             f'got ({x.shape[-2]}, {x.shape[-1]})')
        if not torch.jit.is_scripting():
            if not x.is_floating_point():
                self._raise_not_float(x)

    @torch.jit.unused
    def _raise_not_float(self, x: torch.Tensor) -> None:
        cfg = getattr(self, 'pretrained_cfg', None) or {}
        mean, std = tuple(cfg.get('mean', IMAGENET_DEFAULT_MEAN)), tuple(cfg.get('std', IMAGENET_DEFAULT_STD))
        raise TypeError(
            f'{type(self).__name__}: expected a float image tensor, normalised with the mean and std of '
            f'model.pretrained_cfg, got dtype {x.dtype}. From uint8 pixels: '
            f'x = (x.float().div(255) - torch.tensor({mean}).view(1, -1, 1, 1)) / '
            f'torch.tensor({std}).view(1, -1, 1, 1); from PIL images: '
            f'timm.data.create_transform(**timm.data.resolve_data_config(model=model))')

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script calls this first (then each submodule's: mixers without TorchScript refuse by name)
        if get_backend() == 'triton':
            raise RuntimeError(
                f"torch.jit.script: {type(self).__name__} cannot be scripted with the kernel backend forced to "
                f"'triton' (by {ENV_VAR}, set_backend or use_backend): TorchScript runs only the PyTorch reference "
                f"path. Script under use_backend('torch') or 'auto'.")
        return self

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^stages\.(\d+)\.norm', (99998,)),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        names = set()
        for prefix, module in self.named_modules():
            for leaf in getattr(module, 'no_weight_decay_keys', ()):
                if isinstance(getattr(module, leaf, None), nn.Parameter):
                    names.add(f'{prefix}.{leaf}' if prefix else leaf)
        return names

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


def with_tag_args(kwargs: Dict[str, Any], tag_args: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
    """`kwargs` with the build arguments of the pretrained tag they name filled in where not given, so
    'name.tag' builds the model that release fits (e.g. a 384 px fine-tune with larger windows)."""
    kwargs = dict(kwargs)
    tag = kwargs.get('pretrained_cfg')
    for key, value in (tag_args.get(tag, {}) if isinstance(tag, str) else {}).items():
        kwargs.setdefault(key, value)
    return kwargs


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
        checkpoint_filter_fn: Optional[Union[Callable, KeyMap]] = None,
        num_stages: int = 4,
        **kwargs,
) -> nn.Module:
    """`build_model_with_cfg` with the zoo's feature defaults (all stages, NCHW).

    `checkpoint_filter_fn` is a family's `KeyMap` (or a filter function); weights load only if they fit.
    With `pretrained`, the weights' source is checked first (`zoo.weights.sources.prepare_pretrained`): a local
    file is read safely with errors naming it, and a download that cannot start fails in seconds.
    """
    if isinstance(checkpoint_filter_fn, KeyMap):
        checkpoint_filter_fn = make_filter(checkpoint_filter_fn)
    out_indices = kwargs.pop('out_indices', tuple(range(num_stages)))
    if pretrained:
        kwargs['pretrained_cfg_overlay'] = prepare_pretrained(
            variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'), kwargs.get('cache_dir'))
    model = build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs,
    )
    if pretrained:
        release_pretrained_state_dict(model)
    return model
