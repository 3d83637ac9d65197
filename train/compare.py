"""`zoo compare`: one backbone trained once per mixer plan with one recipe, evaluated, its cost measured by the
benchmark harness, and one report (markdown, CSV, JSON and plots) of accuracy against cost.

    zoo compare                                   # reduced hybrid_tiny on the embedded digits, five plans
    zoo compare --mixers window neighborhood cbam/window/neighborhood/grid --data DIR --epochs 30 --seeds 0 1 2
    zoo compare --out OUT --shard 2/4             # one slice of the runs (e.g. task 2 of a 4-task job array)
    zoo compare --report OUT                      # merge the finished runs of OUT into OUT/report.*

Every run is an ordinary recipe run (configs/classification/hybrid_compare_digits.py with the plan, data, size,
epochs and seed swapped in) in its own work dir OUT/runs/<plan>__seed<k>: run.json (the recipe, plan and seed) is
written before it trains, result.json (top-1, history, cost) once it is evaluated and measured. A finished run
(result.json) is never repeated; an unfinished one resumes from its last checkpoint. Under torchrun each run
trains with DDP (the recipe's launcher); rank 0 measures and writes.
"""
import argparse
import csv
import io
import json
import os
import re
import statistics
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

CONFIG = os.path.join('classification', 'hybrid_compare_digits.py')
DEFAULT_PLANS = ('cbam', 'window', 'neighborhood', 'agent', 'linear')
DEFAULT_EPOCHS = 8
DEFAULT_IMG_SIZE = 32
DEFAULT_SEEDS = (0, 1)
PARAM_TOLERANCE = 0.10  # plans whose parameter count is off the median by more than this are flagged
COST_REPEATS = 5
RUN_FILE, RESULT_FILE = 'run.json', 'result.json'
TOP1 = 'accuracy/top1'
REPORT_FILES = ('report.md', 'report.csv', 'report.json', 'accuracy_vs_throughput.png', 'accuracy_vs_memory.png',
                'learning_curves.png')


class CompareError(ValueError):
    """Bad input to `zoo compare`: one line on stderr, exit code 2, nothing trained or written."""


@dataclass
class Run:
    plan: str                # the plan as written ('window', 'cbam/window/neighborhood/grid')
    mixers: List[Any]        # one entry per stage, as the backbone takes it
    seed: int

    @property
    def name(self) -> str:
        return f'{plan_slug(self.plan)}__seed{self.seed}'


def plan_slug(plan: str) -> str:
    """'cbam/window/neighborhood/grid' -> 'cbam-window-neighborhood-grid', 'linear:inline' -> 'linear_inline'."""
    return re.sub(r'[^A-Za-z0-9_.-]+', '_', plan.replace('/', '-').replace('+', '.'))


def _is_main() -> bool:
    return int(os.environ.get('RANK', '0')) == 0


# ------------------------------------------------------------------------------------------------ input checks

def parse_shard(text: Optional[str]) -> Tuple[int, int]:
    """'i/n' (1 <= i <= n) -> (i, n); None -> (1, 1)."""
    if text is None:
        return 1, 1
    m = re.fullmatch(r'\s*(\d+)\s*/\s*(\d+)\s*', text)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise CompareError(f'--shard: expected i/n with 1 <= i <= n (e.g. 1/4 .. 4/4), got {text!r}')
    return int(m.group(1)), int(m.group(2))


def backbone_kwargs(backbone: str, reduced: bool, img_size: int) -> Tuple[Dict[str, Any], int]:
    """The model arguments every run shares (the reduced widths with --reduced, the window-sizing img_size) and
    the backbone's stage count."""
    import inspect

    import timm

    import zoo
    if backbone not in zoo.list_zoo_models():
        from ._utils import suggest
        raise CompareError(f'--backbone: unknown zoo model {backbone!r}{suggest(backbone, zoo.list_zoo_models())}')
    kwargs = zoo.reduced_args(backbone) if reduced else {}
    model = timm.create_model(backbone, **kwargs)
    params = inspect.signature(type(model).__init__).parameters
    if 'mixers' not in params:
        takers = timm.list_models(module='zoo_hybrid')
        raise CompareError(f'--backbone: {backbone} takes no mixers= (backbones that do: {", ".join(takers)})')
    low = getattr(model, 'min_input_size', 1)
    if img_size < low:
        raise CompareError(f'--img-size: {backbone} needs inputs of at least {low} px, got {img_size}')
    if 'img_size' in params:
        kwargs['img_size'] = img_size
    return kwargs, len(model.feature_info)


