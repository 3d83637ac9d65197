"""`zoo bench mixers` (bench/mixers.py): every registered mixer measured, exact allocator accounting, outputs."""
import json

import pytest
import torch
import torch.nn as nn

import zoo.blocks
from zoo.blocks import _registry
from zoo.bench.mixers import main, peak_allocated
from zoo.bench.run import main as run_main

MIB = 2 ** 20
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
TINY = ['--sizes', '8', '4', '--repeats', '1', '--warmup', '0', '--min-time', '0.001']


def test_peak_allocated_is_exact():
    kept = []

    def fn():
        a = torch.empty(1000)       # 4000 B
        b = torch.empty(2000)       # 8000 B, both alive: 12000 B
        del a
        c = torch.empty(500)        # 2000 B -> 10000 B
        kept.append(torch.empty(250, dtype=torch.float64))  # 2000 B kept after the call
        return b, c                 # dropped inside the measured region

    peak, net = peak_allocated(fn)
    assert (peak, net) == (12000, 2000)
    assert peak_allocated(lambda: None) == (0, 0)


def _params_bytes(name):
    module = zoo.blocks.create_mixer(name, 96, num_heads=3)
    return sum(p.numel() * p.element_size() for p in module.parameters())


def test_every_mixer_measured(tmp_path, capsys):
    out = tmp_path / 'out'
    assert main(TINY + ['--out', str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ['mixers.json', 'mixers.md', 'mixers.png']
    result = json.loads((out / 'mixers.json').read_text())
    meta = result['meta']
    assert (meta['sizes'], meta['dim'], meta['num_heads'], meta['threads'], meta['repeats']) == ([4, 8], 96, 3, 1, 1)
    assert 'torch.profiler' in meta['memory'] and meta['torch'] == torch.__version__
    names = zoo.blocks.list_mixers()
    assert names and [m['name'] for m in result['mixers']] == names
    table = (out / 'mixers.md').read_text()
    assert table in printed
    for m in result['mixers']:
        info = zoo.blocks.mixer_info(m['name'])
        assert (m['paper'], m['cost'], m['triton'], m['arguments']) == (info.paper, info.cost, info.triton,
                                                                          info.arguments)
        assert [(r['size'], r['tokens']) for r in m['results']] == [(4, 16), (8, 64)]
        params = _params_bytes(m['name'])
        for r in m['results']:
            assert 'error' not in r, r
            assert len(r['fwd_runs_ms']) == len(r['fwdbwd_runs_ms']) == 1
            assert r['fwd_ms'] > 0 and r['fwdbwd_ms'] > 0 and r['fwd_iters'] >= 1
            x_bytes = r['tokens'] * 96 * 4
            # the output stays alive to the end of the forward; the input's and every parameter's
            # gradients to the end of forward + backward
            assert r['fwd_peak_mib'] * MIB >= x_bytes
            assert r['fwdbwd_peak_mib'] * MIB >= x_bytes + params
            assert r['cached_mib'] >= 0
            row = f"| {m['name']} | {m['cost']} | {r['size']}x{r['size']} = {r['tokens']} |"
            assert sum(line.startswith(row) for line in table.splitlines()) == 1
    # the attention maps of the 8x8 pass are larger than those of 4x4
    for m in result['mixers']:
        small, big = m['results']
        assert big['fwdbwd_peak_mib'] > small['fwdbwd_peak_mib']
    assert (out / 'mixers.png').read_bytes()[:8] == PNG_MAGIC
    import matplotlib.image
    height, width = matplotlib.image.imread(str(out / 'mixers.png')).shape[:2]
    assert width > 3 * 300 and height > 300  # three panels


class _Mix(nn.Module):
    def __init__(self, dim, fail_below=0, **kwargs):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.fail_below = fail_below

    def forward(self, x):
        if x.shape[1] < self.fail_below:
            raise ValueError(f'map {x.shape[1]} smaller than {self.fail_below}')
        return self.proj(x)


def test_mixers_registered_later_join_and_failures_are_reported(tmp_path, monkeypatch, capsys):
    # registered in this process only, so memory (measured in fresh processes) is skipped
    monkeypatch.setattr(_registry, '_MIXERS', dict(_registry._MIXERS))
    zoo.blocks.register_mixer('bench_test_linear', paper='test', cost='O(N)')(_Mix)
    zoo.blocks.register_mixer('bench_test_picky', paper='test', cost='O(N)')(
        lambda dim, **kw: _Mix(dim, fail_below=6))
    out = tmp_path / 'o'
    assert main(TINY + ['--no-memory', '--no-plot', '--out', str(out)]) == 1
    assert "bench_test_picky at 4x4: ValueError: map 4 smaller than 6" in capsys.readouterr().err
    result = json.loads((out / 'mixers.json').read_text())
    rows = {m['name']: m['results'] for m in result['mixers']}
    assert list(rows) == zoo.blocks.list_mixers() and {'bench_test_linear', 'bench_test_picky'} <= set(rows)
    assert all(r['fwd_ms'] > 0 and 'fwd_peak_mib' not in r for r in rows['bench_test_linear'])
    assert 'error' in rows['bench_test_picky'][0] and rows['bench_test_picky'][1]['fwdbwd_ms'] > 0
    assert result['meta']['memory'] is None and not (out / 'mixers.png').exists()


def test_argument_errors(capsys):
    for argv, msg in ((['--mixers', 'windwo'], "unknown mixer 'windwo'; did you mean window?"),
                      (['--mixers', 'cbam'], "'cbam' (a gate for conv stages, not a token mixer)"),
                      (['--sizes', '0'], '--sizes: expected integers >= 1, got 0'),
                      (['--num-heads', '5'], '--num-heads: expected a divisor of --dim 96, got 5')):
        with pytest.raises(SystemExit) as exc:
            run_main(['mixers'] + argv)  # reached through `zoo bench mixers`
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert msg in err and 'zoo.bench.run mixers: error:' in err
