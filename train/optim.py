"""timm's optimizer factory behind mmengine's optimizer wrappers (clipping, accumulation, AMP)."""
from typing import List, Optional

import torch.nn as nn
from mmengine.model import is_model_wrapper
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS, OPTIM_WRAPPERS

from ._utils import ConfigError


class _ReportBaseLr:
    def get_lr(self):
        # with layer decay the first group is the most scaled-down one; report the unscaled (largest) lr
        return dict(lr=[max(group['lr'] for group in self.optimizer.param_groups)])


@OPTIM_WRAPPERS.register_module()
class ZooOptimWrapper(_ReportBaseLr, OptimWrapper):
    """mmengine's OptimWrapper (clip_grad, accumulative_counts) reporting the unscaled lr."""


@OPTIM_WRAPPERS.register_module()
class ZooAmpOptimWrapper(_ReportBaseLr, AmpOptimWrapper):
    """mmengine's AmpOptimWrapper (CUDA autocast + loss scaling) reporting the unscaled lr."""


def _split_groups(module: nn.Module, weight_decay: float, exclude_1d: bool, layer_decay: Optional[float],
                  **layer_decay_kwargs) -> List[dict]:
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay
    no_wd = module.no_weight_decay() if hasattr(module, 'no_weight_decay') else ()
    if layer_decay is not None:
        return param_groups_layer_decay(module, weight_decay=weight_decay, no_weight_decay_list=no_wd,
                                        weight_decay_exclude_1d=exclude_1d, layer_decay=layer_decay,
                                        **layer_decay_kwargs)
    return param_groups_weight_decay(module, weight_decay=weight_decay, no_weight_decay_list=no_wd,
                                     weight_decay_exclude_1d=exclude_1d)


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class TimmOptimWrapperConstructor:
    """Builds the optimizer with ``timm.optim.create_optimizer_v2``.

    `optimizer` holds its arguments: ``opt`` ('adamw', 'sgd', 'lamb', 'lion', ...), ``lr``, ``weight_decay``,
    ``momentum``, ``layer_decay`` (+ ``layer_decay_min_scale``, ``layer_decay_no_opt_scale``),
    ``filter_bias_and_bn`` and optimizer-specific ones (``betas``, ``eps``, ...). Weight decay skips biases, norms
    and the model's no_weight_decay() set; layer decay follows the timm model's group_matcher. For detectors the
    backbone is grouped by timm and the FPN/head parameters get the unscaled lr.
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: Optional[dict] = None):
        if paramwise_cfg:
            raise ConfigError('optim_wrapper.paramwise_cfg: not used by TimmOptimWrapperConstructor; use '
                              'optimizer.layer_decay / optimizer.weight_decay')
        cfg = dict(optim_wrapper_cfg)
        if 'optimizer' not in cfg:
            raise ConfigError("optim_wrapper.optimizer: missing (e.g. dict(opt='adamw', lr=1e-3, weight_decay=0.05))")
        self.optimizer_cfg = dict(cfg.pop('optimizer'))
        self.optimizer_cfg.pop('type', None)
        cfg.setdefault('type', 'ZooOptimWrapper')
        self.wrapper_cfg = cfg

    def __call__(self, model: nn.Module) -> OptimWrapper:
        from timm.optim import create_optimizer_v2
        if is_model_wrapper(model):
            model = model.module
        opt_cfg = dict(self.optimizer_cfg)
        opt = opt_cfg.pop('opt', 'adamw')
        weight_decay = float(opt_cfg.pop('weight_decay', 0.0))
        exclude_1d = bool(opt_cfg.pop('filter_bias_and_bn', True))
        layer_decay = opt_cfg.pop('layer_decay', None)
        ld_kwargs = {}
        for src, dst in (('layer_decay_min_scale', 'min_scale'), ('layer_decay_no_opt_scale', 'no_opt_scale')):
            if src in opt_cfg:
                ld_kwargs[dst] = opt_cfg.pop(src)

        backbone = _backbone_of(model)
        groups = _split_groups(backbone, weight_decay, exclude_1d, layer_decay, **ld_kwargs)
        seen = {id(p) for g in groups for p in g['params']}
        rest = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
        decay = [p for n, p in rest if not (exclude_1d and p.ndim <= 1)]
        no_decay = [p for n, p in rest if exclude_1d and p.ndim <= 1]
        groups += [g for g in (dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0))
                   if g['params']]
        try:
            optimizer = create_optimizer_v2(groups, opt=opt, **opt_cfg)
        except TypeError as e:
            raise ConfigError(f'optim_wrapper.optimizer: {e}') from None
        except (ValueError, AssertionError) as e:
            raise ConfigError(f'optim_wrapper.optimizer.opt: {e}') from None
        try:
            return OPTIM_WRAPPERS.build(self.wrapper_cfg, default_args=dict(optimizer=optimizer))
        except TypeError as e:
            raise ConfigError(f'optim_wrapper: {e}') from None


def _backbone_of(model: nn.Module) -> nn.Module:
    """The timm model inside a recipe model (classifier: the whole network; detector: the features body)."""
    if hasattr(model, 'detector'):
        body = model.detector.backbone.body
        return getattr(body, 'model', body)
    return getattr(model, 'model', model)
