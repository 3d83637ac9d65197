"""Datasets, transforms and collate functions for classification and detection.

Classification samples are ``dict(inputs=(3, H, W) float tensor, labels=int)`` transformed by timm's
``create_transform`` (RandomResizedCrop, flips, RandAugment/AutoAugment, colour jitter, random erasing), collated
with mmengine's ``default_collate``. Detection samples are ``dict(inputs=(3, H, W) float in [0, 1],
data_samples=dict(boxes=(N, 4) xyxy, labels=(N,) in 1..K, image_id, orig_size))`` of any size, collated into lists
by ``det_collate``; torchvision's detection transform resizes, normalises and pads the batch.
"""
import json
import logging
import os
import random
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from mmengine.dist import barrier, get_rank
from mmengine.logging import print_log
from mmengine.registry import DATASETS, FUNCTIONS
from PIL import Image
from torch.utils.data import Dataset

from ._utils import DatasetError, check_kwargs

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_cls_transform(img_size: Union[int, Sequence[int]], train: bool, transform: Optional[dict], where: str):
    """timm's classification transform; `transform` holds `timm.data.create_transform` keyword arguments."""
    from timm.data import create_transform
    kwargs = dict(transform or {})
    check_kwargs(create_transform, kwargs, where)
    for reserved in ('input_size', 'is_training'):
        if reserved in kwargs:
            raise DatasetError(f'{where}.{reserved}: set it with the dataset\'s img_size / train arguments')
    kwargs.setdefault('mean', IMAGENET_MEAN)
    kwargs.setdefault('std', IMAGENET_STD)
    if not train:
        kwargs.setdefault('crop_pct', 1.0)
        # evaluation transforms take no augmentation arguments
        kwargs = {k: v for k, v in kwargs.items() if k in ('mean', 'std', 'crop_pct', 'crop_mode', 'interpolation')}
    size = tuple(img_size) if isinstance(img_size, (list, tuple)) else (int(img_size), int(img_size))
    transform = create_transform(input_size=(3,) + size, is_training=train, **kwargs)
    fix_posterize(transform)
    return transform


def posterize_bits(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """Keep the `bits_to_keep` most significant bits of every channel, for any 0 <= bits_to_keep.

    timm's RandAugment / AutoAugment / AugMix map some magnitudes to 0 bits ('rand-m9-mstd0.5-inc1' once the
    sampled magnitude reaches 10, 'rand-...' without inc below 2.5, the 'v0' AutoAugment policy always), and
    Pillow >= 11 rejects 0 (`ValueError: bits must be between or equal to 1 and 8`). 0 bits gives the all-zero
    image that older Pillow, and TensorFlow's reference posterize, produce, so every policy string keeps the
    meaning it had when published.
    """
    from PIL import ImageOps
    bits = int(bits_to_keep)
    if bits >= 8:
        return img
    if bits <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits)


def fix_posterize(transform: Any) -> int:
    """Point every timm posterize op inside `transform` (Compose, RandAugment, AutoAugment, AugMix, nested) at
    `posterize_bits`; returns how many ops were changed."""
    from timm.data import auto_augment
    changed, stack, seen = 0, [transform], set()
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        if isinstance(t, auto_augment.AugmentOp):
            if t.aug_fn is auto_augment.posterize:
                t.aug_fn = posterize_bits
                changed += 1
        elif isinstance(t, (list, tuple)):
            stack.extend(t)
        else:
            for attr in ('transforms', 'ops', 'policy'):  # Compose, RandAugment / AugMix, AutoAugment
                sub = getattr(t, attr, None)
                if isinstance(sub, (list, tuple)):
                    stack.extend(sub)
    return changed


