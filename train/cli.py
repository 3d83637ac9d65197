"""Command line of the recipe: ``zoo train CONFIG [--opts key=value ...] [--resume [CKPT]]`` and
``zoo eval CONFIG CHECKPOINT``. The ``zoo`` console command forwards here; ``python -m zoo.train`` works too,
and so does ``torchrun --nproc_per_node=N -m zoo.train train CONFIG`` (DDP; gloo on CPU, nccl on GPU).
"""
import argparse
import json
import sys
from typing import List, Optional


def build_parser(prog: str = 'zoo') -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description='Train and evaluate zoo backbones (mmengine recipe).')
    sub = parser.add_subparsers(dest='command', required=True)

    t = sub.add_parser('train', help='train from a config file')
    t.add_argument('config', help='configs/<task>/<model>_<data>.py')
    t.add_argument('--opts', nargs='+', default=[], metavar='KEY=VALUE',
                   help="override config entries, e.g. train_cfg.max_epochs=3 optim_wrapper.optimizer.lr=1e-3")
    t.add_argument('--resume', nargs='?', const='auto', default=None, metavar='CKPT',
                   help='resume from CKPT, or without a value from the newest checkpoint in the work dir')
    t.add_argument('--work-dir', default=None, help='output folder (default: work_dirs/<config name>)')
    t.add_argument('--launcher', choices=('auto', 'none', 'pytorch'), default='auto',
                   help="'auto': DDP when started by torchrun")

    e = sub.add_parser('eval', help='evaluate a checkpoint on the config\'s test (or val) split')
    e.add_argument('config')
    e.add_argument('checkpoint')
    e.add_argument('--opts', nargs='+', default=[], metavar='KEY=VALUE')
    e.add_argument('--work-dir', default=None)
    e.add_argument('--launcher', choices=('auto', 'none', 'pytorch'), default='auto')
    e.add_argument('--no-ema', action='store_true', help='evaluate the raw weights even if the checkpoint has EMA')
    return parser


def main(argv: Optional[List[str]] = None, prog: str = 'zoo') -> int:
    """Run `argv` (e.g. ['train', CONFIG, '--opts', 'k=v', '--resume']); returns the exit code.

    Bad input (config, data, checkpoint) prints one clear error line and returns 2; a non-finite loss returns 1.
    """
    args = build_parser(prog).parse_args(argv)
    from mmengine.dist import is_main_process
    from zoo.weights import IncompatibleKeysError, NoPretrainedWeightsError, WeightsFileError
    from . import ConfigError, DatasetError, load_config, run_eval, run_train
    try:
        cfg = load_config(args.config, args.opts)
        if args.command == 'train':
            result = run_train(cfg, work_dir=args.work_dir, resume=args.resume, launcher=args.launcher)
            if is_main_process() and result.get('completed'):
                done = result['completed']
                unit = 'epoch' if done['by_epoch'] else 'iteration'
                print(f"{prog} train: the run in {result['work_dir']} is already complete at {unit} {done['step']} "
                      f"(train_cfg.max_{unit}s={done['max']}); nothing to train. To train longer, resume with "
                      f"--opts train_cfg.max_{unit}s=<more>. Its last metrics:")
            if is_main_process():
                _report(result['metrics'], dict(work_dir=result['work_dir'], checkpoint=result['checkpoint'],
                                                 curves=result['curves']))
        else:
            metrics = run_eval(cfg, args.checkpoint, work_dir=args.work_dir, launcher=args.launcher,
                               use_ema=not args.no_ema)
            if is_main_process():
                _report(metrics, {})
    except (ConfigError, DatasetError, FileNotFoundError, IncompatibleKeysError, WeightsFileError,
            NoPretrainedWeightsError, ConnectionError) as e:
        print(f'{prog} {args.command}: error: {e}', file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f'{prog} {args.command}: error: {e}', file=sys.stderr)
        return 1
    return 0


def _report(metrics: dict, files: dict) -> None:
    print('final metrics: ' + json.dumps({k: round(float(v), 4) for k, v in metrics.items()}))
    for name, path in files.items():
        if path:
            print(f'{name}: {path}')


if __name__ == '__main__':
    sys.exit(main())
