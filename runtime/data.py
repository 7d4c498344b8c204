"""Data pipeline: documents -> byte-level BPE -> examples of N chunks x L tokens, cached on disk.

    prepare(plan)  -> Prepared (tokenizer, special ids, train/val [E, N, L] int64 tensors + bool key masks)
    Batches(...)   -> infinite, seeded, resumable, DDP-sharded batches over one split

Choices worth knowing:
- The train/val split hashes each document's *content* (sha256), so it does not depend on document order,
  on the seed, or on which other documents are present; duplicates always land in the same split.
- The tokenizer is trained on the train split only (val text never shapes the vocabulary).
- Special tokens are real added tokens and `encode_special_tokens` is on, so a literal "<pad>" in the
  corpus is encoded as ordinary text and can never collide with the pad id.
- The cache key covers everything the cached arrays depend on (source identity incl. file size/mtime,
  tokenizer settings, layout, N, L, val_fraction). Not the seed: nothing cached depends on it (shuffling
  happens in Batches), so a seed sweep reuses one cache entry.
- A cache entry is derived data: meta.json records the sha256 of tokenizer.json and examples.pt, and an entry that
  does not verify (a truncated file, garbage in meta.json) is rebuilt with a one-line note. A cache folder that
  cannot be written is refused (exit 2) before anything else happens.

`python -m runtime.data SPEC [more.gin] [-b BINDING]...` prepares the data of a spec and prints a report.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tokenizers
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from compiler.checkpoint import sha256_file
from compiler.errors import SpecError, cli
from compiler.load import SPECIAL_TOKENS, special_ids

BYTE_ALPHABET = 256  # byte-level BPE starts from all 256 bytes
CACHE_VERSION = 2  # bump when the cached format or the example-building logic changes (2: sha256 of files in meta)
CACHE_FILES = ('tokenizer.json', 'examples.pt')  # their sha256 is recorded in meta.json and checked on every load
OFFLINE_VARS = ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE')
PROGRESS_BYTES = 1 << 20  # show progress bars only for corpora larger than this


@dataclass
class Prepared:
    """Everything the runtime needs from the data. Example arrays are [num_examples, N, L]."""
    tokenizer: Tokenizer
    pad_id: int
    eod_id: int
    blank_id: int
    copy_id: int
    vocab_size: int  # actual size, added tokens included (may be < Data.vocab_size on a tiny corpus)
    bytes_per_token: dict[str, float]  # per split: UTF-8 bytes of the documents / their tokens (for bits per byte)
    train: torch.Tensor  # int64 [E, N, L]
    train_mask: torch.Tensor  # bool [E, N, L], True = real token (False = padding)
    val: torch.Tensor
    val_mask: torch.Tensor
    cache_path: Path
    cache_hit: bool  # True when this call reused an existing cache entry
    # per split: documents, tokens, examples, padding_fraction, ...
    stats: dict[str, dict] = field(default_factory=dict)

    @property
    def special_ids(self) -> dict[str, int]:
        return {'<pad>': self.pad_id, '<eod>': self.eod_id, '<blank>': self.blank_id, '<copy>': self.copy_id}


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f'[data] {msg}', file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# documents

def _where(name: str, value) -> str:
    return f'Data.{name} = {value!r}'


def _local_path(source: str) -> Path:
    p = Path(source).expanduser()
    if not p.is_file():
        raise SpecError(_where('source', source), f'no such file: {p.resolve()}',
                        "point Data.source at an existing .txt/.jsonl/.parquet file, 'embedded', "
                        "or 'hub:<name>[:<config>]'")
    if p.suffix not in ('.txt', '.jsonl', '.json', '.parquet'):
        raise SpecError(_where('source', source), f'unsupported file type {p.suffix!r}',
                        'use a .txt (documents separated by blank lines), .jsonl or .parquet file')
    return p


def _offline() -> str | None:
    for var in OFFLINE_VARS:
        if os.environ.get(var, '').strip().lower() in ('1', 'true', 'yes', 'on'):
            return var
    return None


def embedded_documents() -> list[str]:
    """Real English text that ships with Python: pydoc's help topics (~465k characters), one document per section.

    Topics are reST-like text with underlined headings. Whole topics are too lumpy to split (79 documents, the
    largest 13 % of the text, so a 5 % validation draw lands anywhere between 1 % and 15 %); their 208 sections
    are coherent texts of ~1.2k characters (median) and a 5 % draw gives 5.1 % of the bytes.
    """
    from pydoc_data.topics import topics
    docs = []
    for text in topics.values():
        docs += re.split(r'\n(?=[^\n]+\n[=*\-~^"]{3,}\n)', text.strip())  # cut before each heading + underline
    return docs


def load_documents(d) -> list[str]:
    """The documents of Data `d` in source order (stripped, empty ones dropped, at most max_documents)."""
    src = d.source
    if src == 'embedded':
        docs = embedded_documents()
    elif src.startswith('hub:'):
        docs = _hub_documents(d)
    else:
        p = _local_path(src)
        if p.suffix == '.txt':
            try:
                text = p.read_text(encoding='utf-8')
            except UnicodeDecodeError as e:
                raise SpecError(_where('source', src), f'not valid UTF-8 text (byte {e.start}: {e.reason})',
                                'convert the file to UTF-8, e.g. `iconv -f latin1 -t utf-8`')
            docs = re.split(r'\n[ \t]*\n', text)  # documents are separated by blank lines
        else:
            docs = _datasets_documents(d, p)
    docs = [t.strip() for t in docs]
    docs = [t for t in docs if t]
    if d.max_documents is not None:
        docs = docs[:d.max_documents]
    if not docs:
        raise SpecError(_where('source', src), 'the corpus is empty (no non-blank document)',
                        'point Data.source at a file with text in it')
    return docs


def _texts(rows, d, where: str, limit: int | None) -> list[str]:
    out = []
    for row in rows:
        if d.text_field not in row:
            raise SpecError(_where('text_field', d.text_field), f'{where} has no field {d.text_field!r} '
                            f'(fields: {", ".join(map(str, row))})',
                            'set Data.text_field to the column that holds the text')
        t = row[d.text_field]
        if t is not None and not isinstance(t, str):
            raise SpecError(_where('text_field', d.text_field), f'{where}: field {d.text_field!r} holds '
                            f'{type(t).__name__}, not text', 'set Data.text_field to a text column')
        if t:
            out.append(t)
        if limit is not None and len(out) >= limit:
            break
    return out


def _datasets_documents(d, p: Path) -> list[str]:
    import datasets
    kind = 'parquet' if p.suffix == '.parquet' else 'json'
    try:
        ds = datasets.load_dataset(kind, data_files=str(p), split='train', cache_dir=str(Path(d.cache_dir) / 'hf'))
    except Exception as e:  # malformed file: datasets raises many different types
        raise SpecError(_where('source', d.source), f'could not read {p} as {kind}: {type(e).__name__}: {e}',
                        'check that the file is valid '
                        f'{"JSON lines (one object per line)" if kind == "json" else "parquet"}')
    return _texts(ds, d, str(p), None)


def _hub_documents(d) -> list[str]:
    name, _, config = d.source[len('hub:'):].partition(':')
    where = _where('source', d.source)
    var = _offline()
    if var:
        raise SpecError(where, f'a hub dataset needs the network, but {var}={os.environ[var]} (offline mode)',
                        f'on a machine with network unset {" and ".join(OFFLINE_VARS)}; offline, set Data.source to '
                        "'embedded' or a local .txt/.jsonl/.parquet file")
    if d.max_documents is None:
        raise SpecError(_where('max_documents', None), 'a hub dataset is streamed and needs a document limit',
                        'set Data.max_documents (e.g. 100000)')
    import datasets
    try:
        ds = datasets.load_dataset(name, config or None, split=d.split, streaming=True)
        return _texts(ds, d, d.source, d.max_documents)
    except SpecError:
        raise
    except Exception as e:  # no network, unknown dataset/config/split: all end here
        raise SpecError(where, f'could not stream hub dataset {name!r} (config {config or None!r}, split '
                        f'{d.split!r}): {type(e).__name__}: {e}',
                        'check the name, config and Data.split and that the hub is reachable; offline, use '
                        "'embedded' or a local file")


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[int], list[int]]:
    """Indices of train and val documents, in source order.

    A document goes to val when the first 8 bytes of sha256(content), read as a number in [0, 1), fall below
    val_fraction. The hash is stable across processes and Python versions (unlike hash()). On a tiny corpus
    the draw may leave a split empty; then the document with the extreme hash moves, still deterministically.
    """
    u = [int.from_bytes(hashlib.sha256(t.encode('utf-8')).digest()[:8], 'big') / 2**64 for t in docs]
    is_val = [x < val_fraction for x in u]
    if len(docs) > 1 and val_fraction > 0 and not any(is_val):
        is_val[min(range(len(u)), key=u.__getitem__)] = True
    if len(docs) > 1 and all(is_val):
        is_val[max(range(len(u)), key=u.__getitem__)] = False
    train = [i for i, v in enumerate(is_val) if not v]
    val = [i for i, v in enumerate(is_val) if v]
    return train, val


# ----------------------------------------------------------------------------------------------------------
# tokenizer

def train_tokenizer(texts: list[str], vocab_size: int, progress: bool = False) -> Tokenizer:
    """Byte-level BPE (GPT-2 style) with SPECIAL_TOKENS at ids 0..3. Deterministic for the same texts."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return tok


