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
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert logits.shape == (3, 10)
    # the README's way to load model.safetensors: every tensor, the 10-class head included, comes from the file
    import timm
    import torch
    from zoo.weights import load_weights
    model = timm.create_model('test_convnext', pretrained=True, pretrained_cfg_overlay=dict(
        file=summary['files']['safetensors'], num_classes=10)).eval()
    for name, tensor in load_weights(summary['files']['safetensors']).items():
        assert torch.equal(model.state_dict()[name], tensor), name
    with torch.no_grad():
        np.testing.assert_allclose(model(torch.from_numpy(x)).numpy(), logits, rtol=1e-4, atol=1e-4)


def test_detection_demo_end_to_end(tmp_path, capsys):
    """Train, evaluate, export the whole detector to ONNX and compare onnxruntime's detections with PyTorch's
    (score_thresh 0: an untrained head still detects, with many tied scores)."""
    work = tmp_path / 'det'
    code = main(['--task', 'detection', '--work-dir', str(work), '--opts', 'model.backbone=test_efficientnet',
                 'train_dataloader.dataset.num_images=8', 'val_dataloader.dataset.num_images=4',
                 'train_cfg.max_epochs=1', 'train_cfg.val_interval=1', 'model.min_size=96', 'model.max_size=96',
                 "model.head_kwargs={'score_thresh': 0.0, 'detections_per_img': 20}"])
    assert code == 0
    out = capsys.readouterr().out
    assert 'FCOS + FPN over test_efficientnet  AP ' in out and 'onnxruntime: AP ' in out
    summary = json.load(open(work / 'demo_summary.json'))
    assert {'coco/AP', 'coco/AP50'} <= set(summary['metrics'])
    assert os.path.isfile(work / 'data' / 'shapes' / 'annotations' / 'train.json')
    export = summary['export']
    assert export['images'] == 4 and export['detections'] == 80 and export['unmatched_detections'] == 0
    assert export['max_abs_box_diff_px'] <= 1e-2 and export['max_abs_score_diff'] <= 1e-4
    assert export['onnx_AP'] == export['torch_AP']
    for key in ('checkpoint', 'best', 'curves', 'history', 'onnx'):
        assert os.path.isfile(summary['files'][key]), key
    # one image of any size in, boxes in that image's pixels out
    session = ort.InferenceSession(summary['files']['onnx'], providers=['CPUExecutionProvider'])
    boxes, scores, labels = session.run(None, {'image': np.random.rand(3, 70, 150).astype(np.float32)})
    assert boxes.shape == (20, 4) and scores.shape == labels.shape == (20,)
    assert boxes[:, 0::2].max() <= 150 + 1e-3 and boxes[:, 1::2].max() <= 70 + 1e-3
