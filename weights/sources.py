"""Where a model's pretrained weights come from, checked before timm loads them.

`prepare_pretrained` runs in the zoo's builder when ``pretrained=True``: a local file
(``pretrained_cfg_overlay=dict(file=...)``) must exist and is read here, once, with the zoo's safe reader (clear
errors for a missing, truncated, corrupt or unsafe file); a download must be able to start: a cached copy is used
as is, ``HF_HUB_OFFLINE`` is respected, and otherwise the host is probed once with a short socket connect, so an
offline machine fails in seconds (not after a minute of retries) with a message naming the model and how to load
a local file instead. A url release (not the Hugging Face hub) is downloaded here into torch.hub's checkpoint cache
and read with the same safe reader as a local file.

This module imports only the standard library at module level (timm, huggingface_hub and the readers lazily):
the model builder uses it.
"""
import os
import socket
import threading
import urllib.parse
import urllib.request
from typing import Any, Dict, Optional, Tuple

__all__ = ['NoPretrainedWeightsError', 'prepare_pretrained', 'release_pretrained_state_dict', 'probe_host',
           'PROBE_TIMEOUT', 'prefer_raw_weights']

PROBE_TIMEOUT = 2.5  # seconds for the one connect to the download host
_TRUE = ('1', 'on', 'yes', 'true')


# model-name prefixes whose official checkpoints are evaluated from their raw weights ('model') even when they also
# hold EMA weights ('model_ema'); every other model reads the EMA weights first, as timm does
_RAW_WEIGHTS_PREFIXES: Tuple[str, ...] = ()


def prefer_raw_weights(prefix: str) -> None:
    """Read pretrained files of the models named `prefix`* from their raw weights, not their EMA weights, when
    a file holds both (a family whose official evaluation loads 'model' from files that also carry 'model_ema')."""
    global _RAW_WEIGHTS_PREFIXES
    if prefix not in _RAW_WEIGHTS_PREFIXES:
        _RAW_WEIGHTS_PREFIXES += (prefix,)


class NoPretrainedWeightsError(RuntimeError):
    """``pretrained=True`` for a model whose pretrained cfg names nothing to download."""


def _local_file_hint(variant: str) -> str:
    return (f"load a local weight file instead: timm.create_model('{variant}', pretrained=True, "
            f"pretrained_cfg_overlay=dict(file='path/to/weights.safetensors'))")


def _hf_offline() -> bool:
    if os.environ.get('HF_HUB_OFFLINE', '').strip().lower() in _TRUE:
        return True
    try:
        from huggingface_hub import constants
        return bool(constants.HF_HUB_OFFLINE)
    except Exception:
        return False


