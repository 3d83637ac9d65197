# The recipe `zoo compare` trains every mixer plan with (train/compare.py): a hybrid backbone on scikit-learn's
# digits at 32 px; compare swaps in the plan (model.model_kwargs.mixers), the data, size, epochs and seed.
_base_ = ['../_base_/models/classifier.py', '../_base_/datasets/digits.py', '../_base_/schedules/adamw_cosine.py',
          '../_base_/default_runtime.py']
model = dict(model_name='hybrid_tiny', num_classes=10, model_kwargs=dict(mixers='cbam/window/neighborhood/grid'))
optim_wrapper = dict(optimizer=dict(lr=2e-3, weight_decay=0.05))
lr_schedule = dict(warmup_epochs=1)
train_cfg = dict(max_epochs=4)
default_hooks = dict(logger=dict(type='LoggerHook', interval=50))
