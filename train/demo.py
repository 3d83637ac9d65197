"""The main job, end to end on a CPU with no download (``python -m zoo.train.demo``, ``zoo demo``).

Classification (default): train a small zoo backbone on scikit-learn's 1797 real handwritten digits
(configs/classification/cbam_resnet18_digits.py), evaluate top-1/top-5 on the 359 held-out digits, save the weights as
.safetensors, export to ONNX, check onnxruntime against PyTorch on real validation images and report the accuracy
onnxruntime reaches. ``--task detection`` trains FCOS on the generated shapes set, reports COCO AP, exports the
trained detector (pre-processing, head, box decoding and NMS) to ONNX and compares onnxruntime's detections and AP with
PyTorch's on the validation images.
"""
import argparse
import json
import os
import resource
import sys
import time
from typing import Dict, List, Optional, Tuple

CONFIGS = dict(
    classification='classification/cbam_resnet18_digits.py',
    detection='detection/cbam_resnet18_fcos_shapes.py',
)


def config_dir() -> str:
    """The configs shipped in the zoo package (zoo/configs; the repository's configs/ in a checkout)."""
    from .runner import packaged_configs_dir
    path = packaged_configs_dir()
    if not os.path.isdir(path):
        raise FileNotFoundError(f'the configs shipped with the zoo package are missing ({path}); reinstall attention-zoo')
    return path


def _export_classifier(cfg, result: dict, work_dir: str) -> Dict[str, object]:
    """Weights -> .safetensors, ONNX export + onnxruntime parity and accuracy on the validation images."""
    import numpy as np
    import torch
    from mmengine.registry import DATASETS, MODELS
    from zoo.weights import export_onnx, onnx_run, save_weights

    from .runner import read_checkpoint
    checkpoint = read_checkpoint(result['checkpoint'])
    state = checkpoint.get('state_dict_ema', checkpoint['state_dict'])
    model_cfg = dict(cfg.model, pretrained=None)
    model = MODELS.build(model_cfg)
    model.load_state_dict(state)
    net = model.model.eval()
    out = {}
    out['safetensors'] = save_weights(net, os.path.join(work_dir, 'model.safetensors'),
                                      metadata=dict(architecture=model_cfg['model_name'],
                                                    num_classes=str(model_cfg['num_classes'])))
    val = DATASETS.build(cfg.val_dataloader.dataset)
    images = torch.stack([val[i]['inputs'] for i in range(len(val))])
    labels = np.array([val.samples[i][1] for i in range(len(val))])
    size = tuple(images.shape[-2:])
    t0 = time.time()
    report = export_onnx(net, os.path.join(work_dir, 'model.onnx'), img_size=size, batch_size=2,
                         example_input=images[:8], atol=1e-4, show_progress=True)
    out['onnx'] = report['path']
    out['onnx_max_abs_err'] = report['max_abs_err']
    out['onnx_export_s'] = round(time.time() - t0, 1)
    ort_logits, pt_logits = [], []
    with torch.no_grad():
        for i in range(0, len(images), 120):
            batch = images[i:i + 120]
            ort_logits.append(onnx_run(report['path'], batch)[0])
            pt_logits.append(net(batch).numpy())
    ort_logits, pt_logits = np.concatenate(ort_logits), np.concatenate(pt_logits)
    out['onnx_top1'] = float(100.0 * (ort_logits.argmax(1) == labels).mean())
    out['torch_top1'] = float(100.0 * (pt_logits.argmax(1) == labels).mean())
    out['onnx_vs_torch_max_abs_err_val'] = float(np.abs(ort_logits - pt_logits).max())
    return out


