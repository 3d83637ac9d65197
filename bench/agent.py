"""Agent attention on CPU: Agent-Swin-T vs Swin-T, the agent mixer vs window and global attention, and the
figures behind "no Triton kernel for agent attention".

    python -m zoo.bench.agent [--parts models mixers analysis] [--batch 8] [--sizes 28 56 112] [--repeats 5]
                              [--threads 1] [--out DIR]

models    agent_swin_tiny and swin_tiny in ONE run (interleaved repeats, median): eval forward (no_grad) and a
          training step (forward, cross-entropy, backward, AdamW step) at 224 px, batch --batch; peak memory.
mixers    C=96, 3 heads x 32 (Agent-Swin-T stage 1), batch 1, fp32, at S x S maps for S in --sizes: the agent
          mixer (--agents agents, default 49), Swin window attention (window 7) and global softmax attention
          (qkv + F.scaled_dot_product_attention + proj: O(N^2) time, O(N) memory on CPU); forward and
          forward+backward time and peak memory. Global attention is skipped above --global-max-tokens.
analysis  agent_swin_tiny at 224 px, batch --batch: the share of the agent core (pooling, biases, both attentions:
          all a fused kernel could replace) in the model's FLOPs, in the bytes its ops write, and in its CPU
          forward time. A fused kernel can save at most these shares.

Peak memory: bytes PyTorch's CPU allocator hands out during one call beyond what was allocated before
(torch.profiler allocation events, `zoo.bench.mixers.peak_allocated`). Writes DIR/agent.{json,md}.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

PARTS = ('models', 'mixers', 'analysis')


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog or 'python -m zoo.bench.agent', description=__doc__.split('\n')[0])
    p.add_argument('--parts', nargs='+', choices=PARTS, default=list(PARTS), help='what to run (default: all)')
    p.add_argument('--batch', type=int, default=8, help='model batch size (default 8)')
    p.add_argument('--img-size', type=int, default=224, help='model input size (default 224)')
    p.add_argument('--sizes', type=int, nargs='+', default=[28, 56, 112], help='mixer map sides (default 28 56 112)')
    p.add_argument('--agents', type=int, default=49, help='agents of the mixer benchmark (default 49)')
    p.add_argument('--global-max-tokens', type=int, default=112 * 112, help='skip global attention above this')
    p.add_argument('--repeats', type=int, default=5, help='interleaved repeats, median reported (default 5)')
    p.add_argument('--threads', type=int, default=1, help='torch threads (default 1)')
    p.add_argument('--models', nargs=2, default=['agent_swin_tiny', 'swin_tiny'], metavar=('OURS', 'ANCHOR'),
                   help='the two models compared (default agent_swin_tiny swin_tiny)')
    p.add_argument('--model-kwargs', type=json.loads, default={},
                   help='JSON kwargs for both models (e.g. a reduced width for a quick check)')
    p.add_argument('--out', default=None, help='output folder (default: work_dirs/bench/<time>/)')
    return p


def _median_ms(fns: Dict[str, Callable[[], Any]], repeats: int) -> Dict[str, float]:
    """Median wall ms per call of each fn, calls interleaved in a rotating order after one warm-up call each."""
    for fn in fns.values():
        fn()
    names, runs = list(fns), {n: [] for n in fns}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            runs[name].append(1000 * (time.perf_counter() - t0))
    return {n: statistics.median(v) for n, v in runs.items()}


def _mib(fn: Callable[[], Any]) -> float:
    from .mixers import peak_allocated
    return peak_allocated(fn)[0] / 2 ** 20


# ------------------------------------------------------------------------------------------------ models

def bench_models(args) -> List[Dict[str, Any]]:
    import timm
    import torch
    import zoo  # noqa: F401  (registers the models)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    target = torch.randint(0, 1000, (args.batch,))
    passes, rows = {}, []
    for name in args.models:
        torch.manual_seed(0)
        model = timm.create_model(name, **args.model_kwargs)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

        def forward(model=model):
            model.eval()
            with torch.no_grad():
                return model(x)

        def train_step(model=model, opt=opt):
            model.train()
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x), target)
            loss.backward()
            opt.step()
            return loss.detach()
        passes[f'{name}/fwd'], passes[f'{name}/train'] = forward, train_step
        rows.append(dict(model=name, params_m=sum(p.numel() for p in model.parameters()) / 1e6))
    times = _median_ms(passes, args.repeats)
    for row in rows:
        name = row['model']
        row.update(fwd_ms=times[f'{name}/fwd'], train_ms=times[f'{name}/train'],
                   fwd_img_s=1000 * args.batch / times[f'{name}/fwd'],
                   fwd_peak_mib=_mib(passes[f'{name}/fwd']), train_peak_mib=_mib(passes[f'{name}/train']))
    return rows


# ------------------------------------------------------------------------------------------------ mixers

def _global_attention(dim: int, num_heads: int):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class GlobalAttention(nn.Module):
        """Multi-head softmax attention over all H * W tokens. (B, H, W, C) -> (B, H, W, C)."""

        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            B, H, W, C = x.shape
            q, k, v = self.qkv(x).view(B, H * W, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(q, k, v)
            return self.proj(out.transpose(1, 2).reshape(B, H, W, C))
    return GlobalAttention()


def bench_mixers(args) -> List[Dict[str, Any]]:
    import torch
    from zoo.blocks import create_mixer
    dim, heads = 96, 3
    rows = []
    for size in args.sizes:
        torch.manual_seed(0)
        modules = {
            'agent': create_mixer('agent', dim, num_heads=heads, agent_num=args.agents,
                                  bias_size=max(size, int(args.agents ** 0.5))),
            'window': create_mixer('window', dim, num_heads=heads, window_size=7),
        }
        if size * size <= args.global_max_tokens:
            modules['global'] = _global_attention(dim, heads)
        x = torch.randn(1, size, size, dim)
        cot = torch.randn_like(x)
        passes = {}
        for name, m in modules.items():
            params = list(m.parameters())

            def fwd(m=m):
                m.eval()
                with torch.no_grad():
                    return m(x)

            def fwd_bwd(m=m, params=params):
                m.train()
                xg = x.detach().requires_grad_()
                return torch.autograd.grad(m(xg), [xg] + params, cot)
            passes[f'{name}/fwd'], passes[f'{name}/fwdbwd'] = fwd, fwd_bwd
        times = _median_ms(passes, args.repeats)
        for name in modules:
            rows.append(dict(mixer=name, size=size, tokens=size * size, fwd_ms=times[f'{name}/fwd'],
                             fwdbwd_ms=times[f'{name}/fwdbwd'], fwd_peak_mib=_mib(passes[f'{name}/fwd']),
                             fwdbwd_peak_mib=_mib(passes[f'{name}/fwdbwd'])))
        for name in ('global',) if 'global' not in modules else ():
            rows.append(dict(mixer=name, size=size, tokens=size * size, skipped='> --global-max-tokens'))
    return rows


# ------------------------------------------------------------------------------------------------ analysis

def analyse(args, name: str = 'agent_swin_tiny') -> Dict[str, Any]:
    """Shares of the agent core in the model's forward (batch --batch): FLOPs, bytes written by ops (new storages), CPU
    time; for the explicit reference and for the fused path (SDPA, what CUDA runs), the latter run here on CPU."""
    import timm
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from torch.utils.flop_counter import FlopCounterMode

    import zoo  # noqa: F401
    import zoo.blocks.agent as agent_block
    from zoo.kernels.agent import agent_attention_ref

    model = timm.create_model(name, **args.model_kwargs).eval()
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    op = agent_block.agent_attention
    state: Dict[str, Any] = dict(inside=False, core_s=0., core_flops=0, fused=False)

    def core(q, k, v, grid, agent_bias=None, query_bias=None, scale=None, dropout_p=0.):
        B, H, W, heads = q.shape[:4]
        n = grid * grid if isinstance(grid, int) else grid[0] * grid[1]
        state['sizes'] = dict(scores=B * heads * n * H * W, bias=heads * n * H * W)
        state['inside'] = True
        t0 = time.perf_counter()
        try:
            if state.get('counter') is not None:
                with state['counter']:
                    out = agent_attention_ref(q, k, v, (grid, grid) if isinstance(grid, int) else tuple(grid),
                                              agent_bias, query_bias, scale, dropout_p, state['fused'])
                state['core_flops'] += state['counter'].get_total_flops()
                return out
            return agent_attention_ref(q, k, v, (grid, grid) if isinstance(grid, int) else tuple(grid), agent_bias,
                                       query_bias, scale, dropout_p, state['fused'])
        finally:
            state['core_s'] += time.perf_counter() - t0
            state['inside'] = False

    class Written(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.total = self.core = 0
            self.kinds = dict(scores=0, bias=0, other=0)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            nbytes = sum(t.numel() * t.element_size() for t in tree_leaves(out)  # new storages only, not views
                         if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen)
            self.total += nbytes
            if state['inside']:
                self.core += nbytes
                for t in tree_leaves(out):  # score-sized (per batch item) / bias-map-sized (shared) / other
                    if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                        kind = next((k for k, size in state['sizes'].items() if t.numel() == size), 'other')
                        self.kinds[kind] += t.numel() * t.element_size()
            return out

    result: Dict[str, Any] = dict(model=name, img_size=args.img_size, batch=args.batch)
    agent_block.agent_attention = core
    try:
        with torch.no_grad():
            for path in ('explicit', 'fused'):
                state['fused'] = path == 'fused'
                total = FlopCounterMode(display=False)
                with total:
                    model(x)
                state['counter'], state['core_flops'] = FlopCounterMode(display=False), 0
                model(x)
                state['counter'] = None
                written = Written()
                with written:
                    model(x)
                model(x)  # warm-up
                runs = []
                for _ in range(args.repeats):
                    state['core_s'] = 0.
                    t0 = time.perf_counter()
                    model(x)
                    runs.append((time.perf_counter() - t0, state['core_s']))
                total_s, core_s = sorted(runs)[len(runs) // 2]
                result[path] = dict(
                    flops_g=total.get_total_flops() / 1e9, core_flops_g=state['core_flops'] / 1e9,
                    core_flops_share=state['core_flops'] / total.get_total_flops(),
                    written_mib=written.total / 2 ** 20, core_written_mib=written.core / 2 ** 20,
                    core_written_share=written.core / written.total,
                    core_written_kinds_mib={k: v / 2 ** 20 for k, v in written.kinds.items()},
                    fwd_ms=1000 * total_s, core_ms=1000 * core_s, core_time_share=core_s / total_s)
    finally:
        agent_block.agent_attention = op
    return result


# ------------------------------------------------------------------------------------------------ output

def _f(v: Optional[float], digits: int = 1) -> str:
    return '-' if v is None else f'{v:.{digits}f}'


def markdown(result: Dict[str, Any]) -> str:
    meta, lines = result['meta'], []
    head = (f"CPU, {meta['threads']} thread(s), fp32, median of {meta['repeats']} interleaved repeats; torch "
            f"{meta['torch']}, {meta['cpu']}.")
    if result.get('models'):
        lines += [f"Models at {meta['img_size']} px, batch {meta['batch']}. {head}", '',
                  '| model | params (M) | fwd ms / batch | img/s | train step ms | peak fwd (MiB) | peak train (MiB) |',
                  '|---|---:|---:|---:|---:|---:|---:|']
        for r in result['models']:
            lines.append(f"| {r['model']} | {r['params_m']:.2f} | {_f(r['fwd_ms'])} | {_f(r['fwd_img_s'], 2)} | "
                         f"{_f(r['train_ms'])} | {_f(r['fwd_peak_mib'])} | {_f(r['train_peak_mib'])} |")
        lines.append('')
    if result.get('mixers'):
        lines += [f"Mixers alone: C=96, 3 heads x 32, batch 1, agents {meta['agents']}, window 7, global = "
                  f"SDPA over all tokens. {head}", '',
                  '| mixer | tokens | fwd ms | fwd+bwd ms | peak fwd (MiB) | peak fwd+bwd (MiB) |',
                  '|---|---:|---:|---:|---:|---:|']
        for r in result['mixers']:
            if r.get('skipped'):
                lines.append(f"| {r['mixer']} | {r['size']}^2 | skipped | | | |")
                continue
            lines.append(f"| {r['mixer']} | {r['size']}^2 | {_f(r['fwd_ms'], 2)} | {_f(r['fwdbwd_ms'], 2)} | "
                         f"{_f(r['fwd_peak_mib'])} | {_f(r['fwdbwd_peak_mib'])} |")
        lines.append('')
    a = result.get('analysis')
    if a:
        lines += [f"Agent core (pooling, biases, both attentions: what a fused kernel replaces) in {a['model']} at "
                  f"{a['img_size']} px, batch {a['batch']}, forward. {head}", '',
                  '| core path | core GFLOP (share) | core bytes written, MiB (share) | core CPU ms (share) |',
                  '|---|---:|---:|---:|']
        labels = (('explicit', 'explicit softmax (CPU / export)'), ('fused', 'SDPA (the CUDA path; here on this CPU)'))
        for path, label in labels:
            r = a[path]
            lines.append(f"| {label} | {r['core_flops_g']:.3f} of {r['flops_g']:.2f} ({r['core_flops_share']:.1%}) | "
                         f"{_f(r['core_written_mib'])} of {_f(r['written_mib'])} ({r['core_written_share']:.1%}) | "
                         f"{_f(r['core_ms'])} of {_f(r['fwd_ms'])} ({r['core_time_share']:.1%}) |")
        kinds = a['explicit']['core_written_kinds_mib']
        lines += ['', f"Bytes the explicit core writes, by kind: {_f(kinds['scores'])} MiB score-sized (batch x heads "
                  f"x agents x tokens: what SDPA's fused CUDA kernel never writes), {_f(kinds['bias'])} MiB bias maps "
                  f"(heads x agents x tokens, shared by the batch), {_f(kinds['other'])} MiB other (pooled agents, "
                  f"scaled and re-laid-out q / k / v, outputs). At batch 1 the bias maps count as score-sized.", '']
    return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    from .run import _cpu_name, _write_atomic, default_out_dir
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or args.threads < 1 or min(args.sizes) < 1:
        parser.error('--batch, --repeats, --threads and --sizes must be positive')
    import torch
    torch.set_num_threads(args.threads)
    result: Dict[str, Any] = dict(meta=dict(
        command=' '.join([parser.prog] + list(sys.argv[1:] if argv is None else argv)),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        img_size=args.img_size, batch=args.batch, sizes=args.sizes, agents=args.agents, repeats=args.repeats,
        threads=torch.get_num_threads(), models=args.models, model_kwargs=args.model_kwargs,
        torch=torch.__version__, python=platform.python_version(), cpu=_cpu_name()))
    if 'models' in args.parts:
        print(f'[bench agent] models {args.models} at {args.img_size} px, batch {args.batch}', file=sys.stderr)
        result['models'] = bench_models(args)
    if 'mixers' in args.parts:
        print(f'[bench agent] mixers at {args.sizes}', file=sys.stderr)
        result['mixers'] = bench_mixers(args)
    if 'analysis' in args.parts:
        print('[bench agent] analysis of the agent core', file=sys.stderr)
        result['analysis'] = analyse(args)
    out_dir = args.out or default_out_dir()
    os.makedirs(out_dir, exist_ok=True)
    table = markdown(result)
    base = os.path.join(out_dir, 'agent')
    _write_atomic(base + '.json', json.dumps(result, indent=2) + '\n')
    _write_atomic(base + '.md', table + '\n')
    print(table)
    print(f'wrote {base}.json, {base}.md')
    return 0


if __name__ == '__main__':
    sys.exit(main())
