"""Linear-attention op: every normaliser against a float64 brute force written here with the explicit N x Nk weight
matrix (O = W V), forward and gradients of q, k, v, q_norm, k_norm; the textbook naive formula; autocast in fp16 /
bf16 with activations whose half-precision sums overflow; no N x N memory; ONNX export with both exporters at any
token count; input errors; the Triton kernels (interpreter) against the reference, forward and backward."""
from typing import Optional

import pytest
import torch

from zoo.kernels.backend import interpreter_on, triton_available, use_backend
from zoo.kernels.linear import NORMALIZERS, linear_attention, linear_attention_ref
from zoo.kernels.linear.naive import linear_attention_naive

SCALE = 0.3  # InLine / MALA scale (head_dim ** -0.5 in the official code)


def brute_force(q, k, v, normalizer, scale=1.0, eps=1e-6, clamp_min=100.0, q_norm=None, k_norm=None):
    """O = W V with W (B, heads, N, Nk) the attention weights each method's formula implies."""
    n = k.shape[2]
    qn = q if q_norm is None else q_norm
    kn = k if k_norm is None else k_norm
    dots = q @ k.transpose(-2, -1)  # q_i . k_j
    row = (qn @ kn.transpose(-2, -1)).sum(-1, keepdim=True)  # q~_i . sum_j k~_j
    if normalizer == 'none':
        w = dots
    elif normalizer == 'flatten':
        w = (dots / n) / (row / n + eps)
    elif normalizer == 'inline':
        w = scale * dots / n + (1 - scale * row / n) / n
    elif normalizer == 'mala':
        z = scale * row / n
        w = scale * dots / n * (1 + 1 / (z + eps)) - z / n
    else:
        w = dots / row.clamp(min=clamp_min)
    return w @ v


# (N, Nk, d, dv, q_norm / k_norm given)
CASES = {
    'odd_n': (35, 35, 8, 6, False),
    'odd_n_q_norm_k_norm': (35, 35, 8, 6, True),
    'fewer_keys_than_queries': (21, 9, 4, 8, True),
    'one_token': (1, 1, 4, 4, False),
}
PAIRS = [(norm, case) for norm in NORMALIZERS for case in CASES if not (norm == 'none' and CASES[case][-1])]


def _features(normalizer, shape, dtype=torch.float64, gen=None):
    """Feature maps as each method produces them: non-negative (ReLU, ELU + 1, softmax), any sign for InLine's
    identity map. Rows have different magnitudes, so L2ViT's clamp is active on some rows only."""
    x = torch.randn(shape, dtype=dtype, generator=gen) if normalizer == 'inline' else \
        torch.rand(shape, dtype=dtype, generator=gen)
    rows = torch.linspace(0.2, 2.0, shape[2], dtype=dtype)[:, None]
    return x * rows


def _inputs(normalizer, case, batch=2, heads=2, dtype=torch.float64):
    N, Nk, d, dv, norms = CASES[case]
    g = torch.Generator().manual_seed(hash(case) % 2 ** 31)
    q = _features(normalizer, (batch, heads, N, d), dtype, g)
    k = _features(normalizer, (batch, heads, Nk, d), dtype, g)
    v = torch.randn(batch, heads, Nk, dv, dtype=dtype, generator=g)
    q_norm = _features(normalizer, (batch, heads, N, d), dtype, g) if norms else None
    k_norm = _features(normalizer, (batch, heads, Nk, d), dtype, g) if norms else None
    kw = dict(scale=SCALE, q_norm=q_norm, k_norm=k_norm)
    if normalizer == 'l2vit':  # a floor between two row values: some rows clamped, some not
        qn, kn = (q if q_norm is None else q_norm), (k if k_norm is None else k_norm)
        row = (qn @ kn.sum(2, keepdim=True).transpose(-2, -1)).flatten().sort().values
        mid = row.numel() // 2
        kw['clamp_min'] = float(row[mid] + row[max(mid - 1, 0)]) / 2 if row.numel() > 1 else float(row[0]) / 2
    leaves = [t.requires_grad_() for t in (q, k, v, q_norm, k_norm) if t is not None]
    return q, k, v, kw, leaves


