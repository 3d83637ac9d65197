"""Agent attention op: reference vs a float64 brute-force oracle written the official way (adaptive pooling,
row + column tables summed then bilinearly resized, biases copied per batch), forward and gradients; the pooling
matrices vs nn.AdaptiveAvgPool2d; no per-batch bias copies; ONNX export with both exporters at any size
(including the 56 -> 3 bins the legacy exporter cannot lower as adaptive pooling); input errors; TorchScript."""
from typing import Optional, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.kernels import agent_attention
from zoo.kernels._args import pair
from zoo.kernels.agent import AgentBias, agent_attention_ref, agent_bias_map, agent_pool
from zoo.kernels.agent.naive import agent_attention_naive

# (H, W, agent grid, heads, head_dim, tables: row length R, col length C, or None for no row / col table)
CASES = {
    'square_divisible': (12, 12, (3, 3), 2, 8, 12, 12),
    'stage1_bins_56_to_3': (56, 56, (3, 3), 1, 8, 56, 56),
    'non_square': (9, 14, (2, 2), 2, 16, 5, 6),
    'resized_tables': (13, 7, (3, 3), 2, 8, 14, 14),
    'map_smaller_than_grid': (2, 5, (3, 3), 2, 8, 7, 7),
    'one_token': (1, 1, (2, 2), 1, 8, 4, 4),
    'rect_grid_row_only': (10, 7, (2, 4), 2, 8, 6, None),
    'col_only_no_table': (8, 6, (2, 2), 3, 4, None, 5),
}


def _make(case, batch=2, seed=0):
    H, W, grid, nh, d, R, C = CASES[case]
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    qkv = torch.randn(batch, H, W, 3, nh, d, generator=g).requires_grad_()

    def tables(with_table):
        return AgentBias(
            torch.randn(nh, n, 7, 7, generator=g).requires_grad_() if with_table else None,
            torch.randn(nh, n, R, generator=g).requires_grad_() if R else None,
            torch.randn(nh, n, C, generator=g).requires_grad_() if C else None)
    with_table = case != 'col_only_no_table'
    return qkv, grid, tables(with_table), tables(with_table)


def _leaves(b1, b2):
    return [t for b in (b1, b2) for t in b if t is not None]


def _run(fn, qkv, grid, b1, b2, grad_out):
    q, k, v = qkv.unbind(3)
    out = fn(q, k, v, grid, b1, b2)
    return [out] + list(torch.autograd.grad(out, [qkv] + _leaves(b1, b2), grad_out))


@pytest.mark.parametrize('case', list(CASES))
def test_reference_matches_oracle_forward_and_backward(case):
    qkv, grid, b1, b2 = _make(case)
    grad_out = torch.randn(qkv.shape[:3] + qkv.shape[4:])
    ref = _run(agent_attention_ref, qkv, grid, b1, b2, grad_out)
    naive = _run(agent_attention_naive, qkv, grid, b1, b2, grad_out)
    for i, (a, b) in enumerate(zip(ref, naive)):
        scale = max(1.0, b.abs().max().item())
        assert (a - b).abs().max().item() <= 2e-6 * scale, (case, i)


@pytest.mark.parametrize('case', ['square_divisible', 'non_square', 'map_smaller_than_grid', 'col_only_no_table'])
def test_fused_sdpa_path_matches_reference(case):
    """The CUDA path (two SDPA calls, the shared bias as a broadcast mask), run here on CPU: forward and gradients,
    bias tables included."""
    qkv, grid, b1, b2 = _make(case)
    grad_out = torch.randn(qkv.shape[:3] + qkv.shape[4:])
    ref = _run(agent_attention_ref, qkv, grid, b1, b2, grad_out)

    def fused(q, k, v, grid, b1, b2):
        return agent_attention_ref(q, k, v, grid, b1, b2, fused=True)
    got = _run(fused, qkv, grid, b1, b2, grad_out)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item()), (case, i)


