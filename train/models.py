"""mmengine models wrapping any timm / zoo backbone: an image classifier and torchvision detectors.

Both take ``mode='loss'`` (dict of losses, every key contains 'loss' so mmengine sums them all),
``'predict'`` (what the metrics consume) and ``'tensor'``. A non-finite loss stops training with a clear error.
"""
import sys
from collections import OrderedDict
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
from mmengine.logging import MessageHub, print_log
from mmengine.model import BaseModel
from mmengine.registry import MODELS

from ._utils import ConfigError, check_choice, check_kwargs

HEADS = ('fcos', 'retinanet', 'faster_rcnn')


def _import_zoo() -> None:
    try:
        import zoo  # noqa: F401  registers the zoo's models in timm
    except ImportError:
        pass


def _strip_prefix(state_dict: Dict[str, torch.Tensor], prefixes: Sequence[str]) -> Dict[str, torch.Tensor]:
    for prefix in prefixes:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def load_backbone_weights(
        model: nn.Module,
        path: str,
        allow_unexpected: bool = False,
        skip_prefixes: Sequence[str] = (),
        what: str = 'model.pretrained',
) -> List[str]:
    """Load a local weight file (.safetensors or a weights-only torch checkpoint, also a recipe checkpoint) into
    `model`, a timm model. Keys under `skip_prefixes` (e.g. the classifier) are neither loaded nor required.

    Every other parameter and buffer of `model` must come from the file (else IncompatibleKeysError naming the
    file and the first entries); shapes must match. The model module's `checkpoint_filter_fn` converts official
    checkpoints when their keys do not match directly. EMA weights are preferred when the file has them.
    Returns the file's keys that were not used.
    """
    from zoo.weights import IncompatibleKeysError, load_weights
    state_dict = load_weights(path, use_ema=True)
    state_dict = _strip_prefix(state_dict, ('model.', 'backbone.'))
    own = model.state_dict()

    def skipped(k):
        return any(k == p or k.startswith(p + '.') for p in skip_prefixes)

    needed = [k for k in own if not skipped(k)]
    if any(k not in state_dict for k in needed):
        filter_fn = getattr(sys.modules.get(type(model).__module__), 'checkpoint_filter_fn', None)
        if filter_fn is not None:
            state_dict = filter_fn(state_dict, model)
    state_dict = {k: v for k, v in state_dict.items() if not skipped(k)}
    missing = [k for k in needed if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f'{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}'
                  for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    if missing or mismatched or (unexpected and not allow_unexpected):
        parts = [f'{name} {len(keys)} (first: {", ".join(keys[:3])})'
                 for name, keys in (('missing', missing), ('unexpected', unexpected), ('shape mismatch', mismatched))
                 if keys]
        raise IncompatibleKeysError(
            f'{what}: weight file {path!r} does not fit {type(model).__name__}: ' + '; '.join(parts),
            missing, unexpected, mismatched)
    model.load_state_dict(state_dict, strict=False)
    return unexpected


def _classifier_prefix(model: nn.Module) -> Optional[str]:
    head = model.get_classifier() if hasattr(model, 'get_classifier') else None
    if head is None:
        return None
    for name, module in model.named_modules():
        if module is head:
            return name
    return None


class _RecipeModel(BaseModel):
    """Shared: the non-finite loss guard (runs in single-process and DDP train steps alike)."""

    def parse_losses(self, losses):
        loss, log_vars = super().parse_losses(losses)
        if not torch.isfinite(loss).all():
            hub = MessageHub.get_current_instance()
            parts = ', '.join(f'{k}={float(v.detach()):.4g}' for k, v in log_vars.items())
            raise FloatingPointError(
                f"Loss is not finite at epoch {hub.get_info('epoch', 0) + 1}, iteration {hub.get_info('iter', 0) + 1} "
                f"({parts}); training stopped before this step updated the weights. Lower optim_wrapper.optimizer.lr, "
                f"set optim_wrapper.clip_grad=dict(max_norm=...), or check the inputs and labels.")
        return loss, log_vars


@MODELS.register_module()
class TimmClassifier(_RecipeModel):
    """Any timm / zoo model as an image classifier.

    Args:
        model_name: a timm model name (zoo models are registered by `import zoo`).
        num_classes: classes of the dataset; must agree with the dataset.
        pretrained: None/False (random init), True (timm's pretrained source) or a local weight file
            (.safetensors, .pth/.bin torch checkpoint read weights-only, or a checkpoint of this recipe).
        new_head: with `pretrained`, start from a fresh classifier (fine-tuning to other classes); with False the
            file's classifier must fit `num_classes`.
        model_kwargs: extra timm.create_model keyword arguments (img_size, window_size, ...).
        drop_rate / drop_path_rate: timm's head dropout and stochastic depth.
        grad_checkpointing: activation checkpointing through timm's set_grad_checkpointing.
        mixup: timm.data.Mixup keyword arguments (mixup_alpha, cutmix_alpha, prob, switch_prob, mode,
            label_smoothing, ...); None disables Mixup/CutMix.
        label_smoothing: for the plain cross-entropy (without mixup).
    """

    def __init__(
            self,
            model_name: str,
            num_classes: int,
            pretrained: Union[None, bool, str] = None,
            new_head: bool = True,
            model_kwargs: Optional[dict] = None,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            grad_checkpointing: bool = False,
            mixup: Optional[dict] = None,
            label_smoothing: float = 0.0,
            data_preprocessor: Optional[dict] = None,
            init_cfg: Optional[dict] = None,
    ):
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        _import_zoo()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(f'model.num_classes: expected an integer >= 2, got {num_classes!r}')
        if not timm.is_model(model_name):
            raise ConfigError(f'model.model_name: unknown timm/zoo model {model_name!r}'
                              f'{_close_model(model_name)}')
        self.model_name = model_name
        self.num_classes = num_classes
        kwargs = dict(model_kwargs or {})
        use_timm_source = pretrained is True
        self.model = timm.create_model(model_name, pretrained=use_timm_source, num_classes=num_classes,
                                       drop_rate=drop_rate, drop_path_rate=drop_path_rate, **kwargs)
        if isinstance(pretrained, str):
            from zoo.weights import IncompatibleKeysError
            head = _classifier_prefix(self.model)
            try:
                unused = load_backbone_weights(self.model, pretrained, allow_unexpected=new_head,
                                               skip_prefixes=(head,) if (new_head and head) else ())
            except IncompatibleKeysError as e:
                if head and any(m.startswith(head + '.') for m in e.mismatched):
                    raise IncompatibleKeysError(
                        f'{e}; its classifier does not have model.num_classes={num_classes} outputs: set '
                        f'model.new_head=True to fine-tune with a new head', e.missing, e.unexpected,
                        e.mismatched) from None
                raise
            print_log(f'Loaded {pretrained} into {model_name}'
                      f'{" with a new " + str(num_classes) + "-class head" if new_head else ""}'
                      f'{f" ({len(unused)} unused entries)" if unused else ""}', logger='current')
        elif pretrained not in (None, False, True):
            raise ConfigError(f'model.pretrained: expected None, True or a weight file path, got {pretrained!r}')
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)

        self.mixup_fn = None
        if mixup:
            from timm.data import Mixup
            check_kwargs(Mixup, mixup, 'model.mixup')
            self.mixup_fn = Mixup(**dict(mixup, num_classes=num_classes))
            from timm.loss import SoftTargetCrossEntropy
            self.criterion = SoftTargetCrossEntropy()
        elif label_smoothing > 0:
            from timm.loss import LabelSmoothingCrossEntropy
            self.criterion = LabelSmoothingCrossEntropy(smoothing=label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

    @property
    def data_config(self) -> dict:
        """timm's preprocessing config of the model (input_size, mean, std, ...)."""
        return timm.data.resolve_data_config(model=self.model)

    def forward(self, inputs: torch.Tensor, labels: Optional[torch.Tensor] = None, mode: str = 'tensor'):
        if mode == 'loss':
            if labels is None:
                raise ValueError("TimmClassifier: mode='loss' needs labels")
            if self.mixup_fn is not None:
                if inputs.shape[0] % 2 == 0:
                    inputs, labels = self.mixup_fn(inputs, labels)
                else:  # timm's Mixup needs an even batch; smooth the odd one only
                    from timm.data.mixup import mixup_target
                    labels = mixup_target(labels, self.num_classes, 1.0, self.mixup_fn.label_smoothing)
            return dict(loss_cls=self.criterion(self.model(inputs), labels))
        logits = self.model(inputs)
        if mode == 'predict':
            return logits.detach().float()
        if mode == 'tensor':
            return logits
        raise ValueError(f"mode: expected 'loss', 'predict' or 'tensor', got {mode!r}")


def _close_model(name: str) -> str:
    from ._utils import suggest
    return suggest(name, timm.list_models())


class TimmFPN(nn.Module):
    """A timm / zoo backbone's multi-scale NCHW features (features_only) followed by a torchvision FPN.

    Returns an OrderedDict of feature maps, as torchvision's detection heads expect; `out_channels` and
    `strides` describe them (the FPN's extra levels included).
    """

    def __init__(self, body: nn.Module, out_channels: int, extra: str):
        super().__init__()
        from torchvision.ops.feature_pyramid_network import (FeaturePyramidNetwork, LastLevelMaxPool,
                                                             LastLevelP6P7)
        self.body = body
        channels = body.feature_info.channels()
        strides = list(body.feature_info.reduction())
        self.fmt_nhwc = str(getattr(body, 'output_fmt', 'NCHW')).endswith('NHWC')
        if extra == 'p6p7':
            extra_block = LastLevelP6P7(out_channels, out_channels)
            strides += [strides[-1] * 2, strides[-1] * 4]
        else:
            extra_block = LastLevelMaxPool()
            strides += [strides[-1] * 2]
        self.fpn = FeaturePyramidNetwork(channels, out_channels, extra_blocks=extra_block)
        self.out_channels = out_channels
        self.strides = strides

    def forward(self, x: torch.Tensor) -> 'OrderedDict[str, torch.Tensor]':
        feats = self.body(x)
        if self.fmt_nhwc:
            feats = [f.permute(0, 3, 1, 2).contiguous() for f in feats]
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def _build_body(name: str, pretrained, out_indices, kwargs: dict) -> nn.Module:
    """features_only backbone; NCHW through timm's FeatureGetterNet when the model has forward_intermediates."""
    try:
        body = timm.create_model(name, features_only=True, feature_cls='getter', out_indices=tuple(out_indices),
                                 pretrained=pretrained is True, **kwargs)
        getter = True
    except (AttributeError, NotImplementedError):  # no forward_intermediates / prune_intermediate_layers
        body = timm.create_model(name, features_only=True, out_indices=tuple(out_indices),
                                 pretrained=pretrained is True, **kwargs)
        getter = False
    if isinstance(pretrained, str):
        if not getter:
            raise ConfigError(f'model.pretrained: loading {pretrained!r} into a detection backbone needs a model '
                              f'with forward_intermediates; {name} has none')
        # the file holds a whole classifier; the getter pruned the layers after the last used level (final norm,
        # head), which key maps rightly reject as foreign. Load into the whole model, then take the kept part.
        full = timm.create_model(name, num_classes=0, **kwargs)
        unused = load_backbone_weights(full, pretrained, allow_unexpected=True, what='model.pretrained')
        source = full.state_dict()
        own = body.model.state_dict()
        missing = [k for k in own if k not in source or source[k].shape != own[k].shape]
        if missing:
            from zoo.weights import IncompatibleKeysError
            raise IncompatibleKeysError(f'model.pretrained: the {name} backbone has {len(missing)} tensors that the '
                                        f'whole {name} lacks (first: {", ".join(missing[:3])})', missing, [], [])
        body.model.load_state_dict({k: source[k] for k in own})
        print_log(f'Loaded backbone weights from {pretrained} ({len(unused)} unused entries, e.g. the classifier)',
                  logger='current')
    return body


@MODELS.register_module()
class TimmDetector(_RecipeModel):
    """torchvision FCOS / RetinaNet / Faster R-CNN over a timm / zoo backbone + FPN.

    Args:
        backbone: timm model name; its features at `out_indices` (default: the last three levels) feed the FPN.
        num_classes: object classes (the dataset's categories), background excluded.
        head: 'fcos', 'retinanet' or 'faster_rcnn'.
        pretrained: None/False, True (timm source) or a local weight file for the backbone (classifier
            checkpoints of this recipe work); every backbone tensor must come from the file.
        backbone_kwargs: extra timm.create_model arguments for the backbone.
        fpn_channels: FPN width.
        min_size / max_size: torchvision's resize (shorter side to min_size, longer side at most max_size);
            a tuple min_size picks one at random per training batch (multi-scale training).
        anchor_sizes: one tuple of sizes per level; default from the level strides (FCOS: stride; RetinaNet:
            `anchor_scale` * stride * 2^(0, 1/3, 2/3); Faster R-CNN: `anchor_scale` * stride).
        box_representation_size: Faster R-CNN box head width.
        head_kwargs: further keyword arguments of the torchvision detector class (score_thresh, nms_thresh,
            detections_per_img, topk_candidates, rpn_* / box_* for Faster R-CNN, size_divisible, ...).
    """

    def __init__(
            self,
            backbone: str,
            num_classes: int,
            head: str = 'fcos',
            pretrained: Union[None, bool, str] = None,
            out_indices: Sequence[int] = (-3, -2, -1),
            backbone_kwargs: Optional[dict] = None,
            fpn_channels: int = 128,
            min_size: Union[int, Tuple[int, ...]] = 512,
            max_size: int = 800,
            anchor_sizes: Optional[Sequence[Sequence[float]]] = None,
            anchor_scale: float = 4.0,
            box_representation_size: int = 256,
            grad_checkpointing: bool = False,
            head_kwargs: Optional[dict] = None,
            data_preprocessor: Optional[dict] = None,
            init_cfg: Optional[dict] = None,
    ):
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        from torchvision.models import detection as tvd
        from torchvision.models.detection.anchor_utils import AnchorGenerator
        from torchvision.models.detection.transform import GeneralizedRCNNTransform
        _import_zoo()
        check_choice(head, HEADS, 'model.head')
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f'model.num_classes: expected an integer >= 1, got {num_classes!r}')
        if not timm.is_model(backbone):
            raise ConfigError(f'model.backbone: unknown timm/zoo model {backbone!r}{_close_model(backbone)}')
        self.head_type, self.num_classes = head, num_classes
        det_cls = dict(fcos=tvd.FCOS, retinanet=tvd.RetinaNet, faster_rcnn=tvd.FasterRCNN)[head]
        head_kwargs = dict(head_kwargs or {})
        for k in head_kwargs:
            if k in ('backbone', 'num_classes', 'min_size', 'max_size', 'image_mean', 'image_std'):
                raise ConfigError(f'model.head_kwargs.{k}: set it with the model\'s own argument')
        allowed = (set(_sig(det_cls)) | set(_sig(GeneralizedRCNNTransform))) - {'kwargs'}
        for k in head_kwargs:
            if k not in allowed:
                from ._utils import suggest
                raise ConfigError(f'model.head_kwargs.{k}: not an argument of torchvision {det_cls.__name__}'
                                  f'{suggest(k, allowed)}')

        body = _build_body(backbone, pretrained, out_indices, dict(backbone_kwargs or {}))
        if grad_checkpointing:
            inner = getattr(body, 'model', body)
            if hasattr(inner, 'set_grad_checkpointing'):
                inner.set_grad_checkpointing(True)
        fpn = TimmFPN(body, fpn_channels, extra='maxpool' if head == 'faster_rcnn' else 'p6p7')
        strides = fpn.strides
        cfg = getattr(body, 'pretrained_cfg', None) or {}
        mean, std = list(cfg.get('mean', (0.485, 0.456, 0.406))), list(cfg.get('std', (0.229, 0.224, 0.225)))
        common = dict(min_size=min_size, max_size=max_size, image_mean=mean, image_std=std)

        if anchor_sizes is not None:
            anchor_sizes = tuple(tuple(float(s) for s in level) for level in anchor_sizes)
            if len(anchor_sizes) != len(strides):
                raise ConfigError(f'model.anchor_sizes: expected one tuple per feature level ({len(strides)} levels, '
                                  f'strides {strides}), got {len(anchor_sizes)}')
        if head == 'fcos':
            if fpn_channels % 32 or fpn_channels < 64:
                raise ConfigError(f'model.fpn_channels: the FCOS head normalises with GroupNorm(32), so it needs a '
                                  f'multiple of 32 that is at least 64, got {fpn_channels}')
            sizes = anchor_sizes or tuple((float(s),) for s in strides)
            if any(len(level) != 1 for level in sizes):
                raise ConfigError('model.anchor_sizes: FCOS takes exactly one size per level')
            anchors = AnchorGenerator(sizes, ((1.0,),) * len(sizes))
            self.detector = tvd.FCOS(fpn, num_classes, anchor_generator=anchors, **common, **head_kwargs)
        elif head == 'retinanet':
            from torchvision.models.detection.retinanet import RetinaNetHead
            sizes = anchor_sizes or tuple(tuple(anchor_scale * s * 2 ** (i / 3) for i in range(3)) for s in strides)
            anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
            head_kwargs.setdefault('head', RetinaNetHead(
                fpn_channels, anchors.num_anchors_per_location()[0], num_classes,
                norm_layer=partial(nn.GroupNorm, _gn_groups(fpn_channels))))
            self.detector = tvd.RetinaNet(fpn, num_classes, anchor_generator=anchors, **common, **head_kwargs)
        else:
            from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
            from torchvision.ops import MultiScaleRoIAlign
            sizes = anchor_sizes or tuple((anchor_scale * s,) for s in strides)
            anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
            roi_pool = MultiScaleRoIAlign(featmap_names=[str(i) for i in range(len(strides) - 1)],
                                          output_size=7, sampling_ratio=2)
            rep = box_representation_size
            self.detector = tvd.FasterRCNN(
                fpn, None, rpn_anchor_generator=anchors, box_roi_pool=roi_pool,
                box_head=TwoMLPHead(fpn_channels * 49, rep), box_predictor=FastRCNNPredictor(rep, num_classes + 1),
                **common, **head_kwargs)

        # dataset labels are 1..K; the single-stage heads score K classes (0..K-1), Faster R-CNN has a background 0
        self.label_offset = 0 if head == 'faster_rcnn' else 1

    def _targets(self, data_samples):
        return [dict(boxes=t['boxes'], labels=t['labels'] - self.label_offset) for t in data_samples]

    def forward(self, inputs: List[torch.Tensor], data_samples: Optional[List[dict]] = None, mode: str = 'tensor'):
        if mode == 'loss':
            if data_samples is None:
                raise ValueError("TimmDetector: mode='loss' needs data_samples (targets)")
            losses = self.detector(list(inputs), self._targets(data_samples))
            # mmengine only sums keys that contain 'loss'
            return {(k if 'loss' in k else f'loss_{k}'): v for k, v in losses.items()}
        if mode == 'predict':
            outputs = self.detector(list(inputs))
            results = []
            for out, sample in zip(outputs, data_samples or [{}] * len(outputs)):
                results.append(dict(boxes=out['boxes'].detach().float().cpu(), scores=out['scores'].detach().cpu(),
                                    labels=out['labels'].detach().cpu() + self.label_offset,
                                    image_id=sample.get('image_id')))
            return results
        if mode == 'tensor':
            images, _ = self.detector.transform(list(inputs))
            return self.detector.backbone(images.tensors)
        raise ValueError(f"mode: expected 'loss', 'predict' or 'tensor', got {mode!r}")


def _gn_groups(channels: int) -> int:
    # at least 2 channels per group, so a single image's 1x1 top level still normalises
    for g in (32, 16, 8, 4, 2):
        if channels % g == 0 and channels // g >= 2:
            return g
    return 1


def _sig(fn) -> List[str]:
    import inspect
    return [p for p in inspect.signature(fn.__init__).parameters if p != 'self']
