# FCOS + FPN over BiFormer-T on the generated shapes set (zoo train configs/detection/biformer_tiny_fcos_shapes.py):
# 200 training images of 96-160 px, 8 epochs (200 iterations of 8 images), evaluated on 50 images.
# The backbone's routed stages split their maps into n_win x n_win = 7 x 7 regions (padded at the bottom / right
# to a multiple of 7, as the official detection code's auto_pad); the official COCO configs use n_win=16 for
# 800-1333 px images: set backbone_kwargs=dict(n_win=16) at that scale (n_win has no weights, so ImageNet
# weights load either way).
_base_ = ['../_base_/models/fcos.py', '../_base_/datasets/shapes.py', '../_base_/schedules/adamw_cosine.py',
          '../_base_/default_runtime.py']
model = dict(backbone='biformer_tiny', num_classes=3, fpn_channels=64, min_size=128, max_size=160,
             backbone_kwargs=dict(drop_path_rate=0.1))
train_dataloader = dict(dataset=dict(num_images=200))
val_dataloader = dict(dataset=dict(num_images=50))
optim_wrapper = dict(optimizer=dict(lr=1e-3, weight_decay=0.05), clip_grad=dict(max_norm=10.0))
lr_schedule = dict(warmup_epochs=1)
train_cfg = dict(max_epochs=8, val_interval=4)