def check_plans(backbone: str, plans: Sequence[str], kwargs: Dict[str, Any],
                depths: int) -> List[Tuple[str, List[Any]]]:
    """Each plan as (text, one entry per stage): names checked against the registries, the stage count against
    the backbone (by building it)."""
    import timm

    from zoo.zoo_hybrid import parse_mixer_plan, split_mixer_name
    if not plans:
        raise CompareError('--mixers: expected at least one plan')
    texts = [p.strip() for p in plans]
    dupes = sorted({p for p in texts if texts.count(p) > 1})
    if dupes:
        raise CompareError(f'--mixers: plan {dupes[0]!r} is given twice')
    out = []
    for text in texts:
        try:
            stages = parse_mixer_plan(text)
            for entry in stages:
                for name in [entry] if isinstance(entry, str) else entry:
                    split_mixer_name(name)
        except ValueError as e:
            raise CompareError(f'--mixers {text!r}: {str(e).replace("mixers: ", "", 1)}') from None
        if len(stages) == 1:
            stages = stages * depths
        if len(stages) != depths:
            raise CompareError(f'--mixers {text!r}: {backbone} has {depths} stages, the plan names {len(stages)} '
                               f"(write one entry per stage separated by '/', or one name for every stage)")
        try:
            timm.create_model(backbone, mixers=stages, **kwargs)
        except (ValueError, TypeError, KeyError) as e:
            raise CompareError(f'--mixers {text!r}: {backbone} cannot be built with it: {e}') from None
        out.append((text, stages))
    return out


def _class_folders(root: str) -> List[str]:
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))


def resolve_data(spec: str) -> Dict[str, Any]:
    """'digits', 'photos' or a folder with train/ and val/ (ImageNet style, the same class folders in both)."""
    if spec == 'digits':
        return dict(data='digits', classes=[str(c) for c in range(10)])
    if spec == 'photos':
        return dict(data='photos', classes=['china', 'flower'])
    root = os.path.abspath(spec)
    if not os.path.isdir(root):
        raise CompareError(f"--data: expected 'digits', 'photos' or a folder with train/ and val/, got {spec!r} "
                           f"(no such folder)")
    found = {}
    for split in ('train', 'val'):
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            raise CompareError(f'--data {spec}: no {split}/ folder (expected {split}/<class>/<image>)')
        found[split] = _class_folders(folder)
        if not found[split]:
            raise CompareError(f'--data {spec}: {split}/ holds no class folders')
    if found['train'] != found['val']:
        only_t = sorted(set(found['train']) - set(found['val']))
        only_v = sorted(set(found['val']) - set(found['train']))
        raise CompareError(f'--data {spec}: train and val classes differ: only in train: {only_t or "none"}; '
                           f'only in val: {only_v or "none"}')
    if len(found['train']) < 2:
        raise CompareError(f'--data {spec}: expected at least 2 classes, got {found["train"]}')
    return dict(data=root, classes=found['train'])


def recipe_fields(args: argparse.Namespace, data: Dict[str, Any]) -> Dict[str, Any]:
    """What every run of one comparison shares; runs whose recipes differ are never merged."""
    return dict(config=CONFIG, backbone=args.backbone, reduced=bool(args.reduced), data=data['data'],
                classes=list(data['classes']), epochs=args.epochs, img_size=args.img_size,
                batch_size=args.batch_size, opts=list(args.opts))


def recipe_difference(recipes: Sequence[Tuple[str, Dict[str, Any]]]) -> Optional[str]:
    """None if every (run name, recipe) agrees, else which fields differ and where."""
    first_name, first = recipes[0]
    diffs = []
    for name, recipe in recipes[1:]:
        for key in sorted(set(first) | set(recipe)):
            if first.get(key) != recipe.get(key) and key not in {d[0] for d in diffs}:
                diffs.append((key, f'{key}: {first.get(key)!r} ({first_name}) vs {recipe.get(key)!r} ({name})'))
    return '; '.join(d[1] for d in diffs) if diffs else None


