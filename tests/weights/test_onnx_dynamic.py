"""One dynamic ONNX export at 224 px runs correctly at other sizes, for every registered model.

Each model is built narrow and shallow (`zoo.reduced_args`) at the default img_size of 224, so windows, shifts
and dilations are those of the real model; it is exported once with dynamic batch, height and width and checked
in onnxruntime against eager PyTorch at 224x224, 160x192 and 320x256, and at the odd size 97x131
(`export_onnx` does the checking, with its tolerance rule max(atol, rtol * max |output|)). The legacy
(TorchScript) exporter runs every model; the dynamo exporter runs the models whose dynamic export is quick
enough for the suite (see DYNAMO).
"""
import pytest
import timm
import torch

import zoo
from zoo.weights.onnx import dynamic_blockers, export_onnx, other_sizes

EXPORT_SIZE = 224
OTHER_SIZES = [(160, 192), (320, 256)]
ODD_SIZE = (97, 131)  # odd everywhere: padding in the stems, patch merging, windows and neighborhoods
# through the dynamo exporter: the models whose dynamic export (reduced) takes under ~30 s on 2 CPU cores.
# hybrid_tiny runs the window, neighborhood and grid mixers and CBAM in one model (~25 s); the one-family models
# export dynamically with dynamo too but take 35-70 s each (swin_tiny 41, maxvit_tiny 51, nat_mini 35,
# dinat_mini 59, dinat_s_tiny 69, agent_swin_tiny 39, biformer_tiny 37 s for the export alone). The smallest Twins
# and SHViT run here too: their mixers ('spatial_reduction', 'single_head', unmasked 'window') are checked by no
# other dynamo export (issue 17); so do VAN and the PSA / ELA ResNets ('lka', 'psa_p', 'psa_s', 'ela'; issue 16)
DYNAMO = ['cbam_resnet18', 'hybrid_tiny', 'van_b0', 'psa_resnet50', 'ela_resnet18', 'zoo_twins_pcpvt_small',
          'zoo_twins_svt_small', 'zoo_shvit_s1']


def _reduced(name: str) -> torch.nn.Module:
    return timm.create_model(name, **zoo.reduced_args(name)).eval()


def _check(report, name):
    shapes = [c['input_shape'][2:] for c in report['checks']]
    assert shapes == [(EXPORT_SIZE, EXPORT_SIZE)] + OTHER_SIZES + [ODD_SIZE], (name, shapes)
    assert all(c['max_abs_err'] <= c['tol'] for c in report['checks']), (name, report['checks'])


def test_checked_sizes_are_a_smaller_and_a_larger_non_square_size():
    assert other_sizes(EXPORT_SIZE, EXPORT_SIZE) == OTHER_SIZES
    for h, w in [(64, 64), (96, 160), (384, 384)]:
        (sh, sw), (lh, lw) = other_sizes(h, w)
        assert sh < h and sw < w and lh > h and lw > w and sh != sw and lh != lw


@pytest.mark.parametrize('name', zoo.list_zoo_models())
def test_dynamic_export_runs_at_other_sizes(name, tmp_path):
    model = _reduced(name)
    path = tmp_path / f'{name}.onnx'
    if dynamic_blockers(model):  # the registry says it cannot: refused before anything is exported
        with pytest.raises(ValueError, match='cannot export with dynamic height and width'):
            export_onnx(model, path, img_size=EXPORT_SIZE, dynamic=True, exporter='legacy')
        assert not path.exists()
        return
    report = export_onnx(model, path, img_size=EXPORT_SIZE, dynamic=True, exporter='legacy', check_sizes=[ODD_SIZE])
    _check(report, name)


@pytest.mark.parametrize('name', DYNAMO)
def test_dynamic_export_dynamo(name, tmp_path):
    report = export_onnx(_reduced(name), tmp_path / f'{name}.onnx', img_size=EXPORT_SIZE, dynamic=True,
                         exporter='dynamo', check_sizes=[ODD_SIZE])
    _check(report, name)


def test_a_mixer_flagged_not_dynamic_is_refused_before_exporting(tmp_path, capsys, monkeypatch):
    import dataclasses

    from zoo.blocks import _registry
    from zoo.cli import main
    info = _registry.mixer_info('window')
    monkeypatch.setitem(_registry._MIXERS, 'window', dataclasses.replace(info, onnx_dynamic=False))
    model = _reduced('swin_tiny')
    assert dynamic_blockers(model)[0].startswith('window (WindowAttention at stages.0.blocks.0.attn')
    with pytest.raises(ValueError, match='cannot export with dynamic height and width'):
        export_onnx(model, tmp_path / 'a.onnx', img_size=64, dynamic=True, exporter='legacy')

    out = tmp_path / 'swin.onnx'
    assert main(['export', 'swin_tiny', '-o', str(out), '--dynamic', '--exporter', 'legacy']) == 2
    err = capsys.readouterr().err
    assert err.startswith('zoo export: error: --dynamic: swin_tiny cannot export with dynamic height and width')
    assert len(err.strip().splitlines()) == 1 and not list(tmp_path.iterdir())
