"""FLOPs and parameter counts.

FLOPs come from `torch.utils.flop_counter.FlopCounterMode`, which counts matmuls, convolutions and
the fused attention ops (one multiply-add = 2 FLOPs; elementwise ops, norms and pooling are not
counted, as in fvcore / timm's tables). On CPU, `F.scaled_dot_product_attention` dispatches to
`aten._scaled_dot_product_flash_attention_for_cpu`, which torch (2.14) has no formula for, so it
would count 0; importing this module registers torch's own SDPA formula for that op once.
Report MACs = FLOPs / 2 (timm's "GMACs").
"""
from typing import Any, Callable, Sequence, Union

import torch
import torch.nn as nn
from torch.utils import flop_counter

__all__ = ['count_flops', 'count_call_flops', 'count_params', 'count_macs', 'gna_bounds']

_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _register_cpu_sdpa() -> None:
    if _CPU_SDPA in flop_counter.flop_registry:  # a later torch may ship it
        return

    @flop_counter.register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


_register_cpu_sdpa()


def count_flops(model: nn.Module, inputs: Union[torch.Tensor, Sequence[Any]]) -> int:
    """FLOPs of one forward pass of `model(*inputs)` in eval mode without autograd (the batch given)."""
    args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    was_training = model.training
    model.eval()
    try:
        return count_call_flops(lambda: model(*args))
    finally:
        model.train(was_training)


def count_call_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn()` without autograd."""
    counter = flop_counter.FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn()
    return int(counter.get_total_flops())


def count_macs(model: nn.Module, inputs: Union[torch.Tensor, Sequence[Any]]) -> int:
    """Multiply-accumulates, FLOPs / 2 (the unit of timm's and the papers' "GMACs"/"GFLOPs" tables)."""
    return count_flops(model, inputs) // 2


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def _per_axis(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def gna_bounds(sizes: Sequence[int], kernel_size, stride=1, dilation=1, is_causal=False, tile: int = 8) -> dict:
    """The analytic speed-up over dense attention that the sparsity of generalized neighborhood attention allows
    (the GNA paper's "speed of light", families.md 11.4), from the exact mask (the AND of per-axis masks):

    * ``bound``: N^2 / (unmasked query-key pairs) before tile quantisation (N / K without causal masking);
    * ``tile_bound``: with box tiles of `tile` positions per axis for queries and keys, dense tile pairs / visited
      tile pairs (a pair costs a full tile-by-tile block if any of its query-key pairs is unmasked).
    """
    from zoo.kernels.neighborhood.reference import gna_axis_mask
    n_axes = len(sizes)
    kernel, stride = _per_axis(kernel_size, n_axes), _per_axis(stride, n_axes)
    dilation, causal = _per_axis(dilation, n_axes), _per_axis(is_causal, n_axes)
    bound, tile_bound = 1.0, 1.0
    for a, n in enumerate(sizes):
        allowed, _ = gna_axis_mask(n, kernel[a], stride[a], dilation[a], causal[a])
        bound *= n * n / allowed.sum().item()
        t = -(-n // tile)
        blocks = torch.nn.functional.pad(allowed, (0, t * tile - n, 0, t * tile - n)).view(t, tile, t, tile)
        tile_bound *= t * t / blocks.any(3).any(1).sum().item()
    return dict(bound=bound, tile_bound=tile_bound)
