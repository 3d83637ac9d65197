"""Generalized neighborhood attention op (1-D / 2-D / 3-D, stride, dilation, causal, even kernels): the reference
against natten 0.21.7's forward, gradients against an independent brute-force masked attention written here,
the naive oracle, the Triton kernels (interpreter), ONNX export with both exporters, linear memory, error
messages, TorchScript."""
import itertools
import warnings
from typing import List, Optional, Sequence, Tuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from zoo.kernels import neighborhood_attention, neighborhood_attention_1d, neighborhood_attention_3d, use_backend
from zoo.kernels._args import pair
from zoo.kernels.backend import interpreter_on, triton_available
from zoo.kernels.neighborhood import reference
from zoo.kernels.neighborhood.naive import axis_neighbors, neighborhood_attention_naive, window_start
from zoo.kernels.neighborhood.reference import (
    DENSE_MAX_TOKENS, gna_axis_window, gna_ref, gna_tables, neighborhood_attention_ref, use_dense)

try:
    import natten
    from natten.functional import na1d, na2d, na3d
    NATTEN_ERROR = None
except Exception as e:  # pragma: no cover - depends on the environment
    natten, na1d, na2d, na3d, NATTEN_ERROR = None, None, None, None, f'{type(e).__name__}: {e}'
needs_natten = pytest.mark.skipif(natten is None, reason=f'natten not importable ({NATTEN_ERROR}); pip install natten')

OPS = {1: neighborhood_attention_1d, 2: neighborhood_attention, 3: neighborhood_attention_3d}
IMPLS = ['gather', 'dense']

# (sizes, kernel, stride, dilation, causal) per rank. Covered: odd and even kernels; ragged dilation groups (d does
# not divide the size); stride 1, strides not dividing the size, stride == kernel (blocked, with a clamped last
# partial block when k does not divide n); causal on some axes only; maps equal to and just larger than
# kernel * dilation; non-square kernels / strides / dilations.
CASES_1D = [
    ((16,), (7,), (7,), (1,), (False,)),  # blocked, last block clamped onto the previous one
    ((13,), (4,), (3,), (2,), (False,)),  # even kernel, ragged groups, stride not dividing
    ((9,), (3,), (2,), (3,), (False,)),  # kernel * dilation == size
    ((10,), (5,), (4,), (2,), (True,)),  # causal, strided, dilated
    ((17,), (8,), (8,), (1,), (True,)),  # causal blocked
    ((11,), (2,), (1,), (5,), (False,)),  # kernel 2, size just above kernel * dilation
    ((12,), (6,), (4,), (1,), (False,)),
    ((25,), (5,), (1,), (1,), (True,)),
]
CASES_2D = [
    ((14, 14), (7, 7), (1, 1), (1, 1), (False, False)),  # NAT
    ((13, 17), (5, 4), (2, 3), (2, 2), (False, False)),  # even kernel, ragged groups, strides not dividing
    ((16, 16), (8, 8), (8, 8), (1, 1), (False, False)),  # blocked, k divides the map: no mask at all
    ((15, 10), (7, 3), (7, 3), (2, 3), (False, False)),  # blocked in dilation groups, ragged
    ((9, 12), (4, 5), (2, 1), (2, 2), (True, False)),  # causal on rows only
    ((11, 9), (3, 4), (3, 2), (1, 2), (False, True)),  # causal on columns only, just larger than k * d
    ((8, 10), (4, 5), (4, 5), (2, 2), (True, True)),  # causal blocked, kernel * dilation == size
    ((20, 24), (7, 7), (1, 1), (2, 3), (False, False)),  # DiNAT
]
CASES_3D = [
    ((4, 6, 7), (2, 3, 4), (1, 2, 3), (1, 2, 1), (True, False, False)),  # video-like: causal in time only
    ((5, 5, 6), (3, 3, 3), (3, 3, 3), (1, 1, 2), (False, False, False)),  # blocked, ragged dilation
    ((6, 7, 5), (4, 2, 5), (2, 2, 5), (1, 3, 1), (False, True, False)),
    ((3, 8, 8), (3, 4, 4), (1, 4, 1), (1, 1, 2), (False, False, True)),
    ((4, 5, 6), (3, 3, 4), (3, 3, 4), (1, 1, 1), (False, False, False)),  # blocked, a partial block on every axis
]
CASES = CASES_1D + CASES_2D + CASES_3D


