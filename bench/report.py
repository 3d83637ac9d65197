"""One output format and one writer: DIR/<suite>.json (everything), DIR/<suite>.md (the tables) and
DIR/<suite>.png (scaling sweeps: log-log time and memory against tokens; single sizes: bars), written atomically.

Tables: measurements (one row per subject, size and mode; a column group per precision, each anchor right
after the subjects it anchors), ours / anchor ratios from the same run, and for sweeps the growth per 4x tokens.
"""
import json
import math
import os
from typing import Any, Dict, List, Optional

from zoo.weights.io import atomic_write

__all__ = ['markdown', 'write_results', 'fmt']


def fmt(value: Optional[float]) -> str:
    """3 significant digits, no exponent for the usual range; '-' for None."""
    if value is None:
        return '-'
    if value == 0:
        return '0'
    digits = max(0, 2 - int(math.floor(math.log10(abs(value)))))
    return f'{value:.{digits}f}'


def _ordered(result: Dict[str, Any]) -> List[str]:
    """Entry labels in table order: each subject, then its anchor (once), then the other anchors."""
    entries = result['entries']
    roles = {e['label']: e for e in entries}
    order: List[str] = []
    for e in entries:
        if e['role'] == 'subject':
            for label in [e['label']] + list(e['anchor'] or ()):
                if label and label in roles and label not in order:
                    order.append(label)
    return order + [e['label'] for e in entries if e['label'] not in order]


def _size(result: Dict[str, Any], row: Dict[str, Any]) -> str:
    if result['meta']['kind'] == 'models':
        return f"{row['size']} px, batch {row['shape']['batch']}"
    varying = {k for k in row['shape'] if len({json.dumps(r['shape'].get(k)) for r in result['rows']}) > 1}
    extra = ', '.join(f'{k} {v}' for k, v in row['shape'].items() if k in varying)
    return f"{row['size']}x{row['size']}" + (f' ({extra})' if extra else '')


def _memory_key(result: Dict[str, Any]) -> str:
    """The memory column of the tables: models the RSS rise (workspaces outside the allocator count), ops and
    mixers the allocator peak (exact tensor bytes); the JSON has both."""
    return 'peak_rss_mib' if result['meta']['kind'] == 'models' and result['meta']['device'] == 'cpu' \
        else 'peak_alloc_mib'


