"""Loading through timm's pretrained path (``pretrained=True``): a file of another model always raises, in a few
lines that say what the file looks like; bad or missing files name the path; no network fails in seconds."""
import os
import pickle
import socket
import time

import pytest
import timm
import torch

import zoo
from zoo.weights import IncompatibleKeysError, NoPretrainedWeightsError, WeightsFileError, load_into, save_weights
from zoo.weights import sources

# one model per family; each is loaded with the file of the next one
FAMILIES = ['swin_tiny', 'maxvit_tiny', 'cbam_resnet18', 'nat_tiny', 'dinat_s_tiny']


def _reduced(name: str, **kwargs):
    return timm.create_model(name, **dict(zoo.reduced_args(name), **kwargs))


def _load(name: str, path, **kwargs):
    """`name` (reduced) built with pretrained=True from the local file `path`."""
    return _reduced(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)


def _recipe_checkpoint(model: torch.nn.Module, prefix: str = 'model.') -> dict:
    """What the zoo recipe (mmengine's Runner) saves: meta, the wrapper's state dict, optimizer state, hub info."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    opt.step()
    return {
        'meta': {'epoch': 6, 'iter': 60, 'cfg': "model = dict(type='TimmClassifier', model_name='cbam_resnet18')",
                 'dataset_meta': {'classes': tuple('0123456789')}, 'mmengine_version': '0.10.7'},
        'state_dict': {f'{prefix}{k}': v for k, v in model.state_dict().items()},
        'optimizer': opt.state_dict(),
        'message_hub': {'log_scalars': {}, 'runtime_info': {'epoch': 6}},
    }


@pytest.fixture(scope='module')
def family_files(tmp_path_factory):
    """A reduced model's .safetensors file per family."""
    folder = tmp_path_factory.mktemp('families')
    files = {}
    for name in FAMILIES:
        files[name] = folder / f'{name}_reduced.safetensors'
        save_weights(_reduced(name), files[name])
    return files


@pytest.fixture(scope='module')
def cbam_files(tmp_path_factory):
    """Full cbam_resnet18 (10 classes): its weights, and a recipe checkpoint epoch_6.pth of it."""
    folder = tmp_path_factory.mktemp('cbam')
    torch.manual_seed(0)
    model = timm.create_model('cbam_resnet18', num_classes=10)
    save_weights(model, folder / 'model.safetensors')
    torch.save(_recipe_checkpoint(model), folder / 'epoch_6.pth')
    return model.eval(), folder / 'model.safetensors', folder / 'epoch_6.pth'


def _check_message(err: IncompatibleKeysError, path, target: str) -> str:
    msg = str(err)
    assert str(path) in msg and target in msg, msg
    assert len(msg.splitlines()) <= 10 and len(msg) < 1500, msg
    return msg


@pytest.mark.parametrize('num_classes', [10, 1000])  # timm drops the classifier and loads non-strictly for 10
@pytest.mark.parametrize('target', FAMILIES)
def test_other_familys_file_raises_through_timm(target, num_classes, family_files):
    source = FAMILIES[(FAMILIES.index(target) + 1) % len(FAMILIES)]
    with pytest.raises(IncompatibleKeysError) as info:
        _load(target, family_files[source], num_classes=num_classes)
    msg = _check_message(info.value, family_files[source], target)
    assert 'looks like a checkpoint of another size or configuration of' in msg and source in msg, msg
    assert info.value.missing or info.value.unexpected or info.value.mismatched


def test_full_checkpoint_is_named(cbam_files):
    _, path, _ = cbam_files
    with pytest.raises(IncompatibleKeysError) as info:
        _load('nat_tiny', path, num_classes=10)
    assert _check_message(info.value, path, 'nat_tiny').endswith('this looks like a cbam_resnet18 checkpoint')
    with pytest.raises(IncompatibleKeysError, match='this looks like a cbam_resnet18 checkpoint'):
        load_into(_reduced('swin_tiny'), path)


def test_recipe_checkpoint(cbam_files):
    model, _, path = cbam_files
    for target, num_classes in (('nat_tiny', 10), ('swin_tiny', 1000)):
        with pytest.raises(IncompatibleKeysError) as info:
            _load(target, path, num_classes=num_classes)
        msg = _check_message(info.value, path, target)
        assert "training checkpoint of cbam_resnet18 (its weights are the entries under 'model.')" in msg, msg
    # into its own architecture the recipe's 'model.' wrapper is unwrapped, through timm and load_into
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        loaded = timm.create_model('cbam_resnet18', num_classes=10, pretrained=True,  # keep the file's 10-class head
                                   pretrained_cfg_overlay=dict(file=str(path), num_classes=10)).eval()
        torch.testing.assert_close(loaded(x), want, rtol=0, atol=0)
        fresh = timm.create_model('cbam_resnet18', num_classes=10).eval()
        load_into(fresh, path)
        torch.testing.assert_close(fresh(x), want, rtol=0, atol=0)
    assert 'state_dict' not in loaded.pretrained_cfg  # the file's tensors are not kept in the cfg


