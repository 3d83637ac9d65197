"""Checkpoint key maps: each family declares how release files name its weights; one function applies it.

A `KeyMap` is data: containers to unwrap, keys to drop, regex renames (optionally only when a layout is
detected), and tensor transforms. `remap_state_dict` applies it and then checks the result against the model:
anything but the classifier missing, unexpected or of another shape is an `IncompatibleKeysError` naming the
model, the file and the first offending keys, in a few lines. `make_filter` turns a key map into timm's
``checkpoint_filter_fn(state_dict, model)``, so ``pretrained=True`` and ``pretrained_cfg_overlay=dict(file=...)``
can never load a file that does not belong to the model.

This module imports only torch: model files use it to declare their maps.
"""
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

__all__ = ['IncompatibleKeysError', 'KeyRule', 'KeyMap', 'remap_state_dict', 'check_state_dict', 'make_filter']

Repl = Union[str, Callable[[re.Match], str]]
_CONTAINERS = ('state_dict_ema', 'model_ema', 'state_dict', 'model', 'module', 'net')
_PREFIXES = ('module.', '_orig_mod.')


class IncompatibleKeysError(RuntimeError):
    """A checkpoint whose keys or shapes do not match the model."""

    def __init__(self, message: str, missing: List[str], unexpected: List[str], mismatched: List[str]):
        super().__init__(message)
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched


@dataclass(frozen=True)
class KeyRule:
    """Rename keys matching `pattern` (re.sub with `repl`); with `when`, only if some source key matches it."""
    pattern: str
    repl: Repl
    when: Optional[str] = None


@dataclass(frozen=True)
class KeyMap:
    """How a family's release files map onto its modules.

    Args:
        rules: renames, applied in order to every key.
        drop: regexes of keys to drop (buffers such as `relative_position_index`, `attn_mask`).
        transforms: (regex on our key, fn(tensor, model_tensor) -> tensor), e.g. resizing bias tables.
        reject: (regex, message): a source key matching it makes the file unusable for this model.
    """
    rules: Sequence[KeyRule] = ()
    drop: Sequence[str] = ()
    transforms: Sequence[Tuple[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]] = ()
    reject: Sequence[Tuple[str, str]] = ()


def _unwrap(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    for _ in range(3):  # containers nest, e.g. {'model': {'state_dict': ...}}
        for key in _CONTAINERS:
            if isinstance(state_dict.get(key), Mapping):
                state_dict = state_dict[key]
                break
        else:
            break
    state_dict = dict(state_dict)
    for prefix in _PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def _source(model: nn.Module) -> str:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return str(cfg.get('file') or cfg.get('url') or cfg.get('hf_hub_id') or 'the checkpoint')


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return cfg.get('architecture') or type(model).__name__


def _first(names: Sequence[str], n: int = 3) -> str:
    return ', '.join(repr(x) for x in names[:n]) + (', ...' if len(names) > n else '')


def check_state_dict(
        model: nn.Module,
        state_dict: Mapping[str, torch.Tensor],
        source: Optional[str] = None,
        classifier: Optional[str] = None,
        strict: bool = True,
) -> Tuple[List[str], List[str]]:
    """Raise IncompatibleKeysError unless `state_dict` fits `model`; returns (missing, unexpected) keys.

    Keys under `classifier` (default: the pretrained cfg's, e.g. 'head.fc') may be missing, unexpected or of
    another shape (a new head); anything else is an error, shape mismatches even with strict=False.
    """
    own = model.state_dict()
    if classifier is None:
        classifier = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier')
    heads = tuple(f'{c}.' for c in ([classifier] if isinstance(classifier, str) else classifier or ()))

    def allowed(k: str) -> bool:
        return bool(heads) and k.startswith(heads)

    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [k for k, v in state_dict.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    bad_missing = [k for k in missing if not allowed(k)]
    bad_unexpected = [k for k in unexpected if not allowed(k)]
    bad_shapes = [k for k in mismatched if not allowed(k)]
    if bad_shapes or (strict and (bad_missing or bad_unexpected)):
        lines = [f'{source or "the checkpoint"} does not belong to {_model_name(model)}: '
                 f'{len(state_dict)} tensors in the file, {len(own)} in the model, '
                 f'{len(own) - len(missing)} names in common']
        if bad_missing:
            lines.append(f'  missing from the file ({len(bad_missing)}): {_first(bad_missing)}')
        if bad_unexpected:
            lines.append(f'  not in the model ({len(bad_unexpected)}): {_first(bad_unexpected)}')
        if bad_shapes:
            k = bad_shapes[0]
            lines.append(f'  other shape ({len(bad_shapes)}): {k!r} is {tuple(state_dict[k].shape)} in the file, '
                         f'{tuple(own[k].shape)} in the model')
        raise IncompatibleKeysError('\n'.join(lines), bad_missing, bad_unexpected, bad_shapes)
    return missing, unexpected


def remap_state_dict(
        state_dict: Mapping[str, Any],
        model: nn.Module,
        key_map: KeyMap,
        source: Optional[str] = None,
) -> Dict[str, torch.Tensor]:
    """Unwrap, drop, rename and transform `state_dict` by `key_map`, then `check_state_dict` it against `model`."""
    source = source or _source(model)
    state_dict = _unwrap(state_dict)
    non_tensors = [k for k, v in state_dict.items() if not torch.is_tensor(v)]
    if non_tensors:
        raise IncompatibleKeysError(
            f'{source} is not a state dict for {_model_name(model)}: entries that are not tensors: '
            f'{_first(non_tensors)}', [], non_tensors, [])
    for pattern, message in key_map.reject:
        if any(re.search(pattern, k) for k in state_dict):
            raise IncompatibleKeysError(f'{source}: {message}', [], [], [])
    rules = [r for r in key_map.rules if r.when is None or any(re.search(r.when, k) for k in state_dict)]
    own = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        if any(re.search(p, k) for p in key_map.drop):
            continue
        for rule in rules:
            k = re.sub(rule.pattern, rule.repl, k)
        for pattern, fn in key_map.transforms:
            if re.search(pattern, k) and k in own and v.shape != own[k].shape:
                v = fn(v, own[k])
        out[k] = v
    check_state_dict(model, out, source)
    return out


def make_filter(key_map: KeyMap) -> Callable[[Dict[str, Any], nn.Module], Dict[str, torch.Tensor]]:
    """timm's ``checkpoint_filter_fn(state_dict, model)`` for `key_map`."""
    def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
        return remap_state_dict(state_dict, model, key_map)
    return checkpoint_filter_fn
