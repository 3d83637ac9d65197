"""CPU cost of every registered token mixer as the token count grows: time and peak memory.

    zoo bench mixers                          # every mixer at 14^2, 28^2, 56^2, 112^2 tokens, 1 thread
    zoo bench mixers --out bench/results      # the README's table and plot (bench/results/mixers.*)
    zoo bench mixers --mixers window neighborhood --sizes 14 28 --repeats 3

Every mixer in `zoo.blocks.list_mixers()` is measured (mixers registered later join by themselves),
built with `create_mixer(name, dim=96, num_heads=3)` (head_dim 32) and its family's default arguments,
on one channels-last map (1, S, S, 96) per size S, fp32, CPU.

What is measured:
- time: wall-clock ms per call of the forward (eval mode, no autograd) and of forward + backward
  (train mode; `torch.autograd.grad` of the output against a fixed random cotangent, for the input and
  every parameter). After `--warmup` untimed calls, each sample times enough back-to-back calls to
  last `--min-time` s; every repeat takes one sample of each mixer, in an order rotated per repeat, so
  load on the machine hits every mixer alike. The median over repeats is reported; every sample and
  the process CPU time per call are in the JSON.
- memory: peak bytes allocated by PyTorch's CPU allocator during one call, beyond what was allocated
  before it (parameters, input, cotangent, cached index tables): the running sum of the allocation
  and free events that `torch.profiler` records with `profile_memory=True`, so it is exact for tensor
  memory and independent of machine load (memory inside oneDNN/MKL that bypasses the allocator and
  the interpreter's own memory are not included). The output (and for forward + backward, the
  gradients) count, as they are alive at the end of the call. "cached" is what the first calls at a
  size keep allocated after their results are dropped: the index tables and masks the reference
  kernels cache per size (tables that do not depend on the size are counted at the first size only).
  Each mixer is measured in its own fresh process (forked from one helper
  process that imported torch once), so no mixer finds another's tables already built.

Writes DIR/mixers.json, DIR/mixers.md and DIR/mixers.png (log-log, one line per mixer). Without `--out`,
DIR is a new work_dirs/bench/<timestamp>; the committed bench/results are written only when asked.
"""
import argparse
import datetime
import difflib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ['main', 'build_parser', 'peak_allocated', 'DEFAULT_SIZES']

DEFAULT_SIZES: Tuple[int, ...] = (14, 28, 56, 112)
_MIB = 2 ** 20
_CHILD_TIMEOUT = 3600


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    from .run import default_out_dir
    p = argparse.ArgumentParser(
        prog=prog or 'python -m zoo.bench.mixers',
        description='CPU time (forward, forward+backward) and peak memory of every registered token mixer '
                    'at growing token counts; writes DIR/mixers.{json,md,png}.')
    p.add_argument('--sizes', nargs='+', type=int, default=list(DEFAULT_SIZES), metavar='S',
                   help='square map sides S (S^2 tokens); default 14 28 56 112')
    p.add_argument('--mixers', nargs='+', default=None, metavar='NAME',
                   help='mixers to measure (default: every name in zoo.blocks.list_mixers())')
    p.add_argument('--repeats', type=int, default=7, help='timed samples per mixer, size and pass (default 7)')
    p.add_argument('--warmup', type=int, default=2, help='untimed calls per mixer, size and pass first (default 2)')
    p.add_argument('--min-time', type=float, default=0.05,
                   help='seconds one timed sample lasts at least (back-to-back calls; default 0.05)')
    p.add_argument('--threads', type=int, default=1, help='torch intra-op threads (default 1)')
    p.add_argument('--dim', type=int, default=96, help='channels C (default 96)')
    p.add_argument('--num-heads', type=int, default=3, help='attention heads (default 3, i.e. head_dim 32)')
    p.add_argument('--no-memory', action='store_true', help='skip the peak-memory measurement')
    p.add_argument('--no-plot', action='store_true', help='skip the PNG plot')
    p.add_argument('--out', default=None, metavar='DIR',
                   help=f'output folder for mixers.json/.md/.png (default: a new {default_out_dir("<timestamp>")})')
    return p


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> List[str]:
    import zoo.blocks
    known = zoo.blocks.list_mixers()
    names = list(dict.fromkeys(args.mixers or known))
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = ' (a gate for conv stages, not a token mixer)' if name in zoo.blocks.list_gates() else (
                f'; did you mean {", ".join(close)}?' if close else '')
            parser.error(f'--mixers: unknown mixer {name!r}{hint}; registered mixers: {known}')
    for flag, values, low in (('--sizes', args.sizes, 1), ('--repeats', [args.repeats], 1),
                              ('--warmup', [args.warmup], 0), ('--threads', [args.threads], 1),
                              ('--dim', [args.dim], 1), ('--num-heads', [args.num_heads], 1)):
        bad = [v for v in values if v < low]
        if bad:
            parser.error(f'{flag}: expected integers >= {low}, got {bad[0]}')
    if not args.min_time > 0:
        parser.error(f'--min-time: expected seconds > 0, got {args.min_time}')
    if args.dim % args.num_heads:
        parser.error(f'--num-heads: expected a divisor of --dim {args.dim}, got {args.num_heads}')
    args.sizes = sorted(set(args.sizes))
    return names


