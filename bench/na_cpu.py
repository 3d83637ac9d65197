"""CPU benchmark of the neighborhood-attention op: our reference paths vs natten vs dense masked attention.

Times forward and forward+backward (grads of q, k, v and the rpb) and measures the peak resident memory
of each call, on square maps with NAT-Tiny stage-1 heads (2 heads x 32, kernel 7, batch 1, fp32).
All methods are timed in ONE run with interleaved repeats (median), so the ratios compare like with like.
Writes JSON and a markdown table.

    python bench/na_cpu.py [--sizes 14 28 56 112] [--repeats 5] [--out bench/results/na_cpu]

Methods:
  ours_auto    kernels.neighborhood.neighborhood_attention, backend 'torch' (dense below DENSE_MAX_TOKENS,
               halo-tile gather above), with RPB
  ours_gather  the halo-tile gather path forced, with RPB
  dense        the dense masked path forced: manual softmax(q k^T + bias with -inf off-neighborhood) v,
               with RPB; O(N^2) memory, skipped above --dense-max-tokens
  natten       natten.na2d (natten >= 0.20: Flex backend on CPU, forward only, no RPB, O(N^2) memory);
               skipped above --natten-max-tokens

Peak memory: the peak of live tensor bytes allocated during the call (a TorchDispatchMode tracks every op
output's storage until it is freed; exact and allocator-independent). natten's Flex higher-order op
cannot run under that mode, so natten's figure is the rise of peak RSS (VmHWM, reset through
/proc/self/clear_refs) during one call in a fresh child process (Linux/glibc; null elsewhere), marked RSS.
"""
import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
import weakref
from typing import Callable, Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from zoo.kernels.neighborhood import neighborhood_attention
from zoo.kernels.neighborhood.reference import DENSE_MAX_TOKENS, neighborhood_attention_ref

class TensorPeak(TorchDispatchMode):
    """Peak bytes of live tensor storages created by ops while active (inputs and earlier tensors excluded)."""

    def __init__(self):
        super().__init__()
        self.live: Dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)  # storages keep their PyObject until freed
        return out


def tensor_peak_mb(fn: Callable[[], object]) -> float:
    with TensorPeak() as mode:
        result = fn()
        del result
    return mode.peak / 2 ** 20


def _read_status_kb(field: str) -> Optional[int]:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_peak_mb(fn: Callable[[], object]) -> Optional[float]:
    """Rise of peak RSS over the RSS before `fn()`, in MiB (None where /proc is unavailable)."""
    gc.collect()
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except OSError:
        pass
    before = _read_status_kb('VmRSS')
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # reset VmHWM to the current RSS
    except OSError:
        return None
    result = fn()
    peak = _read_status_kb('VmHWM')
    del result
    if before is None or peak is None:
        return None
    return max(peak - before, 0) / 1024


def _rss_peak_in_child(method: str, size: int, mode: str, args) -> Optional[float]:
    """`rss_peak_mb` of one call, in a fresh process whose glibc returns large buffers to the OS."""
    cmd = [sys.executable, os.path.abspath(__file__), '--memory-child', f'{method}:{size}:{mode}',
           '--kernel', str(args.kernel), '--heads', str(args.heads), '--head-dim', str(args.head_dim),
           '--batch', str(args.batch)] + (['--threads', str(args.threads)] if args.threads else [])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])['peak_mb']
    except (IndexError, ValueError, KeyError):
        print(f'memory child failed: {proc.stderr[-500:]}', file=sys.stderr)
        return None


def _inputs(size: int, args):
    torch.manual_seed(0)
    q, k, v = (torch.randn(args.batch, size, size, args.heads, args.head_dim, requires_grad=True) for _ in range(3))
    rpb = (0.1 * torch.randn(args.heads, 2 * args.kernel - 1, 2 * args.kernel - 1)).requires_grad_()
    return q, k, v, rpb


