"""Fine-tuning on real photographs through the shipped ImageFolder config (configs/classification/
swin_tiny_imagefolder.py): the recipe's RandAugment must survive every magnitude it can sample, including the
posterize levels that keep 0 bits (which Pillow >= 11 rejects)."""
import os
import random

import numpy as np
import pytest
import torch

import zoo
from zoo.train import load_config, run_train
from zoo.train import data as data_mod
from zoo.train.runner import read_checkpoint

SWIN_CONFIG = os.path.join('classification', 'swin_tiny_imagefolder.py')
IMG = 64


def _photos():
    return data_mod.sample_photos()


make_photo_folder = data_mod.make_photo_folder


def _opts(train_root, val_root, *extra):
    """Overrides that shrink the shipped config (data paths, 2 classes, a narrow Swin-T, 64 px, one epoch)
    and keep everything else as shipped (RandAugment rand-m9-mstd0.5-inc1, Mixup/CutMix, random erasing, EMA,
    layer decay, warmup + cosine)."""
    return [
        f'train_dataloader.dataset.root={train_root}', f'val_dataloader.dataset.root={val_root}',
        'model.num_classes=2', f'model.model_kwargs={zoo.reduced_args("swin_tiny")!r}',
        f'train_dataloader.dataset.img_size={IMG}', f'val_dataloader.dataset.img_size={IMG}',
        'train_dataloader.batch_size=32', 'val_dataloader.batch_size=48',
        'train_dataloader.num_workers=0', 'train_dataloader.persistent_workers=False',
        'val_dataloader.num_workers=0', 'val_dataloader.persistent_workers=False',
        'train_cfg.max_epochs=1', 'plot_curves=False', *extra]


def test_recipe_randaugment_posterize_zero_bits_on_a_photo(recipe):
    """The shipped augmentation's posterize op at magnitude 10 keeps 0 bits: an all-black image, no error."""
    cfg = load_config(os.path.join(recipe.configs, SWIN_CONFIG))
    aug = dict(cfg.train_dataloader.dataset.transform)
    assert aug['auto_augment'] == 'rand-m9-mstd0.5-inc1'
    transform = data_mod.build_cls_transform(IMG, True, aug, 'test')
    rand_aug = next(t for t in transform.transforms if type(t).__name__ == 'RandAugment')
    op = next(o for o in rand_aug.ops if o.name == 'PosterizeIncreasing')
    op.magnitude, op.magnitude_std, op.prob = 10, 0, 1.0  # the level mstd0.5 reaches about 2% of the time
    photo = _photos()['flower']
    out = op(photo)
    assert out.size == photo.size and np.asarray(out).max() == 0
    # the 1..4-bit levels still posterize as Pillow does
    for magnitude, bits in ((0, 4), (5, 2), (9, 1)):
        op.magnitude = magnitude
        levels = np.unique(np.asarray(op(photo)))
        assert len(levels) <= 2 ** bits and len(levels) > 1


@pytest.mark.parametrize('policy', ['rand-m10-n15-mstd0-inc1-p1.0', 'rand-m1-n15-mstd0-p1.0', 'v0',
                                    'augmix-m10-mstd0'])
def test_every_timm_policy_with_zero_bit_posterize_runs_on_photos(policy, tmp_path, monkeypatch):
    """Whole transforms (crop, flip, RandAugment/AutoAugment/AugMix, erasing) over real photo crops, with
    policies whose posterize keeps 0 bits; the dataset builds them exactly as training does."""
    bits = []

    def counting_posterize(img, bits_to_keep, **kw):
        bits.append(int(bits_to_keep))
        return original(img, bits_to_keep, **kw)

    original = data_mod.posterize_bits
    monkeypatch.setattr(data_mod, 'posterize_bits', counting_posterize)
    train_root, _ = make_photo_folder(str(tmp_path), n_train=4, n_val=0)
    ds = data_mod.ImageFolderDataset(train_root, img_size=IMG, train=True,
                                     transform=dict(auto_augment=policy, re_prob=0.25))
    random.seed(0)
    np.random.seed(0)
    for i in range(400):
        item = ds[i % len(ds)]
        assert item['inputs'].shape == (3, IMG, IMG) and torch.isfinite(item['inputs']).all()
        if 0 in bits:
            break
    assert 0 in bits, f'{policy}: no 0-bit posterize in {i + 1} images'