def _read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CompareError(f'{path}: unreadable ({type(e).__name__}: {e})') from None


def existing_runs(out: str) -> Dict[str, Dict[str, Any]]:
    """run name -> its run.json, for every run folder under out/runs."""
    root = os.path.join(out, 'runs')
    if not os.path.isdir(root):
        return {}
    return {d: _read_json(os.path.join(root, d, RUN_FILE)) for d in sorted(os.listdir(root))
            if os.path.isfile(os.path.join(root, d, RUN_FILE))}


# ------------------------------------------------------------------------------------------------- one run

def run_config(recipe: Dict[str, Any], run: Run, kwargs: Dict[str, Any], data_roots: Optional[Tuple[str, str]],
               wandb: Optional[Dict[str, Any]] = None):
    """The recipe config of one run: the shipped compare config, the user's --opts, then the plan, data, size,
    epochs and seed."""
    from .runner import check_config, load_config
    cfg = load_config(recipe['config'], recipe['opts'])
    size = recipe['img_size']
    model_kwargs = dict(cfg.model.get('model_kwargs') or {}, **kwargs, mixers=run.mixers)
    train_ds, val_ds = dict(cfg.train_dataloader.dataset), dict(cfg.val_dataloader.dataset)
    if data_roots is not None:
        train_ds = dict(type='ImageFolderDataset', root=data_roots[0], img_size=size, train=True,
                        transform=train_ds.get('transform'), classes=recipe['classes'])
        val_ds = dict(type='ImageFolderDataset', root=data_roots[1], img_size=size, train=False,
                      classes=recipe['classes'])
    else:
        train_ds['img_size'] = val_ds['img_size'] = size
    overrides = {
        'model.model_name': recipe['backbone'], 'model.num_classes': len(recipe['classes']),
        'model.model_kwargs': model_kwargs, 'train_cfg.max_epochs': recipe['epochs'],
        'randomness': dict(cfg.get('randomness') or {}, seed=run.seed),
        'val_evaluator': dict(type='TopKAccuracy', topk=(1, min(5, len(recipe['classes'])))),
    }
    if recipe['batch_size']:
        overrides['train_dataloader.batch_size'] = recipe['batch_size']
    cfg.merge_from_dict(overrides)
    cfg.train_dataloader.dataset, cfg.val_dataloader.dataset = train_ds, val_ds  # replaced whole, not merged
    if wandb:
        cfg.wandb = dict(wandb, name=run.name)
    check_config(cfg)
    return cfg


def measure_cost(recipe: Dict[str, Any], run: Run, kwargs: Dict[str, Any], batch: int) -> Dict[str, Any]:
    """Parameters, GMACs, inference img/s, training step time and peak training memory of the run's model at its
    input size and batch, through the benchmark harness (zoo bench: interleaved repeats, memory in a clean
    process)."""
    from zoo.bench import engine
    from zoo.bench.suite import build_suite
    entry_kwargs = dict(kwargs, mixers=run.mixers, num_classes=len(recipe['classes']))
    suite = build_suite(dict(title=f'zoo compare: {recipe["backbone"]} {run.plan}', kind='models',
                             modes=['fwd', 'fwdbwd'], precisions=['fp32'], sizes=[recipe['img_size']], batch=batch,
                             repeats=COST_REPEATS, warmup=1, memory=True,
                             subjects=[dict(name=recipe['backbone'], label=plan_slug(run.plan), kwargs=entry_kwargs)]),
                        'compare', 'models', 'zoo compare')
    result = engine.run(suite, command='zoo compare')
    rows = {r['mode']: r for r in result['rows']}
    fwd, step = rows.get('fwd', {}), rows.get('fwdbwd', {})
    flops = fwd.get('flops')
    return dict(
        params=fwd.get('params') or step.get('params'), gmacs=flops / 2e9 / batch if flops else None,  # per image
        infer_img_s=fwd.get('img_s'), train_step_ms=step.get('ms'), train_peak_mib=step.get('peak_alloc_mib'),
        train_peak_rss_mib=step.get('peak_rss_mib'), batch=batch, img_size=recipe['img_size'],
        errors=[r['error'] for r in (fwd, step) if r.get('error')],
        machine=dict((k, result['meta'][k]) for k in ('cpu', 'cpu_count', 'threads', 'torch', 'date', 'timing',
                                                     'memory')))


