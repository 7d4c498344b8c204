"""The token store: documents -> flat memory-mapped token files on disk, built once per cache entry.

A cache entry (runtime/data.py names it) holds, per split ('train', 'val'):
    <split>.tokens   the split's documents in source order, each followed by <eod>, as one flat array of the
                     smallest unsigned dtype that holds the vocabulary (uint16 up to 65,536 ids, else uint32)
    <split>.offsets  int64 [documents + 1]: document k is tokens[offsets[k]:offsets[k + 1] - 1] (its <eod> excluded)
plus tokenizer.json and meta.json (sizes and per-block sha256 of every file, so damage is found and rebuilt).

Building streams: documents go to a UTF-8 spool file per split as they are read, worker processes encode ~1 MB
ranges of the spool with the `tokenizers` batch encoder and the parent appends their ids in order, so no stage
holds more than a few ranges of the corpus in memory. Building happens under a file lock in a private temp folder
renamed into place at the end: concurrent preparers (torchrun ranks, sweep members) wait for the first, then reuse
its entry; a failed or interrupted build leaves no temp folder behind (a killed one is swept by the next build).
Files are never changed in place: a rebuild renames the old entry aside and unlinks it, which processes that still
map it do not notice (truncating a mapped file by hand would make their reads fail with SIGBUS).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

SPLITS = ('train', 'val')
BLOCK = 64 << 20  # checksum block: damage is reported per file, hashing streams in blocks of this many bytes
RANGE_BYTES = 1 << 20  # text per encode task: big enough for the batch encoder, small enough to bound memory
WINDOW = 4  # encode tasks in flight per worker: keeps workers busy without piling up finished results


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id below vocab_size."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# ---------------------------------------------------------------------------------------------------- checksums

def checksums(path: Path) -> dict:
    """{'size', 'sha256': one hex digest per BLOCK bytes}: cheap to compare, and a damaged block is named."""
    blocks, h, filled = [], hashlib.sha256(), 0
    with open(path, 'rb') as f:
        while piece := f.read(1 << 20):  # read in 1 MiB pieces: memory stays flat whatever BLOCK is
            h.update(piece)
            filled += len(piece)
            if filled == BLOCK:
                blocks.append(h.hexdigest())
                h, filled = hashlib.sha256(), 0
    if filled or not blocks:
        blocks.append(h.hexdigest())
    return {'size': path.stat().st_size, 'sha256': blocks}


def damaged(folder: Path, recorded: dict) -> list[str]:
    """Names of the files in `recorded` whose size or block hashes differ from what was written (or that are gone)."""
    bad = []
    for name, want in recorded.items():
        p = folder / name
        if not p.is_file() or p.stat().st_size != want['size'] or checksums(p) != want:
            bad.append(name)
    return bad


# ---------------------------------------------------------------------------------------------------- lock + build

@contextlib.contextmanager
def locked(entry: Path, shared: bool = False):
    """Hold a lock for cache entry `entry` (blocking): exclusive for one builder at a time, shared for readers
    that verify it side by side (torchrun ranks). flock is released by the kernel when the holder dies, so a
    killed preparer never blocks the next one."""
    lock = entry.parent / f'.lock-{entry.name}'
    try:
        f = open(lock, 'a+b')
    except OSError:
        if not shared:
            raise  # a builder must be able to write here: the caller reports the cache folder
        # a read-only cache (a shared, pre-built one): take the lock read-only, or none where it cannot even be read
        # (nobody can build in a folder nobody can write, so a reader needs no lock there)
        try:
            f = open(lock, 'rb')
        except OSError:
            yield
            return
    with f:
        fcntl.flock(f, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def building(entry: Path):
    """A fresh private temp folder that becomes `entry` when the block ends normally; on any exception (a full or
    read-only disk, a bad document, Ctrl-C) it is deleted. Call under locked(entry): temp folders of this entry
    left by a killed builder are swept first (nobody else can be writing them)."""
    for stale in entry.parent.glob(f'.{entry.name}.tmp*'):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = entry.parent / f'.{entry.name}.tmp{os.getpid()}'
    try:
        tmp.mkdir()
        yield tmp
        os.rename(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def discard(entry: Path) -> None:
    """Remove a damaged entry (under its lock): renamed aside first, so a reader never sees it half deleted."""
    aside = entry.parent / f'.{entry.name}.tmp-damaged{os.getpid()}'
    os.rename(entry, aside)
    shutil.rmtree(aside, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- spool

class Spool:
    """Documents of one split appended as UTF-8 to <name>.spool, with int64 end offsets in <name>.spool.offsets."""

    def __init__(self, folder: Path, name: str):
        self.folder, self.name = folder, name
        self.text = open(folder / f'{name}.spool', 'wb')
        self.offsets = open(folder / f'{name}.spool.offsets', 'wb')
        self.offsets.write(np.zeros(1, np.int64).tobytes())
        self.docs, self.bytes, self._ends = 0, 0, []

    def add(self, text: str) -> None:
        b = text.encode('utf-8')
        self.text.write(b)
        self.docs, self.bytes = self.docs + 1, self.bytes + len(b)
        self._ends.append(self.bytes)
        if len(self._ends) >= 65536:
            self._flush()

    def _flush(self) -> None:
        self.offsets.write(np.asarray(self._ends, np.int64).tobytes())
        self._ends = []

    def close(self) -> None:
        self._flush()
        self.text.close()
        self.offsets.close()

    def remove(self) -> None:
        for suffix in ('.spool', '.spool.offsets'):
            (self.folder / f'{self.name}{suffix}').unlink(missing_ok=True)


def spool_offsets(folder: Path, name: str) -> np.ndarray:
    return np.memmap(folder / f'{name}.spool.offsets', np.int64, 'r')


def read_spool(folder: Path, name: str, lo: int, hi: int) -> list[str]:
    """Documents lo..hi-1 of a closed spool."""
    ends = spool_offsets(folder, name)
    start, stop = int(ends[lo]), int(ends[hi])
    with open(folder / f'{name}.spool', 'rb') as f:
        f.seek(start)
        raw = f.read(stop - start)
    cuts = ends[lo:hi + 1] - start
    return [raw[a:b].decode('utf-8') for a, b in zip(cuts[:-1], cuts[1:])]


def iter_spool(folder: Path, name: str):
    """Every document of a closed spool, read ~RANGE_BYTES at a time."""
    for lo, hi in ranges(folder, name):
        yield from read_spool(folder, name, lo, hi)


def ranges(folder: Path, name: str) -> list[tuple[int, int]]:
    """Consecutive document ranges of ~RANGE_BYTES of text each (at least one document per range)."""
    ends = spool_offsets(folder, name)
    docs, total = len(ends) - 1, int(ends[-1])
    cuts = np.searchsorted(ends, np.arange(RANGE_BYTES, total, RANGE_BYTES), side='left')
    cuts = np.unique(np.concatenate([[0], cuts, [docs]]).clip(0, docs))
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def move_document(folder: Path, src: str, dst: str, pos: int) -> tuple[Spool, Spool]:
    """Move document `pos` of closed spool `src` into closed, empty spool `dst` (the tiny-corpus fallback of the
    split); src is rewritten without it, streaming. Returns the new (src, dst) spools, closed."""
    for suffix in ('.spool', '.spool.offsets'):
        (folder / f'{src}{suffix}').rename(folder / f'{src}.old{suffix}')
    new, moved = Spool(folder, src), Spool(folder, dst)
    for i, doc in enumerate(iter_spool(folder, f'{src}.old')):
        (moved if i == pos else new).add(doc)
    for sp in (new, moved):
        sp.close()
    for suffix in ('.spool', '.spool.offsets'):
        (folder / f'{src}.old{suffix}').unlink()
    return new, moved


# ---------------------------------------------------------------------------------------------------- encoding

_TOKENIZER: Tokenizer | None = None


def _init_worker(tokenizer_json: str) -> None:
    global _TOKENIZER
    _TOKENIZER = Tokenizer.from_str(tokenizer_json)
    _TOKENIZER.encode_special_tokens = True


def encode_texts(tok: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(flat uint32 ids, int64 lengths) of texts. encode_batch_fast: the batch encoder without character offsets."""
    encs = tok.encode_batch_fast(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) for e in encs), np.int64, count=len(encs))
    flat = np.empty(int(lengths.sum()), np.uint32)
    at = 0
    for e, k in zip(encs, lengths):
        flat[at:at + k] = e.ids
        at += k
    return flat, lengths


