"""FLOP counting against analytic counts (conv, linear, fused SDPA) and the benchmark CLI's JSON output."""
import json

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import flop_counter

from zoo.bench.flops import count_flops, count_macs, count_params
from zoo.bench.run import main


def test_count_flops_conv_linear_exact():
    model = nn.Sequential(
        nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1),  # (2, 3, 10, 12) -> (2, 8, 5, 6)
        nn.ReLU(),
        nn.Flatten(1),
        nn.Linear(8 * 5 * 6, 5),
    )
    x = torch.randn(2, 3, 10, 12)
    conv = 2 * (2 * 8 * 5 * 6) * (3 * 3 * 3)  # 2 FLOPs per MAC, per output element Cin * k * k MACs
    linear = 2 * 2 * (8 * 5 * 6) * 5
    assert count_flops(model, x) == conv + linear
    assert count_macs(model, (x,)) == (conv + linear) // 2
    assert count_params(model) == 8 * 3 * 9 + 8 + 240 * 5 + 5
    model.train()
    count_flops(model, x)
    assert model.training  # mode restored


class _Attention(nn.Module):
    def __init__(self, fused: bool):
        super().__init__()
        self.fused = fused

    def forward(self, q, k, v):
        if self.fused:
            return F.scaled_dot_product_attention(q, k, v)
        attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        return attn.softmax(-1) @ v


def test_sdpa_counted_like_explicit_attention():
    b, h, n, m, d = 2, 3, 17, 11, 8
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, h, m, d), torch.randn(b, h, m, d)
    fused = count_flops(_Attention(True), (q, k, v))
    explicit = count_flops(_Attention(False), (q, k, v))
    assert fused == explicit == 2 * (2 * b * h * n * m * d)
    # the fused call really went through the CPU flash op, which torch alone counts as 0
    counter = flop_counter.FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        F.scaled_dot_product_attention(q, k, v)
    ops = {str(op) for op in counter.get_flop_counts()['Global']}
    assert any('_scaled_dot_product_flash_attention_for_cpu' in op for op in ops), ops


def test_run_writes_json_and_table(tmp_path, capsys):
    out = tmp_path / 'res' / 'tiny'
    argv = ['--models', 'test_convnext', '--anchors', 'test_resnet', '--pairs', 'test_convnext=test_resnet',
            '--img-size', '64', '--batch-size', '2', '--repeats', '1', '--warmup', '0', '--out', str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert '| test_convnext | timm |' in printed and '| test_convnext | test_resnet |' in printed
    result = json.loads((tmp_path / 'res' / 'tiny.json').read_text())
    meta = result['meta']
    assert (meta['img_size'], meta['batch_size'], meta['repeats']) == (64, 2, 1)
    assert {'torch', 'timm', 'threads', 'cpu', 'date', 'command', 'memory', 'flops'} <= set(meta)
    rows = {r['name']: r for r in result['models']}
    assert list(rows) == ['test_convnext', 'test_resnet']
    for name, r in rows.items():
        model = timm.create_model(name).eval()
        assert r['params'] == count_params(model)
        assert r['flops'] == count_flops(model, torch.randn(1, 3, 64, 64)) > 0
        assert r['gmacs'] == pytest.approx(r['flops'] / 2e9)
        assert len(r['throughput_runs']) == 1 and r['throughput_img_s'] > 0
        assert r['ms_per_batch'] == pytest.approx(1000 * 2 / r['throughput_img_s'])
        assert r['cpu_ms_per_batch'] > 0
        assert r['peak_mem_mb'] >= 0 and r['weights_mb'] > 0 and r['memory_method']
    (pair,) = result['pairs']
    a, b = rows['test_convnext'], rows['test_resnet']
    assert (pair['ours'], pair['anchor']) == ('test_convnext', 'test_resnet')
    assert pair['throughput_ratio'] == pytest.approx(a['throughput_img_s'] / b['throughput_img_s'])
    assert pair['cpu_time_ratio'] == pytest.approx(a['cpu_ms_per_batch'] / b['cpu_ms_per_batch'])
    assert pair['gmacs_ratio'] == pytest.approx(a['gmacs'] / b['gmacs'])
    if b['peak_mem_mb'] > 0:
        assert pair['peak_mem_ratio'] == pytest.approx(a['peak_mem_mb'] / b['peak_mem_mb'])
    assert pair['params_ratio'] == pytest.approx(a['params'] / b['params'])
    assert (tmp_path / 'res' / 'tiny.md').read_text().count('\n|') >= 4
    assert (tmp_path / 'res' / 'tiny.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_run_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit) as exc:
        main(['--models', 'no_such_model_xyz', '--no-memory'])
    assert exc.value.code == 2
    assert "['no_such_model_xyz'] not registered" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(['--models', 'test_resnet', '--pairs', 'test_resnet'])
    assert 'OURS=ANCHOR' in capsys.readouterr().err
