"""Memory-conditioned generation against a full-context transformer over the same total context, in one process.

    python benchmarks/inference.py                     # CPU, 4 / 8 / 16 chunks of 128 tokens
    python benchmarks/inference.py --device cuda       # the same on a GPU (benchmarks/gpu_check.sh runs this)

Models: specs/memory_clm.gin (ours: encoder + memory-slot decoder) and specs/full_context.gin (one causal decoder over
all N*L tokens), both bound to d_model 256, 4 layers, 4 heads, chunks of 128 tokens, vocab 8192, N = 4, 8, 16
chunks; untrained seeded weights (the work per token does not depend on the values), fp32, batch 1.
Request: a context of N-1 whole chunks + a 64-token prompt (random tokens), then 64 greedy new tokens, decoded by
runtime/decoding.py for both (one implementation: prefill, then one cached step per token):
- ours encodes the N-1 context chunks in one batched call and prefills [N slots, 64 prompt tokens]; its cache holds
  N + 128 positions;
- full context prefills all (N-1)*128 + 64 tokens; its cache holds N*128 positions.
Reported per N: time to first token (memory encoding + prefill + first token for ours; prefill + first token for full
context), decode tokens/s (the 63 tokens after the first), KV-cache bytes of the cache tensors next to
compiler.cost.kv_cache_bytes (asserted equal), the ratios full/ours (TTFT, KV bytes) and ours/full (tokens/s), and how
each number grows from the smallest to the largest N. Timing: one warm-up request per model, then `--repeats` rounds
that run both models in turn (so drift hits both alike); medians. Results go to benchmarks/results/inference.json.

Batched generation (runtime/decoding.py, `--batches 1 8 32` at N = `--batch-chunks` chunks): B requests of the same
shape (different random tokens per row) in one call; decode throughput = new tokens of all rows per second. Reported:
tokens/s of each model at each batch size, the ratio to its own batch 1, and ours/full at each batch size; batch
sizes and models are interleaved within each round, so every ratio is taken in one process under the same load.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compiler import cost  # noqa: E402
from compiler.model import build  # noqa: E402
from compiler.spec import SPECS_DIR, load  # noqa: E402
from runtime.decoding import generate  # noqa: E402

SPECS = {'ours': 'memory_clm.gin', 'full': 'full_context.gin'}


def plan_for(spec: str, chunks: int, args):
    return load([SPECS_DIR / spec], [f'D_MODEL = {args.d_model}', f'N_LAYERS = {args.layers}',
                                     f'N_HEADS = {max(1, args.d_model // 64)}', f'CHUNKS = {chunks}',
                                     f'CHUNK_LEN = {args.chunk_len}', f'VOCAB = {args.vocab}']).plan


def measure(models: dict, tokens, new: int, repeats: int) -> dict[str, list]:
    """Generations of each model: one warm-up, then `repeats` rounds running every model in turn."""
    for model in models.values():
        generate(model, tokens, max_new_tokens=new)
    runs = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            runs[name].append(generate(model, tokens, max_new_tokens=new))
    return runs


def summarize(runs: list, plan) -> dict:
    assert all(r.tokens == runs[0].tokens for r in runs), 'greedy decoding must be deterministic'
    measured = runs[0].kv_cache_bytes
    assert measured == cost.kv_cache_bytes(plan), (measured, cost.kv_cache_bytes(plan))
    return {'ttft_s': statistics.median(r.ttft_s for r in runs),
            'tokens_per_s': statistics.median(r.tokens_per_s for r in runs),
            'kv_cache_bytes': measured, 'kv_cache_bytes_cost_model': cost.kv_cache_bytes(plan),
            'all_ttft_s': [r.ttft_s for r in runs], 'all_tokens_per_s': [r.tokens_per_s for r in runs],
            'new_tokens': len(runs[0].tokens[0])}


def batched(args, device) -> dict:
    """Decode throughput at each batch size, both models, interleaved in every round; medians and ratios."""
    n = args.batch_chunks
    plans = {k: plan_for(spec, n, args) for k, spec in SPECS.items()}
    models = {k: build(p, args.vocab).to(device).eval() for k, p in plans.items()}
    length = (n - 1) * args.chunk_len + args.prompt
    gen = torch.Generator().manual_seed(n)
    inputs = {b: torch.randint(4, args.vocab, (b, length), generator=gen).to(device) for b in args.batches}
    for model in models.values():  # warm-up
        for b in args.batches:
            generate(model, inputs[b], max_new_tokens=4)
    runs = {(k, b): [] for k in models for b in args.batches}
    for _ in range(args.repeats):
        for b in args.batches:
            for k, model in models.items():
                runs[k, b].append(generate(model, inputs[b], max_new_tokens=args.new))
    out = {'chunks': n, 'context_tokens': length, 'rows': {}}
    print(f'\nbatched generation, N = {n} chunks ({length} context tokens per row), {args.new} new tokens per row; '
          'decode tokens/s = new tokens of all rows per second (median)')
    print('| batch | tok/s ours | x batch 1 | tok/s full | x batch 1 | ours/full | TTFT ours (ms) | TTFT full (ms) |\n'
          '|---|---|---|---|---|---|---|---|')
    base = {k: statistics.median(r.tokens_per_s for r in runs[k, args.batches[0]]) for k in models}
    for b in args.batches:
        tps = {k: statistics.median(r.tokens_per_s for r in runs[k, b]) for k in models}
        ttft = {k: statistics.median(r.ttft_s for r in runs[k, b]) for k in models}
        assert all(r.tokens == runs[k, b][0].tokens for k in models for r in runs[k, b]), 'greedy is deterministic'
        row = {'tokens_per_s': tps, 'ttft_s': ttft, 'over_batch_1': {k: tps[k] / base[k] for k in models},
               'ours_over_full': tps['ours'] / tps['full'],
               'all_tokens_per_s': {k: [r.tokens_per_s for r in runs[k, b]] for k in models}}
        out['rows'][b] = row
        print(f"| {b} | {tps['ours']:.0f} | {row['over_batch_1']['ours']:.2f} | {tps['full']:.0f} | "
              f"{row['over_batch_1']['full']:.2f} | {row['ours_over_full']:.2f} | {ttft['ours'] * 1e3:.1f} | "
              f"{ttft['full'] * 1e3:.1f} |")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    ap.add_argument('--chunks', type=int, nargs='+', default=[4, 8, 16], help='N values (total context N x chunk_len)')
    ap.add_argument('--chunk-len', type=int, default=128)
    ap.add_argument('--d-model', type=int, default=256)
    ap.add_argument('--layers', type=int, default=4)
    ap.add_argument('--vocab', type=int, default=8192)
    ap.add_argument('--prompt', type=int, default=64, help='prompt tokens after the N-1 context chunks')
    ap.add_argument('--new', type=int, default=64, help='greedy new tokens')
    ap.add_argument('--repeats', type=int, default=5)
    ap.add_argument('--batches', type=int, nargs='*', default=[1, 8, 32],
                    help='batch sizes of the batched-generation table (none: skip it); the first is the baseline')
    ap.add_argument('--batch-chunks', type=int, default=8, help='N of the batched-generation table')
    ap.add_argument('--threads', type=int, default=os.cpu_count())
    ap.add_argument('--out', default=str(ROOT / 'benchmarks/results/inference.json'))
    args = ap.parse_args()
    assert 0 < args.prompt and args.prompt + args.new - 1 <= args.chunk_len, 'prompt + new tokens must fit one chunk'

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result = {'device': (torch.cuda.get_device_name() if device.type == 'cuda'
                         else platform.processor() or platform.machine()),
              'threads': args.threads, 'torch': torch.__version__, 'dtype': 'fp32', 'batch': 1, 'd_model': args.d_model,
              'layers': args.layers, 'chunk_len': args.chunk_len, 'vocab': args.vocab, 'prompt': args.prompt,
              'new_tokens': args.new, 'repeats': args.repeats, 'chunks': {}}
    print(f"{result['device']}, {args.threads} threads, torch {torch.__version__}, fp32, batch 1; d{args.d_model} x "
          f'{args.layers} layers, chunks of {args.chunk_len}, context (N-1) chunks + {args.prompt} prompt tokens, '
          f'{args.new} greedy new tokens, median of {args.repeats}')
    print('\n| N chunks | context tokens | TTFT ours (ms) | TTFT full (ms) | full/ours | tok/s ours | tok/s full | '
          'ours/full | KV ours (KiB) | KV full (KiB) | full/ours |\n|---|---|---|---|---|---|---|---|---|---|---|')
    for n in args.chunks:
        plans = {k: plan_for(spec, n, args) for k, spec in SPECS.items()}
        models = {k: build(p, args.vocab).to(device).eval() for k, p in plans.items()}
        length = (n - 1) * args.chunk_len + args.prompt
        tokens = torch.randint(4, args.vocab, (1, length), generator=torch.Generator().manual_seed(n)).to(device)
        runs = measure(models, tokens, args.new, args.repeats)
        rows = {k: summarize(runs[k], plans[k]) for k in models}
        o, f = rows['ours'], rows['full']
        ratios = {'ttft_full_over_ours': f['ttft_s'] / o['ttft_s'],
                  'kv_full_over_ours': f['kv_cache_bytes'] / o['kv_cache_bytes'],
                  'tokens_per_s_ours_over_full': o['tokens_per_s'] / f['tokens_per_s']}
        result['chunks'][n] = {'context_tokens': length, 'models': rows, 'ratios': ratios}
        print(f"| {n} | {length} | {o['ttft_s'] * 1e3:.1f} | {f['ttft_s'] * 1e3:.1f} | "
              f"{ratios['ttft_full_over_ours']:.2f} | "
              f"{o['tokens_per_s']:.0f} | {f['tokens_per_s']:.0f} | {ratios['tokens_per_s_ours_over_full']:.2f} | "
              f"{o['kv_cache_bytes'] / 1024:.0f} | {f['kv_cache_bytes'] / 1024:.0f} | "
              f"{ratios['kv_full_over_ours']:.2f} |")

    lo, hi = min(args.chunks), max(args.chunks)
    if lo != hi:  # how each number grows with the context (x at the largest N / at the smallest)
        a, b = result['chunks'][lo]['models'], result['chunks'][hi]['models']
        growth = {k: {'ttft': b[k]['ttft_s'] / a[k]['ttft_s'],
                      'tokens_per_s': b[k]['tokens_per_s'] / a[k]['tokens_per_s'],
                      'kv_cache_bytes': b[k]['kv_cache_bytes'] / a[k]['kv_cache_bytes']} for k in SPECS}
        result['growth'] = {'from_chunks': lo, 'to_chunks': hi, **growth}
        print(f'\ngrowth from {lo} to {hi} chunks (x)\n| model | TTFT | tokens/s | KV bytes |\n|---|---|---|---|')
        for k, g in growth.items():
            print(f"| {k} | {g['ttft']:.2f} | {g['tokens_per_s']:.2f} | {g['kv_cache_bytes']:.2f} |")
    if args.batches:
        result['batched'] = batched(args, device)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f'\nwrote {args.out}')


if __name__ == '__main__':
    main()
