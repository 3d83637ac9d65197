"""The `zoo` console command: list, info, mixers, check, export, bench, train, eval, compare, demo.

`zoo check` is the foundation's end-to-end job: build every registered model, run a real photo batch
through it, and export one model to ONNX checked in onnxruntime. `bench`, `train` and `eval` forward
their arguments to `bench.cli.main` / `train.cli.main`; weights, train and bench are imported lazily
inside the subcommands so `zoo list` needs none of them.
"""
import argparse
import difflib
import json
import math
import os
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ['main']

_FORWARDED = {
    'bench': ('zoo.bench.cli', 'benchmarks: time, memory, FLOPs and params of ops, mixers and models vs their '
                               'anchors: zoo bench models|mixers|ops|gpu [SUITE|NAME ...]; zoo bench --list'),
    'train': ('zoo.train.cli', 'train from a config: zoo train CONFIG [--opts k=v ...] [--resume]'),
    'eval': ('zoo.train.cli', 'evaluate a checkpoint: zoo eval CONFIG CHECKPOINT'),
    'compare': ('zoo.train.compare', 'train one backbone once per mixer plan with one recipe; accuracy vs cost '
                                     'report: zoo compare [--mixers PLAN ...] [--data DIR] [--report DIR]'),
    'demo': ('zoo.train.demo', 'the main job: fine-tune on the embedded data, evaluate, export to ONNX (train/demo.py)'),
}


