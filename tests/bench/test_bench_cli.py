"""Suites and `zoo bench`: every built-in suite loads, bad input is one clear line with exit code 2 and nothing
written, the GPU group exits with one line without CUDA, the README's bench commands name real suites."""
import json
import os
import re

import pytest
import torch

from zoo.bench.cli import _suites, build_parser, main
from zoo.bench.suite import SuiteError, build_suite, find_suite, list_suites, load_suite
from zoo.cli import main as zoo_main

README = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'README.md')
TINY = ['--sizes', '4', '--repeats', '1', '--warmup', '0', '--min-time', '0', '--no-memory', '--no-plot']


def test_every_builtin_suite_loads():
    suites = list_suites()
    assert {g for g, _, _ in suites} == {'models', 'mixers', 'ops', 'gpu'}
    from zoo.bench.subjects import known_names
    for group, name, title in suites:
        suite = load_suite(find_suite(group, name), group)
        assert name not in known_names(suite.kind), f'suite {name!r} shadows the {suite.kind[:-1]} of that name'
        assert title and suite.stem == f'{group}_{name}' and suite.shapes()
        assert any(e.anchor for e in suite.entries if not e.is_anchor) or name == 'default' and group == 'mixers'
        assert (suite.params['device'] == 'cuda') == (group == 'gpu')
    models = load_suite(find_suite('models', 'default'), 'models')
    assert models.params['precisions'] == ['fp32', 'bf16']
    assert {(e.label, tuple(e.anchor)) for e in models.entries if not e.is_anchor} == {
        ('swin_tiny', ('swin_tiny_patch4_window7_224',)), ('maxvit_tiny', ('maxvit_tiny_tf_224',)),
        ('cbam_resnet50', ('resnet50',))}
    import zoo.blocks
    mixers = load_suite(find_suite('mixers', 'default'), 'mixers')
    assert sorted(e.name for e in mixers.entries) == zoo.blocks.list_mixers()  # every registered mixer


@pytest.mark.parametrize('data, message', [
    (dict(kind='mixers', sizez=[4], subjects=[dict(name='window')]), "unknown key 'sizez'; did you mean sizes?"),
    (dict(kind='mixers', subjects=[dict(name='window', kwarg={})]), "subjects[0]: unknown key 'kwarg'"),
    (dict(kind='mixers', subjects=[dict(name='windwo')]), "unknown mixer 'windwo'; did you mean window?"),
    (dict(kind='models', subjects=[dict(name='swin_tiny', anchor='swin_tiny_patch4')]),
     "anchor 'swin_tiny_patch4' is not another entry of the suite"),
    (dict(kind='models', subjects=[dict(name='swin_tiniest')]), "unknown model 'swin_tiniest'; did you mean swin_tiny"),
    (dict(kind='ops', subjects=[dict(name='neighborhood_attention', kwargs=dict(kernel=7))]),
     "unknown op argument 'kernel'"),
    (dict(kind='ops', subjects=[dict(name='natten2d')]), "unknown op 'natten2d'; did you mean natten"),
    (dict(kind='mixers', threads=0, subjects=[dict(name='window')]), 'threads: expected an integer >= 1, got 0'),
    (dict(kind='mixers', modes=['backward'], subjects=[dict(name='window')]), "modes: expected a non-empty list"),
    (dict(kind='mixers', subjects=[]), 'expected at least one subject'),
    (dict(kind='mixers', subjects=[dict(name='window', weights_from='volo_d1_224')]),
     "weights_from: expected a timm model name (models only), got 'volo_d1_224'"),
])
def test_suite_validation(data, message):
    with pytest.raises(SuiteError) as e:
        build_suite(data, 'x', data['kind'], 'x.toml')
    assert message in str(e.value) and str(e.value).startswith('x.toml: ')


def test_weights_from_gives_the_anchor_weights():
    """A models entry with weights_from runs on the anchor's own weights (seed 0) through its family's key map."""
    from zoo.bench.subjects import Entry, ModelSubject
    ours = ModelSubject(Entry('zoo_volo_d1', weights_from='volo_d1_224'), 'cpu')
    anchor = ModelSubject(Entry('volo_d1_224', is_anchor=True), 'cpu')
    shape = dict(batch=2, size=224)
    with torch.no_grad():
        got, want = ours.calls(shape, 'fp32')['fwd'](), anchor.calls(shape, 'fp32')['fwd']()
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def _bad(argv, capsys, tmp_path):
    code = zoo_main(['bench'] + argv)
    err = capsys.readouterr().err
    return code, err.strip().splitlines()


