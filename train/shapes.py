"""A generated COCO-format detection set: coloured shapes with boxes on textured backgrounds (fixed seed).

`make_shapes_coco(root, split, num_images)` writes ``root/<split>/*.png`` and ``root/annotations/<split>.json``.
Image sizes vary within [min_size, max_size] so batches mix sizes. Three classes: rectangle, ellipse, triangle.
"""
import json
import os
import shutil
import uuid
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ('rectangle', 'ellipse', 'triangle')
_VERSION = 1


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) uint8 background: a colour gradient, blotchy low-frequency noise and faint stripes."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(40, 215, size=(2, 3))
    angle = rng.uniform(0, np.pi)
    t = (np.cos(angle) * xx / w + np.sin(angle) * yy / h)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    cells = rng.integers(3, 8)
    low = rng.normal(0, 25, size=(cells, cells, 3)).astype(np.float32)
    blotch = np.asarray(Image.fromarray(low.astype(np.float32)[..., 0]).resize((w, h), Image.BICUBIC))
    img += blotch[..., None] * rng.uniform(0.5, 1.0, size=3)[None, None]
    period = rng.uniform(6, 20)
    img += 10 * np.sin(2 * np.pi * (xx * np.cos(angle + 1) + yy * np.sin(angle + 1)) / period)[..., None]
    img += rng.normal(0, 6, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw_image(rng: np.random.Generator, h: int, w: int, max_objects: int):
    img = Image.fromarray(_texture(rng, h, w))
    draw = ImageDraw.Draw(img)
    boxes: List[Tuple[float, float, float, float]] = []
    labels: List[int] = []
    n = int(rng.integers(1, max_objects + 1))
    for _ in range(n * 10):
        if len(boxes) == n:
            break
        bw, bh = (int(v) for v in rng.integers(12, max(13, min(h, w) // 2), size=2))
        x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        x1, y1 = x0 + bw, y0 + bh
        if any(x0 < bx1 + 2 and bx0 < x1 + 2 and y0 < by1 + 2 and by0 < y1 + 2 for bx0, by0, bx1, by1 in boxes):
            continue  # keep shapes apart so each box is fully visible
        cls = int(rng.integers(0, len(CLASSES)))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        outline = tuple(255 - c for c in colour)
        if cls == 0:
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=colour, outline=outline)
        elif cls == 1:
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=colour, outline=outline)
        else:
            apex = x0 + int(rng.integers(0, bw))
            draw.polygon([(apex, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=colour, outline=outline)
        boxes.append((x0, y0, x1, y1))
        labels.append(cls)
    return img, boxes, labels


def make_shapes_coco(
        root: str,
        split: str,
        num_images: int,
        seed: int = 0,
        min_size: int = 96,
        max_size: int = 160,
        max_objects: int = 4,
) -> Dict[str, str]:
    """Generate (once) the `split` of the shapes set under `root`; returns {'ann_file', 'img_dir'}.

    The content depends only on the arguments; an existing split made with the same arguments is reused.
    Files appear atomically (written to a temporary folder, then renamed).
    """
    if num_images < 1:
        raise ValueError(f'num_images: expected >= 1, got {num_images}')
    if not 16 <= min_size <= max_size:
        raise ValueError(f'min_size/max_size: expected 16 <= min_size <= max_size, got {min_size}, {max_size}')
    root = os.path.abspath(root)
    ann_file = os.path.join(root, 'annotations', f'{split}.json')
    img_dir = os.path.join(root, split)
    params = dict(version=_VERSION, split=split, num_images=num_images, seed=seed, min_size=min_size,
                  max_size=max_size, max_objects=max_objects)
    if _is_current(ann_file, img_dir, params):
        return dict(ann_file=ann_file, img_dir=img_dir)

    # a split-specific stream, so train and val never share images
    rng = np.random.default_rng([seed, sum(map(ord, split))])
    tmp = os.path.join(root, f'.tmp-{split}-{uuid.uuid4().hex[:8]}')
    os.makedirs(os.path.join(tmp, 'images'))
    images, annotations = [], []
    for i in range(num_images):
        h, w = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
        img, boxes, labels = _draw_image(rng, h, w, max_objects)
        name = f'{split}_{i:05d}.png'
        img.save(os.path.join(tmp, 'images', name))
        images.append(dict(id=i + 1, file_name=name, height=h, width=w))
        for (x0, y0, x1, y1), cls in zip(boxes, labels):
            annotations.append(dict(
                id=len(annotations) + 1, image_id=i + 1, category_id=cls + 1, iscrowd=0,
                bbox=[float(x0), float(y0), float(x1 - x0), float(y1 - y0)], area=float((x1 - x0) * (y1 - y0))))
    coco = dict(info=dict(description='zoo synthetic shapes', generator=params), images=images,
                annotations=annotations, categories=[dict(id=i + 1, name=n) for i, n in enumerate(CLASSES)])
    with open(os.path.join(tmp, 'ann.json'), 'w') as f:
        json.dump(coco, f)

    os.makedirs(os.path.dirname(ann_file), exist_ok=True)
    try:
        if not _is_current(ann_file, img_dir, params):  # not finished meanwhile by another process
            if os.path.isdir(img_dir):
                shutil.rmtree(img_dir)
            os.rename(os.path.join(tmp, 'images'), img_dir)
            os.replace(os.path.join(tmp, 'ann.json'), ann_file)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dict(ann_file=ann_file, img_dir=img_dir)


def _is_current(ann_file: str, img_dir: str, params: dict) -> bool:
    if not (os.path.isfile(ann_file) and os.path.isdir(img_dir)):
        return False
    try:
        with open(ann_file) as f:
            return json.load(f).get('info', {}).get('generator') == params
    except (OSError, ValueError):
        return False
