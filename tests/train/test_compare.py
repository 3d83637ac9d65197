"""`zoo compare` end to end on tiny runs (reduced hybrid_tiny, 32 px, one epoch, a few photo crops): two plans x two
seeds in two shards merged by --report, wandb offline in one group, resume, every bad input; the mixer plan written
as a string in the model and in --opts."""
import csv
import glob
import json
import os
import shutil
import statistics

import pytest
import timm
import torch

import zoo
from zoo.bench.flops import count_macs
from zoo.cli import main
from zoo.train import compare as cmp
from zoo.train.data import make_photo_folder
from zoo.train.runner import load_config, parse_opts

PLANS = ('window', 'cbam/window/neighborhood/grid')
TINY = ['--epochs', '1', '--img-size', '32', '--batch-size', '8']


def _compare(*args):
    return main(['compare', *args])


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp('photos')
    make_photo_folder(str(root), n_train=8, n_val=4)
    return str(root)


@pytest.fixture(scope='module')
def sharded(photos, tmp_path_factory):
    """Two plans x seeds 0 and 1 in shards 1/2 and 2/2 (wandb offline), then --report; the files after each step."""
    out = str(tmp_path_factory.mktemp('compare') / 'out')
    mp = pytest.MonkeyPatch()
    for var, sub in (('WANDB_MODE', None), ('WANDB_DIR', ''), ('WANDB_CACHE_DIR', 'cache'), ('WANDB_CONFIG_DIR', 'cfg')):
        mp.setenv(var, 'offline' if sub is None else os.path.join(os.path.dirname(out), sub))
    args = ['--mixers', *PLANS, '--data', photos, '--seeds', '0', '1', '--out', out, '--wandb', 'zoo-test', *TINY]
    steps = {}
    try:
        for shard in ('1/2', '2/2'):
            assert _compare(*args, '--shard', shard) == 0
            steps[shard] = sorted(os.path.basename(os.path.dirname(p))
                                  for p in glob.glob(os.path.join(out, 'runs', '*', 'result.json')))
            steps[shard + ' report'] = os.path.exists(os.path.join(out, 'report.md'))
        assert _compare('--report', out) == 0
    finally:
        mp.undo()
    return dict(out=out, args=args, steps=steps, photos=photos)


def _names():
    return sorted(f'{cmp.plan_slug(p)}__seed{s}' for p in PLANS for s in (0, 1))


def test_shards_split_the_runs_and_report_merges_them(sharded):
    names = [f'{cmp.plan_slug(p)}__seed{s}' for p in PLANS for s in (0, 1)]  # the run order of the compare
    assert sharded['steps']['1/2'] == sorted(names[0::2])
    assert sharded['steps']['2/2'] == sorted(names)
    assert not sharded['steps']['1/2 report'] and not sharded['steps']['2/2 report']  # shards write no report
    for name in cmp.REPORT_FILES:
        assert os.path.getsize(os.path.join(sharded['out'], name)) > 0, name


def test_report_tables_agree_with_the_runs(sharded):
    out = sharded['out']
    with open(os.path.join(out, 'report.json')) as f:
        report = json.load(f)
    results = {}
    for path in glob.glob(os.path.join(out, 'runs', '*', 'result.json')):
        with open(path) as f:
            r = json.load(f)
        results[r['name']] = r
    assert sorted(results) == _names()
    assert [r['plan'] for r in report['rows']] == sorted(PLANS, key=cmp.plan_slug)
    for row in report['rows']:
        mine = [results[f'{cmp.plan_slug(row["plan"])}__seed{s}'] for s in (0, 1)]
        top1 = [r['top1'] for r in mine]
        assert all(0.0 <= t <= 100.0 for t in top1)
        assert row['top1'] == top1 and row['seeds'] == [0, 1]
        assert row['top1_mean'] == pytest.approx(statistics.fmean(top1))
        assert row['top1_std'] == pytest.approx(statistics.stdev(top1))
        # the cost is the harness's measurement of the model the runs trained
        model = timm.create_model('hybrid_tiny', num_classes=2, mixers=mine[0]['mixers'], img_size=32,
                                  **zoo.reduced_args('hybrid_tiny'))
        assert row['params'] == sum(p.numel() for p in model.parameters())
        assert row['gmacs'] == pytest.approx(count_macs(model, torch.randn(1, 3, 32, 32)) / 1e9, rel=1e-6)
        for key in ('gmacs', 'infer_img_s', 'train_step_ms', 'train_peak_mib'):
            assert row[key] > 0, key
        assert all(len(r['history']) == 1 and r['history'][0]['accuracy/top1'] == r['top1'] for r in mine)
    # the attention-only plan has no CBAM conv stage: different parameter counts, reported side by side
    assert report['rows'][0]['params'] != report['rows'][1]['params']
    with open(os.path.join(out, 'report.csv')) as f:
        rows = list(csv.DictReader(f))
    assert [r['plan'] for r in rows] == [r['plan'] for r in report['rows']]
    for r, j in zip(rows, report['rows']):
        assert float(r['top1_mean']) == pytest.approx(j['top1_mean'])
        assert int(r['params']) == j['params']
    md = open(os.path.join(out, 'report.md')).read()
    for j in report['rows']:
        line = next(line for line in md.splitlines() if line.startswith(f'| {j["plan"]} |'))
        assert f'{j["top1_mean"]:.2f}' in line and f'{j["params"] / 1e6:.3f}' in line
    assert report['finished'] == report['runs'] == 4 and not report['unfinished']


