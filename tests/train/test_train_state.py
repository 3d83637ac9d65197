"""What a run leaves in its work dir: a bounded number of checkpoints, best.pth, one saved config per run; resuming
a finished run reports it instead of training; bad overrides fail before anything is written."""
import glob
import json
import os

import pytest

from zoo.train import load_config, run_train
from zoo.train.cli import main as cli_main
from zoo.train import ConfigError
from zoo.train.runner import read_checkpoint


def _files(work):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(work, '*.pth')))


def _snapshot(work):
    """Every file under `work` with its size and modification time."""
    out = {}
    for dirpath, _, names in os.walk(work):
        for name in names:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, work)] = (os.path.getsize(path), os.path.getmtime(path))
    return out


@pytest.fixture(scope='module')
def four_then_six(recipe, tmp_path_factory):
    """A tiny run of 4 epochs (max_keep_ckpts=2, as shipped), then resumed to 6 epochs, in one work dir."""
    root = tmp_path_factory.mktemp('state')
    work = str(root / 'run')
    opts = recipe.tiny_cls + ['train_cfg.max_epochs=4', 'plot_curves=False']
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        first = run_train(load_config(recipe.cls_config, opts), work_dir=work)
        after_four = _files(work)
        logs_after_four = sorted(glob.glob(os.path.join(work, '2*_*')))
        # what a run killed between writing epoch_4 and deleting epoch_2 would have left behind
        with open(os.path.join(work, 'epoch_2.pth'), 'wb') as f:
            f.write(b'left over')
        resumed = run_train(load_config(recipe.cls_config, recipe.tiny_cls + ['train_cfg.max_epochs=6',
                                                                            'plot_curves=False']),
                            work_dir=work, resume='auto')
    return dict(work=work, opts=opts, first=first, after_four=after_four, logs_after_four=logs_after_four,
                resumed=resumed)


def test_max_keep_ckpts_deletes_old_checkpoints(four_then_six):
    run = four_then_six
    assert run['after_four'] == ['best.pth', 'epoch_3.pth', 'epoch_4.pth']
    # resumed to 6: epochs 5 and 6 only; the resumed run's list continued, the left-over epoch_2 went too
    assert _files(run['work']) == ['best.pth', 'epoch_5.pth', 'epoch_6.pth']
    assert not glob.glob(os.path.join(run['work'], '*.tmp*')) and not glob.glob(os.path.join(run['work'], '.*'))
    ckpt = read_checkpoint(os.path.join(run['work'], 'epoch_6.pth'))
    assert ckpt['message_hub']['runtime_info']['keep_ckpt_ids'] == [5, 6]


def test_best_pth_holds_the_best_validated_weights(four_then_six, recipe, capsys):
    run = four_then_six
    epochs = run['resumed']['history']['epochs']
    scores = {e['epoch']: e['accuracy/top1'] for e in epochs}
    assert sorted(scores) == [1, 2, 3, 4, 5, 6]
    best = read_checkpoint(os.path.join(run['work'], 'best.pth'))
    assert best['meta']['best_metric'] == 'accuracy/top1'
    assert best['meta']['best_score'] == pytest.approx(max(scores.values()))
    assert scores[best['meta']['epoch']] == pytest.approx(max(scores.values()))
    assert 'optimizer' not in best  # weights and meta only
    # `zoo eval CONFIG best.pth` (the README's command) reproduces the best score
    assert cli_main(['eval', recipe.cls_config, os.path.join(run['work'], 'best.pth'), '--work-dir',
                     os.path.join(run['work'], 'eval'), '--opts', *recipe.tiny_cls]) == 0
    printed = json.loads(capsys.readouterr().out.split('final metrics: ')[1].splitlines()[0])
    assert printed['accuracy/top1'] == pytest.approx(max(scores.values()), abs=1e-3)


