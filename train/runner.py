"""Config loading and checking, the recipe's Runner, and the train / eval entry points."""
import ast
import copy
import glob
import logging
import os
import re
import uuid
from typing import Any, Dict, Optional, Sequence

import torch
from mmengine.config import Config
from mmengine.dist import master_only
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import (DATA_SAMPLERS, DATASETS, FUNCTIONS, HOOKS, LOOPS, METRICS, MODELS,
                               OPTIM_WRAPPER_CONSTRUCTORS, OPTIM_WRAPPERS, VISBACKENDS)
from mmengine.runner import Runner

from ._utils import ConfigError, check_kwargs, suggest

# keys the mmengine Runner reads from a config, and the ones this recipe adds
RUNNER_KEYS = {
    'model', 'work_dir', 'train_dataloader', 'val_dataloader', 'test_dataloader', 'train_cfg', 'val_cfg',
    'test_cfg', 'auto_scale_lr', 'optim_wrapper', 'param_scheduler', 'val_evaluator', 'test_evaluator',
    'default_hooks', 'custom_hooks', 'data_preprocessor', 'load_from', 'resume', 'launcher', 'env_cfg',
    'log_processor', 'log_level', 'visualizer', 'default_scope', 'randomness', 'experiment_name',
    'model_wrapper_cfg', 'sync_bn', 'find_unused_parameters', 'activation_checkpointing', 'compile',
}
ZOO_KEYS = {
    'lr_schedule',  # timm scheduler: dict(sched='cosine', warmup_epochs=..., warmup_lr=..., min_lr=...) or None
    'model_ema',    # timm ModelEmaV3: dict(decay=..., use_warmup=...) or None
    'amp',          # 'auto' (CUDA only), True, False; optional dtype via amp_dtype
    'amp_dtype',    # 'float16' | 'bfloat16' (AMP on CUDA)
    'wandb',        # None or dict(project=..., mode='online'|'offline'|'disabled', name=..., tags=..., ...)
    'plot_curves',  # bool: PNG of the training curves at the end
}
DATALOADER_KEYS = {'dataset', 'sampler', 'batch_sampler', 'collate_fn', 'worker_init_fn', 'num_batch_per_epoch',
                   'batch_size', 'num_workers', 'pin_memory', 'drop_last', 'timeout', 'persistent_workers',
                   'prefetch_factor', 'multiprocessing_context', 'generator', 'pin_memory_device', 'shuffle'}
OPTIM_WRAPPER_KEYS = {'type', 'constructor', 'optimizer', 'clip_grad', 'accumulative_counts', 'paramwise_cfg',
                      'dtype', 'loss_scale', 'use_fsdp'}
RESUME_PATTERNS = ('epoch_*.pth', 'iter_*.pth')


# ----------------------------------------------------------------------------------------------- configs
def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ('true', 'false'):
        return low == 'true'
    if low in ('none', 'null'):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    if text[:1] in '[(' and text[-1:] in '])':  # [se,linear,agent,global]: bare words are strings
        quoted = _BARE_WORD.sub(lambda m: m.group(0) if m.group(0) in ('True', 'False', 'None') else repr(m.group(0)),
                                text)
        try:
            return ast.literal_eval(quoted)
        except (ValueError, SyntaxError):
            pass
    return text


# a name outside quotes inside a list: letters first, then letters, digits and _ . : -
_BARE_WORD = re.compile(r"""(?<![\w'".:-])[A-Za-z_][\w.:-]*(?![\w'"])""")


def parse_opts(opts: Optional[Sequence[str]]) -> Dict[str, Any]:
    """['a.b=1', 'c=[1,2]', 'd=adamw'] -> {'a.b': 1, 'c': [1, 2], 'd': 'adamw'} (Python literals, else strings)."""
    out = {}
    for item in opts or ():
        if '=' not in item:
            raise ConfigError(f"--opts: expected key=value, got {item!r}")
        key, value = item.split('=', 1)
        if not key:
            raise ConfigError(f"--opts: empty key in {item!r}")
        out[key.strip()] = _parse_value(value.strip())
    return out