def markdown(result: Dict[str, Any]) -> str:
    meta, rows = result['meta'], result['rows']
    precisions = meta['precisions']
    models = meta['kind'] == 'models'
    mem_key = _memory_key(result)
    mem_name = 'peak RSS MiB' if mem_key == 'peak_rss_mib' else 'peak MiB'
    threads = f"{meta['threads']} thread{'s' if meta['threads'] != 1 else ''}"
    device = meta['gpu'] or meta['cpu']
    lines = [f"**{meta['title'] or meta['suite']}**", '']
    if meta['description']:
        lines += [meta['description'], '']
    lines += [f"{meta['device'].upper()} ({device}), {threads}, median of {meta['repeats']} interleaved repeats; "
              f"torch {meta['torch']}, timm {meta['timm']}. ms: wall time per call (CPU ms: process CPU time, all "
              f"threads). fwd: eval forward; fwdbwd: " + ('a training step (forward, cross-entropy, backward, '
                                                          'AdamW)' if models else 'forward + backward') +
              f". {mem_name}: " + ('rise of the resident set during one call, clean process' if
                                   mem_key == 'peak_rss_mib' else 'peak memory allocated during one call beyond '
                                                                  'its inputs and weights') +
              ('.' if meta['memory'] else ' (not measured).'), '']

    head = ['subject', 'size', 'mode', 'params (M)', 'GMACs / img' if models else 'GFLOPs']
    for prec in precisions:
        head += [f'{prec} ms', f'{prec} CPU ms'] + ([f'{prec} img/s'] if models else []) + [f'{prec} {mem_name}']
    lines += ['| ' + ' | '.join(head) + ' |', '|---|---|---|' + '---:|' * (len(head) - 3)]
    by_key = {(r['subject'], r['mode'], r['precision'], r['size'], json.dumps(r['shape'], sort_keys=True)): r
              for r in rows}
    shapes = list(dict.fromkeys((r['size'], json.dumps(r['shape'], sort_keys=True)) for r in rows))
    errors = []
    for size, shape in shapes:
        for label in _ordered(result):
            for mode in meta['modes']:
                cells = [by_key.get((label, mode, p, size, shape)) for p in precisions]
                if not any(cells):
                    continue
                first = next(c for c in cells if c)
                measured = next((c for c in cells if c and 'ms' in c), None)
                flops = measured.get('flops') if measured else None
                params = measured.get('params') if measured else None
                work = flops / 2 / first['shape']['batch'] if models and flops else flops  # timm's GMACs / image
                line = [label, _size(result, first), mode, fmt(params / 1e6 if params else None),
                        fmt(work / 1e9 if work else None)]
                for c in cells:
                    if c is None or 'ms' not in c:
                        note = '-' if c is None else ('skipped' if c.get('skipped') else 'error')
                        if c is not None and c.get('error'):
                            errors.append(f"{label} {mode} {c['precision']} {_size(result, c)}: {c['error']}")
                        line += [note] + ['-'] * (3 if models else 2)
                        continue
                    line += [fmt(c['ms']), fmt(c['cpu_ms'])] + ([fmt(c['img_s'])] if models else []) + \
                        [fmt(c.get(mem_key))]
                lines.append('| ' + ' | '.join(line) + ' |')

    if result['ratios']:
        lines += ['', 'ours / anchor, same run (< 1: ours faster / smaller):', '']
        head = ['ours', 'anchor', 'size', 'mode']
        for prec in precisions:
            head += [f'{prec} time', f'{prec} CPU time', f'{prec} memory']
        head += ['FLOPs', 'params'] + (['max abs diff'] if meta['kind'] == 'ops' else [])
        lines += ['| ' + ' | '.join(head) + ' |', '|---|---|---|---|' + '---:|' * (len(head) - 4)]
        mem_ratio = 'peak_rss' if mem_key == 'peak_rss_mib' else 'peak_alloc'
        ratio_by = {(r['subject'], r['anchor'], r['mode'], r['precision'], r['size'],
                     json.dumps(r['shape'], sort_keys=True)): r for r in result['ratios']}
        done = set()
        for r in result['ratios']:
            shape = json.dumps(r['shape'], sort_keys=True)
            key = (r['subject'], r['anchor'], r['mode'], r['size'], shape)
            if key in done:
                continue
            done.add(key)
            cells = [ratio_by.get((r['subject'], r['anchor'], r['mode'], p, r['size'], shape)) for p in precisions]
            line = [r['subject'], r['anchor'], _size(result, r), r['mode']]
            for c in cells:
                line += ['-'] * 3 if c is None else [fmt(c['time']), fmt(c['cpu_time']), fmt(c[mem_ratio])]
            line += [fmt(r['flops']), fmt(r['params'])]
            if meta['kind'] == 'ops':
                diffs = [c['max_abs_diff'] for c in cells if c and c.get('max_abs_diff') is not None]
                line.append(', '.join(f'{d:.1e}' for d in diffs) or '-')
            lines.append('| ' + ' | '.join(line) + ' |')

    if result['growth']:
        lines += ['', 'Growth per 4x tokens over the measured range ((t_last / t_first) ** (log 4 / log(N_last / '
                  'N_first)); ~4 for O(N), ~16 for O(N^2)); steps: each size to the next:', '',
                  '| subject | mode | precision | sizes | time per 4x tokens | memory per 4x tokens | steps |',
                  '|---|---|---|---|---:|---:|---|']
        for g in result['growth']:
            steps = ', '.join(fmt(s) for s in g['steps'])
            lines.append(f"| {g['subject']} | {g['mode']} | {g['precision']} | "
                         f"{g['sizes'][0]}^2..{g['sizes'][-1]}^2 | {fmt(g['time'])}x | "
                         f"{fmt(g['peak_alloc']) + 'x' if g['peak_alloc'] else '-'} | {steps} |")
    if result.get('bounds'):
        lines += _bounds_markdown(result)
    if errors:
        lines += ['', 'Errors:', ''] + [f'- {e}' for e in errors]
    return '\n'.join(lines) + '\n'