def _fwd_bwd(fn, q, k, v, normalizer, kw, leaves, grad_out):
    out = fn(q, k, v, normalizer=normalizer, **kw) if fn is linear_attention else fn(q, k, v, normalizer, **kw)
    return [out.detach()] + list(torch.autograd.grad(out, leaves, grad_out))


@pytest.mark.parametrize('normalizer,case', PAIRS)
def test_reference_and_naive_match_brute_force(normalizer, case, assert_close_to_scale):
    q, k, v, kw, leaves = _inputs(normalizer, case)
    grad_out = torch.randn(q.shape[:3] + v.shape[-1:], dtype=torch.float64)
    want = _fwd_bwd(brute_force, q, k, v, normalizer, kw, leaves, grad_out)
    names = ['out', 'dq', 'dk', 'dv', 'dq_norm', 'dk_norm'][:len(want)]
    for fn in (linear_attention, linear_attention_naive):
        got = _fwd_bwd(fn, q, k, v, normalizer, kw, leaves, grad_out)
        for g, w, name in zip(got, want, names):
            assert_close_to_scale(g, w, msg=f'{fn.__name__} {name}')


def test_brute_force_is_not_vacuous():
    """The five normalisers give five different outputs, q_norm / k_norm change them, and the L2ViT inputs above
    clamp some rows and not others."""
    q, k, v, kw, _ = _inputs('l2vit', 'odd_n_q_norm_k_norm')
    q, k, v = q.detach(), k.detach(), v.detach()
    qn, kn = kw['q_norm'].detach(), kw['k_norm'].detach()
    outs = [linear_attention(q, k, v, normalizer=n, scale=SCALE) for n in NORMALIZERS]
    for i in range(len(outs)):
        for j in range(i):
            assert not torch.allclose(outs[i], outs[j], rtol=1e-3, atol=1e-3), (NORMALIZERS[i], NORMALIZERS[j])
    for n in NORMALIZERS[1:]:
        assert not torch.allclose(linear_attention(q, k, v, normalizer=n, scale=SCALE, q_norm=qn, k_norm=kn),
                                  linear_attention(q, k, v, normalizer=n, scale=SCALE), rtol=1e-3, atol=1e-3), n
    row = qn @ kn.sum(2, keepdim=True).transpose(-2, -1)
    assert (row < kw['clamp_min']).any() and (row > kw['clamp_min']).any()


def test_inline_weights_sum_to_one_and_efficient_is_unnormalised():
    q, k, v, kw, _ = _inputs('inline', 'odd_n')
    ones = torch.ones_like(v.detach())
    out = linear_attention(q.detach(), k.detach(), ones, normalizer='inline', scale=SCALE)
    torch.testing.assert_close(out, torch.ones_like(out))  # InLine's implied weights sum to 1 over the keys
    q, k = q.detach().abs(), k.detach().abs()
    out = linear_attention(q, k, ones, normalizer='none')
    torch.testing.assert_close(out, (q @ k.sum(2, keepdim=True).transpose(-2, -1)).expand_as(out))


# ---------------------------------------------------------------------------------------------- autocast

N_LARGE = 4096


def _large(normalizer, dtype):
    """Activations of ~1e2..1e3 over 4096 tokens: each sum over the keys exceeds fp16's 65504, the output does not.
    Efficient attention's query is small (softmax over channels), InLine's / MALA's ~1..10 (their output grows
    with q . k)."""
    g = torch.Generator().manual_seed(1)
    shape = (1, 2, N_LARGE, 16)
    big = torch.empty(shape).uniform_(1e2, 1e3, generator=g)
    q_range = {'none': (0., 1e-3), 'inline': (1., 10.), 'mala': (1., 10.)}.get(normalizer, (1e2, 1e3))
    q = torch.empty(shape).uniform_(*q_range, generator=g)
    v = torch.empty(shape).uniform_(0. if normalizer == 'none' else -1., 1., generator=g)
    return [t.to(dtype).requires_grad_() for t in (q, big, v)]


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('normalizer', NORMALIZERS)
def test_autocast_large_activations_stay_finite_and_close_to_fp64(normalizer, dtype, assert_close_to_scale):
    q, k, v = _large(normalizer, dtype)
    kw = dict(scale=0.25)
    with torch.autocast('cpu', dtype=dtype):
        out = linear_attention(q, k, v, normalizer=normalizer, **kw)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = linear_attention_naive(q64, k64, v64, normalizer, **kw)
    want_grads = torch.autograd.grad(want, (q64, k64, v64), grad_out.double())
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert_close_to_scale(out.double(), want.detach(), rel=1e-2, msg='out')
    top = torch.finfo(dtype).max / 2
    for g, w, name in zip(grads, want_grads, ('dq', 'dk', 'dv')):
        assert g.dtype == dtype
        if w.abs().max() < top:  # a gradient the dtype can hold must come out finite and close
            assert torch.isfinite(g).all(), name
            assert_close_to_scale(g.double(), w, rel=2e-2, msg=name)
    if dtype == torch.float16:
        # the same formula with the sums in fp16 overflows: this test fails for an op that sums in half precision
        naive = linear_attention_naive(q.detach(), k.detach(), v.detach(), normalizer, **kw)
        assert not torch.isfinite(naive).all()
        assert not torch.isfinite(k.detach().sum(2)).all()


