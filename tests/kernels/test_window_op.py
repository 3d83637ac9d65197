"""Window attention op: reference vs a dense brute-force oracle, Triton (interpreter) vs reference,
backend switch, input errors, TorchScript."""
from typing import Optional, Tuple

import pytest
import torch

import zoo.kernels.backend
from zoo.kernels import use_backend
from zoo.kernels._args import pair as _pair
from zoo.kernels.window import window_attention, window_attention_ref
from zoo.kernels.window.naive import window_attention_naive
from zoo.kernels.window.triton import window_attention_triton

# (H, W, window, mode, shift, table half-size M or None, heads, head_dim)
CASES = {
    'block': (8, 8, (4, 4), 'block', (0, 0), None, 2, 16),
    'block_bias': (8, 8, (4, 4), 'block', (0, 0), (4, 4), 2, 32),
    'shifted': (8, 8, (4, 4), 'block', (2, 2), (4, 4), 2, 16),
    'shift_h_only': (8, 12, (4, 4), 'block', (1, 0), (4, 4), 2, 16),
    'shift_w_only': (8, 12, (4, 4), 'block', (0, 3), None, 2, 16),
    'rect_window': (9, 8, (3, 4), 'block', (1, 2), (3, 4), 2, 16),
    'padded_13x10': (13, 10, (4, 4), 'block', (2, 2), (4, 4), 2, 16),
    'padded_9x16_noshift': (9, 16, (5, 5), 'block', (0, 0), (5, 5), 2, 16),
    'swin_7_padded': (15, 9, (7, 7), 'block', (3, 3), (7, 7), 2, 16),
    'map_smaller_than_window': (5, 6, (7, 7), 'block', (3, 3), (7, 7), 2, 16),
    'table_larger': (8, 8, (4, 4), 'block', (2, 2), (6, 7), 2, 16),
    'grid': (8, 8, (4, 4), 'grid', (0, 0), (4, 4), 2, 16),
    'grid_padded': (13, 10, (3, 4), 'grid', (0, 0), (5, 6), 2, 32),
    'grid_nobias_9x16': (9, 16, (3, 3), 'grid', (0, 0), None, 2, 16),
}


def _make(case, batch=2, dtype=torch.float32, table_grad=True):
    H, W, window, mode, shift, M, nh, d = CASES[case]
    qkv = torch.randn(batch, H, W, 3, nh, d).to(dtype).requires_grad_()
    table = None
    if M is not None:
        table = (torch.randn(nh, 2 * M[0] - 1, 2 * M[1] - 1) * 2).requires_grad_(table_grad)
    return qkv, table, dict(window_size=window, mode=mode, shift=shift)


def _run(fn, qkv, table, kw, grad_out):
    """Forward on q, k, v views of qkv, then grads of (qkv, table) for grad_out."""
    q, k, v = qkv.unbind(3)
    out = fn(q, k, v, kw['window_size'], kw['mode'], kw['shift'], table, None)
    inputs = [qkv] + ([table] if table is not None and table.requires_grad else [])
    return [out] + list(torch.autograd.grad(out, inputs, grad_out))


def _max_err(a, b):
    return [(x.float() - y.float()).abs().max().item() for x, y in zip(a, b)]


def _assert_fp32_close(got, want, names, label, tol=1e-5):
    """Max abs error within tol times the scale of the tensor (d_table sums dS over all windows: ~10-30)."""
    for name, err, ref in zip(names, _max_err(got, want), want):
        assert err <= tol * max(1.0, ref.abs().max().item()), f'{label} {name}: max abs err {err}'


# ---------------------------------------------------------------- reference vs dense oracle

@pytest.mark.parametrize('case', list(CASES))
def test_reference_matches_dense_oracle(case):
    qkv, table, kw = _make(case)
    grad_out = torch.randn(qkv.shape[:3] + qkv.shape[4:])
    ref = _run(window_attention_ref, qkv, table, kw, grad_out)
    naive = _run(window_attention_naive, qkv, table, kw, grad_out)
    _assert_fp32_close(naive, ref, ['out', 'd_qkv', 'd_table'], case)


