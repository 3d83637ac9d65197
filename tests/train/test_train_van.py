"""VAN-B0 as a detection backbone: the shapes FCOS config trains at tiny scale (narrow VAN, a few epochs) and
predicts boxes."""
import math

import torch
from mmengine.registry import DATASETS, MODELS

import zoo
import zoo.train  # noqa: F401
from zoo.blocks.conv_attention import LargeKernelAttention
from zoo.train import load_config, run_train


def test_van_b0_fcos_shapes_trains_and_predicts(recipe, tmp_path):
    small = dict(zoo.reduced_args('van_b0'), drop_path_rate=0.0)
    opts = recipe.tiny_det(str(tmp_path / 'shapes'), backbone='van_b0') + [
        f'model.backbone_kwargs={small!r}', 'train_cfg.max_epochs=6', 'train_cfg.val_interval=6',
        'optim_wrapper.optimizer.lr=0.002']
    cfg = load_config(f'{recipe.configs}/detection/van_b0_fcos_shapes.py', opts)
    assert cfg.model.backbone == 'van_b0' and cfg.model.head == 'fcos'
    result = run_train(cfg, work_dir=str(tmp_path / 'run'))
    losses = [e['train_loss'] for e in result['history']['epochs']]
    print('train loss per epoch', [round(x, 3) for x in losses], 'metrics', result['metrics'])
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.3, losses
    assert {'coco/AP', 'coco/AP50'} <= set(result['metrics'])

    model = MODELS.build(cfg.model).eval()
    body = model.detector.backbone.body
    assert any(isinstance(m, LargeKernelAttention) for m in body.modules())
    val = DATASETS.build(cfg.val_dataloader.dataset)
    item = val[0]
    out = model([item['inputs']], [item['data_samples']], mode='predict')[0]
    assert out['boxes'].shape[1] == 4 and len(out['boxes']) == len(out['scores'])
    assert torch.isfinite(out['scores']).all()
