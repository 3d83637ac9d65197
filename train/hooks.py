"""mmengine hooks of the recipe: timm lr schedules, timm model EMA, per-epoch seeding, atomic checkpoints,
weights_only-safe checkpoint contents, configuration consistency checks, the training-curve log/plot and progress
bars."""
import contextlib
import json
import math
import os
import random
from typing import Dict, List, Optional

import numpy as np
import torch
from mmengine.dist import all_reduce, is_distributed, is_main_process
from mmengine.hooks import CheckpointHook, Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from mmengine.runner import BaseLoop

from ._utils import ConfigError, check_kwargs, from_plain, to_plain


def _unwrap(model):
    return model.module if is_model_wrapper(model) else model


def _accumulation(runner) -> int:
    return int(getattr(runner.optim_wrapper, '_accumulative_counts', 1) or 1)


def _num_updates(runner) -> int:
    """Optimizer steps taken so far (gradient accumulation makes it fewer than iterations)."""
    return int(getattr(runner.optim_wrapper, '_inner_count', runner.iter)) // _accumulation(runner)


@HOOKS.register_module()
class TimmSchedulerHook(Hook):
    """Drives a timm scheduler (`timm.scheduler.create_scheduler_v2`: cosine, step, poly, ... with warmup) per
    optimizer update. `warmup_epochs`, `cooldown_epochs`, `decay_epochs` count epochs for epoch-based training and
    iterations for iteration-based training. The schedule is a function of the update count, so resuming needs no
    extra state. Layer-decay groups keep their scale (timm's 'lr_scale')."""
    priority = 'LOW'

    def __init__(self, sched: str = 'cosine', **kwargs):
        from timm.scheduler import create_scheduler_v2
        reserved = ('optimizer', 'num_epochs', 'updates_per_epoch', 'step_on_epochs')
        for key in reserved:
            if key in kwargs:
                raise ConfigError(f'lr_schedule.{key}: set by the recipe (from train_cfg and the data loader)')
        check_kwargs(create_scheduler_v2, kwargs, 'lr_schedule')
        self.sched, self.kwargs = sched, kwargs
        self.scheduler = None

    def before_train(self, runner) -> None:
        from timm.scheduler import create_scheduler_v2
        accum = _accumulation(runner)
        if runner.train_loop.__class__.__name__ == 'IterBasedTrainLoop':
            num_epochs, updates_per_epoch = runner.max_iters, 1
        else:
            num_epochs = runner.max_epochs
            updates_per_epoch = max(1, math.ceil(len(runner.train_dataloader) / accum))
        self.scheduler, _ = create_scheduler_v2(
            runner.optim_wrapper.optimizer, sched=self.sched, num_epochs=num_epochs, step_on_epochs=False,
            updates_per_epoch=updates_per_epoch, **self.kwargs)
        if self.scheduler is not None:
            self.scheduler.step_update(_num_updates(runner))

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if self.scheduler is not None and runner.optim_wrapper.should_update():
            self.scheduler.step_update(_num_updates(runner))