# ----------------------------------------------------------------------------------------------- passes

def _build(name: str, dim: int, num_heads: int):
    import torch
    import zoo.blocks
    torch.manual_seed(0)
    return zoo.blocks.create_mixer(name, dim, num_heads=num_heads)


def _passes(module, size: int, dim: int) -> Tuple[Callable[[], Any], Callable[[], Any]]:
    """(forward, forward + backward) closures over one fixed input of (1, size, size, dim)."""
    import torch
    gen = torch.Generator().manual_seed(size)
    x = torch.randn(1, size, size, dim, generator=gen)
    cotangent = torch.randn(1, size, size, dim, generator=gen)
    params = [p for p in module.parameters() if p.requires_grad]

    def forward():
        if module.training:  # switched once, not per call
            module.eval()
        with torch.no_grad():
            return module(x)

    def forward_backward():
        if not module.training:
            module.train()
        xg = x.detach().requires_grad_()
        y = module(xg)
        return torch.autograd.grad(y, [xg] + params, cotangent)

    return forward, forward_backward


# ----------------------------------------------------------------------------------------------- memory

def peak_allocated(fn: Callable[[], Any]) -> Tuple[int, int]:
    """(peak, net) bytes that PyTorch's CPU allocator hands out while `fn()` runs, beyond what was
    allocated before: the running sum of torch.profiler's allocation (+) and free (-) events. `fn`'s
    return value is dropped inside the measured region, so `net` is what the call keeps (caches)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    def run():
        fn()  # the result is freed when this frame ends, still inside the profiled region

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError as e:  # a torch without the kineto event list
        raise RuntimeError(f'torch {torch.__version__}: the profiler exposes no allocation events ({e})') from e
    deltas = sorted((e.start_ns(), i, e.nbytes()) for i, e in enumerate(events) if e.name() == '[memory]')
    total = peak = 0
    for _, _, nbytes in deltas:
        total += nbytes
        peak = max(peak, total)
    return peak, total


def _mixer_memory(name: str, sizes: Sequence[int], dim: int, num_heads: int, threads: int) -> Dict[str, Any]:
    """Run in a fresh process: per size, peak MiB of forward and forward+backward, and MiB cached."""
    import torch
    torch.set_num_threads(threads)
    out: Dict[str, Any] = {}
    try:
        module = _build(name, dim, num_heads)
    except Exception as e:
        return {str(s): dict(error=f'build: {type(e).__name__}: {e}') for s in sizes}
    for size in sizes:
        try:
            forward, forward_backward = _passes(module, size, dim)
            _, cached = peak_allocated(lambda: (forward(), forward_backward()))  # first calls: build the tables
            fwd, _ = peak_allocated(forward)
            fwdbwd, _ = peak_allocated(forward_backward)
            out[str(size)] = dict(fwd_peak_mib=fwd / _MIB, fwdbwd_peak_mib=fwdbwd / _MIB, cached_mib=cached / _MIB)
        except Exception as e:
            out[str(size)] = dict(error=f'{type(e).__name__}: {e}')
    return out


def _memory_child(spec: Dict[str, Any], name: str, conn) -> None:
    try:
        conn.send(_mixer_memory(name, spec['sizes'], spec['dim'], spec['num_heads'], spec['threads']))
    except BaseException as e:  # reported by the parent
        conn.send({str(s): dict(error=f'{type(e).__name__}: {e}') for s in spec['sizes']})
    finally:
        conn.close()


def _memory_server(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Run in a fresh process that has imported torch and zoo.blocks (and run no torch op): measure
    each mixer in its own forked child (spawned where fork is unavailable), so each starts clean."""
    import multiprocessing

    import torch  # noqa: F401  (imported once, inherited by forked children)
    import zoo.blocks  # noqa: F401
    method = 'fork' if 'fork' in multiprocessing.get_all_start_methods() else 'spawn'
    ctx = multiprocessing.get_context(method)
    results = {}
    for name in spec['names']:
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_memory_child, args=(spec, name, send))
        proc.start()
        send.close()
        try:
            results[name] = recv.recv() if recv.poll(_CHILD_TIMEOUT) else None
        except EOFError:
            results[name] = None
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
        if results[name] is None:
            results[name] = {str(s): dict(error=f'memory process died or timed out (exit code {proc.exitcode})')
                             for s in spec['sizes']}
    return results


