"""Checkpoint key maps: each family declares how release files name its weights; one function applies it.

A `KeyMap` is data: containers to unwrap, keys to drop, regex renames (optionally only when a layout is
detected), and tensor transforms. `remap_state_dict` applies it and then checks the result against the model:
anything but the classifier missing, unexpected or of another shape is an `IncompatibleKeysError` naming the
model, the file and the first offending keys, in a few lines. `make_filter` turns a key map into timm's
``checkpoint_filter_fn(state_dict, model)``, so ``pretrained=True`` and ``pretrained_cfg_overlay=dict(file=...)``
can never load a file that does not belong to the model.

This module imports only torch: model files use it to declare their maps.
"""
import functools
import importlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

__all__ = [
    'IncompatibleKeysError', 'KeyRule', 'KeyMap', 'remap_state_dict', 'check_state_dict', 'make_filter',
    'describe_checkpoint', 'strip_wrapper', 'unwrap_state_dict', 'checkpoint_containers',
]

Repl = Union[str, Callable[[re.Match], str]]
_EMA_CONTAINERS = ('state_dict_ema', 'model_ema')
_CONTAINERS = ('state_dict', 'model', 'module', 'net')
_PREFIXES = ('module.', '_orig_mod.')
# where training wrappers put a backbone's weights: the zoo recipe's classifier ('model.'), mmdet-style
# detectors ('backbone.'), the zoo recipe's detectors (the features_only body under the FPN)
_WRAPPERS = ('model.', 'backbone.')
_DETECTOR_BODY = 'detector.backbone.body.model.'


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


def checkpoint_containers(use_ema: bool = True) -> Tuple[str, ...]:
    """The keys under which checkpoints seen in the wild hold their state dict, in the order they are tried."""
    return (_EMA_CONTAINERS if use_ema else ()) + _CONTAINERS


