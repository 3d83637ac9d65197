# The embedded default (python -m zoo.train.demo): CBAM-ResNet-18 on scikit-learn's digits at 32 px, CPU-friendly.
_base_ = ['../_base_/models/classifier.py', '../_base_/datasets/digits.py', '../_base_/schedules/adamw_cosine.py',
          '../_base_/default_runtime.py']
model = dict(model_name='cbam_resnet18', num_classes=10)
optim_wrapper = dict(optimizer=dict(lr=2e-3, weight_decay=0.05))
lr_schedule = dict(warmup_epochs=1)
train_cfg = dict(max_epochs=6)
