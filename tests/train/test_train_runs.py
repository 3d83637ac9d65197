"""Short real runs of the recipe: classification and detection train, log, checkpoint and evaluate from the
model's own predictions; a killed run resumes to the same weights; NaN losses, class-count mismatches and
fine-tuning from weight files behave as documented."""
import contextlib
import glob
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from mmengine.registry import DATASETS, MODELS

import zoo.train as train  # noqa: F401
from zoo.train import load_config, run_train
from zoo.train.cli import main as cli_main
from zoo.train.metrics import coco_evaluate
from zoo.train.runner import read_checkpoint
from zoo.weights import IncompatibleKeysError, save_weights


def _env(mp, root):
    mp.setenv('WANDB_MODE', 'offline')
    for var, sub in (('WANDB_DIR', ''), ('WANDB_CACHE_DIR', 'wandb_cache'), ('WANDB_CONFIG_DIR', 'wandb_config')):
        mp.setenv(var, os.path.join(str(root), sub))


@pytest.fixture(scope='module')
def cls_run(recipe, tmp_path_factory):
    """One tiny classification run (3 epochs x 3 batches) with wandb offline, shared by several tests; what it
    printed on stderr is in result['stderr']."""
    root = tmp_path_factory.mktemp('cls_run')
    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(stderr):
        _env(mp, root)
        mp.chdir(root)
        cfg = load_config(recipe.cls_config, recipe.tiny_cls + ["wandb={'project': 'zoo-test', 'mode': 'offline'}"])
        result = run_train(cfg, work_dir=str(root / 'run'))
    return cfg, dict(result, stderr=stderr.getvalue())


def _state(path, key='state_dict'):
    return read_checkpoint(path)[key]