def test_all_runs_log_to_one_wandb_group(sharded):
    results = [json.load(open(p)) for p in glob.glob(os.path.join(sharded['out'], 'runs', '*', 'result.json'))]
    groups = {r['wandb_group'] for r in results}
    assert len(groups) == 1 and groups != {None}  # both shards chose the same group
    group = groups.pop().encode()
    for r in results:  # each run's offline wandb record carries the group and the run's name
        files = glob.glob(os.path.join(sharded['out'], 'runs', r['name'], 'wandb', 'offline-run-*', '*.wandb'))
        assert len(files) == 1
        blob = open(files[0], 'rb').read()
        assert group in blob and r['name'].encode() in blob


def test_pareto_front():
    pts = [(10.0, 50.0), (20.0, 40.0), (5.0, 60.0), (8.0, 45.0), (20.0, 30.0)]
    assert cmp.pareto_front(pts, higher_x_better=True) == [0, 1, 2]
    assert cmp.pareto_front(pts, higher_x_better=False) == [2]


def test_rerun_skips_finished_runs_and_resumes_an_unfinished_one(photos, tmp_path, capsys):
    out = str(tmp_path / 'out')
    args = ['--mixers', 'window', '--data', photos, '--out', out, '--epochs', '2', '--img-size', '32',
            '--batch-size', '8']
    assert _compare(*args) == 0
    work = os.path.join(out, 'runs', 'window__seed0')
    first = json.load(open(os.path.join(work, 'result.json')))
    stamps = {f: os.stat(os.path.join(work, f)).st_mtime_ns for f in ('result.json', 'epoch_1.pth', 'epoch_2.pth')}
    capsys.readouterr()
    assert _compare(*args) == 0  # finished: nothing trained, result untouched
    assert 'finished earlier, not repeated' in capsys.readouterr().out
    assert os.stat(os.path.join(work, 'result.json')).st_mtime_ns == stamps['result.json']
    # killed after its first epoch: the checkpoint of epoch 2 and the result never written
    os.remove(os.path.join(work, 'result.json'))
    os.remove(os.path.join(work, 'epoch_2.pth'))
    with open(os.path.join(work, 'last_checkpoint'), 'w') as f:
        f.write(os.path.join(work, 'epoch_1.pth'))
    result = cmp.compare(cmp.build_parser().parse_args(args), log=lambda msg: None)
    assert result['runs'] == {'window__seed0': 'resumed', 'window__seed1': 'done'}
    assert os.stat(os.path.join(work, 'epoch_1.pth')).st_mtime_ns == stamps['epoch_1.pth']  # not retrained
    again = json.load(open(os.path.join(work, 'result.json')))
    assert [r['epoch'] for r in again['history']] == [1, 2]
    assert again['history'][0] == first['history'][0]


