"""Bi-level routing attention op: reference against a dense brute-force oracle (forward, backward, routing),
the Triton kernels (interpreter) against the reference with regions of 1, 4 and 16+ tokens, memory of the
reference's backward against the gather formulation, ONNX export with both exporters, error messages."""
from typing import Optional

import pytest
import torch

from zoo.kernels import routed_attention
from zoo.kernels.backend import interpreter_on, triton_available, use_backend
from zoo.kernels.routing import default_scale, region_routing
from zoo.kernels.routing.naive import region_labels, routed_attention_naive
from zoo.kernels.routing.reference import routed_attention_ref, use_dense

# (H, W, n_win, topk, heads, dk, dv): tokens per region (H / n_win) * (W / n_win) = 1, 4, 6 (2 x 3), 16, 25, 64;
# top-k from 1 to all regions
CASES = {
    'one_token_regions': (3, 3, 3, 4, 2, 8, 8),
    'four_tokens': (4, 4, 2, 2, 2, 8, 8),
    'rect_regions_2x3': (4, 6, 2, 3, 2, 8, 6),
    'sixteen_tokens': (8, 8, 2, 1, 1, 16, 16),
    'twenty_five_tokens_all_regions': (10, 10, 2, 4, 2, 8, 4),
    'biformer_stage1_like': (14, 14, 7, 3, 2, 8, 8),
    'one_region': (5, 7, 1, 1, 2, 8, 8),
}


def _qkv(H, W, heads, dk, dv, batch=2, dtype=torch.float64, grad=True):
    q, k = (torch.randn(batch, H, W, heads, dk, dtype=dtype, requires_grad=grad) for _ in range(2))
    v = torch.randn(batch, H, W, heads, dv, dtype=dtype, requires_grad=grad)
    return q, k, v


def _fwd_bwd(fn, q, k, v, grad_out, **kw):
    out = fn(q, k, v, **kw)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return out.detach(), grads


@pytest.mark.parametrize('case', list(CASES))
@pytest.mark.parametrize('impl', ['gather', 'dense', 'auto', 'global'])
def test_reference_matches_oracle(case, impl):
    H, W, n_win, topk, nh, dk, dv = CASES[case]
    topk = -2 if impl == 'global' else topk
    q, k, v = _qkv(H, W, nh, dk, dv)
    grad_out = torch.randn(2, H, W, nh, dv, dtype=torch.float64)
    kw = dict(n_win=n_win, topk=topk)
    if impl in ('gather', 'dense'):
        out, grads = _fwd_bwd(routed_attention_ref, q, k, v, grad_out, impl=impl, **kw)
    else:
        out, grads = _fwd_bwd(routed_attention, q, k, v, grad_out, **kw)
    want, want_grads = _fwd_bwd(routed_attention_naive, q, k, v, grad_out, **kw)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    for g, w, name in zip(grads, want_grads, 'qkv'):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=name)


def test_routing_selects_the_oracles_regions_and_is_detached():
    H, W, n_win, topk = 12, 8, 4, 5
    q, k, _ = _qkv(H, W, 2, 8, 8, batch=3)
    idx = region_routing(q, k, n_win, topk, default_scale(q, topk))
    assert idx.shape == (3, 16, 5) and not idx.requires_grad
    labels = region_labels(H, W, n_win)
    qf, kf = q.reshape(3, H * W, -1), k.reshape(3, H * W, -1)
    for b in range(3):
        q_r = torch.stack([qf[b, labels == r].mean(0) for r in range(16)])
        k_r = torch.stack([kf[b, labels == r].mean(0) for r in range(16)])
        best = (q_r @ k_r.T).argsort(dim=-1, descending=True)[:, :topk]
        assert [set(r.tolist()) for r in idx[b]] == [set(r.tolist()) for r in best]