def test_autocast_output_dtype_for_fp32_inputs():
    q, k, v = (torch.rand(1, 2, 9, 4) for _ in range(3))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = linear_attention(q, k, v, normalizer='flatten')
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), linear_attention(q, k, v, normalizer='flatten'), rtol=1e-2, atol=1e-2)
    assert linear_attention(q.double(), k.double(), v.double(), normalizer='flatten').dtype == torch.float64


# ---------------------------------------------------------------------------------------------- memory


def test_reference_never_builds_n_by_n():
    """Forward + backward at N = 16384 tokens: an N x N fp32 matrix alone would be 1 GiB; the reference's peak
    stays within a few copies of its inputs."""
    from zoo.bench.measure import peak_alloc_mib as tensor_peak_mb
    q, k, v = (torch.rand(1, 1, 16384, 16, requires_grad=True) for _ in range(3))
    inputs_mb = 3 * q.numel() * 4 / 2 ** 20

    def run():
        out = linear_attention(q, k, v, normalizer='mala', scale=0.25, q_norm=q * 1, k_norm=k * 1)
        out.backward(torch.ones_like(out))
    assert tensor_peak_mb(run) < 6 * inputs_mb


# ---------------------------------------------------------------------------------------------- ONNX


class _AllNormalizers(torch.nn.Module):
    """Every normaliser in one graph (q_norm / k_norm for the two that need them most)."""

    def __init__(self, backend: str):
        super().__init__()
        self.backend = backend

    def forward(self, q, k, v, q_norm, k_norm):
        outs = [linear_attention(q, k, v, normalizer='none', backend=self.backend)]
        for n in NORMALIZERS[1:]:
            extra = dict(q_norm=q_norm, k_norm=k_norm) if n in ('mala', 'flatten') else {}
            outs.append(linear_attention(q, k, v, normalizer=n, scale=SCALE, clamp_min=2.0, backend=self.backend,
                                         **extra))
        return torch.cat(outs, -1)


@pytest.mark.parametrize('exporter', ['legacy', 'dynamo'])
def test_onnx_export_any_token_count(exporter, tmp_path):
    """Exported at 10 tokens with backend 'triton' requested (export takes the reference), run at 10 and 23."""
    onnx, ort = pytest.importorskip('onnx'), pytest.importorskip('onnxruntime')
    names = ['q', 'k', 'v', 'q_norm', 'k_norm']

    def inputs(n):
        return tuple(torch.rand(2, 3, n, 8) for _ in names)
    path = str(tmp_path / 'linear.onnx')
    if exporter == 'legacy':
        torch.onnx.export(_AllNormalizers('triton').eval(), inputs(10), path, dynamo=False, input_names=names,
                          opset_version=17, dynamic_axes={n: {2: 'tokens'} for n in names})
    else:
        tokens = torch.export.Dim('tokens', min=2)
        torch.onnx.export(_AllNormalizers('triton').eval(), inputs(10), path, dynamo=True, external_data=False,
                          input_names=names, dynamic_shapes=tuple({2: tokens} for _ in names))
    onnx.checker.check_model(onnx.load(path))
    sess = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    for n in (10, 23):
        x = inputs(n)
        got = torch.from_numpy(sess.run(None, dict(zip(names, (t.numpy() for t in x))))[0])
        want = _AllNormalizers('torch')(*x)
        assert got.shape == want.shape == (2, 3, n, 8 * len(NORMALIZERS))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- errors