def load_tokenizer(path: str) -> Tokenizer:
    """A tokenizer.json file, or a pretrained folder holding one; SPECIAL_TOKENS are added if missing."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / 'tokenizer.json'
    if not p.is_file():
        raise SpecError(_where('tokenizer', path), f'no tokenizer.json at {p}',
                        'point Data.tokenizer at a tokenizer.json or a folder with one, or set it to None to train BPE')
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:
        raise SpecError(_where('tokenizer', path), f'cannot load {p}: {e}',
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


def encode(tok: Tokenizer, texts: list[str], progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """All texts -> (flat int64 ids, per-text lengths). encode_batch_fast skips offsets (we never use them)."""
    total = sum(len(t) for t in texts)
    bar = tqdm(total=total, unit='char', unit_scale=True, desc='tokenize',
               disable=not progress or total < PROGRESS_BYTES)
    ids, lengths, start = [], [], 0
    while start < len(texts):  # chunks of ~1 MB keep the bar moving without hurting the Rust-side parallelism
        end, size = start, 0
        while end < len(texts) and (size < PROGRESS_BYTES or end == start):
            size += len(texts[end])
            end += 1
        for e in tok.encode_batch_fast(texts[start:end], add_special_tokens=False):
            ids.append(e.ids)
            lengths.append(len(ids[-1]))
        bar.update(size)
        start = end
    bar.close()
    lengths = np.array(lengths, dtype=np.int64)
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths


# ----------------------------------------------------------------------------------------------------------
# examples

def pack(flat: np.ndarray, lengths: np.ndarray, eod_id: int, n: int, l: int) -> tuple[np.ndarray, np.ndarray]:
    """Documents joined as doc0 <eod> doc1 <eod> ..., cut into windows of n*l tokens; the last partial one dropped."""
    stream = np.empty(len(flat) + len(lengths), dtype=np.int64)
    eod_at = np.cumsum(lengths + 1) - 1
    is_text = np.ones(len(stream), dtype=bool)
    is_text[eod_at] = False
    stream[is_text] = flat
    stream[eod_at] = eod_id
    count = len(stream) // (n * l)
    x = stream[:count * n * l].reshape(count, n, l)
    return x, np.ones_like(x, dtype=bool)


def pad(flat: np.ndarray, lengths: np.ndarray, pad_id: int, side: str, n: int, l: int) -> tuple[np.ndarray, np.ndarray]:
    """One document per row, truncated to its first n*l tokens, padded with pad_id on `side`."""
    width = n * l
    x = np.full((len(lengths), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(lengths), width), dtype=bool)
    starts = np.cumsum(lengths) - lengths
    for i, (s, k) in enumerate(zip(starts, lengths)):
        k = min(int(k), width)
        cols = slice(0, k) if side == 'right' else slice(width - k, width)
        x[i, cols] = flat[s:s + k]
        mask[i, cols] = True
    return x.reshape(-1, n, l), mask.reshape(-1, n, l)


def _select(flat: np.ndarray, lengths: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return flat[np.repeat(keep, lengths)], lengths[keep]


def build_examples(flat, lengths, d, ids: dict, n: int, l: int):
    """(examples, masks, number of documents used) for one split, following Data `d`'s layout."""
    if d.full_length_only:
        flat, lengths = _select(flat, lengths, lengths >= n * l)
    if d.layout == 'packed':
        x, m = pack(flat, lengths, ids['<eod>'], n, l)
    else:
        x, m = pad(flat, lengths, ids['<pad>'], d.padding_side, n, l)
    return torch.from_numpy(x), torch.from_numpy(m), len(lengths)