def _config(row: Dict[str, Any]) -> str:
    """'56x56 k7 s2' (or '8x32x32 ...') of a bounds row."""
    kw = row['shape']
    size = (f"{kw['depth']}x" if kw.get('depth') else '') + f"{row['size']}x{row['size']}"
    extra = ''.join(f' {short}{kw[key]}' for key, short in (('dilation', 'd'), ('is_causal', 'causal '))
                    if kw.get(key) not in (None, 1, False))
    return f"{size} k{kw.get('kernel_size', 7)} s{kw.get('stride', 1)}{extra}"


def _bounds_markdown(result: Dict[str, Any]) -> List[str]:
    """The speed-of-light table: analytic bounds, measured speed-up over the dense anchor, fraction realised."""
    bounds = result['bounds']
    tile = bounds[0]['tile']
    anchors = sorted({a for b in bounds for a in b['vs']})
    dense = result['meta'].get('speed_of_light') or 'dense'
    lines = ['', f'Speed of light (same run): bound = N^2 / unmasked pairs (N / K); tile bound = the same with '
                 f'{tile}-per-axis box tiles; speed-up = {dense} time / ours (wall; CPU time in brackets); % = '
                 f'speed-up / bound. ' + (f'x {", ".join(anchors)}: ours faster by (its time / ours).' if anchors
                                         else ''), '']
    head = ['subject', 'config', 'mode', 'bound', 'tile bound', 'speed-up', '% of bound', '% of tile bound']
    head += [f'x {a}' for a in anchors]
    lines += ['| ' + ' | '.join(head) + ' |', '|---|---|---|' + '---:|' * (len(head) - 3)]
    for b in bounds:
        cpu = f" ({fmt(b['cpu_speedup'])})" if b.get('cpu_speedup') else ''
        line = [b['subject'], _config(b), b['mode'] + ('' if b['precision'] == 'fp32' else ' ' + b['precision']),
                fmt(b['bound']), fmt(b['tile_bound']), fmt(b['speedup']) + cpu, f"{100 * b['fraction']:.1f}",
                f"{100 * b['tile_fraction']:.0f}"]
        line += [fmt(b['vs'][a]) if a in b['vs'] else '-' for a in anchors]
        lines.append('| ' + ' | '.join(line) + ' |')
    return lines


