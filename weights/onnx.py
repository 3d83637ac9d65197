"""ONNX export through the pure-PyTorch kernel path, validated with onnx.checker and onnxruntime.

The export call itself is timm's `timm.utils.onnx.onnx_export` (explicit ``dynamo=``, named dynamic
dims, ``external_data`` off for small models); this module adds what it lacks: the reference kernel path,
an atomic write that only ever publishes a validated file, and onnxruntime parity at more than one shape.
"""
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .io import atomic_write

__all__ = ['OnnxExportError', 'export_onnx', 'onnx_run']

EXPORTERS = ('dynamo', 'legacy')
_PROTOBUF_LIMIT = 2 ** 31 - 2 ** 27  # bytes of weights a single-file ONNX model can hold, with headroom


class OnnxExportError(RuntimeError):
    """Export, checking or onnxruntime parity failed. `report` holds what was measured before the failure."""

    def __init__(self, message: str, report: Optional[Dict[str, Any]] = None):
        super().__init__(message)
        self.report = report or {}


def _pair(value: Union[int, Sequence[int]], argname: str) -> Tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    value = tuple(value)
    if len(value) != 2 or not all(isinstance(v, int) and v > 0 for v in value):
        raise ValueError(f'{argname}: expected (H, W) of positive ints, got {value!r}')
    return value


def _flatten(out: Any) -> List[torch.Tensor]:
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flatten(o)]
    raise TypeError(f'model output: expected tensors (or lists / tuples / dicts of them), got {type(out).__name__}')


def onnx_run(path: str, x: torch.Tensor) -> List[np.ndarray]:
    """Run the ONNX model at `path` on `x` with onnxruntime's CPU provider; returns every output."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # errors are raised with their message; keep ORT quiet
    session = ort.InferenceSession(path, opts, providers=['CPUExecutionProvider'])
    return session.run(None, {session.get_inputs()[0].name: x.detach().cpu().numpy()})


def _describe(exc: BaseException) -> str:
    """One line per link of the exception chain (the exporters wrap the real cause)."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen and len(parts) < 4:
        seen.add(id(exc))
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        parts.append(f'{type(exc).__name__}: {lines[0][:300] if lines else ""}')
        exc = exc.__cause__ or exc.__context__
    return ' <- caused by '.join(parts)


def _second_size(h: int, w: int) -> Tuple[int, int]:
    # different in both dims and not square, still a multiple of 32 when the export size is
    return h + 32, w + 64


