"""Every ```python block of README.md runs as written, in order, in one namespace.

The blocks are found when the test runs, so README edits are covered as they land. Nothing downloads:
``pretrained=True`` without a local file builds the model and skips the load (timm's download stubbed), and
every local weight file a block names (``pretrained_cfg_overlay=dict(file=...)``) is first written, in a
temporary working directory, from the state dict of the model the same call builds.
"""
import os
import re

import pytest
import timm
import timm.models._builder
import torch

import zoo  # noqa: F401  (registers the models)
from zoo import _hierarchical
from zoo.blocks import _registry
from zoo.weights import save_weights
from zoo.weights import sources

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.md')
_BLOCK = re.compile(r'^```python[ \t]*\n(.*?)^```', re.S | re.M)
# create_model('NAME', ... file='PATH' (the call may span lines), then the rest of that line
_FILE_CALL = re.compile(r"create_model\(\s*['\"]([\w.]+)['\"]((?:(?!create_model).)*?)file\s*=\s*['\"]([^'\"]+)['\"]"
                        r"([^\n]*)", re.S)


def _python_blocks():
    with open(README, encoding='utf-8') as f:
        text = f.read()
    return [(text[:m.start()].count('\n') + 2, m.group(1)) for m in _BLOCK.finditer(text)]


def _write_named_files(code: str) -> None:
    """Write each local weight file `code` loads, from the state dict of the model that loads it."""
    for match in _FILE_CALL.finditer(code):
        name, _, path, _ = match.groups()
        if os.path.exists(path):
            continue
        num_classes = re.search(r'num_classes\s*=\s*(\d+)', match.group(0))  # of the model or in the overlay
        kwargs = dict(num_classes=int(num_classes.group(1))) if num_classes else {}
        folder = os.path.dirname(path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        save_weights(timm.create_model(name, **kwargs), path)


@pytest.fixture
def no_downloads(monkeypatch, tmp_path):
    """A temporary working directory; pretrained=True with no local file skips the (stubbed) download."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    monkeypatch.setattr(sources, 'probe_host', lambda *args, **kwargs: None)
    load_pretrained = timm.models._builder.load_pretrained

    def load_local_only(model, pretrained_cfg=None, *args, **kwargs):
        cfg = pretrained_cfg or getattr(model, 'pretrained_cfg', None) or {}
        if cfg.get('file') or cfg.get('state_dict') is not None:
            return load_pretrained(model, pretrained_cfg, *args, **kwargs)
        return None  # would download from the hub or a url

    monkeypatch.setattr(timm.models._builder, 'load_pretrained', load_local_only)
    prepare = _hierarchical.prepare_pretrained

    def prepare_local_only(variant, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None):
        overlay = dict(pretrained_cfg_overlay or {})
        if overlay.get('file') or overlay.get('state_dict') is not None:
            return prepare(variant, pretrained_cfg, overlay, cache_dir)
        return overlay  # a hub or url source: nothing is probed or downloaded (and the load above is skipped)

    monkeypatch.setattr(_hierarchical, 'prepare_pretrained', prepare_local_only)
    # README blocks may register mixers: keep them out of the registry other tests iterate
    monkeypatch.setattr(_registry, '_MIXERS', dict(_registry._MIXERS))
    monkeypatch.setattr(_registry, '_GATES', dict(_registry._GATES))


def test_readme_has_python_blocks():
    assert len(_python_blocks()) >= 2


def test_readme_python_blocks_run(no_downloads):
    torch.manual_seed(0)
    namespace = {'__name__': '__readme__'}
    for line, code in _python_blocks():
        _write_named_files(code)
        try:
            with torch.no_grad():
                exec(compile(code, f'README.md:{line}', 'exec'), namespace)
        except Exception as e:
            raise AssertionError(f'the README python block at line {line} fails: {type(e).__name__}: {e}') from e