def _measure_memory(names: Sequence[str], sizes: Sequence[int], dim: int, num_heads: int,
                    threads: int) -> Dict[str, Dict[str, Any]]:
    import zoo
    spec = dict(names=list(names), sizes=list(sizes), dim=dim, num_heads=num_heads, threads=threads)
    env = dict(os.environ)
    env['KINETO_LOG_LEVEL'] = env.get('KINETO_LOG_LEVEL', '5')  # the profiler's start/stop chatter
    root = os.path.dirname(os.path.dirname(os.path.abspath(zoo.__file__)))  # where `zoo` imports from
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [root, env.get('PYTHONPATH')]))
    code = ('import json, sys; from zoo.bench.mixers import _memory_server; '
            'print("\\n" + json.dumps(_memory_server(json.loads(sys.argv[1]))))')
    res = subprocess.run([sys.executable, '-c', code, json.dumps(spec)], capture_output=True, text=True, env=env,
                         timeout=_CHILD_TIMEOUT * max(1, len(names)))
    if res.returncode != 0:
        raise RuntimeError(f'the memory helper process failed (exit {res.returncode}):\n{res.stderr[-2000:]}')
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- timing

def _sample(fn: Callable[[], Any], iters: int) -> Tuple[float, float]:
    """(wall ms, process CPU ms) per call over `iters` back-to-back calls."""
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(iters):
        fn()
    t1, c1 = time.perf_counter(), time.process_time()
    return 1000 * (t1 - t0) / iters, 1000 * (c1 - c0) / iters


def _time_size(modules: Dict[str, Any], size: int, dim: int, repeats: int, warmup: int,
               min_time: float) -> Dict[str, Dict[str, Any]]:
    """Per mixer at one size: wall and CPU ms per call of both passes, every sample; or an error."""
    out: Dict[str, Dict[str, Any]] = {}
    runners: Dict[Tuple[str, str], Tuple[Callable[[], Any], int]] = {}
    for name, module in modules.items():
        try:
            passes = dict(zip(('fwd', 'fwdbwd'), _passes(module, size, dim)))
            for key, fn in passes.items():
                for _ in range(warmup):
                    fn()
                once, _ = _sample(fn, 1)  # calibrate: enough calls per sample to last min_time
                runners[name, key] = fn, max(1, min(10000, math.ceil(min_time * 1000 / max(once, 1e-6))))
            out[name] = {f'{k}_{f}': [] for k in passes for f in ('runs_ms', 'cpu_runs_ms')}
            out[name].update({f'{k}_iters': runners[name, k][1] for k in passes})
        except Exception as e:
            out[name] = dict(error=f'{type(e).__name__}: {e}')
            runners.pop((name, 'fwd'), None)
            runners.pop((name, 'fwdbwd'), None)
    names = [n for n in modules if 'error' not in out[n]]
    for r in range(repeats):
        shift = r % max(1, len(names))
        for name in names[shift:] + names[:shift]:
            for key in ('fwd', 'fwdbwd'):
                wall, cpu = _sample(*runners[name, key])
                out[name][f'{key}_runs_ms'].append(wall)
                out[name][f'{key}_cpu_runs_ms'].append(cpu)
    for name in names:
        row = out[name]
        for key in ('fwd', 'fwdbwd'):
            row[f'{key}_ms'] = statistics.median(row[f'{key}_runs_ms'])
            row[f'{key}_cpu_ms'] = statistics.median(row[f'{key}_cpu_runs_ms'])
    return out