def _check_opt_key(cfg: Config, key: str, where: str) -> None:
    """An override path may add keys (check_config then validates them) but not index into values or past
    the end of lists."""
    node: Any = cfg._cfg_dict
    parts = key.split('.')
    for i, part in enumerate(parts):
        if isinstance(node, dict):
            if part not in node:
                return
            node = node[part]
        elif isinstance(node, (list, tuple)):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f'{where}: --opts {key}: {part!r} is not an index of the list '
                                  f"{'.'.join(parts[:i])} (length {len(node)})")
            node = node[int(part)]
        else:
            raise ConfigError(f"{where}: --opts {key}: {'.'.join(parts[:i])} is {node!r}, not a dict; "
                              f"set it whole, e.g. --opts \"{'.'.join(parts[:i])}={{'{parts[i]}': ...}}\"")


_MISSING = object()


def _lookup(cfg: Config, key: str) -> Any:
    node: Any = cfg._cfg_dict
    for part in key.split('.'):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def _check_opt_value(cfg: Config, key: str, value: Any, where: str) -> None:
    """An override must have the kind of value the config holds there (before anything is built or written):
    a number for a number (or a tuple, e.g. multi-scale sizes), True/False for a flag, a list/tuple for a list, a
    dict for a dict; None always (it switches a part off). Strings are what unparsable values become
    (`train_cfg.max_epochs=abc`), so they never replace numbers, flags, lists or dicts."""
    old = _lookup(cfg, key)
    if value is None or old is _MISSING or old is None or isinstance(old, str):
        return
    if isinstance(old, bool):
        ok, expected = isinstance(value, bool), 'True or False'
    elif isinstance(old, (int, float)):
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)) or isinstance(value, (list, tuple))
        expected = 'a number'
    elif isinstance(old, (list, tuple)):
        ok = isinstance(value, (list, tuple, int, float)) and not isinstance(value, bool)
        expected = 'a list or tuple'
    elif isinstance(old, dict):
        ok, expected = isinstance(value, (dict, bool)), "a dict, e.g. \"{'key': value}\", or None"
    else:
        return
    if not ok:
        raise ConfigError(f'{where}: --opts {key}: expected {expected} (the config has {old!r}), got {value!r}')