def test_oracle_shift_semantics():
    """The oracle is not vacuous: the shift, the bias and the -100 region mask each change the result."""
    qkv, table, kw = _make('shifted')  # 8x8, window 4, shift 2
    q, k, v = qkv.detach().unbind(3)
    out = window_attention_naive(q, k, v, **kw, rel_pos_bias=table)
    assert (out - window_attention_naive(q, k, v, (4, 4), 'block', (0, 0), table)).abs().max() > 1e-2
    assert (out - window_attention_naive(q, k, v, **kw)).abs().max() > 1e-2
    # (0, 0), (0, 1) and (7, 7) share the wrapped bottom-right window; (7, 7) is in another region
    k2 = k.clone()
    k2[:, 0, 0] += 5.0
    out2 = window_attention_naive(q, k2, v, **kw, rel_pos_bias=table)
    assert (out2[:, 0, 1] - out[:, 0, 1]).abs().max() > 1e-3
    assert torch.allclose(out2[:, 7, 7], out[:, 7, 7], atol=1e-6)
    assert torch.allclose(out2[:, 3, 3], out[:, 3, 3], atol=1e-6)


# ---------------------------------------------------------------- Triton (interpreter) vs reference

@pytest.mark.parametrize('case', list(CASES))
def test_triton_matches_reference_fp32(case):
    qkv, table, kw = _make(case)
    grad_out = torch.randn(qkv.shape[:3] + qkv.shape[4:])
    tri = _run(window_attention_triton, qkv, table, kw, grad_out)
    ref = _run(window_attention_ref, qkv, table, kw, grad_out)
    assert tri[0].shape == ref[0].shape and tri[0].dtype == torch.float32
    assert all(torch.isfinite(t).all() for t in tri)
    _assert_fp32_close(tri, ref, ['out', 'd_qkv', 'd_table'], case)


def test_triton_strided_layouts_and_custom_scale():
    """Inputs permuted from a head-first layout, a non-contiguous grad, a table view, explicit scale."""
    B, H, W, nh, d = 1, 10, 11, 2, 16
    base = torch.randn(3, B, nh, W, H, d, requires_grad=True)  # transposed spatial axes and head-first
    q, k, v = base.permute(0, 1, 4, 3, 2, 5).unbind(0)
    assert not q.is_contiguous()
    table_t = torch.randn(7, 7, nh, requires_grad=True)  # timm-style (.., heads) storage, used as a view
    table = table_t.permute(2, 0, 1)
    grad_out = torch.randn(B, nh, d, W, H).permute(0, 4, 3, 1, 2)
    kw = dict(window_size=(4, 3), mode='block', shift=(2, 1), rel_pos_bias=table, scale=0.3)
    outs = []
    for fn in (window_attention_triton, window_attention_ref):
        out = fn(q, k, v, kw['window_size'], kw['mode'], kw['shift'], table, kw['scale'])
        outs.append([out] + list(torch.autograd.grad(out, [base, table_t], grad_out)))
    _assert_fp32_close(*outs, ['out', 'd_base', 'd_table'], 'strided')


def test_triton_grads_without_table_grad_and_single_window():
    qkv, table, kw = _make('map_smaller_than_window', batch=1, table_grad=False)
    grad_out = torch.randn(qkv.shape[:3] + qkv.shape[4:])
    tri = _run(window_attention_triton, qkv, table, kw, grad_out)
    ref = _run(window_attention_ref, qkv, table, kw, grad_out)
    assert len(tri) == 2
    _assert_fp32_close(tri, ref, ['out', 'd_qkv'], 'no table grad')


def test_triton_bias_grad_of_table_larger_than_window_is_central():
    qkv, table, kw = _make('table_larger')
    grad_out = torch.randn(qkv.shape[:3] + qkv.shape[4:])
    d_table = _run(window_attention_triton, qkv, table, kw, grad_out)[2]
    # window 4x4 uses offsets -3..3 around the centre (5, 6) of the (11, 13) table
    inner = torch.zeros_like(d_table, dtype=torch.bool)
    inner[:, 2:9, 3:10] = True
    assert d_table[~inner].abs().max() == 0
    assert d_table[inner].abs().min() > 0


@pytest.mark.parametrize('dtype, tol', [(torch.float16, 3e-3), (torch.bfloat16, 3e-2)])
def test_triton_half_precision(dtype, tol):
    """16-bit inputs, fp32 accumulation, vs the fp32 reference on the same rounded inputs.

    Error relative to the largest magnitude; the reference itself run in 16 bits errs by about
    1e-3 (fp16) and 7e-3 (bf16) on this case."""
    qkv, table, kw = _make('padded_13x10', batch=1, dtype=dtype)
    grad_out = torch.randn(qkv.shape[:3] + qkv.shape[4:]).to(dtype)
    tri = _run(window_attention_triton, qkv, table, kw, grad_out)
    assert tri[0].dtype == dtype and tri[1].dtype == dtype and tri[2].dtype == torch.float32
    qkv32 = qkv.detach().float().requires_grad_()
    ref = _run(window_attention_ref, qkv32, table, kw, grad_out.float())
    for name, err, r in zip(['out', 'd_qkv', 'd_table'], _max_err(tri, ref), ref):
        assert err / r.abs().max() < tol, f'{dtype} {name}: max abs err {err}'