def test_fused_masks_are_shared_and_aligned(monkeypatch):
    """The masks handed to SDPA are batch-broadcast views (stride 0) with rows padded to 16 elements, so the
    memory-efficient kernel takes them without a per-batch copy."""
    masks = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kw):
        masks.append(attn_mask)
        return sdpa(*args, attn_mask=attn_mask, **kw)
    monkeypatch.setattr(F, 'scaled_dot_product_attention', spy)
    qkv, grid, b1, b2 = _make('non_square', batch=3)  # 9 x 14 tokens, 4 agents: neither a multiple of 16
    agent_attention_ref(*qkv.detach().unbind(3), grid, b1, b2, fused=True)
    assert len(masks) == 2
    for m in masks:
        assert m.stride(0) == 0 and m.stride(-1) == 1 and m.stride(-2) % 16 == 0 and m.stride(1) % 16 == 0


def test_cpu_takes_the_explicit_path(monkeypatch):
    import zoo.kernels.agent as op
    seen = []
    monkeypatch.setattr(op, 'agent_attention_ref', lambda *a: seen.append(a[-1]) or a[0])
    qkv, grid, b1, b2 = _make('square_divisible')
    for backend in ('auto', 'torch', 'triton'):
        agent_attention(*qkv.detach().unbind(3), grid, backend=backend)
    assert seen == [False, False, False]


def test_oracle_is_not_vacuous():
    """Each bias table, each direction and the pooling grid change the result."""
    qkv, grid, b1, b2 = _make('resized_tables')
    q, k, v = qkv.detach().unbind(3)
    b1, b2 = (AgentBias(*(t.detach() for t in b)) for b in (b1, b2))
    base = agent_attention_naive(q, k, v, grid, b1, b2)
    variants = [
        agent_attention_naive(q, k, v, grid, None, b2),
        agent_attention_naive(q, k, v, grid, b1, None),
        agent_attention_naive(q, k, v, grid, b1._replace(row=None), b2),
        agent_attention_naive(q, k, v, grid, b1, b2._replace(col=None)),
        agent_attention_naive(q, k, v, grid, b1._replace(table=None), b2),
    ]
    for i, other in enumerate(variants):
        assert (other - base).abs().max() > 1e-3, i


