"""The measurement engine on tiny subjects: what it measures, the ratios and growth it derives from the same run,
the JSON / markdown / PNG it writes, and the one memory subprocess."""
import json

import pytest
import timm
import torch

import zoo.blocks
from zoo.bench.engine import plan, run, schedule
from zoo.bench.flops import count_flops, count_params
from zoo.bench.measure import MIB, peak_allocated
from zoo.bench.report import markdown, write_results
from zoo.bench.suite import build_suite

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
ROW_KEYS = {'subject', 'anchor', 'mode', 'precision', 'size', 'tokens', 'shape', 'ms', 'cpu_ms', 'runs_ms',
            'cpu_runs_ms', 'iters', 'flops', 'params', 'peak_rss_mib', 'peak_alloc_mib', 'cached_mib',
            'memory_method'}
META_KEYS = {'suite', 'title', 'kind', 'command', 'date', 'device', 'threads', 'repeats', 'modes', 'precisions',
             'torch', 'timm', 'cpu', 'timing', 'memory', 'flops', 'ratios'}


def _suite(data, name='tiny', group=None):
    base = dict(repeats=1, warmup=0, memory=False, threads=1)
    return build_suite({**base, **data}, name, group or data['kind'], 'test suite')


def _quiet(msg):
    pass


MIXERS = dict(kind='mixers', sizes=[4, 8], modes=['fwd', 'fwdbwd'], dim=16, num_heads=2,
              subjects=[dict(name='window', kwargs=dict(window_size=2), anchor='global')],
              anchors=[dict(name='global')])


def test_plan_and_schedule_are_explicit_lists():
    suite = _suite(dict(MIXERS, repeats=3, anchors=[dict(name='global', max_tokens=20)]))
    items = plan(suite)
    assert [(i.entry.label, i.mode, i.shape['size']) for i in items] == [
        (label, mode, size) for size in (4, 8) for label in ('window', 'global') for mode in ('fwd', 'fwdbwd')]
    assert [i.skipped is not None for i in items] == [False] * 6 + [True] * 2  # 64 tokens > max_tokens 20
    steps = schedule(items, 3)
    assert len(steps) == 3 * 4 + 3 * 2  # skipped items take no samples
    first = [s.item.key for s in steps[:4]]
    assert [s.item.key for s in steps[4:8]] == first[1:] + first[:1]  # the order rotates per repeat
    assert steps[0].desc == 'window fwd fp32 4x4 (1/3)'


def test_mixer_suite_rows_ratios_growth_and_files(tmp_path, capsys):
    suite = _suite(MIXERS)
    result = run(suite, command='test', log=_quiet)
    # progress (stderr is not a terminal here): plain lines naming the suite, the start and the end
    progress_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith(f'bench {suite.stem}:')]
    assert len(progress_lines) >= 2 and '100%' in progress_lines[-1] and '\r' not in ''.join(progress_lines)
    assert META_KEYS <= set(result['meta']) and result['meta']['command'] == 'test'
    rows = {(r['subject'], r['mode'], r['size']): r for r in result['rows']}
    assert set(rows) == {(s, m, z) for s in ('window', 'global') for m in ('fwd', 'fwdbwd') for z in (4, 8)}
    for (name, mode, size), r in rows.items():
        assert ROW_KEYS <= set(r) and r['tokens'] == size * size and r['precision'] == 'fp32'
        assert r['ms'] > 0 and r['cpu_ms'] >= 0 and len(r['runs_ms']) == 1 and r['iters'] == 1
        module = zoo.blocks.create_mixer(name, 16, num_heads=2, **({'window_size': 2} if name == 'window' else {}))
        assert r['params'] == count_params(module)
        assert r['flops'] == count_flops(module, torch.randn(1, size, size, 16)) > 0
        assert r['peak_alloc_mib'] is None  # memory off
    # every ratio is ours / anchor of the rows of the same run
    assert len(result['ratios']) == 4
    for q in result['ratios']:
        ours, anchor = rows['window', q['mode'], q['size']], rows['global', q['mode'], q['size']]
        assert q['anchor'] == 'global'
        assert q['time'] == pytest.approx(ours['ms'] / anchor['ms'])
        assert q['cpu_time'] == pytest.approx(ours['cpu_ms'] / anchor['cpu_ms'])
        assert q['flops'] == pytest.approx(ours['flops'] / anchor['flops'])
        assert q['params'] == pytest.approx(ours['params'] / anchor['params'])
    # growth per 4x tokens: 4x4 -> 8x8 is exactly 4x the tokens, so the factor is the time ratio itself
    growth = {(g['subject'], g['mode']): g for g in result['growth']}
    assert set(growth) == {(s, m) for s in ('window', 'global') for m in ('fwd', 'fwdbwd')}
    g = growth['global', 'fwdbwd']
    assert g['sizes'] == [4, 8] and g['time'] == pytest.approx(rows['global', 'fwdbwd', 8]['ms'] /
                                                                rows['global', 'fwdbwd', 4]['ms'])
    assert g['steps'] == [pytest.approx(g['time'])]
    written = write_results(result, str(tmp_path), suite.stem)
    assert [p.rsplit('/', 1)[1] for p in written] == ['mixers_tiny.json', 'mixers_tiny.md', 'mixers_tiny.png']
    assert json.loads((tmp_path / 'mixers_tiny.json').read_text()) == json.loads(json.dumps(result))
    table = (tmp_path / 'mixers_tiny.md').read_text()
    assert table == markdown(result)
    assert '| window | 4x4 | fwd |' in table and '| global | 8x8 | fwdbwd |' in table
    q = next(q for q in result['ratios'] if q['mode'] == 'fwd' and q['size'] == 8)
    assert f"| window | global | 8x8 | fwd | {_fmt(q['time'])} |" in table
    assert '| window | fwdbwd | fp32 | 4^2..8^2 |' in table
    assert (tmp_path / 'mixers_tiny.png').read_bytes()[:8] == PNG_MAGIC


