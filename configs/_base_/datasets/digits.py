# scikit-learn's 1797 real 8x8 handwritten digits (no download), upsampled; fixed stratified 1438 / 359 split.
_aug = dict(scale=(0.7, 1.0), ratio=(0.85, 1.15), hflip=0.0, color_jitter=0.2, auto_augment='rand-m5-n2-mstd0.5',
            re_prob=0.1, re_mode='pixel', interpolation='bicubic')
train_dataloader = dict(
    batch_size=64, num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=True),
    collate_fn=dict(type='default_collate'),
    worker_init_fn=dict(type='seed_worker'),
    dataset=dict(type='DigitsDataset', split='train', img_size=32, train=True, transform=_aug))
val_dataloader = dict(
    batch_size=120, num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='default_collate'),
    dataset=dict(type='DigitsDataset', split='val', img_size=32, train=False))
val_evaluator = dict(type='TopKAccuracy', topk=(1, 5))
