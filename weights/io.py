"""Safe weight files: atomic writes, safetensors / weights-only torch loading, strict loading into a model.

Formats: ``.safetensors`` (what the zoo writes) and torch pickles (``.pth``, ``.pt``, ``.bin``, ``.ckpt``),
which are only ever read with ``torch.load(weights_only=True)``; arbitrary pickled objects are refused.
"""
import argparse
import contextlib
import json
import os
import pickle
import struct
import uuid
import zipfile
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn

from .keymap import (
    IncompatibleKeysError, check_state_dict, checkpoint_containers, strip_wrapper, unwrap_state_dict,
)

__all__ = [
    'WeightsFileError', 'IncompatibleKeysError', 'LoadResult',
    'atomic_write', 'save_weights', 'load_weights', 'load_into', 'read_torch_file', 'check_torch_file',
    'SAFETENSORS_EXTS', 'TORCH_EXTS',
]

SAFETENSORS_EXTS = ('.safetensors',)
TORCH_EXTS = ('.pth', '.pt', '.bin', '.ckpt')
_ALIASES_META = 'zoo.aliases'

PathLike = Union[str, os.PathLike]


class WeightsFileError(ValueError):
    """A weight file that cannot be read: corrupt, truncated, unsafe or of an unknown kind."""


class LoadResult(NamedTuple):
    missing_keys: List[str]
    unexpected_keys: List[str]


