"""Throughput and peak memory of data preparation (the token store) at 1x, 4x and 16x a corpus size.

    python benchmarks/data_throughput.py [--mb 2] [--scales 1 4 16] [--workers N] [--vocab 2048]

Corpus: the embedded pydoc text repeated to `--mb` x scale MB, written as a .txt (so preparation also pays for
reading and splitting the file). Each preparation runs in a fresh process with a fresh cache folder and reports:
- seconds and tokens/s of document text (read, split, spool, encode, write, checksum);
- peak RSS of the preparing process (VmHWM) and the RSS after imports, so the growth that preparation itself adds
  is visible, and the largest USS (private memory) of an encoder worker (sampled; workers are forked and share the
  parent's pages).
  Streaming means the peaks stay flat as the corpus grows.
Two rows per scale: 'given tokenizer' (Data.tokenizer = a trained tokenizer.json: the encoding path) and
'trains BPE' (end to end). BPE training keeps one count per distinct word; the repeated corpus has a fixed set of
words, so its flat peak says nothing about a corpus with a growing vocabulary of words.
A raw `Tokenizer.encode_batch` of the 1x documents in one process is the reference for tokens/s.
Results go to benchmarks/results/data_throughput.json.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def vm_hwm_mb(pid='self') -> float:
    """Peak resident set of a process so far (Linux VmHWM), in MB."""
    for line in Path(f'/proc/{pid}/status').read_text().splitlines():
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) / 1024
    return float('nan')


def descendants(pid: str) -> list[str]:
    """Every process below `pid` (the encoder workers are children of a fork server, grandchildren of this one)."""
    out = []
    try:
        for task in Path(f'/proc/{pid}/task').iterdir():
            for child in (task / 'children').read_text().split():
                out += [child, *descendants(child)]
    except OSError:
        pass  # it ended meanwhile
    return out


def uss_mb(pid: str) -> float:
    """Unique set size of a process now: its private pages, the memory it adds beyond what it shares, MB."""
    kb = 0
    for line in Path(f'/proc/{pid}/smaps_rollup').read_text().splitlines():
        if line.startswith(('Private_Clean:', 'Private_Dirty:')):
            kb += int(line.split()[1])
    return kb / 1024


def watch_workers(peak: dict, stop: threading.Event) -> None:
    """The largest USS of every descendant process (the encoder workers) seen while they live, sampled every 0.2 s.
    Workers are forked and share this process' pages, which their VmHWM (and getrusage) would count in full."""
    while not stop.wait(0.2):
        for pid in descendants(str(os.getpid())):
            try:
                peak[pid] = max(peak.get(pid, 0.0), uss_mb(pid))
            except (OSError, ValueError):
                pass  # it ended meanwhile


