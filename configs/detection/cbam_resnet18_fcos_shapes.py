# FCOS + FPN over CBAM-ResNet-18 on the generated shapes set (python -m zoo.train.demo --task detection):
# 200 training images of 96-160 px, 8 epochs (200 iterations of 8 images), evaluated on 50 images.
_base_ = ['../_base_/models/fcos.py', '../_base_/datasets/shapes.py', '../_base_/schedules/adamw_cosine.py',
          '../_base_/default_runtime.py']
model = dict(backbone='cbam_resnet18', num_classes=3, fpn_channels=64, min_size=128, max_size=160)
train_dataloader = dict(dataset=dict(num_images=200))
val_dataloader = dict(dataset=dict(num_images=50))
optim_wrapper = dict(optimizer=dict(lr=2e-3, weight_decay=0.05), clip_grad=dict(max_norm=10.0))
lr_schedule = dict(warmup_epochs=1)
train_cfg = dict(max_epochs=8, val_interval=4)