_COMPILE_SCRIPT = r"""
import zoo.kernels.window.triton as kt

def compile_kernel(backward, dtype, window, shift, mode, head_dim, capability):
    fn = kt._window_bwd_kernel if backward else kt._window_fwd_kernel
    cfg = kt._launch_config(torch.empty(1, 8, 8, 2, head_dim, dtype=dtype), window)
    const = dict(WH=window[0], WW=window[1], SH=shift[0], SW=shift[1], BLOCK_N=cfg['block_n'],
                 BLOCK_D=cfg['block_d'], GRID=mode == 'grid', HAS_BIAS=True, PRECISION=cfg['precision'],
                 UPCAST=False, **(dict(NEED_DBIAS=True) if backward else {}))
    ty = {torch.float16: 'fp16', torch.float32: 'fp32'}[dtype]
    sig = {n: 'constexpr' if n in const else
           ('*fp32' if n in ('table_ptr', 'dtable_ptr') else '*' + ty) if n.endswith('_ptr') else
           'fp32' if n == 'scale' else 'i32' for n in fn.arg_names}
    opts = dict(num_warps=cfg['num_warps'], num_stages=cfg['bwd_stages'] if backward else 3)
    return build(fn, sig, const, capability, **opts)

out = {}
for backward, dtype, mode, shift in [(False, torch.float16, 'block', (3, 3)), (True, torch.float16, 'block', (3, 3)),
                                     (True, torch.float32, 'block', (3, 3)), (True, torch.float16, 'grid', (0, 0))]:
    key = ('bwd' if backward else 'fwd') + f'_{str(dtype)[6:]}_{mode}'
    out[key] = compile_kernel(backward, dtype, (7, 7), shift, mode, 32, 86)
print(json.dumps(out))
"""


def test_triton_kernels_compile_for_gpu(compile_for_gpu):
    """Compile (no GPU needed) the Swin-shaped kernels for sm_86: catches what the interpreter lets through
    (non-constexpr globals, unsupported ops) and checks shared memory fits 99 KB per block."""
    compile_for_gpu(_COMPILE_SCRIPT, count=4, timeout=600)


def test_triton_rejects_mixed_dtypes():
    q = torch.randn(1, 4, 4, 1, 16)
    with pytest.raises(TypeError, match='float16'):
        window_attention_triton(q, q.half(), q, (4, 4))


# ---------------------------------------------------------------- backend switch

def _path(out: torch.Tensor) -> str:
    return 'triton' if type(out.grad_fn).__name__.startswith('_WindowAttention') else 'torch'


def _call(**kw):
    q = torch.randn(1, 4, 4, 1, 16, requires_grad=True)
    return window_attention(q, q, q, 4, **kw)


def test_backend_switch(monkeypatch):
    monkeypatch.delenv('ZOO_KERNEL_BACKEND', raising=False)
    assert _path(_call()) == 'torch'  # auto on CPU
    assert _path(_call(backend='triton')) == 'triton'
    monkeypatch.setenv('ZOO_KERNEL_BACKEND', 'triton')
    assert _path(_call()) == 'triton'
    assert _path(_call(backend='torch')) == 'torch'
    with use_backend('torch'):
        assert _path(_call()) == 'torch'
        assert _path(_call(backend='triton')) == 'triton'
    monkeypatch.setenv('ZOO_KERNEL_BACKEND', 'auto')
    assert _path(_call()) == 'torch'
    monkeypatch.setenv('ZOO_KERNEL_BACKEND', 'cuda')
    with pytest.raises(ValueError, match='ZOO_KERNEL_BACKEND.*cuda'):
        _call()


def test_backend_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(zoo.kernels.backend, 'interpreter_on', lambda: False)
    with pytest.raises(RuntimeError, match='TRITON_INTERPRET=1.*cpu'):
        _call(backend='triton')
    assert _path(_call(backend='auto')) == 'torch'


def test_dispatch_matches_reference():
    qkv, table, kw = _make('shifted', batch=1)
    q, k, v = qkv.unbind(3)
    a = window_attention(q, k, v, **kw, rel_pos_bias=table, backend='triton')
    b = window_attention(q, k, v, **kw, rel_pos_bias=table, backend='torch')
    assert (a - b).abs().max() < 1e-5


# ---------------------------------------------------------------- input errors