# ----------------------------------------------------------------------------------------------------------
# prepare + cache

def cache_key(d, n: int, l: int) -> dict:
    """Everything the cached arrays depend on. Local files are identified by path, size and mtime."""
    src = d.source
    if src == 'embedded':
        import pydoc_data.topics as t
        st = os.stat(t.__file__)
        source = {'embedded': sys.version.split()[0], 'size': st.st_size}
    elif src.startswith('hub:'):
        source = {'hub': src, 'split': d.split}  # no revision pinning: the hub gives none offline
    else:
        p = _local_path(src)
        st = p.stat()
        source = {'path': str(p.resolve()), 'size': st.st_size, 'mtime': st.st_mtime_ns}
    return {'version': CACHE_VERSION, 'source': source, 'text_field': d.text_field, 'max_documents': d.max_documents,
            'tokenizer': _tokenizer_identity(d), 'layout': d.layout, 'padding_side': d.padding_side,
            'full_length_only': d.full_length_only, 'chunks': n, 'chunk_len': l, 'val_fraction': d.val_fraction,
            'specials': list(SPECIAL_TOKENS)}


def _check(d, n: int, l: int) -> None:
    if d.tokenizer is None and d.vocab_size < BYTE_ALPHABET + len(SPECIAL_TOKENS):
        raise SpecError(_where('vocab_size', d.vocab_size),
                        f'vocabulary too small: byte-level BPE needs the {BYTE_ALPHABET} byte tokens plus the '
                        f'{len(SPECIAL_TOKENS)} special tokens {", ".join(SPECIAL_TOKENS)}',
                        f'set Data.vocab_size >= {BYTE_ALPHABET + len(SPECIAL_TOKENS)}')
    if not 0 <= d.val_fraction < 1:
        raise SpecError(_where('val_fraction', d.val_fraction), 'the validation fraction must be in [0, 1)',
                        'set Data.val_fraction to e.g. 0.05')
    if n < 1 or l < 1:
        raise SpecError(f'Memory.chunks = {n}, Memory.chunk_len = {l}', 'an example needs at least one token',
                        'set Memory.chunks and Memory.chunk_len to positive integers')




