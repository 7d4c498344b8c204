"""Data and metrics of the offline `memspec` task group (the harness' --include_path specs/eval).

Every task is built on demand, deterministically, from the held-out split of the data a run was trained on (the
embedded corpus by default): the run's own validation examples of N chunks x L tokens, decoded to text with the run's
tokenizer. So chunk boundaries in the text are the run's chunk boundaries, which is what makes "the answer sits in
an earlier chunk" exact. The harness hands a task's metadata (`--metadata`, and the `--model_args`: run=PATH,
runs=DIR) to `custom_dataset`; without a run the flagship spec's data is used
(specs/frozen_encoder_curriculum.gin). A string that would not tokenize back to the same tokens (BPE merges across a
boundary) is skipped, so every kept document scores exactly the tokens it was made from.

    python specs/eval/memspec_tasks.py [--run RUN] --out DIR    # write the JSONL of every task (to look at them)

Tasks (layout for N chunks, the copy distance D = N // 2 chunks, as the copy objective trains it):
- memspec_cloze: LAMBADA-style: a held-out passage (N x L tokens) without its last word; the word is the target.
- memspec_needle: chunk 0 says "The key is" and random digits (a needle no language model can guess), D - 1
  chunks of held-out filler follow, then chunk D starts to repeat chunk 0: which of 10 keys comes next? Only the
  memory of chunk 0 knows it (chance 10 %).
- memspec_reconstruct: D held-out chunks, then the first token of chunk 0 again; the model regenerates the rest of
  chunk 0 (greedy): exact match, token accuracy, BLEU.
- memspec_clm_hamming: the paper's CLM eval: teacher-forced next-token accuracy over a held-out passage after its
  first token (token accuracy, and the normalised Hamming distance 1 - accuracy per passage).
- memspec_copy_hamming: the paper's Copy eval: D held-out chunks, then the same chunks again; teacher-forced token
  accuracy on the repeat.
Per-token accuracy comes from the memspec adapter's results (runtime/lm_adapter.py); another model's result
counts as one token, correct when its whole continuation is greedy.
"""
from __future__ import annotations

import argparse
import functools
import json
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FLAGSHIP = ROOT / 'specs' / 'frozen_encoder_curriculum.gin'
HEADS = ('\nThe key is', '\nkey:', 'key:')  # the needle's first words: the first that leaves 2+ key tokens
CHOICES = 10
MAX_DOCS = 200