def child(args) -> None:
    """One preparation in this (fresh) process; prints a JSON line."""
    from compiler.plan import Data, Memory, Plan
    from runtime import data as D
    base = vm_hwm_mb()
    kw = {'tokenizer': args.tokenizer} if args.tokenizer else {}
    plan = Plan(family='clm', data=Data(source=args.corpus, vocab_size=args.vocab, cache_dir=args.cache, **kw),
                memory=Memory(chunks=4, chunk_len=256))
    peak, stop = {}, threading.Event()
    watcher = threading.Thread(target=watch_workers, args=(peak, stop), daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    p = D.prepare(plan, progress=False, workers=args.workers)
    seconds = time.perf_counter() - t0
    stop.set()
    watcher.join()
    tokens = p.stats['train']['tokens'] + p.stats['val']['tokens']
    print(json.dumps({'seconds': seconds, 'tokens': tokens, 'rss_after_imports_mb': base,
                      'peak_rss_mb': vm_hwm_mb(), 'peak_worker_uss_mb': max(peak.values(), default=0.0),
                      'cache': str(p.cache_path)}))


def prepare_in_child(corpus, cache, vocab, workers, tokenizer=None) -> dict:
    cmd = [sys.executable, __file__, '--child', '--corpus', str(corpus), '--cache', str(cache), '--vocab', str(vocab)]
    if workers is not None:
        cmd += ['--workers', str(workers)]
    if tokenizer:
        cmd += ['--tokenizer', str(tokenizer)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, 'PYTHONPATH': str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--mb', type=float, default=2.0, help='corpus size at scale 1, in MB (embedded text repeated)')
    ap.add_argument('--scales', type=int, nargs='+', default=[1, 4, 16])
    ap.add_argument('--vocab', type=int, default=2048)
    ap.add_argument('--workers', type=int, default=None, help='encoder processes (default: automatic)')
    ap.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    ap.add_argument('--corpus', help=argparse.SUPPRESS)
    ap.add_argument('--cache', help=argparse.SUPPRESS)
    ap.add_argument('--tokenizer', help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    import tokenizers

    from runtime.documents import embedded_documents
    work = Path(tempfile.mkdtemp(prefix='data_bench_'))
    one = '\n\n'.join(embedded_documents())
    reps = max(1, round(args.mb * 1e6 / len(one.encode())))
    rows, tok_path = [], None
    try:
        for scale in args.scales:
            corpus = work / f'corpus{scale}.txt'
            corpus.write_text('\n\n'.join([one] * (reps * scale)), encoding='utf-8')
            mb = corpus.stat().st_size / 1e6
            trained = prepare_in_child(corpus, work / f'train{scale}', args.vocab, args.workers)
            if tok_path is None:  # the 1x run's tokenizer, for every 'given tokenizer' row and the raw reference
                tok_path = work / 'tokenizer.json'
                shutil.copy(Path(trained['cache']) / 'tokenizer.json', tok_path)
            given = prepare_in_child(corpus, work / f'given{scale}', args.vocab, args.workers, tok_path)
            for name, r in (('given tokenizer', given), ('trains BPE', trained)):
                rows.append({'scale': scale, 'corpus_mb': mb, 'mode': name, **{k: v for k, v in r.items()
                                                                                if k != 'cache'}})
            shutil.rmtree(work / f'train{scale}')
            shutil.rmtree(work / f'given{scale}')
            corpus.unlink()
        tok = tokenizers.Tokenizer.from_file(str(tok_path))
        tok.encode_special_tokens = True
        texts = [t.strip() for t in embedded_documents() if t.strip()] * reps
        t0 = time.perf_counter()
        raw_tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
        raw = raw_tokens / (time.perf_counter() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f'{os.cpu_count()} CPUs, vocab {args.vocab}, workers {args.workers or "automatic"}; raw encode_batch '
          f'(1x, one process): {raw / 1e6:.3f} Mtok/s')
    print(f'{"scale":>5} {"MB":>7} {"mode":<16} {"tokens":>11} {"s":>7} {"Mtok/s":>7} {"vs raw":>6} '
          f'{"RSS base":>9} {"RSS peak":>9} {"worker USS":>11}')
    for r in rows:
        tps = r['tokens'] / r['seconds']
        print(f'{r["scale"]:>4}x {r["corpus_mb"]:>7.1f} {r["mode"]:<16} {r["tokens"]:>11,} {r["seconds"]:>7.2f} '
              f'{tps / 1e6:>7.3f} {tps / raw:>5.2f}x {r["rss_after_imports_mb"]:>8.0f}M {r["peak_rss_mb"]:>8.0f}M '
              f'{r["peak_worker_uss_mb"]:>10.0f}M')
    out = {'vocab_size': args.vocab, 'workers': args.workers, 'cpus': os.cpu_count(),
           'machine': platform.processor() or platform.machine(), 'tokenizers': tokenizers.__version__,
           'raw_encode_batch_tokens_per_s': raw, 'rows': rows}
    res = ROOT / 'benchmarks' / 'results'
    res.mkdir(parents=True, exist_ok=True)
    (res / 'data_throughput.json').write_text(json.dumps(out, indent=1))
    print(f'wrote {res / "data_throughput.json"}')


if __name__ == '__main__':
    main()