def _match_detections(ref: tuple, got: tuple, min_iou: float = 0.99,
                      tie: float = 1e-4) -> Tuple[List[Tuple[int, int]], int]:
    """Greedy one-to-one matching of two detection lists (boxes, scores, labels), highest reference score first:
    same label, IoU >= `min_iou`. Returns the matched index pairs and the number of unmatched detections that no
    score tie explains: where several candidates score the same (within `tie`, e.g. an untrained head), the two
    runtimes may keep different ones at the detections-per-image cut or in NMS, so an unmatched detection is
    excused when the other list has an unmatched one of the same score."""
    import torch
    from torchvision.ops import box_iou
    rb, rs, rl = (torch.as_tensor(a) for a in ref)
    gb, gs, gl = (torch.as_tensor(a) for a in got)
    if len(rb) == 0 or len(gb) == 0:
        return [], len(rb) + len(gb)
    iou = box_iou(rb.float(), gb.float())
    iou[rl[:, None] != gl[None, :]] = -1.0
    pairs, used = [], set()
    for i in torch.argsort(rs, descending=True).tolist():
        order = torch.argsort(iou[i], descending=True).tolist()
        j = next((j for j in order if j not in used), None)
        if j is not None and iou[i, j] >= min_iou:
            pairs.append((i, j))
            used.add(j)
    left_r = rs[[i for i in range(len(rs)) if i not in {p[0] for p in pairs}]]
    left_g = gs[[j for j in range(len(gs)) if j not in used]]
    if len(left_r) == 0 or len(left_g) == 0:
        return pairs, len(left_r) + len(left_g)
    close = (left_r[:, None].double() - left_g[None, :].double()).abs() <= tie
    return pairs, int((~close.any(1)).sum()) + int((~close.any(0)).sum())


def _export_detector(cfg, result: dict, work_dir: str) -> Dict[str, object]:
    """The trained torchvision detector (resize + normalise, backbone, FPN, head, box decoding, NMS) -> ONNX with
    torch's TorchScript-based exporter (opset 17; dynamic image height and width, one image per call), checked
    with onnx.checker, then compared with PyTorch on every validation image: detections matched one to one
    (same label, IoU >= 0.99), their box and score differences, and the COCO AP each runtime reaches."""
    import warnings

    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from mmengine.registry import DATASETS, MODELS
    from zoo.kernels.backend import use_backend
    from zoo.progress import progress
    from zoo.weights import OnnxExportError, atomic_write

    from .metrics import coco_evaluate
    from .runner import read_checkpoint

    checkpoint = read_checkpoint(result['checkpoint'])
    model = MODELS.build(dict(cfg.model, pretrained=None))
    model.load_state_dict(checkpoint.get('state_dict_ema', checkpoint['state_dict']))
    net = _detector_for_export(model.detector).eval()
    val = DATASETS.build(cfg.val_dataloader.dataset)
    images = [val[i] for i in range(len(val))]
    path = os.path.join(work_dir, 'model.onnx')
    out: Dict[str, object] = {}
    t0 = time.time()
    with use_backend('torch'), atomic_write(path) as tmp:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter('ignore')  # torchvision's tracer warnings about Python ints in the transform
            torch.onnx.export(
                net, (images[0]['inputs'],), tmp, dynamo=False, opset_version=17, input_names=['image'],
                output_names=['boxes', 'scores', 'labels'],
                dynamic_axes={'image': {1: 'height', 2: 'width'}, 'boxes': {0: 'detections'},
                              'scores': {0: 'detections'}, 'labels': {0: 'detections'}})
        onnx.checker.check_model(tmp)
        out['onnx_export_s'] = round(time.time() - t0, 1)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(tmp, options, providers=['CPUExecutionProvider'])
        dets = dict(torch=[], onnx=[])
        box_err = score_err = 0.0
        unmatched = total = 0
        with torch.no_grad():
            for item in progress(images, desc='onnxruntime vs PyTorch', unit='image'):
                ref = tuple(t.numpy() for t in net(item['inputs']))
                got = tuple(session.run(None, {'image': item['inputs'].numpy()}))
                pairs, missing = _match_detections(ref, got)
                unmatched += missing
                total += len(ref[0]) + len(got[0])
                for i, j in pairs:
                    box_err = max(box_err, float(np.abs(ref[0][i] - got[0][j]).max()))
                    score_err = max(score_err, float(abs(ref[1][i] - got[1][j])))
                image_id = item['data_samples']['image_id']
                for name, (boxes, scores, labels) in (('torch', ref), ('onnx', got)):
                    for b, s, lab in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
                        dets[name].append(dict(image_id=image_id, bbox=[b[0], b[1], b[2] - b[0], b[3] - b[1]],
                                               score=float(s),
                                               category_id=val.cat_ids[int(lab) + model.label_offset - 1]))
        out['images'] = len(images)
        out['detections'] = total // 2
        out['unmatched_detections'] = unmatched  # not explained by score ties
        out['max_abs_box_diff_px'] = box_err
        out['max_abs_score_diff'] = score_err
        # a score exactly at the score threshold may flip a detection or two; more is a broken export
        if unmatched > max(2, 0.01 * total) or box_err > 0.01 or score_err > 1e-4:
            raise OnnxExportError(
                f'the exported detector disagrees with PyTorch on the {len(images)} validation images: {unmatched} '
                f'of {total} detections unmatched, max box difference {box_err:.3g} px, max score difference '
                f'{score_err:.3g}; nothing was written to {path}', out)
    out['onnx'] = path
    for name in ('torch', 'onnx'):
        stats = coco_evaluate(val.ann_file, dets[name], backend='pycocotools')
        out[f'{name}_AP'], out[f'{name}_AP50'] = stats['AP'], stats['AP50']
    return out