def packaged_configs_dir() -> str:
    """The configs/ shipped inside the zoo package (zoo/configs)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def resolve_config_path(path: str) -> str:
    """`path` if it is a file, else the shipped config of that name (with or without the 'configs/' prefix)."""
    if os.path.isfile(path):
        return path
    rel = os.path.normpath(path)
    rel = rel[len('configs' + os.sep):] if rel.startswith('configs' + os.sep) else rel
    shipped = os.path.join(packaged_configs_dir(), rel)
    if not os.path.isabs(path) and os.path.isfile(shipped):
        return shipped
    raise ConfigError(f'config file {path!r} does not exist (nor among the shipped configs in {packaged_configs_dir()})')


def load_config(path: str, opts: Optional[Sequence[str]] = None) -> Config:
    """Read an mmengine config file, apply `opts` ('key.sub=value' overrides) and check every entry.

    A path that is not a file is looked up among the configs shipped with the package, so
    `zoo train configs/classification/cbam_resnet18_digits.py` works from an installed wheel too.
    """
    path = resolve_config_path(path)
    _import_components()
    try:
        cfg = Config.fromfile(path)
    except (SyntaxError, NameError, KeyError, TypeError, FileNotFoundError, ImportError) as e:
        raise ConfigError(f'{path}: cannot parse the config: {type(e).__name__}: {e}') from None
    overrides = parse_opts(opts) if not isinstance(opts, dict) else dict(opts)
    for key, value in overrides.items():
        _check_opt_key(cfg, key, path)
        _check_opt_value(cfg, key, value, path)
    if overrides:
        cfg.merge_from_dict(overrides)
    check_config(cfg)
    return cfg


def _registered(registry, type_name, where: str):
    if not isinstance(type_name, str):
        return type_name
    obj = registry.get(type_name)
    if obj is None:
        raise ConfigError(f"{where}.type: {type_name!r} is not a registered {registry.name}"
                          f"{suggest(type_name, registry.module_dict.keys())}")
    return obj


def _check_component(registry, cfg: Any, where: str, default_type: Optional[str] = None) -> None:
    if cfg is None:
        return
    if not isinstance(cfg, dict):
        raise ConfigError(f'{where}: expected a dict with a type, got {type(cfg).__name__}')
    type_name = cfg.get('type', default_type)
    if type_name is None:
        raise ConfigError(f'{where}.type: missing')
    check_kwargs(_registered(registry, type_name, where), cfg, where)


def check_config(cfg: Config) -> None:
    """Raise ConfigError naming the config file and the entry for unknown keys and unknown component types."""
    name = cfg.filename or '<config>'
    try:
        _check_config(cfg)
    except ConfigError as e:
        raise ConfigError(f'{name}: {e}') from None


def _check_config(cfg: Config) -> None:
    allowed = RUNNER_KEYS | ZOO_KEYS
    for key in cfg.keys():
        if key.startswith('_') or key in allowed:
            continue
        raise ConfigError(f"unknown top-level key {key!r}{suggest(key, allowed)} (helper variables in config "
                          f"files must start with '_')")
    if 'model' not in cfg:
        raise ConfigError("'model' is missing")
    _check_component(MODELS, cfg.model, 'model')
    for split in ('train', 'val', 'test'):
        loader = cfg.get(f'{split}_dataloader')
        if loader is None:
            continue
        where = f'{split}_dataloader'
        for key in loader:
            if key not in DATALOADER_KEYS:
                raise ConfigError(f'{where}.{key}: unknown data loader key{suggest(key, DATALOADER_KEYS)}')
        for key, low in (('batch_size', 1), ('num_workers', 0), ('num_batch_per_epoch', 1), ('prefetch_factor', 1)):
            _check_int(loader.get(key), low, f'{where}.{key}')
        _check_component(DATASETS, loader.get('dataset'), f'{where}.dataset')
        _check_component(DATA_SAMPLERS, loader.get('sampler'), f'{where}.sampler')
        for fn_key in ('collate_fn', 'worker_init_fn'):
            fn = loader.get(fn_key)
            if isinstance(fn, dict) and isinstance(fn.get('type'), str):
                _registered(FUNCTIONS, fn['type'], f'{where}.{fn_key}')
    for key in ('val_evaluator', 'test_evaluator'):
        ev = cfg.get(key)
        for i, metric in enumerate(ev if isinstance(ev, (list, tuple)) else [ev] if ev else []):
            _check_component(METRICS, metric, key if not isinstance(ev, (list, tuple)) else f'{key}.{i}')
    train_cfg = cfg.get('train_cfg')
    if train_cfg:
        for key, low in (('max_epochs', 1), ('max_iters', 1), ('val_interval', 1), ('val_begin', 0)):
            _check_int(train_cfg.get(key), low, f'train_cfg.{key}')
        if 'type' in train_cfg:
            _check_component(LOOPS, train_cfg, 'train_cfg')
        else:
            loop = 'EpochBasedTrainLoop' if train_cfg.get('by_epoch', True) else 'IterBasedTrainLoop'
            check_kwargs(LOOPS.get(loop), train_cfg, 'train_cfg', ignore=('type', 'by_epoch', 'runner', 'dataloader'))
    ow = cfg.get('optim_wrapper')
    if ow:
        for key in ow:
            if key not in OPTIM_WRAPPER_KEYS:
                raise ConfigError(f'optim_wrapper.{key}: unknown key{suggest(key, OPTIM_WRAPPER_KEYS)}')
        if 'constructor' in ow:
            _registered(OPTIM_WRAPPER_CONSTRUCTORS, ow['constructor'], 'optim_wrapper.constructor')
        if 'type' in ow:
            _registered(OPTIM_WRAPPERS, ow['type'], 'optim_wrapper')
        if ow.get('constructor') == 'TimmOptimWrapperConstructor':
            _check_timm_optimizer(ow.get('optimizer') or {})
    if cfg.get('lr_schedule') and cfg.get('param_scheduler'):
        raise ConfigError('lr_schedule and param_scheduler are both set; use one (lr_schedule = timm schedulers)')
    if cfg.get('lr_schedule'):
        _check_component(HOOKS, dict(cfg.lr_schedule, type='TimmSchedulerHook'), 'lr_schedule')
        HOOKS.get('TimmSchedulerHook')(**cfg.lr_schedule)  # validates against timm's create_scheduler_v2
    if cfg.get('model_ema'):
        HOOKS.get('TimmEMAHook')(**cfg.model_ema)  # validates against timm's ModelEmaV3
    for name, hook in (cfg.get('default_hooks') or {}).items():
        if hook is not None:
            _check_component(HOOKS, hook, f'default_hooks.{name}')
    for i, hook in enumerate(cfg.get('custom_hooks') or []):
        _check_component(HOOKS, hook, f'custom_hooks.{i}')
    for i, backend in enumerate((cfg.get('visualizer') or {}).get('vis_backends') or []):
        _check_component(VISBACKENDS, backend, f'visualizer.vis_backends.{i}')
    amp = cfg.get('amp', 'auto')
    if amp not in ('auto', True, False):
        raise ConfigError(f"amp: expected 'auto', True or False, got {amp!r}")
    if cfg.get('amp_dtype') not in (None, 'float16', 'bfloat16'):
        raise ConfigError(f"amp_dtype: expected 'float16' or 'bfloat16', got {cfg.amp_dtype!r}")
    if cfg.get('sync_bn') not in (None, 'torch'):
        raise ConfigError(f"sync_bn: expected None or 'torch', got {cfg.sync_bn!r}")
    wandb_cfg = cfg.get('wandb')
    if wandb_cfg is not None and not isinstance(wandb_cfg, dict):
        raise ConfigError(f'wandb: expected None or a dict of wandb.init arguments, got {wandb_cfg!r}')


def _check_int(value: Any, low: int, where: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
        raise ConfigError(f'{where}: expected an integer >= {low}, got {value!r}')


def _check_timm_optimizer(opt_cfg: dict) -> None:
    from timm.optim import list_optimizers
    name = opt_cfg.get('opt', 'adamw')
    if name.lower().split('_')[-1] not in list_optimizers():
        raise ConfigError(f"optim_wrapper.optimizer.opt: unknown timm optimizer {name!r}"
                          f"{suggest(name, list_optimizers())}")
    known = {'opt', 'lr', 'weight_decay', 'momentum', 'foreach', 'filter_bias_and_bn', 'layer_decay',
             'layer_decay_min_scale', 'layer_decay_no_opt_scale', 'type'}
    extra = {k: v for k, v in opt_cfg.items() if k not in known}
    if extra:
        from timm.optim import get_optimizer_class
        check_kwargs(get_optimizer_class(name, bind_defaults=False), extra, 'optim_wrapper.optimizer')


def _import_components() -> None:
    from . import data, hooks, metrics, models, optim  # noqa: F401  (registers the recipe's components)


# ----------------------------------------------------------------------------------------------- runner
class ZooRunner(Runner):
    """mmengine's Runner with atomic checkpoint files, strict checkpoint loading with clear errors, and
    resume that finds the newest complete checkpoint."""

    prefer_ema: bool = False

    @master_only
    def save_checkpoint(self, out_dir: str, filename: str, *args, **kwargs):
        from zoo.weights import atomic_write
        with atomic_write(os.path.join(out_dir, filename)) as tmp:
            super().save_checkpoint(out_dir, os.path.basename(tmp), *args, **kwargs)

    def load_checkpoint(self, filename: str, map_location='cpu', strict: bool = False,
                        revise_keys: list = [(r'^module\.', '')]):
        from mmengine.runner.checkpoint import _load_checkpoint_to_model
        checkpoint = read_checkpoint(filename, map_location)
        self.call_hook('after_load_checkpoint', checkpoint=checkpoint)
        if self.prefer_ema and 'state_dict_ema' in checkpoint:
            checkpoint['state_dict'] = checkpoint['state_dict_ema']
            self.logger.info(f'Using the EMA weights of {filename}')
        model = self.model.module if is_model_wrapper(self.model) else self.model
        check_state_dict(model, checkpoint.get('state_dict', {}), filename, self.cfg)
        _load_checkpoint_to_model(model, checkpoint, True, revise_keys=revise_keys)
        self._has_loaded = True
        self.logger.info(f'Load checkpoint from {filename}')
        return checkpoint

    @master_only
    def dump_config(self) -> None:
        """The config of this run goes beside its log, work_dir/<timestamp>/<config name>.py, so a later run in the
        same work dir never overwrites the config that produced the checkpoints already there."""
        name = os.path.basename(self.cfg.filename) if self.cfg.filename else f'{self.timestamp}.py'
        os.makedirs(self.log_dir, exist_ok=True)
        self.cfg.dump(os.path.join(self.log_dir, name))

    def load_or_resume(self) -> None:
        if self._has_loaded:
            return None
        if self._resume and self._load_from is None:
            latest = find_resume_checkpoint(self.work_dir)
            if latest is None:
                self.logger.warning(f'--resume: no checkpoint in {self.work_dir}; training from the start')
                self._resume = False
            else:
                self._load_from = latest
                self.logger.info(f'Resuming from {latest}')
        return super().load_or_resume()


def read_checkpoint(filename: str, map_location='cpu') -> dict:
    """torch.load(weights_only=True) a recipe checkpoint, with errors naming the file."""
    from zoo.weights.io import SAFETENSORS_EXTS, WeightsFileError, read_torch_file
    if not os.path.isfile(filename):
        raise FileNotFoundError(f'checkpoint {filename!r} does not exist')
    hint = ('a weight file (.safetensors, or a plain state dict) is loaded with model.pretrained=<file> '
            '(e.g. --opts model.pretrained=...)')
    if os.path.splitext(filename)[1].lower() in SAFETENSORS_EXTS:
        raise WeightsFileError(f'checkpoint {filename!r} is a weight file, not a training checkpoint of this '
                               f'recipe; {hint}')
    # WeightsFileError naming the file for anything unreadable: not a checkpoint, truncated, corrupt, unsafe
    checkpoint = read_torch_file(filename, map_location)
    if not isinstance(checkpoint, dict) or 'state_dict' not in checkpoint:
        raise WeightsFileError(f"checkpoint {filename!r} is not a training checkpoint of this recipe (no "
                               f"'state_dict'); {hint}")
    return checkpoint


def check_state_dict(model: torch.nn.Module, state_dict: dict, filename: str, cfg: Optional[Config] = None) -> None:
    """Raise IncompatibleKeysError naming the file and the first bad entries when `state_dict` does not fit."""
    from zoo.weights import IncompatibleKeysError
    own = model.state_dict()
    sd = {re.sub(r'^module\.', '', k): v for k, v in state_dict.items()}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or mismatched):
        return
    where = f' and the model built from {cfg.filename}' if cfg is not None and cfg.filename else ''
    parts = []
    if mismatched:
        k = mismatched[0]
        parts.append(f'{len(mismatched)} shape mismatch(es), first {k!r}: checkpoint {tuple(sd[k].shape)} vs model '
                     f'{tuple(own[k].shape)}')
    if missing:
        parts.append(f'{len(missing)} missing, first {missing[0]!r}')
    if unexpected:
        parts.append(f'{len(unexpected)} unexpected, first {unexpected[0]!r}')
    hint = ''
    num_classes = getattr(model, 'num_classes', None)
    if mismatched and num_classes is not None:
        hint = (f'; the config has model.num_classes={num_classes}: a checkpoint trained for another class count '
                f'needs model.pretrained=<file> (fine-tuning with a new head), not resume/eval')
    raise IncompatibleKeysError(f'checkpoint {filename!r} does not fit the model{where}: ' + '; '.join(parts) + hint,
                                missing, unexpected, mismatched)


def find_resume_checkpoint(work_dir: str) -> Optional[str]:
    """The checkpoint named in work_dir/last_checkpoint if it exists, else the newest epoch_/iter_ file."""
    pointer = os.path.join(work_dir, 'last_checkpoint')
    if os.path.isfile(pointer):
        with open(pointer) as f:
            path = f.read().strip()
        if path and os.path.isfile(path):
            return path
    found = []
    for pattern in RESUME_PATTERNS:
        for path in glob.glob(os.path.join(work_dir, pattern)):
            m = re.search(r'_(\d+)\.pth$', path)
            if m:
                found.append((int(m.group(1)), path))
    return max(found)[1] if found else None


# ----------------------------------------------------------------------------------------------- building
def resolve_launcher(launcher: str) -> str:
    """'auto' -> 'pytorch' under torchrun (WORLD_SIZE > 1), else 'none'."""
    if launcher == 'auto':
        launcher = 'pytorch' if int(os.environ.get('WORLD_SIZE', '1')) > 1 else 'none'
    if launcher not in ('none', 'pytorch'):
        raise ConfigError(f"launcher: expected 'none', 'pytorch' or 'auto', got {launcher!r} (use torchrun for "
                          f"several processes; slurm/mpi: start them with torchrun-style env variables)")
    return launcher


def init_distributed(launcher: str) -> str:
    """Initialise the process group for launcher 'pytorch' (gloo on CPU, nccl on CUDA) because mmengine's own
    init assumes CUDA."""
    launcher = resolve_launcher(launcher)
    if launcher == 'pytorch' and not torch.distributed.is_initialized():
        for var in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'):
            if var not in os.environ:
                raise ConfigError(f"launcher='pytorch' needs torchrun's environment variable {var}; start with "
                                  f"`torchrun --nproc_per_node=N -m zoo.train train CONFIG`")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', 0)))
            torch.distributed.init_process_group('nccl')
        else:
            torch.distributed.init_process_group('gloo')
    return launcher


def resolve_work_dir(cfg: Config, work_dir: Optional[str] = None) -> str:
    """`work_dir`, else the config's work_dir, else work_dirs/<config name>."""
    if work_dir:
        return work_dir
    if cfg.get('work_dir'):
        return cfg.work_dir
    return os.path.join('work_dirs', os.path.splitext(os.path.basename(cfg.filename or 'run'))[0])


