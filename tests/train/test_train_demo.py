"""The main job (python -m zoo.train.demo) end to end, shortened: train, evaluate, export to ONNX, check onnxruntime."""
import json
import os

import numpy as np
import onnxruntime as ort

import zoo.train  # noqa: F401
from zoo.train.demo import main


def test_classification_demo_end_to_end(tmp_path, capsys):
    work = tmp_path / 'demo'
    code = main(['--work-dir', str(work), '--opts', 'model.model_name=test_convnext', 'train_cfg.max_epochs=1',
                 'train_dataloader.num_batch_per_epoch=4', 'lr_schedule.warmup_epochs=0'])
    assert code == 0
    out = capsys.readouterr().out
    assert '=== zoo demo: classification ===' in out and '1438 train / 359 val' in out
    summary = json.load(open(work / 'demo_summary.json'))
    assert summary['metrics']['accuracy/top1'] > 10.0  # one short epoch, above chance
    export = summary['export']
    assert export['onnx_top1'] == export['torch_top1'] and export['onnx_max_abs_err'] <= 1e-4
    assert abs(export['torch_top1'] - summary['metrics']['accuracy/top1']) < 1e-3  # same weights and images
    for key in ('checkpoint', 'curves', 'history', 'safetensors', 'onnx'):
        assert os.path.isfile(summary['files'][key]), key
    session = ort.InferenceSession(summary['files']['onnx'], providers=['CPUExecutionProvider'])
    logits = session.run(None, {session.get_inputs()[0].name: np.zeros((3, 3, 32, 32), np.float32)})[0]
    assert logits.shape == (3, 10)


def test_detection_demo_end_to_end(tmp_path, capsys):
    work = tmp_path / 'det'
    code = main(['--task', 'detection', '--work-dir', str(work), '--opts', 'model.backbone=test_efficientnet',
                 'train_dataloader.dataset.num_images=8', 'val_dataloader.dataset.num_images=4',
                 'train_cfg.max_epochs=1', 'train_cfg.val_interval=1', 'model.min_size=96', 'model.max_size=96'])
    assert code == 0
    assert 'FCOS + FPN over test_efficientnet  AP ' in capsys.readouterr().out
    summary = json.load(open(work / 'demo_summary.json'))
    assert {'coco/AP', 'coco/AP50'} <= set(summary['metrics'])
    assert os.path.isfile(work / 'data' / 'shapes' / 'annotations' / 'train.json')
