"""CPU benchmark of zoo models against their timm anchors: throughput, peak memory, FLOPs, params.

    python -m zoo.bench.run                                   # the foundation pairs (see DEFAULT_PAIRS)
    python -m zoo.bench.run --models swin_tiny --anchors swin_tiny_patch4_window7_224 \\
        --pairs swin_tiny=swin_tiny_patch4_window7_224 --img-size 224 --batch-size 8 --repeats 5 \\
        --out bench/results/swin

What is measured (all CPU, eval mode, no autograd, one fixed random batch):
- throughput: images / s of `model(x)`, after `--warmup` untimed passes. Each repeat times `--iters`
  passes of every model in turn, the model order rotating between repeats, so load on the machine
  hits every model alike; the median over repeats is reported (all runs are in the JSON). The
  process CPU time per batch (all threads, OpenMP spin-waits included) is reported too: it is
  steadier than wall time when other jobs share the machine.
- peak memory: the extra resident memory a forward pass needs (activations, workspaces) beyond the
  built model and its input. Each model runs in a clean process: one batch-1 pass, then the
  kernel's RSS high-water mark is reset (`/proc/self/clear_refs`, Linux) and the full batch runs;
  reported = VmHWM - VmRSS before the pass. Where that reset is unavailable, the process's
  `ru_maxrss` delta is used (a lower bound; the JSON names the method). On Linux one helper
  process imports torch/timm/zoo once and forks a clean child per model.
- FLOPs / GMACs: `bench.flops.count_flops` at batch 1; GMACs = FLOPs / 2 / 1e9 (timm's unit).
- params: parameter count.
Ratios are ours / anchor from the same run. Output: OUT.json, OUT.md and (if matplotlib) OUT.png;
OUT defaults to a new work_dirs/bench/<timestamp>/default (bench/results only with an explicit --out).
`python -m zoo.bench.run mixers` (= `zoo bench mixers`) runs bench/mixers.py: every token mixer by token count.
`zoo bench agent` runs bench/agent.py: Agent-Swin-T vs Swin-T, the agent mixer vs window and global attention.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from zoo.weights.io import atomic_write

__all__ = ['main', 'build_parser', 'default_out_dir', 'DEFAULT_PAIRS']

# (ours, timm anchor): the foundation models and the timm models they re-implement or extend
DEFAULT_PAIRS: Tuple[Tuple[str, str], ...] = (
    ('swin_tiny', 'swin_tiny_patch4_window7_224'),
    ('maxvit_tiny', 'maxvit_tiny_tf_224'),
    ('cbam_resnet50', 'resnet50'),
)


def default_out_dir(stamp: Optional[str] = None) -> str:
    """A new folder per run, work_dirs/bench/<UTC timestamp>: runs never overwrite the committed bench/results."""
    stamp = stamp or datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%d_%H%M%S')
    return os.path.join('work_dirs', 'bench', stamp)


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog or 'python -m zoo.bench.run',
        description='CPU throughput, peak memory, FLOPs and params of zoo models vs timm anchors. '
                    'Every token mixer\'s time and memory by token count: `zoo bench mixers --help`.')
    p.add_argument('--models', nargs='+', default=None, metavar='NAME',
                   help='models to measure (zoo or timm names); default: the foundation pairs')
    p.add_argument('--anchors', nargs='+', default=[], metavar='NAME', help='timm reference models to measure too')
    p.add_argument('--pairs', nargs='+', default=[], metavar='OURS=ANCHOR',
                   help='report OURS / ANCHOR ratios for these pairs')
    p.add_argument('--img-size', type=int, default=224, help='square input size (default 224)')
    p.add_argument('--batch-size', type=int, default=8, help='batch size of the timed passes (default 8)')
    p.add_argument('--repeats', type=int, default=3, help='timed rounds over all models (default 3)')
    p.add_argument('--iters', type=int, default=1, help='forward passes per model per round (default 1)')
    p.add_argument('--warmup', type=int, default=1, help='untimed passes per model first (default 1)')
    p.add_argument('--threads', type=int, default=None, help='torch intra-op threads (default: torch default)')
    p.add_argument('--no-memory', action='store_true', help='skip the peak-memory subprocesses')
    p.add_argument('--no-plot', action='store_true', help='skip the PNG chart')
    p.add_argument('--out', default=None,
                   help='output path prefix: writes OUT.json, OUT.md, OUT.png (default: a new '
                        f'{default_out_dir("<timestamp>")}/default; `--out bench/results/default` updates the '
                        'committed results)')
    return p


def _parse_pairs(parser: argparse.ArgumentParser, pairs: Sequence[str]) -> List[Tuple[str, str]]:
    out = []
    for item in pairs:
        ours, sep, anchor = item.partition('=')
        if not sep or not ours or not anchor:
            parser.error(f'--pairs: expected OURS=ANCHOR, got {item!r}')
        out.append((ours, anchor))
    return out


def _resolve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Tuple[List[str], List[Tuple[str, str]]]:
    pairs = _parse_pairs(parser, args.pairs)
    if args.models is None and not args.anchors and not pairs:
        pairs = list(DEFAULT_PAIRS)
        names = [n for pair in DEFAULT_PAIRS for n in pair]
    else:
        names = list(args.models or []) + list(args.anchors)
        for ours, anchor in pairs:  # a paired name is measured even if not listed
            names += [ours, anchor]
    names = list(dict.fromkeys(names))
    if not names:
        parser.error('--models: expected at least one model name')
    for name, value, low in (('--img-size', args.img_size, 16), ('--batch-size', args.batch_size, 1),
                             ('--repeats', args.repeats, 1), ('--iters', args.iters, 1), ('--warmup', args.warmup, 0)):
        if value < low:
            parser.error(f'{name}: expected an integer >= {low}, got {value}')
    return names, pairs


def _check_registered(parser: argparse.ArgumentParser, names: Sequence[str]) -> List[str]:
    import timm
    import zoo
    missing = [n for n in names if not timm.is_model(n)]
    if missing:
        parser.error(
            f'--models/--anchors/--pairs: {missing} not registered in timm (after `import zoo`). '
            f'Zoo models: {zoo.list_zoo_models()}. Timm names: see timm.list_models().')
    return zoo.list_zoo_models()


# ---------------------------------------------------------------------------------------------- memory

def _proc_status_kb(field: str) -> Optional[int]:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _memory_probe(name: str, img_size: int, batch_size: int, threads: Optional[int]) -> Dict[str, Any]:
    """Run in a fresh process: peak extra RSS of one forward pass of `name` at (batch_size, 3, img, img)."""
    import gc
    import resource

    import timm
    import torch
    import zoo  # noqa: F401

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(batch_size, 3, img_size, img_size)
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    with torch.no_grad():
        model(x[:1])
        gc.collect()
        rss_before = _proc_status_kb('VmRSS')
        method = 'VmHWM-reset'
        try:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')  # reset the RSS high-water mark (Linux >= 4.0)
        except OSError:
            method = 'ru_maxrss-delta (lower bound)'
            maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        model(x)
    if method == 'VmHWM-reset':
        peak_kb = _proc_status_kb('VmHWM')
        extra_kb = peak_kb - rss_before
    else:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if sys.platform == 'darwin':  # bytes there, kB on Linux
            peak_kb, maxrss_before = peak_kb // 1024, maxrss_before // 1024
        extra_kb = peak_kb - max(maxrss_before, rss_before or 0)
    return dict(peak_mem_mb=max(extra_kb, 0) / 1024, peak_rss_mb=peak_kb / 1024,
                weights_mb=weights / 2 ** 20, memory_method=method)


def _probe_child(name: str, img_size: int, batch_size: int, threads: Optional[int], conn) -> None:
    try:
        conn.send(_memory_probe(name, img_size, batch_size, threads))
    except BaseException as e:  # reported by the parent
        conn.send(dict(error=f'{type(e).__name__}: {e}'))
    finally:
        conn.close()


def _memory_server(names: Sequence[str], img_size: int, batch_size: int, threads: Optional[int]) -> Dict[str, Any]:
    """Run in a fresh process: import once, then probe each model in its own forked child.

    Forking is safe here because this process has run no parallel torch op (a fork after one can hang
    in OpenMP); each child starts from the same clean post-import state, like a fresh process.
    """
    import multiprocessing

    import timm  # noqa: F401  (imported once, inherited by the children)
    import torch  # noqa: F401
    import zoo  # noqa: F401
    ctx = multiprocessing.get_context('fork')
    results = {}
    for name in names:
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_probe_child, args=(name, img_size, batch_size, threads, send))
        proc.start()
        send.close()
        try:
            results[name] = recv.recv() if recv.poll(_PROBE_TIMEOUT) else dict(error='timed out')
        except EOFError:
            results[name] = None
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
        if results[name] is None:
            results[name] = dict(error=f'probe process died (exit code {proc.exitcode})')
    return results


_PROBE_TIMEOUT = 1800


def _run_python(code: str) -> Any:
    env = dict(os.environ)
    import zoo
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(zoo.__file__)))  # where `zoo` imports from
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [repo_root, env.get('PYTHONPATH')]))
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=_PROBE_TIMEOUT)
    if res.returncode != 0:
        raise RuntimeError(f'memory probe failed (exit {res.returncode}):\n{res.stderr[-2000:]}')
    return json.loads(res.stdout.strip().splitlines()[-1])


def _measure_memory(names: Sequence[str], img_size: int, batch_size: int,
                    threads: Optional[int]) -> Dict[str, Dict[str, Any]]:
    """Peak forward memory of each model, each in a clean process (forked children, or one process each)."""
    args = f'{img_size}, {batch_size}, {threads!r}'
    if hasattr(os, 'fork') and sys.platform.startswith('linux'):
        results = _run_python(
            'import json; from zoo.bench.run import _memory_server; '
            f'print("\\n" + json.dumps(_memory_server({list(names)!r}, {args})))')
    else:
        results = {n: _run_python(
            'import json; from zoo.bench.run import _memory_probe; '
            f'print("\\n" + json.dumps(_memory_probe({n!r}, {args})))') for n in names}
    for name, r in results.items():
        if 'error' in r:
            raise RuntimeError(f'memory probe of {name!r} failed: {r["error"]}')
    return results


# ---------------------------------------------------------------------------------------------- timing

def _time_models(models: Dict[str, Any], x, repeats: int, iters: int,
                 warmup: int) -> Tuple[Dict[str, List[float]], Dict[str, List[float]]]:
    """Per model and repeat: images / s (wall clock) and process CPU seconds per batch.

    Models are interleaved and their order rotated per repeat. CPU time (all threads) is less
    sensitive than wall time to other jobs sharing the machine, and shows the work a model costs.
    """
    import torch
    names = list(models)
    runs: Dict[str, List[float]] = {n: [] for n in names}
    cpu: Dict[str, List[float]] = {n: [] for n in names}
    with torch.no_grad():
        for n in names:
            for _ in range(warmup):
                models[n](x)
        for r in range(repeats):
            shift = r % len(names)
            for n in names[shift:] + names[:shift]:
                c0, t0 = time.process_time(), time.perf_counter()
                for _ in range(iters):
                    models[n](x)
                t1, c1 = time.perf_counter(), time.process_time()
                runs[n].append(x.shape[0] * iters / (t1 - t0))
                cpu[n].append((c1 - c0) / iters)
    return runs, cpu


# ---------------------------------------------------------------------------------------------- output

def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _fmt(v: Optional[float], spec: str) -> str:
    return '-' if v is None else format(v, spec)


def _markdown(result: Dict[str, Any]) -> str:
    meta = result['meta']
    lines = [
        f"CPU benchmark: {meta['img_size']}x{meta['img_size']}, batch {meta['batch_size']}, "
        f"{meta['threads']} threads, {meta['repeats']} repeats x {meta['iters']} iters (median), "
        f"torch {meta['torch']}, timm {meta['timm']}, {meta['cpu']}",
        '',
        '| model | source | params (M) | GMACs | img/s | ms / batch | CPU ms / batch | peak fwd mem (MB) |',
        '|---|---|---:|---:|---:|---:|---:|---:|',
    ]
    for m in result['models']:
        lines.append(
            f"| {m['name']} | {m['source']} | {m['params'] / 1e6:.2f} | {m['gmacs']:.3f} | "
            f"{m['throughput_img_s']:.2f} | {m['ms_per_batch']:.0f} | {m['cpu_ms_per_batch']:.0f} | "
            f"{_fmt(m['peak_mem_mb'], '.0f')} |")
    if result['pairs']:
        lines += [
            '',
            'Ratios ours / anchor, same run (img/s > 1: ours faster; CPU time, mem, GMACs, params < 1: ours '
            'cheaper):',
            '',
            '| ours | anchor | img/s | CPU time | peak mem | GMACs | params |',
            '|---|---|---:|---:|---:|---:|---:|',
        ]
        for p in result['pairs']:
            lines.append(
                f"| {p['ours']} | {p['anchor']} | {_fmt(p['throughput_ratio'], '.3f')} | "
                f"{_fmt(p['cpu_time_ratio'], '.3f')} | "
                f"{_fmt(p['peak_mem_ratio'], '.3f')} | {_fmt(p['gmacs_ratio'], '.3f')} | "
                f"{_fmt(p['params_ratio'], '.3f')} |")
    return '\n'.join(lines) + '\n'


def _plot(result: Dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    models = result['models']
    names = [m['name'] for m in models]
    colors = ['tab:blue' if m['source'] == 'zoo' else 'tab:gray' for m in models]
    panels = [('throughput_img_s', 'images / s (higher is better)')]
    if any(m['peak_mem_mb'] is not None for m in models):
        panels.append(('peak_mem_mb', 'peak forward memory, MB'))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 0.45 * len(names) + 1.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        vals = [m[key] or 0 for m in models]
        ax.barh(range(len(names)), vals, color=colors)
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        ax.set_xlabel(label)
        ax.set_xlim(0, 1.18 * max(vals + [1e-9]))
        for i, v in enumerate(vals):
            ax.text(v, i, f' {v:.1f}', va='center', fontsize=8)
    meta = result['meta']
    fig.suptitle(f"CPU, {meta['img_size']}px, batch {meta['batch_size']}, {meta['threads']} threads "
                 f"(blue: zoo, gray: timm)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def _write_atomic(path: str, text: str) -> None:
    with atomic_write(path) as tmp, open(tmp, 'w') as f:
        f.write(text)


def save_figure(fig, path: str) -> None:
    """Write a matplotlib figure to `path` as PNG atomically, then close it."""
    import matplotlib.pyplot as plt
    try:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, dpi=110, format='png')
    finally:
        plt.close(fig)


def _cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------- main

def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Run the benchmark; print the table; write OUT.json / OUT.md / OUT.png. Returns 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ['mixers']:  # `zoo bench mixers ...`: every token mixer by token count (bench/mixers.py)
        from .mixers import main as mixers_main
        return mixers_main(argv[1:], prog=f"{prog or 'python -m zoo.bench.run'} mixers")
    if argv[:1] == ['agent']:  # `zoo bench agent ...`: Agent-Swin vs Swin, agent vs window / global (bench/agent.py)
        from .agent import main as agent_main
        return agent_main(argv[1:], prog=f"{prog or 'python -m zoo.bench.run'} agent")
    if argv[:1] == ['linear']:  # `zoo bench linear ...`: linear-attention mixers and backbones (bench/linear.py)
        from .linear import main as linear_main
        return linear_main(argv[1:], prog=f"{prog or 'python -m zoo.bench.run'} linear")
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    names, pairs = _resolve(parser, args)
    zoo_names = set(_check_registered(parser, names))

    import timm
    import torch
    from .flops import count_flops, count_params

    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or os.path.join(default_out_dir(), 'default')
    out = out[:-len('.json')] if out.endswith('.json') else out
    os.makedirs(os.path.dirname(out) or '.', exist_ok=True)

    # memory first, in fresh processes, before this one allocates the models
    memory: Dict[str, Dict[str, Any]] = {}
    if not args.no_memory:
        print(f'[bench] peak memory of {len(names)} models (clean processes)', file=sys.stderr, flush=True)
        memory = _measure_memory(names, args.img_size, args.batch_size, args.threads)

    torch.manual_seed(0)
    models, stats = {}, {}
    for n in names:
        print(f'[bench] build + FLOPs  {n}', file=sys.stderr, flush=True)
        model = timm.create_model(n, pretrained=False).eval()
        flops = count_flops(model, torch.randn(1, 3, args.img_size, args.img_size))
        models[n] = model
        stats[n] = dict(params=count_params(model), flops=flops, gmacs=flops / 2 / 1e9)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    print(f'[bench] timing {len(names)} models x {args.repeats} repeats', file=sys.stderr, flush=True)
    runs, cpu = _time_models(models, x, args.repeats, args.iters, args.warmup)

    rows = []
    for n in names:
        med = statistics.median(runs[n])
        mem = memory.get(n, {})
        rows.append(dict(
            name=n, source='zoo' if n in zoo_names else 'timm', **stats[n],
            throughput_img_s=med, throughput_runs=runs[n], ms_per_batch=1000 * args.batch_size / med,
            cpu_ms_per_batch=1000 * statistics.median(cpu[n]),
            peak_mem_mb=mem.get('peak_mem_mb'), peak_rss_mb=mem.get('peak_rss_mb'),
            weights_mb=mem.get('weights_mb'), memory_method=mem.get('memory_method'),
        ))
    by_name = {r['name']: r for r in rows}
    pair_rows = []
    for ours, anchor in pairs:
        a, b = by_name[ours], by_name[anchor]
        pair_rows.append(dict(
            ours=ours, anchor=anchor,
            throughput_ratio=_ratio(a['throughput_img_s'], b['throughput_img_s']),
            cpu_time_ratio=_ratio(a['cpu_ms_per_batch'], b['cpu_ms_per_batch']),
            peak_mem_ratio=_ratio(a['peak_mem_mb'], b['peak_mem_mb']),
            gmacs_ratio=_ratio(a['gmacs'], b['gmacs']),
            params_ratio=_ratio(a['params'], b['params']),
        ))
    result = dict(
        meta=dict(
            command=' '.join([parser.prog] + list(sys.argv[1:] if argv is None else argv)),
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            img_size=args.img_size, batch_size=args.batch_size, repeats=args.repeats, iters=args.iters,
            warmup=args.warmup, threads=torch.get_num_threads(), torch=torch.__version__, timm=timm.__version__,
            python=platform.python_version(), platform=platform.platform(), cpu=_cpu_name(),
            cpu_count=os.cpu_count(), memory=None if args.no_memory else
            'extra RSS of one forward pass (VmHWM after it - VmRSS before it), fresh process per model',
            flops='torch FlopCounterMode at batch 1 (+ CPU SDPA formula); GMACs = FLOPs / 2e9',
        ),
        models=rows,
        pairs=pair_rows,
    )
    table = _markdown(result)
    _write_atomic(out + '.json', json.dumps(result, indent=2) + '\n')
    _write_atomic(out + '.md', table)
    if not args.no_plot:
        try:
            _plot(result, out + '.png')
        except ImportError:
            print('[bench] matplotlib missing: no PNG', file=sys.stderr)
    print(table)
    print(f'wrote {out}.json, {out}.md' + ('' if args.no_plot else f', {out}.png'))
    return 0


if __name__ == '__main__':
    sys.exit(main())