def _plot_bounds(result: Dict[str, Any], path: str) -> None:
    """Bound vs measured speed-up per configuration (log scale), one panel per mode."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    modes = list(dict.fromkeys(b['mode'] for b in result['bounds']))
    fig, axes = plt.subplots(len(modes), 1, figsize=(11, 3.6 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        rows = [b for b in result['bounds'] if b['mode'] == mode]
        x = range(len(rows))
        ax.bar([i - 0.27 for i in x], [b['bound'] for b in rows], 0.27, label='bound (N / K)', color='tab:gray')
        ax.bar(list(x), [b['tile_bound'] for b in rows], 0.27, label=f"tile bound ({rows[0]['tile']}-box)",
               color='tab:olive')
        ax.bar([i + 0.27 for i in x], [b['speedup'] for b in rows], 0.27, label='measured', color='tab:blue')
        ax.set_yscale('log')
        ax.set_xticks(list(x), [f"{b['subject']}\n{_config(b)}" for b in rows], fontsize=6, rotation=90)
        ax.set_ylabel('speed-up over dense attention')
        ax.set_title(mode, fontsize=9)
        ax.grid(True, axis='y', which='both', alpha=0.25)
        ax.legend(fontsize=7)
    _save(fig, path)


def _plot(result: Dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    class _PlainLog(ticker.LogFormatter):
        def __call__(self, x, pos=None):
            return f'{x:g}' if super().__call__(x, pos) else ''

    meta, rows = result['meta'], [r for r in result['rows'] if 'ms' in r]
    order = _ordered(result)
    sweep = bool(result['growth'])
    mem_key = _memory_key(result)
    if sweep:
        panels = [(mode, 'ms', f'{mode}, ms') for mode in meta['modes']]
        if any(r.get(mem_key) for r in rows):
            panels.append((meta['modes'][-1], mem_key, f'{meta["modes"][-1]} peak memory, MiB'))
        fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
        for ax, (mode, key, title) in zip(axes[0], panels):
            for label in order:
                for prec in meta['precisions']:
                    pts = sorted((r['tokens'], r[key]) for r in rows if r['subject'] == label and r['mode'] == mode
                                 and r['precision'] == prec and r.get(key))
                    if pts:
                        name = label if len(meta['precisions']) == 1 else f'{label} {prec}'
                        ax.plot(*zip(*pts), marker='o', markersize=4, label=name,
                                linestyle='--' if any(e['label'] == label and e['role'] == 'anchor'
                                                      for e in result['entries']) else '-')
            ax.set_xscale('log')
            ax.set_yscale('log')
            sizes = sorted({r['size'] for r in rows})
            ax.set_xticks([s * s for s in sizes], [f'{s * s}\n({s}x{s})' for s in sizes], fontsize=8)
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            for which in ('major', 'minor'):  # plain numbers, on the ticks matplotlib's LogFormatter labels
                getattr(ax.yaxis, f'set_{which}_formatter')(_PlainLog(labelOnlyBase=False, minor_thresholds=(1.5, 0.6)))
            ax.tick_params(axis='y', which='both', labelsize=8)
            ax.set_xlabel('tokens N = H x W')
            ax.set_title(title, fontsize=10)
            ax.grid(True, which='both', alpha=0.25)
        axes[0][0].legend(fontsize=7)
    else:
        bars = [(f"{r['subject']} {r['mode']} {r['precision']}", r['ms'], r['anchor'] is None)
                for label in order for r in rows if r['subject'] == label]
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(bars) + 1.5))
        ax.barh(range(len(bars)), [b[1] for b in bars], color=['tab:gray' if b[2] else 'tab:blue' for b in bars])
        ax.set_yticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel('ms per call (lower is better; gray: anchors and unpaired)')
        for i, b in enumerate(bars):
            ax.text(b[1], i, f' {fmt(b[1])}', va='center', fontsize=7)
    threads = f"{meta['threads']} thread{'s' if meta['threads'] != 1 else ''}"
    fig.suptitle(f"{meta['title'] or meta['suite']} ({meta['device']}, {threads})", fontsize=9)
    _save(fig, path)


def _save(fig, path: str) -> None:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    try:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, dpi=110, format='png')
    finally:
        plt.close(fig)


def _write_text(path: str, text: str) -> None:
    with atomic_write(path) as tmp, open(tmp, 'w') as f:
        f.write(text)


def write_results(result: Dict[str, Any], out_dir: str, stem: str, plot: bool = True) -> List[str]:
    """Write out_dir/stem.json, .md and (with matplotlib, if `plot`) .png atomically; return the paths."""
    base = os.path.join(out_dir, stem)
    _write_text(base + '.json', json.dumps(result, indent=1) + '\n')
    _write_text(base + '.md', markdown(result))
    written = [base + '.json', base + '.md']
    if plot and result['rows']:
        try:
            _plot(result, base + '.png')
            written.append(base + '.png')
            if result.get('bounds'):
                _plot_bounds(result, base + '_bounds.png')
                written.append(base + '_bounds.png')
        except ImportError:
            pass
    return written