def test_input_errors():
    q, k, v = (torch.rand(2, 3, 5, 4) for _ in range(3))
    with pytest.raises(ValueError, match=r"normalizer: expected one of \('none', 'flatten', 'inline', 'mala', "
                                         r"'l2vit'\), got 'softmax'"):
        linear_attention(q, k, v, normalizer='softmax')
    with pytest.raises(ValueError, match=r'eps: expected a positive finite number, got 0'):
        linear_attention(q, k, v, normalizer='flatten', eps=0)
    with pytest.raises(ValueError, match=r'clamp_min: expected a positive finite number, got -1.0'):
        linear_attention(q, k, v, normalizer='l2vit', clamp_min=-1.0)
    with pytest.raises(ValueError, match=r'scale: expected a finite number, got nan'):
        linear_attention(q, k, v, normalizer='inline', scale=float('nan'))
    with pytest.raises(ValueError, match=r'q, k, v: expected 4-D .* got \(2, 3, 5, 4\), \(3, 5, 4\)'):
        linear_attention(q, k[0], v, normalizer='none')
    with pytest.raises(ValueError, match=r'one B, heads, d and Nk, got \(2, 3, 5, 4\), \(2, 3, 5, 6\)'):
        linear_attention(q, torch.rand(2, 3, 5, 6), v, normalizer='none')
    with pytest.raises(ValueError, match=r'one B, heads, d and Nk, got \(2, 3, 5, 4\), \(2, 2, 5, 4\)'):
        linear_attention(q, torch.rand(2, 2, 5, 4), v, normalizer='none')
    with pytest.raises(ValueError, match=r'one B, heads, d and Nk, .* \(2, 3, 5, 4\), \(2, 3, 7, 4\)$'):
        linear_attention(q, k, torch.rand(2, 3, 7, 4), normalizer='none')
    with pytest.raises(ValueError, match=r'k_norm: expected the shape of k, \(2, 3, 5, 4\), got \(2, 3, 5, 2\)'):
        linear_attention(q, k, v, normalizer='mala', k_norm=torch.rand(2, 3, 5, 2))
    with pytest.raises(ValueError, match=r"q_norm, k_norm: normalizer 'none' has no normaliser"):
        linear_attention(q, k, v, normalizer='none', q_norm=q)
    with pytest.raises(ValueError, match=r'k, v: expected at least one key token, got Nk = 0'):
        linear_attention(q, k[:, :, :0], v[:, :, :0], normalizer='flatten')
    with pytest.raises(TypeError, match=r'expected floating-point tensors'):
        linear_attention(q, k, v.long(), normalizer='none')
    with pytest.raises(ValueError, match=r"backend: expected one of \('auto', 'torch', 'triton'\), got 'cuda'"):
        linear_attention(q, k, v, normalizer='none', backend='cuda')


def test_fewer_keys_and_auto_backend_on_cpu_is_the_reference():
    q, k, v = torch.rand(2, 3, 11, 4), torch.rand(2, 3, 4, 4), torch.randn(2, 3, 4, 5)
    out = linear_attention(q, k, v, normalizer='flatten', backend='auto')
    assert out.shape == (2, 3, 11, 5)
    torch.testing.assert_close(out, linear_attention_ref(q, k, v, 'flatten'))


# ---------------------------------------------------------------------------------------------- Triton

needs_triton = pytest.mark.skipif(not (triton_available() and (interpreter_on() or torch.cuda.is_available())),
                                  reason='needs triton with CUDA or TRITON_INTERPRET=1')

# (N, Nk, d, dv, q_norm / k_norm given): N off the 16-token tile, d and dv below / above / at 16, Nk != N, dv
# wider than one 64-column chunk
TRITON_CASES = {
    'n37_d8_dv20': (37, 37, 8, 20, False),
    'n33_nk19_d16_dv8_norms': (33, 19, 16, 8, True),
    'n16_d32_dv16_norms': (16, 16, 32, 16, True),
    'n18_d8_dv72_two_value_chunks': (18, 18, 8, 72, True),
}


