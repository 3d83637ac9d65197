"""Errors, argument checks and checkpoint-safe conversions shared by the recipe."""
import difflib
import inspect
from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np


class ConfigError(ValueError):
    """A config entry that is unknown, missing or out of range."""


class DatasetError(ValueError):
    """A dataset that cannot be used: missing path, bad annotation, undecodable image, ..."""


def suggest(name: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' when `name` is close to one of `choices`, else ''."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ''


def accepted_kwargs(fn: Callable) -> Optional[set]:
    """Keyword names `fn` (a function or a class) accepts; None when it takes **kwargs."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    names = set()
    for p in sig.parameters.values():
        if p.kind == p.VAR_KEYWORD:
            return None
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            names.add(p.name)
    names.discard('self')
    return names


def check_kwargs(fn: Callable, kwargs: Mapping[str, Any], where: str, ignore: Iterable[str] = ('type',)) -> None:
    """Raise ConfigError naming `where` for every key of `kwargs` that `fn` does not accept."""
    names = accepted_kwargs(fn)
    if names is None:
        return
    unknown = [k for k in kwargs if k not in names and k not in set(ignore)]
    if unknown:
        k = unknown[0]
        what = getattr(fn, '__qualname__', getattr(fn, '__name__', str(fn)))
        raise ConfigError(
            f"{where}.{k}: unknown key for {what}{suggest(k, names)}; accepted keys: {', '.join(sorted(names))}")


def check_choice(value: Any, choices: Iterable[Any], where: str) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f'{where}: expected one of {choices}, got {value!r}{suggest(value, map(str, choices))}')


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints must load with torch.load(weights_only=True). mmengine's MessageHub pickles HistoryBuffer objects
# whose `statistics_methods` are bound methods (unpickled through builtins.getattr, which cannot be allow-listed
# safely) plus numpy arrays. We store them as plain data instead and rebuild them on load.
_HB_TAG = '__history_buffer__'


def to_plain(obj: Any) -> Any:
    """Recursively replace numpy values (and HistoryBuffers) by plain Python data that weights_only can load."""
    from mmengine.logging import HistoryBuffer
    if isinstance(obj, HistoryBuffer):
        log, count = obj.data
        return {_HB_TAG: True, 'log': [float(v) for v in log], 'count': [float(v) for v in count],
                'max_length': int(obj.max_length)}
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, to_plain(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_plain(v) for v in obj)
    return obj


def from_plain(obj: Any) -> Any:
    """Inverse of `to_plain` for HistoryBuffers (other numpy values stay plain Python)."""
    from mmengine.logging import HistoryBuffer
    if isinstance(obj, dict) and obj.get(_HB_TAG) is True:
        return HistoryBuffer(obj['log'], obj['count'], obj['max_length'])
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, from_plain(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: from_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_plain(v) for v in obj]
    return obj