def _open_rgb(path: str, where: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert('RGB')
    except FileNotFoundError:
        raise DatasetError(f'{where}: image file {path!r} does not exist') from None
    except Exception as e:  # PIL raises several types for corrupt data
        raise DatasetError(f'{where}: cannot decode image {path!r}: {type(e).__name__}: {e}') from None


def _verify_images(paths: Sequence[str], where: str) -> None:
    """Fail on the first file PIL cannot fully decode (checked before training starts)."""
    for path in paths:
        try:
            with Image.open(path) as img:
                img.load()
        except Exception as e:
            raise DatasetError(f'{where}: cannot decode image {path!r}: {type(e).__name__}: {e}') from None


def _should_verify(verify: Union[bool, str], n: int, limit: int = 20000) -> bool:
    if verify == 'auto':
        return n <= limit
    return bool(verify)


class _ClsDataset(Dataset):
    """Base: subclasses fill self.samples / self.classes and implement _load(i) -> PIL image."""

    def __init__(self, img_size, train, transform, where):
        self.img_size = img_size
        self.train = train
        self.transform = build_cls_transform(img_size, train, transform, where)
        self.samples: List[Tuple[Any, int]] = []
        self.classes: Tuple[str, ...] = ()

    @property
    def metainfo(self) -> dict:
        return dict(classes=tuple(self.classes), task='classification')

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        img = self._load(index)
        return dict(inputs=self.transform(img), labels=int(self.samples[index][1]))


@DATASETS.register_module()
class DigitsDataset(_ClsDataset):
    """scikit-learn's 1797 real handwritten digits (8x8 grey, 10 classes), upsampled to `img_size` RGB.

    A fixed stratified split (`val_fraction`, `seed`) gives 'train' (1438) and 'val' (359) images; 'all' is both.
    No download: the data ships inside scikit-learn.
    """

    def __init__(
            self,
            split: str = 'train',
            img_size: int = 32,
            train: bool = False,
            transform: Optional[dict] = None,
            val_fraction: float = 0.2,
            seed: int = 0,
    ):
        where = f'DigitsDataset(split={split!r})'
        if split not in ('train', 'val', 'all'):
            raise DatasetError(f"{where}: split: expected 'train', 'val' or 'all', got {split!r}")
        if not 0.0 < val_fraction < 1.0:
            raise DatasetError(f'{where}: val_fraction: expected 0 < val_fraction < 1, got {val_fraction}')
        super().__init__(img_size, train, transform, where + '.transform')
        from sklearn.datasets import load_digits
        digits = load_digits()
        images, targets = digits.images, digits.target
        rng = np.random.default_rng(seed)
        val_idx = []
        for c in range(10):  # stratified: the same fraction of every class
            idx = np.flatnonzero(targets == c)
            val_idx.extend(rng.choice(idx, size=int(round(len(idx) * val_fraction)), replace=False).tolist())
        is_val = np.zeros(len(targets), dtype=bool)
        is_val[val_idx] = True
        keep = {'train': ~is_val, 'val': is_val, 'all': np.ones_like(is_val)}[split]
        size = img_size if isinstance(img_size, int) else max(img_size)
        self.classes = tuple(str(c) for c in range(10))
        # 0..16 grey levels -> uint8, upsampled once (smoothly) so crops happen at the working resolution
        self._images = [
            Image.fromarray((images[i] * (255.0 / 16.0)).round().astype(np.uint8)).resize((size, size), Image.BICUBIC)
            for i in np.flatnonzero(keep)]
        self.samples = [(int(i), int(targets[i])) for i in np.flatnonzero(keep)]

    def _load(self, index: int) -> Image.Image:
        return self._images[index].convert('RGB')


@DATASETS.register_module()
class ImageFolderDataset(_ClsDataset):
    """``root/<class name>/<image>`` folders (ImageNet style); class indices follow the sorted folder names.

    `classes` fixes the class list (and order), e.g. so that train and val agree; images of other folders are
    then an error. `verify` decodes every image up front ('auto': when there are at most 20000).
    """

    def __init__(
            self,
            root: str,
            img_size: int = 224,
            train: bool = False,
            transform: Optional[dict] = None,
            classes: Optional[Sequence[str]] = None,
            verify: Union[bool, str] = 'auto',
    ):
        where = f'ImageFolderDataset(root={root!r})'
        super().__init__(img_size, train, transform, where + '.transform')
        from timm.data.readers.reader_image_folder import find_images_and_targets
        if not root or not os.path.isdir(root):
            raise DatasetError(f'{where}: root: directory {root!r} does not exist')
        stray = [f for f in sorted(os.listdir(root)) if os.path.isfile(os.path.join(root, f))
                 and os.path.splitext(f)[1].lower() in ('.png', '.jpg', '.jpeg')]
        if stray:
            raise DatasetError(f'{where}: image {stray[0]!r} sits directly in root; put images in one '
                               f'sub-folder per class (root/<class>/<image>)')
        class_to_idx = None if classes is None else {c: i for i, c in enumerate(classes)}
        samples, class_to_idx = find_images_and_targets(root, class_to_idx=class_to_idx)
        if classes is not None:
            found = {os.path.basename(os.path.dirname(p)) for p, _ in find_images_and_targets(root)[0]}
            extra = sorted(found - set(classes))
            if extra:
                raise DatasetError(f'{where}: folder {extra[0]!r} is not in the configured classes {list(classes)}')
        if not samples:
            raise DatasetError(f'{where}: no images (.png/.jpg/.jpeg) found in class sub-folders of {root!r}')
        self.classes = tuple(sorted(class_to_idx, key=class_to_idx.get))
        self.samples = samples
        self._where = where
        if _should_verify(verify, len(samples)):
            _verify_images([p for p, _ in samples], where)

    def _load(self, index: int) -> Image.Image:
        return _open_rgb(self.samples[index][0], self._where)


@DATASETS.register_module()
class CocoDetDataset(Dataset):
    """COCO-format detection annotations (`ann_file`) over the images in `img_dir`.

    Everything that can be checked is checked at construction, naming the file and entry: JSON syntax,
    required fields, annotations whose image or category does not exist, boxes outside their image, missing image
    files and (with `verify`) undecodable images. Category ids map to labels 1..K in sorted id order
    (0 is background for torchvision heads). Crowd and zero-area boxes are not training targets.
    """

    def __init__(
            self,
            ann_file: str,
            img_dir: str,
            train: bool = False,
            hflip_prob: float = 0.5,
            verify: Union[bool, str] = 'auto',
    ):
        self.where = where = f'CocoDetDataset(ann_file={ann_file!r})'
        if not ann_file or not os.path.isfile(ann_file):
            raise DatasetError(f'{where}: ann_file: file {ann_file!r} does not exist')
        if not img_dir or not os.path.isdir(img_dir):
            raise DatasetError(f'{where}: img_dir: directory {img_dir!r} does not exist')
        if not 0.0 <= hflip_prob <= 1.0:
            raise DatasetError(f'{where}: hflip_prob: expected a probability in [0, 1], got {hflip_prob}')
        self.ann_file, self.img_dir = os.path.abspath(ann_file), img_dir
        self.train, self.hflip_prob = train, hflip_prob
        try:
            with open(ann_file) as f:
                coco = json.load(f)
        except json.JSONDecodeError as e:
            raise DatasetError(f'{where}: not valid JSON: {e}') from None
        for key in ('images', 'annotations', 'categories'):
            if not isinstance(coco.get(key), list):
                raise DatasetError(f"{where}: expected a list under {key!r}, got {type(coco.get(key)).__name__}")
        if not coco['categories']:
            raise DatasetError(f"{where}: 'categories' is empty")

        cats = {}
        for i, c in enumerate(coco['categories']):
            if 'id' not in c or 'name' not in c:
                raise DatasetError(f"{where}: categories[{i}] needs 'id' and 'name', got {c}")
            cats[c['id']] = c['name']
        self.cat_ids = tuple(sorted(cats))
        self.classes = tuple(cats[c] for c in self.cat_ids)
        cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}

        self.images: List[dict] = []
        index_of: Dict[Any, int] = {}
        for i, img in enumerate(coco['images']):
            if 'id' not in img or 'file_name' not in img:
                raise DatasetError(f"{where}: images[{i}] needs 'id' and 'file_name', got {img}")
            if img['id'] in index_of:
                raise DatasetError(f"{where}: images[{i}] repeats image id {img['id']}")
            index_of[img['id']] = len(self.images)
            self.images.append(dict(id=img['id'], path=os.path.join(img_dir, img['file_name']),
                                    width=img.get('width'), height=img.get('height'), boxes=[], labels=[]))

        for i, ann in enumerate(coco['annotations']):
            entry = f"annotations[{i}] (id={ann.get('id')})"
            if ann.get('image_id') not in index_of:
                raise DatasetError(f"{where}: {entry} references image_id {ann.get('image_id')!r}, "
                                   f"which is not in 'images'")
            if ann.get('category_id') not in cat_to_label:
                raise DatasetError(f"{where}: {entry} references category_id {ann.get('category_id')!r}, "
                                   f"which is not in 'categories' {list(self.cat_ids)}")
            bbox = ann.get('bbox')
            if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4):
                raise DatasetError(f'{where}: {entry} bbox: expected [x, y, width, height], got {bbox!r}')
            x, y, w, h = (float(v) for v in bbox)
            if w < 0 or h < 0:
                raise DatasetError(f'{where}: {entry} bbox {bbox} has a negative width or height')
            img = self.images[index_of[ann['image_id']]]
            if img['width'] is not None and img['height'] is not None:
                tol = 1.0
                if x < -tol or y < -tol or x + w > img['width'] + tol or y + h > img['height'] + tol:
                    raise DatasetError(f"{where}: {entry} bbox {bbox} lies outside its image "
                                       f"{img['path']!r} ({img['width']}x{img['height']})")
            if ann.get('iscrowd', 0) or w < 1 or h < 1:
                continue
            img['boxes'].append([x, y, x + w, y + h])
            img['labels'].append(cat_to_label[ann['category_id']])

        missing = [img['path'] for img in self.images if not os.path.isfile(img['path'])]
        if missing:
            raise DatasetError(f'{where}: {len(missing)} image file(s) listed in the annotations do not exist, '
                               f'first: {missing[0]!r}')
        if _should_verify(verify, len(self.images)):
            _verify_images([img['path'] for img in self.images], where)

    @property
    def metainfo(self) -> dict:
        return dict(classes=self.classes, cat_ids=self.cat_ids, ann_file=self.ann_file, task='detection')

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        info = self.images[index]
        img = _open_rgb(info['path'], self.where)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        h, w = x.shape[-2:]
        boxes = torch.tensor(info['boxes'], dtype=torch.float32).reshape(-1, 4)
        if len(boxes):
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        if self.train and self.hflip_prob > 0 and random.random() < self.hflip_prob:
            x = x.flip(-1)
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
        target = dict(boxes=boxes, labels=torch.tensor(info['labels'], dtype=torch.int64),
                      image_id=info['id'], orig_size=(int(h), int(w)))
        return dict(inputs=x, data_samples=target)