def _qkv(B, sizes, heads, d, dtype=torch.float32, requires_grad=False):
    return [torch.randn(B, *sizes, heads, d, dtype=dtype, requires_grad=requires_grad) for _ in range(3)]


def _rpb(heads, kernel, dtype=torch.float32, requires_grad=False):
    return torch.randn(heads, *[2 * k - 1 for k in kernel], dtype=dtype, requires_grad=requires_grad)


def _op(q, k, v, kernel, stride, dilation, causal, rpb=None, scale=None):
    """The public op of the right rank, every argument per axis (ints for 1-D)."""
    n = len(kernel)
    unwrap = (lambda t: t[0]) if n == 1 else tuple
    return OPS[n](q, k, v, unwrap(kernel), unwrap(dilation), rel_pos_bias=rpb, scale=scale, stride=unwrap(stride),
                  is_causal=unwrap(causal))


def _case_id(case):
    sizes, kernel, stride, dilation, causal = case
    x = 'x'.join
    return (f'{x(map(str, sizes))}-k{x(map(str, kernel))}-s{x(map(str, stride))}-d{x(map(str, dilation))}'
            f'-c{"".join("1" if c else "0" for c in causal)}')


# ---------------------------------------------------------------------------------------------- brute force


def _window_keys(i: int, n: int, k: int, s: int, d: int, causal: bool) -> List[int]:
    """Keys of query i along one axis, from the definition: same dilation group; stride groups of s queries
    share the window of their centre (causal: of their last) query; a non-causal window is the k group positions
    around it, moved inward one step at a time while it sticks out of the group."""
    group = [j for j in range(n) if j % d == i % d]
    me = group.index(i)
    members = [m for m in range(len(group)) if m // s == me // s]
    if causal:
        last = members[-1]
        return [group[m] for m in range(len(group)) if last - k < m <= me]
    centre = min(members[0] + s // 2, len(group) - 1)  # the centre query (right one for even s), clipped
    lo = centre - k // 2
    while lo < 0:
        lo += 1
    while lo + k > len(group):
        lo -= 1
    return [group[m] for m in range(lo, lo + k)]


def _brute_force(q, k, v, kernel, stride, dilation, causal, rpb=None, scale=None):
    """softmax(q k^T * scale + bias, -inf off the neighbourhood) v over all N x N pairs."""
    sizes = q.shape[1:-2]
    n = len(sizes)
    keys = [[_window_keys(i, sizes[a], kernel[a], stride[a], dilation[a], causal[a]) for i in range(sizes[a])]
            for a in range(n)]
    points = list(itertools.product(*[range(x) for x in sizes]))
    N, heads, d = len(points), q.shape[-2], q.shape[-1]
    bias = torch.full((heads, N, N), float('-inf'), dtype=q.dtype)
    for qi, p in enumerate(points):
        for ki, t in enumerate(points):
            if all(t[a] in keys[a][p[a]] for a in range(n)):
                offset = tuple((t[a] - p[a]) // dilation[a] + kernel[a] - 1 for a in range(n))
                bias[:, qi, ki] = 0. if rpb is None else rpb[(slice(None),) + offset]
    scale = d ** -0.5 if scale is None else scale
    flat = [t.reshape(q.shape[0], N, heads, -1).transpose(1, 2) for t in (q, k, v)]
    attn = (flat[0] @ flat[1].transpose(-2, -1) * scale + bias).softmax(-1)
    return (attn @ flat[2]).transpose(1, 2).reshape(q.shape)


# ---------------------------------------------------------------------------------------------- natten parity


@needs_natten
@pytest.mark.parametrize('case', CASES, ids=_case_id)
def test_matches_natten_forward(case):
    """Forward against natten's na1d / na2d / na3d (CPU: Flex, no RPB, power-of-two head dims), both reference
    paths, the public op and the naive oracle."""
    sizes, kernel, stride, dilation, causal = case
    q, k, v = _qkv(2, sizes, 2, 16)
    natten_op = {1: na1d, 2: na2d, 3: na3d}[len(sizes)]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        expected = natten_op(q, k, v, kernel, stride=stride, dilation=dilation, is_causal=causal)
    scale = expected.abs().max()
    for impl in IMPLS:
        out = gna_ref(q, k, v, list(kernel), list(stride), list(dilation), list(causal), impl=impl)
        torch.testing.assert_close(out, expected, atol=2e-6 * scale, rtol=1e-5, msg=impl)
    torch.testing.assert_close(_op(q, k, v, kernel, stride, dilation, causal), expected, atol=2e-6 * scale, rtol=1e-5)
    naive = neighborhood_attention_naive(q, k, v, kernel, dilation, stride=stride, is_causal=causal)
    torch.testing.assert_close(naive, expected, atol=2e-6 * scale, rtol=1e-5)


@needs_natten
def test_matches_natten_exhaustive_1d():
    """Every valid 1-D configuration over small sizes, kernels, strides, dilations and causal flags."""
    checked = 0
    for n, kernel, stride, dilation, causal in itertools.product((7, 9, 12), (2, 3, 4, 5), (1, 2, 3, 5),
                                                                 (1, 2, 3), (False, True)):
        if stride > kernel or kernel * dilation > n or (kernel == n and causal):  # natten has no CPU causal FMHA
            continue
        q, k, v = _qkv(1, (n,), 1, 8)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            expected = na1d(q, k, v, kernel, stride=stride, dilation=dilation, is_causal=causal)
        out = neighborhood_attention_1d(q, k, v, kernel, dilation, stride=stride, is_causal=causal)
        torch.testing.assert_close(out, expected, atol=2e-6 * expected.abs().max(), rtol=1e-5,
                                   msg=str((n, kernel, stride, dilation, causal)))
        checked += 1
    assert checked > 150


@needs_natten
def test_natten_rejects_what_we_reject():
    q, k, v = _qkv(1, (13, 17), 2, 16)
    with pytest.raises(ValueError):
        na2d(q, k, v, 5, dilation=3)  # 15 > 13
    with pytest.raises(ValueError, match='height'):
        neighborhood_attention(q, k, v, 5, 3)
    with pytest.raises(ValueError):
        na2d(q, k, v, 3, stride=4)
    with pytest.raises(ValueError, match='stride'):
        neighborhood_attention(q, k, v, 3, stride=4)


# ---------------------------------------------------------------------------------------------- oracle parity


def test_axis_windows_match_oracles():
    """The reference's per-axis window (sub-grid start / end) == the naive oracle's key lists == the brute force's,
    at every position of small axes; for stride 1 the naive oracle uses NATTEN 0.17's own window-start formula."""
    for length, kernel, stride, dilation, causal in itertools.product(range(2, 19), (1, 2, 3, 4, 5, 7), (1, 2, 3, 4),
                                                                      (1, 2, 3), (False, True)):
        if stride > kernel or kernel * dilation > length:
            continue
        naive = axis_neighbors(length, kernel, stride, dilation, causal)
        for i in range(length):
            group, sub = i % dilation, i // dilation
            group_len = len(range(group, length, dilation))
            start, end = gna_axis_window(torch.tensor(sub), torch.tensor(group_len), kernel, stride, causal)
            ours = [group + dilation * j for j in range(int(start), int(end) + 1)]
            where = (length, kernel, stride, dilation, causal, i)
            assert ours == naive[i] == _window_keys(i, length, kernel, stride, dilation, causal), where
            if stride == 1 and not causal and kernel % 2:
                assert ours[0] == window_start(i, length, kernel, dilation), where


@pytest.mark.parametrize('case', [c for c in CASES if not any(c[4])], ids=_case_id)
def test_bias_matches_brute_force(case):
    sizes, kernel, stride, dilation, causal = case
    q, k, v = _qkv(2, sizes, 3, 8)
    rpb = _rpb(3, kernel) * 2
    expected = _brute_force(q, k, v, kernel, stride, dilation, causal, rpb)
    for impl in IMPLS:
        out = gna_ref(q, k, v, list(kernel), list(stride), list(dilation), list(causal), rpb, impl=impl)
        torch.testing.assert_close(out, expected, atol=2e-6 * expected.abs().max(), rtol=1e-5, msg=impl)
    naive = neighborhood_attention_naive(q, k, v, kernel, dilation, rpb, stride=stride, is_causal=causal)
    torch.testing.assert_close(naive, expected, atol=2e-6 * expected.abs().max(), rtol=1e-5)


GRAD_CASES = [CASES_1D[1], CASES_1D[3], CASES_2D[1], CASES_2D[3], CASES_2D[4], CASES_2D[6], CASES_3D[0], CASES_3D[1],
              CASES_3D[4]]


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('case', GRAD_CASES, ids=_case_id)
def test_gradients_match_brute_force(case, impl):
    """fp64 gradients of q, k, v (and the bias when no axis is causal) against the brute force."""
    sizes, kernel, stride, dilation, causal = case
    q, k, v = _qkv(2, sizes, 2, 5, torch.float64, requires_grad=True)
    rpb = None if any(causal) else _rpb(2, kernel, torch.float64, requires_grad=True)
    inputs = (q, k, v) + (() if rpb is None else (rpb,))
    grad = torch.randn(q.shape, dtype=torch.float64)
    ours = torch.autograd.grad(gna_ref(q, k, v, list(kernel), list(stride), list(dilation), list(causal), rpb,
                                       scale=0.6, impl=impl), inputs, grad)
    theirs = torch.autograd.grad(_brute_force(q, k, v, kernel, stride, dilation, causal, rpb, scale=0.6), inputs, grad)
    for name, a, b in zip('q k v rpb'.split(), ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-10 * b.abs().max(), rtol=1e-9, msg=name)


def test_scale_and_odd_head_dim():
    q, k, v = _qkv(1, (10, 11), 2, 12)
    rpb = _rpb(2, (5, 3))
    expected = _brute_force(q, k, v, (5, 3), (1, 2), (2, 3), (False, False), rpb, scale=0.7)
    for impl in IMPLS:
        out = gna_ref(q, k, v, [5, 3], [1, 2], [2, 3], [False, False], rpb, scale=0.7, impl=impl)
        torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)
    out = neighborhood_attention(q, k, v, (5, 3), (2, 3), rel_pos_bias=rpb, scale=0.7, stride=(1, 2))
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize('H,W,kernel,dilation', [(23, 19, (5, 7), (2, 2)), (17, 40, (7, 7), (1, 4))])
def test_dense_equals_gather(H, W, kernel, dilation):
    q, k, v = _qkv(2, (H, W), 2, 16)
    rpb = _rpb(2, kernel)
    for bias in (None, rpb):
        a = neighborhood_attention_ref(q, k, v, kernel, dilation, bias, impl='gather')
        b = neighborhood_attention_ref(q, k, v, kernel, dilation, bias, impl='dense')
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


def test_auto_choice():
    assert use_dense([14, 14]) and 14 * 14 <= DENSE_MAX_TOKENS
    assert not use_dense([56, 56]) and use_dense([4, 8, 8]) and not use_dense([4, 9, 9])


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_low_precision_under_autocast(dtype):
    """bf16 / fp16 inputs under CPU autocast: the output keeps the input dtype and matches fp32 to its precision."""
    q, k, v = _qkv(1, (12, 12), 2, 16)
    rpb = _rpb(2, (5, 4))
    expected = neighborhood_attention(q, k, v, (5, 4), (2, 2), rel_pos_bias=rpb, stride=(2, 1))
    with torch.autocast('cpu', dtype=dtype):
        out = neighborhood_attention(q.to(dtype), k.to(dtype), v.to(dtype), (5, 4), (2, 2), rel_pos_bias=rpb,
                                     stride=(2, 1))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=3e-2 * expected.abs().max(), rtol=3e-2)


# ---------------------------------------------------------------------------------------------- work done


@pytest.mark.parametrize('kernel,stride', [(7, 7), (8, 8), (4, 4)])
def test_blocked_gathers_only_its_keys(kernel, stride):
    """stride == kernel: a query tile is one block, it gathers exactly the block's keys, and no score is masked
    (no mask is passed); a partial block at the border is its own batch of smaller query tiles, not padding."""
    side = kernel * 7
    tables = gna_tables([side, side], [kernel] * 2, [stride] * 2, [1, 1], [False, False])
    assert [p.tile_shape for p in tables.parts] == [[49, kernel * kernel, kernel * kernel]]
    assert tables.parts[0].mask is None
    tables = gna_tables([side + 3, side], [kernel] * 2, [stride] * 2, [1, 1], [False, False])  # a partial block
    shapes = sorted(p.tile_shape for p in tables.parts)
    assert shapes == sorted([[7, 3 * kernel, kernel * kernel], [49, kernel * kernel, kernel * kernel]])
    assert all(p.mask is None for p in tables.parts)
    assert tables.query_index.numel() == (side + 3) * side


@pytest.mark.parametrize('kernel,stride,dilation,causal,bias', [
    ((5, 5), (1, 1), (1, 1), (False, False), False),  # masked halos
    ((4, 6), (2, 3), (2, 1), (False, True), False),  # even kernels, strided, dilated, causal on one axis
    ((5, 3), (1, 1), (1, 2), (False, False), True),  # a per-head bias
    ((4, 4), (4, 4), (1, 1), (False, False), False),  # blocked, partial blocks
])
def test_chunked_matches_brute_force(monkeypatch, kernel, stride, dilation, causal, bias):
    """Large maps run in cache-sized chunks of tiles: without gradients the forward, with them both passes
    (`_ChunkedTiles`, which recomputes each chunk in the backward): the brute-force result and gradients (fp64)."""
    q, k, v = _qkv(1, (36, 42), 2, 8, torch.float64)
    rpb = _rpb(2, kernel, torch.float64) if bias else None
    args = (list(kernel), list(stride), list(dilation), list(causal))
    tiles, _, tk = max(p.tile_shape for p in gna_tables([36, 42], *args).parts)  # the batch of most tiles
    tile_bytes = tk * 2 * (8 + 8) * 8
    monkeypatch.setattr(reference, 'CHUNK_BYTES', 2 * tile_bytes)  # about 2 tiles per chunk
    with torch.no_grad():
        assert 1 < reference._chunk_tiles(tiles, tile_bytes, reference._chunk_bytes(False)) < tiles
        out = gna_ref(q, k, v, *args, rpb, impl='gather')
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    expected = _brute_force(q, k, v, *args, rpb)
    torch.testing.assert_close(out, expected.detach(), atol=1e-12, rtol=1e-10)

    calls = []
    apply = reference._ChunkedTiles.apply
    monkeypatch.setattr(reference._ChunkedTiles, 'apply', lambda *a: calls.append(a[-1]) or apply(*a))
    out = gna_ref(q, k, v, *args, rpb, impl='gather')
    assert calls == [2 * tile_bytes]  # the chunked training path, with the chunk size
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(expected, (q, k, v), grad)):
        torch.testing.assert_close(got, want, atol=1e-11, rtol=1e-9)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize('stride', [1, 2, 4])