@pytest.mark.parametrize('size, bins', [(56, 3), (28, 4), (14, 7), (13, 5), (7, 7), (3, 7), (1, 3)])
def test_pool_equals_adaptive_avg_pool(size, bins):
    x = torch.randn(2, size, size + 3, 6, dtype=torch.float64)
    want = nn.AdaptiveAvgPool2d((bins, bins + 1))(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    got = agent_pool(x, (bins, bins + 1))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_bias_at_table_size_is_the_classification_construction():
    """At the tables' own size: interpolate(an) + (ah + aw), exactly as the official classification code."""
    nh, n, s = 3, 9, 14
    an = torch.randn(nh, n, 7, 7)
    ah, aw = torch.randn(1, nh, n, s, 1), torch.randn(1, nh, n, 1, s)
    want = F.interpolate(an, size=(s, s), mode='bilinear').reshape(nh, n, -1) + (ah + aw).reshape(nh, n, -1)
    got = agent_bias_map(AgentBias(an, ah.view(nh, n, s), aw.view(nh, n, s)), s, s)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_bias_is_shared_not_copied_per_batch():
    """The official code `.repeat`s each bias to (B, heads, n, N); here only the scores have a batch dimension."""
    qkv, grid, b1, b2 = _make('square_divisible', batch=1)
    B, nh, n, N = 16, 2, 9, 144
    q, k, v = (t.detach().expand(B, *t.shape[1:]) for t in qkv.unbind(3))
    made = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if torch.is_tensor(out) and tuple(out.shape) in ((B, nh, n, N), (B, nh, N, n)):
                made.append(getattr(func, '__name__', str(func)))
            return out
    with torch.no_grad(), Spy():
        agent_attention_ref(q, k, v, grid, b1, b2)
    assert made and not {'repeat', 'expand', 'broadcast_to', 'tile', 'contiguous', 'clone'} & set(made), made
    assert made.count('__add__') + made.count('add') == 2  # each bias added once, broadcast over the batch


def test_dropout_changes_the_output():
    qkv, grid, b1, b2 = _make('square_divisible')
    q, k, v = qkv.detach().unbind(3)
    plain = agent_attention(q, k, v, grid, agent_bias=b1, query_bias=b2)
    torch.manual_seed(0)
    dropped = agent_attention(q, k, v, grid, agent_bias=b1, query_bias=b2, dropout_p=0.5)
    assert (dropped - plain).abs().max() > 1e-3


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_precision_close_to_fp32(dtype):
    qkv, grid, b1, b2 = _make('non_square')
    q, k, v = qkv.detach().unbind(3)
    want = agent_attention(q, k, v, grid, agent_bias=b1, query_bias=b2)
    got = agent_attention(q.to(dtype), k.to(dtype), v.to(dtype), grid, agent_bias=b1, query_bias=b2)
    assert got.dtype == dtype
    assert (got.float() - want).abs().max() < 3e-2


BAD_INPUTS = {  # changed arguments (from the valid q, k, v, grid, b1, b2 of 'square_divisible'), error, message
    'qkv_shapes': (lambda a: dict(k=a['k'][:, :5]), ValueError,
                   r'q, k, v: expected equal shapes \(B, H, W, heads, head_dim\), got \(2, 12, 12, 2, 8\), '
                   r'\(2, 5, 12, 2, 8\)'),
    'grid': (lambda a: dict(agent_grid=0), ValueError, r'agent_grid: expected positive sizes, got \(0, 0\)'),
    'table': (lambda a: dict(agent_grid=2, agent_bias=a['b1']), ValueError,
              r'agent_bias.table: expected \(heads, n, th, tw\) with heads=2, n=4 agents, got \(2, 9, 7, 7\)'),
    'row': (lambda a: dict(query_bias=a['b2']._replace(row=torch.zeros(2, 9))), ValueError,
            r'query_bias.row: expected \(heads, n, R\) with heads=2, n=9 agents, got \(2, 9\)'),
    'not_agent_bias': (lambda a: dict(agent_bias=tuple(a['b1'])), TypeError, 'expected an AgentBias'),
    # 'got 1.0' in Python, 'got 1.' in TorchScript (its float formatting)
    'dropout': (lambda a: dict(dropout_p=1.0), ValueError, r'dropout_p: expected 0 <= p < 1, got 1\.'),
    'backend': (lambda a: dict(backend='cuda'), ValueError, 'backend: expected one of'),
}


def _bad_args(case):
    qkv, grid, b1, b2 = _make('square_divisible')
    q, k, v = qkv.detach().unbind(3)
    args = dict(q=q, k=k, v=v, agent_grid=grid)
    change, error, match = BAD_INPUTS[case]
    args.update(change(dict(args, b1=b1, b2=b2)))
    return args, error, match


@pytest.mark.parametrize('case', list(BAD_INPUTS))
def test_input_errors(case):
    args, error, match = _bad_args(case)
    with pytest.raises(error, match=match):
        agent_attention(**args)


# ---------------------------------------------------------------- TorchScript

class _Op(nn.Module):
    """The op as a module calls it (arguments after agent_grid by name), every argument explicit."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, agent_grid: Tuple[int, int],
                agent_bias: Optional[AgentBias] = None, query_bias: Optional[AgentBias] = None,
                scale: Optional[float] = None, dropout_p: float = 0., backend: Optional[str] = None) -> torch.Tensor:
        return agent_attention(q, k, v, agent_grid, agent_bias=agent_bias, query_bias=query_bias, scale=scale,
                               dropout_p=dropout_p, backend=backend)


@pytest.fixture(scope='module')
def scripted_op(script_round_trip):
    """The op compiled by torch.jit.script, saved and loaded back (so nothing in it calls into Python)."""
    return script_round_trip(_Op())


@pytest.mark.parametrize('case', list(CASES))
def test_scripted_matches_eager(scripted_op, case, assert_close_to_scale):
    """The scripted op (bin matrices built in the graph) against the eager op (cached bin matrices), forward and
    backward, bias tables included, on resized tables, maps smaller than the grid and one-token maps."""
    qkv, grid, b1, b2 = _make(case)
    grad_out = torch.randn(qkv.shape[:3] + qkv.shape[4:])
    got = _run(lambda q, k, v, g, a, b: scripted_op(q, k, v, g, agent_bias=a, query_bias=b, scale=0.3),
               qkv, grid, b1, b2, grad_out)
    want = _run(lambda q, k, v, g, a, b: agent_attention(q, k, v, g, agent_bias=a, query_bias=b, scale=0.3),
                qkv, grid, b1, b2, grad_out)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close_to_scale(a, b, msg=f'{case} output {i}')


def test_scripted_without_biases_and_with_dropout(scripted_op, assert_close_to_scale):
    qkv, grid, _, _ = _make('non_square')
    q, k, v = qkv.detach().unbind(3)
    assert_close_to_scale(scripted_op(q, k, v, grid), agent_attention(q, k, v, grid))
    assert torch.equal(scripted_op(q, k, v, grid, backend='triton'), scripted_op(q, k, v, grid))  # reference
    torch.manual_seed(0)
    got = scripted_op(q, k, v, grid, dropout_p=0.5)
    torch.manual_seed(0)
    assert_close_to_scale(got, agent_attention(q, k, v, grid, dropout_p=0.5))


@pytest.mark.parametrize('case', [c for c in BAD_INPUTS if c not in ('not_agent_bias', 'backend')])
def test_scripted_input_errors(scripted_op, case):
    """The scripted op keeps the op's checks and messages (TorchScript reraises them as torch.jit.Error); its
    types already exclude what is not an AgentBias, and it runs the reference whatever the backend."""
    args, error, match = _bad_args(case)
    args['agent_grid'] = pair(args['agent_grid'], 'agent_grid')
    with pytest.raises(torch.jit.Error, match=f'{error.__name__}: ' + match):
        scripted_op(**args)


class _AgentOpNet(nn.Module):
    """Image -> 1x1 conv to q, k, v -> agent op with resized tables -> NCHW; for the ONNX checks."""

    def __init__(self, heads: int = 2, head_dim: int = 8, grid: int = 3, rows: int = 20):
        super().__init__()
        self.heads, self.head_dim, self.grid = heads, head_dim, (grid, grid)
        n = grid * grid
        self.qkv = nn.Conv2d(3, 3 * heads * head_dim, 1)
        self.tables = nn.ParameterList([nn.Parameter(torch.randn(heads, n, 7, 7)) for _ in range(2)])
        self.lines = nn.ParameterList([nn.Parameter(torch.randn(heads, n, rows)) for _ in range(4)])

    def forward(self, x):
        B, _, H, W = x.shape
        q, k, v = self.qkv(x).permute(0, 2, 3, 1).reshape(B, H, W, 3, self.heads, self.head_dim).unbind(3)
        b1 = AgentBias(self.tables[0], self.lines[0], self.lines[1])
        b2 = AgentBias(self.tables[1], self.lines[2], self.lines[3])
        out = agent_attention(q, k, v, self.grid, agent_bias=b1, query_bias=b2)
        return out.reshape(B, H, W, -1).permute(0, 3, 1, 2)


@pytest.mark.parametrize('exporter', ['legacy', 'dynamo'])
def test_onnx_export_any_size(exporter, tmp_path):
    """Exported at 56 x 56 (3 agents per side: non-divisible bins), then run at other sizes, some smaller than
    the agent grid."""
    from zoo.weights.onnx import export_onnx
    torch.manual_seed(0)
    model = _AgentOpNet().eval()
    report = export_onnx(model, tmp_path / 'agent.onnx', img_size=(56, 56), dynamic=True, exporter=exporter,
                         check_sizes=[(13, 29), (2, 2), (28, 20)], atol=1e-5)
    # the export size, export_onnx's smaller and larger sizes (other_sizes), then check_sizes
    assert report['max_abs_err'] <= 1e-5 and len(report['checks']) == 6, report


def test_adaptive_pool_is_what_the_legacy_exporter_cannot_lower(tmp_path):
    """Why the op pools with matrices: nn.AdaptiveAvgPool2d 56 -> 3 fails in the legacy exporter."""
    with pytest.raises(Exception):
        torch.onnx.export(nn.AdaptiveAvgPool2d(3), (torch.randn(1, 4, 56, 56),), str(tmp_path / 'pool.onnx'),
                          dynamo=False, opset_version=17)