def _plan_has_cost(out: str, plan: str) -> bool:
    for name, info in existing_runs(out).items():
        path = os.path.join(out, 'runs', name, RESULT_FILE)
        if info.get('plan') == plan and os.path.isfile(path) and _read_json(path).get('cost'):
            return True
    return False


def _photo_data(root: str, timeout: float = 600.0) -> None:
    """Generate the photo-crop set once under `root` (rank 0; other torchrun ranks wait for its marker)."""
    import time
    marker = os.path.join(root, '.complete')
    if _is_main():
        if not os.path.isfile(marker):
            from .data import make_photo_folder
            make_photo_folder(root)
            open(marker, 'w').close()
        return
    start = time.time()
    while not os.path.isfile(marker):
        if time.time() - start > timeout:
            raise FileNotFoundError(f'the photo data {root!r} did not appear within {timeout:.0f} s (rank 0 makes it)')
        time.sleep(1)


def _write_json(path: str, data: Any) -> None:
    from zoo.weights import atomic_write
    with atomic_write(path) as tmp, open(tmp, 'w') as f:
        json.dump(data, f, indent=1)


def train_one(out: str, recipe: Dict[str, Any], run: Run, kwargs: Dict[str, Any], data_roots, wandb,
              log) -> str:
    """Train, evaluate and measure one run unless it is finished; returns 'done', 'resumed' or 'trained'."""
    import torch

    from .runner import find_resume_checkpoint, run_train
    work_dir = os.path.join(out, 'runs', run.name)
    if os.path.isfile(os.path.join(work_dir, RESULT_FILE)):
        log(f'{run.name}: finished earlier, not repeated')
        return 'done'
    if _is_main():
        os.makedirs(work_dir, exist_ok=True)
        _write_json(os.path.join(work_dir, RUN_FILE), dict(recipe=recipe, plan=run.plan, mixers=run.mixers,
                                                           seed=run.seed, name=run.name,
                                                           wandb_group=wandb and wandb['group']))
    cfg = run_config(recipe, run, kwargs, data_roots, wandb)
    resume = 'auto' if find_resume_checkpoint(work_dir) else None
    log(f'{run.name}: {"resuming from its last checkpoint" if resume else "training"} '
        f'({recipe["epochs"]} epochs, seed {run.seed})')
    result = run_train(cfg, work_dir=work_dir, resume=resume, launcher='auto')
    if _is_main():
        cost = None
        if not _plan_has_cost(out, run.plan):
            log(f'{run.name}: measuring its cost (zoo bench harness)')
            cost = measure_cost(recipe, run, kwargs, cfg.train_dataloader.batch_size)
        epochs = [r for r in result['history'].get('epochs', []) if TOP1 in r or 'train_loss' in r]
        top1s = [r[TOP1] for r in epochs if TOP1 in r]
        _write_json(os.path.join(work_dir, RESULT_FILE), dict(
            name=run.name, plan=run.plan, mixers=run.mixers, seed=run.seed, recipe=recipe,
            top1=result['metrics'].get(TOP1), best_top1=max(top1s) if top1s else None,
            metrics=result['metrics'], history=epochs, cost=cost, checkpoint=result['checkpoint'],
            wandb_group=wandb and wandb['group']))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return 'resumed' if resume else 'trained'


# -------------------------------------------------------------------------------------------------- report

def _mean_std(values: Sequence[float]) -> Tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def pareto_front(points: Sequence[Tuple[float, float]], higher_x_better: bool) -> List[int]:
    """Indices of the points no other point beats on both accuracy (y, higher is better) and x."""
    front = []
    for i, (x, y) in enumerate(points):
        beaten = any((xo >= x if higher_x_better else xo <= x) and yo >= y and (xo, yo) != (x, y)
                     for j, (xo, yo) in enumerate(points) if j != i)
        if not beaten:
            front.append(i)
    return front