@HOOKS.register_module()
class TimmEMAHook(Hook):
    """Exponential moving average of the weights with timm's ModelEmaV3 (`decay`, `use_warmup`, `warmup_gamma`,
    `warmup_power`, `update_after_step`, `min_decay`, ...).

    Validation, testing and evaluation use the EMA weights; checkpoints carry them as 'state_dict_ema' (which
    weight loaders prefer) and resume restores them.
    """
    priority = 'NORMAL'

    def __init__(self, **kwargs):
        from timm.utils import ModelEmaV3
        for key in ('model', 'device', 'dtype'):
            if key in kwargs:
                raise ConfigError(f'model_ema.{key}: not configurable (the EMA follows the trained model)')
        check_kwargs(ModelEmaV3, kwargs, 'model_ema')
        self.kwargs = kwargs
        self.ema = None
        self._backup: Optional[Dict[str, torch.Tensor]] = None

    def before_run(self, runner) -> None:
        from timm.utils import ModelEmaV3
        self.ema = ModelEmaV3(_unwrap(runner.model), **self.kwargs)

    def after_load_checkpoint(self, runner, checkpoint) -> None:
        if self.ema is None:
            self.before_run(runner)
        source = checkpoint.get('state_dict_ema', checkpoint.get('state_dict'))
        self.ema.module.load_state_dict({k[7:] if k.startswith('module.') else k: v for k, v in source.items()})

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if runner.optim_wrapper.should_update():
            self.ema.update(_unwrap(runner.model), step=_num_updates(runner))

    def before_save_checkpoint(self, runner, checkpoint) -> None:
        checkpoint['state_dict_ema'] = {k: v.detach().cpu() for k, v in self.ema.module.state_dict().items()}

    def _swap_in(self, runner) -> None:
        model = _unwrap(runner.model)
        self._backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.ema.module.state_dict())

    def _swap_out(self, runner) -> None:
        if self._backup is not None:
            _unwrap(runner.model).load_state_dict(self._backup)
            self._backup = None

    def before_val_epoch(self, runner) -> None:
        self._swap_in(runner)

    def after_val_epoch(self, runner, metrics=None) -> None:
        self._swap_out(runner)

    def before_test_epoch(self, runner) -> None:
        self._swap_in(runner)

    def after_test_epoch(self, runner, metrics=None) -> None:
        self._swap_out(runner)


@HOOKS.register_module()
class EpochSeedHook(Hook):
    """Re-seeds Python, numpy and torch at every epoch start from (seed, epoch, rank).

    Augmentations (main process and DataLoader workers, see data.seed_worker), Mixup/CutMix and dropout then
    depend only on the epoch, so a run resumed from an epoch checkpoint replays exactly what an uninterrupted
    run does.
    """
    priority = 'HIGH'

    def before_train_epoch(self, runner) -> None:
        base = runner.seed if runner.seed is not None else 0
        seed = (int(base) * 1_000_003 + runner.epoch * 7919 + runner.rank) % 2 ** 31
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


