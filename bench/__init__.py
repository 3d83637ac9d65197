"""Benchmarks: CPU throughput, peak memory, FLOPs and parameters of zoo models against timm anchors.

`python -m zoo.bench.run --help` (or `zoo bench ...`) runs them; `bench.flops` has the counters.
"""
from .flops import count_flops, count_macs, count_params

__all__ = ['count_flops', 'count_macs', 'count_params']
