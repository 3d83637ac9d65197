"""Metric code against known answers: top-k accuracy, COCO AP of perfect / shifted boxes, and
faster-coco-eval against pycocotools (the reference) on random detections."""
import json

import numpy as np
import pytest
import torch

import zoo.train  # noqa: F401  (registers the recipe)
from zoo.train.metrics import COCO_STATS, CocoMetric, TopKAccuracy, coco_evaluate


def test_topk_accuracy_perfect_and_known():
    metric = TopKAccuracy(topk=(1, 2))
    labels = torch.tensor([0, 1, 2, 3])
    perfect = torch.nn.functional.one_hot(labels, 4).float()
    metric.process(dict(labels=labels), list(perfect))  # mmengine hands over per-sample rows
    assert metric.compute_metrics(metric.results) == {'top1': 100.0, 'top2': 100.0}

    metric = TopKAccuracy(topk=(1, 2))
    # sample 0 right at top-1, sample 1 right at top-2 only, samples 2 and 3 wrong
    logits = torch.tensor([[5., 1, 0, 0], [3., 2, 0, 0], [0., 0, 0, 1], [0., 0, 1, 0]])
    metric.process(dict(labels=torch.tensor([0, 1, 0, 1])), logits)
    assert metric.compute_metrics(metric.results) == {'top1': 25.0, 'top2': 50.0}


def _gt(num_images=6, seed=0):
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(1, num_images + 1):
        images.append(dict(id=i, file_name=f'{i}.png', width=200, height=200))
        for _ in range(rng.integers(1, 5)):
            w, h = rng.uniform(8, 120, size=2)
            x, y = rng.uniform(0, 200 - w), rng.uniform(0, 200 - h)
            anns.append(dict(id=len(anns) + 1, image_id=i, category_id=int(rng.choice([1, 3])), bbox=[x, y, w, h],
                             area=w * h, iscrowd=0))
    return dict(images=images, annotations=anns, categories=[dict(id=1, name='a'), dict(id=3, name='b')])


@pytest.mark.parametrize('backend', ['pycocotools', 'faster_coco_eval'])
def test_coco_perfect_predictions(backend):
    gt = _gt()
    dets = [dict(image_id=a['image_id'], category_id=a['category_id'], bbox=a['bbox'], score=0.9)
            for a in gt['annotations']]
    stats = coco_evaluate(gt, dets, backend=backend)
    assert set(stats) == set(COCO_STATS)
    for key in ('AP', 'AP50', 'AP75', 'AR100'):
        assert stats[key] == pytest.approx(1.0)
    # boxes shifted by half their width: IoU 1/3 < 0.5, so nothing matches
    shifted = [dict(d, bbox=[d['bbox'][0] + d['bbox'][2] / 2] + d['bbox'][1:]) for d in dets]
    assert coco_evaluate(gt, shifted, backend=backend)['AP50'] == pytest.approx(0.0)
    # the wrong category is no match either
    wrong = [dict(d, category_id=4 - d['category_id']) for d in dets]
    assert coco_evaluate(gt, wrong, backend=backend)['AP'] == pytest.approx(0.0)


def test_faster_coco_eval_matches_pycocotools():
    gt = _gt(num_images=30, seed=1)
    rng = np.random.default_rng(2)
    dets = []
    for a in gt['annotations']:
        for _ in range(3):  # jittered copies with random scores, plus false positives
            x, y, w, h = a['bbox']
            j = rng.normal(0, 0.15, size=4) * [w, h, w, h]
            dets.append(dict(image_id=a['image_id'], category_id=a['category_id'],
                             bbox=[x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3])],
                             score=float(rng.uniform())))
        dets.append(dict(image_id=a['image_id'], category_id=1, bbox=list(rng.uniform(0, 100, 4)),
                         score=float(rng.uniform())))
    ref = coco_evaluate(gt, dets, backend='pycocotools')
    fast = coco_evaluate(gt, dets, backend='faster_coco_eval')
    assert 0.05 < ref['AP'] < 0.95  # a non-trivial case
    for key in COCO_STATS:
        assert fast[key] == pytest.approx(ref[key], abs=1e-12), key


def test_coco_metric_maps_labels_to_category_ids(tmp_path):
    gt = _gt(num_images=3)
    ann_file = tmp_path / 'gt.json'
    ann_file.write_text(json.dumps(gt))
    metric = CocoMetric(backend='pycocotools')
    metric.dataset_meta = dict(ann_file=str(ann_file), cat_ids=(1, 3))
    outputs = []
    for img in gt['images']:
        anns = [a for a in gt['annotations'] if a['image_id'] == img['id']]
        boxes = torch.tensor([[a['bbox'][0], a['bbox'][1], a['bbox'][0] + a['bbox'][2], a['bbox'][1] + a['bbox'][3]]
                              for a in anns])
        labels = torch.tensor([1 if a['category_id'] == 1 else 2 for a in anns])  # labels 1..K
        outputs.append(dict(image_id=img['id'], boxes=boxes, scores=torch.ones(len(anns)), labels=labels))
    metric.process({}, outputs)
    stats = metric.compute_metrics(metric.results)
    assert stats['AP'] == pytest.approx(1.0)
    # an evaluated image without detections counts as missed objects
    metric.results = [dict(r) for r in metric.results]
    metric.results[0]['boxes'] = np.zeros((0, 4))
    metric.results[0]['scores'] = metric.results[0]['labels'] = np.zeros((0,))
    assert metric.compute_metrics(metric.results)['AR100'] < 1.0


def test_coco_no_detections_is_zero():
    stats = coco_evaluate(_gt(), [], backend='pycocotools')
    assert all(v == 0.0 for v in stats.values())
