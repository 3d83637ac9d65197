model = dict(
    type='TimmClassifier',
    model_name='resnet18',
    num_classes=1000,
    pretrained=None,          # True (timm source) or a local .safetensors / .pth file to fine-tune from
    new_head=True,            # with pretrained: a fresh classifier for num_classes
    model_kwargs=dict(),      # extra timm.create_model arguments
    drop_rate=0.0,
    drop_path_rate=0.0,
    grad_checkpointing=False,
    # mixup=dict(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1),  # timm Mixup/CutMix (off when absent)
    label_smoothing=0.0,
)
