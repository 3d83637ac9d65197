"""Datasets: the embedded digits split, the generated shapes set, and clear errors for bad data."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import zoo.train  # noqa: F401
from zoo.train import ConfigError, DatasetError
from zoo.train.data import CocoDetDataset, DigitsDataset, ImageFolderDataset, det_collate
from zoo.train.shapes import CLASSES, make_shapes_coco


def test_digits_split_is_fixed_stratified_and_disjoint():
    tr, va = DigitsDataset('train', img_size=24), DigitsDataset('val', img_size=24)
    assert len(tr) + len(va) == 1797
    tr_idx, va_idx = {i for i, _ in tr.samples}, {i for i, _ in va.samples}
    assert not tr_idx & va_idx
    counts = np.bincount([c for _, c in va.samples], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # ~20% of every class
    assert [i for i, _ in DigitsDataset('val').samples] == [i for i, _ in va.samples]
    item = va[0]
    assert item['inputs'].shape == (3, 24, 24) and item['inputs'].dtype == torch.float32
    assert item['labels'] == va.samples[0][1]
    assert va.metainfo['classes'] == tuple('0123456789')


def test_digits_are_the_real_sklearn_images():
    from sklearn.datasets import load_digits
    digits = load_digits()
    va = DigitsDataset('val', img_size=8, transform=dict(mean=(0, 0, 0), std=(1, 1, 1)))
    i, label = va.samples[3]
    x = va[3]['inputs'][0].numpy()
    assert label == digits.target[i]
    np.testing.assert_allclose(x * 16, digits.images[i], atol=16 / 255 + 1e-6)


def test_shapes_generator_is_deterministic(tmp_path):
    a = make_shapes_coco(str(tmp_path / 'a'), 'val', 5, seed=3)
    b = make_shapes_coco(str(tmp_path / 'b'), 'val', 5, seed=3)
    ja, jb = (json.load(open(p['ann_file'])) for p in (a, b))
    assert ja['annotations'] == jb['annotations'] and [c['name'] for c in ja['categories']] == list(CLASSES)
    img_a = np.asarray(Image.open(os.path.join(a['img_dir'], ja['images'][0]['file_name'])))
    img_b = np.asarray(Image.open(os.path.join(b['img_dir'], jb['images'][0]['file_name'])))
    assert np.array_equal(img_a, img_b)
    sizes = {(im['height'], im['width']) for im in ja['images']}
    assert len(sizes) > 1  # images of different sizes
    train_split = json.load(open(make_shapes_coco(str(tmp_path / 'a'), 'train', 5, seed=3)['ann_file']))
    assert train_split['annotations'] != ja['annotations']


def test_coco_dataset_targets_and_batches_of_different_sizes(tmp_path):
    paths = make_shapes_coco(str(tmp_path), 'val', 4, seed=0, min_size=64, max_size=96)
    ds = CocoDetDataset(paths['ann_file'], paths['img_dir'])
    coco = json.load(open(paths['ann_file']))
    first = [a for a in coco['annotations'] if a['image_id'] == coco['images'][0]['id']]
    item = ds[0]
    x0, y0, w, h = first[0]['bbox']
    assert torch.allclose(item['data_samples']['boxes'][0], torch.tensor([x0, y0, x0 + w, y0 + h]))
    assert item['data_samples']['labels'][0] == first[0]['category_id']  # ids 1..3 map to labels 1..3
    batch = det_collate([ds[i] for i in range(4)])
    assert len({tuple(x.shape) for x in batch['inputs']}) > 1
    # horizontal flip moves boxes with the image
    flip = CocoDetDataset(paths['ann_file'], paths['img_dir'], train=True, hflip_prob=1.0)[0]
    W = item['inputs'].shape[-1]
    assert torch.equal(flip['inputs'], item['inputs'].flip(-1))
    b, fb = item['data_samples']['boxes'][0], flip['data_samples']['boxes'][0]
    assert torch.allclose(fb, torch.tensor([W - b[2], b[1], W - b[0], b[3]]))


def _coco(tmp_path, edit):
    paths = make_shapes_coco(str(tmp_path / 'shapes'), 'val', 3, seed=0, min_size=48, max_size=64)
    coco = json.load(open(paths['ann_file']))
    edit(coco, paths['img_dir'])
    ann = tmp_path / 'edited.json'
    ann.write_text(json.dumps(coco))
    return str(ann), paths['img_dir']


def test_coco_errors_name_the_file_and_entry(tmp_path):
    with pytest.raises(DatasetError, match="ann_file: file .*nope.json' does not exist"):
        CocoDetDataset(str(tmp_path / 'nope.json'), str(tmp_path))

    def bad_image_ref(coco, _):
        coco['annotations'][1]['image_id'] = 999
    ann, img_dir = _coco(tmp_path, bad_image_ref)
    with pytest.raises(DatasetError, match=r"edited.json.*annotations\[1\] \(id=2\) references image_id 999"):
        CocoDetDataset(ann, img_dir)

    def bad_category(coco, _):
        coco['annotations'][0]['category_id'] = 7
    ann, img_dir = _coco(tmp_path, bad_category)
    with pytest.raises(DatasetError, match=r"annotations\[0\].*category_id 7"):
        CocoDetDataset(ann, img_dir)

    def outside(coco, _):
        coco['annotations'][0]['bbox'] = [40.0, 40.0, 500.0, 10.0]
    ann, img_dir = _coco(tmp_path, outside)
    with pytest.raises(DatasetError, match=r"annotations\[0\].*lies outside its image"):
        CocoDetDataset(ann, img_dir)

    def missing_file(coco, img_dir):
        os.remove(os.path.join(img_dir, coco['images'][2]['file_name']))
    ann, img_dir = _coco(tmp_path, missing_file)
    with pytest.raises(DatasetError, match=r"1 image file\(s\) .* do not exist, first: .*val_00002.png"):
        CocoDetDataset(ann, img_dir)

    (tmp_path / 'broken.json').write_text('{"images": [')
    with pytest.raises(DatasetError, match='broken.json.*not valid JSON'):
        CocoDetDataset(str(tmp_path / 'broken.json'), str(tmp_path))


def test_undecodable_image_is_reported_up_front(tmp_path):
    def corrupt(coco, img_dir):
        with open(os.path.join(img_dir, coco['images'][1]['file_name']), 'wb') as f:
            f.write(b'\x89PNG\r\n\x1a\n' + b'garbage' * 10)
    ann, img_dir = _coco(tmp_path, corrupt)
    with pytest.raises(DatasetError, match=r'cannot decode image .*val_00001.png'):
        CocoDetDataset(ann, img_dir)
    # without the up-front check, loading that sample raises the same clear error
    ds = CocoDetDataset(ann, img_dir, verify=False)
    with pytest.raises(DatasetError, match=r'cannot decode image .*val_00001.png'):
        ds[1]


def _folder(root, classes=('cat', 'dog'), n=3):
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(os.path.join(root, c, f'{i}.png'))


def test_image_folder(tmp_path):
    root = str(tmp_path / 'train')
    _folder(root)
    ds = ImageFolderDataset(root, img_size=16, train=True, transform=dict(hflip=0.5))
    assert len(ds) == 6 and ds.metainfo['classes'] == ('cat', 'dog')
    assert ds[5]['inputs'].shape == (3, 16, 16) and ds[5]['labels'] == 1

    with pytest.raises(DatasetError, match=r"root: directory .*missing' does not exist"):
        ImageFolderDataset(str(tmp_path / 'missing'))
    with pytest.raises(DatasetError, match=r"folder 'dog' is not in the configured classes"):
        ImageFolderDataset(root, classes=['cat'])
    with open(os.path.join(root, 'dog', '1.png'), 'wb') as f:
        f.write(b'not an image')
    with pytest.raises(DatasetError, match=r"cannot decode image .*dog/1.png"):
        ImageFolderDataset(root)
    with pytest.raises(ConfigError, match=r"transform.scal: unknown key .*did you mean 'scale'"):
        ImageFolderDataset(root, verify=False, transform=dict(scal=(0.5, 1.0)))
