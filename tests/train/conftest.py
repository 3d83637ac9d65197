"""Fixtures for the training-recipe tests: tiny configs (timm's 0.2M-parameter test models, a few batches)."""
import os
import types

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(REPO, 'configs')

# a tiny classification run: 3 batches of 32 digits per epoch, light augmentation, a log line every iteration
TINY_CLS = (
    'model.model_name=test_convnext',
    'train_dataloader.batch_size=32', 'train_dataloader.num_batch_per_epoch=3',
    "train_dataloader.dataset.transform={'scale': (0.8, 1.0), 'hflip': 0.0, 'color_jitter': 0.0}",
    'val_dataloader.num_batch_per_epoch=1', 'default_hooks.logger.interval=1',
    'train_cfg.max_epochs=3', 'lr_schedule.warmup_epochs=0', 'optim_wrapper.optimizer.lr=0.004',
)


def tiny_det(root, backbone='test_efficientnet'):
    """A small FCOS run (160 iterations of 4 images at 96 px, ~20 s) on a generated shapes set under `root`."""
    return [
        f'model.backbone={backbone}', 'model.fpn_channels=64', 'model.min_size=96', 'model.max_size=96',
        f'train_dataloader.dataset.root={root}', f'val_dataloader.dataset.root={root}',
        'train_dataloader.dataset.num_images=32', 'val_dataloader.dataset.num_images=8',
        'train_dataloader.dataset.min_size=80', 'train_dataloader.dataset.max_size=112',
        'val_dataloader.dataset.min_size=80', 'val_dataloader.dataset.max_size=112',
        'train_dataloader.batch_size=4', 'val_dataloader.batch_size=4', 'default_hooks.logger.interval=1',
        'train_cfg.max_epochs=20', 'train_cfg.val_interval=10', 'lr_schedule.warmup_epochs=1',
        'optim_wrapper.optimizer.lr=0.004', "model.head_kwargs={'score_thresh': 0.0}",
    ]


@pytest.fixture(scope='session')
def recipe():
    """Paths and tiny-run overrides shared by the tests."""
    return types.SimpleNamespace(
        repo=REPO, configs=CONFIGS,
        cls_config=os.path.join(CONFIGS, 'classification', 'cbam_resnet18_digits.py'),
        det_config=os.path.join(CONFIGS, 'detection', 'cbam_resnet18_fcos_shapes.py'),
        tiny_cls=list(TINY_CLS), tiny_det=tiny_det)


def offline_env(mp, root):
    """wandb never reaches the network or the home folder."""
    mp.setenv('WANDB_MODE', 'offline')
    mp.setenv('WANDB_DIR', str(root))
    mp.setenv('WANDB_CACHE_DIR', os.path.join(str(root), 'wandb_cache'))
    mp.setenv('WANDB_CONFIG_DIR', os.path.join(str(root), 'wandb_config'))


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    offline_env(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)  # default work_dirs/ and data/ land in tmp_path
    yield


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    """One intra-op thread: these tiny models gain little from two, and a shared or xdist-loaded CPU makes
    OpenMP threads spin-wait (several times slower)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cls_config(recipe):
    return recipe.cls_config


@pytest.fixture
def det_config(recipe):
    return recipe.det_config
