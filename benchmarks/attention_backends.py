"""Attention backends: agreement of xformers with sdpa and a naive fp32 reference, and their speed.

    python benchmarks/attention_backends.py [--device cuda] [--out benchmarks/results/attention_backends.json]

On CUDA, for each shape (batch, length, heads, head_dim) and mask (causal, causal + left padding,
bidirectional + right padding), in bf16 and fp32: the largest absolute difference of outputs and of input
gradients between xformers, sdpa and the naive reference (computed in fp32 from the same inputs), and the
forward + backward time of each backend (median of CUDA-event-timed repeats after a warm-up).
On a machine without CUDA or xformers, xformers cannot run (it has no CPU kernels): the benchmark reports sdpa
alone and says so. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compiler.attention import attend, naive_attention, xformers_problem  # noqa: E402

SHAPES = [(8, 128, 4, 64), (8, 512, 8, 64), (4, 2048, 8, 64), (1, 8192, 8, 128)]


def masks(b: int, t: int, device):
    left = torch.ones(b, t, dtype=torch.bool, device=device)
    right = left.clone()
    for i in range(b):  # a different amount of padding per row, row 0 unpadded
        left[i, :i * t // (2 * b)] = False
        right[i, t - i * t // (2 * b):] = False
    return {'causal': (True, None), 'causal+left pad': (True, left), 'bidirectional+right pad': (False, right)}


def run(backend, q, k, v, causal, km, grad):
    """Output and input gradients of one backend (grad = the same upstream gradient for every backend)."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = naive_attention(q, k, v, causal=causal, key_mask=km) if backend == 'naive' else \
        attend(q, k, v, causal=causal, key_mask=km, backend=backend)
    out.backward(grad)
    return out.detach(), [x.grad for x in (q, k, v)]


def timed(fn, device, repeats=10) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == 'cuda':
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--out', default=str(ROOT / 'benchmarks/results/attention_backends.json'))
    args = ap.parse_args()
    device = torch.device(args.device)
    problem = xformers_problem(device)
    backends = ['sdpa'] + ([] if problem else ['xformers'])
    note = None
    if problem:
        note = f'xformers not measured: {problem}. sdpa alone'
        print(note)
    shapes = SHAPES if device.type == 'cuda' else SHAPES[:2]
    dtypes = [torch.bfloat16, torch.float32] if device.type == 'cuda' else [torch.float32]
    rows = []
    print('| dtype | B x T x H x D | mask | backend | fwd+bwd ms | max |out - naive| | max |grad - naive| | '
          'max |out - sdpa| |\n|---|---|---|---|---|---|---|---|')
    for dtype in dtypes:
        for b, t, h, d in shapes:
            g = torch.Generator(device=device).manual_seed(0)
            q, k, v, grad = (torch.randn(b, t, h, d, generator=g, device=device) for _ in range(4))
            for name, (causal, km) in masks(b, t, device).items():
                naive = None
                if b * h * t * t <= 2 ** 28:  # the naive reference materialises the scores: skip the longest
                    naive = run('naive', q, k, v, causal, km, grad)
                outs = {}
                for be in backends:
                    qq, kk, vv, gg = (x.to(dtype) for x in (q, k, v, grad))
                    out, grads = run(be, qq, kk, vv, causal, km, gg)
                    outs[be] = out
                    # timed() calls the lambda only within this iteration, so the late binding is safe
                    ms = 1e3 * timed(lambda: run(be, qq, kk, vv, causal, km, gg), device)  # noqa: B023
                    err = None if naive is None else (out.float() - naive[0]).abs().max().item()
                    gerr = None if naive is None else max((a.float() - r).abs().max().item()
                                                          for a, r in zip(grads, naive[1]))
                    vs_sdpa = (out.float() - outs['sdpa'].float()).abs().max().item()
                    rows.append({'dtype': str(dtype).split('.')[-1], 'shape': [b, t, h, d], 'mask': name, 'backend': be,
                                 'fwd_bwd_ms': ms, 'max_out_err_vs_naive': err, 'max_grad_err_vs_naive': gerr,
                                 'max_out_diff_vs_sdpa': vs_sdpa})
                    print(f"| {rows[-1]['dtype']} | {b}x{t}x{h}x{d} | {name} | {be} | {ms:.3f} | "
                          f"{_e(err)} | {_e(gerr)} | {_e(vs_sdpa)} |", flush=True)
    speed = speedups(rows)
    meta = {'device': torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu', 'torch': torch.__version__,
            'xformers': getattr(sys.modules.get('xformers'), '__version__', None), 'note': note,
            'speedup_xformers_over_sdpa': speed, 'rows': rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(meta, indent=1))
    print(f'wrote {args.out}')


def _e(x) -> str:
    return '-' if x is None else f'{x:.2e}'


def speedups(rows: list[dict]) -> dict[str, float]:
    """sdpa time / xformers time for each case both measured (printed too)."""
    speed = {}
    for r in rows:
        if r['backend'] == 'xformers':
            s = next(x for x in rows
                     if x['backend'] == 'sdpa' and all(x[k] == r[k] for k in ('dtype', 'shape', 'mask')))
            speed[f"{r['dtype']} {'x'.join(map(str, r['shape']))} {r['mask']}"] = s['fwd_bwd_ms'] / r['fwd_bwd_ms']
    if speed:
        print('\nsdpa time / xformers time (>1: xformers faster):')
        for key, x in speed.items():
            print(f'  {key}: {x:.2f}')
    return speed


if __name__ == '__main__':
    main()
