# Runtime shared by every config: hooks, logging, checkpoints, seeds. Recipe keys (amp, model_ema, wandb,
# plot_curves, lr_schedule) are documented in train/runner.py.
default_scope = 'mmengine'
default_hooks = dict(
    runtime_info=dict(type='RuntimeInfoHook'),
    timer=dict(type='IterTimerHook'),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    logger=dict(type='LoggerHook', interval=10),  # a line every 10 iterations: lr, eta, time, loss
    progress=dict(type='ProgressHook'),  # a bar on a terminal, else a plain line every 20 s (zoo.progress)
    param_scheduler=dict(type='ParamSchedulerHook'),
    # atomic files every epoch, the newest 2 kept; best.pth: the best validated weights ('auto': first metric)
    checkpoint=dict(type='ZooCheckpointHook', interval=1, max_keep_ckpts=2, save_best='auto'),
)
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='nccl'))
log_processor = dict(by_epoch=True, window_size=10)
visualizer = dict(type='Visualizer', vis_backends=[dict(type='LocalVisBackend')])
log_level = 'INFO'
randomness = dict(seed=0, deterministic=False)
load_from = None
resume = False
amp = 'auto'          # mixed precision where the device supports it (CUDA); float32 on CPU
# model_ema = dict(decay=0.999, use_warmup=True)  # timm's ModelEmaV3 (off when absent)
# wandb = dict(project='zoo', mode='offline')      # wandb logging (off when absent)
plot_curves = True    # work_dir/curves.png at the end of training
sync_bn = None        # 'torch' converts BatchNorm to SyncBatchNorm under DDP (GPU only)