def export_onnx(
        model: nn.Module,
        path: Union[str, os.PathLike],
        img_size: Optional[Union[int, Sequence[int]]] = None,
        batch_size: int = 2,
        dynamic: bool = False,
        exporter: str = 'dynamo',
        opset: Optional[int] = None,
        check_sizes: Optional[Sequence[Sequence[int]]] = None,
        atol: float = 1e-4,
        example_input: Optional[torch.Tensor] = None,
) -> Dict[str, Any]:
    """Export `model` to ONNX at `path` and check it against PyTorch in onnxruntime.

    The batch dimension is always dynamic ('batch'); with `dynamic`, height and width are too.
    `img_size` (H, W) defaults to the model's pretrained cfg; `example_input` (B, C, H, W), when given,
    is the traced input and the first parity input (it overrides `img_size` and `batch_size`).
    Parity is checked at the export shape, at batch + 1 and, with `dynamic`, at a second size
    (H + 32, W + 64) plus every (H, W) in `check_sizes`.

    Nothing unvalidated is ever left at `path`: the file is written under a temporary name, checked,
    and renamed only when every check passes (an existing file at `path` survives a failure).
    Raises OnnxExportError on a failed export, checker error, onnxruntime error or max abs error > `atol`.
    Returns {path, exporter, dynamic, opset, file_size, checks: [{input_shape, max_abs_err}], max_abs_err}.
    """
    from zoo.kernels.backend import use_backend
    from timm.utils.onnx import onnx_export

    if exporter not in EXPORTERS:
        raise ValueError(f'exporter: expected one of {EXPORTERS}, got {exporter!r}')
    path = os.fspath(path)
    if not path.lower().endswith('.onnx'):
        raise ValueError(f"path: expected a file name ending in '.onnx', got {path!r}")
    if example_input is not None:
        if example_input.dim() != 4:
            raise ValueError(f'example_input: expected (B, C, H, W), got shape {tuple(example_input.shape)}')
        batch_size, in_chans, h, w = example_input.shape
    else:
        cfg = getattr(model, 'pretrained_cfg', None) or {}
        if img_size is None:
            if 'input_size' not in cfg:
                raise ValueError('img_size: not given and the model has no pretrained_cfg input_size')
            img_size = cfg['input_size'][-2:]
        h, w = _pair(img_size, 'img_size')
        in_chans = getattr(model, 'in_chans', None) or cfg.get('input_size', (3,))[0]
    if batch_size < 2:
        raise ValueError(f'batch_size: expected >= 2 (torch.export specialises size-1 dims, which breaks a '
                         f'dynamic batch), got {batch_size}')
    if check_sizes and not dynamic:
        raise ValueError('check_sizes: other sizes can only be checked with dynamic=True')
    param_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    if param_bytes >= _PROTOBUF_LIMIT:
        raise ValueError(f'model: {param_bytes / 2 ** 30:.2f} GiB of weights do not fit a single-file ONNX model '
                         f'(external data is not supported here)')

    gen = torch.Generator().manual_seed(0)
    if example_input is None:
        example_input = torch.randn(batch_size, in_chans, h, w, generator=gen)
    example_input = example_input.detach().float().cpu()
    inputs = [example_input, torch.randn(batch_size + 1, in_chans, h, w, generator=gen)]
    if dynamic:
        sizes = [_second_size(h, w)] + [_pair(s, 'check_sizes') for s in (check_sizes or ())]
        inputs[1:] = [torch.randn(batch_size + 1, in_chans, sh, sw, generator=gen) for sh, sw in sizes]

    was_training = model.training
    model.eval()
    report: Dict[str, Any] = dict(path=path, exporter=exporter, dynamic=dynamic, opset=None, file_size=None,
                                  checks=[], max_abs_err=None)
    try:
        with use_backend('torch'), atomic_write(path) as tmp:
            with torch.no_grad():
                expected = [[t.float().numpy() for t in _flatten(model(x))] for x in inputs]
            output_names = ['output'] if len(expected[0]) == 1 else [f'output{i}' for i in range(len(expected[0]))]
            try:
                onnx_export(
                    model, tmp, example_input=example_input, check=True, opset=opset, dynamic_size=dynamic,
                    use_dynamo=exporter == 'dynamo', input_names=['input'], output_names=output_names,
                    external_data=False)
            except Exception as e:
                raise OnnxExportError(
                    f'ONNX export of {type(model).__name__} with the {exporter} exporter '
                    f'(dynamic={dynamic}) failed: {_describe(e)}', report) from e
            import onnx
            proto = onnx.load(tmp, load_external_data=False)
            report['opset'] = next((o.version for o in proto.opset_import if o.domain in ('', 'ai.onnx')), None)
            for x, want in zip(inputs, expected):
                try:
                    got = onnx_run(tmp, x)
                except Exception as e:
                    hint = '' if x is example_input else (
                        '; the graph looks specialised to the export shape: a size was baked in, or the model takes '
                        'another code path at this size (e.g. windows clamped to small maps, padding only at some '
                        'sizes). Export and check at sizes of the same regime, or use dynamic=False')
                    raise OnnxExportError(
                        f'onnxruntime failed on the {exporter} export at input {tuple(x.shape)} '
                        f'(exported at {tuple(example_input.shape)}): {type(e).__name__}: {str(e)[:400]}{hint}',
                        report) from e
                if len(got) != len(want) or any(g.shape != e.shape for g, e in zip(got, want)):
                    raise OnnxExportError(
                        f'onnxruntime output shapes {[g.shape for g in got]} differ from PyTorch '
                        f'{[e.shape for e in want]} at input {tuple(x.shape)}', report)
                err = max(float(np.max(np.abs(g.astype(np.float64) - e))) if e.size else 0.0
                          for g, e in zip(got, want))
                report['checks'].append(dict(input_shape=tuple(x.shape), max_abs_err=err))
            report['max_abs_err'] = max(c['max_abs_err'] for c in report['checks'])
            if not report['max_abs_err'] <= atol:
                errs = ', '.join(f"{c['input_shape']}: {c['max_abs_err']:.3g}" for c in report['checks'])
                raise OnnxExportError(
                    f'onnxruntime differs from PyTorch by more than atol={atol:g} '
                    f'({exporter} exporter, dynamic={dynamic}): max abs error per input {errs}; nothing was written '
                    f'to {path}', report)
            report['file_size'] = os.path.getsize(tmp)
    finally:
        model.train(was_training)
    return report
