"""ONNX export through the pure-PyTorch kernel path, validated with onnx.checker and onnxruntime.

The export call itself is timm's `timm.utils.onnx.onnx_export` (explicit ``dynamo=``, named dynamic
dims, ``external_data`` off for small models); this module adds what it lacks: the reference kernel path,
an atomic write that only ever publishes a validated file, and onnxruntime parity at more than one shape.

Which shapes are checked: the export shape, and batch + 1 at the export size (static export) or, with
``dynamic=True``, at a smaller and a larger non-square size (`other_sizes`: 160x192 and 320x256 for a 224 px
export) plus any ``check_sizes``. A dynamic export is refused up front (ValueError) when the model contains a
registered mixer or gate whose registry entry says ``onnx_dynamic=False`` (`dynamic_blockers`).

The tolerance rule: each output tensor (logits, or each feature map) is judged against its own scale,

    max |onnxruntime - PyTorch|  <=  max(atol, rtol * max |PyTorch|)        (default atol 1e-4, rtol 1e-5)

per output and per checked input. fp32 rounding grows with the magnitude of the tensor (randomly initialised
MaxViT features reach ~1e3), and a fixed absolute bound would be either meaningless for small logits or
unreachable for large features; 1e-5 relative leaves ~10x headroom over the ~1e-6 relative error measured
with 1 or 2 threads in PyTorch and onnxruntime, so the check holds at any thread count.
"""
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .io import atomic_write

__all__ = ['OnnxExportError', 'export_onnx', 'onnx_run', 'other_sizes', 'dynamic_blockers', 'tolerance']

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


def _session(path: str, threads: int = 0):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # errors are raised with their message; keep ORT quiet
    opts.intra_op_num_threads = threads  # 0: onnxruntime's default (one per core)
    return ort.InferenceSession(path, opts, providers=['CPUExecutionProvider'])


def _run(session, x: torch.Tensor) -> List[np.ndarray]:
    return session.run(None, {session.get_inputs()[0].name: x.detach().cpu().numpy()})


def onnx_run(path: str, x: torch.Tensor, threads: int = 0) -> List[np.ndarray]:
    """Run the ONNX model at `path` on `x` with onnxruntime's CPU provider; returns every output.

    `threads`: onnxruntime intra-op threads (0: its default)."""
    return _run(_session(path, threads), x)


def tolerance(reference: np.ndarray, atol: float = 1e-4, rtol: float = 1e-5) -> float:
    """The allowed max abs error for one compared tensor: max(atol, rtol * max |reference|)."""
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    return max(atol, rtol * scale)


def other_sizes(h: int, w: int) -> List[Tuple[int, int]]:
    """The sizes a dynamic export is checked at besides its own: one smaller and one larger, both non-square
    and different from (h, w) in each dimension, multiples of 8 (160x192 and 320x256 for 224x224)."""
    def r8(v: float) -> int:
        return max(8, int(round(v / 8)) * 8)
    small = (r8(h * 5 / 7), r8(w * 6 / 7))
    large = (r8(h * 10 / 7), r8(w * 8 / 7))
    if small[0] == small[1]:
        small = (small[0], small[1] + 8)
    if large[0] == large[1]:
        large = (large[0] + 8, large[1])
    return [small, large]


def dynamic_blockers(model: nn.Module) -> List[str]:
    """Registered mixers / gates inside `model` whose registry entry says one export does not run at every
    H x W (``onnx_dynamic=False``), as 'name (Class at module.path)'; empty when a dynamic export can work."""
    from functools import partial
    from zoo.blocks import gate_info, list_gates, list_mixers, mixer_info

    classes = []
    for info in [mixer_info(n) for n in list_mixers()] + [gate_info(n) for n in list_gates()]:
        fn = info.fn.func if isinstance(info.fn, partial) else info.fn
        if isinstance(fn, type) and not info.onnx_dynamic:
            classes.append((info.name, fn))
    found = []
    for path, module in model.named_modules():
        for name, cls in classes:
            if type(module) is cls:
                found.append(f'{name} ({cls.__name__} at {path or "<model>"})')
    return found


