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

__all__ = ['count_flops', 'count_call_flops', 'count_params', 'count_macs']

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
