"""GPU benchmark of BiFormer's routed token attention: the Triton kernel against the gather baseline, the
PyTorch reference and FlexAttention with a block mask built from the routing.

Op level, at the shapes of BiFormer-T's three routed stages at --img-size (default 224: 56 x 56 maps with
2 heads and top-k 1, 28 x 28 / 4 heads / top-k 4, 14 x 14 / 8 heads / top-k 16; head dim 32, n_win 7), batch
--batch, fp16 by default. Per method: forward ms and forward + backward ms (CUDA events, median of --repeats
after warm-up) and the peak CUDA memory of a forward + backward above the inputs. All methods get the same
routing (computed once), so they compute the same function; the script checks that first.

    python -m zoo.bench.biformer_gpu [--img-size 224] [--batch 16] [--dtype fp16] [--repeats 20]
        [--out bench/results/biformer_gpu]

Methods:
  triton           zoo.kernels.routing.routed_attention(backend='triton'): block-sparse kernel reading routed
                   K/V tiles by region index, online softmax; backward with fp32 atomics for dK / dV
  reference        the same op, backend='torch' (region-major index_select + SDPA, or dense masked SDPA)
  gather_baseline  the official formulation (bench.biformer_cpu.routed_attention_gather)
  flex             torch.nn.attention.flex_attention (compiled on CUDA) on region-major tokens with
                   create_block_mask(mask_mod = routed[b, q // w^2, kv // w^2])

Without CUDA (a check of the script itself) it runs on CPU at the given sizes: Triton needs TRITON_INTERPRET=1
and tiny sizes, and flex runs forward only (no CPU backward in torch).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

from zoo.bench.biformer_cpu import routed_attention_gather
from zoo.bench.run import _write_atomic
from zoo.kernels.backend import interpreter_on, triton_available
from zoo.kernels.routing import default_scale, from_regions, region_routing, routed_attention, to_regions

__all__ = ['flex_routed_attention', 'stage_shapes', 'run', 'main']

_DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16, 'fp32': torch.float32}


def flex_routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_win: int, idx: torch.Tensor,
                          scale: float, compiled: bool = False) -> torch.Tensor:
    """Routed attention through FlexAttention. q, k: (B, H, W, heads, dk); v: (B, H, W, heads, dv);
    idx: (B, n_win^2, topk) -> (B, H, W, heads, dv). Tokens are permuted to region-major order so that every
    region is a contiguous block of w^2 tokens; the block mask comes from the routing (built per call)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    B, H, W, nh, _ = q.shape
    p2, w2 = n_win * n_win, (H // n_win) * (W // n_win)
    routed = torch.zeros(B, p2, p2, dtype=torch.bool, device=q.device).scatter_(2, idx, True)

    def mask_mod(b, h, q_idx, kv_idx):
        return routed[b, q_idx // w2, kv_idx // w2]

    N = H * W
    block_mask = create_block_mask(mask_mod, B, None, N, N, device=q.device)
    qr, kr, vr = (to_regions(t, n_win).reshape(B, nh, N, -1) for t in (q, k, v))
    fn = torch.compile(flex_attention) if compiled else flex_attention
    out = fn(qr, kr, vr, block_mask=block_mask, scale=scale)
    return from_regions(out.reshape(B, nh, p2, w2, -1), n_win, (H, W))


def stage_shapes(img_size: int) -> List[dict]:
    """BiFormer-T's routed stages at `img_size` (maps padded up to multiples of n_win = 7)."""
    out = []
    for stage, (heads, topk) in enumerate(((2, 1), (4, 4), (8, 16))):
        side = -(-img_size // 2 ** (stage + 2))
        out.append(dict(stage=stage + 1, size=-(-side // 7) * 7, heads=heads, topk=topk, head_dim=32, n_win=7))
    return out


def _methods(device: torch.device) -> Dict[str, Callable]:
    cuda = device.type == 'cuda'
    methods = {
        'reference': lambda q, k, v, s, idx: routed_attention(q, k, v, s['n_win'], s['topk'], idx=idx,
                                                              backend='torch'),
        'gather_baseline': lambda q, k, v, s, idx: routed_attention_gather(q, k, v, s['n_win'], s['topk'], idx=idx),
        'flex': lambda q, k, v, s, idx: flex_routed_attention(q, k, v, s['n_win'], idx, default_scale(q, s['topk']),
                                                              compiled=cuda),
    }
    if triton_available() and (cuda or interpreter_on()):
        methods['triton'] = lambda q, k, v, s, idx: routed_attention(q, k, v, s['n_win'], s['topk'], idx=idx,
                                                                     backend='triton')
    return methods


def _timer(device: torch.device):
    if device.type == 'cuda':
        def timed(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
    else:
        def timed(fn):
            t0 = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - t0)
    return timed


def measure(call: Callable[[], object], fwd_bwd: Optional[Callable[[], object]], device: torch.device, warmup: int,
            repeats: int) -> Dict[str, float]:
    """fwd_ms (`call` under no_grad) and, given `fwd_bwd`, fwd_bwd_ms and on CUDA fwd_bwd_peak_mb (peak memory of one
    forward + backward above what was allocated before): medians of `repeats` timed calls after `warmup` rounds."""
    timed = _timer(device)
    for _ in range(warmup):
        with torch.no_grad():
            call()
        if fwd_bwd is not None:
            fwd_bwd()
    with torch.no_grad():
        out = dict(fwd_ms=statistics.median(timed(call) for _ in range(repeats)))
    if fwd_bwd is None:
        return out
    out['fwd_bwd_ms'] = statistics.median(timed(fwd_bwd) for _ in range(repeats))
    if device.type == 'cuda':
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        out['fwd_bwd_peak_mb'] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    return out


def run(args: argparse.Namespace) -> List[dict]:
    device = torch.device('cuda' if torch.cuda.is_available() and not args.cpu else 'cpu')
    dtype = _DTYPES[args.dtype]
    rows = []
    for shape in stage_shapes(args.img_size):
        if args.stages and shape['stage'] not in args.stages:
            continue
        g = torch.Generator(device='cpu').manual_seed(0)
        q, k, v = (torch.randn(args.batch, shape['size'], shape['size'], shape['heads'], shape['head_dim'],
                               generator=g).to(device, dtype).requires_grad_() for _ in range(3))
        idx = region_routing(q, k, shape['n_win'], shape['topk'], (shape['heads'] * shape['head_dim']) ** -0.5)
        grad = torch.randn(q.shape, generator=g).to(device, dtype)
        want = None
        for name, fn in _methods(device).items():
            row = dict(shape, batch=args.batch, dtype=args.dtype, method=name, device=device.type)
            call = (lambda fn=fn: fn(q, k, v, shape, idx))

            def fwd_bwd(call=call):
                out = call()
                out.backward(grad)
                for t in (q, k, v):
                    t.grad = None

            with torch.no_grad():
                out = call().float()
            if want is None:
                want = out
            row['max_abs_err_vs_reference'] = (out - want).abs().max().item()
            backward_ok = not (name == 'flex' and device.type != 'cuda')
            row.update(measure(call, fwd_bwd if backward_ok else None, device, args.warmup, args.repeats))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def _fmt(x: Optional[float], digits: int = 2) -> str:
    return '-' if x is None else f'{x:.{digits}f}'


def markdown(rows: List[dict], args: argparse.Namespace) -> str:
    lines = [f'BiFormer-T routed stages at {args.img_size} px, batch {args.batch}, {args.dtype}, '
             f'device {rows[0]["device"] if rows else "-"}, median of {args.repeats}. Peak: CUDA memory above the '
             'inputs during one forward + backward.', '',
             '| stage | map | heads | top-k | method | fwd ms | fwd+bwd ms | peak MiB | max abs err |',
             '|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        lines.append(f'| {r["stage"]} | {r["size"]}x{r["size"]} | {r["heads"]} | {r["topk"]} | {r["method"]} | '
                     f'{_fmt(r.get("fwd_ms"), 3)} | {_fmt(r.get("fwd_bwd_ms"), 3)} | '
                     f'{_fmt(r.get("fwd_bwd_peak_mb"), 1)} | {r["max_abs_err_vs_reference"]:.1e} |')
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--dtype', choices=sorted(_DTYPES), default='fp16')
    parser.add_argument('--repeats', type=int, default=20)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--stages', type=int, nargs='*', default=None, help='routed stages to run (default: 1 2 3)')
    parser.add_argument('--cpu', action='store_true', help='run on CPU even with CUDA (a check of the script)')
    parser.add_argument('--out', default='bench/results/biformer_gpu',
                        help='output path without extension ("" for none)')
    args = parser.parse_args(argv)
    rows = run(args)
    table = markdown(rows, args)
    print(table)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        meta = dict(torch=torch.__version__, python=platform.python_version(), args=vars(args),
                    gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
        _write_atomic(args.out + '.json', json.dumps(dict(meta=meta, rows=rows), indent=1))
        _write_atomic(args.out + '.md', table + '\n')
    return rows


if __name__ == '__main__':
    main()
