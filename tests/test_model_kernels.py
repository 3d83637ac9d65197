"""Whole models on the Triton path (interpreter on CPU) against the reference path, forward and backward."""
import pytest
import timm
import torch

import zoo.kernels as kernels
import zoo.kernels.neighborhood
import zoo.kernels.window
import zoo  # noqa: F401

# one model per family whose blocks have a Triton kernel; small inputs keep the interpreter quick
CASES = [('swin_tiny', 32), ('maxvit_tiny', 32), ('nat_mini', 32)]


@pytest.mark.triton
@pytest.mark.parametrize('name,size', CASES)
def test_model_triton_matches_reference(name, size, monkeypatch):
    chosen = []
    for op_module in (kernels.window, kernels.neighborhood):
        def spy(*args, _resolve=op_module.resolve_backend, **kw):
            chosen.append(_resolve(*args, **kw))
            return chosen[-1]
        monkeypatch.setattr(op_module, 'resolve_backend', spy)
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, drop_path_rate=0.).eval()
    x = torch.randn(1, 3, size, size)
    results = {}
    for backend in ('torch', 'triton'):
        model.zero_grad()
        with kernels.use_backend(backend):
            out = model(x)
        out.square().sum().backward()
        results[backend] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert chosen.count('triton') == chosen.count('torch') > 0  # every attention call took the asked path
    (out_ref, g_ref), (out_tri, g_tri) = results['torch'], results['triton']
    torch.testing.assert_close(out_tri, out_ref, rtol=1e-4, atol=1e-4)
    for n in g_ref:
        scale = max(1.0, g_ref[n].abs().max().item())
        torch.testing.assert_close(g_tri[n], g_ref[n], rtol=1e-3, atol=1e-4 * scale, msg=n)


@pytest.mark.triton
def test_fx_graph_runs_the_backend_in_force(monkeypatch):
    """An FX graph keeps each op as one node, so the backend is chosen when the graph runs: traced once, the
    graph runs the Triton kernel under use_backend('triton') and matches eager on the reference."""
    from torchvision.models.feature_extraction import create_feature_extractor
    chosen = []

    def spy(*args, _resolve=kernels.window.resolve_backend, **kw):
        chosen.append(_resolve(*args, **kw))
        return chosen[-1]
    monkeypatch.setattr(kernels.window, 'resolve_backend', spy)
    model = timm.create_model('swin_tiny', num_classes=5, **zoo.reduced_args('swin_tiny')).eval()
    graph = create_feature_extractor(model, return_nodes=['head.fc'])
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        want = model(x)
        assert chosen and set(chosen) == {'torch'}
        chosen.clear()
        with kernels.use_backend('triton'):
            (got,) = graph(x).values()
    assert chosen and set(chosen) == {'triton'}
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
