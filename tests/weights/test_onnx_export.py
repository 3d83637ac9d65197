"""weights.onnx.export_onnx: both exporters, static and dynamic shapes, onnxruntime parity, no invalid artefacts."""
import os

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.kernels import backend
from zoo.weights.onnx import OnnxExportError, export_onnx, onnx_run


class TinyAttnNet(nn.Module):
    """Conv stem /4 -> cyclic shift (as in Swin) -> 4-D multi-head SDPA over all tokens -> mean pool -> linear."""

    def __init__(self, dim: int = 16, heads: int = 2, num_classes: int = 5):
        super().__init__()
        self.in_chans, self.num_classes, self.heads = 3, num_classes, heads
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, num_classes)
        self.backends_seen = []

    def forward(self, x):
        self.backends_seen.append(backend.get_backend())
        x = self.stem(x)
        B, C, H, W = x.shape
        x = torch.roll(x, shifts=(1, 2), dims=(2, 3)).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(x).reshape(B, H * W, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, H * W, C)
        return self.head(self.proj(x).mean(1))


class IntSizePosEmbed(nn.Module):
    """Position table resized through Python ints: both exporters silently bake the traced size in."""

    def __init__(self):
        super().__init__()
        self.in_chans = 3
        self.stem = nn.Conv2d(3, 8, 8, stride=8)
        self.pos = nn.Parameter(torch.randn(1, 8, 4, 4))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        h, w = int(x.shape[-2]), int(x.shape[-1])
        x = x + F.interpolate(self.pos, size=(h, w), mode='bilinear', align_corners=False)
        return self.head(x.mean((2, 3)))


class ExportDiffers(TinyAttnNet):
    """Computes something else while being exported, so onnxruntime disagrees with eager PyTorch."""

    def forward(self, x):
        out = super().forward(x)
        return out + 1.0 if backend.is_exporting() else out