def _detector_for_export(detector):
    """A torchvision detector as image (3, H, W) float in [0, 1] -> (boxes (N, 4) xyxy in input pixels, scores (N,),
    labels (N,)); the labels are the detector's own (FCOS / RetinaNet: 0..K-1).

    The image is first resized here to the detector's test size (shorter side min_size, longer side at most
    max_size) with sizes rounded to the nearest pixel, so torchvision's own resize then has a scale of exactly 1.
    torchvision floors `size * (min_size / size)`, which lands 1 pixel short on either side of an integer depending
    on the arithmetic: in double (PyTorch eager) a 103-pixel side becomes 127, in float32 (the exported graph)
    a 123-pixel side does, and the two runtimes then see differently resized images.
    """
    import torch
    import torch.nn.functional as F

    class DetectorForExport(torch.nn.Module):
        def __init__(self, det):
            super().__init__()
            self.detector = det

        def forward(self, image):
            t = self.detector.transform
            shape = torch._shape_as_tensor(image)[-2:].to(torch.float32)  # stays dynamic in the exported graph
            scale = torch.minimum(float(t.min_size[-1]) / shape.min(), float(t.max_size) / shape.max())
            size = torch.round(shape * scale).to(torch.int64)
            resized = F.interpolate(image[None], size=(size[0], size[1]), mode='bilinear', align_corners=False)[0]
            res = self.detector([resized])[0]
            ratio = (shape / size.to(torch.float32)).flip(0).repeat(2)  # (w, h, w, h)
            return res['boxes'] * ratio, res['scores'], res['labels']

    return DetectorForExport(detector)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='zoo demo', description=__doc__.splitlines()[0])
    parser.add_argument('--task', choices=tuple(CONFIGS), default='classification')
    parser.add_argument('--work-dir', default=None, help='default: work_dirs/demo_<task>')
    parser.add_argument('--opts', nargs='+', default=[], metavar='KEY=VALUE',
                        help='config overrides, e.g. model.model_name=swin_tiny train_cfg.max_epochs=3')
    parser.add_argument('--no-export', action='store_true', help='skip the safetensors / ONNX step')
    parser.add_argument('--threads', type=int, default=None,
                        help="torch intra-op threads (default: torch's choice); 1 is much faster on a busy CPU")
    args = parser.parse_args(argv)

    import torch
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f'--threads: expected >= 1, got {args.threads}')
        torch.set_num_threads(args.threads)

    from . import ConfigError, DatasetError, load_config, run_train
    work_dir = os.path.abspath(args.work_dir or os.path.join('work_dirs', f'demo_{args.task}'))
    opts = list(args.opts)
    if args.task == 'detection':
        # the generated data lives with the run unless the caller points elsewhere
        root = os.path.join(work_dir, 'data', 'shapes')
        opts = [f'train_dataloader.dataset.root={root}', f'val_dataloader.dataset.root={root}'] + opts
    if args.threads is None and torch.get_num_threads() > 1:
        print(f'zoo demo: {torch.get_num_threads()} torch threads; on a busy machine rerun with --threads 1 (often '
              f'several times faster)', flush=True)
    t_start = time.time()
    try:
        cfg = load_config(os.path.join(config_dir(), CONFIGS[args.task]), opts)
        result = run_train(cfg, work_dir=work_dir, launcher='none')
    except (ConfigError, DatasetError, FileNotFoundError) as e:
        print(f'zoo demo: error: {e}', file=sys.stderr)
        return 2
    t_train = time.time() - t_start

    summary = dict(task=args.task, config=os.path.relpath(cfg.filename), model=cfg.model.get('model_name',
                   cfg.model.get('backbone')), torch_threads=torch.get_num_threads(),
                   train_and_eval_seconds=round(t_train, 1), metrics={k: round(v, 4) for k, v in
                                                                      result['metrics'].items()})
    files = dict(work_dir=result['work_dir'], checkpoint=result['checkpoint'], curves=result['curves'],
                 history=os.path.join(result['work_dir'], 'history.json'))
    if args.task == 'classification' and not args.no_export:
        exported = _export_classifier(cfg, result, work_dir)
        for key in ('safetensors', 'onnx'):
            files[key] = exported.pop(key)
        summary['export'] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in exported.items()}
    elif args.task == 'detection' and not args.no_export:
        exported = _export_detector(cfg, result, work_dir)
        files['onnx'] = exported.pop('onnx')
        summary['export'] = {k: (float(f'{v:.4g}') if isinstance(v, float) else v) for k, v in exported.items()}
    best = os.path.join(result['work_dir'], 'best.pth')
    if os.path.isfile(best):
        files['best'] = best
    summary['total_seconds'] = round(time.time() - t_start, 1)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    summary['process_cpu_seconds'] = round(usage.ru_utime + usage.ru_stime, 1)  # load-independent cost
    summary['files'] = files
    with open(os.path.join(work_dir, 'demo_summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)

    m = result['metrics']
    print('\n=== zoo demo: ' + args.task + ' ===')
    if args.task == 'classification':
        from mmengine.registry import DATASETS
        n_train, n_val = (len(DATASETS.build(dict(c.dataset, train=False)))
                          for c in (cfg.train_dataloader, cfg.val_dataloader))
        print(f"data: scikit-learn digits (1797 real 8x8 handwritten digits, upsampled to "
              f"{cfg.val_dataloader.dataset.img_size} px), {n_train} train / {n_val} val")
        print(f"model: {summary['model']}  top-1 {m.get('accuracy/top1', float('nan')):.2f}%  "
              f"top-5 {m.get('accuracy/top5', float('nan')):.2f}%")
        if 'export' in summary:
            e = summary['export']
            print(f"onnxruntime: top-1 {e['onnx_top1']:.2f}% (PyTorch {e['torch_top1']:.2f}%), "
                  f"max |logit diff| {e['onnx_vs_torch_max_abs_err_val']:.2e}")
    else:
        print('data: generated COCO-format shapes (rectangles / ellipses / triangles on textured backgrounds)')
        print(f"model: FCOS + FPN over {summary['model']}  AP {m.get('coco/AP', float('nan')):.3f}  "
              f"AP50 {m.get('coco/AP50', float('nan')):.3f}  AP75 {m.get('coco/AP75', float('nan')):.3f}")
        if 'export' in summary:
            e = summary['export']
            print(f"onnxruntime: AP {e['onnx_AP']:.3f} (PyTorch {e['torch_AP']:.3f}) on {e['images']} val images; "
                  f"{e['detections']} detections, {e['unmatched_detections']} unmatched, max |box diff| "
                  f"{e['max_abs_box_diff_px']:.1e} px, max |score diff| {e['max_abs_score_diff']:.1e}")
    print(f"time: {summary['total_seconds']:.0f} s wall, {summary['process_cpu_seconds']:.0f} s CPU "
          f"({torch.get_num_threads()} torch threads)")
    if args.threads is None and torch.get_num_threads() > 1:
        print('tip: on a busy machine add --threads 1 (torch threads that share cores with other work wait on '
              'each other; one thread is often several times faster)')
    for name, path in files.items():
        if path:
            print(f'{name}: {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
