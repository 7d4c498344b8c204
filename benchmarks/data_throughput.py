"""Throughput of the data pipeline vs raw `tokenizers` encoding of the same text, in one process.

    python benchmarks/data_throughput.py [--mb 3] [--repeats 3]

Corpus: the embedded pydoc text repeated to ~`--mb` MB, written as a .txt (so the pipeline also pays for reading
and splitting the file). Rows (tokens per second of document text, best of `--repeats`, each pipeline run with a
fresh cache directory so nothing is reused):
- raw encode_batch / encode_batch_fast: Tokenizer.encode_batch* over the same documents the pipeline loads.
- pipeline, given tokenizer: prepare() with Data.tokenizer = a trained tokenizer.json (read, split, encode,
  pack, cache write) - the like-for-like comparison with raw encoding; target >= 0.5x raw encode_batch.
- pipeline, trains BPE: prepare() end to end, byte-level BPE training on the train split included.
Results go to benchmarks/results/data_throughput.json.
"""
import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import tokenizers  # noqa: E402

from compiler.plan import Data, Memory, Plan  # noqa: E402
from runtime import data as D  # noqa: E402


def best_of(repeats, fn):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--mb', type=float, default=3.0, help='corpus size in MB (embedded text repeated)')
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--vocab', type=int, default=2048)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix='data_bench_'))
    docs = D.embedded_documents()
    one = '\n\n'.join(docs)
    reps = max(1, round(args.mb * 1e6 / len(one.encode())))
    corpus = work / 'corpus.txt'
    corpus.write_text('\n\n'.join([one] * reps), encoding='utf-8')
    mb = corpus.stat().st_size / 1e6

    def plan(cache, **kw):
        return Plan(family='clm',
                    data=Data(source=str(corpus), vocab_size=args.vocab, cache_dir=str(work / cache), **kw),
                    memory=Memory(chunks=4, chunk_len=256))

    # One pipeline run to get the tokenizer and the exact documents it loads (the raw baseline encodes the same).
    first = D.prepare(plan('warm'), progress=False)
    tok_path = first.cache_path / 'tokenizer.json'
    tok = tokenizers.Tokenizer.from_file(str(tok_path))
    tok.encode_special_tokens = True
    texts = D.load_documents(plan('unused').data)
    n_tokens = first.stats['train']['tokens'] + first.stats['val']['tokens']

    runs = iter(range(10**6))
    rows = {}
    t, enc = best_of(args.repeats, lambda: tok.encode_batch(texts, add_special_tokens=False))
    assert sum(len(e.ids) for e in enc) == n_tokens  # same text, same tokens
    rows['raw encode_batch'] = t
    rows['raw encode_batch_fast'] = best_of(args.repeats,
                                            lambda: tok.encode_batch_fast(texts, add_special_tokens=False))[0]
    rows['pipeline, given tokenizer'] = best_of(
        args.repeats, lambda: D.prepare(plan(f'given{next(runs)}', tokenizer=str(tok_path)), progress=False))[0]
    rows['pipeline, trains BPE'] = best_of(args.repeats,
                                           lambda: D.prepare(plan(f'train{next(runs)}'), progress=False))[0]

    raw = rows['raw encode_batch']
    print(f'corpus: {mb:.2f} MB ({reps}x embedded), {len(texts):,} documents, {n_tokens:,} tokens, vocab {args.vocab}, '
          f'{os.cpu_count()} CPUs, best of {args.repeats}')
    print(f'{"":<28}{"seconds":>9}{"Mtok/s":>9}{"vs raw":>8}')
    for name, t in rows.items():
        print(f'{name:<28}{t:>9.3f}{n_tokens / t / 1e6:>9.3f}{raw / t:>7.2f}x')

    out = {'corpus_mb': mb, 'documents': len(texts), 'tokens': n_tokens, 'vocab_size': args.vocab,
           'repeats': args.repeats,
           'cpus': os.cpu_count(), 'machine': platform.processor() or platform.machine(),
           'tokenizers': tokenizers.__version__,
           'rows': {k: {'seconds': t, 'tokens_per_s': n_tokens / t, 'ratio_vs_raw_encode_batch': raw / t}
                    for k, t in rows.items()},
           'target': 'pipeline, given tokenizer >= 0.5x raw encode_batch',
           'target_met': raw / rows['pipeline, given tokenizer'] >= 0.5}
    res = ROOT / 'benchmarks' / 'results'
    res.mkdir(parents=True, exist_ok=True)
    (res / 'data_throughput.json').write_text(json.dumps(out, indent=1))
    print(f'wrote {res / "data_throughput.json"}')
    shutil.rmtree(work)


if __name__ == '__main__':
    main()