def test_finetune_swin_imagefolder_config_on_photos(recipe, tmp_path, monkeypatch, capsys):
    """320 photo crops, one epoch through the shipped config: from scratch, then from a weight file in timm's layout
    (model.pretrained, 1000-class file -> new 2-class head) with RandAugment's 0-bit posterize forced."""
    train_root, val_root = make_photo_folder(str(tmp_path / 'photos'))
    config = os.path.join(recipe.configs, SWIN_CONFIG)
    calls = []

    def counting_posterize(img, bits_to_keep, **kw):
        calls.append(int(bits_to_keep))
        return original(img, bits_to_keep, **kw)

    original = data_mod.posterize_bits
    monkeypatch.setattr(data_mod, 'posterize_bits', counting_posterize)

    # from scratch, augmentation exactly as shipped
    scratch = run_train(load_config(config, _opts(train_root, val_root)), work_dir=str(tmp_path / 'scratch'))
    assert calls, 'RandAugment never chose posterize in 320 images'
    assert [e['epoch'] for e in scratch['history']['epochs']] == [1]
    assert 0.0 <= scratch['metrics']['accuracy/top1'] <= 100.0
    assert len(scratch['history']['iters']) == 10  # 320 images / 32

    # a "downloaded" weight file: timm's own Swin-T (the layout of timm/swin_tiny_patch4_window7_224.ms_in1k's
    # model.safetensors on the Hub), narrowed like the model, with its 1000-class ImageNet head
    import timm
    from safetensors.torch import save_file
    source = timm.create_model('swin_tiny_patch4_window7_224', **zoo.reduced_args('swin_tiny'))
    weights = str(tmp_path / 'model.safetensors')
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, weights)
    calls.clear()
    # magnitude 10 (std 0.5): about half of the posterize calls keep 0 bits
    tuned = run_train(load_config(config, _opts(
        train_root, val_root, f'model.pretrained={weights}',
        'train_dataloader.dataset.transform.auto_augment=rand-m10-mstd0.5-inc1')), work_dir=str(tmp_path / 'tuned'))
    assert 0 in calls, f'no 0-bit posterize in {len(calls)} posterize calls'
    assert len(tuned['history']['iters']) == 10

    # the fine-tuned backbone starts from the file (and moves little in 10 warm-up steps), the scratch one does not
    src = source.state_dict()

    def cosine(state, key):  # our stem is timm's patch_embed.proj
        a, b = state[key].flatten().float(), src['patch_embed.proj.weight'].flatten().float()
        return float(torch.nn.functional.cosine_similarity(a, b, dim=0))

    key = 'stem.conv.weight'
    tuned_sd = {k[len('model.'):]: v for k, v in read_checkpoint(tuned['checkpoint'])['state_dict'].items()}
    scratch_sd = {k[len('model.'):]: v for k, v in read_checkpoint(scratch['checkpoint'])['state_dict'].items()}
    assert key in tuned_sd
    assert cosine(tuned_sd, key) > 0.99 and abs(cosine(scratch_sd, key)) < 0.5
    assert tuned_sd['head.fc.weight'].shape[0] == 2

    # the README's `zoo eval CONFIG work_dir/best.pth --opts val_dataloader.dataset.root=... model.num_classes=...`
    from zoo.train.cli import main as cli_main
    capsys.readouterr()
    assert cli_main(['eval', config, os.path.join(tuned['work_dir'], 'best.pth'), '--work-dir',
                     str(tmp_path / 'eval'), '--opts', f'val_dataloader.dataset.root={val_root}', 'model.num_classes=2',
                     f'model.model_kwargs={zoo.reduced_args("swin_tiny")!r}', f'val_dataloader.dataset.img_size={IMG}',
                     'val_dataloader.num_workers=0', 'val_dataloader.persistent_workers=False']) == 0
    printed = capsys.readouterr().out
    assert 'final metrics: {"accuracy/top1"' in printed


def test_finetune_detector_config_on_coco_format_data(recipe, tmp_path, capsys):
    """The README's COCO-format command: configs/detection/swin_tiny_fcos_coco.py on your own annotations + image
    folder, the backbone from a classification weight file in timm's layout, one epoch, then `zoo eval` of best.pth."""
    import timm
    from safetensors.torch import save_file
    from zoo.train.cli import main as cli_main
    from zoo.train.shapes import make_shapes_coco
    train = make_shapes_coco(str(tmp_path / 'mydata'), 'train', 16, min_size=80, max_size=112)
    val = make_shapes_coco(str(tmp_path / 'mydata'), 'val', 4, min_size=80, max_size=112)
    source = timm.create_model('swin_tiny_patch4_window7_224', **zoo.reduced_args('swin_tiny'))
    weights = str(tmp_path / 'model.safetensors')
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, weights)
    config = os.path.join(recipe.configs, 'detection', 'swin_tiny_fcos_coco.py')
    data = [f"train_dataloader.dataset.ann_file={train['ann_file']}",
            f"train_dataloader.dataset.img_dir={train['img_dir']}",
            f"val_dataloader.dataset.ann_file={val['ann_file']}", f"val_dataloader.dataset.img_dir={val['img_dir']}",
            'model.num_classes=3']
    small = [f'model.backbone_kwargs={zoo.reduced_args("swin_tiny")!r}', 'model.fpn_channels=64',
             'model.min_size=96', 'model.max_size=128', 'train_dataloader.batch_size=4', 'val_dataloader.batch_size=4',
             'train_dataloader.num_workers=0', 'train_dataloader.persistent_workers=False',
             'val_dataloader.num_workers=0', 'val_dataloader.persistent_workers=False', 'plot_curves=False']
    work = str(tmp_path / 'work')
    assert cli_main(['train', config, '--work-dir', work, '--opts', *data, f'model.pretrained={weights}',
                     'train_cfg.max_epochs=1', *small]) == 0
    out = capsys.readouterr().out
    assert 'final metrics: {"coco/AP"' in out and os.path.isfile(os.path.join(work, 'best.pth'))
    best = read_checkpoint(os.path.join(work, 'best.pth'))
    assert best['meta']['best_metric'] == 'coco/AP'
    stem = best['state_dict']['detector.backbone.body.model.stem.conv.weight']
    assert torch.nn.functional.cosine_similarity(stem.flatten(), source.patch_embed.proj.weight.flatten(), dim=0) > 0.99
    val_only = [d for d in data if not d.startswith('train_dataloader')]  # as in the README: eval needs val only
    assert cli_main(['eval', config, os.path.join(work, 'best.pth'), '--work-dir', str(tmp_path / 'eval'),
                     '--opts', *val_only, *small]) == 0
    assert 'final metrics: {"coco/AP"' in capsys.readouterr().out
