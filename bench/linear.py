"""Linear attention on CPU: every variant's mixer against window and global softmax attention as the token count
grows, and a training step of each linear-attention backbone against Swin-T.

    python -m zoo.bench.linear [--parts mixers models] [--sizes 28 56 112] [--repeats 5] [--threads 1]
                               [--batch 8] [--out DIR]
    zoo bench linear ...

mixers  C=--dim, --num-heads heads (default 96, 3 x 32: stage 1 of the Swin-T family), batch 1, fp32, on S x S
        maps for S in --sizes: `create_mixer('linear', dim, num_heads=..., variant=v)` for every registered
        variant (official defaults otherwise), the 'window' mixer (window 7) and global softmax attention (the
        'global' mixer, O(N^2) time; skipped above --global-max-tokens). Forward (eval, no_grad) and forward +
        backward (grads of the input and every parameter) ms, all mixers of one size in ONE run (interleaved
        repeats, median); peak memory of each; and per mixer the time ratio from S/2 x S/2 to S x S (4x the
        tokens: ~4 for O(N), ~16 for O(N^2)).
models  a training step (forward, cross-entropy, backward, AdamW step) and an eval forward at --img-size,
        batch --batch, of every registered linear-attention backbone among flatten_swin_tiny, inline_swin_tiny,
        mala_tiny, l2vit_tiny, with swin_tiny as the anchor, interleaved in one run; params and peak memory.
        --reduced builds each at its family's reduced test width (`zoo.reduced_args`), one run per model: a
        check of the script, not a comparison.

Peak memory: bytes PyTorch's CPU allocator hands out during one call beyond what was allocated before
(torch.profiler allocation events, `zoo.bench.mixers.peak_allocated`). Writes DIR/linear.{json,md,png}.
"""
import argparse
import datetime
import json
import math
import os
import platform
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

from .agent import _f, _median_ms, _mib

__all__ = ['main', 'build_parser', 'MODELS', 'ANCHOR']

PARTS = ('mixers', 'models')
MODELS = ('flatten_swin_tiny', 'inline_swin_tiny', 'mala_tiny', 'l2vit_tiny')
ANCHOR = 'swin_tiny'


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog or 'python -m zoo.bench.linear', description=__doc__.split('\n')[0])
    p.add_argument('--parts', nargs='+', choices=PARTS, default=list(PARTS), help='what to run (default: all)')
    p.add_argument('--sizes', type=int, nargs='+', default=[28, 56, 112], help='mixer map sides (default 28 56 112)')
    p.add_argument('--dim', type=int, default=96, help='mixer channels (default 96)')
    p.add_argument('--num-heads', type=int, default=3, help='mixer heads (default 3)')
    p.add_argument('--variants', nargs='+', default=None, help='linear variants (default: every registered one)')
    p.add_argument('--global-max-tokens', type=int, default=112 * 112, help='skip global attention above this')
    p.add_argument('--batch', type=int, default=8, help='model batch size (default 8)')
    p.add_argument('--img-size', type=int, default=224, help='model input size (default 224)')
    p.add_argument('--reduced', action='store_true', help="models at their family's reduced test width")
    p.add_argument('--repeats', type=int, default=5, help='interleaved repeats, median reported (default 5)')
    p.add_argument('--threads', type=int, default=1, help='torch threads (default 1)')
    p.add_argument('--no-plot', action='store_true', help='skip the PNG plot')
    p.add_argument('--out', default=None, help='output folder (default: work_dirs/bench/<time>/)')
    return p


# ------------------------------------------------------------------------------------------------ mixers

def _mixers(args) -> Dict[str, Callable[[], Any]]:
    """Builders of the compared mixers, by row name: linear/<variant>, window, global."""
    from zoo.blocks import create_mixer
    from zoo.blocks.linear import list_variants
    dim, heads = args.dim, args.num_heads
    builders = {f'linear/{v}': (lambda v=v: create_mixer('linear', dim, num_heads=heads, variant=v))
                for v in args.variants or list_variants()}
    builders['window'] = lambda: create_mixer('window', dim, num_heads=heads, window_size=7)
    builders['global'] = lambda: create_mixer('global', dim, num_heads=heads)
    return builders


def bench_mixers(args) -> List[Dict[str, Any]]:
    import torch

    from .mixers import _passes
    rows: List[Dict[str, Any]] = []
    builders = _mixers(args)
    for size in args.sizes:
        torch.manual_seed(0)
        names = [n for n in builders if n != 'global' or size * size <= args.global_max_tokens]
        passes = {}
        for name in names:
            passes[f'{name}/fwd'], passes[f'{name}/fwdbwd'] = _passes(builders[name](), size, args.dim)
        print(f'[bench linear] {len(names)} mixers at {size}x{size}', file=sys.stderr, flush=True)
        times = _median_ms(passes, args.repeats)
        for name in builders:
            if name not in names:
                rows.append(dict(mixer=name, size=size, tokens=size * size, skipped='> --global-max-tokens'))
                continue
            rows.append(dict(mixer=name, size=size, tokens=size * size, fwd_ms=times[f'{name}/fwd'],
                             fwdbwd_ms=times[f'{name}/fwdbwd'], fwd_peak_mib=_mib(passes[f'{name}/fwd']),
                             fwdbwd_peak_mib=_mib(passes[f'{name}/fwdbwd'])))
    _add_ratios(rows)
    return rows


