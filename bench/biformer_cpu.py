"""CPU benchmark of BiFormer: our routed attention against the official gather formulation (the baseline).

Runs one model twice with identical weights: once as shipped (`zoo.kernels.routing`: region-major
`index_select` + fused 4-D SDPA; backward one `index_add`), once with every routed mixer's op swapped for
GATHER BASELINE = `routed_attention_gather` below, the formulation of the official `ops/bra_legacy.py`
(written from the paper and research note: K and V concatenated region-major, `torch.gather` of the routed
regions out of a broadcast (B, S^2, S^2, w^2, c) view, then manual softmax attention). Global-attention stages
are identical in both. Measures, in ONE process with interleaved repeats (median):

  * forward: images / s, eval mode, no grad, batch --fwd-batch;
  * training step: forward + cross-entropy + backward, train mode, batch --batch;
  * peak memory of one training step: peak live tensor bytes (exact, allocator-independent, `TensorPeak`)
    and the rise of peak RSS in a fresh child process (`--memory-child`).

    python -m zoo.bench.biformer_cpu [--model biformer_tiny] [--img-size 224] [--batch 4] [--threads 2]
        [--repeats 5] [--out bench/results/biformer_cpu]

Writes JSON and a markdown table (atomically). `--reduced` runs the model's
narrow test configuration (a quick check of the script itself).
"""
import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import timm
import torch
import torch.nn.functional as F

import zoo
import zoo.blocks.routing as routing_mixer
from zoo.bench.na_cpu import rss_peak_mb, tensor_peak_mb
from zoo.bench.run import _write_atomic
from zoo.kernels.routing import GLOBAL_TOPK, default_scale, region_routing, routed_attention

__all__ = ['routed_attention_gather', 'gather_baseline', 'run', 'main']

METHODS = ('ours', 'gather_baseline')


def routed_attention_gather(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        n_win: int,
        topk: int,
        *,
        scale: Optional[float] = None,
        idx: Optional[torch.Tensor] = None,
        backend: Optional[str] = None,
) -> torch.Tensor:
    """GATHER BASELINE (official formulation). q, k: (B, H, W, heads, dk); v: (B, H, W, heads, dv) ->
    (B, H, W, heads, dv). Same signature and results as `zoo.kernels.routing.routed_attention`.

    The routed K/V are copied top-k times by `torch.gather` over a broadcast view; its backward allocates a
    gradient of S^2 copies of K/V and reduces it (the official "gather backward").
    """
    if topk in GLOBAL_TOPK:
        return routed_attention(q, k, v, n_win, topk, scale=scale, backend='torch')
    B, H, W, nh, dk = q.shape
    dv = v.shape[-1]
    scale = default_scale(q, topk) if scale is None else scale
    p2, wh, ww = n_win * n_win, H // n_win, W // n_win
    w2 = wh * ww

    def regions(t: torch.Tensor) -> torch.Tensor:  # (B, H, W, heads, d) -> (B, S^2, w^2, heads * d)
        return t.reshape(B, n_win, wh, n_win, ww, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, p2, w2, -1)

    if idx is None:
        idx = region_routing(q, k, n_win, topk, scale)
    topk = idx.shape[-1]
    kv = torch.cat([regions(k), regions(v)], dim=-1)  # official: one kv tensor, [k | v] channels
    c = kv.shape[-1]
    kv_sel = torch.gather(kv.view(B, 1, p2, w2, c).expand(-1, p2, -1, -1, -1), dim=2,
                          index=idx.view(B, p2, topk, 1, 1).expand(-1, -1, -1, w2, c))  # B, S^2, topk, w^2, c
    k_sel, v_sel = kv_sel.split([nh * dk, nh * dv], dim=-1)
    k_sel = k_sel.reshape(B * p2, topk * w2, nh, dk).permute(0, 2, 3, 1)  # (B S^2), heads, dk, topk w^2
    v_sel = v_sel.reshape(B * p2, topk * w2, nh, dv).transpose(1, 2)  # (B S^2), heads, topk w^2, dv
    q_pix = regions(q).reshape(B * p2, w2, nh, dk).transpose(1, 2)  # (B S^2), heads, w^2, dk
    attn = ((q_pix * scale) @ k_sel).softmax(dim=-1)
    out = attn @ v_sel  # (B S^2), heads, w^2, dv
    out = out.reshape(B, n_win, n_win, nh, wh, ww, dv).permute(0, 1, 4, 2, 5, 3, 6)
    return out.reshape(B, H, W, nh, dv)


