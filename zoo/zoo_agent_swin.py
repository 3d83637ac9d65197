"""Agent-Swin: Swin Transformer with agent attention in its first stages.

`Agent Attention: On the Integration of Softmax and Linear Attention` - https://arxiv.org/abs/2312.08874
Official code and weights: https://github.com/LeapLabTHU/Agent-Attention

Agent-Swin is `zoo.zoo_swin.SwinTransformer` with a per-block mixer sequence: 'A' blocks are the agent mixer over
the whole stage map (the official window of 56 covers every map at 224 px), 'B' blocks Swin's shifted-window
attention (window 7, shifted in odd blocks). The official block types: T 'AAAB', S 'AABB', B 'AAMB2' (stage 3
of B: the first 2 blocks agent, the other 16 window); agents 9-16-49-49. The agent row / column tables are
stored at each stage's feature size for `img_size` and resized for any other input size.
"""
import dataclasses
from typing import Any, Dict, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import to_2tuple
from timm.models import generate_default_cfgs, register_model

from zoo.weights.keymap import make_filter

from ._hierarchical import build_backbone, default_cfg
from .zoo_swin import KEY_MAP as _SWIN_KEY_MAP
from .zoo_swin import SwinTransformer, block_mixers, typed_swin_args

__all__ = ['agent_swin_layout', 'KEY_MAP', 'checkpoint_filter_fn']