def test_official_scale_and_given_idx():
    q, k, v = _qkv(6, 6, 2, 4, 4, grad=False)
    assert default_scale(q, 2) == (2 * 4) ** -0.5  # the full qk_dim, as the released weights need
    assert default_scale(q, -2) == 4 ** -0.5
    idx = torch.tensor([[[8, 0], [1, 2], [3, 4], [5, 6], [7, 8], [0, 1], [2, 3], [4, 5], [6, 7]]] * 2)
    out = routed_attention(q, k, v, 3, 2, idx=idx, scale=0.3)
    torch.testing.assert_close(out, routed_attention_naive(q, k, v, 3, 2, idx=idx, scale=0.3))
    other = routed_attention(q, k, v, 3, 2, scale=0.3)
    assert not torch.allclose(out, other)


# ---------------------------------------------------------------------------------------------- Triton


needs_triton = pytest.mark.skipif(not (triton_available() and (interpreter_on() or torch.cuda.is_available())),
                                  reason='needs triton with CUDA or TRITON_INTERPRET=1')
TRITON_CASES = ['one_token_regions', 'four_tokens', 'rect_regions_2x3', 'sixteen_tokens',
                'twenty_five_tokens_all_regions']


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize('case', TRITON_CASES)
def test_triton_matches_reference_fwd_bwd(case):
    H, W, n_win, topk, nh, dk, dv = CASES[case]
    dk, dv = max(dk, 16), dv  # dv below 16 exercises the masked head-dim columns
    q, k, v = _qkv(H, W, nh, dk, dv, dtype=torch.float32)
    grad_out = torch.randn(2, H, W, nh, dv)
    idx = region_routing(q, k, n_win, topk, default_scale(q, topk))
    kw = dict(n_win=n_win, topk=topk, idx=idx)
    out, grads = _fwd_bwd(lambda *a, **k_: routed_attention(*a, backend='triton', **k_), q, k, v, grad_out, **kw)
    ref, ref_grads = _fwd_bwd(lambda *a, **k_: routed_attention(*a, backend='torch', **k_), q, k, v, grad_out, **kw)
    errs = [(out - ref).abs().max().item()] + [(g - r).abs().max().item() for g, r in zip(grads, ref_grads)]
    print(f'{case}: max |err| out {errs[0]:.2e}, dq {errs[1]:.2e}, dk {errs[2]:.2e}, dv {errs[3]:.2e}')
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r, name in zip(grads, ref_grads, 'qkv'):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5, msg=f'd{name}')


@pytest.mark.triton
@needs_triton
def test_triton_strided_views_and_custom_scale():
    # q, k, v as slices of one projection (the mixer's layout), q/k wider than v
    B, H, W, nh, dk, dv = 1, 4, 8, 2, 16, 16
    qkv = torch.randn(B, H, W, nh * (2 * dk + dv), requires_grad=True)
    grad_out = torch.randn(B, H, W, nh, dv)
    results = []
    for backend in ('torch', 'triton'):
        q = qkv[..., :nh * dk].view(B, H, W, nh, dk)
        k = qkv[..., nh * dk:2 * nh * dk].view(B, H, W, nh, dk)
        v = qkv[..., 2 * nh * dk:].view(B, H, W, nh, dv)
        out = routed_attention(q, k, v, 2, 2, scale=0.7, backend=backend)
        results.append((out.detach(), torch.autograd.grad(out, qkv, grad_out)[0]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-5)


@pytest.mark.triton
@needs_triton
def test_triton_half_precision():
    q, k, v = _qkv(4, 4, 2, 16, 16, batch=1, dtype=torch.float16)
    grad_out = torch.randn(1, 4, 4, 2, 16, dtype=torch.float16)
    out, grads = _fwd_bwd(lambda *a, **k_: routed_attention(*a, backend='triton', **k_), q, k, v, grad_out,
                          n_win=2, topk=2)
    ref, ref_grads = _fwd_bwd(routed_attention_naive, *(t.double() for t in (q, k, v)), grad_out.double(),
                              n_win=2, topk=2)
    assert out.dtype == torch.float16 and all(g.dtype == torch.float16 for g in grads)
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-2, atol=2e-2)


