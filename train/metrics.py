"""Metrics: top-k accuracy for classification, COCO box AP (COCOeval) for detection."""
import contextlib
import copy
import io
import json
import logging
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from mmengine.evaluator import BaseMetric
from mmengine.logging import print_log
from mmengine.registry import METRICS

from ._utils import ConfigError, check_choice

COCO_STATS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl')
COCO_BACKENDS = ('faster_coco_eval', 'pycocotools')


@METRICS.register_module()
class TopKAccuracy(BaseMetric):
    """Top-k accuracy in percent (keys 'accuracy/top1', 'accuracy/top5', ...) from logits and labels."""
    default_prefix = 'accuracy'

    def __init__(self, topk: Sequence[int] = (1, 5), collect_device: str = 'cpu', prefix: Optional[str] = None):
        super().__init__(collect_device=collect_device, prefix=prefix)
        topk = tuple(int(k) for k in topk)
        if not topk or min(topk) < 1:
            raise ConfigError(f'val_evaluator.topk: expected positive integers, got {topk}')
        self.topk = topk

    def process(self, data_batch: dict, data_samples) -> None:
        # mmengine's Evaluator hands the (B, K) logits over as a list of per-sample rows
        logits = torch.stack(list(data_samples)) if not torch.is_tensor(data_samples) else data_samples
        labels = data_batch['labels']
        k = min(max(self.topk), logits.shape[1])
        top = logits.topk(k, dim=1).indices.cpu()
        # one entry per sample: mmengine's cross-rank collection orders and truncates per sample
        for label, pred in zip(labels.tolist(), top):
            self.results.append((int(label), pred.tolist()))

    def compute_metrics(self, results: List[Any]) -> Dict[str, float]:
        labels = np.array([r[0] for r in results])
        preds = np.array([r[1] for r in results])
        return {f'top{k}': float(100.0 * (preds[:, :k] == labels[:, None]).any(1).mean()) for k in self.topk}


def _load_gt(gt: Union[str, dict], backend: str):
    """A COCO object from a file path or a dict, with the optional fields COCOeval needs filled in."""
    if isinstance(gt, str):
        with open(gt) as f:
            gt = json.load(f)
    gt = copy.deepcopy(gt)
    gt.setdefault('info', {})
    gt.setdefault('licenses', [])
    for ann in gt.get('annotations', []):
        ann.setdefault('iscrowd', 0)
        if 'area' not in ann:
            ann['area'] = float(ann['bbox'][2] * ann['bbox'][3])
    if backend == 'pycocotools':
        from pycocotools.coco import COCO
    else:
        from faster_coco_eval import COCO
    coco = COCO()
    coco.dataset = gt
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_evaluate(
        gt: Union[str, dict],
        detections: List[dict],
        img_ids: Optional[Sequence[int]] = None,
        backend: str = 'faster_coco_eval',
) -> Dict[str, float]:
    """COCOeval box statistics for `detections` ([{image_id, category_id, bbox: [x, y, w, h], score}]).

    `gt` is a COCO annotation file or dict; `img_ids` restricts evaluation to these images (default: all).
    `backend` 'pycocotools' runs pycocotools' COCOeval; 'faster_coco_eval' its C++ re-implementation, which gives
    identical statistics (tested) much faster. Returns the 12 standard stats keyed AP, AP50, AP75, APs, APm, APl,
    AR1, AR10, AR100, ARs, ARm, ARl; -1 marks an area range without ground truth, as in COCOeval.
    """
    check_choice(backend, COCO_BACKENDS, 'backend')
    coco_gt = _load_gt(gt, backend)
    if img_ids is None:
        img_ids = coco_gt.getImgIds()
    if not detections:
        print_log('COCO evaluation: no detections at all; every AP and AR is 0', logger='current',
                  level=logging.WARNING)
        return {k: 0.0 for k in COCO_STATS}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(list(detections))
        if backend == 'pycocotools':
            from pycocotools.cocoeval import COCOeval
            evaluator = COCOeval(coco_gt, coco_dt, 'bbox')
        else:
            from faster_coco_eval import COCOeval_faster
            evaluator = COCOeval_faster(coco_gt, coco_dt, 'bbox', print_function=lambda *a, **k: None)
        evaluator.params.imgIds = sorted(img_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {k: float(v) for k, v in zip(COCO_STATS, evaluator.stats[:12])}


@METRICS.register_module()
class CocoMetric(BaseMetric):
    """COCO box AP of TimmDetector predictions (keys 'coco/AP', 'coco/AP50', ... 'coco/APl', 'coco/AR100').

    The ground truth is `ann_file`, by default the evaluated dataset's annotation file; labels 1..K map back to
    the dataset's category ids. Every evaluated image counts, including those with no detection.
    """
    default_prefix = 'coco'

    def __init__(self, ann_file: Optional[str] = None, backend: str = 'faster_coco_eval',
                 collect_device: str = 'cpu', prefix: Optional[str] = None):
        super().__init__(collect_device=collect_device, prefix=prefix)
        check_choice(backend, COCO_BACKENDS, 'val_evaluator.backend')
        self.ann_file, self.backend = ann_file, backend

    def process(self, data_batch: dict, data_samples: List[dict]) -> None:
        for out in data_samples:
            boxes = out['boxes'].numpy().astype(np.float64)
            xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1) if len(boxes) else boxes
            self.results.append(dict(image_id=out['image_id'], boxes=xywh, scores=out['scores'].numpy(),
                                     labels=out['labels'].numpy()))

    def compute_metrics(self, results: List[dict]) -> Dict[str, float]:
        meta = self.dataset_meta or {}
        ann_file = self.ann_file or meta.get('ann_file')
        if ann_file is None:
            raise ConfigError('val_evaluator.ann_file: not set and the dataset does not name its annotation file')
        cat_ids = meta.get('cat_ids')
        if cat_ids is None:
            with open(ann_file) as f:
                cat_ids = sorted(c['id'] for c in json.load(f)['categories'])
        dets = []
        for r in results:
            for box, score, label in zip(r['boxes'], r['scores'], r['labels']):
                dets.append(dict(image_id=r['image_id'], category_id=cat_ids[int(label) - 1],
                                 bbox=[float(v) for v in box], score=float(score)))
        img_ids = sorted({r['image_id'] for r in results})
        return coco_evaluate(ann_file, dets, img_ids=img_ids, backend=self.backend)