def probe_host(url: str, timeout: float = PROBE_TIMEOUT) -> Optional[str]:
    """None if a TCP connection to `url`'s host (or the proxy configured for it) opens within `timeout`
    seconds, else why not. Name resolution is bounded by the same timeout (the probe runs in a thread)."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or '', parts.port or (443 if parts.scheme == 'https' else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        p = urllib.parse.urlsplit(proxy if '://' in proxy else f'http://{proxy}')
        host, port = p.hostname or host, p.port or 8080
    result = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(f'{type(e).__name__}: {e}')

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return result[0] if result else f'no answer from {host}:{port} within {timeout:g} s'


def _hf_cached(loc: Any, cache_dir: Optional[str]) -> Optional[str]:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo_id, filename = loc if isinstance(loc, (tuple, list)) else (loc, None)
    # timm asks for model.safetensors first, then pytorch_model.bin (or the cfg's hf_hub_filename)
    names = [filename] if filename else ['model.safetensors', 'pytorch_model.bin']
    if filename and filename.endswith('.bin'):
        names.insert(0, filename[:-4] + '.safetensors')
    for name in names:
        path = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def _url_cached(url: str, cache_dir: Optional[str]) -> Optional[str]:
    import torch.hub
    folder = cache_dir or os.path.join(torch.hub.get_dir(), 'checkpoints')
    path = os.path.join(folder, os.path.basename(urllib.parse.urlsplit(url).path))
    return path if os.path.isfile(path) else None


DOWNLOAD_TIMEOUT = 60.0  # seconds a stalled download waits for the next bytes


def _download(url: str, cache_dir: Optional[str]) -> str:
    """`url` into torch.hub's checkpoint cache (or `cache_dir`), where `_url_cached` finds it, with a progress
    bar in bytes (`zoo.progress`). The file appears under its name only when complete (an interrupted or short
    download leaves nothing behind); a failed request raises ConnectionError naming the url."""
    import torch.hub
    from zoo.progress import progress
    from .io import atomic_write
    folder = cache_dir or os.path.join(torch.hub.get_dir(), 'checkpoints')
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(urllib.parse.urlsplit(url).path)
    path = os.path.join(folder, name)
    request = urllib.request.Request(url, headers={'User-Agent': 'attention-zoo'})
    try:
        with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT) as response, atomic_write(path) as tmp:
            size = int(response.headers.get('Content-Length') or 0) or None
            done = 0
            with open(tmp, 'wb') as f, progress(total=size, desc=f'download {name}', unit='B', unit_scale=True) as bar:
                while True:
                    chunk = response.read(1 << 20)
                    if not chunk:
                        break
                    f.write(chunk)
                    done += len(chunk)
                    bar.update(len(chunk))
            if size is not None and done != size:
                raise ConnectionError(f'{url}: the download stopped after {done} of {size} bytes')
    except ConnectionError:
        raise
    except OSError as e:  # urllib's URLError / HTTPError, a timeout, a refused connection
        raise ConnectionError(f'{url}: the download failed ({type(e).__name__}: {e})') from e
    return path


def _read_local(variant: str, path: str) -> Dict[str, Any]:
    from .io import SAFETENSORS_EXTS, TORCH_EXTS, load_weights
    if not os.path.isfile(path):
        where = '' if os.path.isabs(path) else f' (looked in {os.getcwd()})'
        kind = 'is a directory, not a weight file' if os.path.isdir(path) else 'does not exist'
        raise FileNotFoundError(f'{variant}: pretrained weight file {path!r} {kind}{where}')
    if os.path.splitext(path)[1].lower() not in SAFETENSORS_EXTS + TORCH_EXTS:
        return {}  # another format (e.g. .pth.tar): timm reads it
    use_ema = not variant.startswith(_RAW_WEIGHTS_PREFIXES)  # timm's default prefers EMA weights too
    return dict(state_dict=load_weights(path, use_ema=use_ema))


def prepare_pretrained(
        variant: str,
        pretrained_cfg: Any = None,
        pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
        cache_dir: Optional[str] = None,
) -> Dict[str, Any]:
    """The `pretrained_cfg_overlay` to build `variant` with, after checking where its weights come from.

    Local file: read here (FileNotFoundError naming the path, WeightsFileError for a bad file) and handed to
    timm as the cfg's ``state_dict`` (`release_pretrained_state_dict` drops it from the model's cfg afterwards).
    Hub / url: a cached copy is used as is (read directly when the host does not answer); without one, a
    ConnectionError in seconds when ``HF_HUB_OFFLINE`` is set or the host does not answer one short connect.
    """
    overlay = dict(pretrained_cfg_overlay or {})
    try:
        from timm.models._builder import _resolve_pretrained_source, resolve_pretrained_cfg
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=overlay).to_dict()
        load_from, loc = _resolve_pretrained_source(cfg)
    except ImportError:  # another timm: leave everything to it
        return overlay
    if cfg.get('custom_load'):
        return overlay
    if load_from == 'file':
        return dict(overlay, **_read_local(variant, os.fspath(loc)))
    if load_from == 'local-dir':
        if not os.path.isdir(os.fspath(loc)):
            raise FileNotFoundError(f'{variant}: pretrained weight folder {os.fspath(loc)!r} does not exist')
        return overlay
    if not load_from:
        notes = [n for n in cfg.get('notes') or () if isinstance(n, str)]
        note = next((n for n in notes if 'weights' in n), notes[0] if notes else '')
        raise NoPretrainedWeightsError(f'{variant}: no pretrained weights to download for this model'
                           f'{f" ({note})" if note else ""}; {_local_file_hint(variant)}, or use '
                           f'pretrained=False for random init')
    if load_from not in ('hf-hub', 'url'):
        return overlay  # a state dict passed in the cfg
    if load_from == 'hf-hub':
        endpoint = os.environ.get('HF_ENDPOINT') or 'https://huggingface.co'
        repo = loc[0] if isinstance(loc, (tuple, list)) else loc
        what = f"the Hugging Face hub ({endpoint}/{repo})"
        cached = _hf_cached(loc, cache_dir)
        if _hf_offline():
            if cached:
                return overlay
            raise ConnectionError(
                f'{variant}: pretrained=True needs the weights from {what}, but HF_HUB_OFFLINE is set and they are '
                f'not in the local cache; download them once online, or {_local_file_hint(variant)}')
    else:
        endpoint, what = loc, loc
        cached = _url_cached(loc, cache_dir)
        if cached:  # read with the zoo's reader, as a download is (below)
            return dict(overlay, file=cached, **_read_local(variant, cached))
    why = probe_host(endpoint)
    if why is None:
        if load_from == 'url':
            # downloaded here and read with the zoo's reader, not torch.hub's: official release files often hold
            # the training state beside the weights (ConvNeXt-style `args`), which the reader accepts as data
            path = _download(loc, cache_dir)
            return dict(overlay, file=path, **_read_local(variant, path))
        return overlay
    if cached:  # the hub would retry for a minute before falling back to this copy
        return dict(overlay, file=cached, **_read_local(variant, cached))
    raise ConnectionError(
        f'{variant}: pretrained=True downloads the weights from {what}, which cannot be reached from this '
        f'machine ({why}); {_local_file_hint(variant)}')


def release_pretrained_state_dict(model: Any) -> None:
    """Drop the state dict `prepare_pretrained` put in the pretrained cfgs of `model` (and its wrappers)."""
    for module in model.modules():
        for name in ('pretrained_cfg', 'default_cfg'):
            cfg = module.__dict__.get(name)
            if isinstance(cfg, dict):
                cfg.pop('state_dict', None)