def collect(out: str) -> Dict[str, Any]:
    """The report's content from the runs under `out` (finished ones; the others listed as unfinished)."""
    runs = existing_runs(out)
    if not runs:
        raise CompareError(f'--report {out}: no runs found (expected {os.path.join(out, "runs", "*", RUN_FILE)})')
    diff = recipe_difference([(name, info.get('recipe', {})) for name, info in runs.items()])
    if diff:
        raise CompareError(f'--report {out}: its runs were trained with different recipes, refusing to merge them: '
                           f'{diff}')
    results, unfinished = [], []
    for name in runs:
        path = os.path.join(out, 'runs', name, RESULT_FILE)
        (results.append(_read_json(path)) if os.path.isfile(path) else unfinished.append(name))
    if not results:
        raise CompareError(f'--report {out}: none of its {len(runs)} runs has finished ({", ".join(unfinished)})')
    order: List[str] = []
    for r in sorted(results, key=lambda r: r['name']):
        if r['plan'] not in order:
            order.append(r['plan'])
    rows = []
    for plan in order:
        mine = sorted((r for r in results if r['plan'] == plan), key=lambda r: r['seed'])
        top1 = [r['top1'] for r in mine if r.get('top1') is not None]
        mean, std = _mean_std(top1)
        cost = next((r['cost'] for r in mine if r.get('cost')), None) or {}
        rows.append(dict(plan=plan, mixers=mine[0]['mixers'], seeds=[r['seed'] for r in mine], top1=top1,
                         top1_mean=mean, top1_std=std, params=cost.get('params'), gmacs=cost.get('gmacs'),
                         infer_img_s=cost.get('infer_img_s'), train_step_ms=cost.get('train_step_ms'),
                         train_peak_mib=cost.get('train_peak_mib'), cost_errors=cost.get('errors') or []))
    params = [r['params'] for r in rows if r['params']]
    median = statistics.median(params) if params else None
    for r in rows:
        r['params_vs_median'] = r['params'] / median - 1 if r['params'] and median else None
    for key, higher in (('infer_img_s', True), ('train_peak_mib', False)):
        have = [i for i, r in enumerate(rows) if r[key] is not None and r['top1_mean'] is not None]
        front = pareto_front([(rows[i][key], rows[i]['top1_mean']) for i in have], higher)
        for k, i in enumerate(have):
            rows[i][f'pareto_{key}'] = k in front
    recipe = next(iter(runs.values()))['recipe']
    machine = next((r['cost']['machine'] for r in results if r.get('cost')), None)
    curves = [dict(name=r['name'], plan=r['plan'], seed=r['seed'], history=r.get('history', [])) for r in
              sorted(results, key=lambda r: r['name'])]
    return dict(recipe=recipe, rows=rows, unfinished=unfinished, param_tolerance=PARAM_TOLERANCE, machine=machine,
                curves=curves, runs=len(runs), finished=len(results))


_COLUMNS = (('plan', 'plan'), ('seeds', 'seeds'), ('top1_mean', 'top-1 mean (%)'), ('top1_std', 'top-1 std'),
            ('params', 'params (M)'), ('params_vs_median', 'params vs median'), ('gmacs', 'GMACs'),
            ('infer_img_s', 'CPU inference img/s'), ('train_step_ms', 'train step (ms)'),
            ('train_peak_mib', 'train peak memory (MiB)'), ('pareto_infer_img_s', 'front: acc/speed'),
            ('pareto_train_peak_mib', 'front: acc/memory'))


def _cell(key: str, value: Any) -> str:
    if value is None:
        return '-'
    if isinstance(value, bool):
        return 'yes' if value else ''
    if key == 'seeds':
        return ' '.join(map(str, value))
    if key == 'params':
        return f'{value / 1e6:.3f}'
    if key == 'params_vs_median':
        return f'{100 * value:+.1f}%'
    if key in ('top1_mean', 'top1_std', 'train_step_ms', 'train_peak_mib', 'infer_img_s'):
        return f'{value:.2f}' if key != 'infer_img_s' else f'{value:.1f}'
    if key == 'gmacs':
        return f'{value:.4f}'
    return str(value)


