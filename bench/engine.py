"""The measurement engine: a suite becomes an explicit list of items (subject, mode, precision, size), timed
in one interleaved run, with peak memory from clean child processes, FLOPs and params; the result is one dict
(`report` writes it as JSON, markdown and PNG).

    items = plan(suite)                  # every (subject, mode, precision, size), skipped ones included
    result = run(suite, items)           # the loop in `run` walks `schedule(items, repeats)`: Steps with a desc

Timing: per size, every active item is warmed up and calibrated (`measure.calibrate`) the first time it is
sampled; each repeat samples every item of that size once, in an order rotated per repeat, so load on the
machine hits all alike. Reported: the median over repeats of wall ms and process CPU ms per call (all threads;
steadier than wall time on a shared machine), with every sample in the JSON.
"""
import copy
import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from zoo.progress import progress

from .measure import MIB, calibrate, cpu_name, cuda_peak_mib, peak_allocated, peak_alloc_mib, rss_rise_mib, sample
from .subjects import Entry, Subject, build_subject
from .suite import Suite

__all__ = ['Item', 'Step', 'plan', 'schedule', 'run', 'measure_memory', 'growth_per_4x']

_CHILD_TIMEOUT = 3600


@dataclass
class Item:
    """One measurement: an entry of the suite in one mode and precision at one shape."""
    entry: Entry
    mode: str
    precision: str
    shape: Dict[str, Any]
    shape_index: int
    tokens: Optional[int]
    skipped: Optional[str] = None

    @property
    def key(self) -> Tuple[str, str, str, int]:
        return self.entry.label, self.mode, self.precision, self.shape_index

    @property
    def desc(self) -> str:
        size = f"{self.shape['size']}px b{self.shape['batch']}" if self.tokens is None else \
            f"{self.shape['size']}x{self.shape['size']}"
        return f'{self.entry.label} {self.mode} {self.precision} {size}'


@dataclass
class Step:
    """One timed sample of an item: what the measurement loop iterates over."""
    item: Item
    repeat: int
    desc: str


def plan(suite: Suite) -> List[Item]:
    """Every (entry, mode, precision, shape) of the suite in table order; skipped ones carry the reason."""
    from .anchors import FORWARD_ONLY_ON_CPU
    p, items = suite.params, []
    for index, shape in enumerate(suite.shapes()):
        tokens = None if suite.kind == 'models' else shape['size'] ** 2 * shape.get('depth', 1)
        for entry in suite.entries:
            for precision in p['precisions']:
                for mode in p['modes']:
                    skipped = None
                    if entry.modes is not None and mode not in entry.modes:
                        continue
                    if mode == 'fwdbwd' and p['device'] == 'cpu' and entry.name in FORWARD_ONLY_ON_CPU:
                        continue
                    if entry.max_tokens is not None and tokens is not None and tokens > entry.max_tokens:
                        skipped = f'{tokens} tokens > max_tokens {entry.max_tokens}'
                    items.append(Item(entry, mode, precision, shape, index, tokens, skipped))
    return items


def schedule(items: List[Item], repeats: int) -> List[Step]:
    """The timed samples in order: per shape, `repeats` rounds over its active items, rotated per round."""
    steps = []
    for index in sorted({i.shape_index for i in items}):
        group = [i for i in items if i.shape_index == index and i.skipped is None]
        for r in range(repeats):
            shift = r % max(1, len(group))
            steps += [Step(i, r, f'{i.desc} ({r + 1}/{repeats})') for i in group[shift:] + group[:shift]]
    return steps


# ------------------------------------------------------------------------------------------------ memory

def _probe_entry(spec: Dict[str, Any], label: str) -> Dict[str, Any]:
    """In a clean child: per item of entry `label`, cached / peak allocator MiB and the RSS rise of one call."""
    import torch
    if spec['params']['threads']:
        torch.set_num_threads(spec['params']['threads'])
    entry = Entry(**spec['entries'][label])
    subject = build_subject(spec['kind'], entry, 'cpu', spec['params'])
    out = {}
    for mode, precision, index in spec['items'][label]:
        key = f'{mode}/{precision}/{index}'
        try:
            fn = subject.calls(spec['shapes'][index], precision)[mode]
            _, cached = peak_allocated(fn)  # the first call builds the size's cached tables
            rss, method = rss_rise_mib(fn)
            out[key] = dict(peak_rss_mib=rss, peak_alloc_mib=peak_alloc_mib(fn), cached_mib=cached / MIB,
                            memory_method=method)
        except Exception as e:  # reported with the item
            out[key] = dict(error=f'memory: {type(e).__name__}: {e}')
    return out