def unwrap_state_dict(checkpoint: Mapping[str, Any], use_ema: bool = True) -> Dict[str, Any]:
    """The state dict inside a training checkpoint: nested containers (`checkpoint_containers(use_ema)`) opened,
    then the prefixes of DataParallel / torch.compile (`_PREFIXES`) removed while every key has one."""
    containers = checkpoint_containers(use_ema)
    for _ in range(3):  # containers nest, e.g. {'model': {'state_dict': ...}}
        for key in containers:
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
        else:
            break
    state_dict = dict(checkpoint)
    changed = True
    while changed and state_dict:
        changed = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
                changed = True
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
        input_convs: Sequence[str] = (),
        origin: Optional[Mapping[str, Any]] = None,
) -> Tuple[List[str], List[str]]:
    """Raise IncompatibleKeysError unless `state_dict` fits `model`; returns (missing, unexpected) keys.

    Keys under `classifier` (default: the pretrained cfg's, e.g. 'head.fc') may be missing, unexpected or of
    another shape (a new head); anything else is an error, shape mismatches even with strict=False.
    The weights of `input_convs` (module names) may differ in their input-channel dimension only (timm adapts
    them to `in_chans` after the filter). `origin`, the file's state dict before any key map, lets the error say
    what the file is when it is recognisable (`describe_checkpoint`).
    """
    own = model.state_dict()
    if classifier is None:
        classifier = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier')
    heads = tuple(f'{c}.' for c in ([classifier] if isinstance(classifier, str) else classifier or ()))
    in_convs = {f'{c}.weight' for c in ([input_convs] if isinstance(input_convs, str) else input_convs)}

    def allowed(k: str) -> bool:
        return bool(heads) and k.startswith(heads)

    def other_in_chans(k: str) -> bool:
        a, b = tuple(state_dict[k].shape), tuple(own[k].shape)
        return k in in_convs and len(a) == len(b) >= 2 and a[:1] + a[2:] == b[:1] + b[2:]

    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [k for k, v in state_dict.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    bad_missing = [k for k in missing if not allowed(k)]
    bad_unexpected = [k for k in unexpected if not allowed(k)]
    bad_shapes = [k for k in mismatched if not allowed(k) and not other_in_chans(k)]
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
        what = describe_checkpoint(state_dict if origin is None else origin, target=_model_name(model))
        if what:
            lines.append(f'  {what}')
        raise IncompatibleKeysError('\n'.join(lines), bad_missing, bad_unexpected, bad_shapes)
    return missing, unexpected


def _renamed(entries: Mapping[str, Any], key_map: KeyMap) -> Iterator[Tuple[str, Any]]:
    """(our key, value) of every entry `key_map` does not drop; `when` rules are decided on the source keys."""
    rules = [r for r in key_map.rules if r.when is None or any(re.search(r.when, k) for k in entries)]
    for k, v in entries.items():
        if any(re.search(p, k) for p in key_map.drop):
            continue
        for rule in rules:
            k = re.sub(rule.pattern, rule.repl, k)
        yield k, v


def remap_state_dict(
        state_dict: Mapping[str, Any],
        model: nn.Module,
        key_map: KeyMap,
        source: Optional[str] = None,
        input_convs: Sequence[str] = (),
) -> Dict[str, torch.Tensor]:
    """Unwrap, drop, rename and transform `state_dict` by `key_map`, then `check_state_dict` it against `model`.

    A training wrapper's prefix ('model.' of the zoo recipe's checkpoints, 'backbone.') is removed when every
    key has it and no key of the model does. `input_convs`: see `check_state_dict`.
    """
    source = source or _source(model)
    origin = state_dict = unwrap_state_dict(state_dict)
    state_dict = strip_wrapper(state_dict, model)
    non_tensors = [k for k, v in state_dict.items() if not torch.is_tensor(v)]
    if non_tensors:
        raise IncompatibleKeysError(
            f'{source} is not a state dict for {_model_name(model)}: entries that are not tensors: '
            f'{_first(non_tensors)}', [], non_tensors, [])
    for pattern, message in key_map.reject:
        if any(re.search(pattern, k) for k in state_dict):
            raise IncompatibleKeysError(f'{source}: {message}', [], [], [])
    own = model.state_dict()
    out = {}
    for k, v in _renamed(state_dict, key_map):
        for pattern, fn in key_map.transforms:
            if re.search(pattern, k) and k in own and v.shape != own[k].shape:
                v = fn(v, own[k])
        out[k] = v
    check_state_dict(model, out, source, input_convs=input_convs, origin=origin)
    return out


def make_filter(key_map: KeyMap) -> Callable[[Dict[str, Any], nn.Module], Dict[str, torch.Tensor]]:
    """timm's ``checkpoint_filter_fn(state_dict, model)`` for `key_map`.

    timm calls it before it adapts the first conv to `in_chans` and drops a classifier of another class count,
    so the stem weights may differ in their input channels and the classifier in anything; nothing else.
    """
    def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
        first_conv = (getattr(model, 'pretrained_cfg', None) or {}).get('first_conv') or ()
        return remap_state_dict(state_dict, model, key_map, input_convs=first_conv)
    return checkpoint_filter_fn


def strip_wrapper(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
    """`state_dict` without a training wrapper's prefix (`_WRAPPERS`) that every key has and no model key has."""
    for prefix in _WRAPPERS:
        if state_dict and all(k.startswith(prefix) for k in state_dict) and \
                not any(k.startswith(prefix) for k in model.state_dict()):
            return {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


# ------------------------------------------------------------------------------------ what is this file?

@dataclass(frozen=True)
class _Signature:
    name: str
    key_map: KeyMap
    heads: Tuple[str, ...]
    shapes: Dict[str, Tuple[int, ...]]


@functools.lru_cache(maxsize=1)
def _zoo_signatures() -> Tuple[_Signature, ...]:
    """Names and shapes of every registered zoo model's state dict (default arguments), with its family's key map."""
    import timm
    import zoo
    out = []
    for module_name in zoo.FAMILY_MODULES:
        key_map = getattr(importlib.import_module(f'zoo.{module_name}'), 'KEY_MAP', None) or KeyMap()
        for name in timm.list_models(module=module_name):
            try:
                with torch.device('meta'):  # names and shapes only: no memory, no init compute
                    model = timm.create_model(name)
            except Exception:  # a model that does not build this way is simply not recognised
                continue
            classifier = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier') or ()
            heads = tuple(f'{c}.' for c in ([classifier] if isinstance(classifier, str) else classifier))
            shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            out.append(_Signature(name, key_map, heads, shapes))
    return tuple(out)


def _map_names(shapes: Dict[str, Tuple[int, ...]], key_map: KeyMap) -> Dict[str, Tuple[int, ...]]:
    return dict(_renamed(shapes, key_map))


def _layout(keys) -> set:
    return {re.sub(r'\.\d+(?=\.)', '.#', k) for k in keys}


def _matches(shapes: Dict[str, Tuple[int, ...]], exact: bool) -> List[str]:
    names = []
    for sig in _zoo_signatures():
        mapped = _map_names(shapes, sig.key_map)
        body = {k: s for k, s in mapped.items() if not k.startswith(sig.heads or ('\0',))}
        own = {k: s for k, s in sig.shapes.items() if not k.startswith(sig.heads or ('\0',))}
        if exact:
            resized = [p for p, _ in sig.key_map.transforms]
            if body.keys() == own.keys() and all(
                    body[k] == s or any(re.search(p, k) for p in resized) for k, s in own.items()):
                names.append(sig.name)
        elif body and _layout(body) == _layout(own):
            names.append(sig.name)
    return names


def _either(names: Sequence[str], n: int = 3) -> str:
    names = list(names)
    return ' or '.join(names[:n]) + (' (or another)' if len(names) > n else '')


def describe_checkpoint(state_dict: Mapping[str, Any], target: Optional[str] = None) -> Optional[str]:
    """What a state dict holds, when it is recognisable ("this looks like a swin_tiny checkpoint"), else None.

    Compares its names and shapes, through each zoo family's KEY_MAP, with every registered zoo model (built
    once per process without weights: about 2 s), also under the prefixes training wrappers add ('model.' in
    the zoo recipe's checkpoints, 'detector.backbone.body.model.' in its detection checkpoints). `target`, the
    model that was being loaded, is named differently ("of the default configuration") when it matches.
    """
    try:
        shapes = {k: tuple(v.shape) for k, v in unwrap_state_dict(state_dict).items() if hasattr(v, 'shape')}
        views = [('', shapes)]
        for prefix in _WRAPPERS + (_DETECTOR_BODY,):
            sub = {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}
            if sub and (prefix == _DETECTOR_BODY or len(sub) == len(shapes)):
                views.append((prefix, sub))
        for exact in (True, False):
            for prefix, view in views:
                names = _matches(view, exact)
                if names:
                    return _phrase(names, prefix, exact, target)
    except Exception:  # the description is a courtesy: never let it hide the real error
        return None
    return None


def _phrase(names: List[str], prefix: str, exact: bool, target: Optional[str]) -> str:
    model = _either(names) if exact else f'another size or configuration of {_either(names)}'
    if prefix == _DETECTOR_BODY:
        return (f'this looks like a zoo detection training checkpoint with a {model} backbone '
                f'(its weights are the entries under {prefix!r})')
    if prefix:
        return f'this looks like a training checkpoint of {model} (its weights are the entries under {prefix!r})'
    if exact and target in names:
        return (f'this looks like a {target} checkpoint, made with other arguments (num_classes, sizes, ...) '
                f'than this model')
    if exact:
        return f'this looks like a {model} checkpoint'
    return f'this looks like a checkpoint of {model} (same layers, other depths or widths)'