def _fmt(v):
    from zoo.bench.report import fmt
    return fmt(v)


def test_growth_uses_the_token_ratio():
    from zoo.bench.engine import growth_per_4x
    rows = [dict(subject='m', mode='fwd', precision='fp32', shape={}, size=s, tokens=s * s, ms=t,
                 peak_alloc_mib=t) for s, t in ((28, 1.), (56, 3.), (112, 16.))]
    (g,) = growth_per_4x(rows)
    assert g['time'] == pytest.approx(4.0) and g['peak_alloc'] == pytest.approx(4.0)  # sqrt(16 / 1) per 4x
    assert g['steps'] == [pytest.approx(3.0), pytest.approx(16 / 3)]
    rows = [dict(r, size=s, tokens=n) for r, s, n in zip(rows[:2], (4, 16), (16, 256))]  # 16x the tokens
    assert growth_per_4x(rows)[0]['time'] == pytest.approx(3 ** 0.5)


def test_model_suite_fp32_and_bf16_with_training_step(tmp_path):
    suite = _suite(dict(kind='models', sizes=[32], batch=2, modes=['fwd', 'fwdbwd'], precisions=['fp32', 'bf16'],
                        subjects=[dict(name='test_convnext', anchor='test_resnet')],
                        anchors=[dict(name='test_resnet')]))
    result = run(suite, log=_quiet)
    rows = {(r['subject'], r['mode'], r['precision']): r for r in result['rows']}
    assert len(rows) == 8 and all('ms' in r for r in rows.values())
    for (name, mode, prec), r in rows.items():
        model = timm.create_model(name)
        assert r['params'] == count_params(model) and r['tokens'] is None and r['shape']['batch'] == 2
        assert r['flops'] == count_flops(model, torch.randn(2, 3, 32, 32))
        assert r['img_s'] == pytest.approx(2000 / r['ms'])
    assert {(q['mode'], q['precision']) for q in result['ratios']} == {
        (m, p) for m in ('fwd', 'fwdbwd') for p in ('fp32', 'bf16')}
    for q in result['ratios']:
        a, b = rows['test_convnext', q['mode'], q['precision']], rows['test_resnet', q['mode'], q['precision']]
        assert q['time'] == pytest.approx(a['ms'] / b['ms'])
    assert result['growth'] == []  # one size: no sweep
    table = markdown(result)
    header = next(line for line in table.splitlines() if line.startswith('| subject |'))
    assert 'GMACs / img' in header and 'fp32 img/s' in header and 'bf16 img/s' in header
    assert header.index('fp32 ms') < header.index('bf16 ms')
    lines = [line for line in table.splitlines() if line.startswith('| test_')]
    assert lines[0].startswith('| test_convnext | 32 px, batch 2 | fwd |')  # ours, then its anchor beside it
    assert lines[2].startswith('| test_resnet | 32 px, batch 2 | fwd |')


def test_model_patch_runs_the_gather_baseline(monkeypatch):
    import zoo.bench.anchors as anchors
    import zoo.blocks.routing as mixer
    from zoo.bench.subjects import build_subject
    from zoo.kernels.routing import routed_attention
    suite = _suite(dict(kind='models', sizes=[64], batch=1, subjects=[
        dict(name='biformer_tiny', reduced=True, anchor='gather')], anchors=[
        dict(name='biformer_tiny', label='gather', reduced=True, patch='gather_baseline')]))
    calls = []
    real = anchors.routed_attention_gather
    monkeypatch.setattr(anchors, 'routed_attention_gather', lambda *a, **k: calls.append(1) or real(*a, **k))
    ours, base = (build_subject('models', e, 'cpu', suite.params).calls(suite.shapes()[0], 'fp32')['fwd']
                  for e in suite.entries)
    want = base()
    n = len(calls)
    assert n > 0 and mixer.routed_attention is routed_attention  # the baseline ran, inside its calls only
    torch.testing.assert_close(ours(), want, rtol=1e-4, atol=1e-5)  # the same model and weights
    assert len(calls) == n