def _triton_inputs(normalizer, case, dtype=torch.float32):
    N, Nk, d, dv, norms = TRITON_CASES[case]
    norms = norms and normalizer != 'none'
    g = torch.Generator().manual_seed(3)
    q = _features(normalizer, (2, 2, N, d), dtype, g)
    k = _features(normalizer, (2, 2, Nk, d), dtype, g)
    v = torch.randn(2, 2, Nk, dv, dtype=dtype, generator=g)
    q_norm = _features(normalizer, (2, 2, N, d), dtype, g) if norms else None
    k_norm = _features(normalizer, (2, 2, Nk, d), dtype, g) if norms else None
    kw = dict(scale=SCALE, q_norm=q_norm, k_norm=k_norm)
    if normalizer == 'l2vit':  # half the rows clamped
        qn, kn = (q if q_norm is None else q_norm), (k if k_norm is None else k_norm)
        kw['clamp_min'] = (qn @ kn.sum(2, keepdim=True).transpose(-2, -1)).flatten().median().item() * 1.001
    leaves = [t.requires_grad_() for t in (q, k, v, q_norm, k_norm) if t is not None]
    return q, k, v, kw, leaves


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize('case', list(TRITON_CASES))
@pytest.mark.parametrize('normalizer', NORMALIZERS)
def test_triton_matches_reference_fwd_bwd(normalizer, case, assert_close_to_scale):
    q, k, v, kw, leaves = _triton_inputs(normalizer, case)
    grad_out = torch.randn(q.shape[:3] + v.shape[-1:])
    got = _fwd_bwd(linear_attention, q, k, v, normalizer, dict(kw, backend='triton'), leaves, grad_out)
    want = _fwd_bwd(linear_attention, q, k, v, normalizer, dict(kw, backend='torch'), leaves, grad_out)
    names = ['out', 'dq', 'dk', 'dv', 'dq_norm', 'dk_norm']
    for g, w, name in zip(got, want, names):
        assert_close_to_scale(g, w, rel=1e-5, msg=name)


@pytest.mark.triton
@needs_triton
def test_triton_strided_views_of_one_projection(assert_close_to_scale):
    """q, k, v as head-major views of one (B, N, 3, heads, d) projection: the mixers' layout, no copies needed."""
    B, N, nh, d = 2, 20, 2, 16
    qkv = torch.rand(B, N, 3, nh, d, requires_grad=True)
    grad_out = torch.randn(B, nh, N, d)
    results = []
    for backend in ('torch', 'triton'):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = linear_attention(q, k, v, normalizer='mala', scale=SCALE, q_norm=q * 2, backend=backend)
        results.append((out.detach(), torch.autograd.grad(out, qkv, grad_out)[0]))
    assert_close_to_scale(results[1][0], results[0][0], rel=1e-5)
    assert_close_to_scale(results[1][1], results[0][1], rel=1e-5)


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_triton_half_precision(dtype, assert_close_to_scale):
    q, k, v, kw, _ = _triton_inputs('flatten', 'n33_nk19_d16_dv8_norms', dtype=dtype)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    kw = dict(kw, q_norm=kw['q_norm'].detach(), k_norm=kw['k_norm'].detach())
    out = linear_attention(q, k, v, normalizer='flatten', backend='triton', **kw)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    kw64 = dict(kw, q_norm=kw['q_norm'].double(), k_norm=kw['k_norm'].double())
    want = linear_attention(q64, k64, v64, normalizer='flatten', **kw64)
    want_grads = torch.autograd.grad(want, (q64, k64, v64), torch.ones_like(want))
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_close_to_scale(out.double(), want.detach(), rel=1e-2)
    for g, w in zip(grads, want_grads):
        assert_close_to_scale(g.double(), w, rel=2e-2)