def test_detection_recipe_checkpoint_is_named(cbam_files, tmp_path):
    model, _, _ = cbam_files
    body = {f'detector.backbone.body.model.{k}': v for k, v in model.state_dict().items() if not k.startswith('head.')}
    body.update({'detector.head.classification_head.cls_logits.weight': torch.zeros(3, 64, 3, 3),
                 'detector.backbone.fpn.inner_blocks.0.0.weight': torch.zeros(64, 128, 1, 1)})
    path = tmp_path / 'best.pth'
    torch.save({'meta': {'epoch': 3}, 'state_dict': body}, path)
    with pytest.raises(IncompatibleKeysError) as info:
        _load('swin_tiny', path)
    msg = _check_message(info.value, path, 'swin_tiny')
    assert 'zoo detection training checkpoint with a cbam_resnet18 backbone' in msg, msg


def test_input_channels_still_adapt(family_files):
    """timm adapts the stem to in_chans after the filter: only that difference passes the check."""
    model = _load('swin_tiny', family_files['swin_tiny'], in_chans=1)
    assert model.stem.conv.weight.shape[1] == 1
    with pytest.raises(IncompatibleKeysError, match='other shape'):
        load_into(_reduced('swin_tiny', in_chans=1), family_files['swin_tiny'])  # no adaptation outside timm


# ------------------------------------------------------------------------------------------ bad and missing files