@HOOKS.register_module()
class ZooCheckpointHook(CheckpointHook):
    """mmengine's CheckpointHook, crash-safe and bounded.

    Every `interval` epochs (iterations) the checkpoint is written (atomically, by the runner), then
    'last_checkpoint' is replaced atomically, and only then are the checkpoints beyond the newest
    `max_keep_ckpts` deleted, including older ones a killed run left behind. (mmengine deletes the oldest first,
    so a kill in between could leave 'last_checkpoint' pointing nowhere.)

    `save_best` ('auto': the first validation metric; or a metric name such as 'accuracy/top1' or 'coco/AP';
    None: off) keeps the best validated weights in ``best.pth`` (model, EMA and meta with best_metric,
    best_score and epoch; no optimizer state), replaced atomically whenever the metric improves. `rule` is
    'greater' or 'less'; by default 'less' for metric names containing 'loss' or 'err', else 'greater'.
    """
    best_filename = 'best.pth'

    def _save_checkpoint_with_step(self, runner, step, meta):
        from zoo.weights import atomic_write
        ckpt_filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir, ckpt_filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)
        stale = []
        if self.max_keep_ckpts > 0 and not (self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step):
            # self.keep_ckpt_ids is a deque bounded by max_keep_ckpts: appending would silently drop the oldest
            ids = list(self.keep_ckpt_ids) + [step]
            stale = ids[:-self.max_keep_ckpts]
            self.keep_ckpt_ids.clear()
            self.keep_ckpt_ids.extend(ids[-self.max_keep_ckpts:])
            runner.message_hub.update_info('keep_ckpt_ids', list(self.keep_ckpt_ids))
        runner.save_checkpoint(
            self.out_dir, ckpt_filename, self.file_client_args, save_optimizer=self.save_optimizer,
            save_param_scheduler=self.save_param_scheduler, meta=meta, by_epoch=self.by_epoch,
            backend_args=self.backend_args, **self.args)
        if not is_main_process():
            return
        with atomic_write(os.path.join(runner.work_dir, 'last_checkpoint')) as tmp:
            with open(tmp, 'w') as f:
                f.write(self.last_ckpt)
        for old in stale:
            path = self.file_backend.join_path(self.out_dir, self.filename_tmpl.format(old))
            if self.file_backend.isfile(path):
                self.file_backend.remove(path)
        if self.max_keep_ckpts > 0 and self.keep_ckpt_ids:
            self._remove_older_than(min(self.keep_ckpt_ids))

    def _remove_older_than(self, step: int) -> None:
        """Delete checkpoint files of this template with a smaller step (left by a run killed between writing
        its newest checkpoint and deleting the oldest)."""
        import re
        if '{}' not in self.filename_tmpl or not os.path.isdir(self.out_dir):
            return
        pattern = re.compile('^' + re.escape(self.filename_tmpl).replace(r'\{\}', r'(\d+)') + '$')
        for name in os.listdir(self.out_dir):
            m = pattern.match(name)
            if m and int(m.group(1)) < step:
                os.remove(os.path.join(self.out_dir, name))

    def _save_best_checkpoint(self, runner, metrics) -> None:
        if not self.save_best or not isinstance(getattr(runner, '_train_loop', None), BaseLoop):
            return  # off, or a standalone val/test run
        if len(self.key_indicators) != 1:
            raise ConfigError(f'default_hooks.checkpoint.save_best: expected one metric name or \'auto\', got '
                              f'{self.key_indicators}')
        key = self.key_indicators[0]
        if key == 'auto':
            key = next(iter(metrics))
        if key not in metrics:
            raise ConfigError(f'default_hooks.checkpoint.save_best: {key!r} is not a validation metric; the '
                              f'evaluator reports {sorted(metrics)}')
        rule = self.rules[0] if self.rules and self.rules[0] else (
            'less' if any(s in key.lower() for s in ('loss', 'err')) else 'greater')
        score = float(metrics[key])
        best = runner.message_hub.get_info('best_score')
        if best is not None and runner.message_hub.get_info('best_metric') == key and not (
                score > best if rule == 'greater' else score < best):
            return
        step = runner.epoch if self.by_epoch else runner.iter
        path = self.file_backend.join_path(self.out_dir, self.best_filename)
        runner.message_hub.update_info('best_score', score)
        runner.message_hub.update_info('best_metric', key)
        runner.message_hub.update_info('best_ckpt', path)
        runner.save_checkpoint(
            self.out_dir, self.best_filename, self.file_client_args, save_optimizer=False,
            save_param_scheduler=False, meta=dict(epoch=runner.epoch, iter=runner.iter, best_metric=key,
                                                  best_score=score),
            by_epoch=False, backend_args=self.backend_args)
        runner.logger.info(f'best {key} so far: {score:.4f} at {"epoch" if self.by_epoch else "iteration"} '
                           f'{step}, saved to {path}')
        # the periodic checkpoint of this step was written before validation: rewrite it so that a resumed run
        # knows the new best score
        if self.last_ckpt == self.file_backend.join_path(self.out_dir, self.filename_tmpl.format(step)):
            self._save_checkpoint_with_step(runner, step, meta=dict(epoch=runner.epoch, iter=runner.iter))


@HOOKS.register_module()
class PlainCheckpointHook(Hook):
    """Keeps checkpoints loadable with torch.load(weights_only=True): the message hub's HistoryBuffers and numpy
    values are stored as plain Python data (rebuilt on load). Runs after every other before_save_checkpoint."""
    priority = 'LOWEST'

    def before_save_checkpoint(self, runner, checkpoint) -> None:
        for key in ('message_hub', 'meta'):
            if key in checkpoint:
                checkpoint[key] = to_plain(checkpoint[key])

    def after_load_checkpoint(self, runner, checkpoint) -> None:
        if 'message_hub' in checkpoint:
            checkpoint['message_hub'] = from_plain(checkpoint['message_hub'])


