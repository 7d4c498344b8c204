"""Examples of N chunks x L tokens, cut on the fly from a split of the token store, and the resumable loader.

    Examples(tokens, offsets, layout, ...)   one split's examples [E, N, L]: len(), .take(rows) -> (tokens, masks)
    Batches(examples, batch_size, seed, rank, world)   infinite, seeded, resumable, rank-sharded batches

Layouts (Data.layout), identical to what the in-memory pipeline before the token store built:
- 'packed': the stream doc0 <eod> doc1 <eod> ... cut into windows of N*L tokens, the last partial window dropped.
  Example i is tokens[i*N*L:(i+1)*N*L] of the store (which holds exactly that stream): a slice of the memory map.
- 'padded': one document per row, its first N*L tokens, padded with <pad> on Data.padding_side.
- Data.full_length_only: only documents of at least N*L tokens take part (packed: the stream of those documents).
Only per-document arrays (int64, 8 bytes a document) are held in memory, never the tokens.
"""
from __future__ import annotations

import numpy as np
import torch

from compiler.errors import UserError


class Examples:
    """One split's examples over the store's memory maps (runtime/tokens.py: tokens with an <eod> after each
    document; offsets[k] = where document k starts)."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, layout: str, padding_side: str,
                 full_length_only: bool, n: int, l: int, pad_id: int):
        self.tokens, self.offsets, self.layout, self.side = tokens, offsets, layout, padding_side
        self.n, self.l, self.width, self.pad_id = n, l, n * l, pad_id
        docs = max(len(offsets) - 1, 0)
        lengths = np.diff(offsets) - 1 if (full_length_only or layout == 'padded') else None  # text tokens per doc
        self.docs = np.flatnonzero(lengths >= self.width) if full_length_only else None  # the documents used
        if layout == 'padded':
            self.lengths = lengths if self.docs is None else lengths[self.docs]
            self.count = len(self.lengths)
        elif self.docs is not None:  # packed over the long documents only: where each one ends in that stream
            self.ends = np.cumsum(lengths[self.docs] + 1)
            self.count = int(self.ends[-1]) // self.width if len(self.ends) else 0
        else:
            self.count = len(tokens) // self.width
        self.documents_used = docs if self.docs is None else len(self.docs)

    def __len__(self) -> int:
        return self.count

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.count, self.n, self.l)

    def padding_fraction(self) -> float:
        if self.layout != 'padded' or not self.count:
            return 0.0
        real = np.minimum(self.lengths, self.width).sum()
        # float32 as the in-memory pipeline computed it (1 - mask.float().mean()), so recorded stats stay the same
        return float(np.float32(1) - np.float32(real) / np.float32(self.count * self.width))

    def take(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens int64 [len(rows), N, L], key mask bool, True = real token) of examples `rows`, in that order."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.count):
            raise IndexError(f'example index out of range 0..{self.count - 1}')
        x = np.empty((len(rows), self.width), np.int64)
        m = np.ones((len(rows), self.width), bool)
        for j, i in enumerate(rows):
            if self.layout == 'padded':
                self._padded(int(i), x[j], m[j])
            elif self.docs is None:
                x[j] = self.tokens[i * self.width:(i + 1) * self.width]
            else:
                self._window(int(i) * self.width, x[j])
        shape = (len(rows), self.n, self.l)
        return torch.from_numpy(x.reshape(shape)), torch.from_numpy(m.reshape(shape))

    def _padded(self, i: int, x: np.ndarray, m: np.ndarray) -> None:
        doc = i if self.docs is None else int(self.docs[i])
        k = min(int(self.lengths[i]), self.width)
        cols = slice(0, k) if self.side == 'right' else slice(self.width - k, self.width)
        x[:] = self.pad_id
        m[:] = False
        x[cols] = self.tokens[self.offsets[doc]:self.offsets[doc] + k]
        m[cols] = True

    def _window(self, start: int, x: np.ndarray) -> None:
        """Tokens start..start+width of the stream of the selected documents (each with its <eod>)."""
        k, at = int(np.searchsorted(self.ends, start, side='right')), 0
        while at < self.width:
            doc_start = int(self.ends[k - 1]) if k else 0
            inside = start + at - doc_start
            src = int(self.offsets[self.docs[k]]) + inside
            take = min(self.width - at, int(self.ends[k]) - (start + at))
            x[at:at + take] = self.tokens[src:src + take]
            at, k = at + take, k + 1

    def all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every example in memory (int64: 8 bytes a token): for small splits and tests, never the trainer."""
        return self.take(np.arange(self.count))


class TensorExamples:
    """In-memory examples [E, N, L] with masks, behind the same interface as Examples (tests, benchmarks)."""

    def __init__(self, tokens: torch.Tensor, masks: torch.Tensor):
        self.tokens, self.masks = tokens, masks

    def __len__(self) -> int:
        return len(self.tokens)

    def take(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(np.asarray(rows, dtype=np.int64))
        return self.tokens[idx], self.masks[idx]


class Batches:
    """Infinite batches over one split: a fresh seeded permutation per epoch, resumable, sharded over ranks.

    The global stream is perm(epoch 0) ++ perm(epoch 1) ++ ...; each step takes the next `batch_size` examples
    of it (a batch may straddle two epochs, so every example is seen equally often and a split smaller than a
    batch still works). Rank r of `world` takes the r-th contiguous slice of each global batch and reads only those
    rows from the store, so ranks are disjoint and together see exactly what one process would. The position
    (epoch, index) is global: state_dict() / load_state_dict() carry it through a checkpoint, and a run may resume
    at a different world size.
    """

    def __init__(self, examples, batch_size: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True):
        if len(examples) == 0:
            raise UserError('Data', 'no examples to batch', 'check the data report: python -m runtime.data SPEC')
        self.examples = examples
        self.seed, self.rank, self.world, self.shuffle = seed, rank, world, shuffle
        self.resize(batch_size)
        self.epoch, self.index = 0, 0
        self._perm_epoch, self._perm = None, None

    def resize(self, batch_size: int, where: str | None = None) -> None:
        """Take `batch_size` examples per step from here on (a stage's Stage.batch_size): the stream and the position
        in it stay, only the cut changes. `where` names the binding for the error (default: Data.batch_size)."""
        if batch_size % self.world:
            raise UserError(where or f'Data.batch_size = {batch_size}', f'the global batch of {batch_size} does not '
                            f'split over {self.world} processes', f'use a batch size divisible by {self.world}')
        self.batch_size, self.local = batch_size, batch_size // self.world

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
        take, got = [], 0
        while got < self.batch_size:
            perm = self.permutation(self.epoch)
            k = min(self.batch_size - got, len(perm) - self.index)
            take.append(perm[self.index:self.index + k])
            got, self.index = got + k, self.index + k
            if self.index == len(perm):
                self.epoch, self.index = self.epoch + 1, 0
        return self.examples.take(np.concatenate(take)[self.rank * self.local:(self.rank + 1) * self.local])

    def state_dict(self) -> dict:
        return {'epoch': self.epoch, 'index': self.index, 'seed': self.seed, 'batch_size': self.batch_size,
                'num_examples': len(self.examples), 'shuffle': self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for k in ('seed', 'batch_size', 'num_examples', 'shuffle'):
            if state[k] != mine[k]:  # a different stream: "continuing" it would silently change the trajectory
                raise UserError('resume (data position)', f'the checkpoint was taken with {k} = {state[k]}, '
                                f'this run has {k} = {mine[k]}',
                                'resume with the same spec and data, or start a new run')
        self.epoch, self.index = state['epoch'], state['index']