# ----------------------------------------------------------------------------------------------- output

def _fmt(value: Optional[float]) -> str:
    """3 significant digits, no exponent for the usual range."""
    if value is None:
        return '-'
    if value == 0:
        return '0'
    digits = max(0, 2 - int(math.floor(math.log10(abs(value)))))
    return f'{value:.{digits}f}'


def _markdown(result: Dict[str, Any]) -> str:
    meta = result['meta']
    lines = [
        f"Every registered token mixer on CPU: C={meta['dim']}, {meta['num_heads']} heads x "
        f"{meta['dim'] // meta['num_heads']}, batch 1, fp32, {meta['threads']} thread(s), median of "
        f"{meta['repeats']} interleaved repeats; torch {meta['torch']}, {meta['cpu']}. Time: wall ms per call. "
        f"Memory: peak MiB PyTorch allocates during the call beyond its inputs and parameters (torch.profiler "
        f"allocation events); cached: MiB of index tables the first calls at a size add to the kernels' caches.",
        '',
        '| mixer | cost | tokens | fwd ms | fwd+bwd ms | fwd peak MiB | fwd+bwd peak MiB | cached MiB |',
        '|---|---|---:|---:|---:|---:|---:|---:|',
    ]
    for m in result['mixers']:
        for r in m['results']:
            tokens = f"{r['size']}x{r['size']} = {r['tokens']}"
            if r.get('error'):
                lines.append(f"| {m['name']} | {m['cost']} | {tokens} | error: {r['error']} | | | | |")
                continue
            lines.append(
                f"| {m['name']} | {m['cost']} | {tokens} | {_fmt(r.get('fwd_ms'))} | {_fmt(r.get('fwdbwd_ms'))} | "
                f"{_fmt(r.get('fwd_peak_mib'))} | {_fmt(r.get('fwdbwd_peak_mib'))} | {_fmt(r.get('cached_mib'))} |")
    return '\n'.join(lines) + '\n'


def _plain_log_formatter():
    from matplotlib import ticker

    class PlainLogFormatter(ticker.LogFormatter):
        """Log-axis labels as plain numbers (0.6, 20), on the ticks matplotlib's LogFormatter labels."""

        def __call__(self, x, pos=None):
            return f'{x:g}' if super().__call__(x, pos) else ''

    return PlainLogFormatter