def prepare_config(cfg: Config, work_dir: Optional[str] = None, launcher: str = 'auto') -> Config:
    """Translate the recipe's keys into mmengine Runner arguments (hooks, wrappers, visualizer)."""
    cfg = copy.deepcopy(cfg)
    name = cfg.filename or '<config>'
    cfg.work_dir = resolve_work_dir(cfg, work_dir)
    stem = os.path.splitext(os.path.basename(cfg.filename or 'run'))[0]
    # mmengine keys its logger and message hub by experiment name + second; keep runs in one process apart
    cfg.experiment_name = f"{cfg.get('experiment_name') or stem}_{uuid.uuid4().hex[:6]}"
    cfg.launcher = resolve_launcher(cfg.get('launcher', launcher) if launcher == 'auto' else launcher)
    if cfg.launcher == 'pytorch' and cfg.get('sync_bn') and not torch.cuda.is_available():
        raise ConfigError(f"{name}: sync_bn='torch': torch's SyncBatchNorm only runs on GPUs; unset it for CPU "
                          f"training")
    init_distributed(cfg.launcher)

    custom = list(cfg.get('custom_hooks') or [])
    custom += [dict(type='ConsistencyCheckHook'), dict(type='EpochSeedHook'), dict(type='PlainCheckpointHook')]
    if cfg.get('train_dataloader'):
        custom.append(dict(type='TrainingCurvesHook', plot=bool(cfg.get('plot_curves', True))))
    if cfg.get('lr_schedule'):
        custom.append(dict(type='TimmSchedulerHook', **cfg.lr_schedule))
    if cfg.get('model_ema'):
        custom.append(dict(type='TimmEMAHook', **cfg.model_ema))
    cfg.custom_hooks = custom

    hooks = dict(cfg.get('default_hooks') or {})
    ckpt = dict(hooks.get('checkpoint') or dict(type='CheckpointHook', interval=1))
    if ckpt.get('type') in ('CheckpointHook', None):
        ckpt['type'] = 'ZooCheckpointHook'
    if ckpt['type'] == 'ZooCheckpointHook' and cfg.get('val_dataloader'):
        ckpt.setdefault('save_best', 'auto')  # work_dir/best.pth: the best validated weights
    if not cfg.get('param_scheduler'):
        ckpt.setdefault('save_param_scheduler', False)  # the timm schedule is a function of the update count
    hooks['checkpoint'] = ckpt
    if hooks.get('progress', dict(type='ProgressHook')) is None:
        hooks.pop('progress')  # switched off (mmengine takes None only for its own default hooks)
    else:
        hooks.setdefault('progress', dict(type='ProgressHook'))  # bars / periodic lines on the main process
    if cfg.get('lr_schedule'):
        hooks['param_scheduler'] = None
    cfg.default_hooks = hooks

    ow = cfg.get('optim_wrapper')
    if ow:
        amp = cfg.get('amp', 'auto')
        use_amp = torch.cuda.is_available() and amp in ('auto', True)
        if amp is True and not torch.cuda.is_available():
            print_log('amp=True: automatic mixed precision needs CUDA here; training in float32 on CPU',
                      logger='current', level=logging.WARNING)
        if use_amp and ow.get('type', 'ZooOptimWrapper') in ('ZooOptimWrapper', 'OptimWrapper'):
            ow['type'] = 'ZooAmpOptimWrapper'
            if cfg.get('amp_dtype'):
                ow['dtype'] = cfg.amp_dtype
        elif ow.get('type') is None:
            ow['type'] = 'ZooOptimWrapper'

    if cfg.launcher == 'pytorch':
        wrapper = dict(cfg.get('model_wrapper_cfg') or dict(type='MMDistributedDataParallel'))
        wrapper.setdefault('broadcast_buffers', False)
        wrapper.setdefault('find_unused_parameters', bool(cfg.get('find_unused_parameters', False)))
        if not torch.cuda.is_available():
            wrapper['device_ids'] = None  # DDP over CPU modules takes no device ids
        cfg.model_wrapper_cfg = wrapper

    wandb_cfg = cfg.get('wandb')
    if wandb_cfg:
        vis = dict(cfg.get('visualizer') or dict(type='Visualizer'))
        backends = list(vis.get('vis_backends') or [dict(type='LocalVisBackend')])
        init_kwargs = dict(wandb_cfg)
        init_kwargs.setdefault('project', 'zoo')
        init_kwargs.setdefault('dir', cfg.work_dir)
        os.makedirs(init_kwargs['dir'], exist_ok=True)
        backends.append(dict(type='WandbVisBackend', init_kwargs=init_kwargs))
        vis['vis_backends'] = backends
        cfg.visualizer = vis
    return cfg


