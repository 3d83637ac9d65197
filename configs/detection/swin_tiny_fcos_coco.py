# FCOS + FPN over Swin-T on COCO-format data (data/coco/annotations/instances_{train,val}2017.json), multi-scale
# training. For a pretrained backbone set model.pretrained to a classification weight file (.safetensors / .pth).
_base_ = ['../_base_/models/fcos.py', '../_base_/datasets/coco.py', '../_base_/schedules/adamw_cosine.py',
          '../_base_/default_runtime.py']
model = dict(backbone='swin_tiny', num_classes=80, fpn_channels=256, min_size=(480, 512, 544, 576, 608, 640),
             max_size=1024, backbone_kwargs=dict(drop_path_rate=0.2))
optim_wrapper = dict(optimizer=dict(lr=1e-4, weight_decay=0.05), clip_grad=dict(max_norm=35.0))
lr_schedule = dict(warmup_epochs=1, warmup_lr=1e-6, min_lr=1e-6)
train_cfg = dict(max_epochs=12, val_interval=1)