def test_each_run_saves_its_config_under_its_own_timestamp(four_then_six):
    run = four_then_six
    logs = sorted(glob.glob(os.path.join(run['work'], '2*_*')))
    assert len(run['logs_after_four']) == 1 and len(logs) == 2
    saved = [open(os.path.join(d, 'cbam_resnet18_digits.py')).read() for d in logs]
    assert "'max_epochs': 4" in saved[0].replace('"', "'") or 'max_epochs=4' in saved[0]
    assert "'max_epochs': 6" in saved[1].replace('"', "'") or 'max_epochs=6' in saved[1]
    assert not os.path.exists(os.path.join(run['work'], 'cbam_resnet18_digits.py'))


def test_resume_of_a_finished_run_reports_it(four_then_six, recipe, capsys):
    run = four_then_six
    before = _snapshot(run['work'])
    opts = recipe.tiny_cls + ['train_cfg.max_epochs=6', 'plot_curves=False']
    assert cli_main(['train', recipe.cls_config, '--work-dir', run['work'], '--resume', '--opts', *opts]) == 0
    out = capsys.readouterr().out
    assert f"the run in {run['work']} is already complete at epoch 6 (train_cfg.max_epochs=6)" in out
    printed = json.loads(out.split('final metrics: ')[1].splitlines()[0])
    last = run['resumed']['history']['epochs'][-1]
    assert printed == {k: round(last[k], 4) for k in ('accuracy/top1', 'accuracy/top5')}
    assert f"checkpoint: {os.path.join(run['work'], 'epoch_6.pth')}" in out
    assert _snapshot(run['work']) == before  # no new log dir, config, checkpoint or history
    # resuming from an explicit checkpoint of the finished run says the same
    result = run_train(load_config(recipe.cls_config, opts), work_dir=run['work'],
                       resume=os.path.join(run['work'], 'epoch_6.pth'))
    assert result['completed'] == dict(step=6, max=6, by_epoch=True)
    assert result['metrics']['accuracy/top1'] == pytest.approx(last['accuracy/top1'])


@pytest.mark.parametrize('bad, message', [
    ('train_cfg.max_epochs=abc', "--opts train_cfg.max_epochs: expected a number (the config has 6), got 'abc'"),
    ('train_cfg.max_epochs=2.5', 'train_cfg.max_epochs: expected an integer >= 1, got 2.5'),
    ('train_cfg.max_epochs=0', 'train_cfg.max_epochs: expected an integer >= 1, got 0'),
    ('train_dataloader.batch_size=many', "--opts train_dataloader.batch_size: expected a number"),
    ('train_dataloader.num_workers=-1', 'train_dataloader.num_workers: expected an integer >= 0, got -1'),
    ('model.new_head=yes', "--opts model.new_head: expected True or False (the config has True), got 'yes'"),
    ('val_evaluator.topk=top1', "--opts val_evaluator.topk: expected a list or tuple"),
    ('optim_wrapper.optimizer=adamw', "--opts optim_wrapper.optimizer: expected a dict"),
])
def test_bad_override_fails_before_anything_is_written(four_then_six, recipe, bad, message, capsys):
    run = four_then_six
    before = _snapshot(run['work'])
    assert cli_main(['train', recipe.cls_config, '--work-dir', run['work'], '--opts', *recipe.tiny_cls, bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith('zoo train: error: ') and message in err, err
    assert _snapshot(run['work']) == before


def test_overrides_of_another_kind_that_are_valid(recipe):
    """None switches parts off; numbers may replace numbers of the other kind or become tuples (multi-scale)."""
    cfg = load_config(recipe.cls_config, ['model_ema=None', 'amp=False', 'optim_wrapper.optimizer.lr=1',
                                          'train_dataloader.num_batch_per_epoch=None', 'val_evaluator.topk=(1,)'])
    assert cfg.optim_wrapper.optimizer.lr == 1 and cfg.val_evaluator.topk == (1,)
    det = load_config(recipe.det_config, ['model.min_size=(96, 128)', "model.head_kwargs={'score_thresh': 0.1}"])
    assert det.model.min_size == (96, 128)
    with pytest.raises(ConfigError, match='model.min_size: expected a number'):
        load_config(recipe.det_config, ['model.min_size=large'])
