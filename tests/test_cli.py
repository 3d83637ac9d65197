"""The `zoo` command: list, info, check, export, forwarding to bench / train, unknown-model errors."""
import json
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import timm
import torch

import zoo
from zoo.cli import main

MODEL = 'cbam_resnet18'


def test_list(capsys):
    assert main(['list']) == 0
    names = capsys.readouterr().out.split()
    assert names == zoo.list_zoo_models() and MODEL in names
    assert main(['list', 'cbam*']) == 0
    cbam = capsys.readouterr().out.split()
    assert MODEL in cbam and all(n.startswith('cbam') for n in cbam)
    assert main(['list', 'no_such_family*']) == 2
    assert capsys.readouterr().err.startswith("zoo list: error: no zoo model matches 'no_such_family*'")


def test_info(capsys):
    assert main(['info', MODEL, '--json']) == 0
    info = json.loads(capsys.readouterr().out)
    model = timm.create_model(MODEL)
    assert info['params'] == sum(p.numel() for p in model.parameters())
    assert [(d['num_chs'], d['reduction']) for d in info['feature_info']] == [
        (d['num_chs'], d['reduction']) for d in model.feature_info]
    assert len(info['feature_info']) >= 3 and info['input_size'] == [3, 224, 224]
    assert main(['info', MODEL]) == 0
    out = capsys.readouterr().out
    assert re.search(r'params\s+11\.\d\d M', out) and 'pretrained' in out and 'stage  channels  reduction' in out


def test_unknown_model_lists_close_matches(capsys):
    for argv in (['info', 'cbam_resnet81'], ['export', 'cbam_resnet81', '-o', 'x.onnx'], ['check', 'cbam_resnet81']):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "unknown model 'cbam_resnet81'" in err and f'Did you mean: {MODEL}' in err


def test_export_with_checkpoint(tmp_path, capsys, monkeypatch):
    from zoo.weights import onnx_run, save_weights
    monkeypatch.setenv('ZOO_PROGRESS_INTERVAL', '0')
    src = timm.create_model(MODEL, num_classes=10).eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    ckpt = tmp_path / 'w.safetensors'
    save_weights(src, ckpt)
    out = tmp_path / 'm.onnx'
    argv = ['export', MODEL, '--output', str(out), '--img-size', '64', '96', '--dynamic', '--exporter', 'legacy',
            '--checkpoint', str(ckpt), '--num-classes', '10']
    assert main(argv) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report['path'] == str(out) and report['exporter'] == 'legacy' and report['dynamic'] is True
    assert [c['input_shape'] for c in report['checks']] == [[2, 3, 64, 96], [3, 3, 48, 80], [3, 3, 88, 112]]
    # progress over the steps as plain lines (stderr is no terminal), one per step with a 0 s interval
    steps = [ln for ln in captured.err.splitlines() if ln.startswith('export CbamResNet: ')]
    assert [ln.rsplit(', ', 1)[-1] for ln in steps[1:]] == [
        'legacy export]', 'onnxruntime session]', 'onnxruntime at 2x3x64x96]', 'onnxruntime at 3x3x48x80]',
        'onnxruntime at 3x3x88x112]', 'done]'], steps
    assert ' 100% 5/5 [elapsed ' in steps[-1] and '\r' not in captured.err
    assert report['max_abs_err'] <= 1e-4
    # the exported graph carries the checkpoint's weights, not a fresh init
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        np.testing.assert_allclose(onnx_run(str(out), x)[0], src(x).numpy(), rtol=1e-4, atol=1e-4)