def _bad(capsys, *args):
    code = _compare(*args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith('zoo compare: error: '), err
    return err


def test_bad_input_fails_before_anything_is_written(photos, sharded, tmp_path, capsys):
    out = str(tmp_path / 'never')
    base = ['--out', out, '--data', photos, *TINY]
    err = _bad(capsys, '--mixers', 'window', 'windw', *base)
    assert "'windw'" in err and 'neighborhood' in err and 'cbam' in err  # the known ones listed
    err = _bad(capsys, '--mixers', 'window/grid', *base)
    assert 'hybrid_tiny has 4 stages, the plan names 2' in err
    err = _bad(capsys, '--mixers', 'window/grid/window/grid/window', *base)
    assert 'the plan names 5' in err
    for shard in ('3/2', '0/2', '1', 'a/b'):
        assert '--shard' in _bad(capsys, '--shard', shard, *base)
    odd = tmp_path / 'odd'
    for split, classes in (('train', ('a', 'b')), ('val', ('a', 'c'))):
        for c in classes:
            os.makedirs(odd / split / c)
    err = _bad(capsys, '--out', out, '--data', str(odd), *TINY)
    assert "only in train: ['b']" in err and "only in val: ['c']" in err
    assert 'takes no mixers=' in _bad(capsys, '--backbone', 'swin_tiny', *base)
    assert '--img-size' in _bad(capsys, '--out', out, '--data', photos, '--img-size', '16')
    err = _bad(capsys, *base, '--opts', 'optim_wrapper.optimizer.lr=abc')
    assert '--opts' in err and 'optim_wrapper.optimizer.lr' in err
    assert 'no such folder' in _bad(capsys, '--report', str(tmp_path / 'nowhere'))
    assert not os.path.exists(out)

    # a report folder whose runs used different recipes: refused, naming the field; the old report stays
    mixed = str(tmp_path / 'mixed')
    shutil.copytree(sharded['out'], mixed)
    before = {n: open(os.path.join(mixed, n), 'rb').read() for n in cmp.REPORT_FILES}
    run_file = glob.glob(os.path.join(mixed, 'runs', '*', 'run.json'))[0]
    info = json.load(open(run_file))
    info['recipe']['epochs'] = 3
    json.dump(info, open(run_file, 'w'))
    err = _bad(capsys, '--report', mixed)
    assert 'different recipes' in err and 'epochs: ' in err
    assert {n: open(os.path.join(mixed, n), 'rb').read() for n in cmp.REPORT_FILES} == before
    # adding runs of another recipe to that folder is refused the same way
    err = _bad(capsys, '--mixers', 'window', '--data', photos, '--out', sharded['out'], '--epochs', '2',
               '--img-size', '32', '--batch-size', '8')
    assert 'another recipe' in err and 'epochs' in err


def test_a_plan_string_is_read_as_the_plan_it_spells():
    small = zoo.reduced_args('hybrid_tiny')
    as_list = timm.create_model('hybrid_tiny', mixers=['se', 'linear', 'agent', 'global'], **small)
    for text in ('[se,linear,agent,global]', 'se/linear/agent/global', "('se', 'linear', 'agent', 'global')"):
        model = timm.create_model('hybrid_tiny', mixers=text, **small)
        assert list(model.state_dict()) == list(as_list.state_dict())
    every = timm.create_model('hybrid_tiny', mixers='window', **small)
    assert {type(b.attn).__name__ for s in every.stages for b in s.blocks} == {'WindowAttention'}
    inline = timm.create_model('hybrid_tiny', mixers='cbam/linear:inline/window/grid', **small)
    assert type(inline.stages[1].blocks[0].attn).__name__ == 'InLineLinearAttention'
    with pytest.raises(ValueError, match=r'expected one entry per stage \(4\), got 2'):
        timm.create_model('hybrid_tiny', mixers='se/linear', **small)
    with pytest.raises(ValueError, match="unknown mixer 'lineer'.*neighborhood"):
        timm.create_model('hybrid_tiny', mixers='[se,lineer,agent,global]', **small)


def test_opts_list_of_bare_names_reaches_the_model_as_a_plan():
    assert parse_opts(['m=[se,linear,agent,global]', 'n=[1, 2]', "k=[[window, window], 'grid', None]"]) == dict(
        m=['se', 'linear', 'agent', 'global'], n=[1, 2], k=[['window', 'window'], 'grid', None])
    small = zoo.reduced_args('hybrid_tiny')
    cfg = load_config(os.path.join('classification', 'hybrid_compare_digits.py'), [
        f'model.model_kwargs={small!r}', 'model.model_kwargs.mixers=[se,linear,agent,global]'])
    assert cfg.model.model_kwargs.mixers == ['se', 'linear', 'agent', 'global']
    from mmengine.registry import MODELS
    model = MODELS.build(cfg.model)
    plan = timm.create_model('hybrid_tiny', num_classes=10, mixers=['se', 'linear', 'agent', 'global'], **small)
    assert list(model.model.state_dict()) == list(plan.state_dict())
    with torch.no_grad():
        assert model.model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_photos_data_is_generated_once(tmp_path):
    root = str(tmp_path / 'photos')
    cmp._photo_data(root)
    classes = cmp.resolve_data('photos')['classes']
    for split, n in (('train', 160), ('val', 24)):
        assert sorted(os.listdir(os.path.join(root, split))) == classes
        assert all(len(os.listdir(os.path.join(root, split, c))) == n for c in classes)
    stamp = os.stat(os.path.join(root, 'val', 'china', '0000.jpg')).st_mtime_ns
    cmp._photo_data(root)  # the marker says it is complete: not written again
    assert os.stat(os.path.join(root, 'val', 'china', '0000.jpg')).st_mtime_ns == stamp


def test_runs_train_with_ddp_under_torchrun(photos, tmp_path):
    import subprocess
    import sys
    out = str(tmp_path / 'out')
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=repo + os.pathsep + os.environ.get('PYTHONPATH', ''))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m', 'zoo.cli',
           'compare', '--mixers', 'window', '--seeds', '0', '--data', photos, '--out', out, *TINY]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    work = os.path.join(out, 'runs', 'window__seed0')
    log = open(glob.glob(os.path.join(work, '2*_*', '2*_*.log'))[0]).read()
    assert 'Distributed launcher: pytorch' in log and 'GPU number: 2' in log  # mmengine's name for world size
    assert proc.stdout.count('runs in this shard') == 1  # rank 0 speaks and writes
    result = json.load(open(os.path.join(work, 'result.json')))
    assert result['cost']['params'] > 0 and 0 <= result['top1'] <= 100
    assert os.path.isfile(os.path.join(out, 'report.md'))
