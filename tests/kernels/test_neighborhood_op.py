"""Neighborhood attention op: reference (gather + dense) against natten and a brute-force oracle, gradients,
the Triton kernels (interpreter), ONNX export with both exporters, linear memory, error messages, TorchScript."""
import warnings
from typing import Optional, Tuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from zoo.kernels import neighborhood_attention, use_backend
from zoo.kernels._args import pair
from zoo.kernels.backend import interpreter_on, triton_available
from zoo.kernels.neighborhood import reference
from zoo.kernels.neighborhood.naive import neighborhood_attention_naive, window_start
from zoo.kernels.neighborhood.reference import (
    DENSE_MAX_TOKENS, TILE, na_axis_tables, na_tile_tables, neighborhood_attention_ref, use_dense)

try:
    import natten
    from natten.functional import na2d as natten_na2d
    NATTEN_ERROR = None
except Exception as e:  # pragma: no cover - depends on the environment
    natten, natten_na2d, NATTEN_ERROR = None, None, f'{type(e).__name__}: {e}'

# (H, W, kernel, dilation): square and non-square maps, non-square kernels, dilation groups that are
# ragged (H or W not a multiple of the dilation) and maps where kernel * dilation == size
CASES = [
    (14, 14, (7, 7), (1, 1)),
    (13, 17, (5, 5), (2, 2)),
    (9, 30, (3, 3), (3, 3)),
    (16, 17, (5, 5), (3, 3)),
    (20, 24, (7, 7), (2, 3)),
    (21, 12, (7, 3), (3, 4)),
    (11, 13, (3, 5), (2, 1)),
]
IMPLS = ['gather', 'dense']


def _qkv(B, H, W, heads, d, dtype=torch.float32, requires_grad=False):
    return [torch.randn(B, H, W, heads, d, dtype=dtype, requires_grad=requires_grad) for _ in range(3)]


def _rpb(heads, kernel, dtype=torch.float32, requires_grad=False):
    return torch.randn(heads, 2 * kernel[0] - 1, 2 * kernel[1] - 1, dtype=dtype, requires_grad=requires_grad)


# ---------------------------------------------------------------------------------------------- natten parity