@contextlib.contextmanager
def gather_baseline() -> Iterator[None]:
    """Within: every BiLevelRoutingAttention mixer runs the gather baseline instead of our op."""
    prev = routing_mixer.routed_attention
    routing_mixer.routed_attention = routed_attention_gather
    try:
        yield
    finally:
        routing_mixer.routed_attention = prev


def _method(name: str):
    return gather_baseline() if name == 'gather_baseline' else contextlib.nullcontext()


def _build(args: argparse.Namespace) -> torch.nn.Module:
    kwargs = zoo.reduced_args(args.model) if args.reduced else {}
    torch.manual_seed(0)
    return timm.create_model(args.model, **kwargs)


def _train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    for p in model.parameters():
        p.grad = None


def _forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _inputs(args: argparse.Namespace, batch: int) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, args.img_size, args.img_size, generator=g)
    y = torch.randint(0, 1000, (batch,), generator=g)
    return x, y


def _tasks(model: torch.nn.Module, args: argparse.Namespace) -> Dict[str, Callable[[], object]]:
    xf, _ = _inputs(args, args.fwd_batch)
    xt, yt = _inputs(args, args.batch)

    def fwd():
        model.eval()
        return _forward(model, xf)

    def train():
        model.train()
        return _train_step(model, xt, yt)

    return {'fwd': fwd, 'train': train}


def _memory_child(method: str, args: argparse.Namespace) -> None:
    model = _build(args)
    train = _tasks(model, args)['train']
    with _method(method):
        train()  # warm-up
        print(json.dumps(dict(peak_mb=rss_peak_mb(train))))


def _rss_in_child(method: str, args: argparse.Namespace) -> Optional[float]:
    cmd = [sys.executable, os.path.abspath(__file__), '--memory-child', method, '--model', args.model,
           '--img-size', str(args.img_size), '--batch', str(args.batch), '--fwd-batch', str(args.fwd_batch),
           '--threads', str(args.threads)] + (['--reduced'] if args.reduced else [])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])['peak_mb']
    except (IndexError, ValueError, KeyError):
        print(f'memory child failed: {proc.stderr[-800:]}', file=sys.stderr)
        return None


def run(args: argparse.Namespace) -> List[dict]:
    """One row per method: wall / CPU medians of forward and training step, peak memory of a training step."""
    model = _build(args)
    tasks = _tasks(model, args)
    with torch.no_grad():  # same outputs, or the comparison is meaningless
        model.eval()
        x, _ = _inputs(args, 2)
        ours = model(x)
        with gather_baseline():
            base = model(x)
    max_diff = (ours - base).abs().max().item()
    wall: Dict[tuple, List[float]] = {(m, t): [] for m in METHODS for t in tasks}
    cpu: Dict[tuple, List[float]] = {(m, t): [] for m in METHODS for t in tasks}
    for m in METHODS:  # warm-up
        with _method(m):
            for f in tasks.values():
                f()
    for _ in range(args.repeats):  # interleaved
        for m in METHODS:
            with _method(m):
                for t, f in tasks.items():
                    c0, t0 = time.process_time(), time.perf_counter()
                    f()
                    wall[(m, t)].append(time.perf_counter() - t0)
                    cpu[(m, t)].append(time.process_time() - c0)
    rows = []
    for m in METHODS:
        row = dict(method=m, max_abs_logit_diff_vs_ours=max_diff)
        for t in tasks:
            row[f'{t}_s'] = statistics.median(wall[(m, t)])
            row[f'{t}_cpu_s'] = statistics.median(cpu[(m, t)])
            row[f'{t}_s_all'] = [round(s, 4) for s in wall[(m, t)]]
        row['fwd_img_per_s'] = args.fwd_batch / row['fwd_s']
        with _method(m):
            row['train_peak_tensor_mb'] = tensor_peak_mb(tasks['train'])
        row['train_peak_rss_mb'] = None if args.no_rss else _rss_in_child(m, args)
        rows.append(row)
    return rows


