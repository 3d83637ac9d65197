"""timm's optimizer factory behind mmengine: weight-decay groups, layer decay, detector groups, the reported lr,
and the timm warmup + cosine schedule per update; grad checkpointing leaves gradients unchanged."""
import math

import pytest
import torch
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS
from timm.scheduler import create_scheduler_v2

import zoo.train  # noqa: F401
from zoo.train.hooks import TimmSchedulerHook
from zoo.train.models import TimmClassifier, TimmDetector


def _build(model, **optimizer):
    ctor = OPTIM_WRAPPER_CONSTRUCTORS.build(dict(type='TimmOptimWrapperConstructor', optim_wrapper_cfg=dict(
        type='ZooOptimWrapper', optimizer=dict(opt='adamw', lr=1e-3, weight_decay=0.05, **optimizer))))
    return ctor(model)


def test_weight_decay_groups_skip_biases_norms_and_no_weight_decay():
    model = TimmClassifier('test_vit', num_classes=5)
    wrapper = _build(model)
    by_param = {id(p): g for g in wrapper.optimizer.param_groups for p in g['params']}
    names = dict(model.named_parameters())
    assert by_param[id(names['model.pos_embed'])]['weight_decay'] == 0.0  # in no_weight_decay()
    assert by_param[id(names['model.blocks.0.norm1.weight'])]['weight_decay'] == 0.0
    assert by_param[id(names['model.blocks.0.attn.qkv.bias'])]['weight_decay'] == 0.0
    assert by_param[id(names['model.blocks.0.attn.qkv.weight'])]['weight_decay'] == 0.05
    assert sum(len(g['params']) for g in wrapper.optimizer.param_groups) == len(names)
    assert type(wrapper.optimizer).__name__ == 'AdamW'


def test_layer_decay_scales_and_the_reported_lr():
    model = TimmClassifier('test_vit', num_classes=5)
    wrapper = _build(model, layer_decay=0.5)
    scales = sorted({g['lr_scale'] for g in wrapper.optimizer.param_groups})
    depth = len(model.model.blocks)
    assert scales[-1] == 1.0 and scales[0] == pytest.approx(0.5 ** (depth + 1))
    names = dict(model.named_parameters())
    group = {id(p): g for g in wrapper.optimizer.param_groups for p in g['params']}
    assert group[id(names['model.head.weight'])]['lr_scale'] == 1.0
    assert group[id(names['model.blocks.0.attn.qkv.weight'])]['lr_scale'] < group[
        id(names[f'model.blocks.{depth - 1}.attn.qkv.weight'])]['lr_scale']
    # the timm scheduler applies lr_scale; the log reports the unscaled lr
    sched, _ = create_scheduler_v2(wrapper.optimizer, sched='cosine', num_epochs=10)
    sched.step(0)
    assert wrapper.get_lr()['lr'] == [pytest.approx(1e-3)]
    assert min(g['lr'] for g in wrapper.optimizer.param_groups) == pytest.approx(1e-3 * scales[0])


def test_detector_groups_cover_backbone_neck_and_head():
    model = TimmDetector('test_vit', num_classes=3, fpn_channels=64, min_size=64, max_size=64,
                         backbone_kwargs=dict(dynamic_img_size=True))
    wrapper = _build(model, layer_decay=0.7)
    grouped = {id(p) for g in wrapper.optimizer.param_groups for p in g['params']}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    head = dict(model.named_parameters())['detector.head.classification_head.cls_logits.weight']
    g = next(g for g in wrapper.optimizer.param_groups if any(p is head for p in g['params']))
    assert g.get('lr_scale', 1.0) == 1.0 and g['weight_decay'] == 0.05


class _Loader(list):
    pass


class _FakeRunner:
    """Just what TimmSchedulerHook reads."""

    def __init__(self, wrapper, iters_per_epoch, max_epochs):
        self.optim_wrapper, self.max_epochs = wrapper, max_epochs
        self.train_dataloader = _Loader(range(iters_per_epoch))
        self.train_loop = object()
        self.iter = 0


def test_timm_schedule_warmup_then_cosine_per_update():
    model = TimmClassifier('test_convnext', num_classes=3)
    wrapper = _build(model)
    wrapper.initialize_count_status(model, 0, 40)
    runner = _FakeRunner(wrapper, iters_per_epoch=10, max_epochs=4)
    hook = TimmSchedulerHook(sched='cosine', warmup_epochs=1, warmup_lr=1e-5, min_lr=1e-5)
    hook.before_train(runner)
    lrs = []
    for it in range(40):
        lrs.append(wrapper.get_lr()['lr'][0])
        wrapper._inner_count += 1  # what update_params does
        runner.iter = it
        hook.after_train_iter(runner, it)
    assert lrs[0] == pytest.approx(1e-5)
    assert lrs[5] == pytest.approx(1e-5 + 5 * (1e-3 - 1e-5) / 10)  # linear warmup over the first 10 updates
    t, T = 25, 40  # timm's cosine (warmup not prefixed): over t / t_initial of the full schedule
    assert lrs[25] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * t / T)))
    assert lrs[-1] < lrs[20] < lrs[10]


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = TimmClassifier('test_convnext', num_classes=3)
    b = TimmClassifier('test_convnext', num_classes=3, grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    for m in (a, b):
        m(x, y, mode='loss')['loss_cls'].backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)