@pytest.mark.skipif(natten is None, reason=f'natten not importable ({NATTEN_ERROR}); pip install natten')
@pytest.mark.parametrize('H,W,kernel,dilation,head_dim', [c + (16 if i % 2 else 32,) for i, c in enumerate(CASES)])
def test_matches_natten_forward(H, W, kernel, dilation, head_dim):
    # natten >= 0.20 has no RPB and on CPU only a Flex forward with power-of-two head dims
    q, k, v = _qkv(2, H, W, 2, head_dim)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        expected = natten_na2d(q, k, v, kernel, dilation=dilation)
    for impl in IMPLS:
        out = neighborhood_attention_ref(q, k, v, kernel, dilation, impl=impl)
        torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5, msg=impl)
    torch.testing.assert_close(neighborhood_attention(q, k, v, kernel, dilation), expected, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(neighborhood_attention_naive(q, k, v, kernel, dilation), expected,
                               atol=2e-6, rtol=1e-5)


@pytest.mark.skipif(natten is None, reason=f'natten not importable ({NATTEN_ERROR}); pip install natten')
def test_natten_rejects_what_we_reject():
    q, k, v = _qkv(1, 13, 17, 2, 16)
    with pytest.raises(ValueError):
        natten_na2d(q, k, v, 5, dilation=3)  # 15 > 13
    with pytest.raises(ValueError, match='height'):
        neighborhood_attention(q, k, v, 5, 3)


# ---------------------------------------------------------------------------------------------- oracle parity


def test_window_start_formula():
    # NATTEN's full-grid start (oracle) == the reference's sub-grid clamp, every position of small axes
    for length in range(1, 24):
        for kernel in (1, 3, 5, 7):
            for dilation in range(1, 6):
                if kernel * dilation > length:
                    continue
                keys, rel = na_axis_tables(length, kernel, dilation)
                for i in range(length):
                    start = window_start(i, length, kernel, dilation)
                    assert keys[i].tolist() == [start + t * dilation for t in range(kernel)], (length, kernel, i)
                    assert all(0 <= p < length and p % dilation == i % dilation for p in keys[i].tolist())
                    assert rel[i].tolist() == [(p - i) // dilation + kernel - 1 for p in keys[i].tolist()]


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('H,W,kernel,dilation', CASES)
def test_bias_matches_oracle(H, W, kernel, dilation, impl):
    q, k, v = _qkv(2, H, W, 3, 8)
    rpb = _rpb(3, kernel) * 2
    expected = neighborhood_attention_naive(q, k, v, kernel, dilation, rpb)
    out = neighborhood_attention_ref(q, k, v, kernel, dilation, rpb, impl=impl)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)


def test_scale_and_odd_head_dim():
    q, k, v = _qkv(1, 10, 11, 2, 12)
    rpb = _rpb(2, (5, 3))
    expected = neighborhood_attention_naive(q, k, v, (5, 3), (2, 3), rpb, scale=0.7)
    for impl in IMPLS:
        out = neighborhood_attention_ref(q, k, v, (5, 3), (2, 3), rpb, scale=0.7, impl=impl)
        torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize('H,W,kernel,dilation', [(23, 19, (5, 7), (2, 2)), (17, 40, (7, 7), (1, 4))])
def test_dense_equals_gather(H, W, kernel, dilation):
    q, k, v = _qkv(2, H, W, 2, 16)
    rpb = _rpb(2, kernel)
    for bias in (None, rpb):
        a = neighborhood_attention_ref(q, k, v, kernel, dilation, bias, impl='gather')
        b = neighborhood_attention_ref(q, k, v, kernel, dilation, bias, impl='dense')
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


def test_auto_choice():
    assert use_dense(14, 14, (7, 7)) and 14 * 14 <= DENSE_MAX_TOKENS
    assert not use_dense(56, 56, (7, 7))


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('H,W,kernel,dilation', [(9, 11, (3, 5), (2, 2)), (8, 7, (5, 3), (1, 2))])
def test_gradients_match_oracle(H, W, kernel, dilation, impl):
    q, k, v = _qkv(2, H, W, 2, 8, torch.float64, requires_grad=True)
    rpb = _rpb(2, kernel, torch.float64, requires_grad=True)
    grad = torch.randn(2, H, W, 2, 8, dtype=torch.float64)
    ours = torch.autograd.grad(neighborhood_attention_ref(q, k, v, kernel, dilation, rpb, impl=impl), (q, k, v, rpb),
                               grad)
    theirs = torch.autograd.grad(neighborhood_attention_naive(q, k, v, kernel, dilation, rpb), (q, k, v, rpb), grad)
    for name, a, b in zip('q k v rpb'.split(), ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=name)


def test_low_precision_runs():
    q, k, v = _qkv(1, 12, 12, 2, 16)
    rpb = _rpb(2, (5, 5))
    expected = neighborhood_attention_naive(q, k, v, (5, 5), (2, 2), rpb)
    for impl in IMPLS:
        out = neighborhood_attention_ref(q.bfloat16(), k.bfloat16(), v.bfloat16(), (5, 5), (2, 2), rpb, impl=impl)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)


