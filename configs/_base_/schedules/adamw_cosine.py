# timm's optimizer (create_optimizer_v2) and scheduler (create_scheduler_v2: warmup + cosine, per update).
optim_wrapper = dict(
    type='ZooOptimWrapper',
    constructor='TimmOptimWrapperConstructor',
    optimizer=dict(opt='adamw', lr=1e-3, weight_decay=0.05, layer_decay=None),
    # clip_grad=dict(max_norm=1.0),  # gradient clipping (off when absent)
    accumulative_counts=1,     # gradient accumulation
)
lr_schedule = dict(sched='cosine', warmup_epochs=1, warmup_lr=1e-5, min_lr=1e-5)
param_scheduler = None
train_cfg = dict(by_epoch=True, max_epochs=10, val_interval=1)
val_cfg = dict()
