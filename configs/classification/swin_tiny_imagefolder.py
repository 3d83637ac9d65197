# Swin-T fine-tuning on your own ImageNet-style folders (data/imagefolder/{train,val}/<class>/<image>):
# Mixup/CutMix, RandAugment, random erasing, layer decay, stochastic depth, EMA, warmup + cosine.
# Set model.num_classes to your class count and model.pretrained to a weight file (.safetensors / .pth), e.g.
#   zoo train configs/classification/swin_tiny_imagefolder.py --opts model.num_classes=37 model.pretrained=swin_t.pth
_base_ = ['../_base_/models/classifier.py', '../_base_/datasets/imagefolder.py',
          '../_base_/schedules/adamw_cosine.py', '../_base_/default_runtime.py']
model = dict(model_name='swin_tiny', num_classes=10, drop_path_rate=0.1, label_smoothing=0.1,
             mixup=dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, label_smoothing=0.1))
optim_wrapper = dict(optimizer=dict(lr=5e-4, weight_decay=0.05, layer_decay=0.75), clip_grad=dict(max_norm=5.0))
lr_schedule = dict(warmup_epochs=3, warmup_lr=1e-6, min_lr=1e-6)
model_ema = dict(decay=0.9998, use_warmup=True)
train_cfg = dict(max_epochs=30)