# ---------------------------------------------------------------------------------------------- memory


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_gather_memory_linear_in_tokens():
    B, heads, d, kernel = 1, 2, 32, (7, 7)
    per_token = []
    for side in (14, 28, 56):
        N = side * side
        q, k, v = _qkv(B, side, side, heads, d, requires_grad=True)
        rpb = _rpb(heads, kernel, requires_grad=True)
        tables = na_tile_tables(side, side, kernel, (1, 1))
        with _LargestTensor() as mode:
            neighborhood_attention_ref(q, k, v, kernel, (1, 1), rpb, impl='gather').sum().backward()
        # the largest intermediates are the per-tile scores (T^2 x halo) or gathered halo keys (halo x d)
        tiles, tq = tables.query_index.shape
        halo = tables.halo_index.shape[1]
        assert tq <= TILE * TILE and halo == (int(tq ** 0.5) + kernel[0] - 1) * (int(tq ** 0.5) + kernel[1] - 1)
        assert mode.largest == B * heads * tiles * max(tq * halo, halo * d)
        assert tiles * tq < 1.35 * N  # padding of the tiling is bounded
        per_token.append(mode.largest / N)
        if side >= 28:
            assert mode.largest < B * heads * N * N / 2  # far below the dense score matrix
    assert max(per_token) < 1.35 * min(per_token)  # linear in tokens
    assert max(per_token) <= B * heads * (TILE + 6) ** 2 * max(1, d / TILE ** 2) * 1.35


# ---------------------------------------------------------------------------------------------- triton


needs_triton = pytest.mark.skipif(
    not (triton_available() and (torch.cuda.is_available() or interpreter_on())),
    reason='needs triton with CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py)')


