"""Data pipeline: documents -> byte-level BPE -> a token store on disk -> examples of N chunks x L tokens.

    prepare(plan)                   -> Prepared: tokenizer, special ids, per split an Examples view of the store
    prepared.loader(batch_size, seed, rank, world) -> Batches: infinite, seeded, resumable, rank-sharded batches

Choices worth knowing:
- The train/val split hashes each document's *content* (sha256), so it does not depend on document order,
  on the seed, or on which other documents are present; duplicates always land in the same split.
- The tokenizer is trained on the train split only (val text never shapes the vocabulary).
- Special tokens are real added tokens and `encode_special_tokens` is on, so a literal "<pad>" in the
  corpus is encoded as ordinary text and can never collide with the pad id.
- The cache entry is a token store (runtime/tokens.py): flat memory-mapped token files in the smallest dtype for
  the vocabulary, built once under a file lock, streaming (memory does not grow with the corpus). Its key covers
  what the tokens depend on (source identity incl. file size/mtime, tokenizer settings, val_fraction), not the
  layout, N or L: examples are cut on the fly (runtime/examples.py), so a chunk-length sweep shares one store.
  Not the seed either: shuffling happens in Batches.
- A cache entry is derived data: meta.json records sizes and per-block sha256 of every file, and an entry that
  does not verify (a truncated file, garbage in meta.json) is rebuilt with a one-line note. A cache folder that
  cannot be written (read-only, full) is refused (exit 2) and no temp folder stays behind.

`python -m runtime.data SPEC [more.gin] [-b BINDING]...` prepares the data of a spec and reports it, with the
tokens each stage of the curriculum consumes against those available.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tokenizers
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from compiler.args import Parser
from compiler.errors import UserError, cli
from compiler.load import SPECIAL_TOKENS, special_ids
from runtime import tokens as T
from runtime.documents import (  # noqa: F401
    OFFLINE_VARS,
    check_source,
    draw,
    embedded_documents,
    iter_documents,
    load_documents,
    local_path,
    split_documents,
    where,
)
from runtime.examples import Batches, Examples, TensorExamples  # noqa: F401  (Batches: the loader, re-exported)

BYTE_ALPHABET = 256  # byte-level BPE starts from all 256 bytes
CACHE_VERSION = 3  # bump when the cached format changes (3: the token store; 2 and before held examples.pt)
CACHE_FILES = ('tokenizer.json', 'train.tokens', 'train.offsets', 'val.tokens', 'val.offsets')  # checksummed
PROGRESS_BYTES = 1 << 20  # show progress bars only for corpora larger than this
WORKERS_VAR = 'MEMSPEC_DATA_WORKERS'  # encoder processes (default: the CPUs this process may use, at most 16)
PARALLEL_BYTES = 16 << 20  # a split smaller than this is encoded in-process (starting workers costs more)
# token statistics recorded with a run (the unigram/bigram floors) read at most this many training tokens, so a
# FineWeb-size split is never held in memory for them; smaller splits are read whole (their floors are exact)
STATISTICS_TOKENS = 1 << 24


@dataclass
class Prepared:
    """Everything the runtime needs from the data. `examples[split]` cut [N, L] examples from the store on demand."""
    tokenizer: Tokenizer
    pad_id: int
    eod_id: int
    blank_id: int
    copy_id: int
    vocab_size: int  # actual size, added tokens included (may be < Data.vocab_size on a tiny corpus)
    bytes_per_token: dict[str, float]  # per split: UTF-8 bytes of the documents / their tokens (for bits per byte)
    examples: dict[str, Examples]
    cache_path: Path
    cache_hit: bool  # True when this call reused an existing cache entry
    # per split: documents, tokens, examples, padding_fraction, ...
    stats: dict[str, dict] = field(default_factory=dict)
    _memo: dict = field(default_factory=dict, repr=False)

    @property
    def special_ids(self) -> dict[str, int]:
        return {'<pad>': self.pad_id, '<eod>': self.eod_id, '<blank>': self.blank_id, '<copy>': self.copy_id}

    def loader(self, batch_size: int, seed: int, rank: int = 0, world: int = 1, split: str = 'train',
               shuffle: bool = True) -> Batches:
        """This rank's batches of `split`; state_dict() / load_state_dict() hold the data position for checkpoints."""
        return Batches(self.examples[split], batch_size, seed, rank=rank, world=world, shuffle=shuffle)

    def _all(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in self._memo:
            self._memo[split] = self.examples[split].all()
        return self._memo[split]

    def sample(self, split: str, max_tokens: int = STATISTICS_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split when it holds at most `max_tokens` tokens, else evenly spaced examples of it (always the
        same ones): statistics of a large split in bounded memory."""
        e, n, l = self.examples[split].shape
        if e * n * l <= max_tokens:
            return self._all(split)
        rows = np.linspace(0, e - 1, max(1, max_tokens // (n * l))).round().astype(np.int64)
        return self.examples[split].take(np.unique(rows))

    # The whole split as int64 [E, N, L] tensors + bool masks, built once on first use: O(split) memory. For the
    # held-out split (evaluation, memories) and small corpora; training reads through loader() instead.
    train = property(lambda self: self._all('train')[0])
    train_mask = property(lambda self: self._all('train')[1])
    val = property(lambda self: self._all('val')[0])
    val_mask = property(lambda self: self._all('val')[1])


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f'[data] {msg}', file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# tokenizer

def train_tokenizer(texts, vocab_size: int, progress: bool = False, length: int | None = None) -> Tokenizer:
    """Byte-level BPE (GPT-2 style) with SPECIAL_TOKENS at ids 0..3, from an iterable of texts (streamed).
    Deterministic for the same texts in the same order."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)
    tok.train_from_iterator(texts, trainer, length=len(texts) if length is None else length)
    return tok


def load_tokenizer(path: str) -> Tokenizer:
    """A tokenizer.json file, or a pretrained folder holding one; SPECIAL_TOKENS are added if missing."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / 'tokenizer.json'
    if not p.is_file():
        raise UserError(where('tokenizer', path), f'no tokenizer.json at {p}',
                        'point Data.tokenizer at a tokenizer.json or a folder with one, or set it to None to train BPE')
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:
        raise UserError(where('tokenizer', path), f'cannot load {p}: {e}',
                        'use a tokenizer.json saved by `tokenizers`')
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def _tokenizer_identity(d) -> dict:
    if d.tokenizer is None:
        return {'train_bpe': d.vocab_size, 'tokenizers': tokenizers.__version__}
    p = Path(d.tokenizer).expanduser()
    f = p / 'tokenizer.json' if p.is_dir() else p
    st = f.stat() if f.is_file() else None
    return {'path': str(f.resolve()), 'size': st and st.st_size, 'mtime': st and st.st_mtime_ns}


# ----------------------------------------------------------------------------------------------------------
# prepare + cache

def cache_key(d, backbone: dict | None = None) -> dict:
    """Everything the token store depends on. Local files are identified by path, size and mtime; a backbone's
    tokenizer by its source, vocabulary digest and the special ids memspec maps into it."""
    src = d.source
    if src == 'embedded':
        import pydoc_data.topics as t
        st = os.stat(t.__file__)
        source = {'embedded': sys.version.split()[0], 'size': st.st_size}
    elif src.startswith('hub:'):
        source = {'hub': src, 'split': d.split}  # no revision pinning: the hub gives none offline
    else:
        p = local_path(src)
        st = p.stat()
        source = {'path': str(p.resolve()), 'size': st.st_size, 'mtime': st.st_mtime_ns}
    return {'version': CACHE_VERSION, 'source': source, 'text_field': d.text_field, 'max_documents': d.max_documents,
            'tokenizer': _tokenizer_identity(d), 'val_fraction': d.val_fraction, 'specials': list(SPECIAL_TOKENS),
            **({'backbone': backbone} if backbone else {})}


def _backbone_tokens(plan):
    """(tokenizer, special ids, vocabulary, cache identity) of a plan with backbones (compiler.tokens), else None."""
    from compiler.tokens import backbones, load_tokenizer, plan_tokens, tokenizer_digest
    t = plan_tokens(plan)
    if t is None:
        return None
    b = backbones(plan)[0][1]
    tok = Tokenizer.from_str(load_tokenizer(b.source, b.revision).backend_tokenizer.to_str())
    identity = {'source': b.source, 'revision': b.revision, 'tokenizer': tokenizer_digest(b.source, b.revision),
                'special_ids': t.ids, 'vocab': t.vocab}
    return tok, dict(t.ids), t.vocab, identity


def _check(d, n: int, l: int, pretrained: bool = False) -> None:
    if not pretrained and d.tokenizer is None and d.vocab_size < BYTE_ALPHABET + len(SPECIAL_TOKENS):
        raise UserError(where('vocab_size', d.vocab_size),
                        f'vocabulary too small: byte-level BPE needs the {BYTE_ALPHABET} byte tokens plus the '
                        f'{len(SPECIAL_TOKENS)} special tokens {", ".join(SPECIAL_TOKENS)}',
                        f'set Data.vocab_size >= {BYTE_ALPHABET + len(SPECIAL_TOKENS)}')
    if not 0 <= d.val_fraction < 1:
        raise UserError(where('val_fraction', d.val_fraction), 'the validation fraction must be in [0, 1)',
                        'set Data.val_fraction to e.g. 0.05')
    if n < 1 or l < 1:
        raise UserError(f'Memory.chunks = {n}, Memory.chunk_len = {l}', 'an example needs at least one token',
                        'set Memory.chunks and Memory.chunk_len to positive integers')




def prepare(plan, progress: bool = True, workers: int | None = None, warn: bool = True) -> Prepared:
    """Build the token store of `plan`'s data once (concurrent callers wait for the first, then reuse it; a damaged
    entry is rebuilt) and open its examples for `plan`'s layout. `workers`: encoder processes (None: automatic).
    With progress and warn, a curriculum that reads the train split more than once is warned about on stderr."""
    d, n, l = plan.data, plan.memory.chunks, plan.memory.chunk_len
    pretrained = _backbone_tokens(plan)  # a backbone's own tokenizer and special ids
    _check(d, n, l, pretrained is not None)
    check_source(d)  # a source that cannot be read is refused before anything is written
    key = cache_key(d, pretrained and pretrained[3])
    path = Path(d.cache_dir) / f'data-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}'
    with _cache_errors(d, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with T.locked(path, shared=True):  # the common case: an intact entry, verified by every rank at once
            hit = path.exists() and _damage(path) is None
        if hit:
            _log(progress, f'reusing cached data {path}')
        else:
            with T.locked(path):  # one builder; the others wait here, then find its entry
                hit = _reusable(path, progress)
                if not hit:
                    _build(d, key, path, workers, progress, pretrained)
                    _log(progress, f'cached data in {path}')
    out = _open(path, d, n, l, hit)
    warning = epochs_warning(plan, out)
    if progress and warn and warning:  # in every run's log, not only in the data report
        print(f'[data] {warning}', file=sys.stderr, flush=True)
    return out


@contextlib.contextmanager
def _cache_errors(d, path: Path):
    """An OSError while writing the cache (read-only folder, full disk, a file where the folder should be) is bad
    input naming Data.cache_dir; tokens.building has already removed the temp folder."""
    try:
        yield
    except OSError as e:
        raise UserError(where('cache_dir', d.cache_dir), f'cannot write the data cache in {path.parent}: '
                        f'{e.strerror or type(e).__name__}',
                        'point Data.cache_dir at a folder this user can write that has room for the cache')


def _reusable(path: Path, progress: bool) -> bool:
    if not path.exists():
        return False
    damage = _damage(path)
    if damage is None:
        _log(progress, f'reusing cached data {path}')
        return True
    print(f'[data] note: the cached data {path} is damaged ({damage}); rebuilding it', file=sys.stderr, flush=True)
    T.discard(path)
    return False


def _workers(requested: int | None, nbytes: int) -> int:
    if requested is not None:
        return requested
    if os.environ.get(WORKERS_VAR):
        return int(os.environ[WORKERS_VAR])
    return 1 if nbytes < PARALLEL_BYTES else min(len(os.sched_getaffinity(0)), 16)


def _build(d, key: dict, path: Path, workers: int | None, progress: bool, pretrained=None) -> None:
    """Documents -> spools -> tokenizer -> token files + meta.json, in a temp folder renamed to `path` at the end.
    `pretrained`: a backbone's (tokenizer, special ids, vocabulary), used as they are."""
    with T.building(path) as tmp:
        spools = _spool(d, tmp, progress)
        train = spools['train']
        if pretrained is not None:
            tok = pretrained[0]
        elif d.tokenizer is None:
            _log(progress, f'training byte-level BPE (vocab {d.vocab_size}) on {train.docs} train documents')
            tok = train_tokenizer(T.iter_spool(tmp, 'train'), d.vocab_size,
                                  progress and train.bytes > PROGRESS_BYTES, length=train.docs)
        else:
            tok = load_tokenizer(d.tokenizer)
        tok.encode_special_tokens = True  # literal "<pad>" in text is ordinary text, never the pad id
        tok.save(str(tmp / 'tokenizer.json'))
        ids, vocab = pretrained[1:3] if pretrained else (special_ids(tok), tok.get_vocab_size(with_added_tokens=True))
        dtype = T.token_dtype(vocab)
        stats = {}
        for split, sp in spools.items():
            bar = tqdm(total=sp.docs, unit='doc', desc=f'tokenize {split}', file=sys.stderr,
                       disable=not progress or sp.bytes < PROGRESS_BYTES)
            try:
                count = T.write_split(tmp, split, tok, ids['<eod>'], list(ids.values()), dtype,
                                      _workers(workers, sp.bytes), bar.update)
            except ValueError as e:
                raise UserError(where('tokenizer', d.tokenizer), str(e), f'use a tokenizer whose vocabulary does '
                                f'not contain {", ".join(SPECIAL_TOKENS)} as ordinary tokens')
            finally:
                bar.close()
            sp.remove()
            stats[split] = {'documents': sp.docs, 'tokens': count, 'bytes': sp.bytes,
                            'bytes_per_token': sp.bytes / max(count, 1)}
        meta = {'key': key, 'special_ids': ids, 'vocab_size': vocab, 'dtype': dtype.name, 'stats': stats,
                'files': {f: T.checksums(tmp / f) for f in CACHE_FILES}}
        (tmp / 'meta.json').write_text(json.dumps(meta, indent=1))


def _spool(d, tmp: Path, progress: bool) -> dict[str, T.Spool]:
    """Stream the documents into a spool per split by their content draw (documents.split_documents' rule,
    including its tiny-corpus fallback: an empty split takes the document with the extreme draw)."""
    spools = {s: T.Spool(tmp, s) for s in T.SPLITS}
    low = high = None  # (draw, split, position in that split) of the first lowest / highest draw
    small = d.source == 'embedded' or (not d.source.startswith('hub:') and
                                       local_path(d.source).stat().st_size < PROGRESS_BYTES)
    for text in tqdm(iter_documents(d), unit='doc', desc='read', file=sys.stderr, disable=not progress or small,
                     mininterval=1.0):
        u = draw(text)
        split = 'val' if u < d.val_fraction else 'train'
        at = (u, split, spools[split].docs)
        spools[split].add(text)
        low = at if low is None or u < low[0] else low
        high = at if high is None or u > high[0] else high
    for sp in spools.values():
        sp.close()
    total = sum(sp.docs for sp in spools.values())
    if total > 1 and d.val_fraction > 0 and not spools['val'].docs:
        spools['train'], spools['val'] = T.move_document(tmp, 'train', 'val', low[2])
    elif total > 1 and not spools['train'].docs:
        spools['val'], spools['train'] = T.move_document(tmp, 'val', 'train', high[2])
    return spools


def _no_examples(d, split: str, offsets: np.ndarray, n: int, l: int) -> UserError:
    lengths = np.diff(offsets) - 1
    longest = int(lengths.max()) if len(lengths) else 0
    if d.full_length_only:
        return UserError(where('full_length_only', True),
                         f'the context N*L = {n}*{l} = {n * l} tokens is longer than every {split} document '
                         f'(longest: {longest} tokens), so no {split} example is left',
                         'set Data.full_length_only = False (pad short documents), '
                         'use shorter Memory.chunk_len/chunks, or a corpus with longer documents')
    return UserError(where('source', d.source),
                     f'the {split} split has {int(lengths.sum())} tokens, fewer than one example of N*L = {n * l}',
                     'use a larger corpus, shorter Memory.chunk_len/chunks'
                     + (', or a larger Data.val_fraction' if split == 'val' else ''))


def _meta(path: Path) -> dict:
    meta = json.loads((path / 'meta.json').read_text())
    if not isinstance(meta, dict):
        raise ValueError('meta.json is not a JSON object')
    return meta


def _damage(path: Path) -> str | None:
    """Why a cache entry cannot be used (None: every file is there and matches the checksums recorded at build)."""
    missing = [f for f in (*CACHE_FILES, 'meta.json') if not (path / f).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    try:
        meta = _meta(path)
        if meta['key']['version'] != CACHE_VERSION:
            return f"cache version {meta['key']['version']}, this code reads {CACHE_VERSION}"
        bad = T.damaged(path, {f: meta['files'][f] for f in CACHE_FILES})
        np.dtype(meta['dtype'])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f'meta.json unreadable: {type(e).__name__}'
    if bad:
        return f"{', '.join(bad)} {'does' if len(bad) == 1 else 'do'} not match the sha256 in meta.json"
    try:
        Tokenizer.from_file(str(path / 'tokenizer.json'))
    except Exception as e:  # noqa: BLE001  (verified bytes that still do not load)
        return f'tokenizer.json does not load: {type(e).__name__}'
    return None


def _open(path: Path, d, n: int, l: int, hit: bool) -> Prepared:
    """The Prepared view of a verified entry: memory maps of its token files, examples for this layout."""
    meta = _meta(path)
    tok = Tokenizer.from_file(str(path / 'tokenizer.json'))
    tok.encode_special_tokens = True
    ids = meta['special_ids']
    examples, stats = {}, {}
    for split in T.SPLITS:
        tokens, offsets = T.open_split(path, split, meta['dtype'])
        ex = Examples(tokens, offsets, d.layout, d.padding_side, d.full_length_only, n, l, ids['<pad>'])
        if len(ex) == 0 and (split == 'train' or d.val_fraction > 0):
            raise _no_examples(d, split, offsets, n, l)
        s = meta['stats'][split]
        examples[split] = ex
        stats[split] = {'documents': s['documents'], 'documents_used': ex.documents_used, 'tokens': s['tokens'],
                        'bytes': s['bytes'], 'examples': len(ex), 'padding_fraction': ex.padding_fraction(),
                        'bytes_per_token': s['bytes_per_token']}
    return Prepared(tokenizer=tok, pad_id=ids['<pad>'], eod_id=ids['<eod>'], blank_id=ids['<blank>'],
                    copy_id=ids['<copy>'], vocab_size=meta['vocab_size'],
                    bytes_per_token={s: stats[s]['bytes_per_token'] for s in T.SPLITS}, examples=examples,
                    cache_path=path, cache_hit=hit, stats=stats)


# ----------------------------------------------------------------------------------------------------------
# CLI report

def consumption(plan, p: Prepared) -> list[dict]:
    """Per stage of the curriculum: training examples and tokens it draws (one global batch of Data.batch_size
    examples per step, as the trainer draws them; the stream continues across stages) and the epochs over the
    train split reached by its end."""
    rows, drawn, per = [], 0, plan.memory.chunks * plan.memory.chunk_len
    available = len(p.examples['train'])
    for s in plan.curriculum:
        examples = s.steps * plan.data.batch_size
        drawn += examples
        rows.append({'stage': s.name, 'steps': s.steps, 'examples': examples, 'tokens': examples * per,
                     'epochs': drawn / max(available, 1)})
    return rows


def report(p: Prepared, plan=None) -> str:
    rows = [('', 'train', 'val')]
    for k in ('documents', 'documents_used', 'tokens', 'examples', 'padding_fraction', 'bytes_per_token'):
        fmt = (lambda v: f'{v:.4f}') if k in ('padding_fraction', 'bytes_per_token') else (lambda v: f'{v:,}')
        rows.append((k.replace('_', ' '), fmt(p.stats['train'][k]), fmt(p.stats['val'][k])))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f'{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}' for r in rows]
    ex = p.examples['train']
    lines += [f'example shape    {(ex.n, ex.l)} (N chunks x L tokens)',
              f'vocab size       {p.vocab_size} (stored as {ex.tokens.dtype})',
              'special ids      ' + ', '.join(f'{t}={i}' for t, i in p.special_ids.items()),
              f'cache            {p.cache_path} ({"reused" if p.cache_hit else "built"})']
    if plan is not None:
        lines += ['', f'train tokens available: {len(ex) * ex.width:,} in {len(ex):,} examples '
                  f'(Data.batch_size = {plan.data.batch_size} examples a step)',
                  f'{"stage":<16} {"steps":>10} {"tokens consumed":>16} {"epochs at end":>14}']
        for r in consumption(plan, p):
            lines.append(f'{r["stage"]:<16} {r["steps"]:>10,} {r["tokens"]:>16,} {r["epochs"]:>14.2f}')
        if epochs_warning(plan, p):
            lines.append(epochs_warning(plan, p))
    return '\n'.join(lines)


def epochs_warning(plan, p: Prepared) -> str | None:
    """A warning when the curriculum reads the train split more than once (None when it does not)."""
    last = consumption(plan, p)[-1:]
    if not last or last[0]['epochs'] <= 1:
        return None
    return (f'warning: the curriculum reads the train split {last[0]["epochs"]:.2f} times (epochs > 1): examples '
            'repeat; use a larger corpus (Data.max_documents, Data.source) or fewer steps')


@cli
def main(argv=None) -> None:
    ap = Parser(prog='python -m runtime.data', description='Prepare the data of a spec and report it.')
    ap.add_argument('files', nargs='+', help='gin spec file(s)')
    ap.add_argument('-b', '--binding', action='append', default=[],
                    help="gin binding, e.g. -b 'Data.vocab_size = 1024'")
    ap.add_argument('--quiet', action='store_true', help='no progress output')
    args = ap.parse_args(argv)
    from compiler import spec
    plan = spec.load(args.files, args.binding).plan
    print(report(prepare(plan, progress=not args.quiet, warn=False), plan))  # the report holds the warning


if __name__ == '__main__':
    main()
