"""weights.io: atomic writes, safetensors / weights-only torch round trips, clear errors on bad files."""
import os
import pickle
import random

import pytest
import safetensors
import safetensors.torch
import torch
import torch.nn as nn

from zoo.weights.io import (
    IncompatibleKeysError, WeightsFileError, atomic_write, load_into, load_weights, read_torch_file, save_weights,
)


class TiedNet(nn.Module):
    """Embedding tied to the output projection, plus a BatchNorm (buffers)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.norm = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 10, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, idx):
        return self.out(self.norm(self.embed(idx)))


def _randomised(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.copy_(torch.randn_like(t).abs() + 0.1)
    return model.eval()


def _listdir(path):
    return sorted(os.listdir(path))


@pytest.mark.parametrize('ext', ['.safetensors', '.pth'])
def test_round_trip_with_tied_weights(tmp_path, ext):
    src = _randomised(TiedNet())
    path = tmp_path / f'w{ext}'
    save_weights(src, path)
    state_dict = load_weights(path)
    assert set(state_dict) == set(src.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(state_dict[k], v), k
    dst = TiedNet().eval()
    assert load_into(dst, path) == ([], [])
    idx = torch.tensor([1, 2, 3, 4, 5, 9])
    assert torch.equal(dst(idx), src(idx))
    assert dst.out.weight is dst.embed.weight  # loading keeps the tie
    assert _listdir(tmp_path) == [path.name]


def test_safetensors_stores_a_tied_tensor_once(tmp_path):
    path = tmp_path / 'w.safetensors'
    save_weights(_randomised(TiedNet()), path)
    with safetensors.safe_open(str(path), framework='pt') as f:
        stored = set(f.keys())
    assert ('embed.weight' in stored) != ('out.weight' in stored)


def test_safetensors_overlapping_views_are_copied(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    state_dict = {'full': base, 'rows': base[:2], 'col': base[:, 1], 'same': base}
    save_weights(state_dict, tmp_path / 'v.safetensors')
    loaded = load_weights(tmp_path / 'v.safetensors')
    for k, v in state_dict.items():
        assert torch.equal(loaded[k], v), k


def test_safetensors_metadata_round_trip(tmp_path):
    path = tmp_path / 'm.safetensors'
    save_weights({'a': torch.ones(2)}, path, metadata={'arch': 'tiny'})
    with safetensors.safe_open(str(path), framework='pt') as f:
        assert f.metadata()['arch'] == 'tiny'


@pytest.mark.parametrize('ext,writer', [('.safetensors', 'safetensors.torch.save_file'), ('.pth', 'torch.save')])
def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch, ext, writer):
    path = tmp_path / f'w{ext}'
    old = {'a': torch.ones(3)}
    save_weights(old, path)
    before = path.read_bytes()

    def partial_then_fail(obj, f, *args, **kwargs):
        with open(f, 'wb') as fh:
            fh.write(b'\x00' * 16)  # a partial file
        raise OSError('disk full (injected)')

    monkeypatch.setattr(writer, partial_then_fail)
    with pytest.raises(OSError, match='injected'):
        save_weights({'a': torch.zeros(3), 'b': torch.zeros(2)}, path)
    assert path.read_bytes() == before
    assert _listdir(tmp_path) == [path.name]


def test_failure_at_rename_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / 'new.safetensors'

    def boom(src, dst):
        raise OSError('rename failed (injected)')

    monkeypatch.setattr(os, 'replace', boom)
    with pytest.raises(OSError, match='injected'):
        save_weights({'a': torch.ones(3)}, path)
    assert _listdir(tmp_path) == []


def test_atomic_write_errors(tmp_path):
    with pytest.raises(RuntimeError, match='nothing was written'):
        with atomic_write(tmp_path / 'x.bin'):
            pass
    with pytest.raises(FileNotFoundError, match='does not exist'):
        with atomic_write(tmp_path / 'missing_dir' / 'x.bin'):
            pass
    with atomic_write(tmp_path / 'x.txt') as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and not os.path.exists(tmp)
        with open(tmp, 'w') as f:
            f.write('done')
    assert (tmp_path / 'x.txt').read_text() == 'done'
    assert _listdir(tmp_path) == ['x.txt']


def test_truncated_safetensors_names_file_and_problem(tmp_path):
    path = tmp_path / 'w.safetensors'
    save_weights({'a': torch.randn(64), 'b': torch.randn(8, 8)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    match = r'w\.safetensors: truncated .*declares 512 bytes of tensor data but only 412 are present'
    with pytest.raises(WeightsFileError, match=match):
        load_weights(path)
    path.write_bytes(data[:30])
    with pytest.raises(WeightsFileError, match=r'w\.safetensors: truncated or corrupt .*header declares'):
        load_weights(path)
    path.write_bytes(data[:8] + b'{not json' + data[17:])
    with pytest.raises(WeightsFileError, match='JSON header does not parse'):
        load_weights(path)


def test_truncated_pth_names_file(tmp_path):
    path = tmp_path / 'w.pth'
    save_weights({'a': torch.randn(64)}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(WeightsFileError, match=r'w\.pth: corrupt or truncated torch checkpoint'):
        load_weights(path)


def test_missing_file_and_bad_extension(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.safetensors'):
        load_weights(tmp_path / 'nope.safetensors')
    (tmp_path / 'w.npz').write_bytes(b'123')
    with pytest.raises(WeightsFileError, match=r"unsupported weight file extension '\.npz'"):
        load_weights(tmp_path / 'w.npz')
    with pytest.raises(WeightsFileError, match=r"unsupported .*'\.npz'"):
        save_weights({'a': torch.ones(1)}, tmp_path / 'out.npz')
    with pytest.raises(TypeError, match='str -> Tensor'):
        save_weights({'a': 3}, tmp_path / 'out.pth')


class _Marker:
    """Unpickling this would create a file: proof that arbitrary code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, 'w'))