def test_missing_or_unreadable_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"swin_tiny: pretrained weight file '.*nope\.safetensors' does not"):
        _load('swin_tiny', tmp_path / 'nope.safetensors')
    with pytest.raises(FileNotFoundError, match='is a directory'):
        _load('swin_tiny', tmp_path)
    random = tmp_path / 'random.pth'
    random.write_bytes(os.urandom(4096).replace(b'PK', b'pk').replace(b'\x80', b'\x81'))
    with pytest.raises(WeightsFileError, match=r'random\.pth: not a torch checkpoint') as info:
        _load('swin_tiny', random)
    assert 'weights_only=False' not in str(info.value) and 'will likely succeed' not in str(info.value)
    truncated = tmp_path / 'truncated.pth'
    torch.save(_reduced('swin_tiny').state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    with pytest.raises(WeightsFileError, match=r'truncated\.pth: corrupt or truncated torch checkpoint'):
        _load('swin_tiny', truncated)


class _Marker:
    """Unpickling this would create a file: proof that arbitrary code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, 'w'))


def test_pickled_object_is_refused_through_timm(tmp_path):
    marker, path = tmp_path / 'pwned', tmp_path / 'evil.pth'
    torch.save({'state_dict': _reduced('swin_tiny').state_dict(), 'x': _Marker(str(marker))}, path,
               pickle_module=pickle)
    with pytest.raises(WeightsFileError, match=r'evil\.pth: refused to load') as info:
        _load('swin_tiny', path)
    assert 'will likely succeed' not in str(info.value)
    assert not marker.exists()


def test_model_without_weights_says_so():
    with pytest.raises(NoPretrainedWeightsError, match=r"cbam_resnet18: no pretrained weights .*pretrained_cfg_overlay"):
        _reduced('cbam_resnet18', pretrained=True)


# ------------------------------------------------------------------------------------------------- no network

def _hub_reachable() -> bool:
    return sources.probe_host('https://huggingface.co', timeout=2.0) is None


def test_offline_hub_fails_in_seconds(monkeypatch):
    if _hub_reachable():
        pytest.skip('the Hugging Face hub answers here; this test needs a machine without network')
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    start = time.monotonic()
    with pytest.raises(ConnectionError) as info:
        _reduced('swin_tiny', pretrained=True)
    assert time.monotonic() - start < 10
    msg = str(info.value)
    assert 'swin_tiny' in msg and 'huggingface.co' in msg and 'pretrained_cfg_overlay=dict(file=' in msg, msg


def test_unreachable_host_fails_in_seconds(monkeypatch):
    """Deterministic on any machine: a host that refuses or does not answer."""
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    with socket.socket() as s:  # a local port nobody listens on
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    monkeypatch.setenv('HF_ENDPOINT', f'http://127.0.0.1:{port}')
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=rf'swin_tiny: .*127\.0\.0\.1:{port}/timm/swin_tiny.*cannot be reached'):
        _reduced('swin_tiny', pretrained=True)
    # a url source (NAT's releases) is probed the same way
    monkeypatch.setattr(sources, 'probe_host', lambda url, timeout=0: 'ConnectionRefusedError: refused')
    with pytest.raises(ConnectionError, match=r'nat_tiny: .*shi-labs\.com.*cannot be reached'):
        _reduced('nat_tiny', pretrained=True)
    assert time.monotonic() - start < 10


def test_hf_hub_offline_fails_at_once(monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(sources, 'probe_host', lambda *a, **k: pytest.fail('HF_HUB_OFFLINE: no probe'))
    start = time.monotonic()
    with pytest.raises(ConnectionError, match='swin_tiny: .*HF_HUB_OFFLINE is set'):
        _reduced('swin_tiny', pretrained=True)
    assert time.monotonic() - start < 1


def _fake_hub_cache(cache, repo_id: str, model) -> None:
    """A Hugging Face cache entry (refs/main -> snapshot) holding `model`'s weights as model.safetensors."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = 'a' * 40
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(commit)
    (repo / 'snapshots' / commit).mkdir(parents=True)
    save_weights(model, repo / 'snapshots' / commit / 'model.safetensors')


@pytest.mark.parametrize('offline', [True, False])
def test_cached_hub_weights_load_without_network(offline, monkeypatch, tmp_path):
    """A cached copy loads at once: offline as the hub would, and without its minute of retries when the
    host does not answer."""
    ref = _reduced('swin_tiny').eval()
    _fake_hub_cache(tmp_path, 'timm/swin_tiny_patch4_window7_224.ms_in1k', ref)
    if offline:
        monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    else:
        monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
        monkeypatch.setattr(sources, 'probe_host', lambda *a, **k: 'no answer within 2.5 s')
    start = time.monotonic()
    model = _reduced('swin_tiny', pretrained=True, cache_dir=str(tmp_path)).eval()
    assert time.monotonic() - start < 10
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


@pytest.fixture
def release_server(tmp_path, monkeypatch):
    """A local http.server on 127.0.0.1 serving tmp_path/'served'; yields (folder, base url, requested paths)."""
    import functools
    import http.server
    import threading
    folder = tmp_path / 'served'
    folder.mkdir()
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    for var in ('no_proxy', 'NO_PROXY'):  # the local server is never reached through a proxy
        monkeypatch.setenv(var, '127.0.0.1,localhost')
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f'http://127.0.0.1:{server.server_address[1]}', requests
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize('name, entry', [('l2vit_tiny', 'model'), ('nat_mini', 'model_ema')])
def test_release_url_is_downloaded_and_read_safely(name, entry, release_server, tmp_path, capsys):
    """A url release is downloaded (from a local server) into the cache, with progress in bytes, and read with the
    zoo's reader: an official ConvNeXt-style file (weights, EMA weights, optimizer state and the pickled argparse
    `args`) loads, and the second build reads the cached copy without downloading. Which weights: the EMA ones
    first, as in timm, except for families whose official evaluation loads the raw ones (L2ViT)."""
    import argparse
    folder, base, requests = release_server
    weights = {'model': _reduced(name).eval(), 'model_ema': _reduced(name).eval()}
    filename = os.path.basename(timm.models.get_pretrained_cfg(name).url)
    torch.save({'model': weights['model'].state_dict(), 'model_ema': weights['model_ema'].state_dict(),
                'optimizer': {'state': {}}, 'epoch': 'best', 'args': argparse.Namespace(model=name, lr=4e-3)},
               folder / filename)
    cache = tmp_path / 'cache'
    x = torch.randn(1, 3, 64, 64)
    for _ in range(2):
        model = _reduced(name, pretrained=True, cache_dir=str(cache),
                         pretrained_cfg_overlay=dict(url=f'{base}/{filename}')).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), weights[entry](x), rtol=0, atol=0)
    assert requests == [f'/{filename}']
    assert (cache / filename).read_bytes() == (folder / filename).read_bytes()
    assert os.listdir(cache) == [filename]  # no temporary file left
    # stderr is not a terminal here: plain lines, the last one at 100% with the size in bytes
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith(f'download {filename}:')]
    size = os.path.getsize(folder / filename)
    assert len(lines) >= 2 and '\r' not in ''.join(lines)
    assert f' 100% {size / 1e6:.2f}M/{size / 1e6:.2f}M ' in lines[-1] and 'B/s' in lines[-1], lines


def test_failed_release_download_names_the_url(release_server, tmp_path):
    folder, base, _ = release_server
    url = f'{base}/missing.pth'
    with pytest.raises(ConnectionError, match='missing.pth.*HTTP Error 404'):
        _reduced('nat_mini', pretrained=True, cache_dir=str(tmp_path / 'cache'), pretrained_cfg_overlay=dict(url=url))
    assert os.listdir(tmp_path / 'cache') == []


def test_l2vit_384_release_builds_its_model():
    with torch.device('meta'):
        model = timm.create_model('l2vit_base.in22k_ft_in1k_384')
    assert model.stages[0].blocks[0].attn.window_size == (12, 12)
    assert model.pretrained_cfg['input_size'] == (3, 384, 384) and model.pretrained_cfg['crop_pct'] == 1.0
    assert model.pretrained_cfg['url'].endswith('/L2ViT-Base-22k21k-finetune-384-checkpoint-best.pth')