def test_backend_auto_on_cpu_is_reference_and_global_ignores_triton():
    q, k, v = _qkv(4, 4, 2, 8, 8, grad=False)
    torch.testing.assert_close(routed_attention(q, k, v, 2, 2, backend='auto'), routed_attention_ref(q, k, v, 2, 2))
    # global attention is plain (fused) attention on every backend, including a forced 'triton'
    torch.testing.assert_close(routed_attention(q, k, v, 2, -2, backend='triton'),
                               routed_attention_naive(q, k, v, 2, -2))


# ---------------------------------------------------------------------------------------------- memory


def _peak_bytes(fn) -> int:
    from zoo.bench.measure import peak_alloc_mib as tensor_peak_mb
    return int(tensor_peak_mb(fn) * 2 ** 20)


def test_reference_backward_memory_does_not_grow_with_regions_squared():
    """The official gather's backward allocates a gradient of S^2 copies of K/V: its peak grows with the region
    count at a fixed map and top-k. Ours holds the routed K/V (and their gradient) once: the same peak for
    7 x 7 and 14 x 14 regions, and a fraction of the baseline's."""
    from zoo.bench.anchors import routed_attention_gather
    B, H, nh, d, topk = 2, 28, 2, 16, 2
    q, k, v = _qkv(H, H, nh, d, d, batch=B, dtype=torch.float32)

    def peak(fn, n_win):
        def run():
            out = fn(q, k, v, n_win, topk)
            out.backward(torch.ones_like(out))
            for t in (q, k, v):
                t.grad = None
        return _peak_bytes(run)

    ours = {n: peak(routed_attention, n) for n in (7, 14)}
    gather = {n: peak(routed_attention_gather, n) for n in (7, 14)}
    kv_bytes = 2 * q.numel() * 4
    assert ours[14] < 1.2 * ours[7] and ours[7] < 0.3 * gather[7], (ours, gather)
    assert gather[14] > 3 * gather[7] and gather[14] > 196 * kv_bytes / 2, (gather, kv_bytes)


# ---------------------------------------------------------------------------------------------- ONNX


class _Op(torch.nn.Module):
    def __init__(self, n_win: int, topk: int):
        super().__init__()
        self.n_win, self.topk = n_win, topk

    def forward(self, q, k, v):
        return routed_attention(q, k, v, self.n_win, self.topk)