def test_ops_suite_against_dense_and_skips(tmp_path):
    pytest.importorskip('natten')
    suite = _suite(dict(kind='ops', sizes=[8, 16], heads=1, head_dim=8, modes=['fwd', 'fwdbwd'], subjects=[
        dict(name='neighborhood_attention', label='ours', kwargs=dict(kernel_size=3, backend='torch'),
             anchor=['dense', 'natten'])], anchors=[
        dict(name='neighborhood_attention', label='dense', kwargs=dict(kernel_size=3, impl='dense'),
             max_tokens=64),
        dict(name='natten', kwargs=dict(kernel_size=3))]))
    result = run(suite, log=_quiet)
    rows = {(r['subject'], r['mode'], r['size']): r for r in result['rows']}
    assert ('natten', 'fwdbwd', 8) not in rows  # no CPU backward in natten: forward only
    assert rows['dense', 'fwd', 16]['skipped'] and 'ms' not in rows['dense', 'fwd', 16]
    assert rows['ours', 'fwd', 8]['max_abs_diff_vs_anchor']['dense'] < 1e-5  # same function, with RPB
    ratios = {(q['anchor'], q['mode'], q['size']) for q in result['ratios']}
    assert ratios == {('dense', 'fwd', 8), ('dense', 'fwdbwd', 8), ('natten', 'fwd', 8), ('natten', 'fwd', 16)}
    assert '| dense | 16x16 | fwd | - | - | skipped |' in markdown(result)


class _Picky(torch.nn.Module):
    """A mixer that fails on maps smaller than 6 x 6."""

    def __init__(self, dim, **kwargs):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        if x.shape[1] < 6:
            raise ValueError(f'map {x.shape[1]} smaller than 6')
        return self.proj(x)


def test_errors_are_rows_not_crashes(monkeypatch):
    from zoo.blocks import _registry
    monkeypatch.setattr(_registry, '_MIXERS', dict(_registry._MIXERS))
    zoo.blocks.register_mixer('bench_test_picky', paper='test', cost='O(N)')(_Picky)
    suite = _suite(dict(kind='mixers', sizes=[4, 8], dim=16, num_heads=2, subjects=[dict(name='bench_test_picky')]))
    rows = {r['size']: r for r in run(suite, log=_quiet)['rows']}
    assert rows[4]['error'] == 'ValueError: map 4 smaller than 6' and 'ms' not in rows[4]
    assert rows[8]['ms'] > 0 and 'error' not in rows[8]
    table = markdown(run(suite, log=_quiet))
    assert '| bench_test_picky | 4x4 | fwd | - | - | error |' in table
    assert '- bench_test_picky fwd fp32 4x4: ValueError: map 4 smaller than 6' in table


def test_peak_allocated_is_exact():
    kept = []

    def fn():
        a = torch.empty(1000)       # 4000 B
        b = torch.empty(2000)       # 8000 B, both alive: 12000 B
        del a
        c = torch.empty(500)        # 2000 B -> 10000 B
        kept.append(torch.empty(250, dtype=torch.float64))  # 2000 B kept after the call
        return b, c                 # dropped inside the measured region

    assert peak_allocated(fn) == (12000, 2000)
    assert peak_allocated(lambda: None) == (0, 0)


def test_memory_in_clean_processes():
    """The one test of the memory subprocess: allocator peak and RSS rise of every item, from forked children."""
    suite = _suite(dict(kind='mixers', sizes=[8, 16], modes=['fwd', 'fwdbwd'], dim=16, num_heads=2, memory=True,
                        subjects=[dict(name='window', kwargs=dict(window_size=4))]))
    result = run(suite, log=_quiet)
    rows = {(r['mode'], r['size']): r for r in result['rows']}
    params = rows['fwd', 8]['params'] * 4
    for (mode, size), r in rows.items():
        x_bytes = size * size * 16 * 4
        assert r['memory_method'] == 'VmHWM-VmRSS' and r['peak_rss_mib'] >= 0 and r['cached_mib'] >= 0
        # the output stays alive to the end of the forward; the input's and every parameter's gradients to
        # the end of forward + backward
        assert r['peak_alloc_mib'] * MIB >= x_bytes + (params if mode == 'fwdbwd' else 0)
    assert rows['fwdbwd', 16]['peak_alloc_mib'] > rows['fwdbwd', 8]['peak_alloc_mib']
    assert 'clean child process' in result['meta']['memory']
