"""`zoo bench`: run benchmark suites.

    zoo bench --list                                  # the suites
    zoo bench models                                  # the default models suite (zoo vs timm, fp32 and bf16)
    zoo bench mixers linear --threads 1 --repeats 9   # a built-in suite by name
    zoo bench models swin_tiny=swin_tiny_patch4_window7_224 --img-size 160
    zoo bench ops my_suite.toml                       # a suite file
    zoo bench gpu                                     # the Triton kernels vs reference and SDPA (needs CUDA)

Each suite writes DIR/<group>_<suite>.{json,md,png}; DIR is --out, or a new work_dirs/bench/<UTC time>/
(the committed bench/results are written only when --out names them). Exit codes: 0 measured; 1 an item
failed (its row says why); 2 bad input (one line, nothing written) or a GPU suite on a machine without CUDA.
"""
import argparse
import datetime
import os
import sys
from typing import List, Optional, Sequence

from .suite import GROUPS, Suite, SuiteError, find_suite, list_suites, load_suite, suite_from_names

__all__ = ['main', 'default_out_dir', 'build_parser']


def default_out_dir(stamp: Optional[str] = None) -> str:
    """A new folder per run, work_dirs/bench/<UTC timestamp>: runs never overwrite the committed bench/results."""
    stamp = stamp or datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%d_%H%M%S')
    return os.path.join('work_dirs', 'bench', stamp)


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog or 'zoo bench', description='Time, memory, FLOPs and params of ops, mixers and models against '
                                              'their anchors, from declarative suites (`--list`).',
        epilog='exit codes: 0 measured; 1 an item failed (its row says why); 2 bad input (one line, nothing '
               'written) or a GPU suite on a machine without CUDA')
    p.add_argument('group', nargs='?', choices=GROUPS, help='suite group')
    p.add_argument('targets', nargs='*', metavar='SUITE|NAME',
                   help="built-in suite names (first), suite .toml files, or registry names ('OURS=ANCHOR' pairs "
                        'them); default: the group\'s "default" suite, else all its suites')
    p.add_argument('--list', action='store_true', help='list the built-in suites and exit')
    p.add_argument('--threads', type=int, help='torch intra-op threads (default: the suite\'s)')
    p.add_argument('--repeats', type=int, help='interleaved timed repeats, median reported')
    p.add_argument('--warmup', type=int, help='untimed calls per item first')
    p.add_argument('--min-time', type=float, help='seconds one timed sample lasts at least')
    p.add_argument('--precision', nargs='+', choices=('fp32', 'bf16', 'fp16'), help='precisions to measure')
    p.add_argument('--modes', nargs='+', choices=('fwd', 'fwdbwd'), help='fwd, fwdbwd (models: a training step)')
    p.add_argument('--sizes', nargs='+', type=int, help='map sides S (S x S tokens) or model input sizes')
    p.add_argument('--batch', type=int, help='batch size')
    p.add_argument('--device', choices=('cpu', 'cuda'), help="override the suite's device (GPU suites on CPU "
                                                             'need TRITON_INTERPRET=1 and tiny sizes)')
    p.add_argument('--no-memory', action='store_true', help='skip the peak-memory processes')
    p.add_argument('--no-plot', action='store_true', help='skip the PNG')
    p.add_argument('--out', metavar='DIR', help=f'output folder (default: a new {default_out_dir("<time>")})')
    return p


_OVERRIDES = (('threads', 'threads'), ('repeats', 'repeats'), ('warmup', 'warmup'), ('min_time', 'min_time'),
              ('precision', 'precisions'), ('modes', 'modes'), ('sizes', 'sizes'), ('batch', 'batch'),
              ('device', 'device'))