def build_runner(cfg: Config, work_dir: Optional[str] = None, launcher: str = 'auto') -> ZooRunner:
    _import_components()
    cfg = prepare_config(cfg, work_dir, launcher)
    runner = ZooRunner.from_cfg(cfg)
    return runner


def run_train(cfg: Config, work_dir: Optional[str] = None, resume: Optional[str] = None,
              launcher: str = 'auto') -> Dict[str, Any]:
    """Train as configured; `resume` = 'auto' (newest checkpoint in the work dir) or a checkpoint path.

    Returns {'metrics': last validation metrics, 'work_dir', 'checkpoint': last checkpoint, 'history', 'curves'}.
    Resuming a run that already reached train_cfg.max_epochs (max_iters) trains nothing and builds no runner: the
    result then also has 'completed' = dict(step, max, by_epoch) and the metrics of its last validation.
    """
    cfg = copy.deepcopy(cfg)
    if resume:
        done = _completed_run(cfg, resolve_work_dir(cfg, work_dir), resume)
        if done is not None:
            return done
        cfg.resume = True
        cfg.load_from = None if resume == 'auto' else resume
    runner = build_runner(cfg, work_dir, launcher)
    runner.train()
    return _summary(runner)


def run_eval(cfg: Config, checkpoint: str, work_dir: Optional[str] = None, launcher: str = 'auto',
             use_ema: bool = True) -> Dict[str, float]:
    """Evaluate `checkpoint` on the config's test split (val split when there is none); returns the metrics."""
    cfg = copy.deepcopy(cfg)
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f'checkpoint {checkpoint!r} does not exist')
    for key in ('train_dataloader', 'train_cfg', 'optim_wrapper', 'param_scheduler', 'lr_schedule', 'model_ema'):
        cfg[key] = None
    if 'pretrained' in cfg.model:
        cfg.model.pretrained = None  # the checkpoint holds every weight
    if cfg.get('test_dataloader') is None:
        cfg.test_dataloader, cfg.test_evaluator = cfg.get('val_dataloader'), cfg.get('val_evaluator')
        cfg.test_cfg = cfg.get('val_cfg') or dict()
    if cfg.get('test_dataloader') is None:
        raise ConfigError(f'{cfg.filename}: eval needs val_dataloader/val_evaluator or test_dataloader/test_evaluator')
    cfg.load_from, cfg.resume = checkpoint, False
    if work_dir is None and not cfg.get('work_dir'):
        stem = os.path.splitext(os.path.basename(cfg.filename or 'run'))[0]
        work_dir = os.path.join('work_dirs', stem, 'eval')
    runner = build_runner(cfg, work_dir, launcher)
    runner.prefer_ema = use_ema
    return runner.test()