def _memory_child(spec: str, args) -> None:
    method, size, mode = spec.split(':')
    fn = build_methods(args.kernel)[method]['fn']
    q, k, v, rpb = _inputs(int(size), args)
    call = (lambda: _no_grad(fn, q, k, v, rpb)) if mode == 'fwd' else (lambda: _fwd_bwd(fn, q, k, v, rpb))
    call()  # warm-up (caches, lazy init)
    print(json.dumps(dict(peak_mb=rss_peak_mb(call))))


def _natten_na2d():
    try:
        from natten.functional import na2d
    except Exception as e:  # noqa: BLE001
        print(f'natten not importable ({type(e).__name__}: {e}); skipping it', file=sys.stderr)
        return None
    return na2d


def build_methods(kernel: int) -> Dict[str, Dict[str, Callable]]:
    """name -> {'fwd': f(q, k, v, rpb), 'bwd': bool}."""
    methods = {
        'ours_auto': dict(fn=lambda q, k, v, rpb: neighborhood_attention(q, k, v, kernel, rel_pos_bias=rpb,
                                                                          backend='torch'), bwd=True),
        'ours_gather': dict(fn=lambda q, k, v, rpb: neighborhood_attention_ref(q, k, v, (kernel, kernel), (1, 1), rpb,
                                                                                impl='gather'), bwd=True),
        'dense': dict(fn=lambda q, k, v, rpb: neighborhood_attention_ref(q, k, v, (kernel, kernel), (1, 1), rpb,
                                                                          impl='dense'), bwd=True),
    }
    na2d = _natten_na2d()
    if na2d is not None:
        def natten_fn(q, k, v, rpb):
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                return na2d(q.detach(), k.detach(), v.detach(), kernel)
        methods['natten'] = dict(fn=natten_fn, bwd=False)  # no CPU backward (Flex), no RPB
    return methods


def _fwd_bwd(fn, q, k, v, rpb):
    out = fn(q, k, v, rpb)
    out.backward(torch.ones_like(out))
    for t in (q, k, v, rpb):
        t.grad = None
    return None


def run(args) -> List[dict]:
    methods = build_methods(args.kernel)
    rows = []
    for size in args.sizes:
        N = size * size
        q, k, v, rpb = _inputs(size, args)
        active = {}
        for name, m in methods.items():
            limit = {'dense': args.dense_max_tokens, 'natten': args.natten_max_tokens}.get(name)
            if limit is not None and N > limit:
                rows.append(dict(size=size, tokens=N, method=name, skipped=f'N={N} > {limit} (O(N^2) memory)'))
                continue
            active[name] = m
        tasks = []  # (method, mode, callable)
        for name, m in active.items():
            fn = m['fn']
            tasks.append((name, 'fwd', lambda fn=fn: _no_grad(fn, q, k, v, rpb)))
            if m['bwd']:
                tasks.append((name, 'fwd_bwd', lambda fn=fn: _fwd_bwd(fn, q, k, v, rpb)))
        times: Dict[tuple, List[float]] = {(n, mode): [] for n, mode, _ in tasks}
        for _, _, f in tasks:  # warm-up: table caches, natten's first call
            f()
        cpu_times: Dict[tuple, List[float]] = {(n, mode): [] for n, mode, _ in tasks}
        for _ in range(args.repeats):  # interleaved repeats
            for n, mode, f in tasks:
                c0, t0 = time.process_time(), time.perf_counter()
                f()
                times[(n, mode)].append(time.perf_counter() - t0)
                cpu_times[(n, mode)].append(time.process_time() - c0)
        for name in active:
            row = dict(size=size, tokens=N, method=name)
            for mode in ('fwd', 'fwd_bwd'):
                if (name, mode) in times:
                    row[f'{mode}_ms'] = 1e3 * statistics.median(times[(name, mode)])
                    row[f'{mode}_ms_all'] = [round(1e3 * t, 3) for t in times[(name, mode)]]
                    row[f'{mode}_cpu_ms'] = 1e3 * statistics.median(cpu_times[(name, mode)])
            for n, mode, f in tasks:
                if n != name:
                    continue
                try:
                    row[f'{mode}_peak_mb'] = tensor_peak_mb(f)
                except RuntimeError:  # natten's Flex higher-order op does not run under dispatch modes
                    row[f'{mode}_peak_mb'] = _rss_peak_in_child(name, size, mode, args)
                    row[f'{mode}_peak_kind'] = 'rss'
            rows.append(row)
        print(f'{size}x{size} done', file=sys.stderr, flush=True)
    return rows