def _describe(exc: BaseException) -> str:
    """One line per link of the exception chain (the exporters wrap the real cause)."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen and len(parts) < 4:
        seen.add(id(exc))
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        parts.append(f'{type(exc).__name__}: {lines[0][:300] if lines else ""}')
        exc = exc.__cause__ or exc.__context__
    return ' <- caused by '.join(parts)


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
        rtol: float = 1e-5,
        ort_threads: int = 0,
        show_progress: bool = False,
) -> Dict[str, Any]:
    """Export `model` to ONNX at `path` and check it against PyTorch in onnxruntime.

    The batch dimension is always dynamic ('batch'); with `dynamic`, height and width are too.
    `img_size` (H, W) defaults to the model's pretrained cfg; `example_input` (B, C, H, W), when given,
    is the traced input and the first parity input (it overrides `img_size` and `batch_size`).
    Parity is checked at the export shape and at batch + 1: at the export size, or with `dynamic` at a smaller
    and a larger non-square size (`other_sizes`), plus every (H, W) in `check_sizes`.
    Each output passes when max |onnxruntime - PyTorch| <= max(`atol`, `rtol` * max |PyTorch output|) (see the
    module docstring). `ort_threads`: onnxruntime intra-op threads (0: its default). `show_progress`: a progress bar
    (`zoo.progress`) over the steps after the PyTorch outputs: export, onnxruntime session, one check per input.

    Nothing unvalidated is ever left at `path`: the file is written under a temporary name, checked,
    and renamed only when every check passes (an existing file at `path` survives a failure).
    Raises ValueError before exporting when `dynamic` is asked of a model with a mixer that cannot export
    dynamically (`dynamic_blockers`); OnnxExportError on a failed export, checker error, onnxruntime error or
    an error above the tolerance.
    Returns {path, exporter, dynamic, opset, file_size, checks: [{input_shape, max_abs_err, tol, max_rel_err}],
    max_abs_err, max_rel_err, atol, rtol}. Per check, `max_abs_err` and `tol` are the error and the allowed error of
    the output closest to its tolerance (the only output for a classifier; the check passed iff max_abs_err <= tol),
    and `max_rel_err` is the largest error over max |PyTorch output| of any output; the top-level values are the
    maxima over the checks.
    """
    from zoo.kernels.backend import use_backend
    from zoo.progress import progress
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
    if atol < 0 or rtol < 0:
        raise ValueError(f'atol, rtol: expected >= 0, got atol={atol}, rtol={rtol}')
    if dynamic:
        blockers = dynamic_blockers(model)
        if blockers:
            raise ValueError(f'dynamic: {type(model).__name__} cannot export with dynamic height and width: '
                             f'{", ".join(blockers)} registered with onnx_dynamic=False; export at a fixed size '
                             f'(dynamic=False) instead')
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
        sizes = other_sizes(h, w) + [_pair(s, 'check_sizes') for s in (check_sizes or ())]
        inputs[1:] = [torch.randn(batch_size + 1, in_chans, sh, sw, generator=gen) for sh, sw in sizes]

    was_training = model.training
    model.eval()
    report: Dict[str, Any] = dict(path=path, exporter=exporter, dynamic=dynamic, opset=None, file_size=None,
                                  checks=[], max_abs_err=None, max_rel_err=None, atol=atol, rtol=rtol)
    bar = None
    try:
        with use_backend('torch'), atomic_write(path) as tmp:
            with torch.no_grad():
                expected = [[t.float().numpy() for t in _flatten(model(x))] for x in inputs]
            # shown once the model ran: input it rejects fails in one line, with no progress before it
            bar = progress(total=2 + len(inputs), desc=f'export {type(model).__name__}', unit='step',
                           disable=not show_progress)
            bar.set_item(f'{exporter} export')
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
            bar.update(1, item='onnxruntime session')
            import onnx
            proto = onnx.load(tmp, load_external_data=False)
            report['opset'] = next((o.version for o in proto.opset_import if o.domain in ('', 'ai.onnx')), None)
            try:
                session = _session(tmp, ort_threads)
            except Exception as e:
                raise OnnxExportError(f'onnxruntime cannot load the {exporter} export: {type(e).__name__}: '
                                      f'{str(e)[:400]}', report) from e
            failed = []
            for x, want in zip(inputs, expected):
                bar.update(1, item='onnxruntime at ' + 'x'.join(map(str, x.shape)))
                try:
                    got = _run(session, x)
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
                # per output: error, scale, allowed error; the check reports the output closest to failing
                per_output = []
                for g, e in zip(got, want):
                    err = float(np.max(np.abs(g.astype(np.float64) - e))) if e.size else 0.0
                    scale = float(np.max(np.abs(e))) if e.size else 0.0
                    per_output.append((err, scale, tolerance(e, atol, rtol)))
                err, scale, tol = max(per_output, key=lambda o: (not o[0] <= o[2], o[0] / o[2] if o[2] else o[0]))
                check = dict(input_shape=tuple(x.shape), max_abs_err=err, tol=tol,
                             max_rel_err=max(o[0] / o[1] if o[1] else o[0] for o in per_output))
                report['checks'].append(check)
                if not err <= tol:
                    failed.append(f'{tuple(x.shape)}: {err:.3g} > {tol:.3g} (max |PyTorch| {scale:.3g})')
            bar.update(1, item='done')
            report['max_abs_err'] = max(c['max_abs_err'] for c in report['checks'])
            report['max_rel_err'] = max(c['max_rel_err'] for c in report['checks'])
            if failed:
                raise OnnxExportError(
                    f'onnxruntime differs from PyTorch by more than max(atol={atol:g}, rtol={rtol:g} * max |output|) '
                    f'({exporter} exporter, dynamic={dynamic}) at {"; ".join(failed)}; nothing was written '
                    f'to {path}', report)
            report['file_size'] = os.path.getsize(tmp)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return report
