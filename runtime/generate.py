"""python -m runtime.generate RUN --prompt TEXT [--prompt ...] [--context TEXT | --context-file F | --memories S:ROW]

Text generation from a trained run with a KV cache, conditioned on memories (the paper's claim 3: a chunk of
context costs the decoder one slot, not chunk_len cache rows).

Memory models (families memory, no_memory) decode exactly as ChunkedMemoryLM.forward lays a chunk out:
- the conditioning tokens (context, then prompt) are cut into chunk_len-token chunks; the complete ones become
  memories in ONE batched `model.encode` call (the decoder has N-1 memory slots: only the newest N-1 are kept);
  the rest is the current chunk (a whole last chunk when the tokens end on a chunk boundary);
- the current chunk is prefilled, after its memory slots (`model.memory.slots`, the training layout: fixed or
  variable slots, same key mask, same positions), into a KV cache of S + L positions, then decoded token by token;
- when the chunk holds L tokens, the next token is the first of a new chunk: the full chunk is encoded into a new
  memory and the cache restarts from the new slots.
Label alignment (compiler/objectives.py, shifted_labels): position t of a chunk is trained to predict token t+1 of
the same chunk, and the last position has no label. So every token inside a chunk comes from a trained position;
the first token of a new chunk is the one exception: it is sampled from the last position of the finished chunk,
which training never supervised (nothing else sees both that chunk's tokens and "what comes next"). The full-context
baseline is trained on the same label set, so its chunk-boundary positions are equally unsupervised.

Causal LMs (families clm, full_context) decode plainly over context + prompt through a cache of the model's whole
context, N*L positions; a request that does not fit is refused.

Batches (evaluation, the harness adapter runtime/lm_adapter.py, and several --prompt): rows of any lengths. Causal
readings left-pad them (key mask; positions of real tokens start at 0). Memory readings group rows that share the
current chunk's length and their memory count, so a group's chunks fill up and roll over at the same steps; the
groups advance in lockstep. Either way a row's greedy output equals generating it alone. Memories come through an
LRU keyed by the chunk's tokens (MemoryCache): prompts that share a context encode its chunks once.

Memory modes (`reading`): on; ablated (every slot the pad slot: the training ablation); full_context (a memory
model's decoder reads the context tokens themselves in its S + L window, no compression).

Library (benchmarks/inference.py reuses it): prefill() reads conditioning tokens into a State, step() feeds one token,
advance() feeds many (teacher forcing), sample() picks one, generate() times the whole thing, score() gives the
teacher-forced log-likelihood of continuations.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from compiler.blocks import KVCache
from compiler.errors import SpecError, cli, either
from compiler.families import REGISTRY, family
from store.layout import RunFolder, memory_store, parse_name

_GENERATING = sorted((f for f in REGISTRY.values() if f.generation), key=lambda f: f.generation != 'memory')
OTHER_USE = f'generate with a {either(f.name for f in _GENERATING)} run'  # memory models first
MODES = ('on', 'ablated', 'full_context')


@dataclass(frozen=True)
class Reading:
    """How a model reads its conditioning tokens under a memory mode (`reading`).
    causal: one window of `window` cache positions over the tokens themselves (clm and full_context families, or a
    chunked decoder in 'full_context' mode); else chunks -> memories, the decoder reading the newest `keep`."""
    mode: str
    causal: bool
    keep: int = 0
    window: int | None = None  # causal: positions the decoder was built for (None: memories slide, no limit)
    chunk: int = 0  # tokens per memory (the run's chunk_len, or a shorter one for a compression sweep)


def reading(model, mode: str = 'on', keep: int | None = None, chunk_len: int | None = None) -> Reading:
    """The Reading of `model` under memory mode `mode`:
    - 'on': as trained (memory models keep their N-1 newest memories);
    - 'ablated': every memory slot empty (the pad slot): the same decoder without memory information, the stage-end
      ablation of training; only for families that form memories;
    - 'full_context': no compression: a chunked decoder reads the context tokens themselves in its own window of
      S + L positions (S memory slots + one chunk: the positions it was trained on), the oldest tokens falling out;
      families that read all tokens anyway (clm, full_context) have no such mode.
    Compression sweeps (memory readings): `keep` memories instead of N-1 (0..N-1), chunks of `chunk_len` tokens
    instead of the trained L (1..L: the encoder reads any length up to the one it was built for, and the decoder's
    slots + chunk positions stay within those it was trained on)."""
    fam = model.family
    if mode not in MODES:
        raise SpecError(f'--memory {mode}', 'unknown memory mode', f"use one of {', '.join(MODES)}")
    causal = fam.generation == 'causal'
    if mode == 'ablated' and not fam.forms_memories:
        raise SpecError(f'--memory {mode}', f"a '{fam.name}' model forms no memories, so there is nothing to ablate",
                        "use --memory on (a no_memory run is already the ablated control)")
    if mode == 'full_context' and causal:
        raise SpecError(f'--memory {mode}', f"a '{fam.name}' model reads every context token in its window already",
                        'use --memory on for it; full_context mode is for memory models (their decoder then reads '
                        'tokens instead of memories)')
    if causal or mode == 'full_context':
        if keep is not None or chunk_len is not None:
            raise SpecError('keep, chunk_len', f'a {mode} reading of a {fam.name} model has no memories to sweep',
                            'sweep a memory model with --memory on')
        return Reading(mode, True, 0, model.decoder.seq_len)
    most = keep_memories(model) if mode == 'on' else 0
    if keep is not None and not 0 <= keep <= most:
        raise SpecError(f'keep={keep}', f'the decoder reads 0..{most} memories in {mode} mode',
                        f'pick keep in 0..{most}')
    if chunk_len is not None and not (1 <= chunk_len <= model.l and model.family.has_encoder
                                      and getattr(model.encoder.cfg, 'kind', '') == 'transformer'):
        raise SpecError(f'chunk_len={chunk_len}', f'the encoder of this {fam.name} model reads chunks of 1..{model.l} '
                        'tokens only if it is a transformer (masked mixers are built for one length)',
                        f'pick chunk_len in 1..{model.l} for a transformer encoder, or leave it out')
    return Reading(mode, False, most if keep is None else keep, None, chunk_len or model.l)


def _how(model, mode) -> Reading:
    """`mode` is a memory mode name or a Reading already made (a compression sweep's)."""
    return mode if isinstance(mode, Reading) else reading(model, mode)


class MemoryCache:
    """LRU of memories keyed by their chunk's tokens: a memory depends on its chunk alone (the encoder reads each
    chunk by itself at positions 0..L-1), so prompts that share a context, and requests that share chunks, encode
    each chunk once. Belongs to one model (its weights): make a new one for other weights."""

    def __init__(self, capacity: int = 8192):
        self.capacity, self.entries = capacity, OrderedDict()
        self.hits = self.misses = 0

    def encode(self, model, chunks: torch.Tensor) -> torch.Tensor:
        """chunks [M, L] -> memories [M, d]; the chunks not cached go through ONE batched model.encode call."""
        keys = [tuple(c) for c in chunks.tolist()]
        todo = list(dict.fromkeys(k for k in keys if k not in self.entries))
        self.misses += len(todo)
        self.hits += len(keys) - len(todo)
        if todo:
            new = model.encode(torch.tensor(todo, dtype=chunks.dtype, device=chunks.device))
            for k, m in zip(todo, new):
                self.entries[k] = m
        for k in keys:
            self.entries.move_to_end(k)
        out = torch.stack([self.entries[k] for k in keys])
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        return out


def _encode(model, chunks: torch.Tensor, cache: MemoryCache | None) -> torch.Tensor:
    return model.encode(chunks) if cache is None else cache.encode(model, chunks)


@dataclass
class State:
    """Incremental decoding of a batch of rows that advance together."""
    cache: KVCache
    mask: torch.Tensor | None  # [B, cache size] key mask of the cache positions; None = every position is real
    tokens: torch.Tensor  # [B, t] tokens in the cache: the current chunk (memory families) or everything (causal LMs)
    memories: torch.Tensor | None  # [B, k, d] memories of earlier chunks, oldest first (memory families)
    logits: torch.Tensor | None = None  # [B, vocab] scores of the next token
    dropped: int = 0  # complete context chunks that did not fit the N-1 memory slots (or, no_memory: all of them)
    reading: Reading | None = None
    memory_cache: MemoryCache | None = None
    scores: torch.Tensor | None = None  # [B, keep, vocab] scores of the last positions a prefill was asked for


def _causal(model) -> bool:
    """One window over every token (clm, full_context), or chunks turned into memories (memory, no_memory)."""
    return model.family.generation == 'causal'


def _feed(model, state: State, x: torch.Tensor, keep: int = 1) -> torch.Tensor:
    """Embeddings x [B, t, d] of new positions through the decoder and its cache. Returns the scores [B, keep, vocab]
    of the last `keep` positions (the last block computes only those) and keeps the last one in state.logits."""
    km = None if state.mask is None else state.mask[:, :state.cache.length + x.shape[1]]
    h = model.decoder(embeds=x, key_mask=km, cache=state.cache, keep_last=keep)
    logits = model.decoder.head(h)
    state.logits = logits[:, -1]
    return logits


def _start_chunk(model, cache: KVCache, memories: torch.Tensor | None, tokens: torch.Tensor, dropped: int = 0,
                 keep: int = 1) -> tuple[State, torch.Tensor]:
    """Restart `cache` with the decoder input of a chunk that follows k = len(memories) chunks: chunk k's row of
    model.memory.slots, the layout, key mask and positions ChunkedMemoryLM.forward trains with. Returns the state
    and the scores of the last `keep` token positions."""
    b = tokens.shape[0]
    slots, slot_mask = model.memory.chunk_slots(memories, model.n, model.variable)
    slots, slot_mask = slots.expand(b, -1, -1), slot_mask.expand(b, -1)
    cache.reset()
    mask = None
    if not bool(slot_mask.all()):  # variable slots: unused ones are masked out, and positions then start at m0
        mask = torch.ones(b, cache.kv.shape[3], dtype=torch.bool, device=tokens.device)
        mask[:, :slot_mask.shape[1]] = slot_mask
    state = State(cache, mask, tokens, memories, dropped=dropped)
    logits = _feed(model, state, torch.cat([slots, model.decoder.embedding(tokens)], 1), keep)
    return state, logits


def new_cache(model, batch: int) -> KVCache:
    """A KV cache for the decoder's whole sequence, allocated once: S slots + L tokens for memory models, N*L tokens
    for causal LMs (what compiler.cost.kv_cache_bytes counts)."""
    p = next(model.decoder.parameters())
    return KVCache(model.decoder.cfg, batch, model.decoder.seq_len, device=p.device, dtype=p.dtype)


def keep_memories(model) -> int:
    """How many memories the decoder reads: its N-1 memory slots (none without an encoder)."""
    return model.n - 1 if getattr(model, 'use_memory', False) else 0


def prefill(model, tokens: torch.Tensor, memories: torch.Tensor | None = None, mode: str | Reading = 'on',
            mask: torch.Tensor | None = None, memory_cache: MemoryCache | None = None, keep: int = 1) -> State:
    """Read conditioning tokens [B, T] (T >= 1), after optional earlier memories [B, k, d]. Causal readings cache
    them all (left padding allowed: mask [B, T], True = real token; positions of real tokens start at 0). Memory
    models: complete chunks become memories (one batched encode of those that are kept), the rest (at least one
    token) is the current chunk; rows advance together, so they share their length. `keep`: also return the scores
    of the last `keep` positions (state.scores), for teacher-forced scoring."""
    if model.family.generation is None:
        raise ValueError(f'family {model.family.name} cannot decode through a KV cache (see check_generates)')
    how = _how(model, mode)
    b, t = tokens.shape
    if how.causal:
        if t > how.window:
            raise ValueError(f'{t} tokens do not fit the window of {how.window} positions')
        state = State(new_cache(model, b), None, tokens, None, reading=how, memory_cache=memory_cache)
        if mask is not None and not bool(mask.all()):
            state.mask = torch.ones(b, state.cache.kv.shape[3], dtype=torch.bool, device=tokens.device)
            state.mask[:, :t] = mask
        state.scores = _feed(model, state, model.decoder.embedding(tokens), min(keep, t))
        return state
    if mask is not None and not bool(mask.all()):
        raise ValueError('memory models read rows of one length together (generate() groups ragged rows)')
    l = how.chunk
    complete = (t - 1) // l  # the current chunk keeps >= 1 token: the decoder needs a position to predict from
    encode = min(complete, how.keep)  # older chunks would not fit the slots: they are not encoded at all
    if encode:
        chunks = tokens[:, (complete - encode) * l:complete * l].reshape(b * encode, l)
        new = _encode(model, chunks, memory_cache).view(b, encode, -1)
        memories = new if memories is None else torch.cat([memories, new], 1)
    if how.keep == 0:
        memories = None
    have = 0 if memories is None else memories.shape[1]
    if have > how.keep:
        memories = memories[:, have - how.keep:]
    dropped = complete - encode + max(0, have - how.keep)
    current = tokens[:, complete * l:]
    state, scores = _start_chunk(model, new_cache(model, b), memories, current, dropped, min(keep, current.shape[1]))
    state.reading, state.memory_cache, state.scores = how, memory_cache, scores
    return state


def _roll_over(model, state: State, token: torch.Tensor) -> State:
    """The chunk is complete: it becomes a memory (the newest `keep` are kept) and `token` [B, 1] starts the next."""
    memories, keep = state.memories, state.reading.keep
    if keep:
        new = _encode(model, state.tokens, state.memory_cache)[:, None]
        memories = new if memories is None else torch.cat([memories, new], 1)[:, -keep:]
    nxt, _ = _start_chunk(model, state.cache, memories, token)
    nxt.reading, nxt.memory_cache = state.reading, state.memory_cache
    return nxt


def _reading_of(model, state: State) -> Reading:
    if state.reading is None:  # a State built by hand
        state.reading = reading(model)
    return state.reading


def step(model, state: State, token: torch.Tensor) -> State:
    """Feed the sampled tokens [B]; state.logits then scores the token after them."""
    token = token[:, None]
    how = _reading_of(model, state)
    if how.causal or state.tokens.shape[1] < how.chunk:
        state.tokens = torch.cat([state.tokens, token], 1)
        _feed(model, state, model.decoder.embedding(token))
        return state
    return _roll_over(model, state, token)


def advance(model, state: State, tokens: torch.Tensor) -> tuple[State, torch.Tensor]:
    """Teacher forcing: feed tokens [B, t] with step()'s semantics (a full chunk becomes a memory and the next token
    starts a new chunk), as few decoder calls as the chunk boundaries allow. Returns the state and the scores
    [B, t, vocab]: scores[:, i] scores the token after tokens[:, i]."""
    how, out, i, t = _reading_of(model, state), [], 0, tokens.shape[1]
    while i < t:
        room = t - i if how.causal else how.chunk - state.tokens.shape[1]
        if room == 0:
            state = _roll_over(model, state, tokens[:, i:i + 1])
            out.append(state.logits[:, None])
            i += 1
            continue
        piece = tokens[:, i:i + room]
        state.tokens = torch.cat([state.tokens, piece], 1)
        out.append(_feed(model, state, model.decoder.embedding(piece), piece.shape[1]))
        i += piece.shape[1]
    return state, torch.cat(out, 1)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, vocab] -> [B] token ids: argmax at temperature 0, else a draw from softmax(logits / T) over the top k."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