def test_export_errors(tmp_path, capsys):
    ckpt = tmp_path / 'w.pth'
    from zoo.weights import save_weights
    save_weights(timm.create_model(MODEL, num_classes=10), ckpt)
    out = tmp_path / 'm.onnx'
    assert main(['export', MODEL, '-o', str(out), '--img-size', '64', '--checkpoint', str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.startswith('zoo export: error: --checkpoint: ')
    assert "other shape (2): 'head.fc.weight' is (10, 512) in the file, (1000, 512) in the model" in err
    assert main(['export', MODEL, '-o', str(tmp_path / 'm.onnx.bak'), '--img-size', '64']) == 2
    assert "path: expected a file name ending in '.onnx'" in capsys.readouterr().err
    assert main(['export', MODEL, '-o', str(out), '--img-size', '64', '-1']) == 2
    assert '--img-size: expected H [W]' in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize('argv,message', [
    (['-o', '{tmp}/no/such/dir/m.onnx'], "--output: folder '{tmp}/no/such/dir' does not exist"),
    (['-o', '{tmp}'], 'is a folder; expected a .onnx file name'),
    (['-o', '{tmp}/m.onnx', '--checkpoint', '{tmp}/nope.pth'], "--checkpoint: no such weight file: '{tmp}/nope.pth'"),
    (['-o', '{tmp}/m.onnx', '--checkpoint', '{tmp}/random.pth'], "--checkpoint: {tmp}/random.pth: not a torch checkpoint"),
    (['-o', '{tmp}/m.onnx', '--num-classes', '-3'], '--num-classes: expected >= 0'),
    (['-o', '{tmp}/m.onnx', '--atol', '-1'], '--atol: expected a positive tolerance'),
    (['-o', '{tmp}/m.onnx', '--opset', '3'], '--opset: the dynamo exporter writes opsets 18..'),
    (['-o', '{tmp}/m.onnx', '--opset', '99', '--exporter', 'legacy'], '--opset: the legacy exporter writes opsets 7..'),
    (['-o', '{tmp}/m.onnx', '--img-size', '8'], 'expected H and W >= 32, got (8, 8)'),
])
def test_export_careless_input_is_one_line_exit_2(argv, message, tmp_path, capsys):
    (tmp_path / 'random.pth').write_bytes(b'\x00not a checkpoint' * 100)
    argv = [a.replace('{tmp}', str(tmp_path)) for a in argv]
    assert main(['export', MODEL] + argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith('zoo export: error: ') and len(captured.err.strip().splitlines()) == 1, captured.err
    assert message.replace('{tmp}', str(tmp_path)) in captured.err
    assert 'Traceback' not in captured.err + captured.out and not list(tmp_path.glob('*.onnx'))


def test_check_real_images_and_onnx(capsys):
    assert main(['check', MODEL, '--img-size', '64', '64']) == 0
    captured = capsys.readouterr()
    out = captured.out
    progress = [ln for ln in captured.err.splitlines() if ln.startswith('check: ')]
    assert progress[0] == 'check:   0% 0/1 [elapsed 00:00, left ?, ?model/s]'
    assert progress[-1].startswith('check: 100% 1/1 [elapsed ') and progress[-1].endswith(f', {MODEL}]'), progress
    row = next(line for line in out.splitlines() if line.startswith(MODEL))
    cols = row.split()
    assert cols[0] == MODEL and float(cols[1]) == pytest.approx(11.78, abs=0.01)
    assert cols[3] == '2x1000' and cols[4] == 'ok' and cols[5] == 'ok' and cols[-1] == 'ok'
    assert float(cols[6]) <= 1e-4  # onnxruntime max abs error of the exported model
    assert 'checked in onnxruntime at 2x3x64x64, 3x3x48x56, 3x3x88x72' in out
    assert '1/1 models passed' in out


def test_image_batch_is_the_sklearn_photos():
    from zoo.cli import _image_batch, _sample_images
    model = timm.create_model(MODEL)
    images = _sample_images()
    assert [im.size for im in images] == [(640, 427), (640, 427)]
    x, cfg = _image_batch(model, images, (48, 80))
    assert x.shape == (2, 3, 48, 80) and cfg['input_size'] == (3, 48, 80)
    # un-normalised back to [0, 1]: real photos, with different colour statistics
    mean, std = torch.tensor(cfg['mean']).view(3, 1, 1), torch.tensor(cfg['std']).view(3, 1, 1)
    pixels = x * std + mean
    assert pixels.min() >= -1e-4 and pixels.max() <= 1 + 1e-4
    assert (pixels[0].mean((1, 2)) - pixels[1].mean((1, 2))).abs().max() > 0.05


def test_forwarding(monkeypatch):
    calls = []
    fake_bench = types.ModuleType('zoo.bench.cli')
    fake_bench.main = lambda argv: calls.append(('bench', argv)) or 0
    fake_train = types.ModuleType('zoo.train.cli')
    fake_train.main = lambda argv: calls.append(('train', argv)) or 3
    monkeypatch.setitem(sys.modules, 'zoo.bench.cli', fake_bench)
    monkeypatch.setitem(sys.modules, 'zoo.train.cli', fake_train)
    assert main(['bench', 'models', 'swin_tiny', '--help']) == 0
    assert main(['train', 'configs/x.py', '--opts', 'a=1', '--resume']) == 3
    assert main(['eval', 'configs/x.py', 'ckpt.safetensors']) == 3
    assert calls == [('bench', ['models', 'swin_tiny', '--help']),
                     ('train', ['train', 'configs/x.py', '--opts', 'a=1', '--resume']),
                     ('train', ['eval', 'configs/x.py', 'ckpt.safetensors'])]


def test_forwarding_missing_module(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'zoo.train.cli', None)  # import of train.cli raises ImportError
    assert main(['train', 'cfg.py']) == 1
    assert '`zoo train` needs zoo.train.cli, which does not import' in capsys.readouterr().err


def test_module_entry_point_exit_code():
    res = subprocess.run([sys.executable, '-m', 'zoo.cli', 'info', 'nope'], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "unknown model 'nope'" in res.stderr


def test_mixers_command(capsys):
    import zoo.blocks
    mixers, video, gates = zoo.blocks.list_mixers(), zoo.blocks.list_mixers(3), zoo.blocks.list_gates()
    assert mixers and video and gates
    assert main(['mixers']) == 0
    lines = capsys.readouterr().out.splitlines()
    columns = {'mixer': ['paper', 'cost (N tokens)', 'triton', 'onnx dynamic H/W', 'torchscript', 'arguments'],
               'gate': ['paper', 'cost (N tokens)', 'arguments']}
    headers = [i for i, line in enumerate(lines) if line.startswith('mixer ')]
    assert len(headers) == 2 and '(B, T, H, W, C)' in lines[headers[1] - 1]  # the 2-D table, then the video one
    for start, kind, names, info_of in ((headers[0], 'mixer', mixers, zoo.blocks.mixer_info),
                                        (headers[1], 'mixer', video, zoo.blocks.mixer_info),
                                        (None, 'gate', gates, zoo.blocks.gate_info)):
        if start is None:
            start = next(i for i, line in enumerate(lines) if line.startswith(kind + ' '))
        header = lines[start]
        assert [c for c in columns[kind] if c in header] == columns[kind]
        assert set(lines[start + 1]) == {'-', ' '}
        section = lines[start + 2:]
        section = section[:section.index('')] if '' in section else section
        assert [row.split()[0] for row in section] == names
        for row, name in zip(section, names):
            info = info_of(name)
            cells = [c.strip() for c in re.split(r'\s{2,}', row)]
            expect = [name, info.paper, info.cost] + (
                ['yes' if flag else 'no' for flag in (info.triton, info.onnx_dynamic, info.torchscript)]
                if kind == 'mixer' else []
            ) + [info.arguments or '-']
            assert cells == expect
    assert main(['mixers', '--json']) == 0
    data = json.loads(capsys.readouterr().out)
    assert [m['name'] for m in data['mixers']] == mixers + video and [g['name'] for g in data['gates']] == gates
    assert [m['spatial_dims'] for m in data['mixers']] == [2] * len(mixers) + [3] * len(video)
    assert {'paper', 'cost', 'triton', 'onnx_dynamic', 'torchscript', 'arguments'} <= set(data['mixers'][0])


def test_bench_without_out_leaves_committed_results_untouched(tmp_path, monkeypatch, capsys):
    """Issue 11: `zoo bench models` (and `zoo bench mixers`) write a new work_dirs/bench/<timestamp>, never
    bench/results."""
    import hashlib
    import pathlib

    import zoo.bench
    committed = pathlib.Path(zoo.bench.__file__).resolve().parent / 'results'

    def snapshot(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}

    before = snapshot(committed)
    local = tmp_path / 'bench' / 'results'  # a checkout's committed results, relative to the working directory
    local.mkdir(parents=True)
    for name in ('default.json', 'default.md', 'mixers.json', 'mixers.md'):
        (local / name).write_text('committed\n')
    monkeypatch.chdir(tmp_path)
    assert main(['bench', 'models', 'test_resnet', '--sizes', '32', '--batch', '1', '--repeats', '1',
                 '--warmup', '0', '--precision', 'fp32', '--no-memory', '--no-plot']) == 0
    assert main(['bench', 'mixers', 'window', '--sizes', '4', '--repeats', '1', '--warmup', '0',
                 '--min-time', '0.001', '--no-memory', '--no-plot']) == 0
    assert 'wrote work_dirs/bench/' in capsys.readouterr().out
    assert snapshot(local) == {n: hashlib.sha256(b'committed\n').hexdigest() for n in snapshot(local)}
    assert len(snapshot(local)) == 4 and snapshot(committed) == before
    written = sorted(p.name for p in (tmp_path / 'work_dirs' / 'bench').glob('*/*'))
    assert written == ['mixers_custom.json', 'mixers_custom.md', 'models_custom.json', 'models_custom.md']