@pytest.mark.parametrize('argv, message', [
    (['mixers', 'windwo'], "unknown mixer 'windwo'; did you mean window?"),
    (['models', 'swin_tiny=swin_tiny_patch4'], "unknown model 'swin_tiny_patch4'; did you mean "),
    (['mixers', 'window', '--threads', '0'], '--threads: expected an integer >= 1, got 0'),
    (['mixers', 'window', '--repeats', '0'], '--repeats: expected an integer >= 1, got 0'),
    (['mixers', 'window', '--out', 'missing/folder/out'], 'does not exist (create it first)'),
    (['mixers', 'SUITE'], "unknown key 'sizez'"),
    (['mixers', 'no_such_suite.toml'], "no such suite file: 'no_such_suite.toml'"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'suite.toml').write_text('kind = "mixers"\nsizez = [4]\n[[subjects]]\nname = "window"\n')
    argv = [str(tmp_path / 'suite.toml') if a == 'SUITE' else a for a in argv]
    code, lines = _bad(argv[:2] + TINY + argv[2:], capsys, tmp_path)  # the bad option last: it wins
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith('zoo bench: error: ') and message in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ['suite.toml']  # no work_dirs, no output


def test_gpu_group_without_cuda_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    code, lines = _bad(['gpu'], capsys, tmp_path)
    assert code == 2 and len(lines) == 1 and 'no CUDA device' in lines[0] and 'nothing was measured' in lines[0]
    assert not list(tmp_path.iterdir())


@pytest.mark.triton
def test_gpu_suite_runs_on_cpu_through_the_interpreter(tmp_path, capsys):
    """`--device cpu` with TRITON_INTERPRET=1 (tests/conftest.py): the Triton path against the reference and SDPA."""
    from zoo.kernels.backend import interpreter_on, triton_available
    if not (triton_available() and interpreter_on()):
        pytest.skip('needs triton and TRITON_INTERPRET=1')
    assert main(['gpu', 'window', '--device', 'cpu', '--sizes', '7', '--batch', '1', '--precision', 'fp32',
                 '--repeats', '1', '--warmup', '0', '--min-time', '0', '--no-plot', '--out', str(tmp_path)]) == 0
    result = json.loads((tmp_path / 'gpu_window.json').read_text())
    assert {(q['subject'], q['anchor']) for q in result['ratios']} == {('triton', 'reference'),
                                                                      ('triton', 'sdpa_window')}
    for q in result['ratios']:
        if q['mode'] == 'fwd':
            assert q['max_abs_diff'] < 1e-5
    assert '| triton | sdpa_window |' in capsys.readouterr().out


def test_list(capsys):
    assert main(['--list']) == 0
    out = capsys.readouterr().out
    for group, name, title in list_suites():
        assert re.search(rf'^{group} {name} +{re.escape(title)}$', out, re.M)


def test_names_and_overrides_make_an_adhoc_suite(tmp_path, capsys):
    assert main(['mixers', 'window=global', '--modes', 'fwd', '--threads', '1'] + TINY + ['--out', str(tmp_path)]) == 0
    result = json.loads((tmp_path / 'mixers_custom.json').read_text())
    assert [(r['subject'], r['mode'], r['size']) for r in result['rows']] == [('window', 'fwd', 4), ('global', 'fwd', 4)]
    (q,) = result['ratios']
    assert q['time'] == pytest.approx(result['rows'][0]['ms'] / result['rows'][1]['ms'])
    assert result['meta']['threads'] == 1 and result['meta']['command'].startswith('zoo bench mixers window=global')
    assert 'wrote ' in capsys.readouterr().out


def _readme_bench_commands():
    with open(README, encoding='utf-8') as f:
        text = f.read()
    return sorted(set(re.findall(r'`(zoo bench (?:models|mixers|ops|gpu|--list)[^`]*)`', text)))


def test_readme_bench_commands_name_real_suites():
    commands = _readme_bench_commands()
    assert len(commands) >= 6
    groups = set()
    for command in commands:
        args = build_parser().parse_args(command.split()[2:])
        if args.list:
            continue
        groups.add(args.group)
        assert _suites(args), command  # resolves: built-in suites or registry names, options valid
    assert groups == {'models', 'mixers', 'ops', 'gpu'}
    listed = {f'zoo bench {g} {n}' for g, n, _ in list_suites()}
    for name in listed:  # every built-in suite has its command in the README
        assert any(c.startswith(name) for c in commands), name


def test_readme_suite_examples_load(tmp_path):
    with open(README, encoding='utf-8') as f:
        blocks = re.findall(r'^```toml[ \t]*\n(.*?)^```', f.read(), re.S | re.M)
    assert blocks
    for i, block in enumerate(blocks):
        path = tmp_path / f'example{i}.toml'
        path.write_text(block)
        kind = re.search(r'^kind = "(\w+)"', block, re.M).group(1)
        suite = load_suite(str(path), kind)
        assert any(e.anchor for e in suite.entries)
