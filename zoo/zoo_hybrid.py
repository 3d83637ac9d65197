"""Hybrid: any registered mixer (or conv gate) in any stage, on one backbone, to compare attention designs.

    timm.create_model('hybrid_tiny', mixers=('cbam', 'window', 'neighborhood', 'grid'))

A NAT-style conv stem (stride 4), four stages and a classifier. A stage named by a gate ('cbam', 'se', 'eca')
is a conv stage of ResNet basic blocks with that gate (NCHW); a stage named by a mixer ('window', 'block',
'grid', 'neighborhood', ...) is an attention stage of the one `MixerBlock` (channels-last), after a stride-2
conv downsample. Per-block mixers: give a stage a sequence of names, one per block. Family arguments:
`mixer_kwargs={'neighborhood': dict(kernel_size=5)}` applies wherever that mixer appears, `name:value` sets
the first family argument of that one entry ('linear:inline', 'neighborhood:5'); 'window' blocks get Swin's
shift in every other window block, sized from `img_size` as in Swin.

A plan may be written as one string (`parse_mixer_plan`): 'cbam/window/neighborhood/grid' or
'[se,linear,agent,global]' (one entry per stage), 'window' (every stage), 'cbam/window+neighborhood/...'
(one name per block of a stage).
With `mixer_kwargs={'window': dict(global_query=True)}` the 'window' blocks are GC ViT's global-query window
blocks (no shift) and the stage computes GC ViT's global query once for them.

No pretrained weights: it is a test bed. Any input size works.
"""
import ast
from functools import partial
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch.nn as nn
from timm.layers import ClassifierHead, LayerNorm2d, to_2tuple
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import init_weights_vit_timm

from zoo.blocks import gate_info, list_gates, list_mixers, mixer_info
from zoo.blocks.block import ConvTokenizer
from zoo.blocks.gcvit import pool_levels
from zoo.blocks.window import effective_window_shift

from ._hierarchical import HierarchicalBackbone, StageSpec, build_backbone, build_stages, default_cfg

__all__ = ['HybridNet', 'hybrid_stage_specs', 'parse_mixer_plan', 'split_mixer_name']

_mixers_t = Union[str, Sequence[Union[str, Sequence[str]]]]


def parse_mixer_plan(text: str) -> List[Union[str, List[str]]]:
    """A plan written as one string -> one entry per stage (a name, or a list of names, one per block).

    'cbam/window/neighborhood/grid', '[se,linear,agent,global]', "('se', 'eca')" and 'cbam/window+grid/...' all
    work; a single name ('window') gives a one-entry plan (`HybridNet` repeats it in every stage).
    """
    if not isinstance(text, str):
        raise TypeError(f'mixers: expected a plan string, got {type(text).__name__} {text!r}')
    body = text.strip()
    if body[:1] in '[(' and body[-1:] in '])':
        body = body[1:-1]
    stages = [s.strip() for s in body.replace(',', '/').split('/')]
    if not body or any(not s for s in stages):
        raise ValueError(f"mixers: expected stage entries separated by '/' or ',' (e.g. 'cbam/window/neighborhood/"
                         f"grid'), got {text!r}")
    plan: List[Union[str, List[str]]] = []
    for stage in stages:
        names = [n.strip().strip('\'"') for n in stage.split('+')]
        if any(not n for n in names):
            raise ValueError(f"mixers: an empty block name in {stage!r} of the plan {text!r}")
        plan.append(names[0] if len(names) == 1 else names)
    return plan


def split_mixer_name(name: str) -> Tuple[str, Dict[str, Any]]:
    """'linear:inline' -> ('linear', {'variant': 'inline'}): a registered mixer or gate name and, after ':', the
    value of its first family argument (a Python literal, else the text)."""
    if not isinstance(name, str):
        raise TypeError(f'mixers: expected mixer or gate names, got {type(name).__name__} {name!r}')
    base, sep, arg = name.partition(':')
    if base in list_mixers():
        info = mixer_info(base)
    elif base in list_gates():
        info = gate_info(base)
    else:
        raise ValueError(f'mixers: unknown mixer {base!r}; known mixers: {", ".join(list_mixers())}; '
                         f'gates (conv stages): {", ".join(list_gates())}')
    if not sep:
        return base, {}
    params = info.family_params()
    if not params or not arg:
        raise ValueError(f'mixers: {name!r}: expected {base}:<{params[0].name}>' if params else
                         f'mixers: {name!r}: {base} takes no arguments')
    try:
        value = ast.literal_eval(arg)
    except (ValueError, SyntaxError):
        value = arg
    return base, {params[0].name: value}