@DATASETS.register_module()
class ShapesCocoDataset(CocoDetDataset):
    """The generated shapes set (see train/shapes.py) as a CocoDetDataset; generated on first use under `root`."""

    def __init__(
            self,
            root: str = 'data/shapes',
            split: str = 'train',
            num_images: int = 256,
            seed: int = 0,
            min_size: int = 96,
            max_size: int = 160,
            max_objects: int = 4,
            train: bool = False,
            hflip_prob: float = 0.5,
    ):
        from .shapes import make_shapes_coco
        kwargs = dict(split=split, num_images=num_images, seed=seed, min_size=min_size, max_size=max_size,
                      max_objects=max_objects)
        if get_rank() == 0:  # one process writes, the others wait and then reuse the files
            paths = make_shapes_coco(root, **kwargs)
            barrier()
        else:
            barrier()
            paths = make_shapes_coco(root, **kwargs)
        super().__init__(paths['ann_file'], paths['img_dir'], train=train, hflip_prob=hflip_prob, verify=False)


def sample_photos() -> Dict[str, Image.Image]:
    """scikit-learn's two real photographs (china.jpg, flower.jpg, 640x427) as PIL images."""
    from sklearn.datasets import load_sample_images
    return {name: Image.fromarray(a) for name, a in zip(('china', 'flower'), load_sample_images().images)}


