"""GPU benchmark of the window-attention op: Triton kernel vs PyTorch reference vs SDPA.

Times forward and forward+backward (grads of q, k, v and the bias table) on the Swin-T stage
shapes (window 7, head_dim 32; shift 3 except the 7x7 stage, where Swin uses no shift), in
fp16, bf16 and fp32. Prints a markdown table and writes JSON. Needs CUDA.

    python bench/gpu_window.py [--batch 32] [--dtypes fp16 bf16 fp32] [--out bench/results/gpu_window.json]

Methods:
  triton     kernels.window.triton (fused index math, masks and bias; one program per window)
  reference  kernels.window.reference (pad, roll, partition, manual softmax attention, reverse)
  sdpa       pad/roll/partition copies + F.scaled_dot_product_attention with a float mask
             (bias gathered from the table + shift mask, expanded to every window and batch)
"""
import argparse
import json
import os
import platform
import sys
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from zoo.kernels.window.reference import window_partition, window_reverse, window_tables

# Swin-T at 224: (map size, heads)
SWIN_T_STAGES = [(56, 3), (28, 6), (14, 12), (7, 24)]
DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16, 'fp32': torch.float32}
WINDOW = 7
HEAD_DIM = 32


def sdpa_window_attention(q, k, v, window, shift, table, scale):
    """Partitioned SDPA with a materialised float mask; (B, H, W, heads, d) in and out."""
    B, H, W, nh, d = q.shape
    wh, ww = window
    ph, pw = (-H) % wh, (-W) % ww
    index, mask = window_tables(H, W, window, shift, 'block', window, q.device)

    def split(t):
        t = F.pad(t, (0, 0, 0, 0, 0, pw, 0, ph)) if ph or pw else t
        t = torch.roll(t, (-shift[0], -shift[1]), (1, 2)) if any(shift) else t
        return window_partition(t, window).transpose(2, 3).flatten(0, 1)  # B*nW, heads, N, d

    bias = table.flatten(1)[:, index].to(q.dtype)[None]  # 1, heads, N, N (broadcasts over windows)
    if mask is not None:  # per-window mask: materialise (B * nW, heads, N, N)
        bias = (bias + mask[:, None].to(q.dtype)).expand(B, -1, -1, -1, -1).flatten(0, 1)
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=bias, scale=scale)
    out = out.unflatten(0, (B, -1)).transpose(2, 3)
    out = window_reverse(out, window, (H + ph, W + pw))
    out = torch.roll(out, shift, (1, 2)) if any(shift) else out
    return out[:, :H, :W]


def _methods() -> Dict[str, Callable]:
    from zoo.kernels.window.reference import window_attention_ref
    from zoo.kernels.window.triton import window_attention_triton
    return {
        'triton': lambda q, k, v, win, sh, tab, sc: window_attention_triton(q, k, v, win, 'block', sh, tab, sc),
        'reference': lambda q, k, v, win, sh, tab, sc: window_attention_ref(q, k, v, win, 'block', sh, tab, sc),
        'sdpa': sdpa_window_attention,
    }


def bench_case(fn, size, heads, shift, dtype, batch, warmup, rep, ref_out=None) -> dict:
    from triton.testing import do_bench
    torch.manual_seed(0)
    qkv = torch.randn(batch, size, size, 3, heads, HEAD_DIM, device='cuda', dtype=dtype, requires_grad=True)
    table = torch.randn(heads, 2 * WINDOW - 1, 2 * WINDOW - 1, device='cuda', requires_grad=True)
    q, k, v = qkv.unbind(3)
    window, scale = (WINDOW, WINDOW), HEAD_DIM ** -0.5
    grad = torch.randn(batch, size, size, heads, HEAD_DIM, device='cuda', dtype=dtype)

    def fwd():
        with torch.no_grad():
            return fn(q, k, v, window, shift, table, scale)

    def fwd_bwd():
        fn(q, k, v, window, shift, table, scale).backward(grad)

    out = fwd()
    row = {}
    if ref_out is not None:
        row['max_abs_err_vs_fp32_ref'] = (out.float() - ref_out).abs().max().item()
    row['fwd_ms'] = do_bench(fwd, warmup=warmup, rep=rep)
    row['fwd_bwd_ms'] = do_bench(fwd_bwd, warmup=warmup, rep=rep, grad_to_none=[qkv, table])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    row['fwd_bwd_peak_mib'] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    return row


def fp32_reference_output(size, heads, shift, dtype, batch) -> torch.Tensor:
    from zoo.kernels.window.reference import window_attention_ref
    torch.manual_seed(0)
    qkv = torch.randn(batch, size, size, 3, heads, HEAD_DIM, device='cuda', dtype=dtype).float()
    table = torch.randn(heads, 2 * WINDOW - 1, 2 * WINDOW - 1, device='cuda')
    q, k, v = qkv.unbind(3)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return window_attention_ref(q, k, v, (WINDOW, WINDOW), 'block', shift, table, HEAD_DIM ** -0.5)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def markdown(rows: List[dict]) -> str:
    lines = ['| map | heads | shift | dtype | method | fwd ms | fwd+bwd ms | peak MiB | max err vs fp32 |',
             '|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        err = r.get('max_abs_err_vs_fp32_ref')
        lines.append(f"| {r['map']}x{r['map']} | {r['heads']} | {r['shift']} | {r['dtype']} | {r['method']} | "
                     f"{r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_peak_mib']:.0f} | "
                     f"{'-' if err is None else f'{err:.1e}'} |")
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--dtypes', nargs='+', default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument('--methods', nargs='+', default=['triton', 'reference', 'sdpa'],
                        choices=['triton', 'reference', 'sdpa'])
    parser.add_argument('--warmup', type=int, default=25, help='ms of warm-up per measurement')
    parser.add_argument('--rep', type=int, default=100, help='ms of timed repetitions per measurement')
    parser.add_argument('--out', default=os.path.join('bench', 'results', 'gpu_window.json'))
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        sys.exit('bench/gpu_window.py: no CUDA device is available (torch.cuda.is_available() is False); '
                 'this benchmark times the Triton kernel on a GPU and has nothing to measure here.')
    if os.environ.get('TRITON_INTERPRET', '0') == '1':
        sys.exit('bench/gpu_window.py: TRITON_INTERPRET=1 is set; unset it to time the compiled kernel.')

    methods = _methods()
    rows = []
    for size, heads in SWIN_T_STAGES:
        shift = (0, 0) if size <= WINDOW else (WINDOW // 2, WINDOW // 2)
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            ref_out = fp32_reference_output(size, heads, shift, dtype, args.batch)
            for name in args.methods:
                row = dict(map=size, heads=heads, shift=shift[0], dtype=dname, method=name, batch=args.batch)
                row.update(bench_case(methods[name], size, heads, shift, dtype, args.batch, args.warmup, args.rep,
                                      ref_out))
                rows.append(row)
                print(f"{size}x{size} h{heads} {dname} {name}: fwd {row['fwd_ms']:.3f} ms, "
                      f"fwd+bwd {row['fwd_bwd_ms']:.3f} ms", file=sys.stderr)
            del ref_out

    print(markdown(rows))
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=__import__('triton').__version__, python=platform.python_version(), batch=args.batch,
                window=WINDOW, head_dim=HEAD_DIM)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(dict(meta=meta, results=rows), f, indent=1)
    os.replace(tmp, args.out)
    print(f'\nwrote {args.out}', file=sys.stderr)


if __name__ == '__main__':
    main()