@torch.library.custom_op('zoo_test::opaque', mutates_args=())
def _opaque(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_opaque.register_fake
def _(x):
    return torch.empty_like(x)


class CustomOpNet(TinyAttnNet):
    """Calls an op no exporter knows (a stand-in for an unguarded Triton kernel)."""

    def forward(self, x):
        return _opaque(super().forward(x))


def _check_model_file(path, dynamic, batch=2):
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param  # batch is always symbolic
    assert bool(dims[2].dim_param) == dynamic and bool(dims[3].dim_param) == dynamic
    assert not os.path.exists(str(path) + '.data')  # single file, no external data


@pytest.mark.parametrize('exporter', ['dynamo', 'legacy'])
@pytest.mark.parametrize('dynamic', [False, True])
def test_export_parity(tmp_path, exporter, dynamic):
    model = TinyAttnNet().train()
    path = tmp_path / 'tiny.onnx'
    report = export_onnx(model, path, img_size=(64, 64), dynamic=dynamic, exporter=exporter)

    assert model.training  # mode restored
    assert set(model.backends_seen) == {'torch'}  # the reference path was forced for every forward
    assert report['path'] == str(path) and report['exporter'] == exporter and report['dynamic'] == dynamic
    assert report['file_size'] == os.path.getsize(path) and report['opset'] >= 17
    shapes = [c['input_shape'] for c in report['checks']]
    # dynamic: a smaller and a larger non-square size besides the export size
    assert shapes == ([(2, 3, 64, 64), (3, 3, 48, 56), (3, 3, 88, 72)] if dynamic else
                      [(2, 3, 64, 64), (3, 3, 64, 64)])
    assert all(c['max_abs_err'] <= c['tol'] == 1e-4 for c in report['checks'])
    assert sorted(os.listdir(tmp_path)) == ['tiny.onnx']
    _check_model_file(path, dynamic)

    # an independent shape, checked here rather than by export_onnx
    model.eval()
    x = torch.randn(4, 3, 80, 48) if dynamic else torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(onnx_run(str(path), x)[0], want, rtol=1e-4, atol=1e-4)
    if not dynamic:
        with pytest.raises(Exception, match='(?i)dimension'):
            onnx_run(str(path), torch.randn(2, 3, 96, 96))


@pytest.mark.parametrize('exporter', ['dynamo', 'legacy'])
def test_baked_size_is_caught_and_nothing_written(tmp_path, exporter):
    path = tmp_path / 'pos.onnx'
    path.write_bytes(b'previous good file')
    with pytest.raises(OnnxExportError, match=r'onnxruntime failed .* at input \(3, 3, 48, 56\)') as info:
        export_onnx(IntSizePosEmbed(), path, img_size=64, dynamic=True, exporter=exporter)
    assert info.value.report['checks'][0]['input_shape'] == (2, 3, 64, 64)  # the export size itself passed
    assert path.read_bytes() == b'previous good file'
    assert sorted(os.listdir(tmp_path)) == ['pos.onnx']


def test_parity_failure_keeps_no_file(tmp_path):
    with pytest.raises(OnnxExportError, match=r'differs from PyTorch by more than max\(atol=0\.0001, rtol=1e-05 \* '
                                              r'max \|output\|\) .* at \(2, 3, 32, 32\): 1 > 0\.0001') as info:
        export_onnx(ExportDiffers(), tmp_path / 'bad.onnx', img_size=32, exporter='legacy')
    assert info.value.report['max_abs_err'] == pytest.approx(1.0, abs=1e-5)
    assert os.listdir(tmp_path) == []


class Scaled(nn.Module):
    """Multiplies a model's output by a constant: the same relative error at another scale."""

    def __init__(self, model: nn.Module, factor: float, shift: float = 0.):
        super().__init__()
        self.model, self.factor, self.shift, self.in_chans = model, factor, shift, 3

    def forward(self, x):
        out = self.model(x) * self.factor
        return out + self.shift if backend.is_exporting() else out


def test_tolerance_follows_the_output_scale(tmp_path):
    """max |ort - torch| <= max(atol, rtol * max |torch|), judged on the compared tensor's own scale."""
    torch.manual_seed(0)
    # logits of scale ~1e5: fp32 rounding alone is ~1e-2 absolute, within 1e-5 of the scale
    big = Scaled(TinyAttnNet(), 1e5)
    report = export_onnx(big, tmp_path / 'big.onnx', img_size=32, exporter='legacy')
    scale = report['checks'][0]['tol'] / 1e-5
    assert scale > 1e4 and all(c['max_rel_err'] < 1e-5 for c in report['checks'])
    # an error of 1e-4 of the scale fails, although it is far below the scale's fp32 rounding in absolute terms
    bad = Scaled(TinyAttnNet(), 1e5, shift=10 * scale * 1e-5)
    with pytest.raises(OnnxExportError, match='differs from PyTorch'):
        export_onnx(bad, tmp_path / 'bad.onnx', img_size=32, exporter='legacy')
    # at a small scale the absolute floor applies; rtol=0 makes it the whole rule
    small = Scaled(TinyAttnNet(), 1e-3, shift=5e-5)
    report = export_onnx(small, tmp_path / 'small.onnx', img_size=32, exporter='legacy', rtol=0.)
    assert all(c['tol'] == 1e-4 and c['max_abs_err'] == pytest.approx(5e-5, rel=1e-2) for c in report['checks'])
    assert sorted(os.listdir(tmp_path)) == ['big.onnx', 'small.onnx']


def test_failed_export_leaves_nothing(tmp_path):
    with pytest.raises(OnnxExportError, match='with the legacy exporter .* failed') as info:
        export_onnx(CustomOpNet(), tmp_path / 'custom.onnx', img_size=32, exporter='legacy')
    assert 'zoo_test' in str(info.value.__cause__)
    assert os.listdir(tmp_path) == []


def test_timm_model_and_example_input(tmp_path):
    import timm
    model = timm.create_model('resnet10t', num_classes=7)
    x = torch.rand(3, 3, 64, 96)
    report = export_onnx(model, tmp_path / 'r.onnx', example_input=x, dynamic=True, exporter='legacy',
                         check_sizes=[(32, 48)])
    assert [c['input_shape'] for c in report['checks']] == [(3, 3, 64, 96), (4, 3, 48, 80), (4, 3, 88, 112),
                                                            (4, 3, 32, 48)]
    assert report['max_abs_err'] <= 1e-4


def test_bad_arguments(tmp_path):
    model = TinyAttnNet()
    with pytest.raises(ValueError, match="exporter: expected one of"):
        export_onnx(model, tmp_path / 'a.onnx', img_size=32, exporter='torchscript')
    with pytest.raises(ValueError, match=r'batch_size: expected >= 2 .* got 1'):
        export_onnx(model, tmp_path / 'a.onnx', img_size=32, batch_size=1)
    with pytest.raises(ValueError, match=r"path: expected a file name ending in '\.onnx'"):
        export_onnx(model, tmp_path / 'a.pth', img_size=32)
    with pytest.raises(ValueError, match='img_size: not given'):
        export_onnx(model, tmp_path / 'a.onnx')
    with pytest.raises(ValueError, match='check_sizes: other sizes can only be checked with dynamic=True'):
        export_onnx(model, tmp_path / 'a.onnx', img_size=32, check_sizes=[(64, 64)])
    assert os.listdir(tmp_path) == []
