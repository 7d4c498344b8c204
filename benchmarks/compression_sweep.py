"""Retention against compression: one trained memory model evaluated on the memspec needle and reconstruction tasks
(specs/eval) at several chunk lengths (tokens per memory: the compression ratio) and memory counts, in one process.

    python benchmarks/compression_sweep.py runs/0 [--chunk-lens 2 4 8] [--limit 200] [--out DIR]

- chunk lengths 1..L (the trained L last): the same held-out tokens re-cut into N chunks of that length, every chunk
  one memory (runtime/reading.py `reading(..., chunk_len=)`); the decoder keeps its N-1 newest memories;
- memories kept 0..N-1 at the trained L (0 = ablated): the needle sits N/2 chunks back, so it is lost below N/2.
Writes <out>/compression_sweep.json and <out>/compression_sweep.png (matplotlib, Agg).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from runtime.lm_adapter import MemspecLM  # noqa: E402
from store.runref import folder_of  # noqa: E402

TASKS = {'memspec_needle': 'acc,none', 'memspec_reconstruct': 'token_accuracy,none'}


def evaluate(folder: Path, limit: int, **sweep) -> dict:
    lm = MemspecLM(run=str(folder), device='cpu', **sweep)
    tasks = TaskManager(include_path=str(ROOT / 'specs' / 'eval'), include_defaults=False,
                        metadata={'run': str(folder), **sweep})
    res = lm_eval.simple_evaluate(model=lm, tasks=list(TASKS), task_manager=tasks, limit=limit, bootstrap_iters=0)
    return {t: res['results'][t][k] for t, k in TASKS.items()} | {
        'documents': {t: res['n-samples'][t]['effective'] for t in TASKS}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('run')
    ap.add_argument('--runs', default='runs')
    ap.add_argument('--chunk-lens', type=int, nargs='+', help='tokens per memory (default: L/2, 3L/4, L)')
    ap.add_argument('--limit', type=int, default=200)
    ap.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results'))
    args = ap.parse_args()
    folder = folder_of(args.run, args.runs).root
    probe = MemspecLM(run=str(folder), device='cpu')
    n, l = probe.plan.memory.chunks, probe.plan.memory.chunk_len
    lens = args.chunk_lens or sorted({max(3, l // 2), max(3, 3 * l // 4), l})  # the needle needs 3+ tokens
    result = {'run': folder.name, 'chunks': n, 'chunk_len': l, 'limit': args.limit, 'by_chunk_len': {}, 'by_keep': {}}
    print(f'run {folder}: N = {n} chunks of L = {l} tokens; needle accuracy (chance 0.10), '
          'reconstruction token accuracy')
    print('\n| tokens per memory | needle acc | reconstruction token acc |\n|---|---|---|')
    for c in lens:
        r = result['by_chunk_len'][c] = evaluate(folder, args.limit, chunk_len=c)
        print(f"| {c} | {r['memspec_needle']:.3f} | {r['memspec_reconstruct']:.3f} |")
    print('\n| memories kept | needle acc | reconstruction token acc |\n|---|---|---|')
    for k in range(n):
        r = result['by_keep'][k] = evaluate(folder, args.limit, keep=k)
        print(f"| {k} | {r['memspec_needle']:.3f} | {r['memspec_reconstruct']:.3f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'compression_sweep.json').write_text(json.dumps(result, indent=1))
    plot(result, out / 'compression_sweep.png')
    print(f"\nwrote {out / 'compression_sweep.json'} and {out / 'compression_sweep.png'}")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((a, 'by_chunk_len', 'compression ratio (tokens per memory)'),
                           (b, 'by_keep', 'memories kept by the decoder')):
        xs = sorted(result[key], key=int)
        for task, name in (('memspec_needle', 'needle accuracy'), ('memspec_reconstruct', 'reconstruction token acc')):
            ax.plot([int(x) for x in xs], [result[key][x][task] for x in xs], marker='o', label=name)
        ax.axhline(0.1, color='grey', ls=':', lw=1, label='needle chance')
        ax.set_xlabel(label)
        ax.set_ylim(0, 1.02)
        ax.set_xticks([int(x) for x in xs])
    a.set_ylabel('retention')
    a.legend(fontsize=8)
    fig.suptitle(f"retention vs compression: run {result['run']} (N = {result['chunks']}, L = {result['chunk_len']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == '__main__':
    main()