@pytest.mark.triton
@needs_triton
def test_triton_autocast_large_activations(assert_close_to_scale):
    """MALA's normaliser in fp16 autocast with sums over 1024 tokens of ~1e2..1e3 (past fp16's 65504): the kernels
    accumulate in fp32, so the output and gradients stay finite and close to the fp64 result."""
    g = torch.Generator().manual_seed(1)
    shape = (1, 2, 1024, 16)
    q = torch.empty(shape).uniform_(1., 10., generator=g)
    k = torch.empty(shape).uniform_(1e2, 1e3, generator=g)
    v = torch.empty(shape).uniform_(-1., 1., generator=g)
    q, k, v = (t.half().requires_grad_() for t in (q, k, v))
    with torch.autocast('cpu', dtype=torch.float16):
        out = linear_attention(q, k, v, normalizer='mala', scale=0.25, q_norm=q, k_norm=k, backend='triton')
    grad_out = torch.full(out.shape, 1e-3, dtype=torch.float16)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = linear_attention_naive(q64, k64, v64, 'mala', scale=0.25)
    want_grads = torch.autograd.grad(want, (q64, k64, v64), grad_out.double())
    assert out.dtype == torch.float16
    assert_close_to_scale(out.double(), want.detach(), rel=1e-2)
    for got, w in zip(grads, want_grads):
        assert torch.isfinite(got).all()
        assert_close_to_scale(got.double(), w, rel=2e-2)
    assert not torch.isfinite(linear_attention_naive(q.detach(), k.detach(), v.detach(), 'mala', scale=0.25)).all()

_COMPILE_SCRIPT = r"""
import zoo.kernels.linear.triton as kt

KERNELS = dict(reduce=kt._reduce_kernel, apply=kt._apply_kernel, query_bwd=kt._query_bwd_kernel,
               key_bwd=kt._key_bwd_kernel)
FP32_PTRS = ('s_ptr', 'ks_ptr', 'vs_ptr', 'kb_ptr', 'vb_ptr', 'ds_ptr', 'dkb_ptr', 'dvb_ptr')

class Cuda(torch.Tensor):  # the host config as for a CUDA tensor, without one
    is_cuda = True

def compile_kernel(name, dtype, d, dv, norm):
    fn = KERNELS[name]
    q = torch.empty(1, 1, 1, d, dtype=dtype).as_subclass(Cuda)
    cfg = kt._config(q, torch.empty(1, 1, 1, min(dv, kt.DV_CHUNK)))
    const = {key: cfg[key] for key in ('BLOCK_N', 'BLOCK_D', 'BLOCK_DV', 'PRECISION')}
    const.update({f: True for f in ('HAS_KN', 'HAS_QN', 'ADD_DKB') if f in fn.arg_names})
    if 'NORM' in fn.arg_names:
        const['NORM'] = norm
    ty = {torch.float16: 'fp16', torch.float32: 'fp32', torch.bfloat16: 'bf16'}[dtype]
    sig = {n: 'constexpr' if n in const else '*fp32' if n in FP32_PTRS else '*' + ty if n.endswith('_ptr') else
           'fp32' if n in ('eps', 'clamp_min') else 'i32' for n in fn.arg_names}
    return build(fn, sig, const, 80, num_warps=cfg['num_warps'])

out = {}
# every kernel at head dim 32 (Swin-family variants) in fp16; the backward's query kernel, the largest, at 64 (MALA)
# and at the widest d = 128 in fp32 (the largest tiles), for MALA's normaliser (the most live values)
for name in KERNELS:
    out[f'{name}_fp16_32'] = compile_kernel(name, torch.float16, 32, 32, 3)
out['query_bwd_bf16_64'] = compile_kernel('query_bwd', torch.bfloat16, 64, 64, 3)
out['query_bwd_fp32_64'] = compile_kernel('query_bwd', torch.float32, 64, 64, 3)
out['query_bwd_fp32_128'] = compile_kernel('query_bwd', torch.float32, 128, 128, 3)
out['key_bwd_fp32_128'] = compile_kernel('key_bwd', torch.float32, 128, 128, 0)
print(json.dumps(out))
"""


@pytest.mark.triton
def test_triton_kernels_compile_for_gpu(compile_for_gpu):
    """Compile (no GPU needed) the kernels for sm_80 at the head dims in use: catches what the interpreter lets
    through (non-constexpr globals, unsupported ops, dtype errors) and checks shared memory fits 99 KB."""
    compile_for_gpu(_COMPILE_SCRIPT, count=8, timeout=900)


# ---------------------------------------------------------------------------------------------- TorchScript

