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

Peak memory is the rise of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs)
over the resident set before the call, measured after all timings with a fixed glibc mmap threshold so
freed buffers go back to the OS between measurements. Linux/glibc only (else reported as null).
"""
import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional

import torch

from kernels.neighborhood import neighborhood_attention
from kernels.neighborhood.reference import DENSE_MAX_TOKENS, neighborhood_attention_ref

def _read_status_kb(field: str) -> Optional[int]:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except OSError:
        pass


def peak_memory_mb(fn: Callable[[], object]) -> Optional[float]:
    """Rise of peak RSS over the RSS before `fn()`, in MiB (None where /proc is unavailable)."""
    _trim()
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
    rows, memory_tasks = [], []
    for size in args.sizes:
        N = size * size
        torch.manual_seed(0)
        q, k, v = (torch.randn(args.batch, size, size, args.heads, args.head_dim, requires_grad=True)
                   for _ in range(3))
        rpb = (0.1 * torch.randn(args.heads, 2 * args.kernel - 1, 2 * args.kernel - 1)).requires_grad_()
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
            rows.append(row)
            memory_tasks.append((row, [(mode, f) for n, mode, f in tasks if n == name]))
        print(f'{size}x{size} timed', file=sys.stderr, flush=True)
    # memory after all timings: a fixed mmap threshold makes large buffers go back to the OS on free (so
    # each call's peak RSS is its own) but also makes every call page-fault its buffers, which would
    # distort the timings
    _fixed_mmap_threshold()
    for row, fns in memory_tasks:
        for mode, f in fns:
            row[f'{mode}_peak_mb'] = peak_memory_mb(f)
    return rows


def _fixed_mmap_threshold(nbytes: int = 256 * 1024) -> None:
    try:
        ctypes.CDLL('libc.so.6').mallopt(-3, nbytes)  # M_MMAP_THRESHOLD (glibc)
    except (OSError, AttributeError):
        pass


def _no_grad(fn, q, k, v, rpb):
    with torch.no_grad():
        return fn(q, k, v, rpb)


def _fmt(x: Optional[float], digits: int = 1) -> str:
    return '-' if x is None else f'{x:.{digits}f}'


def markdown(rows: List[dict], args) -> str:
    by = {(r['size'], r['method']): r for r in rows}
    lines = [
        f'Neighborhood attention on CPU: kernel {args.kernel}, batch {args.batch}, {args.heads} heads x '
        f'{args.head_dim}, fp32, {torch.get_num_threads()} threads, median of {args.repeats} interleaved repeats. '
        'Wall-clock ms and process CPU ms (all threads); peak = rise of peak RSS during the call (MiB). '
        'natten: forward only, no RPB. Speed-up = natten fwd wall / this fwd wall.',
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
                         f'{_fmt(r.get("fwd_peak_mb"))} | {_fmt(r.get("fwd_bwd_peak_mb"))} | {ratio} |')
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
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

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