def markdown(report: Dict[str, Any]) -> str:
    rec = report['recipe']
    width = 'reduced widths, zoo.reduced_args' if rec['reduced'] else 'full widths'
    lines = [f"# zoo compare: {rec['backbone']} ({width})", '',
             f"Data {rec['data']} ({len(rec['classes'])} classes), {rec['img_size']} px, {rec['epochs']} epochs, "
             f"batch {rec['batch_size'] or 'as configured'}, recipe {rec['config']}"
             + (f" with --opts {' '.join(rec['opts'])}" if rec['opts'] else '') + '. '
             f"{report['finished']} of {report['runs']} runs finished.", '',
             '| ' + ' | '.join(h for _, h in _COLUMNS) + ' |', '|' + '---|' * len(_COLUMNS)]
    for r in report['rows']:
        lines.append('| ' + ' | '.join(_cell(k, r.get(k)) for k, _ in _COLUMNS) + ' |')
    lines.append('')
    lines.append('Top-1: the validation accuracy after the last epoch, mean and sample standard deviation over the '
                 'seeds (- with one seed). Cost (zoo bench harness, at the input size and training batch): params, GMACs of one '
                 'image (FLOPs / 2), eval-mode CPU throughput, one training step (forward, cross-entropy, backward, '
                 'AdamW) and its peak tensor memory (PyTorch allocator, independent of machine load).')
    off = [r['plan'] for r in report['rows'] if r['params_vs_median'] is not None
           and abs(r['params_vs_median']) > report['param_tolerance']]
    if off:
        lines += ['', f"Parameter budget: {', '.join(off)} differ from the median parameter count by more than "
                      f"{100 * report['param_tolerance']:.0f}%; compare them with their cost beside them."]
    if report['machine']:
        m = report['machine']
        lines += ['', f"Measured on {m['cpu']} ({m['threads']} torch threads, torch {m['torch']}), {m['date']}."]
    for r in report['rows']:
        for e in r['cost_errors']:
            lines.append(f"\nCost of {r['plan']}: {e}")
    if report['unfinished']:
        lines += ['', f"Unfinished runs (not in the table): {', '.join(report['unfinished'])}."]
    lines += ['', '![accuracy vs inference throughput](accuracy_vs_throughput.png)',
              '![accuracy vs training memory](accuracy_vs_memory.png)', '![learning curves](learning_curves.png)', '']
    return '\n'.join(lines)


def csv_text(report: Dict[str, Any]) -> str:
    buf = io.StringIO()
    keys = [k for k, _ in _COLUMNS] + ['top1']
    writer = csv.writer(buf)
    writer.writerow(keys)
    for r in report['rows']:
        writer.writerow([' '.join(map(str, r[k])) if isinstance(r.get(k), list) else
                         ('' if r.get(k) is None else r[k]) for k in keys])
    return buf.getvalue()


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=110, bbox_inches='tight')
    plt.close(fig)
    return buf.getvalue()