def _fsync_dir(dirname: str) -> None:
    try:
        fd = os.open(dirname, os.O_RDONLY)
    except OSError:  # not supported on every platform / file system
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: PathLike) -> Iterator[str]:
    """Yield a temporary path next to `path`; on success fsync it and rename it onto `path`.

    Whatever the body writes to the temporary path appears at `path` all at once, or not at all: if the
    body raises (or writes nothing), the temporary file is removed and an existing `path` is left untouched.
    The temporary name is hidden (``.<name>.<random>.tmp``) and in the same directory, so the rename is atomic.
    """
    path = os.fspath(path)
    dirname = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(dirname):
        raise FileNotFoundError(f'atomic_write: directory {dirname!r} of {path!r} does not exist')
    tmp = os.path.join(dirname, f'.{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp')
    try:
        yield tmp
        if not os.path.isfile(tmp):
            raise RuntimeError(f'atomic_write: nothing was written to the temporary file for {path!r}')
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(dirname)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _ext(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _check_ext(path: str, argname: str) -> str:
    ext = _ext(path)
    if ext not in SAFETENSORS_EXTS + TORCH_EXTS:
        raise WeightsFileError(
            f'{argname}: unsupported weight file extension {ext or "(none)"!r} for {path!r}; '
            f'expected one of {SAFETENSORS_EXTS + TORCH_EXTS}')
    return ext


def _as_state_dict(model_or_state_dict: Union[nn.Module, Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    if isinstance(model_or_state_dict, nn.Module):
        state_dict = model_or_state_dict.state_dict()
    elif isinstance(model_or_state_dict, Mapping):
        state_dict = model_or_state_dict
    else:
        raise TypeError(f'model_or_state_dict: expected an nn.Module or a mapping of name -> tensor, '
                        f'got {type(model_or_state_dict).__name__}')
    bad = [(k, type(v).__name__) for k, v in state_dict.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise TypeError(f'model_or_state_dict: every entry must be str -> Tensor; got {len(bad)} other '
                        f'entries, e.g. {bad[:3]}')
    return {k: v.detach() for k, v in state_dict.items()}


def _dedupe_shared(state_dict: Dict[str, torch.Tensor]):
    """Split tensors for safetensors: identical views of one storage become aliases, other overlaps are copied.

    Returns (tensors to write, {alias name: stored name}).
    """
    tensors: Dict[str, torch.Tensor] = {}
    aliases: Dict[str, str] = {}
    by_storage: Dict[Any, List[str]] = {}
    for name, t in state_dict.items():
        if t.numel() == 0 or t.device.type == 'meta':
            tensors[name] = t.contiguous()
            continue
        key = (t.device, t.untyped_storage().data_ptr())
        for other in by_storage.get(key, ()):
            o = state_dict[other]
            if o.data_ptr() == t.data_ptr() and o.shape == t.shape and o.stride() == t.stride() and o.dtype == t.dtype:
                aliases[name] = other
                break
        else:
            # a different view of a storage already written gets its own copy (safetensors refuses overlaps)
            shared = key in by_storage
            tensors[name] = t.clone(memory_format=torch.contiguous_format) if shared else t.contiguous()
            by_storage.setdefault(key, []).append(name)
    return tensors, aliases


def save_weights(
        model_or_state_dict: Union[nn.Module, Mapping[str, torch.Tensor]],
        path: PathLike,
        metadata: Optional[Dict[str, str]] = None,
) -> str:
    """Write a state dict (or a module's) to `path` atomically; the format follows the extension.

    ``.safetensors``: tied / shared tensors are stored once and restored as aliases by `load_weights`.
    ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt``: a plain ``torch.save`` of the state dict.
    Returns the path written.
    """
    path = os.fspath(path)
    ext = _check_ext(path, 'path')
    state_dict = _as_state_dict(model_or_state_dict)
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError('metadata: expected a dict of str -> str')
    with atomic_write(path) as tmp:
        if ext in SAFETENSORS_EXTS:
            from safetensors.torch import save_file
            tensors, aliases = _dedupe_shared(state_dict)
            meta = {'format': 'pt', **(metadata or {})}
            if aliases:
                meta[_ALIASES_META] = json.dumps(aliases)
            save_file(tensors, tmp, metadata=meta)
        else:
            payload = {'state_dict': state_dict, 'metadata': metadata} if metadata else OrderedDict(state_dict)
            torch.save(payload, tmp)
    return path


def _check_safetensors_header(path: str) -> None:
    """Diagnose a broken safetensors file precisely (header length, JSON, data size) before parsing it."""
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsFileError(
                f'{path}: corrupt safetensors file: {size} bytes, too short for the 8-byte header length')
        (n,) = struct.unpack('<Q', head)
        if n > size - 8:
            raise WeightsFileError(
                f'{path}: truncated or corrupt safetensors file: header declares {n} bytes of JSON but the file '
                f'has only {size - 8} bytes after the length field')
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsFileError(f'{path}: corrupt safetensors file: the JSON header does not parse ({e})') from None
    if not isinstance(header, dict):
        raise WeightsFileError(f'{path}: corrupt safetensors file: the header is not a JSON object')
    ends = [v['data_offsets'][1] for k, v in header.items()
            if k != '__metadata__' and isinstance(v, dict) and 'data_offsets' in v]
    need = max(ends, default=0)
    have = size - 8 - n
    if have < need:
        raise WeightsFileError(
            f'{path}: truncated safetensors file: the header declares {need} bytes of tensor data '
            f'but only {have} are present')


def _read_safetensors(path: str, map_location: str) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open
    _check_safetensors_header(path)
    try:
        with safe_open(path, framework='pt', device=map_location) as f:
            metadata = f.metadata() or {}
            state_dict = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise WeightsFileError(f'{path}: corrupt safetensors file ({type(e).__name__}: {e})') from None
    if _ALIASES_META in metadata:
        for alias, name in json.loads(metadata[_ALIASES_META]).items():
            state_dict[alias] = state_dict[name]
    return state_dict


def check_torch_file(path: str) -> None:
    """Cheap checks of a torch checkpoint that read no tensor and unpickle nothing: the file is the zip archive
    torch.save writes (complete: its central directory is at the end) or a pickle stream (torch's legacy format).
    Raises WeightsFileError saying the file is empty, not a checkpoint, or truncated / corrupt."""
    size = os.path.getsize(path)
    if size == 0:
        raise WeightsFileError(f'{path}: empty file (0 bytes), not a checkpoint: it was truncated or never written')
    with open(path, 'rb') as f:
        head = f.read(4)
    if head.startswith(b'PK'):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise WeightsFileError(
                f'{path}: corrupt or truncated torch checkpoint ({size} bytes): the zip archive torch.save writes '
                f'is incomplete or damaged ({e})') from None
        if not any(n == 'data.pkl' or n.endswith('/data.pkl') for n in names):
            raise WeightsFileError(f'{path}: not a torch checkpoint: a zip archive without the data.pkl torch.save '
                                   f'writes (it holds {_first_names(names)})')
    elif head[:1] != b'\x80':  # the PROTO opcode that starts every pickle of protocol >= 2
        raise WeightsFileError(
            f'{path}: not a torch checkpoint: neither the zip archive torch.save writes nor a pickle '
            f'(the file starts with {head!r}, {size} bytes)')


def _first_names(names: Sequence[str], n: int = 3) -> str:
    return ', '.join(repr(x) for x in names[:n]) + (', ...' if len(names) > n else '') if names else 'nothing'


def read_torch_file(path: PathLike, map_location: Any = 'cpu') -> Any:
    """``torch.load(path, weights_only=True)`` (any object of tensors and plain containers, e.g. a training
    checkpoint), with a WeightsFileError naming the file and saying what is wrong when it cannot be read:
    not a checkpoint, truncated or corrupt, or holding pickled Python objects (never unpickled)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no such checkpoint file: {path!r}')
    return _read_torch(path, map_location)


# plain-data classes that official training scripts pickle beside the weights (DeiT / ConvNeXt-style
# `save_model` stores the argparse `args`): rebuilding one only sets attributes, nothing is called
_SAFE_GLOBALS = [argparse.Namespace]


def _read_torch(path: str, map_location: Any) -> Any:
    check_torch_file(path)
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # never repeat torch's advice to retry with weights_only=False: the file may be anything
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        rejected = next((ln for ln in lines if 'unsupported global' in ln.lower()), None)
        if rejected is not None:
            raise WeightsFileError(
                f'{path}: refused to load: torch.load(weights_only=True) found pickled Python objects, not only '
                f'tensors and plain containers ({_first_sentence(rejected)}); weight files are never unpickled '
                f'otherwise. If you trust where it came from, save its state dict to .safetensors with the code '
                f'that made it.'
            ) from None
        reason = next((ln for ln in lines if ln.lower().startswith('unsupported operand')), None) \
            or (lines[0] if lines and not lines[0].lower().startswith('weights only load failed') else '')
        raise WeightsFileError(
            f'{path}: corrupt or truncated torch checkpoint, or not a checkpoint at all: its pickle stream does not '
            f'parse as tensors and plain containers{f" ({_first_sentence(reason)})" if reason else ""}') from None
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError, ValueError, ... on damaged files
        raise WeightsFileError(
            f'{path}: corrupt or truncated torch checkpoint ({type(e).__name__}: {_first_sentence(str(e))})') from None


def _first_sentence(text: str) -> str:
    text = text.strip().splitlines()[0] if text.strip() else ''
    return text.split('. ')[0][:300]


def _unwrap(checkpoint: Any, path: str, use_ema: bool) -> Dict[str, torch.Tensor]:
    if not isinstance(checkpoint, Mapping):
        raise WeightsFileError(f'{path}: expected a state dict (a mapping of name -> tensor), '
                               f'got {type(checkpoint).__name__}')
    state_dict = unwrap_state_dict(checkpoint, use_ema=use_ema)
    bad = [k for k, v in state_dict.items() if not torch.is_tensor(v)]
    if bad:
        raise WeightsFileError(
            f'{path}: does not look like a state dict: {len(bad)} of {len(state_dict)} entries are not tensors '
            f'(e.g. {bad[:5]}); known containers are {list(checkpoint_containers(use_ema))}')
    return state_dict


def load_weights(
        path: PathLike,
        map_location: Union[str, torch.device] = 'cpu',
        use_ema: bool = False,
) -> Dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file or a weights-only torch checkpoint.

    Unwraps the usual containers ({'state_dict': ...}, {'model': ...}, and with `use_ema` timm's
    'state_dict_ema' / 'model_ema') and strips 'module.' (DDP) / '_orig_mod.' (torch.compile) prefixes.
    Raises FileNotFoundError for a missing file and WeightsFileError for an unsupported extension,
    a corrupt or truncated file, or one holding arbitrary pickled objects.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'load_weights: no such weight file: {path!r}')
    ext = _check_ext(path, 'path')
    if ext in SAFETENSORS_EXTS:
        checkpoint = _read_safetensors(path, str(torch.device(map_location)))
    else:
        checkpoint = _read_torch(path, map_location)
    return _unwrap(checkpoint, path, use_ema)


def load_into(
        model: nn.Module,
        path: PathLike,
        strict: bool = True,
        filter_fn: Optional[Callable[[Dict[str, torch.Tensor], nn.Module], Dict[str, torch.Tensor]]] = None,
        use_ema: bool = False,
) -> LoadResult:
    """Load the weights at `path` into `model`, optionally through ``filter_fn(state_dict, model)``.

    `filter_fn` has the signature of timm's ``checkpoint_filter_fn`` (official keys -> ours).
    Shape mismatches always raise; with `strict`, so do missing or unexpected keys. The error lists the
    first few names of each kind and their counts, and what the file looks like when it is recognisable.
    A training wrapper's prefix ('model.' in the zoo recipe's checkpoints) is removed first.
    Returns (missing_keys, unexpected_keys).
    """
    path = os.fspath(path)
    origin = load_weights(path, use_ema=use_ema)
    state_dict = strip_wrapper(origin, model)
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    missing, unexpected = check_state_dict(model, state_dict, path, classifier=(), strict=strict, origin=origin)
    model.load_state_dict(state_dict, strict=False)
    return LoadResult(missing, unexpected)
