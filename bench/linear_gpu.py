"""GPU benchmark of the linear-attention op: the fused Triton path against the PyTorch reference, every normaliser,
forward and forward + backward, at the shapes of the linear backbones' global-attention stages.

    python -m zoo.bench.linear_gpu [--img-size 224] [--batch 32] [--dtype fp16] [--repeats 20]
        [--normalizers none flatten inline mala l2vit] [--out bench/results/linear_gpu]

Shapes (--img-size 224): stage 1 of the Swin-T family (56 x 56 tokens, 3 heads x 32: FLatten / InLine / L2ViT),
stage 2 (28 x 28, 6 x 32), and MALA-T's stages 1-2 (56 x 56, 1 x 64; 28 x 28, 2 x 64). Inputs are non-negative
feature maps (any sign for InLine), q_norm / k_norm given for MALA (its normaliser sees the features before RoPE).
Per case: forward ms and forward + backward ms (CUDA events, median of --repeats after --warmup), the peak CUDA
memory of a forward + backward above the inputs, and the max abs error of each path's output against an fp32
reference computed from the same inputs (the reference path itself runs in the input dtype under no autocast:
its sums are fp32 either way).

Needs CUDA: without it the script says so and exits with status 2, unless --cpu is given (a check of the script
itself: the Triton path then needs TRITON_INTERPRET=1 and tiny sizes, e.g. --img-size 32 --batch 1).
"""
import argparse
import json
import os
import platform
import sys
from typing import Dict, List, Optional

import torch

from zoo.bench.biformer_gpu import _fmt, measure
from zoo.bench.run import _write_atomic
from zoo.kernels.linear import NORMALIZERS, linear_attention

__all__ = ['stage_shapes', 'run', 'main']

_DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16, 'fp32': torch.float32}


def stage_shapes(img_size: int) -> List[dict]:
    """Global linear-attention stages of the backbones at img_size (patch 4, then /2 per stage)."""
    s1, s2 = img_size // 4, img_size // 8
    return [dict(model='swin-family', stage=1, size=s1, heads=3, head_dim=32),
            dict(model='swin-family', stage=2, size=s2, heads=6, head_dim=32),
            dict(model='mala', stage=1, size=s1, heads=1, head_dim=64),
            dict(model='mala', stage=2, size=s2, heads=2, head_dim=64)]


def _inputs(shape: dict, normalizer: str, batch: int, device: torch.device, dtype: torch.dtype) -> Dict:
    g = torch.Generator().manual_seed(0)
    dims = (batch, shape['heads'], shape['size'] ** 2, shape['head_dim'])

    def feature():
        t = torch.randn(dims, generator=g) if normalizer == 'inline' else torch.rand(dims, generator=g)
        return t.to(device, dtype).requires_grad_()
    tensors = dict(q=feature(), k=feature(), v=torch.randn(dims, generator=g).to(device, dtype).requires_grad_())
    kw = dict(normalizer=normalizer, scale=shape['head_dim'] ** -0.5)
    if normalizer == 'mala':
        tensors.update(q_norm=feature(), k_norm=feature())
    return dict(tensors=tensors, kw=kw, grad=torch.randn(dims, generator=g).to(device, dtype))


def run(args: argparse.Namespace) -> List[dict]:
    device = torch.device('cuda' if torch.cuda.is_available() and not args.cpu else 'cpu')
    dtype = _DTYPES[args.dtype]
    rows = []
    for shape in stage_shapes(args.img_size):
        for normalizer in args.normalizers:
            case = _inputs(shape, normalizer, args.batch, device, dtype)
            tensors, kw, grad = case['tensors'], case['kw'], case['grad']
            with torch.no_grad():
                want = linear_attention(**{n: t.float() for n, t in tensors.items()}, **kw, backend='torch')
            for backend in ('triton', 'torch'):
                row = dict(shape, batch=args.batch, dtype=args.dtype, normalizer=normalizer, backend=backend,
                           device=device.type)
                call = (lambda backend=backend: linear_attention(**tensors, **kw, backend=backend))

                def fwd_bwd(call=call):
                    call().backward(grad)
                    for t in tensors.values():
                        t.grad = None

                with torch.no_grad():
                    row['max_abs_err_vs_fp32'] = (call().float() - want).abs().max().item()
                row['out_scale'] = want.abs().max().item()
                row.update(measure(call, fwd_bwd, device, args.warmup, args.repeats))
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def markdown(rows: List[dict], args: argparse.Namespace) -> str:
    lines = [f'Linear-attention op at {args.img_size} px, batch {args.batch}, {args.dtype}, device '
             f'{rows[0]["device"] if rows else "-"}, median of {args.repeats}. Peak: CUDA memory above the inputs '
             'during one forward + backward. Error: max abs difference of the output from an fp32 reference '
             '(output scale in brackets).', '',
             '| model | stage | tokens | heads x d | normaliser | backend | fwd ms | fwd+bwd ms | peak MiB | '
             'max abs err |',
             '|---|---|---|---|---|---|---:|---:|---:|---|']
    for r in rows:
        lines.append(f'| {r["model"]} | {r["stage"]} | {r["size"]}x{r["size"]} | {r["heads"]} x {r["head_dim"]} | '
                     f'{r["normalizer"]} | {r["backend"]} | {_fmt(r.get("fwd_ms"), 3)} | '
                     f'{_fmt(r.get("fwd_bwd_ms"), 3)} | {_fmt(r.get("fwd_bwd_peak_mb"), 1)} | '
                     f'{r["max_abs_err_vs_fp32"]:.1e} ({r["out_scale"]:.1e}) |')
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m zoo.bench.linear_gpu', description=__doc__.split('\n')[0])
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--dtype', choices=sorted(_DTYPES), default='fp16')
    parser.add_argument('--repeats', type=int, default=20)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--normalizers', nargs='+', choices=NORMALIZERS, default=list(NORMALIZERS))
    parser.add_argument('--cpu', action='store_true',
                        help='run on CPU (a check of the script; Triton needs TRITON_INTERPRET=1 and tiny sizes)')
    parser.add_argument('--out', default='bench/results/linear_gpu',
                        help='output path without extension ("" for none)')
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu:
        print('linear_gpu: this benchmark times the Triton kernels on a CUDA GPU, and torch sees no CUDA device '
              f'(torch {torch.__version__}, cuda {torch.version.cuda}). Run it on a machine with an NVIDIA GPU, or '
              'pass --cpu with TRITON_INTERPRET=1 and tiny sizes to check the script itself.', file=sys.stderr)
        return 2
    if min(args.img_size // 8, args.batch, args.repeats) < 1 or args.warmup < 0:
        parser.error('--img-size must be >= 8; --batch and --repeats positive; --warmup >= 0')
    rows = run(args)
    table = markdown(rows, args)
    print(table)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        meta = dict(torch=torch.__version__, python=platform.python_version(), args=vars(args),
                    gpu=torch.cuda.get_device_name() if torch.cuda.is_available() and not args.cpu else None)
        _write_atomic(args.out + '.json', json.dumps(dict(meta=meta, rows=rows), indent=1))
        _write_atomic(args.out + '.md', table + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
