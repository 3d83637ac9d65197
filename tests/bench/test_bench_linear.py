"""`zoo bench linear` (bench/linear.py) and bench/linear_gpu.py at tiny sizes: every part runs and writes the fields
the README table reads (not timings); the GPU script refuses to run without CUDA and, on CPU under the Triton
interpreter, checks its own two paths against each other."""
import json

import pytest
import torch

import zoo
from zoo.bench.linear import ANCHOR, MODELS, main
from zoo.bench.linear_gpu import main as gpu_main
from zoo.blocks.linear import list_variants
from zoo.kernels.backend import interpreter_on, triton_available

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def test_every_part_at_tiny_sizes(tmp_path, capsys):
    assert main(['--sizes', '8', '4', '--repeats', '1', '--global-max-tokens', '20', '--reduced', '--batch', '1',
                 '--img-size', '64', '--out', str(tmp_path)]) == 0
    result = json.loads((tmp_path / 'linear.json').read_text())
    assert result['meta']['sizes'] == [4, 8] and result['meta']['reduced']
    mixers = [f'linear/{v}' for v in list_variants()] + ['window', 'global']
    assert len(mixers) >= 7  # efficient, flatten, inline, l2vit, mala
    rows = {(r['mixer'], r['size']): r for r in result['mixers']}
    assert set(rows) == {(m, s) for m in mixers for s in (4, 8)}
    assert rows['global', 8].get('skipped') and not rows['global', 4].get('skipped')  # 64 > 20 tokens
    for (name, size), r in rows.items():
        if r.get('skipped'):
            continue
        assert r['tokens'] == size * size and r['fwd_ms'] > 0 and r['fwdbwd_ms'] > 0 and r['fwdbwd_peak_mib'] > 0
        assert ('fwdbwd_ratio_4x' in r) == (size == 8), (name, size)  # 8 x 8 = 4x the tokens of 4 x 4
    r = rows['linear/mala', 8]
    assert r['fwdbwd_ratio_4x'] == pytest.approx(r['fwdbwd_ms'] / rows['linear/mala', 4]['fwdbwd_ms'])
    registered = set(zoo.list_zoo_models())
    want_models = [m for m in MODELS if m in registered] + [ANCHOR]
    assert [m['model'] for m in result['models']] == want_models and len(want_models) == 5
    for m in result['models']:
        assert m['train_ms'] > 0 and m['fwd_ms'] > 0 and m['train_peak_mib'] > 0 and m['params_m'] > 0
    assert result['models'][-1]['train_vs_anchor'] == 1.0
    table = (tmp_path / 'linear.md').read_text()
    assert '| linear/flatten | 8^2 |' in table and '| global | 8^2 | skipped' in table
    assert '| mala_tiny |' in table and '| swin_tiny |' in table and '(reduced widths)' in table
    assert '| linear/flatten | 4^2..8^2 |' in table and '| global | 4^2..8^2 |' not in table  # global: one size
    assert (tmp_path / 'linear.png').read_bytes()[:8] == PNG_MAGIC
    assert 'wrote' in capsys.readouterr().out


def test_growth_is_the_geometric_mean_of_the_steps():
    from zoo.bench.linear import growth
    rows = [dict(mixer='m', size=s, fwd_ms=t, fwdbwd_ms=2 * t) for s, t in ((28, 1.), (56, 3.), (112, 16.))]
    rows.append(dict(mixer='g', size=28, fwd_ms=1., fwdbwd_ms=1.))
    g = growth(rows)
    assert set(g) == {'m'} and g['m']['range'] == '28^2..112^2'
    assert g['m']['fwd'] == pytest.approx(4.0) and g['m']['fwdbwd'] == pytest.approx(4.0)  # sqrt(16 / 1)


def test_zoo_bench_linear_subcommand_and_bad_arguments(tmp_path, capsys):
    from zoo.bench.run import main as run_main
    assert run_main(['linear', '--parts', 'mixers', '--sizes', '4', '--repeats', '1', '--variants', 'inline',
                     '--no-plot', '--out', str(tmp_path)]) == 0
    result = json.loads((tmp_path / 'linear.json').read_text())
    assert result['meta']['command'].startswith('python -m zoo.bench.run linear')
    assert [r['mixer'] for r in result['mixers']] == ['linear/inline', 'window', 'global']
    assert not (tmp_path / 'linear.png').exists() and 'models' not in result
    with pytest.raises(SystemExit):
        main(['--variants', 'performer', '--out', str(tmp_path)])
    assert "--variants: unknown ['performer']; registered variants:" in capsys.readouterr().err


def test_gpu_benchmark_needs_cuda(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert gpu_main(['--out', str(tmp_path / 'x')]) == 2
    assert 'torch sees no CUDA device' in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.triton
@pytest.mark.skipif(not (triton_available() and interpreter_on()), reason='needs TRITON_INTERPRET=1')
def test_gpu_benchmark_script_on_cpu(tmp_path):
    out = tmp_path / 'linear_gpu'
    assert gpu_main(['--cpu', '--img-size', '8', '--batch', '1', '--repeats', '1', '--warmup', '0', '--dtype', 'fp32',
                     '--normalizers', 'mala', '--out', str(out)]) == 0
    rows = json.loads(out.with_suffix('.json').read_text())['rows']
    assert [(r['model'], r['stage'], r['backend']) for r in rows] == [
        (m, s, b) for m in ('swin-family', 'mala') for s in (1, 2) for b in ('triton', 'torch')]
    for r in rows:
        assert r['fwd_ms'] > 0 and r['fwd_bwd_ms'] > 0 and r['max_abs_err_vs_fp32'] <= 1e-5 * max(1, r['out_scale'])
    assert '| mala | 1 | 2x2 | 1 x 64 | mala | triton |' in out.with_suffix('.md').read_text()