def make_photo_folder(root: str, n_train: int = 160, n_val: int = 24, seed: int = 0) -> Tuple[str, str]:
    """ImageNet-style folders <root>/{train,val}/{china,flower}/*.jpg: random crops (96..400 px) of the two
    photographs scikit-learn ships, resized to 48..96 px and saved as JPEG (no download). Returns the train and val
    roots. The same arguments give the same files."""
    rng = random.Random(seed)
    photos = sample_photos()
    for split, n in (('train', n_train), ('val', n_val)):
        for name, photo in photos.items():
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            w, h = photo.size
            for i in range(n):
                side = rng.randint(96, min(400, h))
                x, y = rng.randint(0, w - side), rng.randint(0, h - side)
                out = rng.randint(48, 96)
                crop = photo.crop((x, y, x + side, y + side)).resize((out, out), Image.BICUBIC)
                crop.save(os.path.join(folder, f'{i:04d}.jpg'), quality=90)
    return os.path.join(root, 'train'), os.path.join(root, 'val')


@FUNCTIONS.register_module()
def det_collate(batch: Sequence[dict]) -> dict:
    """Detection batches stay lists: images differ in size and targets in box count."""
    return dict(inputs=[b['inputs'] for b in batch], data_samples=[b['data_samples'] for b in batch])


@FUNCTIONS.register_module()
def seed_worker(worker_id: int) -> None:
    """Seed numpy / random in a DataLoader worker from torch's per-worker seed.

    torch draws that seed from the main process generator each epoch, which the recipe re-seeds at every epoch
    start, so augmentations differ between epochs and a resumed run replays exactly the same ones.
    """
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


def log(msg: str, level: int = logging.INFO) -> None:
    print_log(msg, logger='current', level=level)
