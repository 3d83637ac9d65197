"""`python -m zoo.bench.agent` at tiny sizes: every part runs, the outputs hold what the README table reads, and the
analysis accounts the agent core inside the model's totals."""
import json

from zoo.bench.agent import main

TINY = ['--batch', '2', '--img-size', '64', '--sizes', '8', '14', '--repeats', '1', '--agents', '9',
        '--model-kwargs', '{"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8]}']


def test_every_part_at_tiny_sizes(tmp_path, capsys):
    assert main(TINY + ['--global-max-tokens', '100', '--out', str(tmp_path)]) == 0
    result = json.loads((tmp_path / 'agent.json').read_text())
    assert [r['model'] for r in result['models']] == ['agent_swin_tiny', 'swin_tiny']
    for r in result['models']:
        assert r['fwd_ms'] > 0 and r['train_ms'] > 0 and r['fwd_peak_mib'] > 0 and r['train_peak_mib'] > 0
    rows = {(r['mixer'], r['size']): r for r in result['mixers']}
    assert set(rows) == {(m, s) for m in ('agent', 'window', 'global') for s in (8, 14)}
    assert rows['global', 14].get('skipped') and not rows['global', 8].get('skipped')  # 196 > 100 tokens
    assert all(r['fwdbwd_peak_mib'] > 0 for r in rows.values() if not r.get('skipped'))
    for path in ('explicit', 'fused'):
        a = result['analysis'][path]
        assert 0 < a['core_flops_g'] < a['flops_g'] and 0 < a['core_written_mib'] < a['written_mib']
        assert 0 < a['core_ms'] < a['fwd_ms']
    kinds = result['analysis']['explicit']['core_written_kinds_mib']
    assert abs(sum(kinds.values()) - result['analysis']['explicit']['core_written_mib']) < 1e-6
    assert kinds['scores'] > 0 and kinds['bias'] > 0
    table = (tmp_path / 'agent.md').read_text()
    assert '| agent_swin_tiny |' in table and '| agent | 8^2 |' in table and '| global | 14^2 | skipped' in table
    assert 'wrote' in capsys.readouterr().out


def test_zoo_bench_agent_subcommand(tmp_path):
    from zoo.bench.run import main as run_main
    assert run_main(['agent', '--parts', 'mixers', '--sizes', '8', '--repeats', '1', '--out', str(tmp_path)]) == 0
    meta = json.loads((tmp_path / 'agent.json').read_text())['meta']
    assert meta['command'].startswith('python -m zoo.bench.run agent')
