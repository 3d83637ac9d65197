model = dict(
    type='TimmDetector',
    head='faster_rcnn',
    backbone='resnet18',
    num_classes=80,
    pretrained=None,          # True (timm source) or a local weight file (e.g. a classification checkpoint)
    out_indices=(-3, -2, -1),
    backbone_kwargs=dict(),
    fpn_channels=128,
    min_size=512,
    max_size=800,
    anchor_sizes=None,        # default from the feature strides
    anchor_scale=4.0,
    grad_checkpointing=False,
    head_kwargs=dict(),       # torchvision detector arguments (score_thresh, nms_thresh, detections_per_img, ...)
)