def test_classification_run_learns_logs_and_plots(cls_run):
    cfg, result = cls_run
    work = result['work_dir']
    epochs = result['history']['epochs']
    assert [e['epoch'] for e in epochs] == [1, 2, 3]
    assert epochs[-1]['train_loss'] < epochs[0]['train_loss'] - 0.1
    assert result['metrics']['accuracy/top1'] > 30.0  # chance is 10%
    # per-interval log lines with lr, eta and loss; scalars in the local log; wandb offline run files
    log = open(glob.glob(os.path.join(work, '2*_*', '2*_*.log'))[0]).read()  # mmengine's <timestamp>/<timestamp>.log
    train_lines = [ln for ln in log.splitlines() if 'Epoch(train)' in ln]
    assert len(train_lines) >= 9 and all(k in train_lines[0] for k in ('lr:', 'eta:', 'loss:'))
    scalars = open(glob.glob(os.path.join(work, '*', 'vis_data', 'scalars.json'))[0]).read()
    assert 'accuracy/top1' in scalars and '"loss"' in scalars
    assert glob.glob(os.path.join(work, 'wandb', 'offline-run-*', '*.wandb'))
    # progress (ProgressHook) as plain lines, stderr not being a terminal: the start and the end of the training
    # (the run is shorter than the line interval), named by the epoch and the loss; each validation run likewise
    train_lines = [ln for ln in result['stderr'].splitlines() if ln.startswith('train: ')]
    assert train_lines[0] == 'train:   0% 0/9 [elapsed 00:00, left ?, ?iter/s]'
    last_loss = result['history']['iters'][-1]['loss']
    assert re.fullmatch(rf'train: 100% 9/9 \[elapsed 00:\d\d, left 00:00, .*, epoch 3/3, loss {last_loss:.4g}\]',
                        train_lines[-1]), train_lines
    assert sum(ln.startswith('val: 100% 1/1 [elapsed ') for ln in result['stderr'].splitlines()) == 3
    assert '\r' not in result['stderr']
    with open(result['curves'], 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    assert json.load(open(os.path.join(work, 'history.json'))) == result['history']
    # checkpoints load with torch's default weights_only=True
    for path in glob.glob(os.path.join(work, 'epoch_*.pth')):
        torch.load(path)


def test_classification_metric_comes_from_the_model_predictions(cls_run):
    cfg, result = cls_run
    model = MODELS.build(cfg.model).eval()
    model.load_state_dict(_state(result['checkpoint']))
    val = DATASETS.build(cfg.val_dataloader.dataset)
    n = cfg.val_dataloader.batch_size * cfg.val_dataloader.num_batch_per_epoch
    x = torch.stack([val[i]['inputs'] for i in range(n)])
    y = torch.tensor([val[i]['labels'] for i in range(n)])
    with torch.no_grad():
        top1 = 100.0 * (model(x, mode='predict').argmax(1) == y).float().mean().item()
    assert top1 == pytest.approx(result['metrics']['accuracy/top1'], abs=1e-4)
    # the recipe's own checkpoint fine-tunes into a new 4-class model (weights-only load, prefix stripped)
    from zoo.train.models import TimmClassifier
    tuned = TimmClassifier('test_convnext', num_classes=4, pretrained=result['checkpoint'])
    torch.testing.assert_close(tuned.model.stem[0].weight, model.model.stem[0].weight, rtol=0, atol=0)


def test_eval_cli_and_class_count_mismatch(cls_run, recipe, tmp_path, capsys):
    cfg, result = cls_run
    ckpt = result['checkpoint']
    assert cli_main(['eval', recipe.cls_config, ckpt, '--work-dir', str(tmp_path / 'ev'), '--opts',
                     *recipe.tiny_cls]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    metrics = json.loads(printed.split('final metrics: ')[1].splitlines()[0])
    assert re.search(r'^test: 100% 1/1 \[elapsed 00:\d\d, left 00:00, ', captured.err, re.M), captured.err
    assert metrics['accuracy/top1'] == pytest.approx(result['metrics']['accuracy/top1'], abs=1e-3)

    # a 5-class folder dataset and a 5-class config cannot take the 10-class checkpoint
    from PIL import Image
    from sklearn.datasets import load_digits
    digits = load_digits()
    for c in range(5):
        os.makedirs(tmp_path / 'five' / str(c))
        for i in np.flatnonzero(digits.target == c)[:2]:
            Image.fromarray((digits.images[i] * 15).astype(np.uint8)).save(tmp_path / 'five' / str(c) / f'{i}.png')
    opts = recipe.tiny_cls + ['model.num_classes=5', 'val_dataloader.num_batch_per_epoch=None',
                              f"val_dataloader.dataset={{'type': 'ImageFolderDataset', 'root': '{tmp_path / 'five'}', "
                              f"'img_size': 32, '_delete_': True}}"]
    assert cli_main(['eval', recipe.cls_config, ckpt, '--work-dir', str(tmp_path / 'ev5'), '--opts', *opts]) == 2
    err = capsys.readouterr().err
    assert os.path.basename(ckpt) in err and "'model.head.fc.weight'" in err
    assert 'checkpoint (10, 64) vs model (5, 64)' in err and 'num_classes=5' in err


def test_detection_run_computes_ap_from_predictions(recipe, tmp_path):
    cfg = load_config(recipe.det_config, recipe.tiny_det(str(tmp_path / 'shapes')))
    result = run_train(cfg, work_dir=str(tmp_path / 'run'))
    epochs = result['history']['epochs']
    assert epochs[-1]['train_loss'] < epochs[0]['train_loss'] - 0.5
    reported = result['metrics']
    assert {'coco/AP', 'coco/AP50', 'coco/AP75', 'coco/APs', 'coco/APm', 'coco/APl'} <= set(reported)

    # the same numbers from the checkpoint's own predictions, evaluated independently with pycocotools
    val = DATASETS.build(cfg.val_dataloader.dataset)

    def evaluate(model):
        dets = []
        with torch.no_grad():
            for i in range(len(val)):
                item = val[i]
                out = model([item['inputs']], [item['data_samples']], mode='predict')[0]
                h, w = item['inputs'].shape[-2:]
                assert (out['boxes'][:, 2] <= w + 1e-3).all() and (out['boxes'][:, 3] <= h + 1e-3).all()
                for b, s, lab in zip(out['boxes'].tolist(), out['scores'].tolist(), out['labels'].tolist()):
                    dets.append(dict(image_id=out['image_id'], category_id=val.cat_ids[lab - 1],
                                     bbox=[b[0], b[1], b[2] - b[0], b[3] - b[1]], score=s))
        assert dets
        return coco_evaluate(val.ann_file, dets, backend='pycocotools')

    # the same numbers from the checkpoint's own predictions, evaluated independently with pycocotools
    model = MODELS.build(cfg.model).eval()
    untrained = evaluate(model)
    model.load_state_dict(_state(result['checkpoint']))
    mine = evaluate(model)
    for key in ('AP', 'AP50', 'AP75', 'AR100'):
        assert reported[f'coco/{key}'] == pytest.approx(mine[key], abs=1e-9)
    # well above chance: an untrained detector of the same config finds (next to) nothing
    assert mine['AP50'] > 0.08 and mine['AP50'] > untrained['AP50'] + 0.08


@pytest.mark.parametrize('head', ['retinanet', 'faster_rcnn'])
def test_other_detection_heads_train_and_predict(head, tmp_path):
    from zoo.train.shapes import make_shapes_coco
    paths = make_shapes_coco(str(tmp_path), 'val', 2, min_size=64, max_size=96)
    ds = DATASETS.build(dict(type='CocoDetDataset', train=True, **paths))
    batch = train.data.det_collate([ds[0], ds[1]])
    model = MODELS.build(dict(type='TimmDetector', backbone='test_resnet', head=head, num_classes=3,
                              fpn_channels=32, min_size=64, max_size=96, anchor_scale=2.0))
    losses = model(batch['inputs'], batch['data_samples'], mode='loss')
    assert losses and all('loss' in k for k in losses)
    loss, log_vars = model.parse_losses(losses)
    loss.backward()
    assert all(p.grad is not None for p in model.detector.backbone.body.parameters() if p.requires_grad)
    model.eval()
    outs = model(batch['inputs'], batch['data_samples'], mode='predict')
    assert [o['image_id'] for o in outs] == [s['image_id'] for s in batch['data_samples']]
    for o in outs:
        assert o['boxes'].shape[1] == 4 and len(o['boxes']) == len(o['scores']) == len(o['labels'])
        assert (o['labels'] >= 1).all() and (o['labels'] <= 3).all()


def test_killed_run_resumes_to_the_same_result(recipe, tmp_path):
    """A subprocess is SIGKILLed once its first checkpoint exists; resuming gives the weights (and EMA) of an
    uninterrupted run, with Mixup/CutMix, EMA, warmup + cosine and per-epoch augmentation seeds in play."""
    opts = recipe.tiny_cls + ['train_cfg.max_epochs=3', 'lr_schedule.warmup_epochs=1',
                              "model.mixup={'mixup_alpha': 0.4, 'cutmix_alpha': 1.0, 'label_smoothing': 0.1}",
                              "model_ema={'decay': 0.8}", 'plot_curves=False']
    killed = tmp_path / 'killed'
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=recipe.repo + os.pathsep + os.environ.get('PYTHONPATH', ''))
    proc = subprocess.Popen([sys.executable, '-m', 'zoo.train', 'train', recipe.cls_config, '--work-dir', str(killed),
                             '--opts', *opts], cwd=str(tmp_path), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (killed / 'last_checkpoint').exists():
            assert proc.poll() is None, 'the training subprocess ended before its first checkpoint'
            assert time.time() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (killed / 'epoch_3.pth').exists()
    for path in glob.glob(str(killed / 'epoch_*.pth')):  # whatever the kill left behind is complete
        read_checkpoint(path)

    cfg = load_config(recipe.cls_config, opts)
    resumed = run_train(cfg, work_dir=str(killed), resume='auto')
    straight = run_train(cfg, work_dir=str(tmp_path / 'straight'))
    a, b = read_checkpoint(resumed['checkpoint']), read_checkpoint(straight['checkpoint'])
    assert a['meta']['epoch'] == b['meta']['epoch'] == 3
    for key in ('state_dict', 'state_dict_ema'):
        for name, tensor in b[key].items():
            torch.testing.assert_close(a[key][name], tensor, rtol=0, atol=1e-6, msg=f'{key} {name}')
    assert resumed['metrics']['accuracy/top1'] == pytest.approx(straight['metrics']['accuracy/top1'])
    assert [e['epoch'] for e in resumed['history']['epochs']] == [1, 2, 3]
    np.testing.assert_allclose([r['loss'] for r in resumed['history']['iters']],
                               [r['loss'] for r in straight['history']['iters']], rtol=1e-5)


def test_nan_loss_stops_with_a_clear_message(recipe, tmp_path, capsys):
    code = cli_main(['train', recipe.cls_config, '--work-dir', str(tmp_path / 'nan'), '--opts', *recipe.tiny_cls,
                     'optim_wrapper.optimizer.opt=sgd', 'optim_wrapper.optimizer.lr=1e30',
                     'optim_wrapper.optimizer.weight_decay=0.0'])
    assert code == 1
    err = capsys.readouterr().err
    assert 'Loss is not finite at epoch 1, iteration' in err and 'loss_cls=' in err and 'lr' in err
    assert not glob.glob(str(tmp_path / 'nan' / 'epoch_*.pth'))


def test_gradient_accumulation_and_clipping(recipe, tmp_path):
    opts = recipe.tiny_cls + ['train_cfg.max_epochs=1', 'train_dataloader.num_batch_per_epoch=4',
                              'optim_wrapper.accumulative_counts=2', "optim_wrapper.clip_grad={'max_norm': 0.5}",
                              'plot_curves=False']
    result = run_train(load_config(recipe.cls_config, opts), work_dir=str(tmp_path / 'acc'))
    ckpt = read_checkpoint(result['checkpoint'])
    steps = {int(s['step']) for s in ckpt['optimizer']['state'].values()}
    assert steps == {2}  # 4 iterations, one optimizer step per 2
    lrs = [r['lr'] for r in result['history']['iters']]
    assert lrs[0] == lrs[1] and lrs[2] == lrs[3] and lrs[1] != lrs[2]
    log = open(glob.glob(os.path.join(result['work_dir'], '2*_*', '2*_*.log'))[0]).read()
    assert 'grad_norm:' in log


def test_finetune_from_weight_files(tmp_path):
    from zoo.train.models import TimmClassifier, TimmDetector
    src = TimmClassifier('test_convnext', num_classes=10)
    st = save_weights(src.model, str(tmp_path / 'src.safetensors'))
    torch.save({'state_dict': {f'model.{k}': v for k, v in src.model.state_dict().items()}, 'meta': {}},
               str(tmp_path / 'src.pth'))
    for path in (st, str(tmp_path / 'src.pth')):
        dst = TimmClassifier('test_convnext', num_classes=4, pretrained=path)
        assert dst.model.head.fc.weight.shape[0] == 4
        for name, tensor in src.model.state_dict().items():
            if not name.startswith('head.fc.'):
                torch.testing.assert_close(dst.model.state_dict()[name], tensor, rtol=0, atol=0)
    with pytest.raises(IncompatibleKeysError, match=r"src.safetensors.*shape mismatch 2 \(first: head.fc.*"
                                                    r"new_head=True"):
        TimmClassifier('test_convnext', num_classes=4, pretrained=st, new_head=False)
    with pytest.raises(IncompatibleKeysError, match=r"model.pretrained: weight file .*src.safetensors' does not fit"):
        TimmClassifier('test_resnet', num_classes=4, pretrained=st)
    det = TimmDetector('test_convnext', num_classes=3, pretrained=st, fpn_channels=64, min_size=64, max_size=64)
    body = det.detector.backbone.body.model.state_dict()
    for name, tensor in body.items():
        torch.testing.assert_close(tensor, src.model.state_dict()[name], rtol=0, atol=0)


def _smallest_zoo_models():
    import zoo
    import timm
    picks = []
    for module in zoo.FAMILY_MODULES:
        names = timm.list_models(module=module)
        small = [n for n in names if n.endswith(('mini', 'tiny', '18'))]
        if small or names:
            picks.append(sorted(small or names)[0])
    return picks


@pytest.mark.parametrize('backbone', _smallest_zoo_models())
def test_zoo_backbones_train_and_predict_in_the_detector(backbone):
    """Every zoo family's multi-scale NCHW features feed the FPN: a training step and a prediction on a batch of two
    differently sized images."""
    model = MODELS.build(dict(type='TimmDetector', backbone=backbone, num_classes=3, fpn_channels=64, min_size=96,
                              max_size=128, head_kwargs=dict(score_thresh=0.0)))
    # C3-C5 of the stride 4..32 backbones, SHViT's three maps (strides 16 / 32 / 64) or VOLO's (8 / 16 / 16: its
    # transformer stages keep stride 16), then the two extra levels
    reductions = [f['reduction'] for f in model.detector.backbone.body.model.feature_info][-3:]
    assert reductions in ([8, 16, 32], [16, 32, 64], [8, 16, 16])
    assert model.detector.backbone.strides == reductions + [reductions[-1] * 2, reductions[-1] * 4]
    images = [torch.rand(3, 100, 140), torch.rand(3, 120, 96)]
    targets = [dict(boxes=torch.tensor([[10., 10., 50., 60.]]), labels=torch.tensor([1]), image_id=1),
               dict(boxes=torch.tensor([[5., 20., 40., 90.]]), labels=torch.tensor([2]), image_id=2)]
    loss, _ = model.parse_losses(model(images, targets, mode='loss'))
    loss.backward()
    body = model.detector.backbone.body
    assert all(p.grad is not None for p in body.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        outs = model(images, targets, mode='predict')
    for out, img in zip(outs, images):
        assert len(out['boxes']) > 0
        assert (out['boxes'][:, 2] <= img.shape[2] + 1e-3).all() and (out['boxes'][:, 3] <= img.shape[1] + 1e-3).all()