def test_pickled_arbitrary_object_is_refused(tmp_path):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    with open(path, 'wb') as f:
        torch.save({'state_dict': {'a': torch.ones(1)}, 'payload': _Marker(str(marker))}, f, pickle_module=pickle)
    with pytest.raises(WeightsFileError, match=r'evil\.pth: refused to load: torch\.load\(weights_only=True\)'):
        load_weights(path)
    assert not marker.exists()


def test_training_args_beside_the_weights_load(tmp_path):
    # DeiT / ConvNeXt-style official checkpoints (L2ViT's among them) pickle the argparse namespace with the weights
    import argparse
    sd = {'x': torch.randn(2)}
    torch.save({'model': sd, 'epoch': 3, 'args': argparse.Namespace(lr=1e-3, model='l2vit_tiny')}, tmp_path / 'a.pth')
    assert torch.equal(load_weights(tmp_path / 'a.pth')['x'], sd['x'])


def test_unwraps_containers_and_prefixes(tmp_path):
    a, b = torch.randn(2), torch.randn(3)
    torch.save({'epoch': 3, 'model': {'module.x': a, 'module.y.z': b}}, tmp_path / 'ddp.pth')
    assert set(load_weights(tmp_path / 'ddp.pth')) == {'x', 'y.z'}
    torch.save({'state_dict': {'_orig_mod.x': a}, 'state_dict_ema': {'x': b}, 'optimizer': {}}, tmp_path / 'ema.pth')
    assert torch.equal(load_weights(tmp_path / 'ema.pth')['x'], a)
    assert torch.equal(load_weights(tmp_path / 'ema.pth', use_ema=True)['x'], b)
    torch.save({'epoch': 3, 'lr': 0.1}, tmp_path / 'meta.pth')
    with pytest.raises(WeightsFileError, match=r'meta\.pth: does not look like a state dict: 2 of 2'):
        load_weights(tmp_path / 'meta.pth')