def _fmt(x: Optional[float], digits: int = 2) -> str:
    return '-' if x is None else f'{x:.{digits}f}'


def markdown(rows: List[dict], args: argparse.Namespace) -> str:
    ours, base = (next(r for r in rows if r['method'] == m) for m in METHODS)

    def ratio(key: str, invert: bool = False) -> str:
        a, b = ours.get(key), base.get(key)
        if not a or not b:
            return '-'
        return f'{(a / b if invert else b / a):.2f}x'

    lines = [
        f'{args.model}{" (reduced)" if args.reduced else ""} on CPU, {args.img_size} px, fp32, '
        f'{torch.get_num_threads()} threads, median of {args.repeats} interleaved repeats. Forward: eval, no grad, '
        f'batch {args.fwd_batch}. Training step: forward + cross-entropy + backward, batch {args.batch}. '
        'Peak: live tensor MiB of one training step, and the rise of peak RSS in a fresh process. '
        'gather_baseline = the official formulation (torch.gather of routed K/V), see bench/biformer_cpu.py. '
        f'Max |logit difference| between the two: {ours["max_abs_logit_diff_vs_ours"]:.2e}.',
        '',
        '| method | forward img/s | train step s | train step CPU s | train peak tensor MiB | train peak RSS MiB |',
        '|---|---|---|---|---|---|',
    ]
    for r in rows:
        lines.append(f'| {r["method"]} | {_fmt(r["fwd_img_per_s"])} | {_fmt(r["train_s"], 3)} | '
                     f'{_fmt(r["train_cpu_s"], 3)} | {_fmt(r["train_peak_tensor_mb"], 0)} | '
                     f'{_fmt(r["train_peak_rss_mb"], 0)} |')
    lines.append(f'| ours vs baseline | {ratio("fwd_img_per_s", invert=True)} faster | {ratio("train_s")} faster '
                 f'| {ratio("train_cpu_s")} less | {ratio("train_peak_tensor_mb", invert=True)} of baseline | '
                 f'{ratio("train_peak_rss_mb", invert=True)} of baseline |')
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='biformer_tiny')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--batch', type=int, default=4, help='training-step batch')
    parser.add_argument('--fwd-batch', type=int, default=8, help='forward batch')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--reduced', action='store_true', help="the model's narrow test configuration")
    parser.add_argument('--no-rss', action='store_true', help='skip the child-process RSS measurement')
    parser.add_argument('--out', default='bench/results/biformer_cpu', help='output path without extension')
    parser.add_argument('--memory-child', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        _memory_child(args.memory_child, args)
        return []
    rows = run(args)
    table = markdown(rows, args)
    print(table)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        meta = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                    cpu_count=os.cpu_count(), threads=torch.get_num_threads(), args=vars(args),
                    command=' '.join([os.path.basename(sys.executable)] + sys.argv))
        _write_atomic(args.out + '.json', json.dumps(dict(meta=meta, rows=rows), indent=1))
        _write_atomic(args.out + '.md', table + '\n')
        print(f'wrote {args.out}.json and {args.out}.md', file=sys.stderr)
    return rows


if __name__ == '__main__':
    main()