def test_strided_tiles_share_their_halo(stride):
    """A tile of T queries (a multiple of the stride) gathers T - s + k keys per axis, not T * k."""
    kernel = 7
    tables = gna_tables([56, 56], [kernel] * 2, [stride] * 2, [1, 1], [False, False])
    Th, Tw = reference.tile_sizes([kernel] * 2, [stride] * 2)
    assert Th % stride == 0 and Tw % stride == 0
    interior, *border = sorted((p.tile_shape for p in tables.parts), key=lambda shape: -shape[0])
    assert interior[1:] == [Th * Tw, (Th - stride + kernel) * (Tw - stride + kernel)]
    # tiles at the border, whose windows shift rather than slide, gather only the keys they reach
    assert all(shape[1] == Th * Tw and shape[2] < interior[2] for shape in border)
    assert bool(border) == (Th > stride)  # one stride group per tile: every window is k wide
    assert tables.query_index.numel() == 56 * 56


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


@pytest.mark.parametrize('stride,bias', [(1, True), (1, False), (2, False), (7, False)])
def test_gather_memory_linear_in_tokens(stride, bias):
    B, heads, d, kernel = 1, 2, 32, (7, 7)
    per_token = []
    for side in (14, 28, 56):
        N = side * side
        q, k, v = _qkv(B, (side, side), heads, d, requires_grad=True)
        rpb = _rpb(heads, kernel, requires_grad=True) if bias else None
        tile = reference.tile_sizes(list(kernel), [stride] * 2, reference.TILE_MATH if bias else None, grad=True)
        # a learned bias takes the per-head matmul path, on one padded batch of tiles
        tables = gna_tables([side] * 2, list(kernel), [stride] * 2, [1, 1], [False, False], tile, split=not bias)
        with _LargestTensor() as mode:
            gna_ref(q, k, v, list(kernel), [stride] * 2, [1, 1], [False, False], rpb, impl='gather').sum().backward()
        # the largest intermediates are the per-tile scores (Tq x Tk) or the gathered halo keys (Tk x d)
        scores = sum(tiles * tq * tk for tiles, tq, tk in (p.tile_shape for p in tables.parts))
        assert mode.largest <= B * heads * max(scores, tables.halo_index.numel() * d)
        assert tables.query_index.numel() == N if not bias else tables.query_index.numel() < 1.35 * N  # padding
        per_token.append(mode.largest / N)
        if side == 56:
            assert mode.largest < B * heads * N * N / 8  # far below the dense score matrix
            if not bias and stride < kernel[0]:  # chunked training path: no buffer the size of the gathered halo
                assert mode.largest < B * heads * tables.halo_index.numel() * d
    assert max(per_token) < 1.35 * per_token[0]  # linear in tokens (or better: chunked on the largest map)


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
    q, k, v = _qkv(1, (6, 6), 1, 16)
    q, k, v = (t.to(_device()) for t in (q, k, v))
    out = neighborhood_attention(q, k, v, 3, 2, backend='triton')
    torch.testing.assert_close(out, neighborhood_attention(q, k, v, 3, 2, backend='torch'), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- onnx


class _NAModule(torch.nn.Module):
    """qkv projection + the public op of the kernel's rank, channels-last in and out."""

    def __init__(self, dim=32, heads=2, kernel=(3, 5), dilation=(2, 1), stride=(1, 1), causal=(False, False),
                 bias=True):
        super().__init__()
        self.heads, self.kernel, self.dilation, self.stride, self.causal = heads, kernel, dilation, stride, causal
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.rpb = torch.nn.Parameter(_rpb(heads, kernel)) if bias else None

    def forward(self, x):
        C = x.shape[-1]
        q, k, v = self.qkv(x).reshape(x.shape[:-1] + (3, self.heads, C // self.heads)).unbind(-3)
        out = _op(q, k, v, self.kernel, self.stride, self.dilation, self.causal, self.rpb)
        return out.reshape(x.shape)


ONNX_CASES = {  # name: (module kwargs, export size, other size)
    'dense': (dict(), (11, 13), (16, 19)),
    'gather': (dict(), (16, 19), (11, 13)),
    'strided-causal': (dict(kernel=(4, 5), stride=(2, 5), dilation=(1, 2), causal=(True, False), bias=False),
                       (17, 20), (12, 23)),
    '3d': (dict(kernel=(2, 3, 3), stride=(1, 3, 2), dilation=(1, 1, 2), causal=(True, False, False), bias=False),
           (3, 9, 10), (5, 7, 12)),
}


@pytest.mark.parametrize('dynamo', [False, True], ids=['legacy', 'dynamo'])
@pytest.mark.parametrize('name', list(ONNX_CASES))
def test_onnx_export(name, dynamo, tmp_path):
    """Export at one size with dynamic spatial axes and run the graph at that size and at another one."""
    ort = pytest.importorskip('onnxruntime')
    kwargs, size, other = ONNX_CASES[name]
    model = _NAModule(**kwargs).eval()
    x = torch.randn(2, *size, 32)
    reference._cached_tables.cache_clear()  # tables get built while the exporter traces
    path = str(tmp_path / 'na.onnx')
    axes = {1 + a: f's{a}' for a in range(len(size))}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        if dynamo:
            dims = {1 + a: torch.export.Dim.AUTO for a in range(len(size))}
            torch.onnx.export(model, (x,), path, dynamo=True, dynamic_shapes=({0: torch.export.Dim.AUTO, **dims},))
        else:
            torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17, input_names=['x'],
                              dynamic_axes={'x': {0: 'b', **axes}})
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    for shape in (size, other):
        x = torch.randn(2, *shape, 32)
        with torch.no_grad():
            expected = model(x)
        (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), expected, atol=1e-5, rtol=1e-4, msg=str(shape))


# ---------------------------------------------------------------------------------------------- errors


BAD_INPUTS = [  # (changed arguments of the 2-D op on a 13 x 17 map with 2 heads, expected message)
    (dict(kernel_size=0), r'kernel_size: expected positive sizes, got \(0, 0\) \(height kernel 0\)'),
    (dict(kernel_size=5, dilation=3), r'height: 5 \* 3 = 15 > 13'),
    (dict(kernel_size=7, dilation=(1, 3)), r'width: 7 \* 3 = 21 > 17'),
    (dict(dilation=0), r'dilation: expected positive dilations, got \(0, 0\)'),
    (dict(stride=(1, 4)), r'stride: must not exceed kernel_size on any axis, got width stride 4 > kernel 3'),
    (dict(stride=0), r'stride: expected positive strides'),
    (dict(rel_pos_bias=torch.zeros(2, 5, 3)), r'rel_pos_bias: expected shape .* \(2, 5, 5\), got \(2, 5, 3\)'),
    (dict(rel_pos_bias=torch.zeros(3, 5, 5)), r'rel_pos_bias: expected shape .* \(2, 5, 5\), got \(3, 5, 5\)'),
    (dict(rel_pos_bias=torch.zeros(50)), r'rel_pos_bias: expected shape .* \(2, 5, 5\), got \(50,\)'),
    (dict(rel_pos_bias=torch.zeros(2, 5, 5), is_causal=(False, True)),
     r'rel_pos_bias: not defined with causal attention \(NATTEN .*\), got is_causal=\(False, True\) \(width'),
    (dict(k=torch.zeros(1, 13, 16, 2, 8)), r'q, k, v: expected equal shapes .*\(1, 13, 16, 2, 8\)'),
    (dict(v=torch.zeros(1, 13, 17, 3, 8)), r'q, k, v: expected equal shapes .*\(1, 13, 17, 3, 8\)'),
    (dict(q=torch.zeros(13, 17, 2, 8), k=torch.zeros(13, 17, 2, 8), v=torch.zeros(13, 17, 2, 8)),
     r'q: neighborhood_attention expects a 5-D \(B, height, width, heads, head_dim\) tensor, got 4-D'),
    (dict(kernel_size=(3, 3, 3)), r'kernel_size: expected an int or a pair'),
    (dict(is_causal=(True,)), r'is_causal: expected a bool or 2 bools .* got \(True,\)'),
    (dict(is_causal=1), r'is_causal: expected a bool or 2 bools .* got 1'),
]


def _bad_args(kwargs):
    args = dict(zip('qkv', _qkv(1, (13, 17), 2, 8)), kernel_size=3, dilation=1)
    args.update(kwargs)
    return args


@pytest.mark.parametrize('kwargs, match', BAD_INPUTS)
def test_error_messages(kwargs, match):
    with pytest.raises(ValueError, match=match):
        neighborhood_attention(**_bad_args(kwargs))


def test_error_messages_1d_3d():
    q, k, v = _qkv(1, (4, 6, 7), 2, 8)
    with pytest.raises(ValueError, match=r'depth: 3 \* 2 = 6 > 4 \(input depth x height x width = 4 x 6 x 7\)'):
        neighborhood_attention_3d(q, k, v, 3, (2, 1, 1))
    with pytest.raises(ValueError, match=r'q: neighborhood_attention_1d expects a 4-D \(B, length, heads, head_dim\)'):
        neighborhood_attention_1d(q, k, v, 3)  # natten's na1d would run on the wrong rank's layout
    with pytest.raises(ValueError, match=r'stride: .* depth stride 3 > kernel 2'):
        neighborhood_attention_3d(q, k, v, (2, 3, 3), stride=(3, 1, 1))
    with pytest.raises(ValueError, match=r'kernel_size: expected an int or 3 ints .* got \(3, 3\)'):
        neighborhood_attention_3d(q, k, v, (3, 3))


def test_impl_error_message():
    q, k, v = _qkv(1, (13, 17), 2, 8)
    with pytest.raises(ValueError, match=r"impl: expected 'auto', 'gather' or 'dense', got 'flex'"):
        neighborhood_attention_ref(q, k, v, (3, 3), impl='flex')


# ---------------------------------------------------------------------------------------------- TorchScript


class _Op(torch.nn.Module):
    """The op as a module calls it (arguments after dilation by name), every argument explicit."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: Tuple[int, int],
                dilation: Tuple[int, int] = (1, 1), rel_pos_bias: Optional[torch.Tensor] = None,
                scale: Optional[float] = None, backend: Optional[str] = None, stride: Tuple[int, int] = (1, 1),
                is_causal: Tuple[bool, bool] = (False, False)) -> torch.Tensor:
        return neighborhood_attention(q, k, v, kernel_size, dilation, rel_pos_bias=rel_pos_bias, scale=scale,
                                      backend=backend, stride=stride, is_causal=is_causal)


class _Op3d(torch.nn.Module):
    def forward(self, q: torch.Tensor, kernel_size: Tuple[int, int, int], stride: Tuple[int, int, int],
                is_causal: Tuple[bool, bool, bool]) -> torch.Tensor:
        return neighborhood_attention_3d(q, q, q, kernel_size, 1, stride=stride, is_causal=is_causal)


@pytest.fixture(scope='module')
def scripted_op(script_round_trip):
    """The op compiled by torch.jit.script, saved and loaded back (so nothing in it calls into Python)."""
    return script_round_trip(_Op())


@pytest.mark.parametrize('H,W,kernel,dilation,bias,scale,stride,causal', [
    (13, 17, (5, 5), (2, 2), True, None, (1, 1), (False, False)),  # ragged dilation groups; eager: dense path
    (20, 24, (7, 7), (2, 3), True, None, (1, 1), (False, False)),  # eager takes the gather path (480 tokens)
    (21, 12, (7, 3), (3, 4), True, 0.3, (1, 1), (False, False)),  # non-square kernel, kernel * dilation == W
    (7, 9, (7, 3), (1, 3), False, None, (1, 1), (False, False)),  # kernel == H
    (5, 6, (1, 1), (1, 1), True, None, (1, 1), (False, False)),  # kernel 1: each query attends to itself
    (19, 22, (4, 6), (2, 1), True, None, (3, 6), (False, False)),  # even kernels, strided and blocked
    (18, 20, (5, 4), (1, 2), False, None, (2, 4), (True, False)),  # causal rows
])
def test_scripted_matches_eager(scripted_op, H, W, kernel, dilation, bias, scale, stride, causal,
                                assert_close_to_scale):
    """The scripted op (the reference's export form: tables built in the graph) against the eager op (cached
    tables, dense or gather path), forward and backward, on ragged, clamped, strided and edge-sized maps."""
    q, k, v = _qkv(2, (H, W), 2, 8, requires_grad=True)
    rpb = _rpb(2, kernel, requires_grad=True) if bias else None
    inputs = [q, k, v] + ([rpb] if bias else [])
    grad = torch.randn(2, H, W, 2, 8)
    results = []
    for op in (scripted_op, _Op()):
        out = op(q, k, v, kernel, dilation, rel_pos_bias=rpb, scale=scale, stride=stride, is_causal=causal)
        results.append([out] + list(torch.autograd.grad(out, inputs, grad)))
    for name, got, want in zip('out dq dk dv drpb'.split(), *results):
        assert_close_to_scale(got, want, msg=name)


def test_scripted_3d(script_round_trip, assert_close_to_scale):
    scripted = script_round_trip(_Op3d())
    q = torch.randn(1, 4, 6, 7, 2, 8)
    args = ((2, 3, 4), (1, 3, 2), (True, False, False))
    assert_close_to_scale(scripted(q, *args), _Op3d()(q, *args))


def test_scripted_runs_the_reference_whatever_the_backend(scripted_op, monkeypatch):
    """Scripted code never reaches the Triton path (as exports): a forced backend still runs the reference."""
    monkeypatch.setenv('ZOO_KERNEL_BACKEND', 'triton')
    q, k, v = _qkv(1, (6, 6), 1, 16, requires_grad=True)
    with use_backend('triton'):
        out = scripted_op(q, k, v, (3, 3), (2, 2), backend='triton')
    assert 'NeighborhoodAttention' not in type(out.grad_fn).__name__
    assert torch.equal(out, scripted_op(q, k, v, (3, 3), (2, 2), backend='torch'))


@pytest.mark.parametrize('kwargs, match', [(kwargs, match) for kwargs, match in BAD_INPUTS
                                           if kwargs.get('kernel_size') != (3, 3, 3) and 'is_causal' not in kwargs
                                           and 'stride' not in kwargs])
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


def test_scripted_reference_refuses_dense(assert_close_to_scale):
    """Scripted code has only the in-graph tiled form: 'dense' fails with a message saying so."""
    scripted = torch.jit.script(_Ref())
    q = torch.randn(1, 5, 5, 1, 8)
    assert_close_to_scale(scripted(q, 'auto'), neighborhood_attention_ref(q, q, q, (3, 3), impl='gather'))
    with pytest.raises(torch.jit.Error, match=r"impl: 'dense' runs in eager mode only"):
        scripted(q, 'dense')
