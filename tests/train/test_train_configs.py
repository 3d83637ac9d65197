"""Every config under configs/ loads, passes the checks and builds its model; bad entries fail clearly."""
import glob
import os

import pytest
from mmengine.registry import MODELS

import zoo.train  # noqa: F401
from zoo.train import ConfigError, load_config
from zoo.train.runner import parse_opts

CONFIG_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'configs')
CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(CONFIG_ROOT, '*', '*.py')) if '_base_' not in p)


def test_there_are_configs_for_both_tasks():
    names = [os.path.relpath(p, CONFIG_ROOT) for p in CONFIG_FILES]
    assert any(n.startswith('classification/') for n in names)
    assert {'fcos', 'retinanet', 'faster_rcnn'} <= {h for n in names for h in ('fcos', 'retinanet', 'faster_rcnn')
                                                     if n.startswith('detection/') and h in n}
    for name in names:  # configs/<task>/<model>_<data>.py
        task, stem = name.split(os.sep)
        assert task in ('classification', 'detection') and '_' in stem


@pytest.mark.parametrize('path', CONFIG_FILES, ids=lambda p: os.path.relpath(p, CONFIG_ROOT))
def test_config_loads_and_builds_model(path):
    cfg = load_config(path)
    for key in ('model', 'train_dataloader', 'val_dataloader', 'val_evaluator', 'optim_wrapper', 'train_cfg'):
        assert cfg.get(key), key
    model = MODELS.build(cfg.model)
    n_classes = cfg.model.num_classes
    assert model.num_classes == n_classes
    assert sum(p.numel() for p in model.parameters()) > 1e5


def test_opts_are_parsed_and_applied(cls_config):
    opts = parse_opts(['a.b=1', 'c=[1, 2]', 'd=adamw', 'e=None', 'f=true', "g={'x': 0.5}"])
    assert opts == {'a.b': 1, 'c': [1, 2], 'd': 'adamw', 'e': None, 'f': True, 'g': {'x': 0.5}}
    with pytest.raises(ConfigError, match="--opts: expected key=value, got 'lr'"):
        parse_opts(['lr'])
    cfg = load_config(cls_config, ['train_cfg.max_epochs=2', 'optim_wrapper.optimizer.lr=0.01',
                                   "model_ema={'decay': 0.99}"])
    assert cfg.train_cfg.max_epochs == 2 and cfg.optim_wrapper.optimizer.lr == 0.01 and cfg.model_ema.decay == 0.99


@pytest.mark.parametrize('opts, match', [
    (['train_cfg.max_epoch=2'], r"train_cfg.max_epoch: unknown key .*did you mean 'max_epochs'"),
    (['model.drop_pth_rate=0.1'], r"model.drop_pth_rate: unknown key for TimmClassifier .*'drop_path_rate'"),
    (['max_epochs=3'], r"unknown top-level key 'max_epochs'"),
    (['train_dataloader.datset.split=val'], r"train_dataloader.datset: unknown data loader key .*'dataset'"),
    (['optim_wrapper.optimizer.betaz=(0.9, 0.99)'], r"optim_wrapper.optimizer.betaz: unknown key for AdamW"),
    (['optim_wrapper.optimizer.opt=adamz'], r"unknown timm optimizer 'adamz'"),
    (['lr_schedule.warmup_epoch=2'], r"lr_schedule.warmup_epoch: unknown key .*'warmup_epochs'"),
    (['model_ema={"decai": 0.9}'], r"model_ema.decai: unknown key for ModelEmaV3"),
    (['val_evaluator.type=Acuracy'], r"val_evaluator.type: 'Acuracy' is not a registered metric"),
    (['visualizer.vis_backends.3.x=1'], r"'3' is not an index of the list visualizer.vis_backends"),
    (['train_cfg.max_epochs.x=1'], r"train_cfg.max_epochs is 6, not a dict"),
    (['model.model_name=resnet_18'], None),
])
def test_bad_config_entries_fail_clearly(cls_config, opts, match):
    if match is None:  # caught when the model is built: an unknown timm/zoo model name
        cfg = load_config(cls_config, opts)
        with pytest.raises(ConfigError, match=r"model.model_name: unknown timm/zoo model 'resnet_18'.*'resnet18'"):
            MODELS.build(cfg.model)
        return
    with pytest.raises(ConfigError, match=r'cbam_resnet18_digits.py: .*' + match):
        load_config(cls_config, opts)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file 'nope.py' does not exist"):
        load_config('nope.py')


def test_bad_head_kwargs(det_config):
    cfg = load_config(det_config, ["model.head_kwargs={'score_tresh': 0.1}"])
    with pytest.raises(ConfigError, match=r"head_kwargs.score_tresh: not an argument of torchvision FCOS.*"
                                          r"'score_thresh'"):
        MODELS.build(cfg.model)


def test_cli_reports_bad_data_before_training(cls_config, tmp_path, capsys):
    from zoo.train.cli import main
    missing = tmp_path / 'nope'
    opts = ['model.model_name=test_convnext',
            f"train_dataloader.dataset={{'type': 'ImageFolderDataset', 'root': '{missing}', '_delete_': True}}"]
    assert main(['train', cls_config, '--work-dir', str(tmp_path / 'w'), '--opts', *opts]) == 2
    err = capsys.readouterr().err
    assert err.startswith('zoo train: error: ') and "root: directory '" in err and "nope' does not exist" in err
    assert not list((tmp_path / 'w').glob('epoch_*.pth'))


def test_sync_bn_and_launcher_checks(cls_config, monkeypatch):
    from zoo.train.runner import prepare_config
    cfg = load_config(cls_config, ['sync_bn=torch'])
    monkeypatch.setenv('WORLD_SIZE', '2')  # as under torchrun
    if not __import__('torch').cuda.is_available():
        with pytest.raises(ConfigError, match="sync_bn='torch': torch's SyncBatchNorm only runs on GPUs"):
            prepare_config(cfg)
    cfg = load_config(cls_config)
    monkeypatch.delenv('MASTER_ADDR', raising=False)
    with pytest.raises(ConfigError, match="launcher='pytorch' needs torchrun's environment variable"):
        prepare_config(cfg)
    with pytest.raises(ConfigError, match="launcher: expected 'none', 'pytorch' or 'auto', got 'slurm'"):
        prepare_config(cfg, launcher='slurm')
    with pytest.raises(ConfigError, match="sync_bn: expected None or 'torch', got 'mmcv'"):
        load_config(cls_config, ['sync_bn=mmcv'])