def _add_ratios(rows: List[Dict[str, Any]]) -> None:
    """Per mixer and size S, time(S) / time(S / 2): the cost of 4x the tokens (where S / 2 was measured)."""
    by_key = {(r['mixer'], r['size']): r for r in rows if not r.get('skipped')}
    for (name, size), r in by_key.items():
        prev = by_key.get((name, size // 2)) if size % 2 == 0 else None
        if prev is not None:
            for key in ('fwd', 'fwdbwd'):
                r[f'{key}_ratio_4x'] = r[f'{key}_ms'] / prev[f'{key}_ms']
                r[f'{key}_peak_ratio_4x'] = (r[f'{key}_peak_mib'] / prev[f'{key}_peak_mib']
                                             if prev[f'{key}_peak_mib'] else None)


def growth(rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    """Per mixer, the time ratio per 4x tokens over its whole measured range (smallest to largest size, sizes
    doubling): (time(S_max) / time(S_min)) ** (1 / doublings), the geometric mean of the steps, for fwd and fwd+bwd.
    Less noisy than one step; the steps show where the growth is."""
    out = {}
    for name in dict.fromkeys(r['mixer'] for r in rows):
        own = sorted((r for r in rows if r['mixer'] == name and not r.get('skipped')), key=lambda r: r['size'])
        if len(own) < 2:
            continue
        doublings = math.log2(own[-1]['size'] / own[0]['size'])
        out[name] = {key: (own[-1][f'{key}_ms'] / own[0][f'{key}_ms']) ** (1 / doublings) for key in ('fwd', 'fwdbwd')}
        out[name]['range'] = f"{own[0]['size']}^2..{own[-1]['size']}^2"
    return out


# ------------------------------------------------------------------------------------------------ models

def bench_models(args) -> List[Dict[str, Any]]:
    """Every registered linear backbone and the anchor in one interleaved run (`zoo.bench.agent.bench_models`);
    with --reduced, each at its own reduced width, one run per model (a check of the script, not a comparison)."""
    import zoo

    from .agent import bench_models as time_models
    registered = set(zoo.list_zoo_models())
    names = [n for n in MODELS if n in registered] + [ANCHOR]
    print(f'[bench linear] models {names}', file=sys.stderr, flush=True)
    if args.reduced:
        rows = [row for n in names
                for row in time_models(argparse.Namespace(**dict(vars(args), models=[n],
                                                                 model_kwargs=zoo.reduced_args(n))))]
    else:
        rows = time_models(argparse.Namespace(**dict(vars(args), models=names, model_kwargs={})))
    for row in rows:
        row['train_vs_anchor'] = row['train_ms'] / rows[-1]['train_ms']
    return rows


# ------------------------------------------------------------------------------------------------ output

def markdown(result: Dict[str, Any]) -> str:
    meta, lines = result['meta'], []
    head = (f"CPU, {meta['threads']} thread(s), fp32, median of {meta['repeats']} interleaved repeats; torch "
            f"{meta['torch']}, {meta['cpu']}.")
    if result.get('mixers'):
        lines += [f"Mixers alone: C={meta['dim']}, {meta['num_heads']} heads, batch 1; linear variants with their "
                  f"official defaults, window = Swin window attention (7 x 7), global = softmax attention over all "
                  f"tokens. x4 tokens: time at S x S over time at S/2 x S/2. {head}", '',
                  '| mixer | tokens | fwd ms | fwd+bwd ms | x4 tokens: fwd+bwd time | peak fwd (MiB) | '
                  'peak fwd+bwd (MiB) |',
                  '|---|---:|---:|---:|---:|---:|---:|']
        for r in result['mixers']:
            if r.get('skipped'):
                lines.append(f"| {r['mixer']} | {r['size']}^2 | skipped | | | | |")
                continue
            ratio = r.get('fwdbwd_ratio_4x')
            lines.append(f"| {r['mixer']} | {r['size']}^2 | {_f(r['fwd_ms'], 2)} | {_f(r['fwdbwd_ms'], 2)} | "
                         f"{'-' if ratio is None else f'{ratio:.2f}x'} | {_f(r['fwd_peak_mib'])} | "
                         f"{_f(r['fwdbwd_peak_mib'])} |")
        lines += ['', 'Time per 4x tokens over the whole range (geometric mean of the steps above):', '',
                  '| mixer | range | fwd | fwd+bwd |', '|---|---|---:|---:|']
        for name, g in growth(result['mixers']).items():
            lines.append(f"| {name} | {g['range']} | {g['fwd']:.2f}x | {g['fwdbwd']:.2f}x |")
        lines.append('')
    if result.get('models'):
        width = ' (reduced widths)' if meta['reduced'] else ''
        lines += [f"Backbones{width} at {meta['img_size']} px, batch {meta['batch']}: training step (forward, "
                  f"cross-entropy, backward, AdamW) and eval forward. {head}", '',
                  '| model | params (M) | train step ms | vs swin_tiny | fwd ms | peak train (MiB) | peak fwd (MiB) |',
                  '|---|---:|---:|---:|---:|---:|---:|']
        for r in result['models']:
            lines.append(f"| {r['model']} | {r['params_m']:.2f} | {_f(r['train_ms'])} | "
                         f"{r['train_vs_anchor']:.2f}x | {_f(r['fwd_ms'])} | {_f(r['train_peak_mib'])} | "
                         f"{_f(r['fwd_peak_mib'])} |")
        lines.append('')
    return '\n'.join(lines)


def _plot(result: Dict[str, Any], path: str) -> None:
    """Log-log fwd+bwd time and peak memory of every mixer against tokens."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    from matplotlib import ticker

    from .mixers import _plain_log_formatter
    from .run import save_figure
    plain = _plain_log_formatter()
    sizes = result['meta']['sizes']
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    names = list(dict.fromkeys(r['mixer'] for r in result['mixers']))
    for ax, (key, label) in zip(axes, (('fwdbwd_ms', 'forward + backward, ms'),
                                       ('fwdbwd_peak_mib', 'forward + backward peak memory, MiB'))):
        for name in names:
            pts = [(r['tokens'], r[key]) for r in result['mixers'] if r['mixer'] == name and r.get(key)]
            if pts:
                ax.plot(*zip(*pts), marker='o', markersize=4, label=name,
                        linestyle='-' if name.startswith('linear/') else '--')
        ax.set_xscale('log')
        ax.set_yscale('log')
        ax.set_xticks([s * s for s in sizes], [f'{s * s}\n({s}x{s})' for s in sizes], fontsize=8)
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        for which in ('major', 'minor'):
            getattr(ax.yaxis, f'set_{which}_formatter')(plain(labelOnlyBase=False, minor_thresholds=(1.5, 0.6)))
        ax.tick_params(axis='y', which='both', labelsize=8)
        ax.set_xlabel('tokens N = H x W')
        ax.set_title(label, fontsize=10)
        ax.grid(True, which='both', alpha=0.25)
    axes[0].legend(fontsize=8)
    meta = result['meta']
    fig.suptitle(f"linear attention vs window / global on CPU: C={meta['dim']}, {meta['num_heads']} heads, batch 1, "
                 f"fp32, {meta['threads']} thread(s)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    from .run import _cpu_name, _write_atomic, default_out_dir
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if min([args.batch, args.repeats, args.threads, args.dim, args.num_heads] + args.sizes) < 1:
        parser.error('--batch, --repeats, --threads, --dim, --num-heads and --sizes must be positive')
    if args.dim % args.num_heads:
        parser.error(f'--num-heads: expected a divisor of --dim {args.dim}, got {args.num_heads}')
    from zoo.blocks.linear import list_variants
    unknown = sorted(set(args.variants or ()) - set(list_variants()))
    if unknown:
        parser.error(f'--variants: unknown {unknown}; registered variants: {list(list_variants())}')
    args.sizes = sorted(set(args.sizes))
    import torch
    torch.set_num_threads(args.threads)
    result: Dict[str, Any] = dict(meta=dict(
        command=' '.join([parser.prog] + list(sys.argv[1:] if argv is None else argv)),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        sizes=args.sizes, dim=args.dim, num_heads=args.num_heads, img_size=args.img_size, batch=args.batch,
        reduced=args.reduced, repeats=args.repeats, threads=torch.get_num_threads(), torch=torch.__version__,
        python=platform.python_version(), cpu=_cpu_name()))
    if 'mixers' in args.parts:
        result['mixers'] = bench_mixers(args)
    if 'models' in args.parts:
        result['models'] = bench_models(args)
    out_dir = args.out or default_out_dir()
    os.makedirs(out_dir, exist_ok=True)
    table = markdown(result)
    base = os.path.join(out_dir, 'linear')
    _write_atomic(base + '.json', json.dumps(result, indent=2) + '\n')
    _write_atomic(base + '.md', table + '\n')
    written = [base + '.json', base + '.md']
    if result.get('mixers') and not args.no_plot:
        try:
            _plot(result, base + '.png')
            written.append(base + '.png')
        except ImportError:
            print('[bench linear] matplotlib missing: no PNG', file=sys.stderr)
    print(table)
    print(f"wrote {', '.join(written)}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