def _last_metrics(history: dict) -> Dict[str, float]:
    metrics = {}
    for row in history['epochs']:
        metrics.update({k: v for k, v in row.items() if k not in ('epoch', 'train_loss')})
    return metrics


def _summary(runner: ZooRunner) -> Dict[str, Any]:
    hook = next((h for h in runner.hooks if type(h).__name__ == 'TrainingCurvesHook'), None)
    history = hook.history if hook is not None else dict(iters=[], epochs=[])
    curves = os.path.join(runner.work_dir, 'curves.png')
    return dict(metrics=_last_metrics(history), work_dir=runner.work_dir,
                checkpoint=find_resume_checkpoint(runner.work_dir), history=history,
                curves=curves if os.path.isfile(curves) else None)


def _completed_run(cfg: Config, work_dir: str, resume: str) -> Optional[Dict[str, Any]]:
    """The summary of the run `resume` points at when it has nothing left to train, else None."""
    path = find_resume_checkpoint(work_dir) if resume == 'auto' else resume
    if not path or not os.path.isfile(path):
        return None  # the runner reports a missing checkpoint
    try:  # only the meta and the history are needed: map the file instead of reading the tensors
        checkpoint = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception:
        checkpoint = read_checkpoint(path)  # raises the recipe's error for unreadable files
    meta = (checkpoint.get('meta') or {}) if isinstance(checkpoint, dict) else {}
    train_cfg = cfg.get('train_cfg') or {}
    by_epoch = train_cfg.get('by_epoch', True) and train_cfg.get('type', 'EpochBasedTrainLoop') != 'IterBasedTrainLoop'
    step, limit = (meta.get('epoch'), train_cfg.get('max_epochs')) if by_epoch else \
        (meta.get('iter'), train_cfg.get('max_iters'))
    if not isinstance(step, int) or not isinstance(limit, int) or step < limit:
        return None
    history = checkpoint.get('zoo_history') or dict(iters=[], epochs=[])
    saved = os.path.join(work_dir, 'history.json')  # written after the last validation, the checkpoint before it
    if os.path.abspath(os.path.dirname(path)) == os.path.abspath(work_dir) and os.path.isfile(saved):
        import json
        try:
            with open(saved) as f:
                on_disk = json.load(f)
            if len(on_disk.get('iters', [])) >= len(history.get('iters', [])):
                history = on_disk
        except (OSError, ValueError):
            pass
    curves = os.path.join(work_dir, 'curves.png')
    return dict(metrics=_last_metrics(history), work_dir=work_dir, checkpoint=path, history=history,
                curves=curves if os.path.isfile(curves) else None,
                completed=dict(step=step, max=limit, by_epoch=by_epoch))