def agent_swin_layout(
        attn_type: str,
        depths: Sequence[int],
        agent_num: Sequence[int],
        img_size: Union[int, Sequence[int]] = 224,
        patch_size: int = 4,
) -> Dict[str, Any]:
    """`SwinTransformer` arguments `mixer` (one name per block) and `mixer_kwargs` (agent count and table size
    per stage) for the official block types `attn_type` and agent counts `agent_num`."""
    if len(agent_num) != len(depths):
        raise ValueError(f'agent_num: expected one count per stage ({len(depths)}), got {tuple(agent_num)}')
    img_h, img_w = to_2tuple(img_size)
    mixer = block_mixers(attn_type, depths, {'A': 'agent', 'B': 'window'})
    mixer_kwargs = []
    for i in range(len(depths)):
        stride = patch_size * 2 ** i
        size = (-(-img_h // stride), -(-img_w // stride))
        mixer_kwargs.append({'agent': dict(agent_num=int(agent_num[i]), bias_size=size)})
    return dict(mixer=mixer, mixer_kwargs=mixer_kwargs)


def _resize_line(table: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """An official row / column table (one axis of the map) linearly resized to `target`'s size on that axis."""
    axes = [i for i, (a, b) in enumerate(zip(table.shape, target.shape)) if a != b]
    if table.dim() != target.dim() or len(axes) != 1:
        return table  # not a resize: the key check reports the shape
    axis = axes[0]
    moved = table.movedim(axis, -1)
    flat = moved.reshape(1, -1, moved.shape[-1]).float()
    out = F.interpolate(flat, size=target.shape[axis], mode='linear', align_corners=False)
    return out.reshape(*moved.shape[:-1], -1).movedim(-1, axis).to(table.dtype)


# The official agent_swin.py names everything as the official Swin does (plus the agent tables under `attn.`),
# so Swin's map applies; a file trained at another size gets its row / column tables resized.
KEY_MAP = dataclasses.replace(_SWIN_KEY_MAP, transforms=((r'\.attn\.(ah|aw|ha|wa)_bias$', _resize_line),))
checkpoint_filter_fn = make_filter(KEY_MAP)


# the official fine-tuned releases: trained at another size, with Swin windows max(7, stage-1 size // 8)
_TAG_ARGS = {'in1k_288': dict(img_size=288, window_size=9), 'in1k_384': dict(img_size=384, window_size=12)}


def _create_agent_swin(variant: str, pretrained: bool = False, **kwargs) -> SwinTransformer:
    kwargs = typed_swin_args(variant, kwargs, _TAG_ARGS, 'attn_type and agent_num')
    attn_type, agent_num = kwargs.pop('attn_type'), kwargs.pop('agent_num')
    layout = agent_swin_layout(attn_type, kwargs['depths'], agent_num, kwargs.get('img_size') or 224,
                               kwargs.get('patch_size', 4))
    return build_backbone(
        SwinTransformer, variant, pretrained, checkpoint_filter_fn=KEY_MAP, num_stages=len(kwargs['depths']),
        **layout, **kwargs)


def _cfg(download: str, **kwargs) -> Dict[str, Any]:
    # official evaluation: resize to 256 / 224 of the size (squashed), centre crop; bicubic
    kwargs = dict(dict(crop_pct=0.875, crop_mode='squash'), **kwargs)
    return default_cfg(
        license='mit', paper_ids='arXiv:2312.08874', origin_url='https://github.com/LeapLabTHU/Agent-Attention',
        notes=(f'official weights: {download} (a TsinghuaCloud share without a file url): download the file, then '
               f"pretrained=True, pretrained_cfg_overlay=dict(file='agent_swin_*.pth')",), **kwargs)


_CLOUD = 'https://cloud.tsinghua.edu.cn/f'

default_cfgs = generate_default_cfgs({
    'agent_swin_tiny.in1k': _cfg(f'{_CLOUD}/a2ddc1190c224f768a41/?dl=1'),
    'agent_swin_small.in1k': _cfg(f'{_CLOUD}/f607172c9fea4d6e99bb/?dl=1'),
    'agent_swin_base.in1k': _cfg(f'{_CLOUD}/4fcd2d0114bb490483c3/?dl=1'),
    'agent_swin_small.in1k_288': _cfg(f'{_CLOUD}/09760394e93b4046a25e/?dl=1', input_size=(3, 288, 288),
                                      pool_size=(9, 9), crop_pct=1.0),
    'agent_swin_base.in1k_384': _cfg(f'{_CLOUD}/bb84ee9058954706a557/?dl=1', input_size=(3, 384, 384),
                                     pool_size=(12, 12), crop_pct=1.0),
})


# narrow and shallow, same structure: Agent-Swin-B keeps agent and window blocks in stage 3 (see zoo.reduced_args)
REDUCED_ARGS = {
    'agent_swin_base': dict(embed_dim=16, depths=(2, 2, 3, 2), num_heads=(1, 2, 4, 8)),
    'agent_swin_*': dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8)),
}

_AGENTS: Tuple[int, ...] = (9, 16, 49, 49)


@register_model
def agent_swin_tiny(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """Agent-Swin-T: Swin-T (dim 96, depths (2, 2, 6, 2), heads (3, 6, 12, 24)), blocks AAAB, agents 9-16-49-49;
    28.9M params."""
    model_args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                      attn_type='AAAB', agent_num=_AGENTS, drop_path_rate=0.2)
    return _create_agent_swin('agent_swin_tiny', pretrained, **dict(model_args, **kwargs))


@register_model
def agent_swin_small(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """Agent-Swin-S: Swin-S (dim 96, depths (2, 2, 18, 2), heads (3, 6, 12, 24)), blocks AABB, agents 9-16-49-49;
    49.7M params."""
    model_args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24),
                      attn_type='AABB', agent_num=_AGENTS, drop_path_rate=0.3)
    return _create_agent_swin('agent_swin_small', pretrained, **dict(model_args, **kwargs))


@register_model
def agent_swin_base(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """Agent-Swin-B: Swin-B (dim 128, depths (2, 2, 18, 2), heads (4, 8, 16, 32)), blocks AAMB2 (stage 3: 2 agent
    then 16 window blocks), agents 9-16-49-49; 88.1M params."""
    model_args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                      attn_type='AAMB2', agent_num=_AGENTS, drop_path_rate=0.5)
    return _create_agent_swin('agent_swin_base', pretrained, **dict(model_args, **kwargs))