def test_load_into_reports_missing_and_unexpected_keys(tmp_path):
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(4)])
    state_dict = {k.replace('0.', 'first.'): v for k, v in model.state_dict().items()}
    state_dict.update({f'extra.{i}': torch.zeros(1) for i in range(7)})
    path = tmp_path / 'w.safetensors'
    save_weights(state_dict, path)
    with pytest.raises(IncompatibleKeysError) as info:
        load_into(model, path)
    msg = str(info.value)
    assert 'w.safetensors does not belong to Sequential' in msg
    assert "missing from the file (2): '0.weight', '0.bias'" in msg
    assert "not in the model (9): 'extra.0', 'extra.1', 'extra.2', ..." in msg  # file order (sorted)
    assert info.value.missing == ['0.weight', '0.bias']

    result = load_into(model, path, strict=False)
    assert result.missing_keys == ['0.weight', '0.bias'] and len(result.unexpected_keys) == 9
    assert torch.equal(model[1].weight, state_dict['1.weight'])

    def rename_back(sd, m):
        return {k.replace('first.', '0.'): v for k, v in sd.items() if not k.startswith('extra.')}

    fresh = nn.Sequential(*[nn.Linear(2, 2) for _ in range(4)])
    assert load_into(fresh, path, filter_fn=rename_back) == ([], [])
    assert torch.equal(fresh[0].weight, model.state_dict()['0.weight'])


def test_load_into_reports_shape_mismatch_even_when_not_strict(tmp_path):
    path = tmp_path / 'w.pth'
    save_weights(nn.Linear(3, 4), path)
    match = r"other shape \(2\): 'weight' is \(4, 3\) in the file, \(5, 3\) in the model"
    with pytest.raises(IncompatibleKeysError, match=match):
        load_into(nn.Linear(3, 5), path, strict=False)


_RANDOM = random.Random(0).randbytes  # fixed bytes: xdist workers must collect the same test ids


@pytest.mark.parametrize('content,match', [
    (_RANDOM(5000).replace(b'PK', b'pk').replace(b'\x80', b'\x81'), 'not a torch checkpoint: neither the zip'),
    (b'hello world\n', r"not a torch checkpoint: .*starts with b'hell'"),
    (b'', r'empty file \(0 bytes\), not a checkpoint'),
    (b'\x80\x02' + bytes(range(90, 250)), 'corrupt or truncated torch checkpoint, or not a checkpoint at all'),
    (b'PK\x03\x04' + _RANDOM(300), 'corrupt or truncated torch checkpoint .*zip archive'),
], ids=['random-bytes', 'text', 'empty', 'broken-pickle', 'broken-zip'])
def test_not_a_checkpoint_never_suggests_unpickling(tmp_path, content, match):
    """Random bytes, text, an empty file, a broken pickle, a broken zip: said plainly, and never torch's advice to
    retry with weights_only=False (which would unpickle an untrusted file)."""
    path = tmp_path / 'w.pth'
    path.write_bytes(content)
    for read in (load_weights, read_torch_file):
        with pytest.raises(WeightsFileError, match=match) as info:
            read(path)
        msg = str(info.value)
        assert msg.startswith(str(path)) and 'weights_only=False' not in msg and 'likely succeed' not in msg, msg


@pytest.mark.parametrize('keep', [0.5, 0.05])
def test_truncated_pth_says_truncated(tmp_path, keep):
    path = tmp_path / 'w.pth'
    save_weights({'a': torch.randn(1000), 'b': torch.randn(30, 30)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(WeightsFileError, match=r'w\.pth: corrupt or truncated torch checkpoint') as info:
        load_weights(path)
    assert 'safely' not in str(info.value)
    legacy = tmp_path / 'legacy.pth'  # torch's pre-zip format, cut short
    torch.save({'a': torch.randn(1000)}, legacy, _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[:-100])
    with pytest.raises(WeightsFileError, match=r'legacy\.pth: corrupt or truncated torch checkpoint'):
        load_weights(legacy)


def test_read_torch_file_reads_training_checkpoints(tmp_path):
    path = tmp_path / 'epoch_1.pth'
    torch.save({'meta': {'epoch': 1, 'cfg': 'x = 1'}, 'state_dict': {'model.w': torch.ones(2)}}, path)
    checkpoint = read_torch_file(path)
    assert checkpoint['meta']['epoch'] == 1 and torch.equal(checkpoint['state_dict']['model.w'], torch.ones(2))
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        read_torch_file(tmp_path / 'nope.pth')
