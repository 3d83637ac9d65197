"""FLOP counting against analytic counts (conv, linear, fused SDPA)."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import flop_counter

from zoo.bench.flops import count_flops, count_macs, count_params


def test_count_flops_conv_linear_exact():
    model = nn.Sequential(
        nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1),  # (2, 3, 10, 12) -> (2, 8, 5, 6)
        nn.ReLU(),
        nn.Flatten(1),
        nn.Linear(8 * 5 * 6, 5),
    )
    x = torch.randn(2, 3, 10, 12)
    conv = 2 * (2 * 8 * 5 * 6) * (3 * 3 * 3)  # 2 FLOPs per MAC, per output element Cin * k * k MACs
    linear = 2 * 2 * (8 * 5 * 6) * 5
    assert count_flops(model, x) == conv + linear
    assert count_macs(model, (x,)) == (conv + linear) // 2
    assert count_params(model) == 8 * 3 * 9 + 8 + 240 * 5 + 5
    model.train()
    count_flops(model, x)
    assert model.training  # mode restored


class _Attention(nn.Module):
    def __init__(self, fused: bool):
        super().__init__()
        self.fused = fused

    def forward(self, q, k, v):
        if self.fused:
            return F.scaled_dot_product_attention(q, k, v)
        attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        return attn.softmax(-1) @ v


def test_sdpa_counted_like_explicit_attention():
    b, h, n, m, d = 2, 3, 17, 11, 8
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, h, m, d), torch.randn(b, h, m, d)
    fused = count_flops(_Attention(True), (q, k, v))
    explicit = count_flops(_Attention(False), (q, k, v))
    assert fused == explicit == 2 * (2 * b * h * n * m * d)
    # the fused call really went through the CPU flash op, which torch alone counts as 0
    counter = flop_counter.FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        F.scaled_dot_product_attention(q, k, v)
    ops = {str(op) for op in counter.get_flop_counts()['Global']}
    assert any('_scaled_dot_product_flash_attention_for_cpu' in op for op in ops), ops
