# Generated COCO-format detection set (no download): coloured rectangles / ellipses / triangles on textured
# backgrounds, images of 96..160 px, fixed seed. Written once under data/shapes.
train_dataloader = dict(
    batch_size=8, num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=True),
    collate_fn=dict(type='det_collate'),
    worker_init_fn=dict(type='seed_worker'),
    dataset=dict(type='ShapesCocoDataset', root='data/shapes', split='train', num_images=400, train=True))
val_dataloader = dict(
    batch_size=8, num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='det_collate'),
    dataset=dict(type='ShapesCocoDataset', root='data/shapes', split='val', num_images=64, train=False))
val_evaluator = dict(type='CocoMetric', backend='faster_coco_eval')