# ------------------------------------------------------------------------------------- ragged batches

def _as_rows(tokens) -> list[list[int]]:
    rows = tokens.tolist() if isinstance(tokens, torch.Tensor) else [list(map(int, r)) for r in tokens]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError('every row needs at least one conditioning token')
    return rows


def _layout(model, how: Reading, row: list[int]) -> tuple[tuple, list[int], int]:
    """(group key, the tokens the row's prefill reads, complete chunks it drops). Causal readings: the newest
    `window` tokens, one group (left padding). Memory readings: the kept complete chunks + the current chunk; rows
    that share (current chunk length, memories) roll over at the same steps, so they advance together."""
    if how.causal:
        return ('causal',), row[-how.window:], 0
    l = how.chunk
    complete = (len(row) - 1) // l
    kept = min(complete, how.keep)
    return (len(row) - complete * l, kept), row[(complete - kept) * l:], complete - kept


@dataclass
class Group:
    rows: list[int]  # indices into the batch
    tokens: torch.Tensor  # [b, T] left-padded (causal readings) or equal-length rows
    mask: torch.Tensor | None  # [b, T] True = real token (causal readings with ragged rows)
    dropped: list[int]


def groups(model, rows: list[list[int]], mode: str | Reading = 'on', device='cpu',
           size: int | None = None) -> list[Group]:
    """Split a ragged batch into groups of rows that advance together (at most `size` rows each)."""
    how = _how(model, mode)
    by: dict[tuple, list] = {}
    for i, row in enumerate(rows):
        key, toks, dropped = _layout(model, how, row)
        by.setdefault(key, []).append((i, toks, dropped))
    out = []
    for members in by.values():
        for s in range(0, len(members), size or len(members)):
            part = members[s:s + (size or len(members))]
            width = max(len(t) for _, t, _ in part)
            tokens = torch.zeros(len(part), width, dtype=torch.long)
            mask = torch.zeros(len(part), width, dtype=torch.bool)
            for j, (_, t, _) in enumerate(part):  # left padding: real tokens end at the last column
                tokens[j, width - len(t):] = torch.tensor(t)
                mask[j, width - len(t):] = True
            out.append(Group([i for i, _, _ in part], tokens.to(device),
                             None if bool(mask.all()) else mask.to(device), [d for _, _, d in part]))
    return out