def _no_grad(fn, q, k, v, rpb):
    with torch.no_grad():
        return fn(q, k, v, rpb)


def _fmt(x: Optional[float], digits: int = 1) -> str:
    return '-' if x is None else f'{x:.{digits}f}'


def _peak(row: dict, mode: str) -> str:
    text = _fmt(row.get(f'{mode}_peak_mb'))
    return text + ' (RSS)' if row.get(f'{mode}_peak_kind') == 'rss' and text != '-' else text


def markdown(rows: List[dict], args) -> str:
    by = {(r['size'], r['method']): r for r in rows}
    lines = [
        f'Neighborhood attention on CPU: kernel {args.kernel}, batch {args.batch}, {args.heads} heads x '
        f'{args.head_dim}, fp32, {torch.get_num_threads()} threads, median of {args.repeats} interleaved repeats. '
        'Wall-clock ms and process CPU ms (all threads); peak = peak live tensor MiB allocated by the call '
        '(RSS: rise of peak RSS in a fresh process). natten: forward only, no RPB. '
        'Speed-up = natten fwd wall / this fwd wall.',
        '',
        '| map | method | fwd ms | fwd+bwd ms | fwd CPU ms | fwd+bwd CPU ms | fwd peak MiB | fwd+bwd peak MiB '
        '| speed-up vs natten |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    for size in args.sizes:
        natten_fwd = by.get((size, 'natten'), {}).get('fwd_ms')
        for method in ('ours_auto', 'ours_gather', 'dense', 'natten'):
            r = by.get((size, method))
            if r is None:
                continue
            if 'skipped' in r:
                lines.append(f'| {size}x{size} | {method} | skipped: {r["skipped"]} | | | | | | |')
                continue
            ratio = '-' if natten_fwd is None or method == 'natten' else f'{natten_fwd / r["fwd_ms"]:.0f}x'
            lines.append(f'| {size}x{size} | {method} | {_fmt(r.get("fwd_ms"), 2)} | {_fmt(r.get("fwd_bwd_ms"), 2)} | '
                         f'{_fmt(r.get("fwd_cpu_ms"), 2)} | {_fmt(r.get("fwd_bwd_cpu_ms"), 2)} | '
                         f'{_peak(r, "fwd")} | {_peak(r, "fwd_bwd")} | {ratio} |')
    return '\n'.join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--sizes', type=int, nargs='+', default=[14, 28, 56, 112])
    parser.add_argument('--kernel', type=int, default=7)
    parser.add_argument('--heads', type=int, default=2)
    parser.add_argument('--head-dim', type=int, default=32)
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (default: torch default)')
    parser.add_argument('--dense-max-tokens', type=int, default=3136)
    parser.add_argument('--natten-max-tokens', type=int, default=3136,
                        help='natten is O(N^2) on CPU: 112x112 takes about a minute and 5 GB per call')
    parser.add_argument('--out', default='bench/results/na_cpu', help='output path without extension')
    parser.add_argument('--memory-child', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        _memory_child(args.memory_child, args)
        return

    rows = run(args)
    table = markdown(rows, args)
    print(table)
    os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
    meta = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                cpu_count=os.cpu_count(), threads=torch.get_num_threads(), dense_max_tokens_auto=DENSE_MAX_TOKENS,
                args=vars(args), command=' '.join([os.path.basename(sys.executable)] + sys.argv))
    try:
        import natten
        meta['natten'] = natten.__version__
    except Exception:  # noqa: BLE001
        meta['natten'] = None
    with open(args.out + '.json', 'w') as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    with open(args.out + '.md', 'w') as f:
        f.write(table + '\n')
    print(f'wrote {args.out}.json and {args.out}.md', file=sys.stderr)


if __name__ == '__main__':
    main()
