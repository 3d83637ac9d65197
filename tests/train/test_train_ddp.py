"""Two processes with DDP (torchrun, gloo on CPU) train the same model as one process with the same global batch."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import torch

import zoo.train  # noqa: F401
from zoo.train import load_config, run_train
from zoo.train.runner import read_checkpoint


def test_two_process_ddp_matches_one_process(recipe, tmp_path):
    # deterministic inputs (evaluation transform), a LayerNorm model, no dropout: only the data split differs
    base = recipe.tiny_cls + ['train_dataloader.dataset.train=False', 'train_cfg.max_epochs=2',
                              'lr_schedule.warmup_epochs=1', 'plot_curves=False']
    single = run_train(load_config(recipe.cls_config, base + ['train_dataloader.batch_size=16']),
                       work_dir=str(tmp_path / 'one'), launcher='none')

    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=recipe.repo + os.pathsep + os.environ.get('PYTHONPATH', ''))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           '-m', 'zoo.train', 'train', recipe.cls_config, '--work-dir', str(tmp_path / 'two'),
           '--opts', *base, 'train_dataloader.batch_size=8', 'val_dataloader.batch_size=60']
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = open(glob.glob(str(tmp_path / 'two' / '2*_*' / '2*_*.log'))[0]).read()
    assert 'Distributed launcher: pytorch' in log and 'GPU number: 2' in log  # mmengine's name for world size

    two = json.load(open(tmp_path / 'two' / 'history.json'))
    one = single['history']
    assert len(two['iters']) == len(one['iters']) == 6
    np.testing.assert_allclose([r['loss'] for r in two['iters']], [r['loss'] for r in one['iters']], rtol=1e-4)
    np.testing.assert_allclose([r['lr'] for r in two['iters']], [r['lr'] for r in one['iters']], rtol=1e-9)
    a = read_checkpoint(str(tmp_path / 'two' / 'epoch_2.pth'))
    b = read_checkpoint(single['checkpoint'])
    assert a['message_hub']['runtime_info']['iter'] == b['message_hub']['runtime_info']['iter']
    for name, tensor in b['state_dict'].items():
        torch.testing.assert_close(a['state_dict'][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    # validation is gathered from both processes (60 images each): the metric of one process over those 120
    metric = two['epochs'][-1]['accuracy/top1']
    assert abs(metric - single['metrics']['accuracy/top1']) < 1e-6