def prepare(plan, progress: bool = True) -> Prepared:
    """Load, split, tokenize and lay out the data of `plan`, or reuse the cache entry for the same settings."""
    d, n, l = plan.data, plan.memory.chunks, plan.memory.chunk_len
    _check(d, n, l)
    key = cache_key(d, n, l)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(d.cache_dir) / f'data-{digest}'
    if path.exists():
        damage = _damage(path)
        if damage is None:
            try:
                out = _load(path)
            except Exception as e:  # noqa: BLE001  (verified files that still do not load: rebuild them too)
                damage = f'{type(e).__name__}: {(str(e).strip().splitlines() or [""])[0]}'
            else:
                _log(progress, f'reusing cached data {path}')
                return out
        print(f'[data] note: the cached data {path} is damaged ({damage}); rebuilding it', file=sys.stderr, flush=True)
        _discard(path)

    docs = load_documents(d)
    train_idx, val_idx = split_documents(docs, d.val_fraction)
    train_docs, val_docs = [docs[i] for i in train_idx], [docs[i] for i in val_idx]
    if d.tokenizer is None:
        _log(progress, f'training byte-level BPE (vocab {d.vocab_size}) on {len(train_docs)} train documents')
        tok = train_tokenizer(train_docs, d.vocab_size, progress and sum(map(len, train_docs)) > PROGRESS_BYTES)
    else:
        tok = load_tokenizer(d.tokenizer)
    tok.encode_special_tokens = True  # literal "<pad>" in text is ordinary text, never the pad id
    ids = special_ids(tok)

    arrays, stats = {}, {}
    for split, texts in (('train', train_docs), ('val', val_docs)):
        flat, lengths = encode(tok, texts, progress)
        if np.isin(flat, list(ids.values())).any():
            raise SpecError(_where('tokenizer', d.tokenizer), 'the tokenizer maps ordinary text to a special token id',
                            f'use a tokenizer whose vocabulary does not contain {", ".join(SPECIAL_TOKENS)} '
                            'as ordinary tokens')
        x, m, used = build_examples(flat, lengths, d, ids, n, l)
        nbytes = sum(len(t.encode('utf-8')) for t in texts)
        stats[split] = {'documents': len(texts), 'documents_used': used, 'tokens': int(lengths.sum()), 'bytes': nbytes,
                        'examples': len(x), 'padding_fraction': float(1 - m.float().mean()) if len(x) else 0.0,
                        'bytes_per_token': nbytes / max(int(lengths.sum()), 1)}
        arrays[split], arrays[f'{split}_mask'] = x, m
        if len(x) == 0 and (split == 'train' or d.val_fraction > 0):
            raise _no_examples(d, split, lengths, n, l)

    # Write into a private temp folder, then rename: a crash or a concurrent writer never leaves a half entry.
    tmp = path.parent / f'.{path.name}.tmp{os.getpid()}'
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        tok.save(str(tmp / 'tokenizer.json'))
        torch.save(arrays, tmp / 'examples.pt')
    except (OSError, RuntimeError) as e:  # RuntimeError: torch.save's own writer on a full disk
        shutil.rmtree(tmp, ignore_errors=True)
        raise SpecError(_where('cache_dir', d.cache_dir), f'cannot write the data cache in {path.parent}: '
                        f'{getattr(e, "strerror", None) or (str(e).strip().splitlines() or [""])[0]}',
                        'point Data.cache_dir at a folder this user can write that has room for the cache')
    meta = {'key': key, 'special_ids': ids, 'vocab_size': tok.get_vocab_size(with_added_tokens=True), 'stats': stats,
            'sha256': {f: sha256_file(tmp / f) for f in CACHE_FILES}}
    (tmp / 'meta.json').write_text(json.dumps(meta, indent=1))
    try:
        os.rename(tmp, path)
    except OSError:  # another process (e.g. another DDP rank) finished first: keep its entry
        shutil.rmtree(tmp, ignore_errors=True)
        if _damage(path) is not None:
            raise
    _log(progress, f'cached data in {path}')
    out = _load(path)
    out.cache_hit = False
    return out