@pytest.mark.parametrize('exporter', ['legacy', 'dynamo'])
@pytest.mark.parametrize('topk', [3, -2])
def test_onnx_export_both_exporters(exporter, topk, tmp_path):
    # exported graphs take the gather formulation at every size (static top-k, 4-D manual attention)
    onnx, ort = pytest.importorskip('onnx'), pytest.importorskip('onnxruntime')
    op = _Op(2, topk).eval()
    q, k, v = _qkv(8, 6, 2, 8, 8, dtype=torch.float32, grad=False)
    path = str(tmp_path / 'op.onnx')
    if exporter == 'legacy':
        torch.onnx.export(op, (q, k, v), path, dynamo=False, input_names=['q', 'k', 'v'], opset_version=17)
    else:
        torch.onnx.export(op, (q, k, v), path, dynamo=True, external_data=False, input_names=['q', 'k', 'v'])
    onnx.checker.check_model(onnx.load(path))
    sess = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    got = sess.run(None, {'q': q.numpy(), 'k': k.numpy(), 'v': v.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), op(q, k, v), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- errors


def test_bad_input_errors():
    q, k, v = _qkv(6, 8, 2, 8, 8, grad=False)
    with pytest.raises(ValueError, match=r'n_win: .*expected H and W multiples of 4, got H x W = 6 x 8 '
                                         r'\(pad to 8 x 8 first\)'):
        routed_attention(q, k, v, 4, 2)
    with pytest.raises(ValueError, match=r'topk: expected 1 <= topk <= n_win\^2 = 4 .* got 5'):
        routed_attention(q, k, v, 2, 5)
    with pytest.raises(ValueError, match=r'topk: .*or -1 / -2 for global attention, got 0'):
        routed_attention(q, k, v, 2, 0)
    with pytest.raises(ValueError, match=r'n_win: expected a positive int .*got 0'):
        routed_attention(q, k, v, 0, 1)
    with pytest.raises(ValueError, match=r'q, k, v: expected q and k \(B, H, W, heads, dk\)'):
        routed_attention(q, k[..., :4], v, 2, 1)
    with pytest.raises(ValueError, match=r'idx: expected \(B, n_win\^2, topk\) = \(2, 4, 1\), got \(2, 4, 2\)'):
        routed_attention(q, k, v, 2, 1, idx=torch.zeros(2, 4, 2, dtype=torch.long))


def test_dense_choice_keeps_memory_within_the_routed_kv():
    # BiFormer-T at 224 px: stage 3 (14 x 14, top-k 16, 32 + 32 channels per head) takes the dense masked path,
    # stages 1 and 2 gather; the N x N mask is never larger than one head's routed K/V
    assert use_dense(14 * 14, 16, 32, 32) and not use_dense(28 * 28, 4, 32, 32) and not use_dense(56 * 56, 1, 32, 32)
    for tokens, topk in ((196, 16), (784, 16), (1024, 16), (1025, 16)):
        assert use_dense(tokens, topk, 32, 32) == (tokens * tokens <= tokens * topk * 64)
    with pytest.raises(ValueError, match="impl: expected None, 'gather' or 'dense', got 'flex'"):
        routed_attention_ref(*_qkv(4, 4, 1, 8, 8, grad=False), 2, 1, impl='flex')


_COMPILE_SCRIPT = r"""
import zoo.kernels.routing.triton as kt

FP32_PTRS = ('lse_ptr', 'delta_ptr', 'dk_ptr', 'dv_ptr')

def compile_kernel(backward, dtype, side, n_win, head_dim, capability):
    fn = kt._routed_bwd_kernel if backward else kt._routed_fwd_kernel
    q = torch.empty(1, side, side, 2, head_dim, dtype=dtype)
    cfg = kt._config(q, q, n_win)
    const = dict(BLOCK=cfg['block'], BLOCK_DK=cfg['block_dk'], BLOCK_DV=cfg['block_dv'],
                 PRECISION=cfg['precision'], UPCAST=False)
    ty = {torch.float16: 'fp16', torch.float32: 'fp32', torch.bfloat16: 'bf16'}[dtype]
    sig = {n: 'constexpr' if n in const else '*fp32' if n in FP32_PTRS else '*i32' if n == 'idx_ptr' else
           '*' + ty if n.endswith('_ptr') else 'fp32' if n == 'scale' else 'i32' for n in fn.arg_names}
    return build(fn, sig, const, capability, num_warps=cfg['num_warps'])

out = {}
# BiFormer-T at 224 px: regions of 64 (stage 1), 16 (stage 2) and 4 (stage 3) tokens, head dim 32
for backward in (False, True):
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for side in (56, 28, 14):
            key = f"{'bwd' if backward else 'fwd'}_{str(dtype)[6:]}_{side}"
            out[key] = compile_kernel(backward, dtype, side, 7, 32, 80)
print(json.dumps(out))
"""


@pytest.mark.triton
def test_triton_kernels_compile_for_gpu(compile_for_gpu):
    """Compile (no GPU needed) the kernels at BiFormer-T's shapes for sm_80: catches what the interpreter lets
    through (non-constexpr globals, unsupported ops, dtype errors) and checks shared memory fits 99 KB."""
    compile_for_gpu(_COMPILE_SCRIPT, count=18, timeout=900)


# ---------------------------------------------------------------------------------------------- TorchScript

class _ScriptedOp(torch.nn.Module):
    """The op as the mixer calls it (scale by name), every argument explicit."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_win: int, topk: int,
                scale: Optional[float] = None, idx: Optional[torch.Tensor] = None,
                backend: Optional[str] = None) -> torch.Tensor:
        return routed_attention(q, k, v, n_win, topk, scale=scale, idx=idx, backend=backend)


@pytest.fixture(scope='module')
def scripted_op(script_round_trip):
    """The op compiled by torch.jit.script, saved and loaded back (so nothing in it calls into Python)."""
    return script_round_trip(_ScriptedOp())


@pytest.mark.parametrize('case', ['one_token_regions', 'rect_regions_2x3', 'biformer_stage1_like', 'one_region'])
@pytest.mark.parametrize('topk', ['case', -1])
def test_scripted_matches_eager(scripted_op, case, topk):
    """The scripted op (the gather path in its export form: manual softmax, no autograd Function) against the
    eager op (dense masked SDPA or the autograd Function's gather), forward and backward, routed and global."""
    H, W, n_win, case_topk, heads, dk, dv = CASES[case]
    topk = case_topk if topk == 'case' else topk
    for dtype in (torch.float32, torch.float64):
        q, k, v = _qkv(H, W, heads, dk, dv, dtype=dtype)
        grad_out = torch.randn(2, H, W, heads, dv, dtype=dtype)
        want = _fwd_bwd(routed_attention, q, k, v, grad_out, n_win=n_win, topk=topk)
        got = _fwd_bwd(scripted_op, q, k, v, grad_out, n_win=n_win, topk=topk)
        for g, w in zip((got[0], *got[1]), (want[0], *want[1])):
            tol = 1e-5 if dtype == torch.float32 else 1e-12
            torch.testing.assert_close(g, w, rtol=tol, atol=tol * w.abs().max().item())
    idx = torch.zeros(2, n_win * n_win, 1, dtype=torch.long)  # every region routed to region 0
    if topk != -1:
        torch.testing.assert_close(scripted_op(q, k, v, n_win, 1, 0.5, idx), routed_attention(q, k, v, n_win, 1,
                                                                                              scale=0.5, idx=idx))


def test_scripted_runs_the_reference_whatever_the_backend(scripted_op, monkeypatch):
    """Scripted code never reaches the Triton path (as exports): a forced backend still runs the reference."""
    monkeypatch.setenv('ZOO_KERNEL_BACKEND', 'triton')
    q, k, v = _qkv(4, 4, 1, 8, 8, batch=1, dtype=torch.float32)
    with use_backend('triton'):
        out = scripted_op(q, k, v, 2, 2, backend='triton')
    assert not type(out.grad_fn).__name__.startswith('_RoutedAttention')  # neither the kernel's nor eager's Function
    torch.testing.assert_close(out, routed_attention(q, k, v, 2, 2, backend='torch'))


@pytest.mark.parametrize('args, match', [
    ((4, 2), r'n_win: .*expected H and W multiples of 4, got H x W = 6 x 8 \(pad to 8 x 8 first\)'),
    ((2, 5), r'topk: expected 1 <= topk <= n_win\^2 = 4 .* got 5'),
    ((2, 0), r'topk: .*or -1 / -2 for global attention, got 0'),
    ((0, 1), r'n_win: expected a positive int .*got 0'),
    ((2, 1, None, torch.zeros(2, 4, 2, dtype=torch.long)),
     r'idx: expected \(B, n_win\^2, topk\) = \(2, 4, 1\), got \(2, 4, 2\)'),
])
def test_scripted_bad_inputs(scripted_op, args, match):
    """The scripted op keeps the op's checks and messages (TorchScript reraises them as torch.jit.Error)."""
    q, k, v = _qkv(6, 8, 2, 8, 8, dtype=torch.float32, grad=False)
    with pytest.raises(torch.jit.Error, match='ValueError: ' + match):
        scripted_op(q, k, v, *args)
    with pytest.raises(torch.jit.Error, match=r'ValueError: q, k, v: expected q and k \(B, H, W, heads, dk\)'):
        scripted_op(q, k[..., :4], v, 2, 1)