class CliError(Exception):
    """A failure reported as one line on stderr with an exit code (2 = bad usage, 1 = failed)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def _zoo_models(pattern: str = '') -> List[str]:
    import zoo
    return zoo.list_zoo_models(pattern)


def _check_model_name(name: str) -> str:
    names = _zoo_models()
    if name in names:
        return name
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f' Did you mean: {", ".join(close)}?' if close else ''
    raise CliError(f'unknown model {name!r}.{hint} (`zoo list` shows the {len(names)} zoo models)', code=2)


def _img_size(value: Optional[Sequence[int]]) -> Optional[Tuple[int, int]]:
    if value is None:
        return None
    if len(value) not in (1, 2) or any(v <= 0 for v in value):
        raise CliError(f'--img-size: expected H [W] as positive ints, got {list(value)}', code=2)
    return (value[0], value[-1])


def _create(name: str, **kwargs):
    import timm
    return timm.create_model(_check_model_name(name), **kwargs)


def _num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _feature_info(model) -> List[Dict[str, Any]]:
    info = getattr(model, 'feature_info', None) or []
    if hasattr(info, 'get_dicts'):  # timm FeatureInfo (features_only models)
        info = info.get_dicts()
    return [dict(num_chs=d.get('num_chs'), reduction=d.get('reduction'), module=d.get('module')) for d in info]


def _pretrained_source(cfg: Dict[str, Any]) -> str:
    for key, label in (('file', 'file'), ('hf_hub_id', 'hf-hub'), ('url', 'url')):
        if cfg.get(key):
            return f'{label}: {cfg[key]}'
    return 'none (random init)'


# ---------------------------------------------------------------------------------------------- list / info

def cmd_list(args: argparse.Namespace) -> int:
    names = _zoo_models(args.pattern or '')
    if not names:
        raise CliError(f'no zoo model matches {args.pattern!r} (`zoo list` shows all {len(_zoo_models())})', code=2)
    print('\n'.join(names))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    model = _create(args.model)
    cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
    info = dict(
        model=args.model,
        module=type(model).__module__,
        params=_num_params(model),
        num_classes=getattr(model, 'num_classes', None),
        num_features=getattr(model, 'num_features', None),
        input_size=cfg.get('input_size'),
        fixed_input_size=cfg.get('fixed_input_size', False),
        crop_pct=cfg.get('crop_pct'),
        interpolation=cfg.get('interpolation'),
        mean=cfg.get('mean'),
        std=cfg.get('std'),
        pretrained=_pretrained_source(cfg),
        pretrained_tag=cfg.get('tag'),
        feature_info=_feature_info(model),
    )
    if args.json:
        print(json.dumps(info, indent=2, default=list))
        return 0
    print(f"model          {info['model']}  ({info['module']})")
    print(f"params         {info['params'] / 1e6:.2f} M  ({info['params']:,})")
    print(f"classes        {info['num_classes']}  (num_features {info['num_features']})")
    size = info['input_size']
    print(f"input size     {'x'.join(map(str, size)) if size else '?'}"
          f"{' (fixed)' if info['fixed_input_size'] else ' (any H, W)'}  crop_pct {info['crop_pct']}  "
          f"interpolation {info['interpolation']}")
    print(f"mean / std     {info['mean']} / {info['std']}")
    print(f"pretrained     {info['pretrained']}")
    print('features       stage  channels  reduction  module')
    for i, d in enumerate(info['feature_info']):
        print(f"               {i:>5}  {d['num_chs']:>8}  {d['reduction']:>9}  {d['module']}")
    return 0


# ------------------------------------------------------------------------------------------------- mixers

def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ['  '.join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, '  '.join('-' * w for w in widths))
    return lines


def cmd_mixers(args: argparse.Namespace) -> int:
    import zoo.blocks as blocks
    mixers = [blocks.mixer_info(n) for n in blocks.list_mixers()]
    video = [blocks.mixer_info(n) for n in blocks.list_mixers(3)]
    gates = [blocks.gate_info(n) for n in blocks.list_gates()]
    if args.json:
        def as_dict(info, *keys):
            return {k: getattr(info, k) for k in ('name', 'paper', 'cost') + keys + ('arguments',)}
        flags = ('triton', 'onnx_dynamic', 'torchscript', 'spatial_dims')
        print(json.dumps(dict(mixers=[as_dict(m, *flags) for m in mixers + video],
                              gates=[as_dict(g) for g in gates]), indent=2))
        return 0
    yes = {True: 'yes', False: 'no'}
    for infos, layout in ((mixers, '(B, H, W, C) -> (B, H, W, C) at any H, W'),
                          (video, '(B, T, H, W, C) -> (B, T, H, W, C) at any T, H, W')):
        print(f'{len(infos)} token mixers, {layout}: zoo.blocks.create_mixer(name, dim, num_heads=..., **arguments)')
        print('\n'.join(_text_table(
            ('mixer', 'paper', 'cost (N tokens)', 'triton', 'onnx dynamic H/W', 'torchscript', 'arguments'),
            [(m.name, m.paper, m.cost, yes[m.triton], yes[m.onnx_dynamic], yes[m.torchscript], m.arguments or '-')
             for m in infos])))
        print()
    print(f'{len(gates)} gates for conv stages, (B, C, H, W) -> (B, C, H, W): '
          'zoo.blocks.create_gate(name, channels, **arguments)')
    print('\n'.join(_text_table(
        ('gate', 'paper', 'cost (N tokens)', 'arguments'),
        [(g.name, g.paper, g.cost, g.arguments or '-') for g in gates])))
    return 0


# -------------------------------------------------------------------------------------------------- check

def _sample_images():
    """The two photos shipped with scikit-learn (china.jpg, flower.jpg) as PIL images."""
    from PIL import Image
    from sklearn.datasets import load_sample_images
    return [Image.fromarray(a) for a in load_sample_images().images]


def _image_batch(model, images, img_size: Optional[Tuple[int, int]]):
    """Resize / crop / normalise `images` with timm's eval transform for the model's pretrained cfg."""
    import torch
    from timm.data import create_transform, resolve_model_data_config
    in_chans = getattr(model, 'in_chans', 3)
    overrides = {'input_size': (in_chans,) + tuple(img_size)} if img_size else None
    data_cfg = resolve_model_data_config(model, args=overrides)
    transform = create_transform(**data_cfg, is_training=False)
    return torch.stack([transform(im if in_chans == 3 else im.convert('L')) for im in images]), data_cfg


def _count_gmacs(model, x) -> Tuple[Optional[float], Optional[str]]:
    try:
        from zoo.bench.flops import count_flops
    except ImportError:
        return None, None
    try:
        return count_flops(model, x[:1]) / 2e9, None
    except Exception as e:  # FLOPs are informative; a counter failure is noted, not a check failure
        return None, f'FLOPs: {type(e).__name__}: {e}'


def _check_one(name: str, images, img_size, flops: bool) -> Dict[str, Any]:
    import timm
    import torch
    row: Dict[str, Any] = dict(model=name, params=None, gmacs=None, output=None, finite=None, features=None,
                               onnx_err=None, errors=[], notes=[], model_obj=None, batch=None)
    try:
        model = timm.create_model(name).eval()
        row['params'] = _num_params(model)
        x, _ = _image_batch(model, images, img_size)
        row['batch'] = x
        with torch.no_grad():
            if hasattr(model, 'forward_intermediates'):
                final, feats = model.forward_intermediates(x)
                out = model.forward_head(final)
                expect = _feature_info(model)
                got = [(f.shape[1], f.shape[2], f.shape[3]) for f in feats]
                bad = []
                for i, ((c, fh, fw), d) in enumerate(zip(got, expect)):
                    red = d['reduction']
                    ok_hw = all(s in (n // red, math.ceil(n / red)) for s, n in ((fh, x.shape[2]), (fw, x.shape[3])))
                    if c != d['num_chs'] or not ok_hw:
                        bad.append(f'stage {i}: got {c}x{fh}x{fw}, feature_info says {d["num_chs"]} ch at /{red}')
                if len(got) != len(expect):
                    bad.append(f'{len(got)} intermediates for {len(expect)} feature_info entries')
                row['features'] = not bad
                row['errors'] += bad
            else:
                out = model(x)
        row['output'] = tuple(out.shape)
        row['finite'] = bool(torch.isfinite(out).all())
        if not row['finite']:
            row['errors'].append('non-finite values in the output')
        if row['output'] != (x.shape[0], model.num_classes):
            row['errors'].append(f'output shape {row["output"]}, expected {(x.shape[0], model.num_classes)}')
        if flops:
            row['gmacs'], note = _count_gmacs(model, x)
            if note:
                row['notes'].append(note)
        row['model_obj'] = model
    except Exception as e:
        row['errors'].append(f'{type(e).__name__}: {e}')
    return row


def _fmt(value, spec: str = '', missing: str = '-') -> str:
    if value is None:
        return missing
    if isinstance(value, bool):
        return 'ok' if value else 'FAIL'
    return format(value, spec)


def _print_table(rows: List[Dict[str, Any]]) -> None:
    header = ['model', 'params (M)', 'GMACs', 'output', 'finite', 'features', 'onnx max err', 'status']
    table = [header]
    for r in rows:
        table.append([
            r['model'], _fmt(r['params'] and r['params'] / 1e6, '.2f'), _fmt(r['gmacs'], '.2f'),
            'x'.join(map(str, r['output'])) if r['output'] else '-', _fmt(r['finite']), _fmt(r['features']),
            r['onnx_err'] if isinstance(r['onnx_err'], str) else _fmt(r['onnx_err'], '.2e'),
            'FAIL' if r['errors'] else 'ok',
        ])
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print('  '.join(str(c).ljust(w) if j == 0 else str(c).rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print('  '.join('-' * w for w in widths))


def cmd_check(args: argparse.Namespace) -> int:
    img_size = _img_size(args.img_size)
    names = [_check_model_name(n) for n in args.models] if args.models else _zoo_models()
    if not names:
        raise CliError('no zoo models are registered')
    if args.onnx_model and args.onnx_model not in names:
        _check_model_name(args.onnx_model)
        names.append(args.onnx_model)
    from zoo.progress import progress
    images = _sample_images()
    rows, target = [], None
    for name in progress(names, desc='check', unit='model', item=str):
        row = _check_one(name, images, img_size, flops=not args.no_flops)
        rows.append(row)
        # keep only the model the ONNX export needs in memory: the requested one, else the smallest that passed
        if args.no_onnx:
            keep = False
        elif args.onnx_model:
            keep = name == args.onnx_model
        else:
            keep = row['model_obj'] is not None and not row['errors'] and (
                target is None or row['params'] < target['params'])
        if keep:
            if target is not None:
                target['model_obj'] = None
            target = row
        else:
            row['model_obj'] = None
    if target is not None:
        if target['model_obj'] is None:
            target['onnx_err'] = 'FAIL'
            target['errors'].append('ONNX: the model did not build / run, so it was not exported')
        else:
            from zoo.weights.onnx import OnnxExportError, export_onnx
            mode = f'{args.onnx_exporter}, dynamic batch' + ('' if args.onnx_static else ' + H/W')
            print(f'exporting {target["model"]} to ONNX ({mode}) ...', file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    report = export_onnx(target['model_obj'], os.path.join(tmp, f'{target["model"]}.onnx'),
                                         example_input=target['batch'], dynamic=not args.onnx_static,
                                         exporter=args.onnx_exporter, show_progress=True)
                    target['onnx_err'] = report['max_abs_err']
                    target['notes'].append(f'ONNX ({mode}) checked in onnxruntime at ' + ', '.join(
                        'x'.join(map(str, c['input_shape'])) for c in report['checks']))
                except (OnnxExportError, ValueError) as e:
                    target['onnx_err'] = 'FAIL'
                    target['errors'].append(f'ONNX: {e}')
    for r in rows:
        r.pop('model_obj', None)
        r.pop('batch', None)
    _print_table(rows)
    for r in rows:
        for msg in r['errors']:
            print(f'{r["model"]}: error: {msg}', file=sys.stderr)
        for msg in r['notes']:
            print(f'{r["model"]}: {msg}')
    failed = [r['model'] for r in rows if r['errors']]
    print(f'{len(rows) - len(failed)}/{len(rows)} models passed' + (f'; failed: {", ".join(failed)}' if failed else ''))
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------- export

def cmd_export(args: argparse.Namespace) -> int:
    from zoo.weights.io import IncompatibleKeysError, WeightsFileError, load_into
    from zoo.weights.onnx import OnnxExportError, dynamic_blockers, export_onnx
    _check_export_args(args)
    kwargs = {} if args.num_classes is None else dict(num_classes=args.num_classes)
    model = _create(args.model, **kwargs)
    if args.checkpoint:
        try:
            load_into(model, args.checkpoint)
        except (FileNotFoundError, WeightsFileError, IncompatibleKeysError) as e:
            raise CliError(f'--checkpoint: {e}', code=2)
    if args.dynamic:  # say so before exporting when a mixer of the model cannot run at every size
        blockers = dynamic_blockers(model)
        if blockers:
            raise CliError(f'--dynamic: {args.model} cannot export with dynamic height and width '
                           f'({", ".join(blockers)}: onnx_dynamic=False in the mixer registry); '
                           f'export without --dynamic at a fixed --img-size', code=2)
    try:
        report = export_onnx(model, args.output, img_size=_img_size(args.img_size), batch_size=args.batch_size,
                             dynamic=args.dynamic, exporter=args.exporter, opset=args.opset, atol=args.atol,
                             rtol=args.rtol, show_progress=True)
    except OnnxExportError as e:
        if e.report.get('checks'):
            print(json.dumps(e.report, indent=2, default=list))
        raise CliError(str(e))
    except ValueError as e:
        raise CliError(str(e), code=2)
    print(json.dumps(report, indent=2, default=list))
    return 0


def _check_export_args(args: argparse.Namespace) -> None:
    """Careless export arguments fail before a model is built (exit code 2)."""
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        raise CliError(f'--output: folder {folder!r} does not exist (create it first)', code=2)
    if os.path.isdir(args.output):
        raise CliError(f'--output: {args.output!r} is a folder; expected a .onnx file name', code=2)
    if args.num_classes is not None and args.num_classes < 0:
        raise CliError(f'--num-classes: expected >= 0 (0: no classifier, features out), got {args.num_classes}',
                       code=2)
    if not args.atol > 0:
        raise CliError(f'--atol: expected a positive tolerance, got {args.atol}', code=2)
    if not args.rtol >= 0:
        raise CliError(f'--rtol: expected a tolerance >= 0, got {args.rtol}', code=2)
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        raise CliError(f'--checkpoint: no such weight file: {args.checkpoint!r}', code=2)
    if args.opset is not None:
        low, high = (18, 23) if args.exporter == 'dynamo' else (7, 20)
        try:
            from torch.onnx import _constants
            high = _constants.ONNX_MAX_OPSET if args.exporter == 'dynamo' else \
                _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
        except (ImportError, AttributeError):
            pass
        if not low <= args.opset <= high:
            hint = '; older opsets need --exporter legacy' if args.exporter == 'dynamo' and args.opset < low else ''
            raise CliError(f'--opset: the {args.exporter} exporter writes opsets {low}..{high}, got {args.opset}{hint}',
                           code=2)


# --------------------------------------------------------------------------------------------- forwarding

def _forward(command: str, argv: List[str]) -> int:
    import importlib
    module_name = _FORWARDED[command][0]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        hint = "; the training extras install with: pip install -e '.[train]'" if command != 'bench' else ''
        raise CliError(f'`zoo {command}` needs {module_name}, which does not import ({type(e).__name__}: {e}){hint}')
    fwd = argv if module_name == 'zoo.train.cli' else argv[1:]
    import inspect
    kwargs = {}
    if module_name != 'zoo.train.cli' and 'prog' in inspect.signature(module.main).parameters:
        kwargs['prog'] = f'zoo {command}'  # its usage and error lines name the command the user typed
    ret = module.main(fwd, **kwargs)
    return int(ret or 0)


# ------------------------------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='zoo', description='Vision attention backbone zoo (models registered in timm).')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    sub.required = True

    p = sub.add_parser('list', help='list the zoo model names')
    p.add_argument('pattern', nargs='?', help="wildcard filter, e.g. 'swin*'")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser('info', help='params, feature_info, pretrained source and input size of a model')
    p.add_argument('model')
    p.add_argument('--json', action='store_true', help='print JSON')
    p.set_defaults(func=cmd_info)

    p = sub.add_parser('mixers', help='the registered token mixers and conv-stage gates: paper, cost, paths, arguments')
    p.add_argument('--json', action='store_true', help='print JSON')
    p.set_defaults(func=cmd_mixers)

    p = sub.add_parser('check', help='build each model, run a real photo batch, export one to ONNX')
    p.add_argument('models', nargs='*', metavar='MODEL', help='models to check (default: every zoo model)')
    p.add_argument('--img-size', nargs='+', type=int, metavar='SIZE',
                   help='input size H [W] (default: the pretrained cfg)')
    p.add_argument('--onnx-model', metavar='MODEL', help='model to export (default: the smallest that passed)')
    p.add_argument('--onnx-exporter', choices=('dynamo', 'legacy'), default='dynamo')
    p.add_argument('--onnx-static', action='store_true', help='export with a static H/W (batch stays dynamic)')
    p.add_argument('--no-onnx', action='store_true', help='skip the ONNX export')
    p.add_argument('--no-flops', action='store_true', help='skip FLOP counting')
    p.set_defaults(func=cmd_check)

    p = sub.add_parser('export', help='export a model to ONNX and check it in onnxruntime')
    p.add_argument('model')
    p.add_argument('--output', '-o', required=True, metavar='FILE', help='.onnx file to write')
    p.add_argument('--img-size', nargs='+', type=int, metavar='SIZE',
                   help='input size H [W] (default: the pretrained cfg)')
    p.add_argument('--batch-size', type=int, default=2, help='example batch (>= 2; batch is dynamic anyway)')
    p.add_argument('--dynamic', action='store_true',
                   help='dynamic height and width as well as batch (checked at a smaller and a larger size)')
    p.add_argument('--exporter', choices=('dynamo', 'legacy'), default='dynamo')
    p.add_argument('--opset', type=int, default=None)
    p.add_argument('--atol', type=float, default=1e-4,
                   help='absolute floor of the allowed error, max(atol, rtol * max |PyTorch output|)')
    p.add_argument('--rtol', type=float, default=1e-5,
                   help='allowed error relative to the largest |value| of each compared output')
    p.add_argument('--checkpoint', metavar='PATH', help='.safetensors / .pth weights to load (strict)')
    p.add_argument('--num-classes', type=int, default=None)
    p.set_defaults(func=cmd_export)

    for name, (_, help_text) in _FORWARDED.items():
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.add_argument('args', nargs=argparse.REMAINDER)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `zoo` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in _FORWARDED:
            return _forward(argv[0], argv)
        args = build_parser().parse_args(argv)
        return args.func(args)
    except CliError as e:
        print(f'zoo {argv[0] if argv else ""}: error: {e}', file=sys.stderr)
        return e.code
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ConnectionError) as e:
        # careless input (a path, no network) reaching a library call: its message names the path or host
        print(f'zoo {argv[0] if argv else ""}: error: {e}', file=sys.stderr)
        return 2
    except Exception as e:
        from zoo.weights import IncompatibleKeysError, NoPretrainedWeightsError, WeightsFileError
        if not isinstance(e, (WeightsFileError, IncompatibleKeysError, NoPretrainedWeightsError)):
            raise
        print(f'zoo {argv[0] if argv else ""}: error: {e}', file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == '__main__':
    sys.exit(main())