def _device():
    return 'cuda' if torch.cuda.is_available() else 'cpu'


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize('H,W,kernel,dilation,head_dim,bias,tile', [
    (7, 9, (3, 3), (1, 1), 16, True, (4, 4)),  # 2 x 3 tiles: halos overlap, clamped windows at all borders
    (9, 10, (3, 3), (2, 3), 16, True, (4, 4)),  # ragged dilation groups on both axes, padded tile rows
    (8, 7, (3, 5), (2, 1), 24, False, None),  # non-square kernel, head dim not a power of two
])
def test_triton_matches_reference(H, W, kernel, dilation, head_dim, bias, tile):
    from zoo.kernels.neighborhood.triton import neighborhood_attention_triton
    dev = _device()
    # q, k, v as strided views of one qkv tensor, like the NAT block produces them
    qkv = torch.randn(1, H, W, 3, 2, head_dim, device=dev)
    q, k, v = (t.requires_grad_() for t in [qkv[:, :, :, i].clone() for i in range(3)])
    q_view, k_view, v_view = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    rpb = _rpb(2, kernel, requires_grad=True).to(dev) if bias else None
    if rpb is not None:
        rpb.retain_grad()
    grad = torch.randn(1, H, W, 2, head_dim, device=dev)
    inputs = (q, k, v) + ((rpb,) if bias else ())

    out = neighborhood_attention_triton(q_view, k_view, v_view, kernel, dilation=dilation, rel_pos_bias=rpb, tile=tile)
    got = torch.autograd.grad(out, inputs, grad)
    ref = neighborhood_attention_ref(q, k, v, kernel, dilation, rpb, impl='gather')
    want = torch.autograd.grad(ref, inputs, grad)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for name, a, b in zip('dq dk dv drpb'.split(), got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.triton
@needs_triton
def test_triton_dispatch():
    q, k, v = _qkv(1, 6, 6, 1, 16)
    q, k, v = (t.to(_device()) for t in (q, k, v))
    out = neighborhood_attention(q, k, v, 3, 2, backend='triton')
    torch.testing.assert_close(out, neighborhood_attention(q, k, v, 3, 2, backend='torch'), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- onnx


class _NAModule(torch.nn.Module):
    """qkv projection + the public op, channels-last in and out."""

    def __init__(self, dim=32, heads=2, kernel=(3, 5), dilation=(2, 1)):
        super().__init__()
        self.heads, self.kernel, self.dilation = heads, kernel, dilation
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.rpb = torch.nn.Parameter(torch.randn(heads, 2 * kernel[0] - 1, 2 * kernel[1] - 1))

    def forward(self, x):
        B, H, W, C = x.shape
        q, k, v = self.qkv(x).reshape(B, H, W, 3, self.heads, C // self.heads).unbind(3)
        out = neighborhood_attention(q, k, v, self.kernel, self.dilation, rel_pos_bias=self.rpb)
        return out.reshape(B, H, W, C)


@pytest.mark.parametrize('dynamo', [False, True], ids=['legacy', 'dynamo'])
@pytest.mark.parametrize('size', [(11, 13), (16, 19)], ids=['dense', 'gather'])
def test_onnx_export(size, dynamo, tmp_path):
    ort = pytest.importorskip('onnxruntime')
    assert use_dense(*size, (3, 5)) == (size == (11, 13))  # each size takes the path it is named after
    model = _NAModule().eval()
    x = torch.randn(2, *size, 32)
    with torch.no_grad():
        expected = model(x)
    for cache in (reference._cached_tables, reference._cached_tile_tables, reference._cached_dense_mask):
        cache.cache_clear()  # tables get built while the exporter traces
    path = str(tmp_path / 'na.onnx')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        if dynamo:
            torch.onnx.export(model, (x,), path, dynamo=True)
        else:
            torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17)
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), expected, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- errors


BAD_INPUTS = [  # (changed arguments of the op on a 13 x 17 map with 2 heads, expected message)
    (dict(kernel_size=4), r'kernel_size: expected odd.*\(4, 4\)'),
    (dict(kernel_size=5, dilation=3), r'height: 5 \* 3 = 15 > 13'),
    (dict(kernel_size=7, dilation=(1, 3)), r'width: 7 \* 3 = 21 > 17'),
    (dict(dilation=0), r'dilation: expected positive'),
    (dict(rel_pos_bias=torch.zeros(2, 5, 3)), r'rel_pos_bias: expected shape .* \(2, 5, 5\), got \(2, 5, 3\)'),
    (dict(rel_pos_bias=torch.zeros(3, 5, 5)), r'rel_pos_bias: expected shape .* \(2, 5, 5\), got \(3, 5, 5\)'),
    (dict(rel_pos_bias=torch.zeros(50)), r'rel_pos_bias: expected shape .* \(2, 5, 5\), got \(50,\)'),
    (dict(k=torch.zeros(1, 13, 16, 2, 8)), r'q, k, v: expected equal shapes .*\(1, 13, 16, 2, 8\)'),
    (dict(q=torch.zeros(13, 17, 2, 8), k=torch.zeros(13, 17, 2, 8), v=torch.zeros(13, 17, 2, 8)),
     r'q, k, v: expected equal shapes'),
    (dict(kernel_size=(3, 3, 3)), r'kernel_size: expected an int or a pair'),
]


def _bad_args(kwargs):
    args = dict(zip('qkv', _qkv(1, 13, 17, 2, 8)), kernel_size=3, dilation=1)
    args.update(kwargs)
    return args


@pytest.mark.parametrize('kwargs, match', BAD_INPUTS)
def test_error_messages(kwargs, match):
    with pytest.raises(ValueError, match=match):
        neighborhood_attention(**_bad_args(kwargs))


def test_impl_error_message():
    q, k, v = _qkv(1, 13, 17, 2, 8)
    with pytest.raises(ValueError, match=r"impl: expected 'auto', 'gather' or 'dense', got 'flex'"):
        neighborhood_attention_ref(q, k, v, (3, 3), impl='flex')


# ---------------------------------------------------------------------------------------------- TorchScript


class _Op(torch.nn.Module):
    """The op as a module calls it (arguments after dilation by name), every argument explicit."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: Tuple[int, int],
                dilation: Tuple[int, int] = (1, 1), rel_pos_bias: Optional[torch.Tensor] = None,
                scale: Optional[float] = None, backend: Optional[str] = None) -> torch.Tensor:
        return neighborhood_attention(q, k, v, kernel_size, dilation, rel_pos_bias=rel_pos_bias, scale=scale,
                                      backend=backend)


@pytest.fixture(scope='module')
def scripted_op(script_round_trip):
    """The op compiled by torch.jit.script, saved and loaded back (so nothing in it calls into Python)."""
    return script_round_trip(_Op())


@pytest.mark.parametrize('H,W,kernel,dilation,bias,scale', [
    (13, 17, (5, 5), (2, 2), True, None),  # ragged dilation groups; eager takes the dense path (221 tokens)
    (20, 24, (7, 7), (2, 3), True, None),  # eager takes the gather path (480 tokens)
    (21, 12, (7, 3), (3, 4), True, 0.3),  # non-square kernel, kernel * dilation == W
    (7, 9, (7, 3), (1, 3), False, None),  # kernel == H: every query sees the whole column, no bias
    (5, 6, (1, 1), (1, 1), True, None),  # kernel 1: each query attends to itself
])
def test_scripted_matches_eager(scripted_op, H, W, kernel, dilation, bias, scale, assert_close_to_scale):
    """The scripted op (the reference's export form: fixed tiles, tables built in the graph) against the eager op
    (cached tables, dense or gather path), forward and backward, on ragged, clamped and edge-sized maps."""
    q, k, v = _qkv(2, H, W, 2, 8, requires_grad=True)
    rpb = _rpb(2, kernel, requires_grad=True) if bias else None
    inputs = [q, k, v] + ([rpb] if bias else [])
    grad = torch.randn(2, H, W, 2, 8)
    results = []
    for op in (scripted_op, _Op()):
        out = op(q, k, v, kernel, dilation, rel_pos_bias=rpb, scale=scale)
        results.append([out] + list(torch.autograd.grad(out, inputs, grad)))
    for name, got, want in zip('out dq dk dv drpb'.split(), *results):
        assert_close_to_scale(got, want, msg=name)


def test_scripted_runs_the_reference_whatever_the_backend(scripted_op, monkeypatch):
    """Scripted code never reaches the Triton path (as exports): a forced backend still runs the reference."""
    monkeypatch.setenv('ZOO_KERNEL_BACKEND', 'triton')
    q, k, v = _qkv(1, 6, 6, 1, 16, requires_grad=True)
    with use_backend('triton'):
        out = scripted_op(q, k, v, (3, 3), (2, 2), backend='triton')
    assert 'NeighborhoodAttention' not in type(out.grad_fn).__name__
    assert torch.equal(out, scripted_op(q, k, v, (3, 3), (2, 2), backend='torch'))


@pytest.mark.parametrize('kwargs, match', [(kwargs, match) for kwargs, match in BAD_INPUTS
                                           if kwargs.get('kernel_size') != (3, 3, 3)])
def test_scripted_error_messages(scripted_op, kwargs, match):
    """The scripted op keeps the op's checks and messages (TorchScript reraises them as torch.jit.Error)."""
    args = _bad_args(kwargs)
    args['kernel_size'] = pair(args['kernel_size'], 'kernel_size')
    args['dilation'] = pair(args['dilation'], 'dilation')
    with pytest.raises(torch.jit.Error, match='ValueError: .*' + match):
        scripted_op(**args)


class _Ref(torch.nn.Module):
    def forward(self, q: torch.Tensor, impl: str) -> torch.Tensor:
        return neighborhood_attention_ref(q, q, q, (3, 3), (1, 1), None, None, impl)


def test_scripted_reference_takes_auto_only(assert_close_to_scale):
    """Scripted code has only the export form: an explicit impl fails with a message saying so."""
    scripted = torch.jit.script(_Ref())
    q = torch.randn(1, 5, 5, 1, 8)
    assert_close_to_scale(scripted(q, 'auto'), neighborhood_attention_ref(q, q, q, (3, 3), impl='gather'))
    with pytest.raises(torch.jit.Error, match=r"impl: expected 'auto' in scripted code, got 'gather'"):
        scripted(q, 'gather')
