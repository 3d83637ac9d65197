# COCO-format annotations: data/coco/annotations/instances_{train,val}2017.json, images in data/coco/{train,val}2017.
train_dataloader = dict(
    batch_size=8, num_workers=4, persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    collate_fn=dict(type='det_collate'),
    worker_init_fn=dict(type='seed_worker'),
    dataset=dict(type='CocoDetDataset', ann_file='data/coco/annotations/instances_train2017.json',
                 img_dir='data/coco/train2017', train=True))
val_dataloader = dict(
    batch_size=8, num_workers=4, persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='det_collate'),
    dataset=dict(type='CocoDetDataset', ann_file='data/coco/annotations/instances_val2017.json',
                 img_dir='data/coco/val2017', train=False))
val_evaluator = dict(type='CocoMetric', backend='faster_coco_eval')
