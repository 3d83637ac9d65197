"""Benchmarks: one measurement engine for ops, mixers and models against their anchors.

`zoo bench --list` shows the suites (bench/suites/<group>/<name>.toml); `zoo bench GROUP [SUITE | NAME ...]` runs
them (bench/cli.py). Modules: suite (the TOML format and its checks), subjects (registry names -> callables),
anchors (baselines that are code), measure (timing and memory), engine (plan, interleaved run, ratios, growth),
report (JSON / markdown / PNG, one atomic writer), flops (FLOP and parameter counts).
"""
from .flops import count_flops, count_macs, count_params

__all__ = ['count_flops', 'count_macs', 'count_params']