def _suites(args: argparse.Namespace) -> List[Suite]:
    """The suites the arguments name, overrides applied and checked (raises SuiteError)."""
    from .suite import build_suite
    group = args.group
    suites, names = [], []
    for target in args.targets:
        path = find_suite(group, target)
        if path is not None:
            suites.append(load_suite(path, group))
        else:
            names.append(target)
    if names:
        default = find_suite(group, 'default')
        suites.append(suite_from_names(group, names, load_suite(default, group) if default else None))
    if not args.targets:
        available = [n for g, n, _ in list_suites() if g == group]
        chosen = ['default'] if 'default' in available else available
        suites = [load_suite(find_suite(group, n), group) for n in chosen]
    out = []
    for s in suites:
        data = {k: v for k, v in s.params.items()}
        for flag, key in _OVERRIDES:
            value = getattr(args, flag)
            if value is not None:
                if key == 'sizes' and any(isinstance(x, dict) for x in data['sizes']):
                    value = [dict(data['sizes'][0], size=v) for v in value]  # first shape's heads, at new sizes
                data[key] = value
        if args.no_memory:
            data['memory'] = False
        data['subjects'] = [_entry_data(e) for e in s.entries if not e.is_anchor]
        data['anchors'] = [_entry_data(e) for e in s.entries if e.is_anchor]
        data.pop('every_mixer')
        data.pop('anchor')
        where = f'{s.path or "command line"} (with the command-line options)'
        out.append(build_suite(data, s.name, group, where, s.path))
    return out


def _entry_data(e) -> dict:
    return {k: v for k, v in dict(name=e.name, label=e.label, kwargs=e.kwargs, anchor=e.anchor, patch=e.patch,
                                  modes=e.modes, max_tokens=e.max_tokens, reduced=e.reduced).items()
            if v not in (None, {}, False)}


def _check_out(out: Optional[str]) -> str:
    if out is None:
        return default_out_dir()
    if os.path.exists(out) and not os.path.isdir(out):
        raise SuiteError(f'--out: expected a folder, got the file {out!r}')
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise SuiteError(f'--out: the folder {parent!r} that would hold {out!r} does not exist (create it first)')
    return out


def _list() -> str:
    rows = list_suites()
    width = max(len(f'{g} {n}') for g, n, _ in rows)
    lines = [f"{f'{g} {n}':<{width}}  {t}" for g, n, t in rows]
    return '\n'.join(['suite (run: zoo bench GROUP SUITE)'.ljust(width) + '  title'] + lines)


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Run the suites the arguments name; print each table; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    prog = parser.prog
    if args.list:
        print(_list())
        return 0
    if args.group is None:
        parser.error('expected a group (models, mixers, ops, gpu) or --list')
    try:
        for flag, low in (('threads', 1), ('repeats', 1), ('warmup', 0), ('batch', 1)):
            value = getattr(args, flag)
            if value is not None and value < low:
                raise SuiteError(f'--{flag}: expected an integer >= {low}, got {value}')
        if args.sizes is not None and min(args.sizes) < 1:
            raise SuiteError(f'--sizes: expected integers >= 1, got {min(args.sizes)}')
        if args.min_time is not None and args.min_time < 0:
            raise SuiteError(f'--min-time: expected seconds >= 0, got {args.min_time}')
        out_dir = _check_out(args.out)
        suites = _suites(args)
    except SuiteError as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        return 2
    import torch
    if any(s.params['device'] == 'cuda' for s in suites) and not torch.cuda.is_available():
        print(f'{prog} {args.group}: no CUDA device (torch {torch.__version__} sees none): the GPU suites time '
              'the Triton kernels on a GPU; nothing was measured', file=sys.stderr)
        return 2

    from .engine import run
    from .report import markdown, write_results
    status = 0
    os.makedirs(out_dir, exist_ok=True)
    for suite in suites:
        result = run(suite, command=' '.join([prog] + argv))
        written = write_results(result, out_dir, suite.stem, plot=not args.no_plot)
        print(markdown(result))
        print('wrote ' + ', '.join(written))
        if any('error' in r for r in result['rows']):
            status = 1
    return status


if __name__ == '__main__':
    sys.exit(main())