@dataclass
class Generation:
    tokens: list[list[int]]  # per row, the new tokens (an eod token ends a row and is not included)
    ttft_s: float  # prefill (memory encoding included) + first token
    decode_s: float  # every later token
    decoded: int  # tokens sampled after the first (per row)
    kv_cache_bytes: int  # the decoder's cache tensors (of the largest group)
    dropped: list[int]  # per row, context chunks beyond the memory slots

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput of the batch: tokens after the first, all rows, per second."""
        return self.decoded * len(self.tokens) / self.decode_s if self.decoded else float('nan')


def _clock(device) -> float:
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)  # kernels run asynchronously: time what has finished
    return time.perf_counter()


@torch.inference_mode()
def generate(model, tokens, memories: torch.Tensor | None = None, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int | None = None, eod: int | None = None,
             generator: torch.Generator | None = None, mode: str | Reading = 'on',
             memory_cache: MemoryCache | None = None, stop: Callable[[list[int]], bool] | None = None,
             device=None) -> Generation:
    """Continue every row of `tokens` (a [B, T] tensor, or a list of token lists of any lengths) by up to
    max_new_tokens tokens, timed. Ragged rows are grouped (`groups`) and the groups advance in lockstep; greedy
    output of a row equals generating that row alone. `memories` [B, k, d]: earlier memories before every row
    (equal-length rows). `stop(row's new tokens)`: the row is done (e.g. a stop string appeared)."""
    model.eval()
    device = device or (tokens.device if isinstance(tokens, torch.Tensor) else next(model.parameters()).device)
    rows = _as_rows(tokens)
    if memories is not None and len({len(r) for r in rows}) > 1:
        raise ValueError('stored memories condition rows of one length')
    t0 = _clock(device)
    parts = groups(model, rows, mode, device)
    states = []
    for g in parts:
        mem = None if memories is None else memories[g.rows]
        states.append(prefill(model, g.tokens, mem, mode, g.mask, memory_cache))
    out: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    toks = []
    for g, state in zip(parts, states):
        tok = sample(state.logits, temperature, top_k, generator)
        toks.append(tok)
        _record(g, tok, out, done, eod, stop)
    t1 = _clock(device)
    n = 1
    while n < max_new_tokens and not all(done):
        for k, (g, state) in enumerate(zip(parts, states)):
            if all(done[i] for i in g.rows):
                continue
            states[k] = state = step(model, state, toks[k])
            toks[k] = sample(state.logits, temperature, top_k, generator)
            _record(g, toks[k], out, done, eod, stop)
        n += 1
    t2 = _clock(device)
    dropped = [0] * len(rows)
    for g, state in zip(parts, states):
        for i, d in zip(g.rows, g.dropped):
            dropped[i] = d + state.dropped
    return Generation(out, t1 - t0, t2 - t1, n - 1, max(s.cache.nbytes for s in states), dropped)


def _record(g: Group, tok: torch.Tensor, out, done, eod, stop) -> None:
    for i, t in zip(g.rows, tok.tolist()):
        if done[i]:
            continue
        if eod is not None and t == eod:
            done[i] = True
            continue
        out[i].append(t)
        if stop is not None and stop(out[i]):
            done[i] = True


@dataclass
class Scored:
    """Teacher-forced scores of one continuation: per token log-probability and whether it was the argmax."""
    logprobs: list[float]
    greedy: list[bool]

    @property
    def logprob(self) -> float:
        return float(sum(self.logprobs))

    @property
    def is_greedy(self) -> bool:
        return all(self.greedy)


@torch.inference_mode()
def score(model, contexts: list[list[int]], continuations: list[list[int]], mode: str | Reading = 'on',
          memory_cache: MemoryCache | None = None, batch_size: int = 32, device=None) -> list[Scored]:
    """Teacher-forced log-likelihood of each continuation after its context, read exactly as generation reads it:
    the context is prefilled (memory models: complete chunks -> memories), the continuation fed with step()'s
    semantics (a chunk that fills up becomes a memory). Causal readings left-truncate context + continuation to
    the window (the token before the continuation stays); a continuation longer than the window is scored in
    pieces of half a window, each after the tokens before it that fit (the harness' rolling windows)."""
    model.eval()
    device = device or next(model.parameters()).device
    how = _how(model, mode)
    if any(not ctx or not cont for ctx, cont in zip(contexts, continuations)):
        raise ValueError('score() needs a context and a continuation of at least one token each')
    if how.causal:
        return _score_window(model, how, contexts, continuations, memory_cache, batch_size, device)
    out: list[Scored | None] = [None] * len(contexts)
    for g in groups(model, [list(c) for c in contexts], how, device, batch_size):
        width = max(len(continuations[i]) for i in g.rows)
        cont = torch.zeros(len(g.rows), width, dtype=torch.long, device=device)
        for j, i in enumerate(g.rows):  # right padding: what follows a row's continuation cannot change its scores
            cont[j, :len(continuations[i])] = torch.tensor(continuations[i])
        state = prefill(model, g.tokens, None, how, g.mask, memory_cache)
        first = state.logits[:, None]
        _, later = advance(model, state, cont[:, :-1]) if width > 1 else (state, first[:, :0])
        logits = torch.cat([first, later], 1)
        for j, i in enumerate(g.rows):
            out[i] = _scored(logits[j, :len(continuations[i])], continuations[i])
    return out


def _score_window(model, how: Reading, contexts, continuations, memory_cache, batch_size, device) -> list[Scored]:
    """Causal readings: one prefill over left-padded context + continuation scores every position at once."""
    parts = []  # (request, context, piece of its continuation)
    for i, (ctx, cont) in enumerate(zip(contexts, continuations)):
        full, step = list(ctx) + list(cont), len(cont) if len(cont) <= how.window else max(1, how.window // 2)
        parts += [(i, full[:len(ctx) + s], list(cont[s:s + step])) for s in range(0, len(cont), step)]
    rows = [ctx + piece for _, ctx, piece in parts]
    got: list[Scored | None] = [None] * len(parts)
    for g in groups(model, [r[:-1] for r in rows], how, device, batch_size):
        width = max(len(parts[k][2]) for k in g.rows)
        state = prefill(model, g.tokens, None, how, g.mask, memory_cache, keep=width)
        for j, k in enumerate(g.rows):
            got[k] = _scored(state.scores[j, width - len(parts[k][2]):], parts[k][2])
    out = [Scored([], []) for _ in contexts]
    for (i, _, _), sc in zip(parts, got):
        out[i].logprobs += sc.logprobs
        out[i].greedy += sc.greedy
    return out


def _scored(logits: torch.Tensor, target: list[int]) -> Scored:
    """logits [c, vocab] scoring the c target tokens."""
    lp = torch.log_softmax(logits.float(), -1)
    t = torch.tensor(target, device=logits.device)
    return Scored(lp[torch.arange(len(target), device=logits.device), t].tolist(),
                  (lp.argmax(-1) == t).tolist())


# ------------------------------------------------------------------------------------------------------------ CLI

def run_folder(run: str, runs: str) -> Path:
    """RUN: a run folder's path, or a run id or full run name (<id>-<key>) under --runs (an id that several folders
    share, runs of different databases, is refused with the candidates listed)."""
    path = Path(run)
    if path.is_dir() and RunFolder.at(path).operative.is_file():
        return path
    under, ref = (path.parent, path.name) if len(path.parts) > 1 else (Path(runs), run)
    where = f'RUN {run}'
    if parse_name(ref) is not None:
        found = RunFolder.find(under, ref, where)  # several runs with this id: refused, the candidates listed
        if found is not None and found.operative.is_file():
            return found.root
    raise SpecError(where, f'no run folder at {run} and no run {ref} under {under} (a run folder holds operative.gin)',
                    'give a run id (python -m store.runs list), its full name <id>-<key> under --runs, or a run '
                    'folder')


def read_weights(path: Path, where: str) -> dict:
    """A run's safetensors weights; a truncated or foreign file is refused (exit 2) rather than read."""
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001  (SafetensorError: header too small, file not fully covered, ...)
        text = str(e).strip()
        raise SpecError(where, f"cannot read the weights {path}: {text.splitlines()[0] if text else type(e).__name__}",
                        'the file is damaged or not a safetensors file: rerun the run (or the stage) to rewrite it')


def check_generates(plan, where: str) -> None:
    """Families and stacks that cannot decode through a KV cache: one message each, naming what to use instead."""
    fam = family(plan)
    if fam.generation is None:
        fix = (f'decode its stored memories with `python -m store.analyze decode RUN_ID`, or {OTHER_USE}'
               if fam.readout(plan) == 'decoder' else OTHER_USE)
        raise SpecError(where, f"family '{plan.family}' cannot generate: {fam.cannot_generate}", fix)
    if plan.decoder.kind != 'transformer':
        raise SpecError(where, f"family '{plan.family}' with a masked-mixer decoder cannot generate: "
                        'masked mixers keep no KV cache (their token mixing is a convolution over the whole window)',
                        f"{OTHER_USE} whose decoder is a transformer (decoder/Stack.kind = 'transformer')")


def load_run(folder: Path, stage: str | None, device: str = 'cpu'):
    """(plan, model with the run's weights, its vocabulary: tokenizer and special ids) of a run folder. The
    tokenizer is the folder's copy; runs recorded before folders held one rebuild their data cache."""
    from compiler.model import build
    from compiler.spec import load
    from runtime.data import prepare, vocabulary
    plan = load([str(RunFolder.at(folder).operative)]).plan
    check_generates(plan, f'run {folder}')
    if stage is not None and stage not in plan.stage_names:
        raise SpecError(f'--stage {stage}',
                        f"run {folder} has no stage '{stage}' (stages: {', '.join(plan.stage_names)})",
                        'pick one of the listed stages, or leave --stage out for the final weights')
    weights = RunFolder.at(folder).weights(stage)
    if not weights.is_file():
        raise SpecError(f'run {folder}', f'no weights at {weights} (the run did not finish'
                        + (' that stage)' if stage else ')'),
                        'let the run finish (python -m runtime.run ... --resume ID), or pick a finished --stage')
    state = read_weights(weights, f'run {folder}')  # before any work: a damaged file is bad input
    tokenizer = RunFolder.at(folder).tokenizer
    data = vocabulary(tokenizer) if tokenizer.is_file() else prepare(plan, progress=False)
    model = build(plan, data.vocab_size)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise SpecError(f'run {folder}', f'the weights {weights} do not fit the model of its operative.gin: '
                        f'{str(e).strip().splitlines()[-1].strip()}', 'rerun the run to rewrite them')
    return plan, model.to(device).eval(), data


def stored_memories(ref: str, plan, folder: Path):
    """--memories STAGE:ROW -> (memories [1, N-1, d] the stored example's last chunk was decoded with, its tokens)."""
    from store import memories as M
    stage, _, row = ref.rpartition(':')
    where = f'--memories {ref}'
    if not stage or not row.isdigit():
        raise SpecError(where, 'expected STAGE:ROW, e.g. clm:0',
                        'name a stage of the run and a row of its stored memories')
    if not family(plan).stores_memories:
        raise SpecError(where, f"a '{plan.family}' run has no encoder, so it stored no memories",
                        'condition it on text with --context or --context-file')
    store = memory_store(plan.run, folder.parent)
    if store is None:
        raise SpecError(where, "the run stored no memories (Run.memory_store = 'none')",
                        'condition on text with --context')
    try:
        group = M.open_group(store, folder.name, stage)
    except SpecError as e:  # name the option the user gave first
        raise SpecError(where, f'{e.where}: {e.what}', e.fix) from None
    rows = group.memories.shape[0]
    if int(row) >= rows:
        raise SpecError(where, f'row {row} is out of range: the stage stored {rows} rows',
                        f'pick a row in 0..{rows - 1}')
    mem, tokens, mask = group.rows(int(row), int(row) + 1)
    return mem[:, :plan.memory.chunks - 1], tokens[0, -1][mask[0, -1]]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog='python -m runtime.generate', description=__doc__.split('\n\n')[1])
    ap.add_argument('run', metavar='RUN', help='run id or full run name (<id>-<key>) under --runs, or a run folder')
    ap.add_argument('--runs', default='runs', help='folder of run folders (default runs)')
    ap.add_argument('--stage', help='weights at the end of this stage (default: final.safetensors)')
    ap.add_argument('--prompt', required=True, action='append',
                    help='text to continue: the end of the conditioning text; repeat it to generate a batch (one row '
                         'per prompt, after the same context, whose memories are encoded once)')
    src = ap.add_mutually_exclusive_group()
    src.add_argument('--context', help='text before the prompt (memory models: encoded into memories chunk by chunk)')
    src.add_argument('--context-file', help='read the context from this UTF-8 file')
    src.add_argument('--memories', metavar='STAGE:ROW', help="memories of a stored held-out example (the run's Zarr "
                     "store): the N-1 its last chunk was decoded with")
    ap.add_argument('--memory', default='on', choices=MODES,
                    help="on (default); ablated: every memory slot empty; full_context: a memory model's decoder reads "
                         'the context tokens themselves in its window of slots + chunk positions')
    ap.add_argument('--max-new-tokens', type=int, default=64)
    ap.add_argument('--temperature', type=float, default=0.0, help='0 = greedy (default)')
    ap.add_argument('--top-k', type=int, help='sample only among the k most likely tokens')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--device', default='cpu', help='torch device (default cpu)')
    ap.add_argument('--json', action='store_true',
                    help='print tokens, text, ttft_s, tokens_per_s, kv_cache_bytes as JSON')
    return ap


def check_options(args) -> None:
    if args.max_new_tokens < 1:
        raise SpecError(f'--max-new-tokens {args.max_new_tokens}', 'must be at least 1',
                        'pass --max-new-tokens 1 or more')
    if args.temperature < 0:
        raise SpecError(f'--temperature {args.temperature}', 'must be >= 0',
                        'pass 0 for greedy decoding, or a positive value')
    if args.top_k is not None and args.top_k < 1:
        raise SpecError(f'--top-k {args.top_k}', 'must be at least 1', 'pass --top-k 1 or more, or leave it out')
    if not all(args.prompt):
        raise SpecError('--prompt', 'the prompt is empty', 'give --prompt some text: generation continues it')
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as e:
        raise SpecError(f'--device {args.device}', f'device not usable: {str(e).splitlines()[0]}', 'use --device cpu')


def context_text(args) -> str:
    if args.context_file is None:
        return args.context or ''
    try:
        return Path(args.context_file).read_text(encoding='utf-8')
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f'--context-file {args.context_file}',
                        f'cannot read it: {e.strerror if isinstance(e, OSError) else e}',
                        'give a readable UTF-8 text file')


