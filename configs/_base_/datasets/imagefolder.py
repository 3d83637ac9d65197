# ImageNet-style folders: <root>/train/<class>/<image> and <root>/val/<class>/<image>.
_aug = dict(scale=(0.08, 1.0), hflip=0.5, color_jitter=0.4, auto_augment='rand-m9-mstd0.5-inc1',
            re_prob=0.25, re_mode='pixel', interpolation='bicubic')
train_dataloader = dict(
    batch_size=64, num_workers=4, persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    collate_fn=dict(type='default_collate'),
    worker_init_fn=dict(type='seed_worker'),
    dataset=dict(type='ImageFolderDataset', root='data/imagefolder/train', img_size=224, train=True, transform=_aug))
val_dataloader = dict(
    batch_size=64, num_workers=4, persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='default_collate'),
    dataset=dict(type='ImageFolderDataset', root='data/imagefolder/val', img_size=224, train=False,
                 transform=dict(crop_pct=0.875, interpolation='bicubic')))
val_evaluator = dict(type='TopKAccuracy', topk=(1, 5))