def hybrid_stage_specs(
        embed_dim: Sequence[int],
        depths: Sequence[int],
        mixers: _mixers_t,
        mixer_kwargs: Optional[Mapping[str, Mapping[str, Any]]] = None,
        img_size: Union[int, Sequence[int]] = 224,
        stem_stride: int = 4,
        **spec_kwargs,
) -> Sequence[StageSpec]:
    """One `StageSpec` per stage: gate stages are conv stages, mixer stages attention stages."""
    if isinstance(mixers, str):  # a plan written out ('cbam/window/...', '[se,linear,agent,global]')
        mixers = parse_mixer_plan(mixers)
        if len(mixers) == 1:
            mixers = mixers * len(depths)
    if not len(embed_dim) == len(depths) == len(mixers):
        raise ValueError(f'mixers: expected one entry per stage ({len(depths)}), got {len(mixers)}: {list(mixers)} '
                         f'(embed_dim has {len(embed_dim)}, depths {len(depths)})')
    mixer_kwargs = {k: dict(v) for k, v in (mixer_kwargs or {}).items()}
    img_h, img_w = to_2tuple(img_size)
    specs = []
    for i, (dim, depth, names) in enumerate(zip(embed_dim, depths, mixers)):
        names = [names] * depth if isinstance(names, str) else list(names)
        if len(names) != depth:
            raise ValueError(f'mixers[{i}]: expected one mixer per block ({depth}), got {names}')
        stride = stem_stride * 2 ** i
        size = (-(-img_h // stride), -(-img_w // stride))
        kwargs, n_window, context = [], 0, None
        names, args = zip(*(split_mixer_name(n) for n in names))
        for name, arg in zip(names, args):
            kw = dict(mixer_kwargs.get(name, {}), **arg)
            if name == 'window':
                window = to_2tuple(kw.pop('window_size', 7))
                win, shift = effective_window_shift(size, window, tuple(w // 2 for w in window))
                global_query = kw.get('global_query', False)
                kw.update(window_size=win, shift_size=shift if n_window % 2 and not global_query else 0)
                n_window += 1
                if global_query:
                    context = dict(window_size=win, levels=pool_levels(size, win))
            kwargs.append(kw)
        is_conv = all(n in list_gates() for n in names)
        specs.append(StageSpec(
            depth=depth, dim=dim, mixer=list(names), mixer_kwargs=kwargs,
            downsample=None if i == 0 else ('stride' if is_conv else 'conv'),
            context=None if context is None else 'global_query', context_kwargs=context or {}, **spec_kwargs))
    return specs


class HybridNet(HierarchicalBackbone):
    """Any mixer in any stage. (B, in_chans, H, W) -> (B, num_classes), any H, W; features at strides 4..32.

    Args:
        in_chans: image channels.
        num_classes: classifier outputs (0 for none).
        global_pool: head pooling type.
        embed_dim: width of each stage.
        depths: blocks per stage.
        mixers: per stage a mixer or gate name, or one name per block (see `zoo mixers`); or the plan as one
            string ('cbam/window/neighborhood/grid', '[se,linear,agent,global]', 'window' for every stage).
        mixer_kwargs: family arguments per mixer name, e.g. {'neighborhood': dict(kernel_size=5)}.
        num_heads: heads in every attention stage (None: head_dim decides).
        head_dim: channels per head (32 when num_heads is None).
        mlp_ratio: MLP hidden width / dim in attention stages.
        layer_scale: layer-scale init of attention blocks (None: none).
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after attention projections and in MLPs.
        drop_path_rate: stochastic depth, rising stage-wise to this value.
        img_size: the size Swin-style windows are chosen for (any input size runs).
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: Sequence[int] = (96, 192, 384, 768),
            depths: Sequence[int] = (2, 2, 6, 2),
            mixers: _mixers_t = ('cbam', 'window', 'neighborhood', 'grid'),
            mixer_kwargs: Optional[Mapping[str, Mapping[str, Any]]] = None,
            num_heads: Optional[int] = None,
            head_dim: Optional[int] = None,
            mlp_ratio: float = 4.,
            layer_scale: Optional[float] = None,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.1,
            img_size: Union[int, Sequence[int]] = 224,
    ):
        super().__init__()
        specs = hybrid_stage_specs(
            embed_dim, depths, mixers, mixer_kwargs, img_size, num_heads=num_heads, head_dim=head_dim,
            mlp_ratio=mlp_ratio, layer_scale=layer_scale)
        stem = ConvTokenizer(in_chans, embed_dim[0])
        stages, feature_info = build_stages(
            specs, embed_dim[0], 4, drop_path_rate, proj_drop=proj_drop_rate)
        self.init_backbone(
            stem=stem,
            stages=stages,
            feature_info=feature_info,
            norm=LayerNorm2d(embed_dim[-1]),
            head=ClassifierHead(embed_dim[-1], num_classes, pool_type=global_pool, drop_rate=drop_rate),
            num_classes=num_classes,
            in_chans=in_chans,
            num_features=embed_dim[-1],
        )
        self.apply(partial(init_weights_vit_timm, needs_reset=False))


def _create_hybrid(variant: str, pretrained: bool = False, **kwargs) -> HybridNet:
    return build_backbone(HybridNet, variant, pretrained, num_stages=len(kwargs.get('depths', (2, 2, 6, 2))), **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    return default_cfg(first_conv='stem.proj.0', license='apache-2.0', **kwargs)


default_cfgs = generate_default_cfgs({
    'hybrid_tiny': _cfg(notes=('no pretrained weights: a test bed for comparing mixers',)),
    'hybrid_small': _cfg(notes=('no pretrained weights: a test bed for comparing mixers',)),
})

# narrow and shallow, same structure (see zoo.reduced_args)
REDUCED_ARGS = {'hybrid_*': dict(embed_dim=(16, 32, 32, 64), depths=(1, 2, 2, 1), head_dim=16)}


@register_model
def hybrid_tiny(pretrained: bool = False, **kwargs) -> HybridNet:
    """Hybrid-T: Swin-T's widths (96 .. 768) and depths (2, 2, 6, 2); CBAM / window / NA / grid by default."""
    model_args = dict(embed_dim=(96, 192, 384, 768), depths=(2, 2, 6, 2))
    return _create_hybrid('hybrid_tiny', pretrained, **dict(model_args, **kwargs))


@register_model
def hybrid_small(pretrained: bool = False, **kwargs) -> HybridNet:
    """Hybrid-S: Swin-S's widths (96 .. 768) and depths (2, 2, 18, 2); CBAM / window / NA / grid by default."""
    model_args = dict(embed_dim=(96, 192, 384, 768), depths=(2, 2, 18, 2))
    return _create_hybrid('hybrid_small', pretrained, **dict(model_args, **kwargs))
