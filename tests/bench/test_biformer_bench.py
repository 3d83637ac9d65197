"""The BiFormer benchmarks: the gather baseline (the official formulation) computes what our op computes, in
the op and in the whole model, forward and backward; both scripts run and write their tables."""
import json

import pytest
import timm
import torch

import zoo
from zoo.bench.biformer_cpu import gather_baseline, routed_attention_gather
from zoo.bench.biformer_cpu import main as cpu_main
from zoo.kernels.routing import routed_attention


@pytest.mark.parametrize('H, W, n_win, topk, dv', [(14, 14, 7, 3, 8), (8, 12, 2, 4, 6), (6, 6, 3, -2, 8)])
def test_gather_baseline_equals_our_op(H, W, n_win, topk, dv):
    q, k = (torch.randn(2, H, W, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(2, H, W, 2, dv, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, H, W, 2, dv, dtype=torch.float64)
    ours, base = routed_attention(q, k, v, n_win, topk), routed_attention_gather(q, k, v, n_win, topk)
    torch.testing.assert_close(base, ours, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), g), torch.autograd.grad(base, (q, k, v), g)):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_gather_baseline_in_the_model():
    model = timm.create_model('biformer_tiny', **zoo.reduced_args('biformer_tiny')).double().train()
    x = torch.randn(2, 3, 80, 96, dtype=torch.float64)
    grads = []
    for baseline in (False, True):
        model.zero_grad()
        with gather_baseline() if baseline else torch.enable_grad():
            out = model(x)
        out.square().sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-9, atol=1e-10)
    for n in grads[0][1]:
        torch.testing.assert_close(grads[1][1][n], grads[0][1][n], rtol=1e-7, atol=1e-9, msg=n)
    import zoo.blocks.routing as mixer
    assert mixer.routed_attention is routed_attention  # restored


def test_cpu_benchmark_writes_its_table(tmp_path):
    out = tmp_path / 'res' / 'biformer_cpu'
    rows = cpu_main(['--reduced', '--img-size', '64', '--batch', '2', '--fwd-batch', '2', '--threads', '1',
                     '--repeats', '1', '--no-rss', '--out', str(out)])
    assert [r['method'] for r in rows] == ['ours', 'gather_baseline']
    assert all(r['train_s'] > 0 and r['fwd_img_per_s'] > 0 and r['train_peak_tensor_mb'] > 0 for r in rows)
    assert rows[0]['max_abs_logit_diff_vs_ours'] < 1e-5
    data = json.loads(out.with_suffix('.json').read_text())
    assert data['meta']['args']['model'] == 'biformer_tiny' and len(data['rows']) == 2
    assert '| ours vs baseline |' in out.with_suffix('.md').read_text()


def test_gpu_script_runs_on_cpu(tmp_path):
    from zoo.bench.biformer_gpu import main as gpu_main
    rows = gpu_main(['--cpu', '--img-size', '28', '--stages', '1', '--batch', '1', '--dtype', 'fp32', '--repeats', '1',
                     '--warmup', '0', '--out', str(tmp_path / 'gpu')])
    methods = {r['method'] for r in rows}
    assert {'reference', 'gather_baseline', 'flex'} <= methods
    assert all(r['max_abs_err_vs_reference'] < 1e-5 for r in rows)
    assert (tmp_path / 'gpu.md').exists()
