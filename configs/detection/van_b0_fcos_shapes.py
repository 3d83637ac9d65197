# FCOS + FPN over VAN-B0 on the generated shapes set (zoo train configs/detection/van_b0_fcos_shapes.py):
# 200 training images of 96-160 px, 8 epochs (200 iterations of 8 images), evaluated on 50 images.
# The backbone features are the stage outputs after each stage's LayerNorm (norm1..norm4 of the official code),
# as in the official VAN detection backbones. To fine-tune from the official ImageNet-1k weights, set
# model.pretrained=True (downloads the official release file) or a local copy of it (van_tiny_754.pth.tar).
_base_ = ['../_base_/models/fcos.py', '../_base_/datasets/shapes.py', '../_base_/schedules/adamw_cosine.py',
          '../_base_/default_runtime.py']
model = dict(backbone='van_b0', num_classes=3, fpn_channels=64, min_size=128, max_size=160,
             backbone_kwargs=dict(drop_path_rate=0.1))
train_dataloader = dict(dataset=dict(num_images=200))
val_dataloader = dict(dataset=dict(num_images=50))
optim_wrapper = dict(optimizer=dict(lr=1e-3, weight_decay=0.05), clip_grad=dict(max_norm=10.0))
lr_schedule = dict(warmup_epochs=1)
train_cfg = dict(max_epochs=8, val_interval=4)
