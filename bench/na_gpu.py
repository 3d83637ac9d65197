"""GPU benchmark of the neighborhood-attention op: Triton kernel vs natten's fused kernels vs SDPA vs reference.

Times forward and forward+backward on NAT/DiNAT-Tiny stage shapes at 224 px (kernel 7, head dim 32;
dilation 1 and DiNAT's dilated layer of each stage), in fp16, bf16 and fp32. Prints a markdown table and
writes JSON. Needs CUDA; exits with a message otherwise.

    python bench/na_gpu.py [--batch 32] [--dtypes fp16 bf16 fp32] [--out bench/results/na_gpu]

Methods:
  triton       kernels.neighborhood.triton with RPB (fused: halo tile, in-kernel mask, RPB by index math)
  triton_norpb the same kernel without RPB (like-for-like with natten)
  natten       natten.na2d, natten's own backend choice (CUTLASS / Hopper / Blackwell FNA); no RPB
  sdpa         F.scaled_dot_product_attention over all N tokens with a dense float mask
               (RPB scattered into -inf, (heads, N, N), broadcast over the batch)
  reference    kernels.neighborhood.reference gather path (PyTorch ops), with RPB

``--smoke`` runs one tiny shape on CPU through the Triton interpreter (TRITON_INTERPRET=1) to check the
script itself; its timings mean nothing.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

# NAT-Tiny at 224: (map size, heads, DiNAT dilation of the dilated layers)
NAT_T_STAGES = [(56, 2, 8), (28, 4, 4), (14, 8, 2), (7, 16, 1)]
DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16, 'fp32': torch.float32}
KERNEL = 7
HEAD_DIM = 32


def sdpa_neighborhood_attention(q, k, v, kernel, dilation, rpb, scale):
    """Dense SDPA over all tokens with a (heads, N, N) float mask: RPB on the neighborhood, -inf elsewhere."""
    from zoo.kernels.neighborhood.reference import na_tables
    B, H, W, nh, d = q.shape
    N = H * W
    key_index, bias_index = na_tables(H, W, kernel, dilation, q.device)
    vals = rpb.flatten(1)[:, bias_index].to(q.dtype) if rpb is not None else q.new_zeros(nh, *key_index.shape)
    mask = torch.full((nh, N, N), float('-inf'), device=q.device, dtype=q.dtype).scatter(
        2, key_index.expand(nh, -1, -1), vals)

    def heads_first(t):
        return t.reshape(B, N, nh, d).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), attn_mask=mask[None],
                                         scale=scale)
    return out.transpose(1, 2).reshape(B, H, W, nh, d)


def _methods() -> Dict[str, Callable]:
    from zoo.kernels.neighborhood.reference import neighborhood_attention_ref
    from zoo.kernels.neighborhood.triton import neighborhood_attention_triton
    methods = {
        'triton': lambda q, k, v, ker, dil, rpb, sc: neighborhood_attention_triton(q, k, v, ker, dil, rpb, sc),
        'triton_norpb': lambda q, k, v, ker, dil, rpb, sc: neighborhood_attention_triton(q, k, v, ker, dil, None, sc),
        'sdpa': sdpa_neighborhood_attention,
        'reference': lambda q, k, v, ker, dil, rpb, sc: neighborhood_attention_ref(q, k, v, ker, dil, rpb, sc,
                                                                                   impl='gather'),
    }
    try:
        from natten.functional import na2d
        methods['natten'] = lambda q, k, v, ker, dil, rpb, sc: na2d(q, k, v, ker, dilation=dil, scale=sc)
    except Exception as e:  # noqa: BLE001
        print(f'natten not importable ({type(e).__name__}: {e}); skipping it', file=sys.stderr)
    return methods


def _time_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    if device.type == 'cuda':
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=10, rep=max(repeats, 25)))
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def run(args, device: torch.device, stages) -> List[dict]:
    methods = _methods()
    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for size, heads, dilated in stages:
            for dilation in sorted({1, dilated}):
                torch.manual_seed(0)
                shape = (args.batch, size, size, heads, args.head_dim)
                q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
                table = (heads, 2 * args.kernel - 1, 2 * args.kernel - 1)
                rpb = (0.1 * torch.randn(table, device=device)).requires_grad_()
                grad = torch.randn(shape, device=device, dtype=dtype)
                ker, dil, scale = (args.kernel, args.kernel), (dilation, dilation), args.head_dim ** -0.5
                refs = {}
                for name, fn in methods.items():
                    row = dict(dtype=dtype_name, size=size, heads=heads, dilation=dilation, method=name)
                    try:
                        with warnings.catch_warnings():
                            warnings.simplefilter('ignore')
                            with torch.no_grad():
                                out = fn(q, k, v, ker, dil, rpb, scale)
                            if name in ('triton', 'triton_norpb'):
                                refs[name] = out.float()
                            # natten has no RPB: compare it with the kernel run without RPB
                            against = refs.get('triton_norpb' if name == 'natten' else 'triton')
                            if name in ('sdpa', 'reference', 'natten') and against is not None:
                                row['max_abs_diff_vs_triton'] = float((out.float() - against).abs().max())
                            row['fwd_ms'] = _time_ms(lambda: _no_grad(fn, q, k, v, ker, dil, rpb, scale), device,
                                                     args.repeats)

                            def fwd_bwd():
                                out = fn(q, k, v, ker, dil, rpb, scale)
                                inputs = [q, k, v] + ([rpb] if name not in ('natten', 'triton_norpb') else [])
                                torch.autograd.grad(out, inputs, grad)
                            row['fwd_bwd_ms'] = _time_ms(fwd_bwd, device, args.repeats)
                    except Exception as e:  # noqa: BLE001  (a method that cannot run a shape is reported, not fatal)
                        row['error'] = f'{type(e).__name__}: {str(e)[:200]}'
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def _no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)


def markdown(rows: List[dict]) -> str:
    lines = ['| dtype | map | heads | dilation | method | fwd ms | fwd+bwd ms | note |',
             '|---|---|---|---|---|---|---|---|']
    for r in rows:
        note = r.get('error', '')
        if 'max_abs_diff_vs_triton' in r:
            note = f'max |diff| vs triton {r["max_abs_diff_vs_triton"]:.2e}'
        fwd = f'{r["fwd_ms"]:.3f}' if 'fwd_ms' in r else '-'
        fb = f'{r["fwd_bwd_ms"]:.3f}' if 'fwd_bwd_ms' in r else '-'
        lines.append(f'| {r["dtype"]} | {r["size"]}x{r["size"]} | {r["heads"]} | {r["dilation"]} | {r["method"]} | '
                     f'{fwd} | {fb} | {note} |')
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--dtypes', nargs='+', default=['fp16', 'bf16', 'fp32'], choices=list(DTYPES))
    parser.add_argument('--kernel', type=int, default=KERNEL)
    parser.add_argument('--head-dim', type=int, default=HEAD_DIM)
    parser.add_argument('--repeats', type=int, default=50)
    parser.add_argument('--smoke', action='store_true', help='tiny CPU run through the Triton interpreter')
    parser.add_argument('--out', default='bench/results/na_gpu', help='output path without extension')
    args = parser.parse_args(argv)

    if args.smoke:
        if os.environ.get('TRITON_INTERPRET') != '1':
            sys.exit('--smoke needs TRITON_INTERPRET=1 in the environment (set before triton is imported)')
        device = torch.device('cpu')
        args.batch, args.dtypes, args.repeats, args.kernel = 1, ['fp32'], 1, 3
        stages = [(6, 1, 2)]
    else:
        if not torch.cuda.is_available():
            sys.exit('bench/na_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); '
                     'for CPU numbers run bench/na_cpu.py')
        device = torch.device('cuda')
        stages = NAT_T_STAGES

    rows = run(args, device, stages)
    table = markdown(rows)
    print(table)
    meta = dict(torch=torch.__version__, python=platform.python_version(), args=vars(args),
                device=torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu (interpreter smoke test)')
    os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
    with open(args.out + '.json', 'w') as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    with open(args.out + '.md', 'w') as f:
        f.write(table + '\n')
    print(f'wrote {args.out}.json and {args.out}.md', file=sys.stderr)


if __name__ == '__main__':
    main()