def _no_examples(d, split: str, lengths: np.ndarray, n: int, l: int) -> SpecError:
    longest = int(lengths.max()) if len(lengths) else 0
    if d.full_length_only:
        return SpecError(_where('full_length_only', True),
                         f'the context N*L = {n}*{l} = {n * l} tokens is longer than every {split} document '
                         f'(longest: {longest} tokens), so no {split} example is left',
                         'set Data.full_length_only = False (pad short documents), '
                         'use shorter Memory.chunk_len/chunks, or a corpus with longer documents')
    return SpecError(_where('source', d.source),
                     f'the {split} split has {int(lengths.sum())} tokens, fewer than one example of N*L = {n * l}',
                     'use a larger corpus, shorter Memory.chunk_len/chunks'
                     + (', or a larger Data.val_fraction' if split == 'val' else ''))


def _meta(path: Path) -> dict:
    meta = json.loads((path / 'meta.json').read_text())
    if not isinstance(meta, dict):
        raise ValueError('meta.json is not a JSON object')
    return meta


def _damage(path: Path) -> str | None:
    """Why a cache entry cannot be used (None: every file is there and matches the sha256 recorded at build)."""
    missing = [f for f in (*CACHE_FILES, 'meta.json') if not (path / f).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    try:
        recorded = _meta(path)['sha256']
        bad = [f for f in CACHE_FILES if sha256_file(path / f) != recorded[f]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f'meta.json unreadable: {type(e).__name__}'
    return f"{', '.join(bad)} {'does' if len(bad) == 1 else 'do'} not match the sha256 in meta.json" if bad else None


def _discard(path: Path) -> None:
    """Move a damaged entry aside, then delete it: a concurrent run that rebuilt it meanwhile keeps its own."""
    aside = path.parent / f'.{path.name}.damaged{os.getpid()}'
    try:
        os.rename(path, aside)
    except OSError:
        return  # already moved by another process
    shutil.rmtree(aside, ignore_errors=True)


def _load(path: Path) -> Prepared:
    meta = _meta(path)
    arrays = torch.load(path / 'examples.pt', weights_only=True)
    tok = Tokenizer.from_file(str(path / 'tokenizer.json'))
    tok.encode_special_tokens = True
    ids = meta['special_ids']
    return Prepared(tokenizer=tok, pad_id=ids['<pad>'], eod_id=ids['<eod>'], blank_id=ids['<blank>'],
                    copy_id=ids['<copy>'], vocab_size=meta['vocab_size'],
                    bytes_per_token={s: meta['stats'][s]['bytes_per_token'] for s in ('train', 'val')},
                    train=arrays['train'], train_mask=arrays['train_mask'],
                    val=arrays['val'], val_mask=arrays['val_mask'],
                    cache_path=path, cache_hit=True, stats=meta['stats'])


# ----------------------------------------------------------------------------------------------------------
# batches

class Batches:
    """Infinite batches over one split: a fresh seeded permutation per epoch, resumable, DDP-sharded.

    The global stream is perm(epoch 0) ++ perm(epoch 1) ++ ...; each step takes the next `batch_size` examples
    of it (a batch may straddle two epochs, so every example is seen equally often and a split smaller than a
    batch still works). Rank r of `world` takes the r-th contiguous slice of each global batch, so ranks are
    disjoint and together see exactly what one process would. The position (epoch, index) is global, so a run
    may resume with a different world size.
    """

    def __init__(self, examples: torch.Tensor, masks: torch.Tensor, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1, shuffle: bool = True):
        if len(examples) == 0:
            raise SpecError('Data', 'no examples to batch', 'check the data report: python -m runtime.data SPEC')
        if batch_size % world:
            raise SpecError(_where('batch_size', batch_size), f'the global batch does not split over {world} processes',
                            f'use a Data.batch_size divisible by {world}')
        self.examples, self.masks = examples, masks
        self.batch_size, self.seed, self.rank, self.world, self.shuffle = batch_size, seed, rank, world, shuffle
        self.local = batch_size // world
        self.epoch, self.index = 0, 0
        self._perm_epoch, self._perm = None, None

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            n = len(self.examples)
            # SeedSequence([seed, epoch]): independent streams per (seed, epoch), no arithmetic collisions.
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._perm_epoch = epoch
        return self._perm

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens int64 [batch_size // world, N, L], key mask bool of the same shape) for this rank."""
        take = []
        while sum(map(len, take)) < self.batch_size:
            perm = self.permutation(self.epoch)
            k = min(self.batch_size - sum(map(len, take)), len(perm) - self.index)
            take.append(perm[self.index:self.index + k])
            self.index += k
            if self.index == len(perm):
                self.epoch, self.index = self.epoch + 1, 0
        idx = torch.from_numpy(np.concatenate(take)[self.rank * self.local:(self.rank + 1) * self.local])
        return self.examples[idx], self.masks[idx]

    def state_dict(self) -> dict:
        return {'epoch': self.epoch, 'index': self.index, 'seed': self.seed, 'batch_size': self.batch_size,
                'num_examples': len(self.examples), 'shuffle': self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for k in ('seed', 'batch_size', 'num_examples', 'shuffle'):
            if state[k] != mine[k]:  # a different stream: "continuing" it would silently change the trajectory
                raise SpecError('resume (data position)', f'the checkpoint was taken with {k} = {state[k]}, '
                                f'this run has {k} = {mine[k]}',
                                'resume with the same spec and data, or start a new run')
        self.epoch, self.index = state['epoch'], state['index']


# ----------------------------------------------------------------------------------------------------------
# CLI report

def report(p: Prepared) -> str:
    rows = [('', 'train', 'val')]
    for k in ('documents', 'documents_used', 'tokens', 'examples', 'padding_fraction', 'bytes_per_token'):
        fmt = (lambda v: f'{v:.4f}') if k in ('padding_fraction', 'bytes_per_token') else (lambda v: f'{v:,}')
        rows.append((k.replace('_', ' '), fmt(p.stats['train'][k]), fmt(p.stats['val'][k])))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f'{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}' for r in rows]
    lines += [f'example shape    {tuple(p.train.shape[1:])} (N chunks x L tokens)',
              f'vocab size       {p.vocab_size}',
              'special ids      ' + ', '.join(f'{t}={i}' for t, i in p.special_ids.items()),
              f'cache            {p.cache_path} ({"reused" if p.cache_hit else "built"})']
    return '\n'.join(lines)


@cli
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog='python -m runtime.data', description='Prepare the data of a spec and report it.')
    ap.add_argument('files', nargs='+', help='gin spec file(s)')
    ap.add_argument('-b', '--binding', action='append', default=[],
                    help="gin binding, e.g. -b 'Data.vocab_size = 1024'")
    ap.add_argument('--quiet', action='store_true', help='no progress output')
    args = ap.parse_args(argv)
    from compiler import spec
    plan = spec.load(args.files, args.binding).plan
    print(report(prepare(plan, progress=not args.quiet)))


if __name__ == '__main__':
    main()