BAD_INPUTS = [
    (dict(k=torch.zeros(1, 8, 8, 2)), r'q, k, v: expected equal shapes .*\(1, 8, 8, 2, 16\), \(1, 8, 8, 2\)'),
    (dict(mode='swin'), r"mode: expected 'block' or 'grid', got 'swin'"),
    (dict(window_size=(4, 0)), r'window_size: expected positive sizes, got \(4, 0\)'),
    (dict(window_size=(4, 4, 4)), r'window_size: expected an int or a pair of ints, got \(4, 4, 4\)'),
    (dict(shift=4), r'shift: expected 0 <= shift < window_size=\(4, 4\), got \(4, 4\)'),
    (dict(shift=(-1, 0)), r'shift: expected 0 <= shift .*got \(-1, 0\)'),
    (dict(shift=2, mode='grid'), r'shift: grid mode takes no shift, got \(2, 2\)'),
    (dict(rel_pos_bias=torch.zeros(3, 7, 7)), r'rel_pos_bias: expected \(heads=2, 2Mh-1, 2Mw-1\).*got \(3, 7, 7\)'),
    (dict(rel_pos_bias=torch.zeros(2, 5, 7)), r'rel_pos_bias: .*M >= window \(4, 4\).*got \(2, 5, 7\)'),
    (dict(rel_pos_bias=torch.zeros(2, 8, 8)), r'rel_pos_bias: .*got \(2, 8, 8\)'),
    (dict(rel_pos_bias=torch.zeros(49, 2)), r'rel_pos_bias: .*got \(49, 2\)'),
    (dict(backend='gpu'), r"backend: expected one of .*got 'gpu'"),
]


def _bad_args(kwargs):
    args = dict(q=torch.zeros(1, 8, 8, 2, 16), k=torch.zeros(1, 8, 8, 2, 16), v=torch.zeros(1, 8, 8, 2, 16),
                window_size=4)
    args.update(kwargs)
    return args


@pytest.mark.parametrize('kwargs, match', BAD_INPUTS)
def test_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        window_attention(**_bad_args(kwargs))


# ---------------------------------------------------------------- TorchScript

class _Op(torch.nn.Module):
    """The op as a module calls it (arguments after window_size by name), every argument explicit."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size: Tuple[int, int],
                mode: str = 'block', shift: Tuple[int, int] = (0, 0), rel_pos_bias: Optional[torch.Tensor] = None,
                scale: Optional[float] = None, backend: Optional[str] = None) -> torch.Tensor:
        return window_attention(q, k, v, window_size, mode=mode, shift=shift, rel_pos_bias=rel_pos_bias,
                                scale=scale, backend=backend)


@pytest.fixture(scope='module')
def scripted_op(script_round_trip):
    """The op compiled by torch.jit.script, saved and loaded back (so nothing in it calls into Python)."""
    return script_round_trip(_Op())


@pytest.mark.parametrize('case', ['padded_13x10', 'swin_7_padded', 'map_smaller_than_window', 'rect_window',
                                  'table_larger', 'grid_padded', 'grid_nobias_9x16'])
def test_scripted_matches_eager(scripted_op, case):
    """The scripted op (the reference's export form: pad, roll, reshape, tables built in the graph) against the
    eager op (cached tables, piecewise partition), forward and backward, on padded and shifted maps."""
    qkv, table, kw = _make(case)
    grad_out = torch.randn(qkv.shape[:3] + qkv.shape[4:])
    _assert_fp32_close(_run(scripted_op, qkv, table, kw, grad_out), _run(_Op(), qkv, table, kw, grad_out),
                       ['out', 'd_qkv', 'd_table'], case)


def test_scripted_runs_the_reference_whatever_the_backend(scripted_op, monkeypatch):
    """Scripted code never reaches the Triton path (as exports): a forced backend still runs the reference."""
    monkeypatch.setenv('ZOO_KERNEL_BACKEND', 'triton')
    q = torch.randn(1, 4, 4, 1, 16, requires_grad=True)
    with use_backend('triton'):
        out = scripted_op(q, q, q, (4, 4), backend='triton')
    assert _path(out) == 'torch'
    assert torch.equal(out, window_attention(q, q, q, 4, backend='torch'))


@pytest.mark.parametrize('kwargs, match', [
    (kwargs, match) for kwargs, match in BAD_INPUTS if 'backend' not in kwargs and kwargs.get('window_size') != (4, 4, 4)])
def test_scripted_bad_inputs(scripted_op, kwargs, match):
    """The scripted op keeps the op's checks and messages (TorchScript reraises them as torch.jit.Error)."""
    args = _bad_args(kwargs)
    args['window_size'] = _pair(args['window_size'], 'window_size')
    args['shift'] = _pair(args.get('shift', 0), 'shift')
    with pytest.raises(torch.jit.Error, match='ValueError: ' + match):
        scripted_op(**args)