class _Op(torch.nn.Module):
    """The op as the mixers call it (normalizer and the rest by name), every argument explicit."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, normalizer: str, scale: float = 1.0,
                eps: float = 1e-6, clamp_min: float = 100.0, q_norm: Optional[torch.Tensor] = None,
                k_norm: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> torch.Tensor:
        return linear_attention(q, k, v, normalizer=normalizer, scale=scale, eps=eps, clamp_min=clamp_min,
                                q_norm=q_norm, k_norm=k_norm, backend=backend)


@pytest.fixture(scope='module')
def scripted_op(script_round_trip):
    """The op compiled by torch.jit.script, saved and loaded back (so nothing in it calls into Python)."""
    return script_round_trip(_Op())


@pytest.mark.parametrize('normalizer,case', PAIRS)
def test_scripted_matches_eager(scripted_op, normalizer, case, assert_close_to_scale):
    """The scripted op against the eager op, forward and the gradients of every input, in fp32 and fp64 (q_norm /
    k_norm given or not, fewer keys than queries, one token)."""
    for dtype in (torch.float32, torch.float64):
        q, k, v, kw, leaves = _inputs(normalizer, case, dtype=dtype)
        grad_out = torch.randn(q.shape[:3] + v.shape[-1:], dtype=dtype)
        want = _fwd_bwd(linear_attention, q, k, v, normalizer, kw, leaves, grad_out)
        out = scripted_op(q, k, v, normalizer, **kw)
        got = [out.detach()] + list(torch.autograd.grad(out, leaves, grad_out))
        assert got[0].dtype == dtype
        for g, w, name in zip(got, want, ['out', 'dq', 'dk', 'dv', 'dq_norm', 'dk_norm']):
            assert_close_to_scale(g, w, msg=f'{dtype} {name}')


def test_scripted_runs_the_reference_whatever_the_backend(scripted_op, monkeypatch):
    """Scripted code never reaches the Triton path (as exports): a forced backend still runs the reference."""
    monkeypatch.setenv('ZOO_KERNEL_BACKEND', 'triton')
    q, k, v = (torch.rand(1, 2, 5, 4) for _ in range(3))
    with use_backend('triton'):
        out = scripted_op(q, k, v, 'flatten', backend='triton')
    assert torch.equal(out, linear_attention_ref(q, k, v, 'flatten'))


@pytest.mark.parametrize('args, match', [
    (dict(normalizer='softmax'), r"normalizer: expected one of \('none', 'flatten', 'inline', 'mala', 'l2vit'\), "
                                 r"got 'softmax'"),
    (dict(normalizer='flatten', eps=0.), r'eps: expected a positive finite number, got 0'),
    (dict(normalizer='l2vit', clamp_min=-1.), r'clamp_min: expected a positive finite number, got -1'),
    (dict(normalizer='inline', scale=float('nan')), r'scale: expected a finite number, got nan'),
    (dict(normalizer='none', k=torch.rand(3, 5, 4)), r'q, k, v: expected 4-D .* got \(2, 3, 5, 4\), \(3, 5, 4\)'),
    (dict(normalizer='none', k=torch.rand(2, 2, 5, 4)), r'q, k, v: .*one B, heads, d and Nk, got \(2, 3, 5, 4\), \(2, 2, 5, 4\)'),
    (dict(normalizer='mala', k_norm=torch.rand(2, 3, 5, 2)),
     r'k_norm: expected the shape of k, \(2, 3, 5, 4\), got \(2, 3, 5, 2\)'),
    (dict(normalizer='none', q_norm=torch.rand(2, 3, 5, 4)), r"q_norm, k_norm: normalizer 'none' has no normaliser"),
    (dict(normalizer='flatten', k=torch.rand(2, 3, 0, 4), v=torch.rand(2, 3, 0, 4)),
     r'k, v: expected at least one key token, got Nk = 0'),
])
def test_scripted_bad_inputs(scripted_op, args, match):
    """The scripted op keeps the op's checks and messages (TorchScript reraises them as torch.jit.Error)."""
    inputs = dict(q=torch.rand(2, 3, 5, 4), k=torch.rand(2, 3, 5, 4), v=torch.rand(2, 3, 5, 4))
    inputs.update(args)
    with pytest.raises(ValueError, match=match):
        linear_attention(**inputs)
    with pytest.raises(torch.jit.Error, match='ValueError: ' + match):
        scripted_op(**inputs)