@functools.lru_cache(maxsize=4)
def _source(run: str | None, runs: str, stage: str | None = None):
    """(tokenizer, val examples [E, N, L], val masks, special ids, tokenizer.json path) of a run's data."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from compiler.spec import load
    from runtime.data import prepare
    if run is None:
        plan = load([str(FLAGSHIP)]).plan
    else:
        from store.runref import folder_of
        plan = load([str(folder_of(str(run), runs).operative)]).plan
    data = prepare(plan, progress=False)
    return data.tokenizer, data.val, data.val_mask, data.special_ids, str(data.cache_path / 'tokenizer.json')


def _examples(meta: dict):
    """(tokenizer, held-out examples [N, L] of plain text, tokenizer path, documents per task). `chunk_len` in the
    metadata (a compression sweep's model argument) re-cuts the same held-out tokens into N chunks of that length."""
    tok, val, mask, special, path = _source(meta.get('run'), str(meta.get('runs', 'runs')))
    rows = []
    for x, m in zip(val, mask):
        if bool(m.all()) and not any(int(t) in special.values() for t in x.flatten()):  # plain text only
            rows.append(x)
    if meta.get('chunk_len') not in (None, '') and rows:
        import torch
        n, l = rows[0].shape[0], int(meta['chunk_len'])
        flat = torch.cat([x.flatten() for x in rows])
        rows = list(flat[:len(flat) // (n * l) * n * l].view(-1, n, l))
    return tok, rows, path, int(meta.get('max_docs', MAX_DOCS))


def _enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def _dec(tok, ids) -> str:
    return tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _exact(tok, ctx_ids: list[int], conts: list[list[int]]) -> tuple[str, list[str]] | None:
    """The context and continuation strings when they tokenize back to exactly these tokens, as the harness
    encodes them (context alone; context + continuation whole), else None."""
    ctx = _dec(tok, ctx_ids)
    texts = [_dec(tok, c) for c in conts]
    if ctx != ctx.rstrip() or _enc(tok, ctx) != ctx_ids:  # the harness moves trailing spaces to the continuation
        return None
    if any(_enc(tok, ctx + t) != ctx_ids + c for t, c in zip(texts, conts)):
        return None
    return ctx, texts


def _dataset(docs: list[dict]):
    import datasets
    return datasets.DatasetDict({'test': datasets.Dataset.from_list(docs)})


def cloze_docs(**meta) -> list[dict]:
    tok, rows, _, limit = _examples(meta)
    docs = []
    for x in rows:
        ids = x.flatten().tolist()
        text = _dec(tok, ids)
        m = re.match(r'(.*\S)( [A-Za-z]{3,})[^\w]*$', text, re.S)
        if not m:
            continue
        ctx_ids = _enc(tok, m[1])
        got = _exact(tok, ctx_ids, [_enc(tok, m[2])])
        if got and len(ctx_ids) > x.shape[1]:  # longer than a chunk: memories carry part of the passage
            docs.append({'context': got[0], 'target': got[1][0]})
    return docs[:limit]


def _key(tok, rng: random.Random, length: int) -> list[int]:
    """Random digits (' 7', or a bare '7' where one token is left) filling exactly `length` tokens."""
    out = []
    while len(out) < length:
        d = rng.randrange(10)
        unit = _enc(tok, f' {d}')
        out += unit if len(out) + len(unit) <= length else _enc(tok, str(d))
    return out[:length] if len(out) == length else []


def needle_docs(**meta) -> list[dict]:
    tok, rows, _, limit = _examples(meta)
    n, l = rows[0].shape if rows else (0, 0)
    d = max(1, n // 2)
    head = next((h for h in (_enc(tok, t) for t in HEADS) if 0 < len(h) <= l - 2), None)
    if head is None:
        return []
    docs = []
    for k, x in enumerate(rows):
        rng = random.Random(k)
        keys = []
        for _ in range(100):  # distinct random keys filling the rest of the needle chunk
            key = _key(tok, rng, l - len(head))
            if key and key not in keys:
                keys.append(key)
            if len(keys) == CHOICES:
                break
        filler = x[:d - 1].flatten().tolist()
        got = _exact(tok, head + keys[0] + filler + head, keys) if len(keys) == CHOICES else None
        if got:
            gold = rng.randrange(CHOICES)  # the right key is keys[0]; shown at a random place among the choices
            order = keys[1:gold + 1] + [keys[0]] + keys[gold + 1:]
            docs.append({'context': got[0], 'choices': [got[1][keys.index(o)] for o in order], 'gold': gold})
    return docs[:limit]


def reconstruct_docs(**meta) -> list[dict]:
    tok, rows, path, limit = _examples(meta)
    docs = []
    for x in rows:
        d = max(1, x.shape[0] // 2)
        ids = x[:d].flatten().tolist()
        first = x[0].tolist()
        got = _exact(tok, ids + first[:1], [first[1:]])
        if got:
            docs.append({'context': got[0], 'target': got[1][0], 'target_ids': first[1:], 'tokenizer': path})
    return docs[:limit]


def clm_docs(**meta) -> list[dict]:
    tok, rows, _, limit = _examples(meta)
    docs = []
    for x in rows:
        ids = x.flatten().tolist()
        got = _exact(tok, ids[:1], [ids[1:]])
        if got:
            docs.append({'context': got[0], 'target': got[1][0]})
    return docs[:limit]


def copy_docs(**meta) -> list[dict]:
    tok, rows, _, limit = _examples(meta)
    docs = []
    for x in rows:
        ids = x[:max(1, x.shape[0] // 2)].flatten().tolist()
        got = _exact(tok, ids, [ids])
        if got:
            docs.append({'context': got[0], 'target': got[1][0]})
    return docs[:limit]


BUILDERS = {'memspec_cloze': cloze_docs, 'memspec_needle': needle_docs, 'memspec_reconstruct': reconstruct_docs,
            'memspec_clm_hamming': clm_docs, 'memspec_copy_hamming': copy_docs}


def cloze(**meta):
    return _dataset(cloze_docs(**meta))


def needle(**meta):
    return _dataset(needle_docs(**meta))


def reconstruct(**meta):
    return _dataset(reconstruct_docs(**meta))


def clm(**meta):
    return _dataset(clm_docs(**meta))


def copy(**meta):
    return _dataset(copy_docs(**meta))


# ------------------------------------------------------------------------------------------------ metrics

def _token_flags(result) -> list[bool]:
    """Per-token greedy flags of a loglikelihood result (the memspec adapter's), else one flag for the whole."""
    flags = getattr(result, 'greedy', None)
    return list(flags) if flags is not None else [bool(result[1])]


def hamming(doc, results) -> dict:
    flags = _token_flags(results[0])
    acc = sum(flags) / len(flags)
    return {'token_accuracy': acc, 'hamming': 1 - acc}


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(path)
    tok.encode_special_tokens = True
    return tok


def reconstruction(doc, results) -> dict:
    """Greedy output vs the chunk it should regenerate: the first len(target) tokens of the output, compared token
    by token (exact match, token accuracy), and as text (BLEU over the corpus)."""
    tok, target = _tokenizer(doc['tokenizer']), doc['target_ids']
    out = _enc(tok, results[0])[:len(target)]
    same = sum(a == b for a, b in zip(out, target))
    return {'exact_match': float(out == target), 'token_accuracy': same / len(target),
            'bleu': (doc['target'], _dec(tok, out))}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description='write the memspec tasks as JSONL')
    ap.add_argument('--run', help='a run folder or id under --runs (default: the flagship spec\'s data)')
    ap.add_argument('--runs', default='runs')
    ap.add_argument('--out', required=True)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, build in BUILDERS.items():
        docs = build(run=args.run, runs=args.runs)
        (out / f'{name}.jsonl').write_text(''.join(json.dumps(d) + '\n' for d in docs))
        print(f'{name}: {len(docs)} documents -> {out / name}.jsonl')


if __name__ == '__main__':
    main()
