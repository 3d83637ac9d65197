"""Triton generalized neighborhood attention (2-D and 3-D: kernel, stride, dilation, per-axis causal, bias)
against a brute-force oracle: dense fp64 attention masked by neighborhoods listed in plain Python from NATTEN
0.21.7's rules, itself checked against natten's forward."""
import itertools
import warnings

import pytest
import torch

from zoo.kernels.backend import interpreter_on, triton_available

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not (triton_available() and (torch.cuda.is_available() or interpreter_on())),
                       reason='needs triton with CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py)'),
]

DEV = 'cuda' if torch.cuda.is_available() else 'cpu'


# ---------------------------------------------------------------------------------------------- oracle


def _axis_keys(n, k, s, d, causal):
    """For each query i of an axis of length n: the key positions it sees (map coordinates)."""
    left, right = k // 2, k // 2 - (1 - k % 2)
    keys = []
    for i in range(n):
        g, p = i % d, i // d
        length = n // d + (1 if g < n % d else 0)
        if causal:
            lead = min(p // s * s + s - 1, length - 1)
            window = range(max(lead - k + 1, 0), p + 1)
        else:
            lead = min(p // s * s + s // 2, length - 1)
            centre = min(max(lead, left), length - 1 - right)
            window = range(centre - left, centre + right + 1)
            assert len(window) == k
        keys.append([g + d * j for j in window])
    return keys


def _axis_tables(n, k, s, d, causal):
    """(n, n) neighbor mask and bias index (key - query in the sub-grid, + k - 1) of one axis."""
    mask = torch.zeros(n, n, dtype=torch.bool)
    index = torch.zeros(n, n, dtype=torch.long)
    for i, keys in enumerate(_axis_keys(n, k, s, d, causal)):
        for j in keys:
            offset = (j - i) // d  # same dilation group: exact
            assert -k < offset < k  # the bias table covers every neighbor
            mask[i, j] = True
            index[i, j] = offset + k - 1
    return mask, index


def oracle(q, k, v, kernel, stride, dilation, causal, bias=None, scale=None):
    """Dense masked attention in fp64. q, k, v: (B, *spatial, heads, d); bias: (heads, *(2k-1)) or None."""
    spatial = q.shape[1:-2]
    n = len(spatial)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    tables = [_axis_tables(*args) for args in zip(spatial, kernel, stride, dilation, causal)]
    N = 1
    for size in spatial:
        N *= size
    mask = torch.ones((), dtype=torch.bool)
    for a, (m, _) in enumerate(tables):  # (q_0.., q_n-1, k_0.., k_n-1): AND of the per-axis masks
        shape = [1] * (2 * n)
        shape[a], shape[n + a] = spatial[a], spatial[a]
        mask = mask & m.view(shape)
    mask = mask.reshape(N, N)
    B, nh, hd = q.shape[0], q.shape[-2], q.shape[-1]
    qf, kf, vf = (t.double().reshape(B, N, nh, hd).transpose(1, 2) for t in (q, k, v))
    logits = qf @ kf.transpose(-1, -2) * scale
    if bias is not None:
        idx = []
        for a, (_, index) in enumerate(tables):
            shape = [1] * (2 * n)
            shape[a], shape[n + a] = spatial[a], spatial[a]
            idx.append(index.view(shape).expand(*spatial, *spatial).reshape(N, N))
        logits = logits + bias.double()[(slice(None), *idx)]
    logits = logits.masked_fill(~mask, float('-inf'))
    out = logits.softmax(-1) @ vf
    return out.transpose(1, 2).reshape(q.shape)


def _inputs(B, spatial, heads, d, kernel, bias, dtype=torch.float32):
    q, k, v = (torch.randn(B, *spatial, heads, d, dtype=dtype, device=DEV) for _ in range(3))
    table = torch.randn(heads, *(2 * ks - 1 for ks in kernel), device=DEV) if bias else None
    return q, k, v, table


# (kernel, stride, dilation, causal) per natten check: odd/even kernels, strides, ragged dilation, causal axes
NATTEN_2D = [
    ((3, 4), (1, 2), (1, 1), (False, False)),
    ((3, 3), (3, 3), (1, 1), (False, False)),  # blocked; 7 % 3 != 0: the last block overlaps its neighbor
    ((2, 3), (2, 2), (2, 2), (False, True)),
    ((4, 3), (2, 3), (1, 2), (True, True)),
]
NATTEN_1D = [((4,), (3,), (2,), (False,)), ((5,), (2,), (1,), (True,))]
NATTEN_3D = [
    ((3, 2, 3), (1, 2, 3), (1, 2, 1), (False, False, False)),
    ((2, 3, 4), (2, 1, 4), (1, 1, 1), (True, False, True)),
]


_NATTEN = ((1, NATTEN_1D), (2, NATTEN_2D), (3, NATTEN_3D))
SPATIAL = {1: (13,), 2: (6, 7), 3: (3, 4, 5)}


@pytest.mark.parametrize('n,cfg', [(n, c) for n, cs in _NATTEN for c in cs],
                         ids=[f'{n}d-{i}' for n, cs in _NATTEN for i in range(len(cs))])
def test_oracle_matches_natten(n, cfg):
    from natten.functional import na1d, na2d, na3d
    kernel, stride, dilation, causal = cfg
    spatial = SPATIAL[n]
    q, k, v = (torch.randn(2, *spatial, 2, 8) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        want = (na1d, na2d, na3d)[n - 1](q, k, v, kernel, stride=stride, dilation=dilation, is_causal=causal)
    got = oracle(q, k, v, kernel, stride, dilation, causal)
    torch.testing.assert_close(got.float(), want, atol=2e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- triton

# (kernel, stride, dilation, causal, bias, tile): on 6 x 7 maps, heads 2, head_dim 4 / 8
CASES_2D = [
    ((3, 3), (1, 1), (1, 1), (False, False), True, (2, 3)),  # NA, several tiles: halos overlap
    ((4, 4), (1, 1), (1, 1), (False, False), True, None),  # even kernel: one more key on the left
    ((3, 4), (2, 2), (1, 1), (False, False), True, (2, 2)),  # strided, tiles a multiple of the stride
    ((3, 4), (2, 3), (1, 1), (False, False), False, (3, 2)),  # tiles not a multiple of the stride
    ((3, 3), (3, 3), (1, 1), (False, False), False, None),  # blocked, 7 % 3 != 0
    ((4, 5), (4, 5), (1, 1), (False, False), True, (4, 5)),  # blocked, even and odd
    ((3, 3), (2, 1), (2, 2), (False, False), True, (2, 2)),  # ragged dilation groups on both axes
    ((2, 3), (2, 3), (3, 2), (False, False), True, None),  # kernel * dilation == size
    ((3, 3), (1, 1), (1, 1), (True, False), False, (2, 3)),  # causal on one axis
    ((4, 3), (2, 3), (1, 2), (True, True), False, None),
    ((5, 4), (3, 2), (1, 1), (False, True), False, (3, 2)),
    ((2, 2), (1, 2), (3, 3), (True, False), False, None),  # causal with dilation
    ((6, 7), (1, 1), (1, 1), (False, False), True, None),  # kernel == size: dense attention
]
# on sequences of 13 (the 3-D kernel with two axes of length 1)
CASES_1D = [
    ((4,), (1,), (2,), (False,), True, (4,)),  # even kernel, ragged dilation groups, 4 tiles
    ((5,), (3,), (1,), (True,), False, None),
    ((6,), (6,), (2,), (False,), False, (6,)),  # blocked, dilated
]
# on 3 x 4 x 5 maps
CASES_3D = [
    ((3, 3, 3), (1, 1, 1), (1, 1, 1), (False, False, False), True, None),
    ((2, 4, 3), (1, 2, 3), (1, 1, 1), (False, False, False), True, (2, 2, 3)),
    ((3, 2, 5), (3, 2, 5), (1, 1, 1), (False, False, False), False, None),  # blocked
    ((1, 2, 2), (1, 1, 2), (2, 2, 2), (False, False, False), True, (1, 2, 2)),  # ragged dilation groups
    ((3, 3, 3), (1, 1, 2), (1, 1, 1), (True, False, False), False, (2, 2, 2)),  # video-style causal time
    ((2, 3, 4), (2, 1, 4), (1, 1, 1), (True, True, True), False, (1, 2, 2)),
    ((3, 2, 2), (2, 1, 1), (1, 2, 2), (False, True, False), False, None),
]


def _check(n, case, B, heads, d, key_block=None):
    from zoo.kernels.neighborhood import triton as kt
    kernel, stride, dilation, causal, bias, tile = case
    spatial = SPATIAL[n]
    fn = (kt.neighborhood_attention_1d_triton, kt.neighborhood_attention_triton,
          kt.neighborhood_attention_3d_triton)[n - 1]
    q, k, v, table = _inputs(B, spatial, heads, d, kernel, bias)
    leaves = [t.requires_grad_() for t in (q, k, v)] + ([table.requires_grad_()] if bias else [])
    grad = torch.randn_like(q)

    out = fn(q, k, v, kernel, stride, dilation, causal, table, tile=tile, key_block=key_block)
    got = torch.autograd.grad(out, leaves, grad)
    want_out = oracle(q, k, v, kernel, stride, dilation, causal, table)
    want = torch.autograd.grad(want_out, leaves, grad.double())
    _close(out, want_out, 'out')
    for name, a, b in zip('dq dk dv dbias'.split(), got, want):
        _close(a, b, name)


def _close(got, want, name):
    scale = want.abs().max().item()
    err = (got.double() - want).abs().max().item()
    assert got.dtype == torch.float32 and err <= max(1e-6, 1e-5 * scale), f'{name}: {err:.3e} (scale {scale:.3e})'


@pytest.mark.parametrize('case', CASES_2D, ids=[f'2d-{i}' for i in range(len(CASES_2D))])
def test_triton_2d_matches_oracle(case):
    _check(2, case, B=2, heads=2, d=4 if case[4] else 8)


@pytest.mark.parametrize('case', CASES_1D, ids=[f'1d-{i}' for i in range(len(CASES_1D))])
def test_triton_1d_matches_oracle(case):
    _check(1, case, B=2, heads=2, d=4)


@pytest.mark.parametrize('case', CASES_3D, ids=[f'3d-{i}' for i in range(len(CASES_3D))])
def test_triton_3d_matches_oracle(case):
    _check(3, case, B=1, heads=2, d=8 if case[4] else 4)


@pytest.mark.parametrize('n,case', [(2, CASES_2D[i]) for i in (0, 2, 9, 12)] + [(3, CASES_3D[i]) for i in (1, 4)],
                         ids=['2d-0', '2d-2', '2d-9', '2d-12', '3d-1', '3d-4'])
def test_triton_walks_the_halo_in_several_key_blocks(n, case):
    """16 keys per step: the online softmax carries across blocks, some rows see no neighbor in a block."""
    _check(n, case, B=1, heads=1, d=4, key_block=16)


def test_halo_covers_every_window_of_a_tile():
    """The per-axis halo length bounds the keys of any tile's queries (and is exact for blocked attention)."""
    from zoo.kernels.neighborhood.triton import _halo
    for n, k, causal in itertools.product(range(1, 13), range(1, 9), (False, True)):
        for s, t in itertools.product(range(1, k + 1), range(1, 9)):
            if k > n:
                continue
            keys = _axis_keys(n, k, s, 1, causal)
            need = max(max(max(ks) for ks in keys[a:a + t]) - min(keys[a]) + 1 for a in range(0, n, t))
            assert need <= _halo(t, k, s, n), (n, k, s, t, causal)
            if s == t and not causal:
                assert _halo(t, k, s, n) == k


def test_triton_strided_views_and_frozen_bias():
    """q, k, v as strided views of one qkv tensor (the block's layout), forward and backward; a bias without
    grad gets none."""
    from zoo.kernels.neighborhood.triton import neighborhood_attention_3d_triton
    kernel, stride, dilation = (2, 3, 2), (1, 3, 2), (1, 1, 2)
    qkv = torch.randn(1, 3, 4, 5, 3, 2, 8, device=DEV, requires_grad=True)
    q, k, v = qkv.unbind(4)
    table = torch.randn(2, 3, 5, 3, device=DEV)
    grad = torch.randn_like(q)
    out = neighborhood_attention_3d_triton(q, k, v, kernel, stride, dilation, False, table, scale=0.3)
    want = oracle(q, k, v, kernel, stride, dilation, (False,) * 3, table, scale=0.3)
    _close(out, want, 'out')
    _close(torch.autograd.grad(out, qkv, grad)[0], torch.autograd.grad(want, qkv, grad.double())[0], 'dqkv')


@pytest.mark.parametrize('dtype,tol', [(torch.float16, 3e-3), (torch.bfloat16, 3e-2)])
def test_triton_half_precision_accumulates_in_fp32(dtype, tol):
    """16-bit inputs and outputs, fp32 accumulation: forward and every gradient near the fp64 oracle on the same
    rounded inputs (relative to the largest magnitude)."""
    from zoo.kernels.neighborhood.triton import neighborhood_attention_triton
    q, k, v, table = _inputs(1, (6, 7), 2, 8, (3, 4), True, dtype=dtype)
    leaves = [t.requires_grad_() for t in (q, k, v, table)]
    grad = torch.randn_like(q)
    out = neighborhood_attention_triton(q, k, v, (3, 4), (1, 2), 1, False, table)
    want = oracle(q, k, v, (3, 4), (1, 2), (1, 1), (False, False), table)
    assert out.dtype == dtype
    got = (out,) + torch.autograd.grad(out, leaves, grad)
    want = (want,) + torch.autograd.grad(want, leaves, grad.double())
    for name, a, b in zip('out dq dk dv dbias'.split(), got, want):
        assert a.dtype == (torch.float32 if name == 'dbias' else dtype), name
        assert (a.double() - b.double()).abs().max().item() <= tol * b.abs().max().item(), name


@pytest.mark.parametrize('kwargs,match', [
    (dict(is_causal=(True, False), rel_pos_bias=torch.zeros(2, 5, 5)), 'rel_pos_bias: not defined with causal'),
    (dict(stride=4), 'stride 4, dilation 1 on height'),
    (dict(dilation=(1, 3)), r'input width: 3 \* 3 = 9 > 7'),
    (dict(rel_pos_bias=torch.zeros(2, 5, 3)), r'rel_pos_bias: expected shape .* \(2, 5, 5\)'),
    (dict(is_causal=1), 'is_causal: expected a bool'),
    (dict(kernel_size=(3, 3, 3)), 'kernel_size: expected an int or a sequence of 2'),
])
def test_triton_bad_input(kwargs, match):
    from zoo.kernels.neighborhood.triton import neighborhood_attention_triton
    q = torch.randn(1, 6, 7, 2, 4, device=DEV)
    args = {'kernel_size': 3, **kwargs}
    if 'rel_pos_bias' in args:
        args['rel_pos_bias'] = args['rel_pos_bias'].to(DEV)
    error = TypeError if 'expected a bool' in match or 'sequence of 2' in match else ValueError
    with pytest.raises(error, match=match):
        neighborhood_attention_triton(q, q, q, **args)


def test_triton_3d_rejects_a_2d_tensor():
    from zoo.kernels.neighborhood.triton import neighborhood_attention_3d_triton
    q = torch.randn(1, 6, 7, 2, 4, device=DEV)
    with pytest.raises(ValueError, match=r'q, k, v: expected equal shapes \(B, T, H, W, heads, head_dim\)'):
        neighborhood_attention_3d_triton(q, q, q, 3)


def test_oracle_is_dense_attention_when_the_kernel_covers_the_map():
    """Sanity of the oracle itself, independent of natten: kernel == size (not causal) is full attention,
    whatever the stride."""
    q, k, v = (torch.randn(1, 4, 5, 2, 4, dtype=torch.float64) for _ in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(
        *(t.reshape(1, 20, 2, 4).transpose(1, 2) for t in (q, k, v))).transpose(1, 2).reshape(q.shape)
    for stride in itertools.product((1, 2, 4), (1, 5)):
        torch.testing.assert_close(oracle(q, k, v, (4, 5), stride, (1, 1), (False, False)), want)


_COMPILE_SCRIPT = r"""
import zoo.kernels.neighborhood.triton as kt

def compile_kernel(backward, dtype, spatial, kernel, stride, causal, capability):
    fn = kt._na_bwd_kernel if backward else kt._na_fwd_kernel
    q = torch.empty(1, *spatial, 2, 32, dtype=dtype)
    rank = 3 - (spatial[0] == 1)
    tile = (1,) * (3 - rank) + kt.tile_shape(kernel[-rank:], stride[-rank:], spatial[-rank:])
    cfg = kt._config(q, kernel, stride, (1, 1, 1), causal, tile, None)
    meta = dict(cfg['meta'])
    opts = dict(num_warps=meta.pop('num_warps'), num_stages=cfg['bwd_stages' if backward else 'fwd_stages'])
    const = dict(meta, HAS_BIAS=not any(causal), **(dict(NEED_DBIAS=not any(causal)) if backward else {}))
    ty = {torch.float16: 'fp16', torch.bfloat16: 'bf16', torch.float32: 'fp32'}[dtype]
    fp32_ptrs = ('lse_ptr', 'bias_ptr', 'dk_ptr', 'dv_ptr', 'dbias_ptr')
    sig = {n: 'constexpr' if n in const else ('*fp32' if n in fp32_ptrs else '*' + ty) if n.endswith('_ptr') else
           'fp32' if n == 'scale' else 'i32' for n in fn.arg_names}
    return build(fn, sig, const, capability, **opts)

out = {}
for backward, dtype, spatial, kernel, stride, causal in [
        (False, torch.float16, (1, 56, 56), (1, 7, 7), (1, 1, 1), (False,) * 3),
        (True, torch.float16, (1, 56, 56), (1, 7, 7), (1, 1, 1), (False,) * 3),
        (True, torch.float32, (1, 56, 56), (1, 8, 8), (1, 8, 8), (False,) * 3),
        (False, torch.bfloat16, (8, 32, 32), (3, 7, 7), (1, 2, 2), (True, False, False)),
        (True, torch.bfloat16, (8, 32, 32), (3, 7, 7), (1, 2, 2), (True, False, False))]:
    key = ('bwd' if backward else 'fwd') + f'_{str(dtype)[6:]}_{3 - (spatial[0] == 1)}d_k{kernel[-1]}_s{stride[-1]}'
    out[key] = compile_kernel(backward, dtype, spatial, kernel, stride, causal, 86)
print(json.dumps(out))
"""


def test_triton_kernels_compile_for_gpu(compile_for_gpu):
    """Compile (no GPU needed) NAT-, blocked- and video-shaped kernels for sm_86: catches what the interpreter
    lets through (non-constexpr globals, unsupported ops, loop-carried types) and checks shared memory."""
    compile_for_gpu(_COMPILE_SCRIPT, count=5, timeout=600)


@pytest.mark.parametrize('op_name, shape, kw', [
    ('neighborhood_attention_1d', (1, 13, 2, 4), dict(kernel_size=4, stride=2, dilation=2, is_causal=True)),
    ('neighborhood_attention', (1, 6, 7, 2, 4), dict(kernel_size=(3, 4), stride=(2, 1), is_causal=(False, True))),
    ('neighborhood_attention', (1, 6, 7, 1, 4), dict(kernel_size=3, dilation=2, rel_pos_bias=True)),
    ('neighborhood_attention_3d', (1, 3, 4, 5, 1, 4), dict(kernel_size=(2, 3, 3), stride=(1, 3, 2),
                                                          is_causal=(True, False, False))),
])
def test_public_op_dispatches_every_configuration_to_triton(op_name, shape, kw):
    """The public op with backend='triton' runs the kernel of its rank (stride, causal, even kernels included) and
    gives the reference's output and gradients."""
    import zoo.kernels as K
    op = getattr(K, op_name)
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape, device=DEV, requires_grad=True) for _ in range(3))
    kw = dict(kw)
    if kw.pop('rel_pos_bias', False):
        ks = kw['kernel_size']
        kw['rel_pos_bias'] = torch.randn(shape[-2], 2 * ks - 1, 2 * ks - 1, device=DEV)
    outs, grads, g = [], [], torch.randn(shape, device=DEV)
    for backend in ('triton', 'torch'):
        out = op(q, k, v, backend=backend, **kw)
        outs.append(out)
        grads.append(torch.autograd.grad(out, (q, k, v), g))
    scale = outs[1].abs().max().item()
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5 * scale, rtol=0)
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, b, atol=1e-5 * b.abs().max().item(), rtol=0)