def fits_window(plan, model, n_tokens: int, max_new: int, mode: str = 'on') -> None:
    """Causal readings: the cache holds the conditioning tokens and every new token but the last (never fed)."""
    how = reading(model, mode)
    if not how.causal:
        return
    window = how.window
    if n_tokens + max_new - 1 > window:
        fix = (f'lower --max-new-tokens to {window - n_tokens + 1}' if n_tokens <= window else
               f'shorten --context/--prompt to at most {window} tokens')
        raise SpecError(f'--max-new-tokens {max_new}',
                        f"{n_tokens} conditioning tokens + {max_new} new tokens do not fit "
                        f"the {plan.family} model's context of {window} tokens "
                        + ('(Memory.chunks x chunk_len)' if _causal(model) else '(its memory slots + one chunk)'),
                        fix + ' (a memory model reads any length: its memories slide)')


@cli
def main(argv=None) -> None:
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
    args = parser().parse_args(argv)
    check_options(args)
    folder = run_folder(args.run, args.runs)
    plan, model, data = load_run(folder, args.stage, args.device)
    tok = data.tokenizer
    memories = None
    if args.memories:
        memories, last = stored_memories(args.memories, plan, folder)
        memories = memories.to(args.device)
        print(f'[generate] {memories.shape[1]} stored memories of {args.memories}; that example\'s last chunk was: '
              f'{tok.decode(last.tolist(), skip_special_tokens=False)!r}', file=sys.stderr)
    context = tok.encode(context_text(args), add_special_tokens=False).ids
    rows = [context + tok.encode(p, add_special_tokens=False).ids for p in args.prompt]
    reading(model, args.memory)  # an inapplicable mode is refused before any work
    if memories is not None and len({len(r) for r in rows}) > 1:
        raise SpecError(f'--memories {args.memories}', 'stored memories condition prompts of one token length only',
                        'give one --prompt, or prompts that encode to the same number of tokens')
    for ids in rows:
        fits_window(plan, model, len(ids), args.max_new_tokens, args.memory)
    gen = torch.Generator(args.device).manual_seed(args.seed)
    out = generate(model, rows, memories, args.max_new_tokens, args.temperature, args.top_k, data.eod_id, gen,
                   mode=args.memory, memory_cache=MemoryCache(), device=args.device)
    if out.dropped[0]:
        why = ('a no_memory model reads no memories' if not family(plan).has_encoder else
               'memories are ablated' if args.memory == 'ablated' else
               f'the decoder has {plan.memory.chunks - 1} memory slots; the newest are kept')
        print(f'[generate] {out.dropped[0]} context chunk(s) of {plan.memory.chunk_len} tokens not read: {why}',
              file=sys.stderr)
    for row in out.tokens:
        text = tok.decode(row, skip_special_tokens=False)
        if args.json:
            print(json.dumps({'tokens': row, 'text': text, 'ttft_s': out.ttft_s,
                              'tokens_per_s': out.tokens_per_s if out.decoded else None,
                              'kv_cache_bytes': out.kv_cache_bytes}))
        else:
            print(text)
    if not args.json:
        print(f'[generate] {len(out.tokens)} x {max(map(len, out.tokens))} tokens; time to first token '
              f'{out.ttft_s * 1e3:.1f} ms, {out.tokens_per_s:.0f} tokens/s, KV cache '
              f'{out.kv_cache_bytes / 2**20:.2f} MiB', file=sys.stderr)


if __name__ == '__main__':
    main()