@HOOKS.register_module()
class ConsistencyCheckHook(Hook):
    """Before anything runs: the model's class count must match every dataset that was built."""
    priority = 'VERY_HIGH'

    def before_run(self, runner) -> None:
        model = _unwrap(runner.model)
        num_classes = getattr(model, 'num_classes', None)
        if num_classes is None:
            return
        for name in ('_train_loop', '_val_loop', '_test_loop'):
            loop = getattr(runner, name, None)
            if not isinstance(loop, BaseLoop):
                continue
            dataset = loop.dataloader.dataset
            classes = getattr(dataset, 'metainfo', {}).get('classes')
            if classes is not None and len(classes) != num_classes:
                split = name.strip('_').replace('_loop', '')
                raise ConfigError(
                    f'{runner.cfg.filename or "<config>"}: model.num_classes is {num_classes} but the {split} '
                    f'dataset ({type(dataset).__name__}) has '
                    f'{len(classes)} classes: {list(classes)[:10]}{" ..." if len(classes) > 10 else ""}')


@HOOKS.register_module()
class TrainingCurvesHook(Hook):
    """Records the training curves and writes them to ``work_dir/history.json`` (every epoch) and
    ``work_dir/curves.png`` (loss per iteration and epoch, lr, validation metrics per epoch) at the end.

    The loss is averaged over all processes. The history travels in checkpoints, so resumed runs keep it.
    """
    priority = 'BELOW_NORMAL'

    def __init__(self, plot: bool = True):
        self.plot = plot
        self.history: Dict[str, List[dict]] = dict(iters=[], epochs=[])
        self._epoch_losses: List[float] = []

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        loss = (outputs or {}).get('loss')
        if loss is None:
            return
        value = torch.as_tensor(loss, dtype=torch.float64).detach().cpu().reshape(())
        if is_distributed():
            value = value.clone()
            all_reduce(value, op='mean')
        lrs = [g['lr'] for g in runner.optim_wrapper.optimizer.param_groups]
        self.history['iters'].append(dict(iter=runner.iter + 1, epoch=runner.epoch + 1, loss=float(value),
                                          lr=float(max(lrs))))
        self._epoch_losses.append(float(value))

    def before_train_epoch(self, runner) -> None:
        self._epoch_losses = []

    def after_train_epoch(self, runner) -> None:
        if self._epoch_losses:
            self._record(runner.epoch + 1, dict(train_loss=float(np.mean(self._epoch_losses))))
        self._write(runner)

    def after_val_epoch(self, runner, metrics=None) -> None:
        if metrics:
            # train loop increments epoch after after_train_epoch; val runs after it
            epoch = runner.epoch if runner._train_loop is not None and isinstance(runner._train_loop, BaseLoop) \
                else 0
            self._record(epoch, {k: float(v) for k, v in metrics.items() if _is_number(v)})
            self._write(runner)

    def _record(self, epoch: int, values: dict) -> None:
        for row in self.history['epochs']:
            if row['epoch'] == epoch:
                row.update(values)
                return
        self.history['epochs'].append(dict(epoch=epoch, **values))

    def before_save_checkpoint(self, runner, checkpoint) -> None:
        checkpoint['zoo_history'] = json.loads(json.dumps(self.history))

    def after_load_checkpoint(self, runner, checkpoint) -> None:
        if 'zoo_history' in checkpoint:
            self.history = checkpoint['zoo_history']

    def _write(self, runner) -> None:
        if not is_main_process():
            return
        from zoo.weights import atomic_write
        with atomic_write(os.path.join(runner.work_dir, 'history.json')) as tmp:
            with open(tmp, 'w') as f:
                json.dump(self.history, f, indent=1)

    def after_run(self, runner) -> None:
        if not (is_main_process() and self.history['iters']):
            return
        self._write(runner)
        if self.plot:
            path = plot_curves(self.history, os.path.join(runner.work_dir, 'curves.png'))
            print_log(f'Training curves: {path}', logger='current')


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def plot_curves(history: dict, path: str) -> str:
    """A PNG with the loss per iteration (+ per-epoch mean), the lr, and every validation metric per epoch."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from zoo.weights import atomic_write
    its = history['iters']
    epochs = history['epochs']
    metric_keys = sorted({k for row in epochs for k in row if k not in ('epoch', 'train_loss')})
    # skip metrics without data (COCO's -1) and keep the headline ones when there are many
    metric_keys = [k for k in metric_keys if any(r.get(k, -1) >= 0 for r in epochs)]
    headline = [k for k in metric_keys if k.split('/')[-1] in ('AP', 'AP50', 'AP75', 'top1', 'top5')]
    if len(metric_keys) > 4 and headline:
        metric_keys = headline
    n = 2 + (1 if metric_keys else 0)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 3.6))
    ax = axes[0]
    ax.plot([r['iter'] for r in its], [r['loss'] for r in its], lw=0.8, alpha=0.6, label='loss (iteration)')
    rows = [r for r in epochs if 'train_loss' in r]
    if rows and its:
        per_epoch = max(1, its[-1]['iter'] // max(1, its[-1]['epoch']))
        ax.plot([r['epoch'] * per_epoch for r in rows], [r['train_loss'] for r in rows], 'o-',
                label='loss (epoch mean)')
    ax.set_xlabel('iteration')
    ax.set_title('training loss')
    ax.legend()
    axes[1].plot([r['iter'] for r in its], [r['lr'] for r in its])
    axes[1].set_xlabel('iteration')
    axes[1].set_title('learning rate')
    if metric_keys:
        for key in metric_keys:
            pts = [(r['epoch'], r[key]) for r in epochs if key in r]
            axes[2].plot([p[0] for p in pts], [p[1] for p in pts], 'o-', label=key)
        axes[2].set_xlabel('epoch')
        axes[2].set_title('validation')
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format='png', dpi=90)
    plt.close(fig)
    return path


@HOOKS.register_module()
class ProgressHook(Hook):
    """Progress bars of the main process (`zoo.progress`): one over every training iteration, named by the epoch
    and the loss, and one per validation or test run. A bar on a terminal (mmengine's console log lines then
    print above it), plain lines every `interval` seconds elsewhere. Off with ``default_hooks.progress=None``."""
    priority = 'VERY_LOW'

    def __init__(self, interval: Optional[float] = None):
        self.interval = interval
        self._train = self._eval = None
        self._logging: Optional[contextlib.ExitStack] = None

    def _bar(self, total: int, desc: str, initial: int = 0, leave: bool = True):
        from zoo.progress import progress
        return progress(total=total, desc=desc, unit='iter', initial=initial, leave=leave, interval=self.interval)

    def _close(self, name: str) -> None:
        bar = getattr(self, name)
        if bar is not None:
            bar.close()
            setattr(self, name, None)

    def before_run(self, runner) -> None:
        from zoo.progress import logging_above_bars
        if is_main_process():
            self._logging = contextlib.ExitStack()
            self._logging.enter_context(logging_above_bars([runner.logger]))

    def before_train(self, runner) -> None:
        if is_main_process():
            self._train = self._bar(runner.max_iters, 'train', initial=runner.iter)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if self._train is None:
            return
        parts = []
        if runner.train_loop.__class__.__name__ != 'IterBasedTrainLoop':
            parts.append(f'epoch {runner.epoch + 1}/{runner.max_epochs}')
        loss = (outputs or {}).get('loss')
        if loss is not None:
            parts.append(f'loss {torch.as_tensor(loss).detach().item():.4g}')
        self._train.update(1, item=', '.join(parts))

    def after_train(self, runner) -> None:
        self._close('_train')

    def _start_eval(self, runner, split: str) -> None:
        if is_main_process():
            loader = runner.val_dataloader if split == 'val' else runner.test_dataloader
            # under a training bar (a terminal), a validation bar goes when it is done
            self._eval = self._bar(len(loader), split, leave=self._train is None)

    def before_val_epoch(self, runner) -> None:
        self._start_eval(runner, 'val')

    def before_test_epoch(self, runner) -> None:
        self._start_eval(runner, 'test')

    def after_val_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if self._eval is not None:
            self._eval.update(1)

    def after_val_epoch(self, runner, metrics=None) -> None:
        self._close('_eval')

    after_test_iter = after_val_iter
    after_test_epoch = after_val_epoch

    def after_run(self, runner) -> None:
        self._close('_eval')
        self._close('_train')
        if self._logging is not None:
            self._logging.close()
            self._logging = None