def _probe_child(spec: Dict[str, Any], label: str, conn) -> None:
    try:
        conn.send(_probe_entry(spec, label))
    except BaseException as e:
        conn.send(dict(error=f'memory: {type(e).__name__}: {e}'))
    finally:
        conn.close()


def _memory_server(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Run in a fresh process that imported torch, timm and zoo and ran no torch op: one forked child per entry,
    so each starts from the same clean state (spawned where fork is unavailable)."""
    import multiprocessing

    import timm  # noqa: F401  (imported once, inherited by the children)
    import torch  # noqa: F401
    import zoo  # noqa: F401
    method = 'fork' if 'fork' in multiprocessing.get_all_start_methods() else 'spawn'
    ctx = multiprocessing.get_context(method)
    results = {}
    for label in spec['items']:
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_probe_child, args=(spec, label, send))
        proc.start()
        send.close()
        try:
            results[label] = recv.recv() if recv.poll(_CHILD_TIMEOUT) else None
        except EOFError:
            results[label] = None
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
        if results[label] is None:
            results[label] = dict(error=f'memory: the probe process died or timed out (exit code {proc.exitcode})')
    return results


def measure_memory(suite: Suite, items: List[Item]) -> Dict[Tuple, Dict[str, Any]]:
    """Peak memory of every active item, one clean process per entry (CPU suites). Keyed like `Item.key`."""
    import zoo
    todo: Dict[str, List] = {}
    for i in items:
        if i.skipped is None:
            todo.setdefault(i.entry.label, []).append((i.mode, i.precision, i.shape_index))
    spec = dict(kind=suite.kind, params=suite.params, shapes=suite.shapes(), items=todo,
                entries={e.label: dataclasses.asdict(e) for e in suite.entries if e.label in todo})
    env = dict(os.environ)
    env.setdefault('KINETO_LOG_LEVEL', '5')  # the profiler's start / stop chatter
    env['MALLOC_MMAP_THRESHOLD_'] = str(128 * 1024)  # large buffers go back to the OS when freed: honest RSS
    root = os.path.dirname(os.path.dirname(os.path.abspath(zoo.__file__)))  # where `zoo` imports from
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [root, env.get('PYTHONPATH')]))
    code = ('import json, sys; from zoo.bench.engine import _memory_server; '
            'print("\\n" + json.dumps(_memory_server(json.loads(sys.stdin.read()))))')
    res = subprocess.run([sys.executable, '-c', code], input=json.dumps(spec), capture_output=True, text=True,
                         env=env, timeout=_CHILD_TIMEOUT * max(1, len(todo)))
    if res.returncode != 0:
        raise RuntimeError(f'the memory helper process failed (exit {res.returncode}):\n{res.stderr[-2000:]}')
    found = json.loads(res.stdout.strip().splitlines()[-1])
    out = {}
    for i in items:
        per_entry = found.get(i.entry.label, {})
        if i.skipped is None:
            out[i.key] = per_entry if 'error' in per_entry else \
                per_entry.get(f'{i.mode}/{i.precision}/{i.shape_index}', {})
    return out


# ------------------------------------------------------------------------------------------------ timing

def _flops(fn: Callable[[], Any]) -> Optional[int]:
    from .flops import count_call_flops
    try:
        return count_call_flops(fn) or None  # 0: a custom kernel the counter does not see (Triton)
    except Exception:  # an op the counter cannot trace (natten's Flex): no figure rather than a wrong one
        return None


class _Prepared:
    """An item ready to sample: its callable and calls per sample, or the error that stopped it."""

    def __init__(self, fn=None, iters=1, error=None):
        self.fn, self.iters, self.error = fn, iters, error


def run(suite: Suite, items: Optional[List[Item]] = None, memory: Optional[bool] = None,
        command: Optional[str] = None, log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)) -> Dict[str, Any]:
    """Measure `items` (default: `plan(suite)`) and return the result dict (meta, rows, ratios, growth)."""
    import torch
    p = suite.params
    items = plan(suite) if items is None else items
    if p['threads']:
        torch.set_num_threads(p['threads'])
    device = p['device']
    memory = p['memory'] if memory is None else memory
    mem: Dict[Tuple, Dict[str, Any]] = {}
    if memory and device == 'cpu':  # first, in other processes, before this one is busy
        log(f'[bench {suite.stem}] peak memory of {len({i.entry.label for i in items})} entries (clean processes)')
        mem = measure_memory(suite, items)

    subjects: Dict[str, Any] = {}
    calls: Dict[Tuple, Dict[str, Callable]] = {}
    flops: Dict[Tuple, Optional[int]] = {}
    diffs: Dict[Tuple, Dict[str, float]] = {}
    prepared: Dict[Tuple, _Prepared] = {}
    samples: Dict[Tuple, Dict[str, List[float]]] = {}
    labels = {e.label: e for e in suite.entries}

    def subject(entry: Entry) -> Subject:
        if entry.label not in subjects:
            try:
                subjects[entry.label] = build_subject(suite.kind, entry, device, p)
            except Exception as e:
                subjects[entry.label] = e
        if isinstance(subjects[entry.label], Exception):
            raise subjects[entry.label]
        return subjects[entry.label]

    def calls_of(entry: Entry, item: Item) -> Dict[str, Callable]:
        key = (entry.label, item.precision, item.shape_index)
        if key not in calls:
            calls[key] = subject(entry).calls(item.shape, item.precision)
        return calls[key]

    def prepare(item: Item) -> _Prepared:
        try:
            fn = calls_of(item.entry, item)[item.mode]
            iters = calibrate(fn, p['warmup'], p['min_time'], device)
            if (item.entry.label, item.shape_index) not in flops:
                flops[item.entry.label, item.shape_index] = _flops(calls_of(item.entry, item)['fwd'])
            for a in item.entry.anchor or () if suite.kind == 'ops' and item.mode == 'fwd' else ():
                try:
                    with torch.no_grad():
                        ours, theirs = fn().float(), calls_of(labels[a], item)['fwd']().float()
                    diffs.setdefault(item.key, {})[a] = (ours - theirs).abs().max().item()
                except Exception:  # an anchor that cannot run here is reported on its own row
                    pass
            if device == 'cuda':
                mem[item.key] = dict(peak_alloc_mib=cuda_peak_mib(fn), memory_method='torch.cuda.max_memory_allocated')
            return _Prepared(fn, iters)
        except Exception as e:
            return _Prepared(error=f'{type(e).__name__}: {e}'[:500])

    steps = schedule(items, p['repeats'])
    left = Counter(s.item.shape_index for s in steps)
    log(f'[bench {suite.stem}] {len(steps)} timed samples of {len({s.item.key for s in steps})} items')
    for step in progress(steps, desc=f'bench {suite.stem}', unit='sample', item=lambda s: s.desc):
        item = step.item
        if item.key not in prepared:
            prepared[item.key] = prepare(item)
        ready = prepared[item.key]
        if ready.error is None:
            try:
                wall, cpu = sample(ready.fn, ready.iters, device)
            except Exception as e:  # reported on the item's row; its other samples are skipped
                ready.error = f'{type(e).__name__}: {e}'[:500]
            else:
                runs = samples.setdefault(item.key, dict(wall=[], cpu=[]))
                runs['wall'].append(wall)
                runs['cpu'].append(cpu)
        left[item.shape_index] -= 1
        if not left[item.shape_index]:  # this size is done: free its inputs
            for key in [k for k in calls if k[2] == item.shape_index]:
                del calls[key]
            for key, done in prepared.items():
                if key[3] == item.shape_index:
                    done.fn = None
    rows = [_row(suite, item, prepared.get(item.key), samples.get(item.key), mem.get(item.key, {}),
                 flops.get((item.entry.label, item.shape_index)), subjects.get(item.entry.label),
                 diffs.get(item.key)) for item in items]
    ratios = _ratios(rows)
    result = dict(meta=_meta(suite, memory, command), entries=[_entry_info(e) for e in suite.entries], rows=rows,
                  ratios=ratios, growth=growth_per_4x(rows))
    if p['speed_of_light']:
        result['bounds'] = speed_of_light(ratios, p['speed_of_light'], p['bound_tile'])
    return result


# ------------------------------------------------------------------------------------------------ result

def _entry_info(e: Entry) -> Dict[str, Any]:
    return dict(label=e.label, name=e.name, kwargs=e.kwargs, anchor=e.anchor, patch=e.patch, role='anchor' if
                e.is_anchor else 'subject', reduced=e.reduced)


def _row(suite: Suite, item: Item, ready: Optional[_Prepared], runs: Optional[Dict], mem: Dict[str, Any],
         flops: Optional[int], subject: Any, diff: Optional[Dict[str, float]]) -> Dict[str, Any]:
    import statistics
    shape = {k: v for k, v in item.shape.items() if k != 'size'}
    row = dict(subject=item.entry.label, anchor=item.entry.anchor, mode=item.mode, precision=item.precision,
               size=item.shape['size'], tokens=item.tokens, shape=shape)
    if item.skipped:
        return dict(row, skipped=item.skipped)
    error = (ready.error if ready is not None else None) or mem.get('error')
    if error:
        return dict(row, error=error)
    ms = statistics.median(runs['wall'])
    row.update(ms=ms, cpu_ms=statistics.median(runs['cpu']), runs_ms=runs['wall'], cpu_runs_ms=runs['cpu'],
               iters=ready.iters, flops=flops,
               params=subject.params() if isinstance(subject, Subject) else None,
               peak_rss_mib=mem.get('peak_rss_mib'), peak_alloc_mib=mem.get('peak_alloc_mib'),
               cached_mib=mem.get('cached_mib'), memory_method=mem.get('memory_method'))
    if suite.kind == 'models':
        row['img_s'] = 1000 * item.shape['batch'] / ms
    if diff is not None:
        row['max_abs_diff_vs_anchor'] = diff
    return row


RATIO_KEYS = (('time', 'ms'), ('cpu_time', 'cpu_ms'), ('peak_rss', 'peak_rss_mib'), ('peak_alloc', 'peak_alloc_mib'),
              ('flops', 'flops'), ('params', 'params'))


def _ratios(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """ours / anchor of every measured subject row whose anchor was measured at the same mode, precision, shape."""
    def where(r):
        return r['mode'], r['precision'], r['size'], json.dumps(r['shape'], sort_keys=True)

    measured = {(r['subject'],) + where(r): r for r in rows if 'ms' in r}
    out = []
    for r in rows:
        for anchor in r['anchor'] or () if 'ms' in r else ():
            a = measured.get((anchor,) + where(r))
            if a is None:
                continue
            ratio = dict(subject=r['subject'], anchor=anchor, mode=r['mode'], precision=r['precision'],
                         size=r['size'], tokens=r['tokens'], shape=r['shape'])
            for name, key in RATIO_KEYS:
                ratio[name] = r[key] / a[key] if r.get(key) is not None and a.get(key) else None
            if anchor in r.get('max_abs_diff_vs_anchor', {}):
                ratio['max_abs_diff'] = r['max_abs_diff_vs_anchor'][anchor]
            out.append(ratio)
    return out


def speed_of_light(ratios: List[Dict[str, Any]], dense: str, tile: int) -> List[Dict[str, Any]]:
    """Per subject, mode and shape: the analytic speed-up bound of its sparsity (`flops.gna_bounds`), the speed-up
    measured over the dense anchor `dense` in this run (its time / ours, wall and CPU), the fraction of each bound
    realised, and the speed-up over every other anchor (e.g. natten) at the same mode and shape."""
    from .flops import gna_bounds
    out = []
    for r in ratios:
        if r['anchor'] != dense or not r.get('time'):
            continue
        kw = r['shape']
        sizes = ([kw['depth']] if kw.get('depth') else []) + [r['size'], r['size']]
        bound = gna_bounds(sizes, kw.get('kernel_size', 7), kw.get('stride', 1), kw.get('dilation', 1),
                           kw.get('is_causal', False), tile)
        speedup, cpu_speedup = 1 / r['time'], 1 / r['cpu_time'] if r.get('cpu_time') else None
        row = dict(subject=r['subject'], mode=r['mode'], precision=r['precision'], size=r['size'],
                   tokens=r['tokens'], shape=kw, bound=bound['bound'], tile_bound=bound['tile_bound'], tile=tile,
                   speedup=speedup, cpu_speedup=cpu_speedup, fraction=speedup / bound['bound'],
                   tile_fraction=speedup / bound['tile_bound'], vs={})
        for o in ratios:
            if (o['subject'], o['mode'], o['precision'], o['size'], o['shape']) == (
                    r['subject'], r['mode'], r['precision'], r['size'], kw) and o['anchor'] != dense and o.get('time'):
                row['vs'][o['anchor']] = 1 / o['time']
        out.append(row)
    return out


def growth_per_4x(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per subject, mode and precision measured at 2+ token counts (other shape keys equal): the factor time
    (and allocator peak) grows by per 4x tokens, over the whole range, (t_last / t_first) ** (log 4 / log(N_last /
    N_first)) (the geometric mean of the steps; less noisy than one step), and each step's own factor."""
    groups: Dict[Tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        if 'ms' in r and r['tokens']:
            key = (r['subject'], r['mode'], r['precision'], json.dumps(r['shape'], sort_keys=True))
            groups.setdefault(key, []).append(r)
    out = []
    for (subject, mode, precision, _), own in groups.items():
        own = sorted(own, key=lambda r: r['tokens'])
        if len(own) < 2 or own[0]['tokens'] == own[-1]['tokens']:
            continue

        def per_4x(a, b, key):
            if not a.get(key) or not b.get(key):
                return None
            return (b[key] / a[key]) ** (math.log(4) / math.log(b['tokens'] / a['tokens']))

        out.append(dict(subject=subject, mode=mode, precision=precision, sizes=[r['size'] for r in own],
                        time=per_4x(own[0], own[-1], 'ms'), peak_alloc=per_4x(own[0], own[-1], 'peak_alloc_mib'),
                        steps=[per_4x(a, b, 'ms') for a, b in zip(own, own[1:])]))
    return out


def _suite_path(suite: Suite) -> Optional[str]:
    """The suite file: bench/suites/... for a built-in one, else as given."""
    from .suite import SUITE_DIR
    if suite.path and os.path.abspath(suite.path).startswith(SUITE_DIR + os.sep):
        return os.path.join('bench', 'suites', os.path.relpath(os.path.abspath(suite.path), SUITE_DIR))
    return suite.path


def _meta(suite: Suite, memory: bool, command: Optional[str]) -> Dict[str, Any]:
    import timm
    import torch
    p = copy.deepcopy(suite.params)
    memory_text = None
    if memory and p['device'] == 'cpu':
        memory_text = ('one call in a clean child process per entry: peak_rss_mib = VmHWM after - VmRSS before '
                       '(high-water mark reset through /proc/self/clear_refs); peak_alloc_mib = peak bytes the '
                       'PyTorch allocator hands out beyond prior allocations (torch.profiler events); cached_mib = '
                       'what the first call keeps (index tables)')
    elif p['device'] == 'cuda':
        memory_text = 'torch.cuda.max_memory_allocated during one call above the memory allocated before it'
    return dict(
        suite=suite.stem, title=p['title'], description=p['description'], kind=suite.kind,
        speed_of_light=p['speed_of_light'], path=_suite_path(suite),
        command=command,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        device=p['device'], threads=torch.get_num_threads(), repeats=p['repeats'], warmup=p['warmup'],
        min_time=p['min_time'], modes=p['modes'], precisions=p['precisions'], batch=p['batch'],
        dim=p['dim'] if suite.kind == 'mixers' else None, num_heads=p['num_heads'] if suite.kind == 'mixers' else None,
        torch=torch.__version__, timm=timm.__version__, python=platform.python_version(),
        platform=platform.platform(), cpu=cpu_name(), cpu_count=os.cpu_count(),
        gpu=torch.cuda.get_device_name() if p['device'] == 'cuda' else None,
        timing='median over interleaved repeats of wall and process CPU ms per call; fwd: eval, no autograd; '
               'fwdbwd: ops / mixers forward + gradients of inputs and parameters, models a training step '
               '(cross-entropy, backward, AdamW)',
        memory=memory_text,
        flops='torch FlopCounterMode of one forward call (+ CPU SDPA formula); 1 multiply-add = 2 FLOPs',
        ratios='ours / anchor from the same run: < 1 means ours is faster / smaller',
    )