def plots(report: Dict[str, Any]) -> Dict[str, bytes]:
    """PNG bytes: accuracy vs inference throughput and vs training memory (Pareto front marked), learning curves."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    out = {}
    for key, label, fname in (('infer_img_s', 'CPU inference throughput (img/s, higher is better)',
                               'accuracy_vs_throughput.png'),
                              ('train_peak_mib', 'peak training memory (MiB, lower is better)',
                               'accuracy_vs_memory.png')):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        rows = [r for r in report['rows'] if r[key] is not None and r['top1_mean'] is not None]
        for r in rows:
            on = r.get(f'pareto_{key}')
            ax.errorbar(r[key], r['top1_mean'], yerr=r['top1_std'] or None, fmt='*' if on else 'o',
                        ms=11 if on else 6, capsize=3, color='C3' if on else 'C0')
            ax.annotate(r['plan'], (r[key], r['top1_mean']), textcoords='offset points', xytext=(5, 4), fontsize=8)
        front = sorted((r[key], r['top1_mean']) for r in rows if r.get(f'pareto_{key}'))
        if len(front) > 1:
            ax.plot(*zip(*front), '--', color='C3', lw=1)
        ax.plot([], [], '*', color='C3', ms=11, label='on the Pareto front (no plan is both more accurate and '
                                                      + ('faster)' if key == 'infer_img_s' else 'lighter)'))
        ax.legend(loc='best', fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel('top-1 (%)')
        ax.set_title(f"{report['recipe']['backbone']}: accuracy vs {'speed' if key == 'infer_img_s' else 'memory'}")
        ax.grid(alpha=0.3)
        out[fname] = _png(fig)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    plans = list(dict.fromkeys(c['plan'] for c in report['curves']))
    for c in report['curves']:
        color = f'C{plans.index(c["plan"]) % 10}'
        label = f"{c['plan']} (seed {c['seed']})"
        rows = c['history']
        ax_loss.plot([r['epoch'] for r in rows if 'train_loss' in r], [r['train_loss'] for r in rows
                                                                       if 'train_loss' in r], 'o-', ms=3,
                     color=color, label=label)
        ax_acc.plot([r['epoch'] for r in rows if TOP1 in r], [r[TOP1] for r in rows if TOP1 in r], 'o-', ms=3,
                    color=color, label=label)
    ax_loss.set(xlabel='epoch', ylabel='training loss', title='training loss')
    ax_acc.set(xlabel='epoch', ylabel='validation top-1 (%)', title='validation top-1')
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=7, loc='best')
    out['learning_curves.png'] = _png(fig)
    return out


def write_report(out: str) -> List[str]:
    """Merge the finished runs under `out` into out/report.{md,csv,json} and the three plots. Everything is built
    in memory first and each file is replaced atomically, so a refusal leaves the folder as it was."""
    from zoo.weights import atomic_write
    report = collect(out)
    files = {'report.md': markdown(report).encode(), 'report.csv': csv_text(report).encode(),
             'report.json': json.dumps(report, indent=1).encode(), **plots(report)}
    paths = []
    for name in REPORT_FILES:
        path = os.path.join(out, name)
        with atomic_write(path) as tmp, open(tmp, 'wb') as f:
            f.write(files[name])
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------- command

def build_parser(prog: str = 'zoo compare') -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description='Train one backbone once per mixer plan with one recipe, '
                                'evaluate every run, measure each plan\'s cost with the benchmark harness, and write '
                                'one report (markdown, CSV, JSON, plots) of accuracy against cost.')
    p.add_argument('--mixers', nargs='+', default=list(DEFAULT_PLANS), metavar='PLAN',
                   help="mixer plans, one per run: a name for every stage ('window', 'linear:inline') or one entry "
                        "per stage separated by '/' ('cbam/window/neighborhood/grid'); default: "
                        + ' '.join(DEFAULT_PLANS))
    p.add_argument('--backbone', default='hybrid_tiny', help='a zoo backbone taking mixers= (hybrid_tiny, '
                                                             'hybrid_small)')
    p.add_argument('--data', default='digits', help="'digits' (scikit-learn's handwritten digits), 'photos' "
                                                    "(crops of scikit-learn's two photographs) or a folder with "
                                                    "train/<class>/ and val/<class>/")
    p.add_argument('--epochs', type=int, default=DEFAULT_EPOCHS)
    p.add_argument('--img-size', type=int, default=DEFAULT_IMG_SIZE)
    p.add_argument('--seeds', type=int, nargs='+', default=list(DEFAULT_SEEDS))
    p.add_argument('--batch-size', type=int, default=None, help='training batch (default: the recipe\'s, 64)')
    p.add_argument('--reduced', action=argparse.BooleanOptionalAction, default=True,
                   help='the narrow backbone of zoo.reduced_args (default; --no-reduced for full widths)')
    p.add_argument('--out', default=os.path.join('work_dirs', 'compare'),
                   help='the report and every run\'s work dir (out/runs/<plan>__seed<k>)')
    p.add_argument('--shard', default=None, metavar='I/N', help='run only slice I of N (1-based), no report')
    p.add_argument('--report', default=None, metavar='DIR', help='merge the finished runs under DIR, train nothing')
    p.add_argument('--opts', nargs='+', default=[], metavar='KEY=VALUE',
                   help='recipe overrides shared by every run (part of the recipe), e.g. optim_wrapper.optimizer.lr=1e-3')
    p.add_argument('--wandb', default=None, metavar='PROJECT',
                   help='log every run to wandb PROJECT, in one group per comparison (WANDB_MODE=offline works)')
    p.add_argument('--threads', type=int, default=None, help='torch intra-op threads')
    return p


def _check_args(args: argparse.Namespace) -> None:
    for key, low in (('epochs', 1), ('img_size', 8), ('batch_size', 1), ('threads', 1)):
        value = getattr(args, key)
        if value is not None and value < low:
            raise CompareError(f'--{key.replace("_", "-")}: expected an integer >= {low}, got {value}')
    if len(set(args.seeds)) != len(args.seeds):
        raise CompareError(f'--seeds: expected distinct seeds, got {args.seeds}')


def compare(args: argparse.Namespace, log=lambda msg: print(f'zoo compare: {msg}', flush=True)) -> Dict[str, Any]:
    """Check everything, then train / resume / skip the runs of this shard; write the report unless sharded."""
    if args.report:
        out = os.path.abspath(args.report)
        if not os.path.isdir(out):
            raise CompareError(f'--report: no such folder {args.report!r}')
        return dict(report=write_report(out))
    _check_args(args)
    if not _is_main():  # torchrun: rank 0 speaks
        def log(msg: str) -> None:
            pass
    shard = parse_shard(args.shard)
    kwargs, depths = backbone_kwargs(args.backbone, args.reduced, args.img_size)
    plans = check_plans(args.backbone, args.mixers, kwargs, depths)
    data = resolve_data(args.data)
    recipe = recipe_fields(args, data)
    from . import ConfigError
    out = os.path.abspath(args.out)
    runs = [Run(text, stages, seed) for text, stages in plans for seed in args.seeds]
    data_roots = None
    if data['data'] == 'photos':
        data_roots = (os.path.join(out, 'data', 'photos', 'train'), os.path.join(out, 'data', 'photos', 'val'))
    elif data['data'] != 'digits':
        data_roots = (os.path.join(data['data'], 'train'), os.path.join(data['data'], 'val'))
    try:  # the recipe (with --opts) builds a valid config before anything is written
        run_config(recipe, runs[0], kwargs, data_roots)
    except ConfigError as e:
        raise CompareError(f'--opts: {e}') from None
    earlier = existing_runs(out)
    if earlier:
        diff = recipe_difference([('this command', recipe)] + [(n, i.get('recipe', {})) for n, i in earlier.items()])
        if diff:
            raise CompareError(f'--out {args.out}: it holds runs of another recipe ({diff}); use another --out')
    mine = [r for k, r in enumerate(runs) if k % shard[1] == shard[0] - 1]
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if data['data'] == 'photos':
        _photo_data(os.path.join(out, 'data', 'photos'))
    wandb = None
    if args.wandb:
        import hashlib
        key = hashlib.sha1(json.dumps([out, recipe], sort_keys=True).encode()).hexdigest()[:8]
        wandb = dict(project=args.wandb, group=f'compare-{plan_slug(os.path.basename(out))}-{key}',
                     job_type='compare')
    log(f'{len(mine)} of {len(runs)} runs in this shard ({shard[0]}/{shard[1]}): '
        + ', '.join(r.name for r in mine))
    status = {r.name: train_one(out, recipe, r, kwargs, data_roots, wandb, log) for r in mine}
    result: Dict[str, Any] = dict(out=out, runs=status, wandb_group=wandb and wandb['group'])
    if shard[1] == 1 and _is_main():
        result['report'] = write_report(out)
        log(f'report: {result["report"][0]}')
    elif _is_main():
        log(f'shard {shard[0]}/{shard[1]} done; merge the finished runs with: zoo compare --report {args.out}')
    return result


def main(argv: Optional[List[str]] = None, prog: str = 'zoo compare') -> int:
    """`zoo compare ...`; returns the exit code (2: bad input, reported on one line before anything runs)."""
    args = build_parser(prog).parse_args(argv)
    from zoo.weights import IncompatibleKeysError, WeightsFileError

    from . import ConfigError, DatasetError
    try:
        compare(args)
    except (CompareError, ConfigError, DatasetError, FileNotFoundError, IncompatibleKeysError, WeightsFileError,
            FloatingPointError) as e:  # a non-finite loss (1) is a failed run, the rest bad input (2)
        print(f'{prog}: error: {e}', file=sys.stderr)
        return 1 if isinstance(e, FloatingPointError) else 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