def _plot(result: Dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib import ticker
    _PlainLogFormatter = _plain_log_formatter()
    panels = [('fwd_ms', 'forward, ms'), ('fwdbwd_ms', 'forward + backward, ms')]
    if result['meta']['memory']:
        panels.append(('fwdbwd_peak_mib', 'forward + backward peak memory, MiB'))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    markers = 'osD^vP*Xph<>'
    for ax, (key, label) in zip(axes[0], panels):
        anchor = None
        for i, m in enumerate(result['mixers']):
            pts = [(r['tokens'], r[key]) for r in m['results'] if not r.get('error') and r.get(key)]
            if pts:
                ax.plot(*zip(*pts), marker=markers[i % len(markers)], markersize=4, label=m['name'])
                anchor = anchor or pts[0]
        if anchor:  # a slope-1 guide: cost linear in tokens
            xs = sorted({r['tokens'] for m in result['mixers'] for r in m['results']})
            ax.plot(xs, [anchor[1] * x / anchor[0] for x in xs], ':', color='0.6', linewidth=1, label='∝ N')
        ax.set_xscale('log')
        ax.set_yscale('log')
        sizes = result['meta']['sizes']
        ax.set_xticks([s * s for s in sizes], [f'{s * s}\n({s}x{s})' for s in sizes], fontsize=8)
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        for which in ('major', 'minor'):  # plain numbers; minor labels only where few decades are shown
            getattr(ax.yaxis, f'set_{which}_formatter')(_PlainLogFormatter(labelOnlyBase=False,
                                                                         minor_thresholds=(1.5, 0.6)))
        ax.tick_params(axis='y', which='both', labelsize=8)
        ax.set_xlabel('tokens N = H x W')
        ax.set_title(label, fontsize=10)
        ax.grid(True, which='both', alpha=0.25)
    axes[0][0].legend(fontsize=8)
    meta = result['meta']
    fig.suptitle(f"token mixers on CPU: C={meta['dim']}, {meta['num_heads']} heads, batch 1, fp32, "
                 f"{meta['threads']} thread(s), median of {meta['repeats']}", fontsize=10)
    fig.tight_layout()
    from .run import save_figure
    save_figure(fig, path)


# ------------------------------------------------------------------------------------------------- main

def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Run the benchmark, print the table, write DIR/mixers.{json,md,png}. Returns 1 if a mixer failed."""
    from .run import _cpu_name, _write_atomic, default_out_dir
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    names = _check_args(parser, args)

    import torch
    import zoo.blocks

    out_dir = args.out or default_out_dir()
    os.makedirs(out_dir, exist_ok=True)

    memory: Dict[str, Dict[str, Any]] = {}
    if not args.no_memory:  # first, in other processes, before this one is busy timing
        print(f'[bench mixers] peak memory of {len(names)} mixers at {args.sizes} (one clean process each)',
              file=sys.stderr, flush=True)
        memory = _measure_memory(names, args.sizes, args.dim, args.num_heads, args.threads)

    torch.set_num_threads(args.threads)
    modules, build_errors = {}, {}
    for name in names:
        try:
            modules[name] = _build(name, args.dim, args.num_heads)
        except Exception as e:
            build_errors[name] = f'build: {type(e).__name__}: {e}'
    timing: Dict[int, Dict[str, Dict[str, Any]]] = {}
    for size in args.sizes:
        print(f'[bench mixers] timing {len(modules)} mixers at {size}x{size} x {args.repeats} repeats',
              file=sys.stderr, flush=True)
        timing[size] = _time_size(modules, size, args.dim, args.repeats, args.warmup, args.min_time)

    rows, errors = [], []
    for name in names:
        info = zoo.blocks.mixer_info(name)
        results = []
        for size in args.sizes:
            r: Dict[str, Any] = dict(size=size, tokens=size * size)
            r.update(timing[size].get(name, dict(error=build_errors.get(name))))
            mem = memory.get(name, {}).get(str(size), {})
            if 'error' in mem:
                r['error'] = r.get('error') or f'memory: {mem.pop("error")}'
            r.update(mem)
            if r.get('error'):
                errors.append(f'{name} at {size}x{size}: {r["error"]}')
            results.append(r)
        rows.append(dict(name=name, paper=info.paper, cost=info.cost, triton=info.triton,
                         onnx_dynamic=info.onnx_dynamic, arguments=info.arguments, results=results))
    result = dict(
        meta=dict(
            command=' '.join([parser.prog] + list(sys.argv[1:] if argv is None else argv)),
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            sizes=args.sizes, dim=args.dim, num_heads=args.num_heads, batch_size=1, dtype='float32',
            repeats=args.repeats, warmup=args.warmup, min_time_s=args.min_time, threads=torch.get_num_threads(),
            torch=torch.__version__, python=platform.python_version(), platform=platform.platform(),
            cpu=_cpu_name(), cpu_count=os.cpu_count(),
            timing='wall ms per call (median over repeats; each sample >= min_time of back-to-back calls, mixers '
                   'interleaved in a rotating order); forward: eval + no_grad; forward+backward: train, '
                   'autograd.grad for input and parameters',
            memory=None if args.no_memory else
            'peak bytes allocated by the PyTorch CPU allocator during one call beyond the prior allocations '
            '(running sum of torch.profiler profile_memory events; tables cached by the first calls not '
            'counted, reported as cached_mib); one fresh process per mixer',
        ),
        mixers=rows,
    )
    table = _markdown(result)
    base = os.path.join(out_dir, 'mixers')
    _write_atomic(base + '.json', json.dumps(result, indent=2) + '\n')
    _write_atomic(base + '.md', table)
    written = [base + '.json', base + '.md']
    if not args.no_plot:
        try:
            _plot(result, base + '.png')
            written.append(base + '.png')
        except ImportError:
            print('[bench mixers] matplotlib missing: no PNG', file=sys.stderr)
    print(table)
    print('wrote ' + ', '.join(written))
    for msg in errors:
        print(f'[bench mixers] error: {msg}', file=sys.stderr)
    return 1 if errors else 0


if __name__ == '__main__':
    sys.exit(main())
