"""The code anchors compute what our ops compute: the BiFormer gather baseline (the official formulation) in the op
and in the whole model, forward and backward; SDPA window and dense-mask neighborhood attention."""

import pytest
import timm
import torch

import zoo
from zoo.bench.anchors import (gather_baseline, routed_attention_gather, sdpa_neighborhood_attention,
                               sdpa_window_attention)
from zoo.kernels import neighborhood_attention, window_attention
from zoo.kernels.routing import routed_attention


@pytest.mark.parametrize('H, W, n_win, topk, dv', [(14, 14, 7, 3, 8), (8, 12, 2, 4, 6), (6, 6, 3, -2, 8)])
def test_gather_baseline_equals_our_op(H, W, n_win, topk, dv):
    q, k = (torch.randn(2, H, W, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(2, H, W, 2, dv, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, H, W, 2, dv, dtype=torch.float64)
    ours, base = routed_attention(q, k, v, n_win, topk), routed_attention_gather(q, k, v, n_win, topk)
    torch.testing.assert_close(base, ours, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), g), torch.autograd.grad(base, (q, k, v), g)):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_gather_baseline_in_the_model():
    model = timm.create_model('biformer_tiny', **zoo.reduced_args('biformer_tiny')).double().train()
    x = torch.randn(2, 3, 80, 96, dtype=torch.float64)
    grads = []
    for baseline in (False, True):
        model.zero_grad()
        with gather_baseline() if baseline else torch.enable_grad():
            out = model(x)
        out.square().sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-9, atol=1e-10)
    for n in grads[0][1]:
        torch.testing.assert_close(grads[1][1][n], grads[0][1][n], rtol=1e-7, atol=1e-9, msg=n)
    import zoo.blocks.routing as mixer
    assert mixer.routed_attention is routed_attention  # restored


@pytest.mark.parametrize('size, shift', [(14, 3), (10, 2), (7, 0)])
def test_sdpa_window_equals_our_op(size, shift, assert_close_to_scale):
    q, k, v = (torch.randn(2, size, size, 3, 8) for _ in range(3))
    table = torch.randn(3, 13, 13)
    want = window_attention(q, k, v, 7, shift=shift, rel_pos_bias=table, backend='torch')
    assert_close_to_scale(sdpa_window_attention(q, k, v, (7, 7), (shift, shift), table, None), want)


@pytest.mark.parametrize('dilation', [1, 2])
def test_sdpa_neighborhood_equals_our_op(dilation, assert_close_to_scale):
    q, k, v = (torch.randn(1, 12, 12, 2, 8) for _ in range(3))
    rpb = torch.randn(2, 5, 5)
    want = neighborhood_attention(q, k, v, 3, dilation, rel_pos_bias=rpb, backend='torch')
    assert_close_to_scale(sdpa_neighborhood_attention(q, k, v, (3, 3), (dilation, dilation), rpb, 8 ** -0.5), want)