def _encode_range(folder: str, name: str, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    return encode_texts(_TOKENIZER, read_spool(Path(folder), name, lo, hi))


def encoded(folder: Path, name: str, tok: Tokenizer, workers: int):
    """(ids, lengths) per range of spool `name`, in order. workers <= 1: in this process (the batch encoder still
    uses every core through its own threads); else a pool with a bounded number of ranges in flight. The workers
    are forked, as torch's DataLoader forks its workers: they share this process' pages instead of re-importing
    the caller's __main__ (spawned or fork-server workers would: torch and all, ~450 MB each under
    `python -m runtime.run`). TOKENIZERS_PARALLELISM=false while forking tells `tokenizers` the children must not
    use its thread pool (threads do not survive a fork) and keeps it from warning about that."""
    todo = ranges(folder, name)
    if workers <= 1:
        for lo, hi in todo:
            yield encode_texts(tok, read_spool(folder, name, lo, hi))
        return
    before = os.environ.get('TOKENIZERS_PARALLELISM')
    os.environ['TOKENIZERS_PARALLELISM'] = 'false'
    try:
        yield from _pooled(folder, name, tok, workers, todo)
    finally:
        if before is None:
            os.environ.pop('TOKENIZERS_PARALLELISM', None)
        else:
            os.environ['TOKENIZERS_PARALLELISM'] = before


def _pooled(folder: Path, name: str, tok: Tokenizer, workers: int, todo: list[tuple[int, int]]):
    with ProcessPoolExecutor(workers, mp_context=get_context('fork'), initializer=_init_worker,
                             initargs=(tok.to_str(),)) as pool:
        pending = deque()
        for lo, hi in todo:
            pending.append(pool.submit(_encode_range, str(folder), name, lo, hi))
            if len(pending) >= WINDOW * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def write_split(folder: Path, name: str, tok: Tokenizer, eod: int, specials: list[int], dtype: np.dtype,
                workers: int, on_range=None) -> int:
    """Encode spool `name` into <name>.tokens / <name>.offsets (documents each followed by <eod>). Returns the
    number of text tokens. Raises ValueError when the tokenizer maps text to a special id."""
    total, written = 0, 0
    with open(folder / f'{name}.tokens', 'wb') as out, open(folder / f'{name}.offsets', 'wb') as offs:
        offs.write(np.zeros(1, np.int64).tobytes())
        for flat, lengths in encoded(folder, name, tok, workers):
            if np.isin(flat, specials).any():
                raise ValueError('the tokenizer maps ordinary text to a special token id')
            ends = np.cumsum(lengths + 1)
            stream = np.full(int(ends[-1]) if len(ends) else 0, eod, dtype)
            is_text = np.ones(len(stream), bool)
            is_text[ends - 1] = False
            stream[is_text] = flat
            out.write(stream.tobytes())
            offs.write((ends + written).tobytes())
            total, written = total + int(lengths.sum()), written + len(stream)
            if on_range is not None:
                on_range(len(lengths))
    return total


def open_split(folder: Path, name: str, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, offsets) of one split as read-only memory maps (an empty split reads as empty arrays)."""
    def mm(path, dt):
        return np.memmap(path, dt, 'r') if path.stat().st_size else np.zeros(0, dt)
    return mm(folder / f'{name}.tokens', np.dtype(dtype)), mm(folder / f'{name}.offsets', np.int64)
